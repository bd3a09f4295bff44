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


def load_examples(data_cfg, stage: str, tok, which: str, log: Callable = print):
    """Tokenized examples of the config's train or eval split ("train" / "eval"), with bad rows handled per
    data_cfg.on_bad_row. Every process loads the same list (the loader then takes each process's slice)."""
    from zephyr_jax.data.preference import preference_example
    from zephyr_jax.data.sft import sft_example
    from zephyr_jax.data.sources import load_rows

    source, split = data_cfg.get(which), data_cfg.get(f"{which}_split")
    limit = data_cfg.get(f"max_{which}_examples", -1)
    rows = load_rows(source, split, data_dir=data_cfg.get("data_dir"))
    if limit is not None and limit >= 0 and len(rows) > limit:
        rows = rows.select(range(limit)) if hasattr(rows, "select") else rows[:limit]
    if stage == "sft":
        make = lambda row, i: sft_example(row, i, tok, loss_on=data_cfg.loss_on, max_length=data_cfg.max_length,
                                          too_long=data_cfg.too_long, source=f"{source}:{split}")
    else:
        make = lambda row, i: preference_example(row, i, tok, max_length=data_cfg.max_length,
                                                 max_prompt_length=data_cfg.max_prompt_length,
                                                 source=f"{source}:{split}")
    examples, counter = process_rows(rows, make, on_bad_row=data_cfg.on_bad_row, source=f"{source}:{split}",
                                     log=log)
    if not examples:
        raise ValueError(f"no usable examples in {source}:{split} ({counter.summary()})")
    return examples, counter
