"""The key/value cache for decoding: fixed-size buffers, so every decoding step has the same shapes (one jit).

Each row's slots are filled left to right in step (prefill writes the whole left-padded prompt, then one token
per step). `positions` records each slot's token position, -1 for padding or an unfilled slot; attention masks
keys by it, which is how padding and the sliding window are respected. The buffers hold the whole sequence
(prompt + new tokens): memory grows with max_length, not with the window.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class KVCache(NamedTuple):
    k: jax.Array  # [layers, B, S, num_key_value_heads, head_dim]
    v: jax.Array
    positions: jax.Array  # [B, S] int32: position of the token in each slot, -1 if none
    lengths: jax.Array  # [B] int32: real tokens written so far per row
    index: jax.Array  # int32 scalar: next slot to write

    @property
    def max_length(self) -> int:
        return self.positions.shape[1]

    @classmethod
    def init(cls, cfg, batch_size: int, max_length: int, dtype=None) -> "KVCache":
        shape = (cfg.num_hidden_layers, batch_size, max_length, cfg.num_key_value_heads, cfg.head_dim)
        dtype = cfg.dtype if dtype is None else dtype
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   positions=jnp.full((batch_size, max_length), -1, jnp.int32),
                   lengths=jnp.zeros((batch_size,), jnp.int32), index=jnp.zeros((), jnp.int32))
