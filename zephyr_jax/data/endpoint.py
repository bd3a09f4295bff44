"""An OpenAI-compatible endpoint (OpenAI, vLLM, SGLang, TGI, zephyr_jax.serve) as a `Backend`.

One model may sit behind several base URLs (a fleet of replicas): each call goes to the URL with the fewest calls in
flight, and each URL admits at most `concurrency` requests at once. A URL that fails (connection, timeout, 5xx)
rests for REST_S (max_backoff if shorter) while another is open, and the retry goes to another URL at once. Rate
limits (429), server errors (5xx, 408, or a 200 whose body is an error with such a code), timeouts and dropped
connections are retried with exponential backoff and jitter, or after the server's Retry-After / retry-after-ms
(cut to `max_backoff`, so one odd header cannot stall a run), with a line on stderr every 30 s per URL while that
goes on. Statuses every call would get (401: the key; 404: the model or path; 429 out of quota), and a server that never
answered at all, raise `EndpointRefused`, which stops the run naming the URL. Other client errors (400, 403, 422, ...)
and malformed 200 bodies fail that call at once. Retries are this class's own (the openai client's are switched
off) so that every one is counted in `stats`: "retries", and by reason "retry_429", "retry_5xx", "retry_timeout",
"retry_connection". A call that still fails is a `Reply` with `text=None` and an `error` that names the last
error and the URL; the run goes on. Connection pools belong to the event loop that made them and close when it
ends (asyncio.run), or at `await aclose()`.

    backend = Endpoint("gpt-4o", ["https://api.openai.com/v1"], price_per_million=(2.5, 10.0))
    reply = await backend.complete(Call(messages=[{"role": "user", "content": "Hi"}]))
    await backend.aclose()  # closes the connection pools of the running event loop
    print(backend.summary())
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import os
import random
import sys
import time
import urllib.parse

from zephyr_jax.data.backends import Backend, Call, Reply

import openai

RETRY_REASONS = ("429", "5xx", "timeout", "connection")
# Statuses that every call of the backend would get (a bad or missing key, no such model or path): the run stops.
REFUSED_STATUSES = (401, 404)  # (403 stays a call's own: some gateways refuse one flagged prompt with it)
REST_S = 30.0  # a URL that failed (connection, timeout, 5xx) takes no new calls for this long while another can


class EndpointRefused(ValueError):
    """The server refuses every call of this backend (401, 404, or 429 out of quota), or no base URL ever
    answered (or an engine backend's thread stopped): the run stops, naming the URL and the reason, rather than
    paying for each call's failure. What finished is journaled, so the same command resumes once it is fixed."""


class _ErrorBody(Exception):
    """A 200 whose body is an error ({"error": {"message", "code"}}, as some gateways send)."""

    def __init__(self, error):
        inner = error if isinstance(error, dict) else {"message": str(error)}
        self.message = str(inner.get("message") or inner)
        code = inner.get("code")
        self.status = int(code) if isinstance(code, int) or (isinstance(code, str) and code.isdigit()) else None
        super().__init__(self.message)


def _choice_text(choices, chat: bool) -> str | None:
    """The first choice's text. The openai client builds replies without validating them, so a 200 of the wrong
    shape (a /v1/completions choice to a chat call, "choices" not a list, a number as content) would otherwise
    surface later as an AttributeError; here it is a ValueError, which `_complete` reports as a malformed reply."""
    if not isinstance(choices, list):
        raise ValueError(f"'choices' is {type(choices).__name__}, expected a list")
    choice = choices[0]
    if chat:
        message = getattr(choice, "message", None)
        if message is None:
            raise ValueError("choices[0] has no 'message' (a /v1/completions reply to a chat request?)")
        text = getattr(message, "content", _MISSING)  # (a message built from an object has it, None or not)
        if text is _MISSING:
            raise ValueError(f"choices[0]'s message is {type(message).__name__} {message!r:.40}, not an object with "
                             "'content'")
    else:
        text = getattr(choice, "text", _MISSING)
        if text is _MISSING:
            raise ValueError("choices[0] has no 'text' (a chat reply to a /v1/completions request?)")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"choices[0]'s text is {type(text).__name__} {text!r:.40}, not a string")
    return text


