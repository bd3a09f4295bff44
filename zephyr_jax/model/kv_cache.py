"""The key/value cache of the generation engine: one fixed buffer of `slots` rows, each holding one sequence.

A row's cache index is the token's position (index p holds the keys/values of position p), so nothing else is
recorded: a query at position q may see indices k <= q (and q - k < sliding_window). Whatever lies beyond a
row's current length (a previous occupant's tokens, a prefill bucket's padding) is never visible, because a
query only ever sees positions up to its own, and every one of those was written by this sequence first.
The buffers hold the whole sequence (prompt + new tokens): memory grows with the length, not with the window.

`read` hands attention keys and values as [B, kv_heads, length, head_dim], so both of
attention.cache_attention's products are plain batched matmuls (the keys' one contracting head_dim, the minor
axis of both operands). How the buffers are stored depends on the platform (bench/RESULTS.md, issues 11, 13):
  - positions first, [layers, slots, length, kv_heads, head_dim] (TPU): a token's keys are one contiguous
    window, and reading transposes along with the copy it makes anyway. The decode call compiled for a TPU v5e
    (a 2-layer 7B-wide model, 64 rows, 1,024 positions) needs 0.22 GB of scratch; stored heads first, 2.1 GB.
  - heads first, [layers, slots, kv_heads, length, head_dim] (CPU, GPU): reading is a copy of contiguous runs.
    Stored positions first, XLA:CPU's transposing copy made a decoding step 8-10% slower at 512 and 1,024
    positions (bench/decode_step.py); XLA:GPU (the same call compiled for an H200, 64 rows) transposes the
    whole cache to heads first before the decoding loop and back after it, every call (1.5 GB of scratch
    against 0.6 GB stored heads first).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


def heads_first_on(platform: str) -> bool:
    """The storage order for a platform ("cpu", "tpu", "gpu"): see the module's docstring."""
    return platform != "tpu"


def axes(heads_first: bool) -> tuple[str, ...]:
    """The buffers' axes in storage order."""
    if heads_first:
        return ("layers", "slots", "kv_heads", "length", "head_dim")
    return ("layers", "slots", "length", "kv_heads", "head_dim")


@flax.struct.dataclass
class KVCache:
    k: jax.Array  # laid out as axes(heads_first)
    v: jax.Array
    heads_first: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def max_length(self) -> int:
        return self.k.shape[axes(self.heads_first).index("length")]

    @classmethod
    def init(cls, cfg, slots: int, max_length: int, dtype=None, sharding=None, heads_first=None) -> "KVCache":
        """Zeroed buffers (on `sharding`'s devices, else this process's first device). heads_first None: the platform's
        order (heads_first_on)."""
        # Committed to a device even without a sharding: calls that take it then compile as they will later,
        # when the cache they take is a previous call's output.
        # (this process's first device: jax.devices()[0] is process 0's in a multi-process job)
        sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        if heads_first is None:
            heads_first = heads_first_on(next(iter(sharding.device_set)).platform)
        sizes = dict(layers=cfg.num_hidden_layers, slots=slots, length=max_length,
                     kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)
        shape = tuple(sizes[a] for a in axes(heads_first))
        dtype = cfg.dtype if dtype is None else dtype
        check_fits(sharding, shape, dtype, slots, max_length)
        # jnp.zeros(device=) compiles once per shape and sharding (a jit of a new lambda compiled per Engine)
        return cls(k=jnp.zeros(shape, dtype, device=sharding), v=jnp.zeros(shape, dtype, device=sharding),
                   heads_first=heads_first)


def free_device_bytes(device) -> int | None:
    """What the device's allocator can still hand out; None where it does not say (CPU)."""
    stats = device.memory_stats()
    return None if not stats or "bytes_limit" not in stats else stats["bytes_limit"] - stats.get("bytes_in_use", 0)


