"""Examples -> fixed-shape numpy batches: inputs, targets, loss_mask, positions, segment_ids (all [rows, T]).

targets are already shifted (targets[t] = the token after inputs[t]), so losses never shift. Padding has
segment id 0 and loss_mask 0; real tokens have segment ids >= 1, so they never attend to padding or, in a
packed row, to another example (the PyTorch recipe's packing defect). Positions restart at 0 per example.

Packing means the same for both stages: several sequences share a row, each its own segment.
* dSFT: `pack_rows` fills rows of seq_len with whole examples, best-fit decreasing within windows of a shuffled
  order (the rows are shuffled again by the loader, and written into arrays per batch by `stack_rows`).
* dDPO: a global batch of B pairs is 2B sequences (prompt + chosen, prompt + rejected), packed best-fit
  decreasing into a fixed number of rows at the shortest bucket length that holds them all (`plan_pairs`).
  Per segment slot s (segment id s + 1) of each row, "sequence_pair" [rows, slots] says whose
  sequence it is: 2 * pair + 0 (chosen) or + 1 (rejected), -1 for an empty slot; the train step sums each
  segment's completion log-probs and puts them back together per pair. Without packing every sequence has a
  row of its own: the same layout with one slot per row.
"""

from __future__ import annotations

import bisect
from typing import NamedTuple

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


def best_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity: items longest first, each into the fullest bin
    it still fits (a new bin when none has room). Within a few percent of the fewest bins on typical mixes."""
    bins, spaces = [], []  # spaces: sorted (room left, bin index)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"an item of {n} positions does not fit a row of {capacity}")
        k = bisect.bisect_left(spaces, (n, -1))
        if k == len(spaces):
            bins.append([i])
            room, b = capacity - n, len(bins) - 1
        else:
            room, b = spaces.pop(k)
            bins[b].append(i)
            room -= n
        bisect.insort(spaces, (room, b))
    return bins


class PackedRow(NamedTuple):
    """A packed dSFT row: its examples, in segment order, in `length` positions. It refers to the examples and is
    written into arrays only when its batch is built (stack_rows): a whole split's rows as arrays took 20 bytes a
    position, 5.7 GiB per process for UltraChat-200k (the examples themselves hold 5 bytes a token)."""
    examples: tuple
    length: int


def pack_rows(examples, seq_len: int, window: int | None = None) -> list[PackedRow]:
    """Packs SFT examples (ids, loss_mask) into rows of seq_len positions: best-fit decreasing within each
    window of `window` consecutive examples (None: all of them), so rows mix examples from one stretch of the
    caller's (shuffled) order. An example of L tokens takes L - 1 positions."""
    window = window or max(len(examples), 1)
    rows = []
    for start in range(0, len(examples), window):
        part = examples[start:start + window]
        rows += [PackedRow(tuple(part[i] for i in row), seq_len)
                 for row in best_fit_decreasing([len(e.ids) - 1 for e in part], seq_len)]
    return rows


def stack_rows(rows, length: int) -> dict:
    """Packed rows -> a batch of [len(rows), length] arrays (length: the rows' own, seq_len)."""
    batch = _empty(len(rows), length)
    for r, row in enumerate(rows):
        if row.length != length:
            raise ValueError(f"a row packed for {row.length} positions cannot go in a batch of {length}")
        start = 0
        for segment, ex in enumerate(row.examples, start=1):
            start = _place(batch, r, start, ex.ids, ex.loss_mask, segment)
    return batch


def pack(examples, seq_len: int, window: int | None = None) -> dict:
    """pack_rows, as one batch of every row."""
    return stack_rows(pack_rows(examples, seq_len, window), seq_len)


def pad_sft(examples, length: int) -> dict:
    """One example per row, right-padded to `length` positions."""
    batch = _empty(len(examples), length)
    for r, ex in enumerate(examples):
        _place(batch, r, 0, ex.ids, ex.loss_mask, 1)
    return batch