_MISSING = object()


def _count(value) -> int:
    """A usage count; 0 for anything but a non-negative int (a server's odd usage must not stop the run)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def retry_after_seconds(headers, now: float | None = None) -> float | None:
    """The server's requested wait in seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date),
    or None when it sent neither (or something unreadable)."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    after = headers.get("retry-after")
    if after is None:
        return None
    try:
        value = float(after)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(after)
    except (TypeError, ValueError):
        return None
    if when is None or when.tzinfo is None:  # an HTTP date is always GMT; anything else is not one
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _server_message(e: openai.APIStatusError) -> str:
    """The message in an OpenAI-shaped error body ({"error": {"message": ...}} or {"message": ...})."""
    body = e.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
        if isinstance(inner, str):
            return inner
    return str(e.message)


_LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "0.0.0.0")


def _say(message: str) -> None:
    """A line on stderr that leaves the progress bars whole."""
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


def _check_url(url: str) -> str:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"endpoint base URL {url!r} is not an http(s):// URL (e.g. http://host:8000/v1)")
    return url.rstrip("/")


class _LoopState:
    """Clients, per-URL semaphores and in-flight counts of one event loop (asyncio objects are bound to a loop,
    so a second asyncio.run gets its own)."""

    def __init__(self, loop, clients, concurrency: int, resting_until: list[float]):
        self.loop, self.clients = loop, clients
        self.closer = None
        self.limits = [asyncio.Semaphore(concurrency) for _ in clients]
        self.in_flight = [0] * len(clients)
        self.resting_until = resting_until  # the endpoint's: a URL's health outlives an event loop
        self.turn = 0  # rotates the tie-break, so idle URLs share the first calls

    def resting(self, i: int) -> bool:
        return self.resting_until[i] > time.monotonic()

    def open_urls(self, avoid: int | None = None) -> list[int]:
        """URLs not resting after a failure (all of them when every one is), without `avoid` where another is
        open. A URL that fails fast has no calls in flight, so "fewest in flight" alone sent it every call."""
        urls = [i for i in range(len(self.clients)) if not self.resting(i)] or list(range(len(self.clients)))
        return [i for i in urls if i != avoid] or urls

    def pick(self, avoid: int | None = None) -> int:
        n = len(self.clients)
        start, self.turn = self.turn, (self.turn + 1) % n
        return min(sorted(self.open_urls(avoid), key=lambda i: (i - start) % n), key=lambda i: self.in_flight[i])


async def _close_at_loop_end(endpoint: "Endpoint", loop, clients):
    try:
        yield
    finally:
        if endpoint._states.get(loop) is not None and endpoint._states[loop].clients is clients:
            del endpoint._states[loop]
        await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


