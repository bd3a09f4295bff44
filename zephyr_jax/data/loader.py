"""Deterministic, resumable global batches.

Every process holds the same example list and computes the same shuffled order for (seed, epoch); each then
builds only the rows of every global batch that its devices hold (`rows`: positions in the global batch, from
train.local_rows; on a pod they need not be one contiguous block). The padded length of a batch is chosen from
the whole global batch, so all processes agree on shapes. The position (epoch, step) is two integers: saving it with a
checkpoint and restoring it continues with exactly the batches an uninterrupted run would have seen. The state also
holds a digest of the example list, so a position is never applied to other data (an edited file, another hub
revision, rows skipped differently), which would train some examples twice and others never.

Why not grain: a batch's row length and (dDPO) packing plan depend on every example of the global batch, so each
process reads the whole batch anyway and grain's per-process record sharding does not apply; the examples are
already tokenized in memory (nothing to read in parallel), and building a batch takes milliseconds on train.py's
prefetch thread against steps of seconds. grain's MapDataset (shuffle, batch, repeat) could express the order, but
in another permutation than the one saved positions index, for about forty lines less.
"""

from __future__ import annotations

import hashlib
from typing import Callable, NamedTuple, Sequence

import numpy as np

from zephyr_jax.data.batches import (PackedRow, bucket, loss_count, loss_positions, loss_width, plan_length,
                                     plan_pairs, positions_needed, preference_rows, slots_for, stack_rows)


class BatchInfo(NamedTuple):
    """What a global batch holds: its examples' indices (in global order), its row length and number of rows."""
    indices: np.ndarray
    length: int
    rows: int


def padded_batcher(make_rows: Callable, buckets) -> Callable:
    """One example per row (an SFT example, or a packed row), every row padded to the bucket above the longest."""

    def batcher(examples, rows=None):
        length = bucket(max(positions_needed(e) for e in examples), buckets)
        rows = range(len(examples)) if rows is None else rows
        batch = make_rows([examples[r] for r in rows], length)
        width = loss_width(max(loss_count(e) for e in examples), length, buckets)
        batch["loss_positions"] = loss_positions(batch.pop("loss_mask"), width)  # the same tokens, listed
        return batch, length, len(examples)

    return batcher


def pair_batcher(num_rows: int, buckets, micro_batches: int = 1) -> Callable:
    """Preference pairs spread over num_rows rows (data/batches.py plan_pairs); 2 * pairs rows: no packing."""

    def batcher(examples, rows=None):
        plan = plan_pairs(examples, num_rows, buckets, micro_batches)
        length = bucket(plan_length(examples, plan), buckets)
        rows = range(num_rows) if rows is None else rows
        batch = preference_rows(examples, [plan[r] for r in rows], length, slots_for(plan))
        completions = lambda row: sum(len(examples[p].rejected if side else examples[p].chosen) for p, side in row)
        width = loss_width(max(completions(row) for row in plan), length, buckets)
        batch["loss_positions"] = loss_positions(batch.pop("loss_mask"), width)  # the same tokens, listed
        return batch, length, num_rows

    return batcher


def examples_digest(examples: Sequence) -> str:
    """A fingerprint of the examples' token content, in order: their integer and boolean arrays. Float arrays
    (precomputed reference log-probs) are left out: recomputing them may change their last bits."""
    h = hashlib.blake2b(digest_size=16)
    for e in examples:
        if isinstance(e, PackedRow):  # its arrays, as when packed rows were held as arrays (saved digests hold)
            e = {k: v[0] for k, v in stack_rows([e], e.length).items()}
        for v in (e[k] for k in sorted(e)) if isinstance(e, dict) else e:
            if isinstance(v, np.ndarray) and (np.issubdtype(v.dtype, np.integer) or v.dtype == bool):
                h.update(np.int64(v.size).tobytes())
                h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()


class Loader:
    def __init__(self, examples: Sequence, global_batch_size: int, batcher: Callable, *, seed: int = 0, rows=None):
        """batcher(the global batch's examples, rows) -> (those rows of the batch as a dict of [rows, length]
        arrays, length, rows in the global batch): padded_batcher or pair_batcher. The rows' loss_mask becomes
        loss_positions there and is not sent to the devices (the steps read only the positions).
        rows: the rows of each global batch this process builds (default: all of them; train.local_rows)."""
        self.examples, self.global_batch_size, self.batcher = examples, global_batch_size, batcher
        if len(examples) < global_batch_size:
            raise ValueError(f"{len(examples)} examples cannot fill one global batch of {global_batch_size}")
        self.seed, self.rows = seed, rows
        self.epoch, self.step = 0, 0
        self.digest = examples_digest(examples)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch_size  # the remainder is left out of that epoch

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))

    def state(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "examples": len(self.examples), "digest": self.digest}

    def restore(self, state: dict) -> None:
        """Continues from a saved position; refuses one saved over other examples (states without a digest, from
        before it was kept, are taken as they are)."""
        if "digest" in state and (state["digest"], int(state["examples"])) != (self.digest, len(self.examples)):
            raise ValueError(
                f"the checkpoint's data position indexes another example list ({state['examples']} examples, digest "
                f"{state['digest'][:12]}) than this run's ({len(self.examples)} examples, digest {self.digest[:12]}): "
                "the training data or its tokenization changed since it was saved. Resuming would train some "
                "examples twice and others never. Start a new --workdir (config.model.init='orbax' with "
                "config.model.path=<this workdir> continues from its weights), or restore the original data.")
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
        self.step += 1
        batch, length, num_rows = self.batcher([self.examples[i] for i in idx], self.rows)
        return batch, BatchInfo(idx, length, num_rows)
