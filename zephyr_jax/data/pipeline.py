"""Rows -> examples with the bad-row policy applied, a progress bar, and a printed summary of what was skipped.

Tokenization runs in worker processes when there are many rows (`num_proc`), and `load_examples` keeps its
result in the tokenized-example cache (data/cache.py), so a restart or another host reads it back instead.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import multiprocessing.connection
import os
import re
import signal
import sys
import threading
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

from tqdm.auto import tqdm

from zephyr_jax.data.errors import BadRow, SkipCounter, check_on_bad_row, handle_bad_row

MAX_AUTO_PROCESSES = 8  # num_proc=0: this many worker processes at most
# A worker takes seconds to start (a fresh interpreter importing transformers and the main module): give each
# at least this many rows (about as long to tokenize); fewer rows are tokenized in this process.
MIN_ROWS_PER_PROCESS = 2000
MAX_CHUNK = 256  # rows per task handed to a worker (the progress bar moves per task)


def process_rows(rows: Iterable, make_example: Callable, *, on_bad_row: str = "raise", source: str | None = None,
                 progress: bool = True, log: Callable = print, num_proc: int = 1):
    """Applies make_example(row, index) to every row. on_bad_row="raise" stops at the first bad row with an error
    naming it; "skip" counts it by reason. Returns (examples, SkipCounter).

    num_proc > 1 (0: up to MAX_AUTO_PROCESSES, one per CPU) tokenizes in that many worker processes, given at
    least MIN_ROWS_PER_PROCESS rows each; `make_example` and `rows` must then be picklable. The result is the
    same as in this process: examples in row order, the same skips counted in the same order, the same error."""
    check_on_bad_row(on_bad_row)
    counter, examples = SkipCounter(source), []
    total = len(rows) if hasattr(rows, "__len__") else None
    processes = worker_count(num_proc, total)
    bar = tqdm(total=total, desc=f"tokenizing {source or ''}".strip(), disable=not progress, mininterval=2.0)
    outcomes = (_outcomes_parallel(rows, make_example, processes, on_bad_row == "raise", bar, log) if processes > 1
                else _outcomes_here(rows, make_example, bar))
    try:
        for outcome in outcomes:
            if isinstance(outcome, BadRow):
                handle_bad_row(outcome, on_bad_row, counter)
            else:
                examples.append(outcome)
                counter.keep()
    finally:
        outcomes.close()  # stops the workers now when a bad row raises
        bar.close()
    log(counter.summary())
    return examples, counter


def worker_count(num_proc: int, total: int | None) -> int:
    """Worker processes for `total` rows: 1 means this process."""
    if total is None:
        return 1
    if not num_proc:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        num_proc = min(MAX_AUTO_PROCESSES, cpus or 1)
    return max(1, min(num_proc, total // max(1, MIN_ROWS_PER_PROCESS)))


def _outcomes_here(rows, make_example, bar):
    """Each row's example, or its BadRow, in row order."""
    for index, row in enumerate(rows):
        try:
            yield make_example(row, index)
        except BadRow as err:
            yield err
        bar.update()