def check_fits(sharding, shape, dtype, slots: int, max_length: int) -> None:
    """ValueError when the k and v buffers' shards do not fit a device's free memory (an out-of-memory traceback
    from inside jax, once the model had loaded, was all a too large --max-slots said)."""
    need = 2 * jnp.dtype(dtype).itemsize * int(np.prod(sharding.shard_shape(shape), dtype=np.int64))
    for device in sorted(sharding.addressable_devices, key=lambda d: d.id):  # (another host's: its own check)
        free = free_device_bytes(device)
        if free is not None and need > free:
            raise ValueError(f"the KV cache of {slots} slots x {max_length} tokens needs {need / 2**30:.2f} GiB on "
                             f"{device}, which has {free / 2**30:.2f} GiB free: use fewer slots or a shorter "
                             "max_length")


def write(buffer, heads_first: bool, layer, rows, positions, new):
    """buffer with layer `layer`'s rows[b] at positions[b, t] set to new[b, t] ([B, T, kv_heads, head_dim]):
    one [kv_heads, head_dim] window per token in either order. Positions past the end (a bucket's padding) and
    rows past the last slot (a padded batch) are dropped.

    A prefill of several rows writes them one at a time: as one scatter, XLA:TPU laid the whole cache out anew
    and back around it where a chip holds 2 KV heads (a 7B on v4-8 with tensor=4, 64 slots x 4,096: 8 GiB of
    temporaries for 2 rows, and 16 rows of 512 tokens did not fit a v5e chip); row by row it copies nothing.

    One token of one row (a lone request's decoding) is written with a second, dropped update beside it: alone,
    XLA makes it a dynamic-update-slice, which XLA:TPU ran inside the layer loop on the whole cache all-gathered
    (slots over fsdp: a 7B's 64 x 4,096 cache on v5e-8 needed 25.7 GiB a chip) or laid out anew and back (one KV
    head a chip); as a scatter it writes the token where it lies."""
    if positions.shape[1] > 1 and rows.shape[0] > 1:
        for b in range(rows.shape[0]):
            buffer = write(buffer, heads_first, layer, rows[b:b + 1], positions[b:b + 1], new[b:b + 1])
        return buffer
    if rows.shape[0] == 1 and positions.shape[1] == 1:
        rows = jnp.concatenate([rows, jnp.full_like(rows, buffer.shape[1])])  # past the last slot: dropped
        positions, new = jnp.concatenate([positions, positions]), jnp.concatenate([new, new])
    rows = rows[:, None]
    index = (layer, rows, slice(None), positions) if heads_first else (layer, rows, positions)
    return buffer.at[index].set(new.astype(buffer.dtype), mode="drop")


def read(buffer, heads_first: bool, layer, rows, length: int):
    """The first `length` positions of layer `layer` for rows [B] (None: every row), laid out for
    attention.cache_attention: [B, kv_heads, length, head_dim]."""
    sizes = list(buffer.shape)
    sizes[0], sizes[axes(heads_first).index("length")] = 1, length
    # One slice of exactly what is read (indexing the layer first would copy its whole [slots, ...] block).
    block = jax.lax.dynamic_slice(buffer, (layer, 0, 0, 0, 0), sizes)[0]
    block = block if rows is None else jnp.take(block, rows, axis=0, mode="clip")
    return block if heads_first else block.transpose(0, 2, 1, 3)


class CacheStep(NamedTuple):
    """One layer's view of the engine's KV cache during a decoding call: the whole buffers (carried through the
    layer scan, so each write is in place), the layer, which cache rows the batch's rows are (None: row b is
    slot b), the new tokens' positions [B, T], the [B, 1, T, kv_length] mask over the positions attention reads
    (kv_length: a static bucket), and the buffers' storage order."""
    k: jax.Array
    v: jax.Array
    layer: jax.Array
    rows: jax.Array | None
    positions: jax.Array
    mask: jax.Array
    heads_first: bool  # the buffers' storage order (axes)

    def write(self, k, v) -> "CacheStep":
        rows = jnp.arange(k.shape[0]) if self.rows is None else self.rows
        order = self.heads_first
        return self._replace(k=write(self.k, order, self.layer, rows, self.positions, k),
                             v=write(self.v, order, self.layer, rows, self.positions, v))

    def read(self):
        length = self.mask.shape[-1]
        return (read(self.k, self.heads_first, self.layer, self.rows, length),
                read(self.v, self.heads_first, self.layer, self.rows, length))
