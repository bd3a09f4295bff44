"""Generators and judges behind one interface: an OpenAI-compatible endpoint, a zephyr_jax checkpoint run
in-process by the engine, or a Python callable.

Every backend answers one `Call` (chat messages, or a raw prompt for /v1/completions-style text such as Magpie's)
with one `Reply`, asynchronously, so the data CLIs drive thousands of calls with plain asyncio and each backend
bounds its own concurrency (the endpoint per base URL, the engine by its KV-cache slots). A failed call is a
`Reply` with `text=None` and `error` set, counted in `stats`; the one exception that ends the run is a backend
that refuses every call (data.endpoint.EndpointRefused: a bad key or model name, no quota, a server never up, an
engine whose thread stopped).

Backend specs (the CLIs' --user/--assistant/--generators/--judge flags):
    endpoint:MODEL@URL[,URL...]   an OpenAI-compatible server (several URLs spread the load over a fleet);
                                  the key comes from $OPENAI_API_KEY unless --api_key_env names another variable
    engine:PATH                   zephyr_jax.load(PATH) (model and tokenizer) on the default device, or over
                                  the CLIs' --mesh (this host's devices), batched by the engine
    callable:module:function      function(call: Call) -> str | Reply (may be async)
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import importlib
import inspect
import random
import re
from typing import Callable

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # Python joins a valid pair into one code point


@dataclasses.dataclass(frozen=True)
class Call:
    """One request: `messages` (chat) or `prompt` (raw text, continued as it is)."""
    messages: tuple[dict, ...] | list[dict] | None = None
    prompt: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self):
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a Call takes exactly one of messages (chat) or prompt (raw text)")
        if isinstance(self.stop, str):  # one stop string, not one per character
            object.__setattr__(self, "stop", (self.stop,))


@dataclasses.dataclass
class Reply:
    text: str | None  # None when the call failed (see `error`)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    error: str | None = None
    attempts: int = 1  # HTTP attempts (retries + 1) for an endpoint

    @property
    def ok(self) -> bool:
        return self.text is not None


class Backend:
    """Base: `name` is the model name written into the outputs; `stats` counts calls, failures and tokens."""
    name: str = "backend"

    def __init__(self):
        self.stats: collections.Counter = collections.Counter()

    async def complete(self, call: Call) -> Reply:
        reply = await self._complete(call)
        if reply.text is not None and _LONE_SURROGATE.search(reply.text):
            # Half of a UTF-16 pair (a server's escaped reply cut mid-emoji) cannot be written as UTF-8: the
            # journal and the outputs could not store the reply, and every rerun would pay for it again.
            reply.text = _LONE_SURROGATE.sub("\ufffd", reply.text)
            self.stats["lone_surrogates_replaced"] += 1
        self.stats["calls"] += 1
        self.stats["failures"] += not reply.ok
        self.stats["prompt_tokens"] += reply.prompt_tokens
        self.stats["completion_tokens"] += reply.completion_tokens
        return reply

    async def _complete(self, call: Call) -> Reply:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def summary(self) -> str:
        s = self.stats
        text = (f"{self.name}: {s['calls']} calls, {s['failures']} failed, {s['retries']} retries, "
                f"{s['prompt_tokens']} prompt + {s['completion_tokens']} completion tokens")
        if s["lone_surrogates_replaced"]:
            text += f", {s['lone_surrogates_replaced']} replies with lone surrogates (written as U+FFFD)"
        return text


class CallableBackend(Backend):
    """A Python function `fn(call) -> str | Reply` (sync functions run in this backend's own `concurrency` worker
    threads: asyncio's shared default pool has min(32, CPUs + 4)). An exception from `fn` becomes a failed Reply,
    counted, with the exception's text."""

    def __init__(self, fn: Callable, name: str | None = None, concurrency: int = 8):
        super().__init__()
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency={concurrency!r}: a callable backend needs at least 1 call at a time")
        self.fn, self.name = fn, name or getattr(fn, "__name__", "callable")
        self.concurrency, self._limit, self._loop, self._threads = concurrency, None, None, None

    async def _complete(self, call: Call) -> Reply:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a semaphore belongs to one event loop: a new asyncio.run needs its own
            self._loop, self._limit = loop, asyncio.Semaphore(self.concurrency)
        async with self._limit:
            try:
                if inspect.iscoroutinefunction(self.fn):
                    out = await self.fn(call)
                else:
                    if self._threads is None:
                        self._threads = concurrent.futures.ThreadPoolExecutor(self.concurrency, self.name)
                    out = await loop.run_in_executor(self._threads, self.fn, call)
            except Exception as e:  # noqa: BLE001 - a broken call is recorded, the run goes on
                return Reply(None, error=f"{type(e).__name__}: {e}")
        if isinstance(out, Reply):
            return out
        if not isinstance(out, str):
            return Reply(None, error=f"{self.name} returned {type(out).__name__}, not str or Reply")
        return Reply(out, finish_reason="stop")

    def close(self) -> None:
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None


# The data CLIs' --mesh (parsed by EngineBackend.from_path, so the CLIs import no jax for endpoint-only runs).
ENGINE_MESH_HELP = ("engine: backends: split the model over this host's devices: data,fsdp,tensor sizes, e.g. 1,1,8 "
                    "(tensor parallel) (default: one device)")


class EngineBackend(Backend):
    """A zephyr_jax model on the engine's own thread: concurrent calls share its decode steps (no HTTP)."""

    def __init__(self, model, tokenizer, name: str = "zephyr_jax", max_slots: int = 32,
                 max_length: int | None = None, **engine_options):
        from zephyr_jax.engine import Engine

        super().__init__()
        self.name, self.tokenizer = name, tokenizer
        self.engine = Engine(model, tokenizer, max_slots=max_slots, max_length=max_length, **engine_options)
        self.engine.start()

    @classmethod
    def from_path(cls, path: str, dtype: str = "bfloat16", mesh: tuple | str | None = None,
                  **options) -> "EngineBackend":
        """mesh: a (data, fsdp, tensor) shape, or the CLIs' "1,1,8", over this process's devices (a 7B and its KV
        cache fit no TPU v5e chip); None: the default device. A training workdir's latest checkpoint is read and
        named ("sft@step936"): a journal resumed after the workdir gained a checkpoint is refused as other
        settings, not continued with another model's replies under the same name."""
        from zephyr_jax.checkpoint import resolve_step
        from zephyr_jax.loading import is_workdir, load
        from zephyr_jax.sharding import local_mesh, mesh_shape

        step = resolve_step(path) if is_workdir(path) else -1
        model, tok = load(path, dtype=dtype, mesh=local_mesh(mesh_shape(mesh) if isinstance(mesh, str) else mesh),
                          step=step)
        name = path.rstrip("/").split("/")[-1] + (f"@step{step}" if step != -1 else "")
        return cls(model, tok, name=options.pop("name", None) or name, **options)

    def prompt_ids(self, call: Call) -> list[int]:
        from zephyr_jax.tokenizer import encode_text, render_chat

        text = call.prompt if call.prompt is not None else \
            render_chat(self.tokenizer, list(call.messages), add_generation_prompt=True)
        return encode_text(self.tokenizer, text)  # one BOS first, as in training and the server

    async def _complete(self, call: Call) -> Reply:
        import jinja2

        from zephyr_jax.engine import Request, SamplingParams
        from zephyr_jax.generate import request_seed

        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def on_update(r):  # the engine's thread
            if r.finish_reason is not None and not r.cancelled:  # (cancelled: nobody awaits it, the loop may be closed)
                loop.call_soon_threadsafe(lambda: done.done() or done.set_result(r))

        try:
            ids = self.prompt_ids(call)
        except (ValueError, TypeError, jinja2.TemplateError) as e:  # e.g. a template that refuses a system turn
            return Reply(None, error=f"{self.name}'s chat template cannot render this call: {type(e).__name__}: {e}")
        room = self.engine.max_length - len(ids)
        if room <= 0:
            return Reply(None, prompt_tokens=len(ids), error=f"prompt of {len(ids)} tokens exceeds the context "
                                                              f"of {self.engine.max_length}")
        seed = request_seed(call.seed, 0) if call.seed is not None else random.getrandbits(32)
        params = SamplingParams(max_tokens=min(call.max_tokens, room), temperature=call.temperature,
                                top_p=call.top_p, seed=seed, stop=tuple(call.stop))
        try:
            request = self.engine.submit(Request(ids, params, on_update=on_update))
        except ValueError as e:
            return Reply(None, prompt_tokens=len(ids), error=str(e))
        except RuntimeError as e:  # the engine stopped (its thread could not go on): every call would be refused
            from zephyr_jax.data.endpoint import EndpointRefused

            raise EndpointRefused(f"{self.name}: every call is refused: {e}") from None
        try:
            r = await done
        except asyncio.CancelledError:  # the run stopped (asyncio.run cancels its tasks): free the slot now
            self.engine.cancel(request)
            raise
        if r.finish_reason == "error":
            return Reply(None, prompt_tokens=len(ids), error=r.error or "engine error")
        return Reply(r.text, prompt_tokens=len(ids), completion_tokens=r.generated, finish_reason=r.finish_reason)

    def close(self) -> None:
        self.engine.stop()


def load_callable(spec: str) -> Callable:
    """"module:function" -> the function (ValueError naming what is missing)."""
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"{spec!r} is not 'module:function'")
    try:
        fn = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {spec!r}: {e}") from e
    if not callable(fn):
        raise ValueError(f"{spec!r} is not callable")
    return fn