def pair_sequence_lengths(example) -> tuple[int, int]:
    """Positions of a pair's two sequences: prompt + chosen and prompt + rejected, each minus one."""
    return len(example.prompt) + len(example.chosen) - 1, len(example.prompt) + len(example.rejected) - 1


def plan_pairs(examples, num_rows: int, buckets, micro_batches: int = 1) -> list[list[tuple[int, int]]]:
    """Which sequences go in which row: for each of num_rows rows, its (pair, side) list in segment order.

    Micro-batch m (rows m, m + n, m + 2n, ...: train_steps.split_micro's split) holds pairs m, m + n, ..., both
    sequences of each. The row length is the shortest bucket into which best-fit decreasing packs every
    micro-batch's sequences within its rows. num_rows = 2 * len(examples) puts every sequence in a row of its
    own (no packing), in pair order within each micro-batch: with one micro-batch, pair p's are rows 2p and 2p + 1
    ("sequence_pair" says where each is in any case)."""
    n = micro_batches
    if num_rows % n or len(examples) % n:
        raise ValueError(f"{num_rows} rows and {len(examples)} pairs do not split into {n} micro-batches")
    items = [[(p, side) for p in range(m, len(examples), n) for side in (0, 1)] for m in range(n)]
    lengths = [[pair_sequence_lengths(examples[p])[side] for p, side in part] for part in items]
    if num_rows == 2 * len(examples):
        rows = [[[i] for i in range(len(part))] for part in items]
    else:
        longest = max(max(part) for part in lengths)
        for length in sorted(b for b in buckets if b >= longest):
            rows = [best_fit_decreasing(part, length) for part in lengths]
            if all(len(r) <= num_rows // n for r in rows):
                break
        else:
            raise ValueError(f"{len(examples)} pairs do not fit {num_rows} rows of at most {max(buckets)} positions")
    plan = [[] for _ in range(num_rows)]
    for m, (part, part_rows) in enumerate(zip(items, rows)):
        part_rows = sorted(part_rows, key=min) + [[]] * (num_rows // n - len(part_rows))  # leftover rows: empty
        for k, row in enumerate(part_rows):
            plan[m + k * n] = [part[i] for i in sorted(row)]
    return plan


def row_length(examples, row) -> int:
    """Positions a planned row's sequences take."""
    return sum(pair_sequence_lengths(examples[p])[side] for p, side in row)


def plan_length(examples, plan) -> int:
    """Positions the fullest row of a plan needs."""
    return max(row_length(examples, row) for row in plan)


def preference_rows(examples, plan_rows, length: int, slots: int) -> dict:
    """Rows [len(plan_rows), length] holding the planned sequences, plus "sequence_pair" [rows, slots] and,
    when every example carries one, the precomputed "reference_logps" [rows, slots] of each slot's sequence.
    The loss covers completion tokens only."""
    batch = _empty(len(plan_rows), length)
    batch["sequence_pair"] = np.full((len(plan_rows), slots), -1, np.int32)
    with_reference = all(ex.reference is not None for ex in examples)
    if with_reference:
        batch["reference_logps"] = np.zeros((len(plan_rows), slots), np.float32)
    for r, row in enumerate(plan_rows):
        if len(row) > slots:
            raise ValueError(f"a row holds {len(row)} sequences, more than its {slots} slots")
        need = row_length(examples, row)
        if need > length:  # before placing them: numpy's broadcast error names no row
            raise ValueError(f"row {r} needs {need} positions, more than the batch length {length}")
        start = 0
        for s, (p, side) in enumerate(row):
            ex = examples[p]
            completion = ex.rejected if side else ex.chosen
            ids = np.concatenate([ex.prompt, completion])
            mask = np.concatenate([np.zeros(len(ex.prompt), bool), np.ones(len(completion), bool)])
            start = _place(batch, r, start, ids, mask, s + 1)
            batch["sequence_pair"][r, s] = 2 * p + side
            if with_reference:
                batch["reference_logps"][r, s] = ex.reference[side]
    return batch


MIN_SLOTS = 16  # rows hold about four sequences (up to ~16 with short pairs): one slot count for nearly all batches


def slots_for(plan) -> int:
    """Segment slots per row: 1 for a sequence a row, else MIN_SLOTS, or the power of two above the most sequences
    a row holds when that is more. With the row length and the loss width it makes a batch's shape, and each
    shape compiles (8 or 16 by the batch's fullest row multiplied the recipe's dDPO shapes by two)."""
    most = max(len(row) for row in plan)
    if most <= 1:  # a row per sequence (unpacked pairs): always one
        return 1
    return max(MIN_SLOTS, 1 << (most - 1).bit_length())


def pack_pairs(examples, num_rows: int, buckets, micro_batches: int = 1) -> dict:
    """A whole preference batch: plan_pairs, then every row at the bucket length above the fullest."""
    plan = plan_pairs(examples, num_rows, buckets, micro_batches)
    return preference_rows(examples, plan, bucket(plan_length(examples, plan), buckets), slots_for(plan))


def positions_needed(example) -> int:
    """Model positions one example needs in a row of its own (a pair: its longer sequence)."""
    if isinstance(example, PackedRow):
        return example.length
    if hasattr(example, "prompt"):
        return len(example.prompt) + max(len(example.chosen), len(example.rejected)) - 1
    return len(example.ids) - 1


def sequence_lengths(example) -> list[int]:
    """Real positions of each sequence an example puts through the model: an SFT example's one, a preference
    pair's two (prompt + chosen, prompt + rejected), a packed row's segments. Padding is not counted."""
    if isinstance(example, PackedRow):
        return [len(ex.ids) - 1 for ex in example.examples]
    if hasattr(example, "prompt"):
        return list(pair_sequence_lengths(example))
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


def loss_count(example) -> int:
    """Positions with a loss in one example's row: an SFT example's targets, a packed row's."""
    if isinstance(example, PackedRow):
        return sum(loss_count(ex) for ex in example.examples)
    return int(np.sum(example.loss_mask[1:]))


def loss_positions(loss_mask: np.ndarray, width: int) -> np.ndarray:
    """[rows, width] int32: each row's positions with a loss, in order, then -1. The train step reads hidden
    states only there, so the LM head costs nothing at prompt tokens and padding."""
    out = np.full((loss_mask.shape[0], width), -1, np.int32)
    for r, row in enumerate(loss_mask):
        where = np.flatnonzero(row)
        if len(where) > width:
            raise ValueError(f"row {r} has {len(where)} loss positions, more than the batch's {width}")
        out[r, :len(where)] = where
    return out


def loss_width(most: int, length: int, buckets) -> int:
    """Loss positions per row: the first of a quarter, half and three quarters of the row length (each rounded up
    to a bucket below the length, else to a multiple of 8) and the whole length that holds the row with the most;
    below the quarter, powers of two from 8 (rows of few loss tokens, as short replies make: the demo's dDPO head
    ran at 23% loss tokens, now 42%; the recipe's rows never reach them): at most about log2(length / 8) + 4 widths
    a length, of which a run meets few. Any bucket below the length multiplied the shapes that compile (57 over the
    recipe's 3 dDPO epochs; 13 now, bench/batch_shapes.py)."""
    quarters = {min([b for b in buckets if k * length / 4 <= b < length], default=-(-k * length // 32) * 8)
                for k in (1, 2, 3)}
    small = {8 << k for k in range(20) if 8 << k < min(quarters)}
    return bucket(max(most, 1), sorted(q for q in quarters | small | {length} if q <= length))


def packed_pair_buckets(pairs: int, rows: int, max_length: int) -> tuple:
    """Row lengths for `pairs` preference pairs packed into `rows` rows: multiples of 128 (what the TPU splash
    kernel's blocks need; of max_length when it is shorter) up to what the fullest row could need (its share of
    sequences, and one more, each of up to max_length positions)."""
    return multiples(min(128, max_length), (-(-2 * pairs // rows) + 1) * max_length)


def multiples(step: int, max_length: int) -> tuple:
    """Bucket lengths step, 2 * step, ... up to max_length: for packed rows, whose lengths vary little."""
    return tuple(range(step, max_length + step, step))