def _outcomes_parallel(rows, make_example, processes: int, stop_at_bad_row: bool, bar, log):
    """As _outcomes_here, from worker processes that each get `rows` and `make_example` once and then tokenize
    [start, stop) chunks, handed back in order."""
    n = len(rows)
    chunk = max(1, min(MAX_CHUNK, n // (processes * 8)))
    tasks = [(start, min(start + chunk, n), stop_at_bad_row) for start in range(0, n, chunk)]
    if not _main_is_guarded():
        log(f"tokenizing in this process: {sys.modules['__main__'].__file__} has no `if __name__ == \"__main__\":` "
            "guard, so every worker process would run it again")
        yield from _outcomes_here(rows, make_example, bar)
        return
    # spawn, not fork: forking a process where JAX (or the tokenizers' thread pool) already runs threads can
    # deadlock the child. An executor, not a Pool: a worker that cannot start raises instead of hanging.
    executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(rows, make_example))
    try:
        try:
            results = executor.map(_run_chunk, tasks)  # starts the workers, which get rows and make_example
        except Exception as e:  # noqa: BLE001 (rows or make_example that do not pickle)
            log(f"tokenizing in this process: could not start {processes} workers ({type(e).__name__}: {e})")
            yield from _outcomes_here(rows, make_example, bar)
            return
        for (start, stop, _), outcomes in zip(tasks, results):
            yield from outcomes
            bar.update(stop - start)
    finally:  # also when the consumer stops at a bad row: drop the queued chunks, wait for the running ones
        executor.shutdown(wait=True, cancel_futures=True)


def _main_is_guarded() -> bool:
    """False when spawned workers would re-run the main script's top level: a script file (not a package's
    __main__, a notebook or `python -c`) without an `if __name__ == "__main__":` guard."""
    main = sys.modules.get("__main__")
    path, name = getattr(main, "__file__", None), getattr(getattr(main, "__spec__", None), "name", None) or ""
    if path is None or name == "__main__" or name.endswith(".__main__"):  # spawn does not re-import these
        return True
    try:
        source = Path(path).read_text()
    except (OSError, UnicodeDecodeError):
        return True
    return re.search(r"""__name__\s*==\s*['"]__main__['"]""", source) is not None


_WORKER: dict = {}


def _init_worker(rows, make_example):
    _WORKER.update(rows=rows, make_example=make_example)
    # Ctrl-C reaches the whole foreground process group: the parent stops (train saves its state) and ends the
    # workers after their running chunk, so a worker's own KeyboardInterrupt would only add its traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A worker waits on the executor's queue, whose write end it holds itself: when the parent is killed (kill -9,
    # the OOM killer) it would wait forever, holding its memory. It ends with its parent instead.
    parent = multiprocessing.parent_process()
    if parent is not None:
        def exit_with_parent():
            multiprocessing.connection.wait([parent.sentinel])
            os._exit(1)

        threading.Thread(target=exit_with_parent, daemon=True, name="exit-with-parent").start()


def _run_chunk(task) -> list:
    """Outcomes of rows [start, stop); with on_bad_row="raise" the chunk ends at its first bad row (the parent
    raises there)."""
    start, stop, stop_at_bad_row = task
    rows, make_example = _WORKER["rows"], _WORKER["make_example"]
    chunk = rows.select(range(start, stop)) if hasattr(rows, "select") else (rows[i] for i in range(start, stop))
    outcomes = []
    for index, row in enumerate(chunk, start):
        try:
            outcomes.append(make_example(row, index))
        except BadRow as err:
            outcomes.append(err)
            if stop_at_bad_row and err.stops_a_strict_run:
                break
    return outcomes


def load_examples(data_cfg, stage: str, tok, which: str, log: Callable = print, progress: bool = True):
    """Tokenized examples of the config's train or eval split ("train" / "eval"), with bad rows handled per
    data_cfg.on_bad_row. Every process loads the same list (the loader then takes each process's slice).

    Tokenizes with data_cfg.num_proc processes, and reads / writes the tokenized-example cache in
    data_cfg.cache_dir (see data/cache.py). On a miss every process tokenizes; process 0 writes the entry.
    progress=False (train.progress): no progress bars, the datasets library's included."""
    with _datasets_bars(progress):
        return _load_examples(data_cfg, stage, tok, which, log, progress)


@contextlib.contextmanager
def _datasets_bars(shown: bool):
    """The datasets library's own progress bars (reading files, "Generating train split") off while not `shown`."""
    import datasets

    hide = not shown and not datasets.are_progress_bars_disabled()
    if hide:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hide:
            datasets.enable_progress_bars()


def _load_examples(data_cfg, stage, tok, which, log, progress):
    from zephyr_jax.data import cache
    from zephyr_jax.data.sources import load_rows, local_files, source_name

    source, split = data_cfg.get(which), data_cfg.get(f"{which}_split")
    name = source_name(source, split)
    limit = data_cfg.get(f"max_{which}_examples", -1)
    limit = -1 if limit is None or limit < 0 else limit
    # Local files are keyed by their paths, sizes and mtimes, so their rows are read only when the cache misses:
    # a hit read and type-checked every row of them anyway (10 s of the 18 s of a hit on 40k UltraChat-like rows).
    local = cache.cache_dir(data_cfg.get("cache_dir")) and local_files(source, split) is not None
    rows = None if local else load_rows(source, split, data_dir=data_cfg.get("data_dir"))
    args = example_args(data_cfg, stage)
    path, parts = _cache_entry(data_cfg, stage, tok, which, rows, limit, args, log)
    cached = cache.read(path, parts, log) if path else None
    if cached is not None:
        examples, counter = cached
        log(f"tokenized examples of {name} from cache {path}")
        log(counter.summary())
    else:
        if rows is None:
            rows = load_rows(source, split, data_dir=data_cfg.get("data_dir"))
        if 0 <= limit < len(rows):
            rows = rows.select(range(limit)) if hasattr(rows, "select") else rows[:limit]
        examples, counter = process_rows(rows, example_maker(stage, tok, args, name), on_bad_row=data_cfg.on_bad_row,
                                         source=name, progress=progress, log=log, num_proc=data_cfg.get("num_proc", 0))
    if not examples:
        raise ValueError(f"no usable examples in {name} ({counter.summary()})")
    log_truncated(examples, args, name, log)
    if path and cached is None and cache.process_index() == 0 and cache.write(path, examples, counter, parts, log):
        log(f"tokenized examples of {name} cached to {path}")
    return examples, counter


def log_truncated(examples, args: dict, name: str, log: Callable = print) -> None:
    """Says how many examples were cut to fit (data.too_long="truncate", and over-long DPO pairs): they train
    on part of their row."""
    cut = sum(bool(e.truncated) for e in examples)
    if cut:
        how = ("the prompt from the left to max_prompt_length={max_prompt_length}, then the completions to "
               "max_length - max_prompt_length" if "max_prompt_length" in args else "from the right").format(**args)
        log(f"{cut} of {len(examples)} examples of {name} were longer than max_length={args['max_length']} and "
            f"were cut ({how})")


def _cache_entry(data_cfg, stage, tok, which, rows, limit, args, log):
    """(path, key parts) of the split's cache entry; (None, None) when caching is off or impossible."""
    from zephyr_jax.data import cache

    directory = cache.cache_dir(data_cfg.get("cache_dir"))
    if not directory:
        return None, None
    from zephyr_jax.data.sources import source_name

    source, split = data_cfg.get(which), data_cfg.get(f"{which}_split")
    parts = cache.key_parts(stage=stage, source=source, split=split, data_dir=data_cfg.get("data_dir"), limit=limit,
                            rows=rows, tok=tok, args=args, on_bad_row=data_cfg.on_bad_row)
    if parts is None:
        log(f"not caching the tokenized examples of {source_name(source, split)}: its rows cannot be fingerprinted")
        return None, None
    return cache.entry_path(directory, parts), parts


def example_args(data_cfg, stage: str) -> dict:
    """The arguments of sft_example / preference_example (they are also part of the cache key)."""
    if stage == "sft":
        return dict(loss_on=data_cfg.loss_on, max_length=data_cfg.max_length, too_long=data_cfg.too_long)
    return dict(max_length=data_cfg.max_length, max_prompt_length=data_cfg.max_prompt_length)


def example_maker(stage: str, tok, args: dict, source: str) -> Callable:
    """make_example(row, index) for the stage; a partial of a module-level function, so it pickles to workers."""
    from zephyr_jax.data.preference import preference_example
    from zephyr_jax.data.sft import sft_example

    return functools.partial(sft_example if stage == "sft" else preference_example, tok=tok, source=source, **args)
