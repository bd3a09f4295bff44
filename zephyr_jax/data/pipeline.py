"""Rows -> examples with the bad-row policy applied, a progress bar, and a printed summary of what was skipped."""

from __future__ import annotations

from typing import Callable, Iterable

from tqdm.auto import tqdm

from zephyr_jax.data.errors import BadRow, SkipCounter, check_on_bad_row, handle_bad_row


def process_rows(rows: Iterable, make_example: Callable, *, on_bad_row: str = "raise", source: str | None = None,
                 progress: bool = True, log: Callable = print):
    """Applies make_example(row, index) to every row. on_bad_row="raise" stops at the first bad row with an error
    naming it; "skip" counts it by reason. Returns (examples, SkipCounter)."""
    check_on_bad_row(on_bad_row)
    counter, examples = SkipCounter(source), []
    total = len(rows) if hasattr(rows, "__len__") else None
    for index, row in enumerate(tqdm(rows, total=total, desc=f"tokenizing {source or ''}".strip(),
                                     disable=not progress, mininterval=2.0)):
        try:
            examples.append(make_example(row, index))
            counter.keep()
        except BadRow as err:
            handle_bad_row(err, on_bad_row, counter)
    log(counter.summary())
    return examples, counter