def backend_from_spec(spec: str, *, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 16,
                      timeout: float = 120.0, max_retries: int = 6, dtype: str = "bfloat16",
                      max_slots: int = 32, mesh: tuple | str | None = None, **endpoint_options) -> Backend:
    """A backend from a spec string (see the module docstring). `endpoint_options` go to `Endpoint` (backoff,
    max_backoff, price_per_million); `mesh` to an engine's model (EngineBackend.from_path)."""
    kind, _, rest = spec.partition(":")
    if kind == "endpoint":
        from zephyr_jax.data.endpoint import Endpoint

        model, at, urls = rest.rpartition("@")
        if not at or not model or not urls:
            raise ValueError(f"{spec!r}: expected endpoint:MODEL@URL[,URL...]")
        return Endpoint(model, urls.split(","), api_key_env=api_key_env, concurrency=concurrency,
                        timeout=timeout, max_retries=max_retries, **endpoint_options)
    if kind == "engine" and rest:
        return EngineBackend.from_path(rest, dtype=dtype, max_slots=max_slots, mesh=mesh)
    if kind == "callable" and rest:
        return CallableBackend(load_callable(rest), name=rest, concurrency=concurrency)
    raise ValueError(f"unknown backend spec {spec!r}: expected endpoint:MODEL@URL[,URL...], engine:PATH or "
                     f"callable:module:function")


