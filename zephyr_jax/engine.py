"""The generation engine: continuous batching over a fixed number of KV-cache slots.

Every request gets a slot for its whole life. Each scheduling step
  1. admits waiting requests into free slots;
  2. prefills them: their prompts go through the model in chunks of at most `prefill_chunk` tokens (a bucketed
     length, several requests a call), so a long prompt never stalls the others for long; the chunk that ends
     a prompt also samples its first token;
  3. decodes: one jitted call advances every decoding slot by up to `decode_steps` tokens (a jax.lax.scan; a
     slot that meets a stop token or its max_tokens stops inside the call), then the host checks stop strings.
A finished or cancelled request frees its slot at once, and the next waiting request takes it in the next step,
while the other slots go on decoding: nobody waits for the longest reply of a batch.

Shapes are bucketed (rows and chunk lengths to 2^k or 3 * 2^(k-1); how much of the cache attention
reads likewise when decoding, and to powers of two when prefilling; prefill calls take power-of-two groups
of requests, so no row is padding), so each bucket compiles once. The cache is donated to every call, so it
is updated in place. Parameters may be sharded over a mesh (zephyr_jax.load(..., mesh=...)); the cache is laid
out over the same mesh, and XLA gathers what each layer needs.

Use it synchronously (`generate`) or from a server (`start` runs the loop on a thread; `submit` and `cancel` may
be called from any thread; a request's `on_update` is called on the engine's thread after each call that gave it
new tokens, and when it ends; one that raises cancels its request, with a warning). A call that fails ends the
requests in slots (whose shared cache it may have consumed) with an error, and those still queued go on; if the
loop itself cannot go on, it ends every request and `submit` refuses more.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import threading
import time
import warnings
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zephyr_jax.model import KVCache, kv_cache, mistral
from zephyr_jax.sampling import sample
from zephyr_jax.sharding import logical_to_spec, make_mesh

TOP_LOGPROBS = 20  # the most alternatives per token a request may ask for (OpenAI's limit)
MAX_STOP_TOKENS = 8  # stop token ids per request, the EOS included


class QueueFull(Exception):
    """The engine's waiting queue is at its bound: the caller should retry later (HTTP 429)."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()  # the reply ends before the first of these strings
    stop_token_ids: tuple[int, ...] = ()  # ... or at these tokens (and at EOS unless ignore_eos)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; n >= 0: each sampled token's log-prob and the top n alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (scoring, OpenAI's `echo`)

    def __post_init__(self):  # one stop string is a stop string, not one stop per character
        stop, ids = self.stop, self.stop_token_ids  # (an array has no truth value)
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(() if stop is None else stop))
        object.__setattr__(self, "stop_token_ids", tuple(() if ids is None else ids))

    def check(self, vocab_size: int | None = None) -> None:
        """ValueError naming the first field of another type (2.5 tokens ran as 3, seed 1.9 as 1) or out of
        range; with a vocab_size, also top_k and stop_token_ids beyond the model's vocabulary."""
        whole = lambda x: isinstance(x, (int, np.integer)) and not isinstance(x, bool)  # noqa: E731
        real = lambda x: isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)  # noqa
        for name, kind in (("max_tokens", whole), ("top_k", whole), ("seed", whole), ("temperature", real),
                           ("top_p", real)):
            if not kind(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)!r}: must be a {'whole' if kind is whole else 'real'} "
                                 "number")
        checks = [
            ("max_tokens", self.max_tokens >= 0, "must be >= 0"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_k", self.top_k >= 0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("seed", 0 <= self.seed < 2 ** 32, "must be in [0, 2**32)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            # (the device compares ids as int32: 297.5 stopped there, and the host, comparing 297, went on)
            ("stop_token_ids", all(map(whole, self.stop_token_ids)), "must be whole numbers"),
            ("stop_token_ids", len(self.stop_token_ids) < MAX_STOP_TOKENS, f"at most {MAX_STOP_TOKENS - 1}"),
            ("logprobs", self.logprobs is None or whole(self.logprobs) and 0 <= self.logprobs <= TOP_LOGPROBS,
             f"must be None or a whole number in [0, {TOP_LOGPROBS}]"),
            ("prompt_logprobs", self.prompt_logprobs is None or whole(self.prompt_logprobs)
             and 0 <= self.prompt_logprobs <= TOP_LOGPROBS, f"must be None or a whole number in [0, {TOP_LOGPROBS}]"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")
        if vocab_size is not None and self.top_k > vocab_size:
            raise ValueError(f"top_k={self.top_k}: must be in [0, {vocab_size}] (the model's vocabulary)")
        if vocab_size is not None and any(not 0 <= i < vocab_size for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={list(self.stop_token_ids)}: must be in [0, {vocab_size}) (the model's "
                             "vocabulary)")


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt's generation. The engine fills the outputs; `done` is set when finish_reason is."""
    prompt: list[int]
    params: SamplingParams = SamplingParams()
    id: str = ""
    on_update: Callable[["Request"], None] | None = None
    # Outputs.
    tokens: list[int] = dataclasses.field(default_factory=list)  # the reply, without its stop token
    logprobs: list[float] = dataclasses.field(default_factory=list)  # with logprobs: per reply token
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[float | None] = dataclasses.field(default_factory=list)  # [0] is None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" (then see `error`)
    error: str | None = None
    generated: int = 0  # tokens sampled, the stop token included (usage.completion_tokens)
    # With logprobs, the stop token that ended the reply (not in `tokens` or the text): (id, log-prob, top pairs).
    stop_token: tuple[int, float, list[tuple[int, float]]] | None = None
    text: str = ""  # the reply's text (cut before a stop string); final once done
    # The space the reply's first token takes after the prompt ("▁vm" reads " vm"), which `text`, the reply decoded
    # alone, drops: a completion's text is lead + text (as OpenAI's and vLLM's), and stop strings are matched in it
    # (one that begins in the lead cuts it too; one right after it leaves the lead alone: " " for stop="vm").
    lead: str = ""
    submitted_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    done: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    cancelled: bool = False
    # Engine-private.
    _slot: int | None = None
    _prefilled: int = 0
    _last_token: int = 0
    _stop_scan: int = 0  # characters of the reply searched for stop strings (after `lead`)
    _stop_tokens: int = 0  # tokens of the reply already searched for stop strings
    _sent: int = 0  # characters new_text has returned
    _streamed: str = ""  # the text of tokens[:_read], settled (for streaming)
    _read: int = 0
    _joined: int = 0  # tokens before _read decoded again with the next ones, so their text joins as in one decode
    _checked: int = 0  # tokens new_text has looked at (each once)
    _settled: int = 0  # the reply's tokens up to its last one that cannot change (among those checked)

    def new_text(self, tokenizer) -> str:
        """The reply's text since the last call (for streaming). Text that may still change with the next
        tokens is held back until it is settled: an incomplete character, the bytes after the last token that is
        not a byte (see _unsettled_ids), and what may turn out to begin a stop string.

        Only the tokens since the previous call, and the few before them, are decoded (the whole reply each time
        made one long streamed reply's host work quadratic): the text of tokens[_joined:] less that of
        tokens[_joined:_read] is what tokens[_read:] add, the leading space a decode drops from its first piece
        included."""
        if self.finish_reason is not None:
            safe = self.text
        else:
            decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
            unsettled, size = _unsettled_ids(tokenizer)
            for i in range(self._checked, len(self.tokens)):  # each token asked once
                if self.tokens[i] not in unsettled and self.tokens[i] < size:
                    self._settled = i + 1
            self._checked, end = len(self.tokens), self._settled
            if end > self._read:
                head, new = decode(self.tokens[self._joined:self._read]), decode(self.tokens[self._joined:end])
                if not new.startswith(head):  # pieces that do not join so: the whole reply, decoded again
                    self._streamed, self._joined, self._read, head, new = "", 0, 0, "", decode(self.tokens[:end])
                added = new[len(head):]
                if not added.endswith("\ufffd"):  # else an incomplete character (byte-level BPE): wait for more
                    self._streamed += added
                    self._joined, self._read = self._read, end
            safe = self._streamed
            for stop in self.params.stop:
                seen = self.lead + safe  # (a stop string may begin in the lead)
                for n in range(min(len(stop) - 1, len(seen)), 0, -1):
                    if seen.endswith(stop[:n]):
                        safe = safe[:max(0, len(safe) - n)]
                        break
        delta = safe[self._sent:] if len(safe) > self._sent else ""
        self._sent = max(self._sent, len(safe))
        return delta


@functools.lru_cache(maxsize=8)
def _unsettled_ids(tokenizer) -> tuple[frozenset, int]:
    """(the ids after which a reply's text may still change with the next tokens, the tokenizer's size). They are
    the byte tokens (a character may be incomplete, and the ByteFallback decoder turns every byte of a run that is
    not valid UTF-8 into U+FFFD, valid ones before it included) and the special tokens; ids from the size up (a
    model with padded embeddings) are too. Both kinds are dropped before decoding, so the bytes around them join."""
    byte_ids = tokenizer.convert_tokens_to_ids([f"<0x{b:02X}>" for b in range(256)])  # unk where a vocab has none
    ids = {i for i in byte_ids if i is not None and i != tokenizer.unk_token_id}
    return frozenset(ids | set(getattr(tokenizer, "all_special_ids", ()))), len(tokenizer)


def _parameters_mesh(state):
    """The mesh a model's parameters are laid out over (zephyr_jax.load(..., mesh=...), or one device other than
    the default), or None (the default device): the cache is placed beside them (on device 0 beside weights
    elsewhere, every call failed)."""
    for leaf in jax.tree.leaves(state):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
        if isinstance(sharding, jax.sharding.SingleDeviceSharding) and getattr(leaf, "committed", False):
            (device,) = sharding.device_set
            if device != jax.local_devices()[0]:  # (KVCache.init's default)
                return make_mesh((1, 1, 1), [device])
    return None


class _GraphDefHashedOnce(nnx.graphlib.GraphDef):
    """A GraphDef whose hash is computed once. jit hashes its static arguments on every call, and a GraphDef's
    hash walks every node: 1.3 ms a call for 32 layers of their own weights (per_layer_weights), on the decoding
    loop's critical path (2.3 -> 0.9 ms a decode call's dispatch, XLA:CPU)."""
    __slots__ = ("_hash",)

    def __hash__(self) -> int:
        return self._hash


def _hashed_once(graphdef):
    if not dataclasses.is_dataclass(graphdef):  # (another flax's GraphDef: hashed as it is)
        return graphdef
    hashed = _GraphDefHashedOnce(**{f.name: getattr(graphdef, f.name) for f in dataclasses.fields(graphdef)})
    object.__setattr__(hashed, "_hash", hash(graphdef))  # (a frozen dataclass)
    return hashed


def per_layer_weights_on(platform: str) -> bool:
    """Whether the engine keeps each layer's weights in buffers of their own on a platform ("cpu", "tpu", "gpu"):
    on GPUs, where a layer's slice of the stacked weights is a copy (a token read its weights three times); TPUs
    read the stacked weights in place, and CPUs are the tests' platform."""
    return platform == "gpu"


def _own_layer_buffers(model, asked: bool | None, platform: str):
    """The model with each layer's weights in buffers of their own (mistral.per_layer_weights), which the decoding
    matmuls read in place, or None (keep the stacked weights). asked None: per_layer_weights_on(platform). The
    engine then holds its own copy of the layer weights beside the caller's model; where that does not fit on a
    GPU and nobody asked, the stacked weights stay, with a warning."""
    if not (per_layer_weights_on(platform) if asked is None else asked):
        return None
    try:
        return mistral.per_layer_weights(model)
    except jax.errors.JaxRuntimeError as e:
        if asked or "RESOURCE_EXHAUSTED" not in str(e):
            raise
        warnings.warn(f"Engine: no room for a per-layer copy of the layer weights ({str(e).splitlines()[0][:200]}), "
                      "so decoding reads the stacked weights, at about a third of the bandwidth bound (XLA:GPU "
                      "copies each layer's slice first); per_layer_weights=False says so without trying",
                      stacklevel=3)
        return None


def _top_pairs(logprobs, ids, k: int) -> list[tuple[int, float]]:
    """The first k of lax.top_k's (values, indices) as (token id, log-prob) pairs."""
    return list(zip(ids[:k].tolist(), logprobs[:k].tolist()))


def reply_lead(tokenizer, prompt: list[int], first: int) -> str:
    """What a reply's first token adds after the prompt before its own text decoded alone: the space of a piece
    that begins a word ("▁vm" reads " vm"), or a space byte's (which the decoder strips as a reply's first
    character), read after the prompt's last tokens (Request.lead)."""
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    context = prompt[-8:]
    before, after, alone = decode(context), decode([*context, first]), decode([first])
    added = after[len(before):] if after.startswith(before) else alone
    return added[:len(added) - len(alone)] if added.endswith(alone) else ""


def _first_stop(text: str, stops, start: int = 0) -> int | None:
    """Where the first of the stop strings begins in text (searching from `start`), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def _top_n(asked) -> int:
    """A call's top_n from its requests' logprobs (or prompt_logprobs) settings: the most alternatives anyone
    may ask for, 0 for the log-probs alone, -1 when nobody asked for log-probs (none are computed)."""
    if any(asked):
        return TOP_LOGPROBS
    return 0 if any(a is not None for a in asked) else -1


def _bucket(n: int, minimum: int, maximum: int) -> int:
    """The power of two >= n, within [minimum, maximum]."""
    return min(max(minimum, 1 << (max(n, 1) - 1).bit_length()), maximum)


def _fine_bucket(n: int, minimum: int, maximum: int) -> int:
    """The smallest of 2^k and 3 * 2^(k-1) that holds n, within [minimum, maximum]: at most a third is padding,
    for twice the shapes of powers of two."""
    power = _bucket(n, 1, 1 << 62)
    return min(max(minimum, 3 * power // 4 if power >= 4 and 3 * power // 4 >= n else power), maximum)


@functools.partial(jax.jit, static_argnames=("graphdef", "kv_length", "top_n", "prompt_top_n"),
                   donate_argnames=("cache",))
def _prefill(graphdef, state, cache, tokens, positions, rows, last, targets, sampling, *, kv_length, top_n,
             prompt_top_n):
    """One chunk of P prompts [P, T] at positions [P, T] into cache rows [P]: the first reply token sampled
    after each row's position `last` [P], and (prompt_top_n >= 0) the log-probs of `targets` [P, T] (the next
    prompt tokens) with the top prompt_top_n alternatives."""
    model = nnx.merge(graphdef, state)
    hidden, cache = model.with_cache(tokens, positions, cache, rows, kv_length)
    scores = {}
    if prompt_top_n >= 0:
        logps = jax.nn.log_softmax(model.logits(hidden), axis=-1)
        scores["logprobs"] = jnp.take_along_axis(logps, targets[..., None], axis=-1)[..., 0]
        if prompt_top_n:
            scores["top"] = jax.lax.top_k(logps, min(prompt_top_n, logps.shape[-1]))  # (a vocabulary below 20)
    final = jnp.take_along_axis(hidden, last[:, None, None], axis=1)
    logits = model.logits(final)[:, 0]
    token, logprob, top = sample(logits, *sampling, top_n=top_n)
    return cache, (token, logprob, top), scores


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "kv_length", "top_n"), donate_argnames=("cache",))
def _decode(graphdef, state, cache, rows, tokens, lengths, active, remaining, stop_ids, sampling, *, steps,
            kv_length, top_n):
    """Up to `steps` tokens for the decoding slots `rows` [R] (padding rows: past the last slot): feed each
    row's last token [R] at its position lengths [R], sample the next. A row stops (inside the scan) at a stop
    id [R, M] or when `remaining` [R] reaches 0. Returns the cache and per step: tokens [steps, R], their
    log-probs, top-n, and which rows emitted."""
    model = nnx.merge(graphdef, state)
    temperature, top_k, top_p, seeds, counters = sampling

    def one(carry, _):
        cache, tokens, lengths, active, remaining, counters = carry
        # Rows that have stopped write past the cache's end, which drops the write.
        positions = jnp.where(active, lengths, cache.max_length)[:, None]
        hidden, cache = model.with_cache(tokens[:, None], positions, cache, rows, kv_length)
        new, logprob, top = sample(model.logits(hidden)[:, 0], temperature, top_k, top_p, seeds, counters,
                                   top_n=top_n)
        emitted = active
        remaining = remaining - emitted
        stopped = jnp.any(new[:, None] == stop_ids, axis=1)
        active = active & ~stopped & (remaining > 0)
        carry = (cache, jnp.where(emitted, new, tokens), lengths + emitted, active, remaining,
                 counters + emitted)
        return carry, (new, logprob, top, emitted)

    carry = (cache, tokens, lengths, active, remaining, counters)
    carry, out = jax.lax.scan(one, carry, None, length=steps)
    return carry[0], out


def default_max_length(cfg) -> int:
    """Positions a sequence may take when none are asked for: the model's max_position_embeddings, at most 4096
    (Mistral v0.1's sliding window; its 32,768 would size every KV cache and scoring bucket eight times over)."""
    return min(int(cfg.max_position_embeddings), 4096)


# Each size's least value (max_length None and max_queue None: the model's default, no bound). decode_steps=0
# would decode nothing, for ever; a negative max_queue turned away requests that free slots could take.
SIZE_BOUNDS = {"max_slots": 1, "max_length": 2, "max_queue": 0, "prefill_chunk": 1, "decode_steps": 1}


class Engine:
    """Continuous batching over `max_slots` KV-cache rows of `max_length` tokens (prompt + reply)."""

    def __init__(self, model, tokenizer=None, *, max_slots: int = 16, max_length: int | None = None,
                 prefill_chunk: int = 512, decode_steps: int = 8, max_queue: int | None = None,
                 eos_id: int | None = None, mesh=None, heads_first_cache: bool | None = None,
                 per_layer_weights: bool | None = None):
        cfg = model.config
        sizes = dict(max_slots=max_slots, max_length=max_length, max_queue=max_queue, prefill_chunk=prefill_chunk,
                     decode_steps=decode_steps)
        for name, least in SIZE_BOUNDS.items():
            if sizes[name] is not None and sizes[name] < least:
                raise ValueError(f"Engine {name}={sizes[name]}: must be at least {least}")
        self.config, self.tokenizer = cfg, tokenizer
        self.graphdef, self.state = nnx.split(model)
        mesh = mesh if mesh is not None else _parameters_mesh(self.state)
        held = {d for x in jax.tree.leaves(self.state) for d in getattr(getattr(x, "sharding", None), "device_set", ())}
        if mesh is not None and held and held != set(mesh.devices.flat):  # every call would fail
            raise ValueError(f"Engine mesh= is over devices {sorted(d.id for d in mesh.devices.flat)}, the model's "
                             f"parameters on {sorted(d.id for d in held)}: load the model with that mesh "
                             "(zephyr_jax.load(..., mesh=mesh)), or leave mesh= out to follow the parameters")
        self.max_slots, self.decode_steps = int(max_slots), int(decode_steps)
        self.prefill_chunk = int(prefill_chunk)
        # A chunk's bucket may run past the cache's end: those padding positions' writes are dropped.
        self.max_length = int(max_length or default_max_length(cfg))
        if self.max_length > cfg.max_position_embeddings:  # allowed (as in transformers), but said
            warnings.warn(f"Engine max_length={self.max_length} is above the model's max_position_embeddings="
                          f"{cfg.max_position_embeddings}: positions past it were never trained", stacklevel=2)
        self.max_queue = max_queue
        eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
        self.eos_id = None if eos is None else int(eos)
        # heads_first_cache: the cache's storage order (model/kv_cache.py); None: the platform's.
        platform = jax.devices()[0].platform if mesh is None else mesh.devices.flat[0].platform
        heads_first = kv_cache.heads_first_on(platform) if heads_first_cache is None else heads_first_cache
        self._new_cache = functools.partial(KVCache.init, cfg, self.max_slots, self.max_length,
                                            heads_first=heads_first, sharding=self._cache_sharding(mesh, heads_first))
        self.cache = self._new_cache()
        own = _own_layer_buffers(model, per_layer_weights, platform)  # after the cache: it yields to the cache
        if own is not None:
            self.graphdef, self.state = nnx.split(own)
        self.graphdef = _hashed_once(self.graphdef)
        self.slots: list[Request | None] = [None] * self.max_slots
        self.waiting: collections.deque[Request] = collections.deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stopped_by: str | None = None  # why the loop's thread ended, when it was not stop(): it runs nothing more
        self._ids = itertools.count()
        self.stats = collections.Counter()  # calls and tokens, for benchmarks and logs

    def _cache_sharding(self, mesh, heads_first: bool):
        """Under a mesh: the cache's KV heads split as the rules split the k/v projections' heads ("kv_heads":
        the tensor axis by default), its slots as they split a batch ("batch": data x fsdp), each where it divides,
        so each chip holds and attends over its own requests' part. (Replicated over an FSDP mesh, every chip held
        the whole cache: 32 GiB for 64 slots x 4,096 tokens of a 7B on v5e-8, twice a chip's memory, and computed
        every row's attention.)"""
        if mesh is None:
            return None
        axes = kv_cache.axes(heads_first)
        logical = [{"slots": "batch", "kv_heads": "kv_heads"}.get(axis) for axis in axes]
        sizes = {"slots": self.max_slots, "kv_heads": self.config.num_key_value_heads}
        spec = []
        for axis, named in zip(axes, logical_to_spec(logical, self.config.sharding_rules)):
            split = tuple(a for a in ((named,) if isinstance(named, str) else named or ()) if mesh.shape.get(a, 1) > 1)
            if not split or sizes[axis] % math.prod(mesh.shape[a] for a in split):
                split = ()  # unsplit: nothing to split it over, or it does not divide
            spec.append(split[0] if len(split) == 1 else split or None)
        while spec and spec[-1] is None:  # as the calls hand the cache back: one cache entry a shape, not two
            spec.pop()
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))

    # --- requests ---------------------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """ValueError for a request that cannot run here (too long, bad sampling values, ids outside the
        vocabulary): raised to its submitter, never on the engine's thread, where it would fail every request."""
        params = request.params
        params.check(self.config.vocab_size)
        if isinstance(request.prompt, str):
            raise TypeError("Request.prompt is token ids: encode the text first (generate() takes text)")
        if request.finish_reason is not None or request.submitted_at:  # its slot would never be freed: a hang
            raise ValueError(f"request {request.id} was already submitted: make a new Request to generate again")
        prompt = np.asarray(request.prompt)
        if prompt.size and (prompt.ndim != 1 or not np.issubdtype(prompt.dtype, np.integer)):
            raise ValueError(f"Request.prompt must be a list of token ids (whole numbers), got {prompt.dtype} "
                             f"of shape {prompt.shape}")
        if not isinstance(request.prompt, list):  # a list is kept as it is: the server's n choices share one
            request.prompt = prompt.tolist()
        if not request.prompt:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.config.vocab_size
        if prompt.min() < 0 or prompt.max() >= vocab:  # on the array already made, not a second pass in Python
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        total = len(request.prompt) + params.max_tokens
        if total > self.max_length:
            raise ValueError(f"the prompt has {len(request.prompt)} tokens and max_tokens is {params.max_tokens}: "
                             f"{total} tokens exceed the context of {self.max_length}")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need an engine with a tokenizer")

    def submit(self, request: Request) -> Request:
        """Queues a request (any thread). ValueError for a request that cannot run (`check`), QueueFull when
        `max_queue` requests already wait, RuntimeError when nothing would run it (the engine stopped)."""
        self.check(request)
        return self._queue(request, by_generate=False)

    def _queue(self, request: Request, by_generate: bool) -> Request:
        """Queues a checked request (generate() checks all of them before it queues any)."""
        with self._wake:
            if self.stopped_by is not None:  # nothing would ever run it
                raise RuntimeError(f"the engine's thread stopped ({self.stopped_by}): make a new Engine")
            if self._stopping and not by_generate:
                raise RuntimeError("the engine is stopped: nothing would run this request; start() it again, or "
                                   "call generate()")
            free = sum(s is None for s in self.slots)  # about to be taken: waiting there does not count
            if self.max_queue is not None and len(self.waiting) >= self.max_queue + free:
                raise QueueFull(f"{len(self.waiting) - free} requests are already waiting for a slot "
                                f"(max_queue={self.max_queue})")
            # submitted only now: one refused for a full queue may be submitted again (generate() does)
            request.id = request.id or f"req-{next(self._ids)}"
            request.submitted_at = time.perf_counter()
            self.waiting.append(request)
            self._wake.notify()
        return request

    def cancel(self, request: Request) -> None:
        """Stops a request (any thread); its slot is freed at the engine's next step."""
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def generate(self, requests: list[Request], progress: bool = False) -> list[Request]:
        """Runs the requests to completion on this thread (the engine must not be `start`ed)."""
        if self.stopped_by is not None:  # (its thread died: submit() is refused too, and no cache is left)
            raise RuntimeError(f"the engine's thread stopped ({self.stopped_by}): make a new Engine")
        if self._thread is not None:
            raise RuntimeError("this engine runs on its own thread: submit() and wait on request.done instead")
        from tqdm.auto import tqdm

        if len({id(r) for r in requests}) != len(requests):  # one object in two slots: the second never freed
            raise ValueError("the same Request appears twice in requests: make one Request per generation")
        for r in requests:  # all or none: a bad request found midway would leave the others queued
            self.check(r)
        pending = collections.deque(requests)
        bar = tqdm(total=len(requests), desc="generate", disable=not progress, mininterval=2)
        finished = self.stats["finished"]
        while pending or self.busy():
            while pending and len(self.waiting) < self.max_slots:  # feed the queue, never beyond its bound
                try:
                    self._queue(pending[0], by_generate=True)
                except QueueFull:
                    break
                pending.popleft()
            self.step()
            bar.update(self.stats["finished"] - finished)
            finished = self.stats["finished"]
        bar.close()
        return requests

    def warmup(self, progress: bool = False) -> int:
        """Compiles, for requests without log-probs, the decoding call for every bucket of rows and attention
        length it can meet, and the prefill of one prompt at a time for every chunk of every prompt length, so
        serving never stalls on those compiles when the number of decoding requests or their lengths reach a new
        bucket; returns how many programs were compiled. Prompts that arrive together are prefilled in groups
        (2, 4, ... rows), and those shapes, like log-probs, still compile when first met. Call it before `start`;
        the cache is left as it was (every row is idle or a padding row, so every write is dropped)."""
        from tqdm.auto import tqdm

        shapes = sorted({self._decode_rows(k) for k in range(1, self.max_slots + 1)})
        kv_lengths = sorted({_fine_bucket(k, 128, self.max_length) for k in range(1, self.max_length + 1)})
        # every chunk of every prompt length, max_length's too (a prompt only scored, max_tokens=0)
        chunks = {(start, self._chunk_length(n - start)) for n in range(1, self.max_length + 1)
                  for start in range(0, n, self.prefill_chunk)}
        prefills = sorted({(length, self._prefill_kv_length(start + length)) for start, length in chunks})
        calls = [("decode", shape, kv) for shape, kv in itertools.product(shapes, kv_lengths)]
        calls += [("prefill", length, kv) for length, kv in prefills]
        before = self.compiled_programs()
        for kind, shape, kv_length in tqdm(calls, desc="warm-up", disable=not progress):
            if kind == "decode":
                n, everyone = shape
                self.cache, _ = _decode(self.graphdef, self.state, self.cache,
                                        *self._decode_inputs([], [], n, everyone), steps=self.decode_steps,
                                        kv_length=kv_length, top_n=-1)
            else:  # one padding row (slot max_slots: its writes are dropped)
                ids = np.zeros((1, shape), np.int32)
                self.cache, _, _ = _prefill(
                    self.graphdef, self.state, self.cache, ids, ids, np.full((1,), self.max_slots, np.int32),
                    np.zeros((1,), np.int32), ids, self._sampling([], 1, np.zeros((1,), np.uint32)),
                    kv_length=kv_length, top_n=-1, prompt_top_n=-1)
        jax.block_until_ready(self.cache)
        return self.compiled_programs() - before

    @staticmethod
    def compiled_programs() -> int:
        """Prefill and decode programs compiled so far in this process (one per bucket met)."""
        return _prefill._cache_size() + _decode._cache_size()

    def busy(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    # --- the loop on a thread (the server) ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():  # two loops would step the same slots at once
            raise RuntimeError("the engine's thread is already running: stop() it first")
        self._stopping = False  # (left set by stop(): the new thread's loop ended at once, and requests waited)
        self._thread = threading.Thread(target=self._loop, name="zephyr-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Ends the loop's thread after its current step (requests still queued stay queued for the next start()
        or generate())."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self.busy():
                        self._wake.wait()
                    if self._stopping:
                        return
                try:
                    self.step()
                except Exception as e:  # noqa: BLE001 -- a failed call must not strand the requests waiting on it
                    self._fail_all(f"{type(e).__name__}: {e}", waiting=False)  # (those queued were in no call)
                    if any(x.is_deleted() for x in jax.tree.leaves(self.cache)):  # donated to the failed call
                        self.cache = self._new_cache()
        except BaseException as e:  # no cache could be made again: nothing runs any more, so nobody may wait
            with self._wake:
                self.stopped_by = f"{type(e).__name__}: {e}"
            self._fail_all(self.stopped_by, waiting=True)
            raise

    def _fail_all(self, error: str, waiting: bool) -> None:
        """Ends every admitted request (a failed call may have consumed the cache that held them all), and with
        `waiting` the queued ones too, with finish_reason "error" (the server answers 500)."""
        with self._wake:
            victims = [r for r in self.slots if r is not None] + (list(self.waiting) if waiting else [])
            if waiting:
                self.waiting.clear()
        for r in victims:
            r.error = error
            self._finish(r, "error")

    # --- one scheduling step ------------------------------------------------------------------------------

    def step(self) -> None:
        self._free_cancelled()
        self._admit()
        self._prefill()
        self._decode()

    def _free_cancelled(self) -> None:
        with self._wake:
            for request in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(request)
                self._finish(request, "cancelled")
        for request in self.slots:
            if request is not None and request.cancelled:
                self._finish(request, "cancelled")

    def _admit(self) -> None:
        with self._wake:
            for slot in range(self.max_slots):
                if self.slots[slot] is None and self.waiting:
                    request = self.waiting.popleft()
                    request._slot, request._prefilled = slot, 0
                    self.slots[slot] = request

    def _chunk_length(self, left: int) -> int:
        """The bucketed length of a prompt's next chunk when `left` of its tokens are not in the cache yet."""
        return _fine_bucket(min(self.prefill_chunk, left), 16, self.prefill_chunk)

    def _prefill_kv_length(self, end: int) -> int:
        """The bucketed number of cache positions a prefill call attends over when its chunks end at `end`."""
        return _bucket(end, 128, self.max_length)

    def _prefill(self) -> None:
        """Every admitted request's next prompt chunk, one call per chunk-length bucket."""
        chunks = collections.defaultdict(list)
        for request in self.slots:
            if request is not None and request._prefilled < len(request.prompt):
                chunks[self._chunk_length(len(request.prompt) - request._prefilled)].append(request)
        for length, requests in sorted(chunks.items()):
            while requests:  # power-of-two groups (5 = 4 + 1), so no call computes padding rows
                count = 1 << (len(requests).bit_length() - 1)
                self._prefill_call(length, requests[:count])
                requests = requests[count:]

    def _prefill_call(self, length: int, requests: list[Request]) -> None:
        rows = _bucket(len(requests), 1, self.max_slots)
        tokens = np.zeros((rows, length), np.int32)
        targets = np.zeros((rows, length), np.int32)
        positions = np.zeros((rows, length), np.int32)
        slots = np.full((rows,), self.max_slots, np.int32)  # padding rows: past the last slot, dropped
        last = np.zeros((rows,), np.int32)
        for row, r in enumerate(requests):
            start = r._prefilled
            chunk = r.prompt[start:start + length]
            tokens[row, :len(chunk)] = chunk
            following = r.prompt[start + 1:start + 1 + length]
            targets[row, :len(following)] = following
            positions[row] = start + np.arange(length)
            slots[row], last[row] = r._slot, len(chunk) - 1
        prompt_top_n = _top_n([r.params.prompt_logprobs for r in requests])
        top_n = _top_n([r.params.logprobs for r in requests])
        kv_length = self._prefill_kv_length(max(r._prefilled for r in requests) + length)
        sampling = self._sampling(requests, rows, counters=np.zeros((rows,), np.uint32))
        self.cache, first, scores = _prefill(
            self.graphdef, self.state, self.cache, tokens, positions, slots, last, targets, sampling,
            kv_length=kv_length, top_n=top_n, prompt_top_n=prompt_top_n)
        first, scores = jax.device_get((first, scores))  # one round trip
        self.stats["prefill_calls"] += 1
        self.stats["prefill_positions"] += rows * length  # computed, padding included
        self.stats["prefill_tokens"] += sum(min(length, len(r.prompt) - r._prefilled) for r in requests)
        for row, r in enumerate(requests):
            n = min(length, len(r.prompt) - r._prefilled)
            if r.params.prompt_logprobs is not None:
                self._record_prompt_scores(r, row, n, scores)
            r._prefilled += n
            if r._prefilled == len(r.prompt):  # the prompt is in: its first reply token was sampled
                if r.params.max_tokens == 0:
                    self._finish(r, "length")
                else:
                    self._accept(r, [int(first[0][row])], None if first[1] is None else [float(first[1][row])],
                                 None if first[2] is None else (first[2][0][row][None], first[2][1][row][None]))
                    self._settle(r, 1)

    def _record_prompt_scores(self, r: Request, row: int, n: int, scores) -> None:
        if r._prefilled == 0:
            r.prompt_logprobs.append(None)
            r.prompt_top_logprobs.append(None)
        count = min(n, len(r.prompt) - 1 - r._prefilled)  # the last prompt position predicts the reply
        r.prompt_logprobs.extend(float(x) for x in scores["logprobs"][row, :count])
        for i in range(count):
            if "top" in scores and r.params.prompt_logprobs:
                k = r.params.prompt_logprobs
                r.prompt_top_logprobs.append(_top_pairs(scores["top"][0][row, i], scores["top"][1][row, i], k))
            else:
                r.prompt_top_logprobs.append([])

    def _decode(self) -> None:
        decoding = [r for r in self.slots if r is not None and r.finish_reason is None
                    and r._prefilled == len(r.prompt)]
        if not decoding:
            return
        n, everyone = self._decode_rows(len(decoding))
        places = [r._slot for r in decoding] if everyone else range(len(decoding))  # each request's row
        inputs = self._decode_inputs(decoding, places, n, everyone)
        lengths = inputs[2]  # each row's next position
        kv_length = _fine_bucket(int(lengths.max()) + self.decode_steps, 128, self.max_length)
        top_n = _top_n([r.params.logprobs for r in decoding])
        self.cache, out = _decode(self.graphdef, self.state, self.cache, *inputs, steps=self.decode_steps,
                                  kv_length=kv_length, top_n=top_n)
        new, logprob, top, emitted = jax.device_get(out)
        self.stats["decode_calls"] += 1
        self.stats["decode_positions"] += n * self.decode_steps  # computed, idle rows included
        # Per row, as lists: a row emits for its first steps only (it stops inside the call, for good).
        counts, new = emitted.sum(axis=0).tolist(), new.T.tolist()
        logprob = None if logprob is None else logprob.T.tolist()
        for r, i in zip(decoding, places):
            before, count = len(r.tokens), counts[i]
            if count and r.finish_reason is None:
                self._accept(r, new[i][:count], None if logprob is None else logprob[i][:count],
                             None if top is None else (top[0][:count, i], top[1][:count, i]))
            self._settle(r, len(r.tokens) - before)

    def _decode_inputs(self, decoding, places, n: int, everyone: bool) -> tuple:
        """_decode's per-row arguments (rows ... sampling) for n rows, request decoding[j] at row places[j] and
        every other row idle (its writes dropped). Every row a slot (everyone): rows is None, in slot order."""
        rows = np.full((n,), self.max_slots, np.int32)
        tokens, lengths = np.zeros((n,), np.int32), np.zeros((n,), np.int32)
        active, remaining = np.zeros((n,), bool), np.zeros((n,), np.int32)
        stop_ids = np.full((n, MAX_STOP_TOKENS), -1, np.int32)
        counters = np.zeros((n,), np.uint32)
        for r, i in zip(decoding, places):
            rows[i], tokens[i] = r._slot, r._last_token
            lengths[i] = len(r.prompt) + r.generated - 1  # the last token is not in the cache yet
            active[i], remaining[i], counters[i] = True, r.params.max_tokens - r.generated, r.generated
            ids = self._stop_ids(r)
            stop_ids[i, :len(ids)] = ids
        sampling = self._sampling(self.slots if everyone else decoding, n, counters)
        return None if everyone else rows, tokens, lengths, active, remaining, stop_ids, sampling

    def _decode_rows(self, decoding: int) -> tuple[int, bool]:
        """(rows computed, whether they are all the slots) for `decoding` decoding requests. Few: only they are
        computed (a bucketed number of rows, their caches gathered). Most slots: all rows are, in slot order,
        which reads the cache in place instead of gathering it."""
        n = _fine_bucket(decoding, 1, self.max_slots)
        return (self.max_slots, True) if 2 * n > self.max_slots else (n, False)

    def _sampling(self, requests, rows: int, counters):
        temperature, top_p = np.zeros((rows,), np.float32), np.ones((rows,), np.float32)
        top_k, seeds = np.zeros((rows,), np.int32), np.zeros((rows,), np.uint32)
        for row, r in enumerate(requests):
            if r is not None:
                p = r.params
                temperature[row], top_k[row], top_p[row], seeds[row] = p.temperature, p.top_k, p.top_p, p.seed
        return temperature, top_k, top_p, seeds, counters

    def _stop_ids(self, r: Request) -> list[int]:
        ids = list(r.params.stop_token_ids)
        if self.eos_id is not None and not r.params.ignore_eos:
            ids.append(self.eos_id)
        return ids

    # --- outputs ------------------------------------------------------------------------------------------

    def _accept(self, r: Request, ids: list[int], logprobs: list[float] | None, top) -> None:
        """A call's sampled tokens for one request (top: its alternatives' values and ids, a row a token): record
        them up to the first stop token or the max_tokens-th, where the call stopped the row, and finish the request
        there. A call at a time, not a token at a time (0.6-1.0 ms of host work between two decoding calls of 64
        rows of 8 tokens, the device idle; now 0.3 ms)."""
        stops = self._stop_ids(r)
        end = min(len(ids), r.params.max_tokens - r.generated)
        end = next((j + 1 for j, token in enumerate(ids[:end]) if token in stops), end)
        stop = ids[end - 1] in stops
        kept = end - 1 if stop else end
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
            if kept and self.tokenizer is not None:
                r.lead = reply_lead(self.tokenizer, r.prompt, ids[0])
        r.generated += end
        r._last_token = ids[end - 1]
        self.stats["tokens"] += end
        r.tokens.extend(ids[:kept])
        if r.params.logprobs is not None:
            tops = [[] if top is None else _top_pairs(top[0][j], top[1][j], r.params.logprobs) for j in range(end)]
            r.logprobs.extend(logprobs[:kept])
            r.top_logprobs.extend(tops[:kept])
            if stop:  # completions' log-probs list it (lm-eval scores a continuation with the next token)
                r.stop_token = (ids[end - 1], logprobs[end - 1], tops[-1])
        if stop:
            self._finish(r, "stop")
        elif r.generated >= r.params.max_tokens:
            self._finish(r, "length")

    def _settle(self, r: Request, new: int) -> None:
        """After a call gave a running request `new` tokens: stop strings, then one update (not one per token,
        which would cost the server an event per token)."""
        if r.finish_reason is not None or not new:
            return
        if r.params.stop and self._stop_string(r, new):
            return
        self._notify(r)

    def _notify(self, r: Request) -> None:
        """r.on_update(r). One that raises (its event loop closed: the caller is gone) cancels its request; it must
        not end the loop's thread, which every other request waits on."""
        if r.on_update is None:
            return
        try:
            r.on_update(r)
        except Exception as e:  # noqa: BLE001
            if not r.cancelled:  # (said once; a request its caller cancelled is not news)
                then = "; the request is cancelled" if r.finish_reason is None else ""
                warnings.warn(f"{r.id}'s on_update raised {type(e).__name__}: {e}{then}", RuntimeWarning,
                              stacklevel=2)
            r.cancelled = True

    def _stop_string(self, r: Request, new: int) -> bool:
        """Whether the reply now holds a stop string. If so, the request ends with its text cut before it, and
        the tokens sampled after the one that completed it (later in the same call) are dropped.

        A stop string that was not there before ends in the `new` tokens, so only the reply's tail is decoded
        and searched first (decoding the whole reply after every call made a long reply's host work quadratic);
        the whole reply is decoded only when the tail holds one, and decides."""
        longest = max(len(s) for s in r.params.stop)
        # The tail: the new tokens and enough text tokens before them for a stop string (a character may take 4
        # byte tokens), and 2 more (the first token of a decoded piece loses its leading space); special tokens
        # (an `</s>` kept under ignore_eos) decode to nothing, so they do not count.
        tail, need = len(r.tokens) - new, 4 * longest + 2
        while tail > 0 and need > 0:
            tail -= 1
            need -= r.tokens[tail] not in self._special_ids
        if tail > 0:
            r._stop_tokens = len(r.tokens)
            if _first_stop(self._decode_text(r.tokens[tail:]), r.params.stop) is None:
                return False
        text = r.lead + self._decode_text(r.tokens)
        # Searched from where a new stop string can begin: the last call's text less `longest`, and 2 more where
        # that text ended in a character cut short (its 1-3 bytes decoded to as many U+FFFD, then to one).
        cut = _first_stop(text, r.params.stop, max(0, r._stop_scan - longest - 2))
        r._stop_scan, r._stop_tokens = len(text), len(r.tokens)
        if cut is None:
            return False
        self._drop_after_stop(r, new)
        r.lead, kept = text[:min(cut, len(r.lead))], text[len(r.lead):max(cut, len(r.lead))]  # (lead cut too)
        self._finish(r, "stop", kept)
        return True

    def _decode_text(self, tokens) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    @functools.cached_property
    def _special_ids(self) -> frozenset:
        return frozenset(getattr(self.tokenizer, "all_special_ids", ()))

    def _drop_after_stop(self, r: Request, new: int) -> None:
        """Drops the tokens after the one (among the last `new`) that completed a stop string, as if the reply
        had stopped there: its log-probs and usage count then do not depend on where a decoding call ended."""
        completes = lambda k: any(stop in r.lead + self._decode_text(r.tokens[:k])  # noqa: E731
                                  for stop in r.params.stop)
        keep = next((k for k in range(len(r.tokens) - new + 1, len(r.tokens) + 1) if completes(k)), len(r.tokens))
        r.generated -= len(r.tokens) - keep
        del r.tokens[keep:], r.logprobs[keep:], r.top_logprobs[keep:]

    def _finish(self, r: Request, reason: str, text: str | None = None) -> None:
        """Ends a request; `text`: its final text when the caller already cut it at a stop string."""
        if r.finish_reason is not None:
            return
        if text is not None:
            r.text = text
        elif self.tokenizer is not None:
            r.text = self._decode_text(r.tokens)
            cut = _first_stop(r.lead + r.text, r.params.stop)  # completed in the call that also ended the reply
            if cut is not None:
                self._drop_after_stop(r, len(r.tokens) - r._stop_tokens)
                r.generated = len(r.tokens)  # an EOS sampled after the stop string is not the reply's either,
                r.stop_token = None  # nor its log-prob (completions listed it after the stop string's tokens)
                r.lead, r.text, reason = r.lead[:cut], r.text[:max(0, cut - len(r.lead))], "stop"
        r.finish_reason, r.finished_at = reason, time.perf_counter()
        if r._slot is not None and self.slots[r._slot] is r:
            self.slots[r._slot] = None
        self.stats["finished"] += 1
        r.done.set()
        self._notify(r)
