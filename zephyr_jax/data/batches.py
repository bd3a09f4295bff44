"""Examples -> fixed-shape numpy batches: inputs, targets, loss_mask, positions, segment_ids (all [rows, T]).

targets are already shifted (targets[t] = the token after inputs[t]), so losses never shift. Padding has
segment id 0 and loss_mask 0; real tokens have segment ids >= 1, so they never attend to padding or, in a
packed row, to another example (the PyTorch recipe's packing defect). Positions restart at 0 per example.
"""

from __future__ import annotations

import numpy as np

FIELDS = ("inputs", "targets", "loss_mask", "positions", "segment_ids")


def _empty(rows, length):
    return {k: np.zeros((rows, length), np.int32) for k in FIELDS}


def _place(batch, row, start, ids, loss_mask, segment):
    """Writes one example (ids [L], loss_mask over ids [L]) at batch[row, start:start+L-1]."""
    n = len(ids) - 1
    span = slice(start, start + n)
    batch["inputs"][row, span] = ids[:-1]
    batch["targets"][row, span] = ids[1:]
    batch["loss_mask"][row, span] = loss_mask[1:]
    batch["positions"][row, span] = np.arange(n)
    batch["segment_ids"][row, span] = segment
    return start + n


def pack(examples, seq_len: int) -> dict:
    """Packs SFT examples (ids, loss_mask) in order into rows of seq_len positions, starting a new row when the
    next example does not fit. An example of L tokens takes L - 1 positions."""
    rows, current, used = [], [], 0
    for ex in examples:
        n = len(ex.ids) - 1
        if n > seq_len:
            raise ValueError(f"example of {len(ex.ids)} tokens does not fit a packed row of {seq_len}")
        if used + n > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(ex)
        used += n
    if current:
        rows.append(current)
    batch = _empty(len(rows), seq_len)
    for r, row in enumerate(rows):
        start = 0
        for segment, ex in enumerate(row, start=1):
            start = _place(batch, r, start, ex.ids, ex.loss_mask, segment)
    return batch


def stack_rows(rows, length: int) -> dict:
    """Packed rows (dicts of [seq_len] arrays) -> a batch; length is always seq_len."""
    return {k: np.stack([r[k] for r in rows]) for k in FIELDS}


def pad_sft(examples, length: int) -> dict:
    """One example per row, right-padded to `length` positions."""
    batch = _empty(len(examples), length)
    for r, ex in enumerate(examples):
        _place(batch, r, 0, ex.ids, ex.loss_mask, 1)
    return batch


def preference_batch(examples, length: int) -> dict:
    """B pairs -> arrays [B, 2, length]: [:, 0] is prompt + chosen, [:, 1] prompt + rejected. Keeping the pair
    on one batch row means any split of the batch (processes, devices, micro-batches) keeps pairs whole; the
    train step folds it to [2B, length] for one forward pass. The loss covers completion tokens only."""
    batch = _empty(2 * len(examples), length)
    for r, ex in enumerate(examples):
        for k, completion in enumerate((ex.chosen, ex.rejected)):
            ids = np.concatenate([ex.prompt, completion])
            mask = np.concatenate([np.zeros(len(ex.prompt), bool), np.ones(len(completion), bool)])
            _place(batch, 2 * r + k, 0, ids, mask, 1)
    batch = {k: v.reshape(len(examples), 2, length) for k, v in batch.items()}
    if all(ex.reference is not None for ex in examples):
        batch["reference_logps"] = np.stack([ex.reference for ex in examples]).astype(np.float32)
    return batch


def positions_needed(example) -> int:
    """Model positions one example needs (its longest sequence minus one)."""
    if hasattr(example, "prompt"):
        return len(example.prompt) + max(len(example.chosen), len(example.rejected)) - 1
    return len(example.ids) - 1


def sequence_lengths(example) -> list[int]:
    """Real positions of each sequence an example puts through the model: an SFT example's one, a preference
    pair's two (prompt + chosen, prompt + rejected), a packed row's segments. Padding is not counted."""
    if isinstance(example, dict):  # a packed row
        ids = example["segment_ids"]
        return np.bincount(ids[ids > 0]).tolist()[1:] if (ids > 0).any() else []
    if hasattr(example, "prompt"):
        return [len(example.prompt) + len(example.chosen) - 1, len(example.prompt) + len(example.rejected) - 1]
    return [len(example.ids) - 1]


def bucket(n: int, buckets) -> int:
    """The smallest bucket length >= n, so batches come in a few shapes and jit compiles a few times."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"a batch needs {n} positions, more than the largest bucket {max(buckets)}")


def default_buckets(max_length: int, smallest: int = 128) -> tuple:
    """Powers of two from `smallest` up to max_length, and max_length itself."""
    out, b = [], smallest
    while b < max_length:
        out.append(b)
        b *= 2
    return tuple(out) + (max_length,)