class BackendSet:
    """The CLIs' backends: one per distinct (spec, options), so a --user equal to --assistant, or a judge that is
    also a generator, loads one model or opens one client; all closed together on leaving the `with` block."""

    def __init__(self, **defaults):
        self.defaults, self.made = defaults, {}

    def get(self, spec: str, **options) -> Backend:
        key = (spec, tuple(sorted(options.items())))
        if key not in self.made:
            self.made[key] = backend_from_spec(spec, **{**self.defaults, **options})
        return self.made[key]

    def __enter__(self) -> "BackendSet":
        return self

    def __exit__(self, *exc) -> None:
        for backend in self.made.values():
            backend.close()


async def map_bounded(fn, items, concurrency: int, desc: str, unit: str = " items") -> list:
    """[await fn(item) for item in items] with at most `concurrency` in flight, results in input order, and a
    progress bar. Work items are started lazily, so a million items do not make a million tasks at once."""
    from tqdm.auto import tqdm

    items = list(items)
    results: list = [None] * len(items)
    queue = collections.deque(enumerate(items))
    bar = tqdm(total=len(items), desc=desc, unit=unit, mininterval=1)

    async def worker():
        while queue:
            i, item = queue.popleft()
            results[i] = await fn(item)
            bar.update(1)

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(items))))))
    finally:
        bar.close()
    return results
