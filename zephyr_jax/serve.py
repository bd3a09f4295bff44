"""An OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn), for chat UIs, lm-eval's
`local-completions`, AlpacaEval / MT-Bench judges, distilabel and the `openai` client.

    python -m zephyr_jax.serve --model=HF_DIR_OR_WORKDIR [--host=127.0.0.1] [--port=8000] [--dtype=bfloat16]
        [--api-key=KEY] [--max-slots=16] [--max-length=N] [--max-queue=256] [--served-model-name=NAME] [--warmup]

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (the model's chat template, a `developer` message
read as a `system` one; `stream` gives server-sent events ending in `data: [DONE]`), POST /v1/completions (a prompt
as text or token ids, one or a list; `echo` and `logprobs` score the prompt, as lm-eval's local-completions uses
them). Every response has `usage` (each prompt counted once). Log-prob token strings join to the text (each token
read in context, a byte token's at the end of its run: token_strings; a stop string's tokens are listed too, as vLLM
does). Errors are OpenAI-shaped ({"error": {"message", "type", "param", "code"}}): 400 for a bad request (a field
this server does not read, such as frequency_penalty, response_format or vLLM's min_p, included: it is not silently
ignored; FIELDS and IGNORED list what is read and what is metadata), 401 without the --api-key, 404 for a model it
does not serve, 429 (with Retry-After) when the queue is full: a request is accepted only when the engine can hold
it; 503, and /health too, once the engine's thread has stopped (restart the server). Streamed deltas are taken on
the engine's thread, where a reply is not changing. A client that disconnects cancels its request and frees its
slot. One log line per request: id, prompt and completion tokens, seconds, finish reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import socket
import sys
import time
import types
import uuid

import jinja2
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.background import BackgroundTask

from zephyr_jax.config_common import COMPILATION_CACHE_DIR
from zephyr_jax.engine import SIZE_BOUNDS, TOP_LOGPROBS, Engine, QueueFull, Request, SamplingParams
from zephyr_jax.sharding import MESH_FLAG_HELP, local_mesh, mesh_shape
from zephyr_jax.token_strings import TokenStrings
from zephyr_jax.tokenizer import encode_text
from zephyr_jax.train_checks import TRAINING_DTYPES

log = logging.getLogger("zephyr_jax.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------------
# Request bodies -> engine requests.


def _field(body: dict, name: str, kind, default=None, *, low=None, high=None, within: str = ""):
    """body[name] checked for type and range; ApiError(400) naming the field otherwise (as `within`.name for a
    field of the object `within`)."""
    value = body.get(name, default)
    if value is None:
        return default
    name = f"{within}.{name}" if within else name
    types = (int, float) if kind is float else kind
    if not isinstance(value, types) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be of type {getattr(kind, '__name__', kind)}, got {value!r}", name)
    if isinstance(value, float) and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"'{name}'={value!r} is out of range [{low}, {high}]", name)
    return value


def _check_unicode(text: str, what: str, param: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" is valid JSON): no tokenizer can read it
        raise ApiError(400, f"{what} is not valid Unicode (a lone surrogate at {e.start})", param) from e


MAX_STOP_STRINGS = 32  # OpenAI takes 4; lm-eval's local-completions sends a task's every `until` and the EOS


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or \
            len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"'stop' must be a non-empty string or a list of up to {MAX_STOP_STRINGS} of them", "stop")
    return tuple(stops)


# OpenAI fields this server does not implement, with the values that ask for nothing: any other value is a 400
# rather than a reply that silently ignores it.
UNSUPPORTED = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "repetition_penalty": (1, 1.0),
               "logit_bias": ({},), "response_format": ({"type": "text"},), "tools": ([],), "functions": ([],),
               "tool_choice": ("none",), "best_of": (1,), "suffix": ("",)}


# The fields each endpoint reads; any other (vLLM's min_p, min_tokens, guided_json, ...) is a 400, since a reply
# that silently ignored it would not be what the client asked for. IGNORED: metadata that changes no reply.
SAMPLING_FIELDS = {"model", "n", "seed", "stop", "stop_token_ids", "temperature", "top_p", "top_k", "ignore_eos",
                   "max_tokens", "max_completion_tokens", "logprobs", "stream"}
FIELDS = {"chat/completions": SAMPLING_FIELDS | {"messages", "top_logprobs", "stream_options"},
          "completions": SAMPLING_FIELDS | {"prompt", "echo"}}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}


def check_supported(body: dict, endpoint: str) -> None:
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise ApiError(400, f"'{name}' is not supported by this server", name)
    unknown = sorted(set(body) - FIELDS[endpoint] - IGNORED - set(UNSUPPORTED))
    if unknown:
        raise ApiError(400, f"'{unknown[0]}' is not supported by this server's /v1/{endpoint} (it reads "
                            f"{', '.join(sorted(FIELDS[endpoint]))})", unknown[0])


def sampling_params(body: dict, *, max_tokens: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, seed_offset: int = 0) -> SamplingParams:
    temperature = _field(body, "temperature", float, 1.0, low=0.0, high=2.0)
    # Any 64-bit seed, as OpenAI and vLLM take (a client's -1 or random 64-bit seed), folded into the engine's 32.
    seed = _field(body, "seed", int, None, low=-2 ** 63, high=2 ** 63 - 1)
    if seed is None:  # OpenAI samples differently on every call unless a seed is given
        seed = int.from_bytes(os.urandom(4), "little")
    top_k = max(0, _field(body, "top_k", int, 0, low=-1))  # vLLM's -1 for no limit, 0 here
    stop_ids = body.get("stop_token_ids")
    stop_ids = [] if stop_ids is None else stop_ids
    if not isinstance(stop_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in stop_ids):
        raise ApiError(400, "'stop_token_ids' must be a list of token ids", "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens, temperature=float(temperature), top_p=float(_field(body, "top_p", float, 1.0,
                                                                                  low=1e-9, high=1.0)),
        top_k=top_k, seed=(seed + seed_offset) % 2 ** 32, stop=_stop(body),
        stop_token_ids=tuple(stop_ids), ignore_eos=_field(body, "ignore_eos", bool, False), logprobs=logprobs,
        prompt_logprobs=prompt_logprobs)


class Server:
    """The endpoints' logic, apart from HTTP, over one engine (which runs on its own thread)."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.strings = TokenStrings(tokenizer)
        self.created = int(time.time())

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            # 404, as OpenAI and vLLM answer: clients (data.endpoint) stop at it rather than fail every call
            raise ApiError(404, f"model {model!r} does not exist: this server serves {self.model_name!r}", "model",
                           "model_not_found")

    def n(self, body: dict) -> int:
        return _field(body, "n", int, 1, low=1, high=self.engine.max_slots)

    def max_tokens(self, body: dict, prompt_length: int, default: int | None, prompt_param: str,
                   low: int = 1) -> int:
        """max_completion_tokens, else max_tokens, else `default`, or all the room left (None). `low`: 0 where a
        request may only score its prompt (completions with echo)."""
        newer, older = (_field(body, k, int, None, low=low) for k in ("max_completion_tokens", "max_tokens"))
        asked = older if newer is None else newer  # (both checked: a bad one beside a good one is still refused)
        name = "max_tokens" if newer is None else "max_completion_tokens"  # the one an error names
        room = self.engine.max_length - prompt_length
        if room < 0 or (room == 0 and asked != 0):
            raise ApiError(400, f"the prompt has {prompt_length} tokens, more than the context of "
                                f"{self.engine.max_length} allows", prompt_param, "context_length_exceeded")
        value = min(room, default if default is not None else room) if asked is None else asked
        if prompt_length + value > self.engine.max_length:
            raise ApiError(400, f"the prompt has {prompt_length} tokens and {name} is {value}: more than the "
                                f"context of {self.engine.max_length}", name, "context_length_exceeded")
        return value

    def chat_prompt(self, body: dict) -> list[int]:
        from zephyr_jax.tokenizer import render_chat

        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", "messages")
        clean = []
        for i, m in enumerate(messages):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):  # OpenAI's content parts: only text ones are understood here
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts ({{'type': 'text', 'text': str}}) "
                                        "are supported", "messages")
                content = "".join(p["text"] for p in content)
            role = m.get("role") if isinstance(m, dict) else None
            role = "system" if role == "developer" else role  # OpenAI's name for system instructions since o1
            if role not in ("system", "user", "assistant") or not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] must be {{'role': system|developer|user|assistant, 'content': "
                                    "str}", "messages")
            _check_unicode(content, f"messages[{i}].content", "messages")
            clean.append({"role": role, "content": content})
        try:
            text = render_chat(self.tokenizer, clean, add_generation_prompt=True)
        except jinja2.TemplateError as e:  # e.g. a template that refuses this order of roles
            raise ApiError(400, f"the model's chat template refused the messages: {e}", "messages") from e
        return encode_text(self.tokenizer, text)  # one BOS first, as in training and generate()

    def completion_prompts(self, body: dict) -> list[list[int]]:
        """OpenAI's `prompt`: a string, a list of strings, a list of token ids, or a list of lists of them."""
        prompt = body.get("prompt")
        vocab = self.engine.config.vocab_size
        is_id = lambda t: isinstance(t, int) and not isinstance(t, bool)  # JSON true is not token 1
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(is_id(t) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or len({type(p) for p in prompt}) > 1:
            raise ApiError(400, "'prompt' must be a string, a list of strings, token ids, or a list of token id "
                                "lists", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise ApiError(400, "'prompt' is empty", "prompt")
                _check_unicode(p, "'prompt'", "prompt")
                out.append(encode_text(self.tokenizer, p))  # one BOS, as the model was trained
            elif isinstance(p, list) and p and all(is_id(t) and 0 <= t < vocab for t in p):
                out.append(list(p))
            else:
                raise ApiError(400, f"'prompt' token ids must be non-empty lists of ints in [0, {vocab})", "prompt")
        return out

    def stopped(self) -> str | None:
        """Why this server can answer no request any more (its engine's thread ended), or None."""
        if self.engine.stopped_by is None:
            return None
        return f"the engine's thread stopped ({self.engine.stopped_by}): restart the server"

    def submit(self, prompt: list[int], params: SamplingParams, rid: str, notify) -> Request:
        try:
            return self.engine.submit(Request(prompt, params, id=rid, on_update=notify))
        except RuntimeError:
            if self.stopped() is None:
                raise
            raise ApiError(503, self.stopped(), None, None, "server_error") from None
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", None, "queue_full",
                           "rate_limit_error") from e
        except ValueError as e:  # the engine's own checks, which start with the field's name ("top_k=...")
            name = re.match(r"(\w+)=", str(e))
            raise ApiError(400, str(e), name and name.group(1)) from e

    # --- response bodies ----------------------------------------------------------------------------------

    def completion_text(self, r: Request, echo: bool) -> str:
        """What the reply adds to the prompt's text (as OpenAI and vLLM: the space its first token carries after
        the prompt, r.lead, is kept; the reply decoded alone, r.text, drops it), after the prompt's text with echo."""
        return (self.tokenizer.decode(r.prompt, skip_special_tokens=True) if echo else "") + r.lead + r.text

    def completion_logprobs(self, r: Request, echo: bool) -> dict:
        """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs (each token's own entry and
        its top n), and text_offset (where each token's text starts in the choice's text). The prompt's with
        echo; then the reply's, and the stop token that ended it, which adds no text (as vLLM lists it: lm-eval
        reads a continuation's log-probs as all entries after the context but the last, the next token's)."""
        stop = [] if r.stop_token is None else [r.stop_token]
        every = [*r.prompt, *r.tokens, *(token for token, _, _ in stop)]
        start = 0 if echo else len(r.prompt)
        logprobs = (list(r.prompt_logprobs) if echo else []) + r.logprobs + [lp for _, lp, _ in stop]
        tops = (list(r.prompt_top_logprobs) if echo else []) + r.top_logprobs + [top for _, _, top in stop]
        entries = self.strings.entries(every, start)  # (the reply's first keeps the space it adds after the prompt)
        strings, top_dicts, offsets, at = [], [], [], 0
        for k, (token, top, logprob, (shown, share, _)) in enumerate(zip(every[start:], tops, logprobs, entries),
                                                                    start):
            share = "" if stop and k == len(every) - 1 else share  # (a stop token id may be a word's)
            strings.append(shown)
            # The token itself, then the top n, as OpenAI ("up to logprobs+1 elements") and vLLM list them.
            top_dicts.append(None if top is None else {
                shown: logprob, **{self.strings.alternative(every, k, i)[0]: lp for i, lp in top}})
            offsets.append(at)
            at += len(share)
        return {"tokens": strings, "token_logprobs": logprobs, "top_logprobs": top_dicts, "text_offset": offsets}

    def streamable(self, r: Request, done: bool) -> types.SimpleNamespace:
        """The reply's tokens whose log-prob entries a stream may send now, as plain data (taken on the engine's
        thread): all of them once it is done, else up to the last piece (a byte token's string waits for the end of
        its run: token_strings)."""
        end = len(r.tokens) if done else self.strings.settled(r.tokens)
        return types.SimpleNamespace(tokens=r.tokens[:end], logprobs=r.logprobs[:end],
                                     top_logprobs=r.top_logprobs[:end])

    def chat_logprobs(self, r: Request, start: int = 0) -> dict:
        """OpenAI's chat logprobs for the reply's tokens from `start` on: their strings join to the content, and
        their bytes to its UTF-8 where the model wrote valid UTF-8 (token_strings)."""
        end = min(len(r.tokens), len(r.logprobs))
        content = []
        for k, (shown, _, raw) in enumerate(self.strings.entries(r.tokens[:end], start), start):
            tops = [(*self.strings.alternative(r.tokens, k, i), v) for i, v in r.top_logprobs[k]]
            content.append({"token": shown, "logprob": r.logprobs[k], "bytes": raw,
                            "top_logprobs": [{"token": t, "logprob": v, "bytes": b} for t, _, b, v in tops]})
        return {"content": content}

    @staticmethod
    def usage(requests: list[Request]) -> dict:
        """Each prompt counted once, as OpenAI does: the n choices of a prompt share its list of ids."""
        prompt = sum(len(p) for p in {id(r.prompt): r.prompt for r in requests}.values())
        completion = sum(r.generated for r in requests)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(r: Request) -> str:
    return "length" if r.finish_reason == "length" else "stop"


def raise_engine_error(requests: list[Request]) -> None:
    """500 when the engine failed a request (an exception in a jitted call); the server goes on."""
    for r in requests:
        if r.finish_reason == "error":
            raise ApiError(500, f"generation failed: {r.error}", None, None, "server_error")


def log_line(r: Request) -> None:
    seconds = (r.finished_at or time.perf_counter()) - r.submitted_at
    log.info("%s prompt_tokens=%d completion_tokens=%d seconds=%.3f finish=%s", r.id, len(r.prompt), r.generated,
             seconds, r.finish_reason)


# ---------------------------------------------------------------------------------------------------------
# HTTP.


class ErrorResponse(JSONResponse):
    """An error body in ASCII JSON: a message may echo the request's text, and a lone surrogate there (a field
    named "\\ud800" is valid JSON) cannot be encoded as UTF-8; escaped, it is valid JSON again."""

    def render(self, content) -> bytes:
        return json.dumps(content).encode()


def create_app(server: Server):
    app = FastAPI(title="zephyr_jax", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return ErrorResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(404)
    async def not_found(request, _):
        return ErrorResponse(ApiError(404, f"no route {request.method} {request.url.path}").body(), status_code=404)

    @app.exception_handler(Exception)
    async def unexpected(request, e: Exception):  # still an OpenAI-shaped body (uvicorn logs the traceback)
        return ErrorResponse(ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error").body(),
                             status_code=500)

    @app.exception_handler(405)
    async def wrong_method(request, _):
        return ErrorResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                             status_code=405)

    def authorize(request: HttpRequest) -> None:
        if server.api_key is not None and request.headers.get("authorization", "") != f"Bearer {server.api_key}":
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", "authentication_error")

    def cancel_unfinished(requests: list[Request]) -> None:
        for r in requests:
            if not r.done.is_set():
                server.engine.cancel(r)

    async def body_of(request: HttpRequest, endpoint: str) -> dict:
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {type(e).__name__}: {e}"[:500]) from e
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        server.check_model(body)
        check_supported(body, endpoint)
        return body

    @app.get("/health")
    async def health():
        engine = server.engine
        if server.stopped() is not None:  # every request would fail: a supervisor should restart the server
            return JSONResponse({"status": "error", "error": server.stopped()}, status_code=503)
        return {"status": "ok", "waiting": len(engine.waiting),
                "running": sum(s is not None for s in engine.slots), "slots": engine.max_slots,
                "stats": {**engine.stats, "compiled_programs": engine.compiled_programs()}}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "zephyr_jax", "max_model_len": server.engine.max_length}]}

    def submit_all(jobs: list[tuple[list[int], SamplingParams]], param: str, snapshot=None):
        """Submits every job or none (a refusal cancels those already queued); each request's updates (new
        tokens, the end) arrive on one asyncio queue, from the engine's thread: the request, or what
        `snapshot(request)` makes of it there, where the request is not changing under it."""
        capacity = server.engine.max_slots + (server.engine.max_queue if server.engine.max_queue is not None
                                              else len(jobs))
        if len(jobs) > capacity:  # 429 would ask the client to retry what can never fit
            raise ApiError(400, f"{len(jobs)} sequences (prompts x n) exceed the {capacity} this server holds at "
                                "once (slots + queue)", param)
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def notify(r: Request) -> None:  # on the engine's thread
            if r.done.is_set():
                log_line(r)
            loop.call_soon_threadsafe(updates.put_nowait, r if snapshot is None else snapshot(r))

        base, requests = uuid.uuid4().hex[:12], []
        try:
            for i, (prompt, params) in enumerate(jobs):
                requests.append(server.submit(prompt, params, f"{base}-{i}", notify))
        except ApiError:
            cancel_unfinished(requests)
            raise
        return requests, updates

    async def wait_all(http: HttpRequest, requests, updates) -> None:
        """Until every request is done; if the client goes away first, its requests are cancelled."""
        try:
            checked = time.monotonic()
            while not all(r.done.is_set() for r in requests):
                try:
                    await asyncio.wait_for(updates.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - checked > 0.5:
                    checked = time.monotonic()
                    if await http.is_disconnected():
                        return
        finally:
            cancel_unfinished(requests)

    def sse(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    @app.post("/v1/chat/completions")
    async def chat(http: HttpRequest):
        body = await body_of(http, "chat/completions")
        # Tokenizing on a worker thread: a long prompt (megabytes) would otherwise hold the event loop, and every
        # other client's stream, for seconds before it is refused.
        prompt = await asyncio.to_thread(server.chat_prompt, body)
        top = _field(body, "top_logprobs", int, None, low=0, high=TOP_LOGPROBS)
        want = _field(body, "logprobs", bool, False)
        if top is not None and not want:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        n = server.n(body)
        params = [sampling_params(body, max_tokens=server.max_tokens(body, len(prompt), None, "messages"),
                                  logprobs=(top or 0) if want else None, seed_offset=i) for i in range(n)]
        stream = _field(body, "stream", bool, False)
        options = body.get("stream_options")
        if options is not None and not stream:  # (OpenAI's answer too: it would change nothing)
            raise ApiError(400, "'stream_options' is only allowed with \"stream\": true", "stream_options")
        options = {} if options is None else options
        if not isinstance(options, dict):
            raise ApiError(400, "'stream_options' must be an object, e.g. {\"include_usage\": true}", "stream_options")
        unread = sorted(set(options) - {"include_usage"})  # vLLM's continuous_usage_stats, ...: refused, not ignored
        if unread:
            raise ApiError(400, f"'stream_options' reads include_usage only, not {unread}", "stream_options")
        include_usage = _field(options, "include_usage", bool, False, within="stream_options")
        if not stream:
            requests, updates = submit_all([(prompt, p) for p in params], "n")
        else:
            sent = [0] * n  # log-prob entries streamed so far, per choice (engine thread only)

            def delta(r: Request):
                """On the engine's thread, between its changes to r, plain data only (formatting them is the
                event loop's work): (choice, new text, the reply so far and where its unsent log-probs start,
                finish reason or None, error or None)."""
                i = int(r.id.rsplit("-", 1)[1])
                if r.finish_reason == "error":
                    return i, "", None, "error", r.error
                try:
                    text, done = r.new_text(server.tokenizer), r.done.is_set()
                except Exception as e:  # noqa: BLE001 -- this request's stream ends, not every request's
                    return i, "", None, "error", f"{type(e).__name__}: {e}"
                scores = None
                if want and (text or done):
                    scores = (server.streamable(r, done), sent[i])
                    sent[i] = len(scores[0].tokens)
                return i, text, scores, finish_reason(r) if done else None, None

            requests, updates = submit_all([(prompt, p) for p in params], "n", delta)
        rid, created = f"chatcmpl-{requests[0].id}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name}
        if not stream:
            await wait_all(http, requests, updates)
            raise_engine_error(requests)
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                        "logprobs": server.chat_logprobs(r) if want else None, "finish_reason": finish_reason(r)}
                       for i, r in enumerate(requests)]
            return {**head, "choices": choices, "usage": server.usage(requests)}

        async def events():
            chunk = {**head, "object": "chat.completion.chunk"}
            try:
                for i in range(len(requests)):
                    yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                finished = [False] * len(requests)
                while not all(finished):
                    i, text, scores, reason, error = await updates.get()
                    lp = None if scores is None else server.chat_logprobs(*scores)
                    if error is not None:
                        yield sse(ApiError(500, error, kind="server_error").body())
                        break
                    if not finished[i] and (text or reason):
                        yield sse({**chunk, "choices": [{"index": i, "delta": {"content": text} if text else {},
                                                         "logprobs": lp, "finish_reason": reason}]})
                    finished[i] = finished[i] or reason is not None
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": server.usage(requests)})
                yield "data: [DONE]\n\n"
            finally:  # also when the client goes away mid-stream: free the slots
                cancel_unfinished(requests)

        # And after the response (under uvicorn's ASGI 2.3 Starlette runs this however the stream ended): a client
        # gone before the first event cancels the response before events() starts, whose `finally` then never runs.
        return StreamingResponse(events(), media_type="text/event-stream",
                                 background=BackgroundTask(cancel_unfinished, requests))

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await body_of(http, "completions")
        prompts = await asyncio.to_thread(server.completion_prompts, body)
        echo = _field(body, "echo", bool, False)
        logprobs = _field(body, "logprobs", int, None, low=0, high=5)
        n = server.n(body)
        if _field(body, "stream", bool, False):
            raise ApiError(400, "stream=true is served on /v1/chat/completions only", "stream")
        jobs = []
        for prompt in prompts:  # OpenAI's default is 16 tokens; 0 only scores the prompt (echo)
            max_tokens = server.max_tokens(body, len(prompt), 16, "prompt", low=0 if echo else 1)
            for i in range(n):
                jobs.append((prompt, sampling_params(
                    body, max_tokens=max_tokens, logprobs=logprobs, seed_offset=i,
                    prompt_logprobs=logprobs if echo and logprobs is not None else None)))
        requests, updates = submit_all(jobs, "prompt")
        await wait_all(http, requests, updates)
        raise_engine_error(requests)
        choices = []
        for i, r in enumerate(requests):
            choices.append({"index": i, "text": server.completion_text(r, echo), "finish_reason": finish_reason(r),
                            "logprobs": server.completion_logprobs(r, echo) if logprobs is not None else None})
        return {"id": f"cmpl-{requests[0].id}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_name, "choices": choices, "usage": server.usage(requests)}

    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zephyr_jax.serve",
                                     description="OpenAI-compatible server for a zephyr_jax or Hugging Face model.")
    parser.add_argument("--model", required=True, help="HF directory / hub name, or a zephyr_jax workdir")
    parser.add_argument("--step", type=int, default=-1, help="workdir checkpoint step (-1: latest)")
    parser.add_argument("--tokenizer", default=None, help="default: the model's own, else Mistral-7B-v0.1")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="bfloat16", choices=TRAINING_DTYPES)
    parser.add_argument("--api-key", default=os.environ.get("ZEPHYR_JAX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $ZEPHYR_JAX_API_KEY, else none)")
    parser.add_argument("--max-slots", type=int, default=16, help="sequences decoded at once (KV-cache rows)")
    parser.add_argument("--max-length", type=int, default=None, help="prompt + reply tokens per sequence "
                        "(default: the model's max_position_embeddings, at most 4096)")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=8, help="tokens per decoding call")
    parser.add_argument("--warmup", action="store_true",
                        help="compile the decoding call for every bucket of rows and attention length, and the "
                             "prefill of a lone prompt of any length, before serving (Engine.warmup), so no request "
                             "waits for those compiles")
    parser.add_argument("--compilation-cache", default=COMPILATION_CACHE_DIR,
                        help="JAX's persistent compilation cache, so a restart skips compiling ('' = off)")
    parser.add_argument("--mesh", type=mesh_shape, default=None, help=MESH_FLAG_HELP)
    parser.add_argument("--shutdown-timeout", type=int, default=10,
                        help="seconds SIGTERM or Ctrl-C lets the requests in progress and queued run before they are "
                             "cut and the server exits (default 10; uvicorn's own default waited for every one)")
    # vLLM's spelling (--max-slots); the underscores the other zephyr_jax commands use are taken too.
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args([re.sub(r"^--\w+", lambda m: m.group(0).replace("_", "-"), a) for a in argv])
    for flag, least in SIZE_BOUNDS.items():  # the Engine's, now and not after the model loads
        value = getattr(args, flag)
        if value is not None and value < least:
            sys.exit(f"error: --{flag.replace('_', '-')}={value}: must be at least {least}")
    if args.shutdown_timeout < 0:
        sys.exit(f"error: --shutdown-timeout={args.shutdown_timeout}: must be 0 or more seconds")
    if not 0 <= args.port <= 65535:  # bind() raised OverflowError, a traceback
        sys.exit(f"error: --port={args.port}: must be from 0 to 65535")
    try:  # a port in use (or a host not here) now, not after minutes of loading a 7B; uvicorn binds it again later
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET  # (--host=:: for IPv6)
        socket.create_server((args.host, args.port), family=family).close()  # (SO_REUSEADDR, as uvicorn binds)
    except OSError as e:
        sys.exit(f"error: --host={args.host} --port={args.port}: cannot listen there ({e.strerror or e})")

    import uvicorn

    import zephyr_jax
    from zephyr_jax.train import use_compilation_cache

    # Our own handler: libraries imported above may already have configured the root logger.
    if not log.handlers:  # (once: main may run again in one process)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    use_compilation_cache(args.compilation_cache)
    try:  # no such model or step, a mesh the devices cannot fill: its message alone, no traceback
        mesh = local_mesh(args.mesh)
        model, tokenizer = zephyr_jax.load(args.model, dtype=args.dtype, mesh=mesh, step=args.step,
                                           tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:  # a KV cache larger than the devices' free memory: its sizes, not jax's out-of-memory traceback
        engine = Engine(model, tokenizer, max_slots=args.max_slots, max_length=args.max_length,
                        prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps, max_queue=args.max_queue,
                        mesh=mesh)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if args.warmup:
        log.info("warm-up: compiled %d decoding and prefill programs", engine.warmup(progress=True))
    engine.start()
    server = Server(engine, tokenizer, args.served_model_name or args.model, args.api_key)

    class Listening(uvicorn.Server):
        async def startup(self, sockets=None):  # it exits when the port cannot be bound (in use, not allowed)
            await super().startup(sockets)  # so "serving" is said only once the server listens
            port = self.servers[0].sockets[0].getsockname()[1]  # the one bound: --port=0 lets the OS pick
            log.info("serving %s on http://%s:%d/v1 (%d slots of %d tokens)", server.model_name, args.host,
                     port, engine.max_slots, engine.max_length)

    try:
        # SIGTERM (systemd, Kubernetes, a job scheduler) and Ctrl-C: uvicorn stops taking requests and, after the
        # timeout, cancels those still running (their slots freed); without it, up to --max-queue replies of
        # thousands of tokens each ran first, past the caller's own grace period and its SIGKILL.
        Listening(uvicorn.Config(create_app(server), host=args.host, port=args.port, log_level="warning",
                                 timeout_graceful_shutdown=args.shutdown_timeout)).run()
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
