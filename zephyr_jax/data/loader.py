"""Deterministic, resumable global batches.

Every process holds the same example list and computes the same shuffled order for (seed, epoch); each then
builds only the rows of every global batch that its devices hold (`rows`: positions in the global batch, from
train.local_rows; on a pod they need not be one contiguous block). The padded length of a batch is chosen from
the whole global batch, so all processes agree on shapes. The position (epoch, step) is two integers: saving it with a
checkpoint and restoring it continues with exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from zephyr_jax.data.batches import bucket, positions_needed


class BatchInfo(NamedTuple):
    """What a global batch holds: its examples' indices (in global row order) and its padded length."""
    indices: np.ndarray
    length: int


class Loader:
    def __init__(self, examples: Sequence, global_batch_size: int, make_batch: Callable, *, buckets,
                 seed: int = 0, shuffle: bool = True, rows=None, lengths=None):
        """make_batch(examples, length) -> dict of [rows, length] arrays (see data/batches.py).
        rows: the positions in each global batch this process builds (default: all of them).
        lengths: positions each example needs (default: computed from SFT / preference examples)."""
        rows = np.arange(global_batch_size) if rows is None else np.asarray(rows)
        if len(rows) and (rows.min() < 0 or rows.max() >= global_batch_size):
            raise ValueError(f"rows {rows.tolist()} fall outside a global batch of {global_batch_size}")
        if len(examples) < global_batch_size:
            raise ValueError(f"{len(examples)} examples cannot fill one global batch of {global_batch_size}")
        self.examples, self.global_batch_size, self.make_batch = examples, global_batch_size, make_batch
        self.buckets, self.seed, self.shuffle = tuple(buckets), seed, shuffle
        self.rows = rows
        self.lengths = np.array([positions_needed(e) for e in examples] if lengths is None else lengths)
        self.epoch, self.step = 0, 0

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch_size  # the remainder is left out of that epoch

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.examples))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def restore(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    def global_indices(self, epoch: int, step: int) -> np.ndarray:
        return self.order(epoch)[step * self.global_batch_size:(step + 1) * self.global_batch_size]

    def __iter__(self):
        return self

    def __next__(self) -> tuple[dict, BatchInfo]:
        """(this process's rows of the next global batch, what the whole global batch holds)."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        idx = self.global_indices(self.epoch, self.step)
        length = bucket(int(self.lengths[idx].max()), self.buckets)
        self.step += 1
        return self.make_batch([self.examples[i] for i in idx[self.rows]], length), BatchInfo(idx, length)
