"""The key/value cache of the generation engine: one fixed buffer of `slots` rows, each holding one sequence.

A row's cache index is the token's position (index p holds the keys/values of position p), so nothing else is
recorded: a query at position q may see indices k <= q (and q - k < sliding_window). Whatever lies beyond a
row's current length (a previous occupant's tokens, a prefill bucket's padding) is never visible, because a
query only ever sees positions up to its own, and every one of those was written by this sequence first.
The buffers hold the whole sequence (prompt + new tokens): memory grows with the length, not with the window.

Layouts: keys [layers, slots, kv_heads, head_dim, length], values [layers, slots, kv_heads, length, head_dim].
Each is the layout its product in attention reads in order: q.k contracts head_dim over a position-minor block,
p.v contracts positions over a head_dim-minor one. On XLA:CPU this made the decode attention about 2.7x faster
than [length, kv_heads, head_dim] for both (bench/RESULTS.md, issue 11); the kv_heads axis is axis 2 in both.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

POSITION_AXIS = {"k": 4, "v": 3}  # where the length axis sits in each buffer


class KVCache(NamedTuple):
    k: jax.Array  # [layers, slots, num_key_value_heads, head_dim, max_length]
    v: jax.Array  # [layers, slots, num_key_value_heads, max_length, head_dim]

    @property
    def max_length(self) -> int:
        return self.v.shape[3]

    @classmethod
    def init(cls, cfg, slots: int, max_length: int, dtype=None, sharding=None) -> "KVCache":
        dtype = cfg.dtype if dtype is None else dtype
        base = (cfg.num_hidden_layers, slots, cfg.num_key_value_heads)

        def zeros(shape):
            return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()

        return cls(k=zeros(base + (cfg.head_dim, max_length)), v=zeros(base + (max_length, cfg.head_dim)))


def write(buffer, which: str, layer, rows, positions, new):
    """`buffer` (the "k" or "v" layout) with layer `layer`'s rows[b] at positions[b, t] set to new[b, t]
    ([B, T, kv_heads, head_dim]): one [kv_heads, head_dim] window per token in either layout. Positions past the
    end (a bucket's padding) and rows past the last slot (a padded batch) are dropped."""
    rows, every = rows[:, None], slice(None)
    index = (layer, rows, every, every, positions) if which == "k" else (layer, rows, every, positions)
    return buffer.at[index].set(new.astype(buffer.dtype), mode="drop")


def read(buffer, which: str, layer, rows, length: int):
    """The first `length` positions of layer `layer` for rows [B] (None: every row), in the buffer's layout:
    keys [B, K, D, length], values [B, K, length, D]."""
    sizes = list(buffer.shape)
    sizes[0], sizes[POSITION_AXIS[which]] = 1, length
    # One slice of exactly what is read (indexing the layer first would copy its whole [slots, ...] block).
    block = jax.lax.dynamic_slice(buffer, (layer, 0, 0, 0, 0), sizes)[0]
    return block if rows is None else jnp.take(block, rows, axis=0, mode="clip")
