"""A scriptable OpenAI-compatible HTTP/1.1 server on 127.0.0.1, for tests and benchmarks of teacher clients.

A `respond(body, attempt)` function decides what each request gets; `attempt` counts the earlier requests with an
identical JSON body (0 for the first), so a script such as "429 the first time, then answer" is one line:

    def respond(body, attempt):
        return status(429, retry_after=0.2) if attempt == 0 else text("hello", completion_tokens=1)

    with ScriptedServer(respond) as server:
        ... point a client at server.base_url ...
    server.counts()  # Counter({"429": 1, "text": 1}), by action kind

Actions: `text(...)` (a chat or text completion, by the request's path), `status(code, ...)` (an OpenAI-shaped
error), `drop()` (close the connection without answering), `sleep(seconds, then)`, `raw(body, code)` (any bytes).
`respond` may also return a plain string, short for `text(string)`. Raw asyncio on a background thread: no web
framework, keep-alive connections as the openai client's pooled httpx uses them, every wait bounded.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import http
import json
import threading
import time

MAX_SLEEP = 60.0  # seconds: a scripted wait longer than this is a mistake in the test
MAX_BODY = 16 << 20


@dataclasses.dataclass(frozen=True)
class Action:
    kind: str  # "text", "status", "drop", "sleep" or "raw"
    content: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish_reason: str = "stop"
    code: int = 200
    retry_after: object = None
    retry_after_ms: float | None = None
    message: str = ""
    seconds: float = 0.0
    then: "Action | None" = None
    body: bytes = b""

    @property
    def label(self) -> str:
        """The name `counts()` uses: "text", "drop", "sleep", "raw", or the status code ("429", "500", ...)."""
        return str(self.code) if self.kind == "status" else self.kind


def text(content, prompt_tokens=None, completion_tokens=None, finish_reason="stop") -> Action:
    """A well-formed completion whose text is `content` (None gives a null message content). Token counts
    default to word counts of the request and of `content`."""
    return Action("text", content=content, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                  finish_reason=finish_reason)


def status(code, retry_after=None, message="scripted error", retry_after_ms=None) -> Action:
    """An HTTP error with an OpenAI-shaped body; `retry_after` (seconds, or an HTTP date string) is sent as the
    Retry-After header and `retry_after_ms` as retry-after-ms."""
    if not 400 <= code <= 599:
        raise ValueError(f"status() is for error codes 400-599, got {code}")
    return Action("status", code=code, retry_after=retry_after, retry_after_ms=retry_after_ms, message=message)


def drop() -> Action:
    """Close the connection without answering."""
    return Action("drop")


def sleep(seconds, then) -> Action:
    """Wait `seconds` (at most MAX_SLEEP), then do `then` (an action, or a string for text)."""
    if not 0 <= seconds <= MAX_SLEEP:
        raise ValueError(f"sleep of {seconds} s: expected 0 to {MAX_SLEEP} s")
    return Action("sleep", seconds=float(seconds), then=_as_action(then))


def raw(body, code=200) -> Action:
    """Send `body` (bytes or str) as application/json with status `code`, e.g. a malformed reply."""
    return Action("raw", code=code, body=body.encode() if isinstance(body, str) else bytes(body))


def _as_action(action) -> Action:
    if isinstance(action, str):
        return text(action)
    if not isinstance(action, Action):
        raise TypeError(f"respond() returned {type(action).__name__}, not an action or a string")
    return action


def _words(body: dict) -> int:
    if "messages" in body:
        return sum(len(str(m.get("content") or "").split()) for m in body["messages"] if isinstance(m, dict))
    prompt = body.get("prompt", "")
    return len((" ".join(map(str, prompt)) if isinstance(prompt, list) else str(prompt)).split())


class ScriptedServer:
    """Context manager: serves at most `max_requests` requests (later ones get 503) until it exits.

    `base_url` ("http://127.0.0.1:PORT/v1"), `log` (one {"path", "attempt", "action", "body", "time"} per request,
    "action" being the action's label), `counts()` (label -> count) and `max_in_flight` (the most requests being
    handled at once) are read from the test's thread."""

    def __init__(self, respond, *, max_requests: int = 10000):
        self.respond, self.max_requests = respond, max_requests
        self.log: list[dict] = []
        self.max_in_flight = 0
        self.base_url = ""
        self._in_flight = 0
        self._seen: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self._tasks: set = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def counts(self) -> collections.Counter:
        with self._lock:
            return collections.Counter(entry["action"] for entry in self.log)

    # -- lifecycle ----------------------------------------------------------------------------------------------------
    def __enter__(self) -> "ScriptedServer":
        self._thread = threading.Thread(target=self._run, name="scripted-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the scripted server did not start within 10 s")
        if self._error is not None:
            raise RuntimeError(f"the scripted server failed to start: {self._error}") from self._error
        return self

    def __exit__(self, *exc) -> None:
        if self._loop is not None and self._stop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as e:  # noqa: BLE001 - reported to __enter__ if it happens at start-up
            self._error = e
            self._ready.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        self.base_url = f"http://127.0.0.1:{port}/v1"
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await server.wait_closed()

    # -- HTTP ---------------------------------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:  # one request after another on a kept-alive connection, until the client closes it
                request = await self._read_request(reader)
                if request is None:
                    break
                method, path, headers, body = request
                keep = await self._handle(writer, method, path, body)
                if not keep or headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass  # the client went away or sent something that is not HTTP: end this connection
        except asyncio.CancelledError:
            pass  # the server is stopping; returning (not re-raising) keeps asyncio's stream callback quiet
        finally:
            self._tasks.discard(task)
            writer.close()

    @staticmethod
    async def _read_request(reader):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None  # closed between requests
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("transfer-encoding", "").lower():
            raise ValueError("chunked request bodies are not supported")
        length = int(headers.get("content-length", 0))
        if not 0 <= length <= MAX_BODY:
            raise ValueError(f"request body of {length} bytes")
        body = await reader.readexactly(length) if length else b""
        return method, path.split("?", 1)[0], headers, body

    async def _handle(self, writer, method: str, path: str, raw_body: bytes) -> bool:
        """Answer one request; False when the connection must end (dropped)."""
        chat, completion = path.endswith("/chat/completions"), path.endswith("/completions")
        if method != "POST" or not completion:
            await self._send(writer, 404, _error_body(f"no route for {method} {path}", 404))
            return True
        try:
            body = json.loads(raw_body or b"{}")
        except json.JSONDecodeError as e:
            await self._send(writer, 400, _error_body(f"request body is not JSON: {e}", 400))
            return True
        key = json.dumps(body, sort_keys=True)
        with self._lock:
            attempt = self._seen[key]
            self._seen[key] += 1
            over = len(self.log) >= self.max_requests
        if over:
            action = status(503, message=f"scripted server: max_requests={self.max_requests} reached")
            label = "limit"
        else:
            try:
                action = _as_action(self.respond(body, attempt))
                label = action.label
            except Exception as e:  # noqa: BLE001 - a broken script is answered, and visible in the log
                action, label = status(500, message=f"respond() raised {type(e).__name__}: {e}"), "error"
        with self._lock:
            self.log.append({"path": path, "attempt": attempt, "action": label, "body": body, "time": time.monotonic()})
        self._in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            while action.kind == "sleep":
                await asyncio.sleep(action.seconds)
                action = action.then
            if action.kind == "drop":
                writer.transport.abort()
                return False
            if action.kind == "raw":
                await self._send(writer, action.code, action.body)
            elif action.kind == "status":
                extra = {}
                if action.retry_after is not None:
                    extra["Retry-After"] = str(action.retry_after)
                if action.retry_after_ms is not None:
                    extra["retry-after-ms"] = str(action.retry_after_ms)
                await self._send(writer, action.code, _error_body(action.message, action.code), extra)
            else:
                await self._send(writer, 200, _completion_body(body, action, chat))
            return True
        finally:
            self._in_flight -= 1

    @staticmethod
    async def _send(writer, code: int, payload, headers=None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        reason = http.HTTPStatus(code).phrase if code in http.HTTPStatus._value2member_map_ else "Status"
        head = [f"HTTP/1.1 {code} {reason}", "Content-Type: application/json", f"Content-Length: {len(data)}",
                "Connection: keep-alive"] + [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + data)
        await writer.drain()


def _error_body(message: str, code: int) -> dict:
    kind = "rate_limit_error" if code == 429 else "server_error" if code >= 500 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": str(code)}}


_ids = iter(range(1, 1 << 62))


def _completion_body(body: dict, action: Action, chat: bool) -> dict:
    prompt = action.prompt_tokens if action.prompt_tokens is not None else _words(body)
    completion = action.completion_tokens if action.completion_tokens is not None else \
        len((action.content or "").split())
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": action.content},
                  "finish_reason": action.finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": action.content or "", "finish_reason": action.finish_reason, "logprobs": None}
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-scripted-{next(_ids)}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": body.get("model", "scripted"), "choices": [choice],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion}}
