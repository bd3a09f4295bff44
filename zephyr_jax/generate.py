"""Batched sampling with the KV cache: prefill the left-padded prompts, then one token per step inside a
jax.lax.while_loop (no Python loop over tokens), stopping each row at `</s>` and the batch when all rows have.

`generate_ids` works on arrays and is what the parity tests compare with transformers' `generate`;
`generate` takes strings or chat messages and a tokenizer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zephyr_jax.model import KVCache


def sample_next(logits, key, *, temperature: float, top_k: int, top_p: float):
    """Next token ids [B] from logits [B, V]: greedy when temperature == 0, else top-k / top-p sampling."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k", "top_p",
                                             "eos_id", "pad_id"))
def _generate(graphdef, state, input_ids, attention_mask, key, *, max_new_tokens, temperature, top_k, top_p,
              eos_id, pad_id):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    cache = KVCache.init(model.config, batch, prompt_len + max_new_tokens)
    logits, cache = model.with_cache(input_ids, cache, attention_mask)
    out = jnp.full((batch, max_new_tokens), pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def keep_going(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def step_fn(carry):
        step, logits, cache, done, out, key = carry
        key, sub = jax.random.split(key)
        token = sample_next(logits, sub, temperature=temperature, top_k=top_k, top_p=top_p)
        token = jnp.where(done, pad_id, token)  # finished rows emit padding, as transformers does
        out = out.at[:, step].set(token)
        done = done | (token == eos_id)
        logits, cache = model.with_cache(token[:, None], cache)
        return step + 1, logits, cache, done, out, key

    carry = (jnp.zeros((), jnp.int32), logits, cache, done, out, key)
    return jax.lax.while_loop(keep_going, step_fn, carry)[4]


def generate_ids(model, input_ids, attention_mask=None, *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, eos_id: int | None = None,
                 pad_id: int | None = None) -> np.ndarray:
    """New token ids [B, max_new_tokens] after left-padded prompts `input_ids` [B, T] (mask: 1 = real token).

    Rows that emitted `eos_id` are filled with `pad_id` (default: eos_id). eos_id=None: never stop early.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if bool(jnp.any(mask[:, -1] == 0)):
        raise ValueError("prompts must be left-padded: every row's last token must be real")
    eos = -1 if eos_id is None else int(eos_id)
    pad = eos if pad_id is None else int(pad_id)
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, input_ids, mask, jax.random.key(seed), max_new_tokens=max_new_tokens,
                    temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), eos_id=eos,
                    pad_id=max(pad, 0))
    return np.asarray(out)


@functools.partial(jax.jit, static_argnames=("graphdef", "cache_length"))
def _prefill(graphdef, state, input_ids, attention_mask, *, cache_length):
    model = nnx.merge(graphdef, state)
    cache = KVCache.init(model.config, input_ids.shape[0], cache_length)
    return model.with_cache(input_ids, cache, attention_mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p"), donate_argnums=(3,))
def _decode_step(graphdef, state, logits, cache, key, *, temperature, top_k, top_p):
    token = sample_next(logits, key, temperature=temperature, top_k=top_k, top_p=top_p)
    logits, cache = nnx.merge(graphdef, state).with_cache(token[:, None], cache)
    return token, logits, cache


def stream_ids(model, input_ids, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, eos_id: int | None = None):
    """Yields new token ids one at a time for ONE prompt (a list of ids), for live display in the chat.

    Each step is one jitted call on fixed shapes (the prompt is left-padded to a bucket), so a conversation
    compiles a few times, not once per token; the Python loop exists only to hand each token to the screen.
    """
    length = bucket_length(len(input_ids))
    ids = np.zeros((1, length), np.int32)
    mask = np.zeros_like(ids)
    ids[0, length - len(input_ids):], mask[0, length - len(input_ids):] = input_ids, 1
    graphdef, state = nnx.split(model)
    logits, cache = _prefill(graphdef, state, jnp.asarray(ids), jnp.asarray(mask),
                             cache_length=length + max_new_tokens)
    key = jax.random.key(seed)
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token, logits, cache = _decode_step(graphdef, state, logits, cache, sub, temperature=float(temperature),
                                            top_k=int(top_k), top_p=float(top_p))
        token = int(token[0])
        if token == eos_id:
            return
        yield token


def bucket_length(n: int, minimum: int = 16) -> int:
    """Pads prompt lengths to powers of two, so a chat session compiles a handful of shapes, not one per turn."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def generate(model, tokenizer, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Completions for `prompts`: strings (encoded as they are, with one BOS) or chat message lists (rendered
    with the chat template and the assistant generation prompt)."""
    from zephyr_jax.tokenizer import render_chat

    texts = [p if isinstance(p, str) else render_chat(tokenizer, p, add_generation_prompt=True) for p in prompts]
    encoded = [tokenizer(t).input_ids for t in texts]
    length = bucket_length(max(len(e) for e in encoded))
    ids = np.zeros((len(encoded), length), np.int32)
    mask = np.zeros_like(ids)
    for row, e in enumerate(encoded):  # left padding
        ids[row, length - len(e):] = e
        mask[row, length - len(e):] = 1
    out = generate_ids(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                       top_p=top_p, seed=seed, eos_id=tokenizer.eos_token_id)
    replies = []
    for row in out:
        row = list(row)
        if tokenizer.eos_token_id in row:
            row = row[:row.index(tokenizer.eos_token_id)]
        replies.append(tokenizer.decode(row, skip_special_tokens=True))
    return replies
