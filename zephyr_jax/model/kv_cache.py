"""The key/value cache of the generation engine: one fixed buffer of `slots` rows, each holding one sequence.

A row's cache index is the token's position (index p holds the keys/values of position p), so nothing else is
recorded: a query at position q may see indices k <= q (and q - k < sliding_window). Whatever lies beyond a
row's current length (a previous occupant's tokens, a prefill bucket's padding) is never visible, because a
query only ever sees positions up to its own, and every one of those was written by this sequence first.
The buffers hold the whole sequence (prompt + new tokens): memory grows with the length, not with the window.

Layout: [layers, slots, length, kv_heads, head_dim] for keys and values alike; `read` hands attention keys as
[B, kv_heads, head_dim, length] and values as [B, kv_heads, length, head_dim], so both of
attention.cache_attention's products are plain batched matmuls (on XLA:CPU 2.7x faster than over [length,
kv_heads, head_dim]; bench/RESULTS.md, issue 11). Storing the cache in those layouts was faster still on the
CPU, but the decode call compiled for a TPU v5e then needed 1.1-2.1 GB of scratch instead of 0.35 GB (a 2-layer
7B-wide model, 64 rows, 1,024 positions), so the transpose rides on the copy that reading makes anyway.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    k: jax.Array  # [layers, slots, max_length, num_key_value_heads, head_dim]
    v: jax.Array

    @property
    def max_length(self) -> int:
        return self.k.shape[2]

    @classmethod
    def init(cls, cfg, slots: int, max_length: int, dtype=None, sharding=None) -> "KVCache":
        shape = (cfg.num_hidden_layers, slots, max_length, cfg.num_key_value_heads, cfg.head_dim)
        dtype = cfg.dtype if dtype is None else dtype
        zeros = jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)
        return cls(k=zeros(), v=zeros())


def write(buffer, layer, rows, positions, new):
    """buffer [L, slots, S, K, D] with layer `layer`'s rows[b] at positions[b, t] set to new[b, t] ([B, T, K, D]).
    Positions past the end (a bucket's padding) and rows past the last slot (a padded batch) are dropped."""
    index = (layer, rows[:, None], positions)
    return buffer.at[index].set(new.astype(buffer.dtype), mode="drop")


def read(buffer, which: str, layer, rows, length: int):
    """The first `length` positions of layer `layer` for rows [B] (None: every row), laid out for
    attention.cache_attention: keys [B, K, D, length], values [B, K, length, D]."""
    _, slots, _, heads, dim = buffer.shape
    # One slice of exactly what is read (indexing the layer first would copy its whole [slots, S] block); the
    # transpose rides along with that copy.
    block = jax.lax.dynamic_slice(buffer, (layer, 0, 0, 0, 0), (1, slots, length, heads, dim))[0]
    block = block if rows is None else jnp.take(block, rows, axis=0, mode="clip")
    return block.transpose(0, 2, 3, 1) if which == "k" else block.transpose(0, 2, 1, 3)