class Endpoint(Backend):
    """An OpenAI-compatible model served at one or more base URLs (see the module docstring)."""

    def __init__(self, model: str, base_urls: list[str], *, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 16, timeout: float = 120.0, max_retries: int = 6, backoff: float = 1.0,
                 max_backoff: float = 60.0, price_per_million: tuple[float, float] = (0.0, 0.0)):
        super().__init__()
        if isinstance(base_urls, str):
            base_urls = base_urls.split(",")
        urls = [u.strip() for u in base_urls if u and u.strip()]
        if not model:
            raise ValueError("an endpoint needs a model name")
        if not urls:
            raise ValueError(f"endpoint {model!r} needs at least one base URL")
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {concurrency}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, got {max_retries}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if backoff < 0 or max_backoff < 0:
            raise ValueError(f"backoff and max_backoff must be non-negative, got {backoff}, {max_backoff}")
        self.name, self.base_urls = model, [_check_url(u) for u in urls]
        self.api_key_env, self.concurrency, self.timeout = api_key_env, concurrency, float(timeout)
        self.max_retries, self.backoff, self.max_backoff = max_retries, float(backoff), float(max_backoff)
        self.price_per_million = tuple(float(p) for p in price_per_million)
        self._states: dict = {}  # event loop -> _LoopState
        self._answered = False  # some URL has answered (a reply or an HTTP error): it is up
        self._resting_until = [0.0] * len(self.base_urls)  # time.monotonic() until which a URL that failed rests
        self._said_at: dict = {}  # URL -> when a retry there was last printed

    # -- clients, one set per event loop --------------------------------------------------------------------------
    async def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            for old in [lp for lp in self._states if lp.is_closed()]:
                del self._states[old]
            key = os.environ.get(self.api_key_env) or "none"  # local servers accept any key
            if key == "none" and any(urllib.parse.urlparse(u).hostname not in _LOCAL_HOSTS for u in self.base_urls):
                _say(f"warning: {self.name}: ${self.api_key_env} is not set; calling {self.base_urls[0]} without a "
                     "key (--api_key_env names the variable)")
            clients = [openai.AsyncOpenAI(base_url=u, api_key=key, max_retries=0, timeout=self.timeout)
                       for u in self.base_urls]
            state = self._states[loop] = _LoopState(loop, clients, self.concurrency, self._resting_until)
            # asyncio.run closes every live async generator before it closes the loop: this one's `finally`
            # closes the pools then, so a caller that never awaits aclose() leaves no sockets open
            state.closer = _close_at_loop_end(self, loop, clients)
            await state.closer.__anext__()
        return state

    async def aclose(self) -> None:
        """Close the running loop's connection pools (call it before the loop ends, e.g. at the end of main())."""
        state = self._states.pop(asyncio.get_running_loop(), None)
        if state is not None:
            await state.closer.aclose()

    async def __aenter__(self) -> "Endpoint":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    def close(self) -> None:
        """Close what can still be closed from outside a loop; prefer `await aclose()` inside it."""
        for loop, state in list(self._states.items()):
            if not loop.is_closed() and not loop.is_running():
                loop.run_until_complete(state.closer.aclose())
            del self._states[loop]

    # -- one call ---------------------------------------------------------------------------------------------------
    async def _request(self, client, url: str, call: Call) -> Reply:
        kwargs = dict(model=self.name, temperature=call.temperature, top_p=call.top_p, max_tokens=call.max_tokens)
        if call.seed is not None:
            kwargs["seed"] = call.seed
        if call.stop:
            kwargs["stop"] = list(call.stop)
        if call.messages is not None:
            response = await client.chat.completions.create(messages=list(call.messages), **kwargs)
        else:
            response = await client.completions.create(prompt=call.prompt, **kwargs)
        choices = getattr(response, "choices", None)
        if choices is None and getattr(response, "error", None) is not None:
            raise _ErrorBody(response.error)
        if choices == []:
            return Reply(None, error=f"{self.name} at {url}: the server's reply has no choices")
        usage = getattr(response, "usage", None)
        return Reply(_choice_text(choices, chat=call.messages is not None) or "",  # an empty reply is the
                     prompt_tokens=_count(getattr(usage, "prompt_tokens", 0)),  # caller's to filter, not an error
                     completion_tokens=_count(getattr(usage, "completion_tokens", 0)),
                     finish_reason=getattr(choices[0], "finish_reason", None))

    def _delay(self, attempt: int, hint: float | None) -> float:
        if hint is not None:  # the server's word, plus a little jitter so a burst of callers does not return as one
            return min(hint, self.max_backoff) * (1.0 + 0.1 * random.random())
        cap = min(self.backoff * 2 ** attempt, self.max_backoff)
        return cap * (0.5 + 0.5 * random.random())

    async def _complete(self, call: Call) -> Reply:
        state = await self._state()
        i = None
        for attempt in range(self.max_retries + 1):
            i = state.pick(avoid=i)  # a retry goes to another URL where one is open
            url = self.base_urls[i]
            state.in_flight[i] += 1
            hint = None
            try:
                async with state.limits[i]:
                    reply = await asyncio.wait_for(self._request(state.clients[i], url, call), self.timeout)
                reply.attempts = attempt + 1
                self._answered, state.resting_until[i] = True, 0.0
                return reply
            except (openai.APITimeoutError, asyncio.TimeoutError):
                reason, error = "timeout", f"timed out after {self.timeout:g} s"
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e.__context__
                reason, error = "connection", f"connection error: {cause or e}"
            except (openai.APIStatusError, _ErrorBody) as e:
                self._answered = True
                if isinstance(e, openai.APIStatusError):
                    code, error = e.status_code, f"HTTP {e.status_code}: {_server_message(e)}"
                else:
                    code, error = e.status, f"an error in a 200 reply (code {e.status}): {e.message}"
                if code in REFUSED_STATUSES or (code == 429 and getattr(e, "code", None) == "insufficient_quota"):
                    key = (f" (the API key from ${self.api_key_env}, which is "
                           f"{'set' if os.environ.get(self.api_key_env) else 'not set'})" if code == 401 else "")
                    raise EndpointRefused(f"{self.name} at {url}: {error}{key}: every call would get this") from None
                if code == 429:
                    reason = "429"
                elif code is not None and code >= 500:
                    reason = "5xx"
                elif code == 408:  # the server's own request timeout
                    reason = "timeout"
                else:  # the request itself is wrong: asking again gives the same answer
                    return Reply(None, error=f"{self.name} at {url}: {error}", attempts=attempt + 1)
                hint = retry_after_seconds(getattr(getattr(e, "response", None), "headers", None))
            except (openai.OpenAIError, ValueError) as e:  # a 200 whose body is not a completion (bad JSON, wrong
                # shape): the server's answer, not a transient fault, so it is not asked again
                return Reply(None, error=f"{self.name} at {url}: malformed reply: {type(e).__name__}: {e}",
                             attempts=attempt + 1)
            finally:
                state.in_flight[i] -= 1
            if reason != "429":  # a rate limit is the account's, not this URL's
                state.resting_until[i] = time.monotonic() + min(REST_S, self.max_backoff or REST_S)
            if attempt == self.max_retries:
                break
            self.stats["retries"] += 1
            self.stats[f"retry_{reason}"] += 1
            # at once to another URL that is not resting; when every one is, the backoff as for a single URL
            elsewhere = reason != "429" and any(j != i and not state.resting(j) for j in range(len(self.base_urls)))
            self._say_retry(url, error, elsewhere)
            if not elsewhere:  # outside the semaphore: a waiting call holds no slot
                await asyncio.sleep(self._delay(attempt, hint))
        if reason == "connection" and not self._answered and all(state.resting(j) for j in range(len(self.base_urls))):
            # a wrong URL or a server not started: every URL failed, none has answered, and every call would wait
            raise EndpointRefused(f"{self.name}: no base URL has answered ({', '.join(self.base_urls)}); the last "
                                  f"call gave up after {self.max_retries + 1} attempts: {error}")
        return Reply(None, error=f"{self.name} at {url}: {error} (gave up after {self.max_retries + 1} attempts)",
                     attempts=self.max_retries + 1)

    def _say_retry(self, url: str, error: str, elsewhere: bool) -> None:
        """One line per URL every 30 s while calls are retried there (stats count each one)."""
        now = time.monotonic()
        if now - self._said_at.get(url, -math.inf) >= 30.0:
            self._said_at[url] = now
            _say(f"{self.name} at {url}: {error}; retrying{' at another URL' if elsewhere else ''} "
                 f"({self.stats['retries']} retries so far)")

    # -- accounting --------------------------------------------------------------------------------------------------
    def cost(self) -> float:
        """Estimated cost in the price's currency: tokens times price per million (input, output)."""
        price_in, price_out = self.price_per_million
        return (self.stats["prompt_tokens"] * price_in + self.stats["completion_tokens"] * price_out) / 1e6

    def summary(self) -> str:
        by_reason = ", ".join(f"{r} {self.stats[f'retry_{r}']}" for r in RETRY_REASONS)
        text = f"{super().summary()} (retries by reason: {by_reason})"
        if any(self.price_per_million):
            text += f", estimated cost {self.cost():.4f} at {self.price_per_million} per million tokens (in, out)"
        return text
