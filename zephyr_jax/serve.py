"""An OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn), for chat UIs, lm-eval's
`local-completions`, AlpacaEval / MT-Bench judges, distilabel and the `openai` client.

    python -m zephyr_jax.serve --model=HF_DIR_OR_WORKDIR [--host=127.0.0.1] [--port=8000] [--dtype=bfloat16]
        [--api-key=KEY] [--max-slots=16] [--max-length=4096] [--max-queue=256] [--served-model-name=NAME] [--warmup]

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions (the model's chat template; `stream` gives
server-sent events ending in `data: [DONE]`), POST /v1/completions (a prompt as text or token ids, one or a
list; `echo` and `logprobs` score the prompt, as lm-eval's local-completions uses them). Every response has
`usage`. Errors are OpenAI-shaped ({"error": {"message", "type", "param", "code"}}): 400 for a bad request,
401 without the --api-key, 429 (with Retry-After) when the queue is full: a request is accepted only when
the engine can hold it. A client that disconnects cancels its request and frees its slot. One log line per
request: id, prompt and completion tokens, seconds, finish reason.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, StreamingResponse

from zephyr_jax.engine import TOP_LOGPROBS, Engine, QueueFull, Request, SamplingParams

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


def _field(body: dict, name: str, kind, default=None, *, low=None, high=None):
    """body[name] checked for type and range; ApiError(400) naming the field otherwise."""
    value = body.get(name, default)
    if value is None:
        return default
    types = (int, float) if kind is float else kind
    if not isinstance(value, types) or (kind is not bool and isinstance(value, bool)):
        raise ApiError(400, f"'{name}' must be of type {getattr(kind, '__name__', kind)}, got {value!r}", name)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ApiError(400, f"'{name}'={value!r} is out of range [{low}, {high}]", name)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", "stop")
    return tuple(stops)


def sampling_params(body: dict, *, max_tokens: int, logprobs: int | None = None,
                    prompt_logprobs: int | None = None, seed_offset: int = 0) -> SamplingParams:
    temperature = _field(body, "temperature", float, 1.0, low=0.0, high=2.0)
    seed = _field(body, "seed", int, None, low=0, high=2 ** 32 - 1)
    if seed is None:  # OpenAI samples differently on every call unless a seed is given
        seed = int.from_bytes(os.urandom(4), "little")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(i, int) for i in stop_ids):
        raise ApiError(400, "'stop_token_ids' must be a list of token ids", "stop_token_ids")
    return SamplingParams(
        max_tokens=max_tokens, temperature=float(temperature), top_p=float(_field(body, "top_p", float, 1.0,
                                                                                  low=1e-9, high=1.0)),
        top_k=_field(body, "top_k", int, 0, low=0), seed=(seed + seed_offset) % 2 ** 32, stop=_stop(body),
        stop_token_ids=tuple(stop_ids), ignore_eos=_field(body, "ignore_eos", bool, False), logprobs=logprobs,
        prompt_logprobs=prompt_logprobs)


class Server:
    """The endpoints' logic, apart from HTTP, over one engine (which runs on its own thread)."""

    def __init__(self, engine: Engine, tokenizer, model_name: str, api_key: str | None = None):
        self.engine, self.tokenizer, self.model_name, self.api_key = engine, tokenizer, model_name, api_key
        self.created = int(time.time())

    def check_model(self, body: dict) -> None:
        model = body.get("model")
        if model is not None and model != self.model_name:
            raise ApiError(400, f"model {model!r} does not exist: this server serves {self.model_name!r}", "model",
                           "model_not_found")

    def n(self, body: dict) -> int:
        return _field(body, "n", int, 1, low=1, high=self.engine.max_slots)

    def max_tokens(self, body: dict, prompt_length: int, default: int | None, prompt_param: str) -> int:
        """max_tokens (or max_completion_tokens), default: `default`, or all the room left (None)."""
        room = self.engine.max_length - prompt_length
        if room < 0 or (room == 0 and default != 0):
            raise ApiError(400, f"the prompt has {prompt_length} tokens, more than the context of "
                                f"{self.engine.max_length} allows", prompt_param, "context_length_exceeded")
        value = _field(body, "max_completion_tokens", int, None, low=0) or _field(body, "max_tokens", int, None,
                                                                                 low=0)
        value = min(room, default if default is not None else room) if value is None else value
        if prompt_length + value > self.engine.max_length:
            raise ApiError(400, f"the prompt has {prompt_length} tokens and max_tokens is {value}: more than the "
                                f"context of {self.engine.max_length}", "max_tokens", "context_length_exceeded")
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
                if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
                content = "".join(p.get("text", "") for p in content)
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                    not isinstance(content, str):
                raise ApiError(400, f"messages[{i}] must be {{'role': system|user|assistant, 'content': str}}",
                               "messages")
            clean.append({"role": m["role"], "content": content})
        text = render_chat(self.tokenizer, clean, add_generation_prompt=True)
        return self.tokenizer(text).input_ids  # one BOS first, as in training and generate()

    def completion_prompts(self, body: dict) -> list[list[int]]:
        """OpenAI's `prompt`: a string, a list of strings, a list of token ids, or a list of lists of them."""
        prompt = body.get("prompt")
        vocab = self.engine.config.vocab_size
        if isinstance(prompt, str):
            prompt = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt:
            raise ApiError(400, "'prompt' must be a string, a list of strings, or token ids", "prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                if not p:
                    raise ApiError(400, "'prompt' is empty", "prompt")
                out.append(self.tokenizer(p).input_ids)  # with BOS, as the model was trained
            elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < vocab for t in p):
                out.append(list(p))
            else:
                raise ApiError(400, f"'prompt' token ids must be non-empty lists of ints in [0, {vocab})", "prompt")
        return out

    def submit(self, prompt: list[int], params: SamplingParams, rid: str, notify) -> Request:
        try:
            return self.engine.submit(Request(prompt, params, id=rid, on_update=notify))
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry shortly", None, "queue_full",
                           "rate_limit_error") from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    # --- response bodies ----------------------------------------------------------------------------------

    def token_text(self, token: int) -> str:
        return self.tokenizer.convert_tokens_to_string([self.tokenizer.convert_ids_to_tokens(token)]) \
            if token not in self.tokenizer.all_special_ids else self.tokenizer.convert_ids_to_tokens(token)

    def completion_logprobs(self, r: Request, echo: bool) -> dict:
        """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
        tokens, logprobs, tops = [], [], []
        if echo:
            tokens += r.prompt
            logprobs += r.prompt_logprobs
            tops += [None if t is None else {self.token_text(i): lp for i, lp in t} for t in r.prompt_top_logprobs]
        tokens += r.tokens
        logprobs += r.logprobs
        tops += [{self.token_text(i): lp for i, lp in t} for t in r.top_logprobs]
        strings = [self.token_text(t) for t in tokens]
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        return {"tokens": strings, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def chat_logprobs(self, r: Request, start: int = 0) -> dict:
        def entry(token, logprob):
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                            for t, lp, top in zip(r.tokens[start:], r.logprobs[start:], r.top_logprobs[start:])]}

    @staticmethod
    def usage(requests: list[Request]) -> dict:
        prompt = sum(len(r.prompt) for r in requests)
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


def create_app(server: Server):
    app = FastAPI(title="zephyr_jax", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(_, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    @app.exception_handler(404)
    async def not_found(request, _):
        return JSONResponse(ApiError(404, f"no route {request.method} {request.url.path}").body(), status_code=404)

    @app.exception_handler(405)
    async def wrong_method(request, _):
        return JSONResponse(ApiError(405, f"{request.method} is not allowed on {request.url.path}").body(),
                            status_code=405)

    def authorize(request: HttpRequest) -> None:
        if server.api_key is not None and request.headers.get("authorization", "") != f"Bearer {server.api_key}":
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", None,
                           "invalid_api_key", "authentication_error")

    def cancel_unfinished(requests: list[Request]) -> None:
        for r in requests:
            if not r.done.is_set():
                server.engine.cancel(r)

    async def body_of(request: HttpRequest) -> dict:
        authorize(request)
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        server.check_model(body)
        return body

    @app.get("/health")
    async def health():
        engine = server.engine
        return {"status": "ok", "waiting": len(engine.waiting),
                "running": sum(s is not None for s in engine.slots), "slots": engine.max_slots,
                "stats": {**engine.stats, "compiled_programs": engine.compiled_programs()}}

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return {"object": "list", "data": [{"id": server.model_name, "object": "model", "created": server.created,
                                            "owned_by": "zephyr_jax", "max_model_len": server.engine.max_length}]}

    def submit_all(jobs: list[tuple[list[int], SamplingParams]]):
        """Submits every job or none (a refusal cancels those already queued); each request's updates (new
        tokens, the end) arrive on one asyncio queue, from the engine's thread."""
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue = asyncio.Queue()

        def notify(r: Request) -> None:  # on the engine's thread
            if r.done.is_set():
                log_line(r)
            loop.call_soon_threadsafe(updates.put_nowait, r)

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
        body = await body_of(http)
        prompt = server.chat_prompt(body)
        top = _field(body, "top_logprobs", int, 0, low=0, high=TOP_LOGPROBS)
        want = _field(body, "logprobs", bool, False)
        n = server.n(body)
        params = [sampling_params(body, max_tokens=server.max_tokens(body, len(prompt), None, "messages"),
                                  logprobs=top if want else None, seed_offset=i) for i in range(n)]
        stream = _field(body, "stream", bool, False)
        requests, updates = submit_all([(prompt, p) for p in params])
        rid, created = f"chatcmpl-{requests[0].id}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": server.model_name}
        if not stream:
            await wait_all(http, requests, updates)
            raise_engine_error(requests)
            choices = [{"index": i, "message": {"role": "assistant", "content": r.text},
                        "logprobs": server.chat_logprobs(r) if want else None, "finish_reason": finish_reason(r)}
                       for i, r in enumerate(requests)]
            return {**head, "choices": choices, "usage": server.usage(requests)}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            chunk = {**head, "object": "chat.completion.chunk"}
            sent = [0] * len(requests)
            try:
                for i in range(len(requests)):
                    yield sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                finished = [False] * len(requests)
                while not all(finished):
                    await updates.get()
                    for i, r in enumerate(requests):
                        if finished[i]:
                            continue
                        if r.finish_reason == "error":
                            yield sse(ApiError(500, r.error, kind="server_error").body())
                            finished = [True] * len(requests)
                            break
                        text, done = r.new_text(server.tokenizer), r.done.is_set()
                        if text or done:
                            lp = server.chat_logprobs(r, sent[i]) if want else None
                            sent[i] = len(r.tokens)
                            yield sse({**chunk, "choices": [{"index": i, "delta": {"content": text} if text else {},
                                                             "logprobs": lp,
                                                             "finish_reason": finish_reason(r) if done else None}]})
                        finished[i] = done
                if include_usage:
                    yield sse({**chunk, "choices": [], "usage": server.usage(requests)})
                yield "data: [DONE]\n\n"
            finally:  # also when the client goes away mid-stream: free the slots
                cancel_unfinished(requests)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await body_of(http)
        prompts = server.completion_prompts(body)
        echo = _field(body, "echo", bool, False)
        logprobs = _field(body, "logprobs", int, None, low=0, high=5)
        n = server.n(body)
        if _field(body, "stream", bool, False):
            raise ApiError(400, "stream=true is served on /v1/chat/completions only", "stream")
        jobs = []
        for prompt in prompts:
            max_tokens = server.max_tokens(body, len(prompt), 16, "prompt")  # OpenAI's default for completions
            for i in range(n):
                jobs.append((prompt, sampling_params(
                    body, max_tokens=max_tokens, logprobs=logprobs, seed_offset=i,
                    prompt_logprobs=logprobs if echo and logprobs is not None else None)))
        requests, updates = submit_all(jobs)
        await wait_all(http, requests, updates)
        raise_engine_error(requests)
        choices = []
        for i, r in enumerate(requests):
            text = (server.tokenizer.decode(r.prompt, skip_special_tokens=True) if echo else "") + r.text
            choices.append({"index": i, "text": text, "finish_reason": finish_reason(r),
                            "logprobs": server.completion_logprobs(r, echo) if logprobs is not None else None})
        return {"id": f"cmpl-{requests[0].id}", "object": "text_completion", "created": int(time.time()),
                "model": server.model_name, "choices": choices, "usage": server.usage(requests)}

    return app


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="OpenAI-compatible server for a zephyr_jax or Hugging Face model.")
    parser.add_argument("--model", required=True, help="HF directory / hub name, or a zephyr_jax workdir")
    parser.add_argument("--step", type=int, default=-1, help="workdir checkpoint step (-1: latest)")
    parser.add_argument("--tokenizer", default=None, help="default: the model's own, else Mistral-7B-v0.1")
    parser.add_argument("--served-model-name", default=None, help="the model id clients send (default: --model)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--api-key", default=os.environ.get("ZEPHYR_JAX_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $ZEPHYR_JAX_API_KEY, else none)")
    parser.add_argument("--max-slots", type=int, default=16, help="sequences decoded at once (KV-cache rows)")
    parser.add_argument("--max-length", type=int, default=None, help="prompt + reply tokens per sequence")
    parser.add_argument("--max-queue", type=int, default=256, help="waiting requests before 429")
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=8, help="tokens per decoding call")
    parser.add_argument("--warmup", action="store_true",
                        help="compile the decoding call for every bucket of rows and attention length, and the "
                             "prefill of a lone prompt of any length, before serving (Engine.warmup), so no request "
                             "waits for those compiles")
    parser.add_argument("--compilation-cache", default="~/.cache/zephyr_jax/xla",
                        help="JAX's persistent compilation cache, so a restart skips compiling ('' = off)")
    parser.add_argument("--mesh", default=None, help="shard parameters over local devices, e.g. '1,-1,1' (FSDP)")
    args = parser.parse_args(argv)

    import uvicorn

    import zephyr_jax
    from zephyr_jax.tokenizer import tokenizer_for
    from zephyr_jax.train import use_compilation_cache

    # Our own handler: libraries imported above may already have configured the root logger.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    use_compilation_cache(args.compilation_cache)
    mesh = None
    if args.mesh:
        from zephyr_jax.sharding import make_mesh

        mesh = make_mesh(tuple(int(x) for x in args.mesh.split(",")))
    model = zephyr_jax.load(args.model, dtype=args.dtype, mesh=mesh, step=args.step)
    tokenizer = tokenizer_for(args.model, args.tokenizer)
    engine = Engine(model, tokenizer, max_slots=args.max_slots, max_length=args.max_length,
                    prefill_chunk=args.prefill_chunk, decode_steps=args.decode_steps, max_queue=args.max_queue,
                    mesh=mesh)
    if args.warmup:
        log.info("warm-up: compiled %d decoding and prefill programs", engine.warmup(progress=True))
    engine.start()
    server = Server(engine, tokenizer, args.served_model_name or args.model, args.api_key)
    log.info("serving %s on http://%s:%d/v1 (%d slots of %d tokens)", server.model_name, args.host, args.port,
             engine.max_slots, engine.max_length)
    try:
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning")
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
