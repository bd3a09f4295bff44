"""Parallel tokenization (same examples, skips and errors as in one process) and the tokenized-example cache."""

import json
import operator
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest

from zephyr_jax.config_common import base
from zephyr_jax.data import BadRow, cache, pipeline, sources
from zephyr_jax.tokenizer import load_tokenizer

USER, REPLY = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
# (position, row): bad rows among the good ones, with two reasons that tie in count (the summary's order).
BAD_SFT = [(3, {"prompt": "x", "messages": [USER]}),  # no assistant turn
           (10, {"prompt": "x", "messages": [USER, {"role": "assistant", "content": " "}]}),  # empty content
           (20, {"prompt": "x", "messages": [{"role": "user", "content": "Hey"}]}),
           (30, {"prompt": "x"})]  # missing key: jsonl gives messages=None
BAD_PREFS = [(2, {"prompt": "x", "chosen": [USER, REPLY], "rejected": [USER, REPLY]}),  # chosen == rejected
             (7, {"prompt": "x", "chosen": [USER, REPLY], "rejected": [USER]}),  # rejected has no reply
             (9, {"prompt": "x", "chosen": [USER, REPLY], "rejected": [USER, REPLY]})]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


def _write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def bad_data(data_dir, tmp_path):
    """sft/train_sft.jsonl and prefs/train_prefs.jsonl: the toy rows with bad rows inserted."""
    for kind, bad in (("sft", BAD_SFT), ("prefs", BAD_PREFS)):
        rows = [json.loads(line) for line in open(data_dir / kind / f"train_{kind}.jsonl")]
        if kind == "prefs":
            rows = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
        for at, row in bad:
            rows.insert(at, row)
        _write(tmp_path / kind / f"train_{kind}.jsonl", rows)
    return tmp_path


def _cfg(root, stage, **kw):
    kind = "sft" if stage == "sft" else "prefs"
    cfg = dict(train=str(root / kind), train_split=f"train_{kind}", data_dir=None, on_bad_row="skip",
               max_train_examples=-1, loss_on="assistant", max_length=64, too_long="truncate", max_prompt_length=32,
               num_proc=1, cache_dir="")
    cfg.update(kw)
    return ml_collections.ConfigDict(cfg)


def _load(cfg, stage, tok):
    lines = []
    examples, counter = pipeline.load_examples(cfg, stage, tok, "train", log=lines.append)
    return examples, counter, lines


def _assert_same(a, b):
    assert len(a) == len(b) and type(a[0]) is type(b[0])
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if isinstance(u, np.ndarray):
                assert u.dtype == v.dtype and np.array_equal(u, v)
            else:
                assert u == v and type(u) is type(v)


@pytest.fixture
def parallel_spy(monkeypatch):
    """Lets two processes take the toy splits, and records that the parallel path ran."""
    monkeypatch.setattr(pipeline, "MIN_ROWS_PER_PROCESS", 1)
    calls, real = [], pipeline._outcomes_parallel
    monkeypatch.setattr(pipeline, "_outcomes_parallel", lambda *a: (calls.append(a[2]), real(*a))[1])
    return calls


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_parallel_equals_in_process(bad_data, tok, stage, parallel_spy):
    here, here_counter, here_log = _load(_cfg(bad_data, stage), stage, tok)
    assert not parallel_spy
    there, there_counter, there_log = _load(_cfg(bad_data, stage, num_proc=2), stage, tok)
    assert parallel_spy == [2]
    _assert_same(here, there)
    assert here_counter.as_dict() == there_counter.as_dict() and here_log == there_log
    bad = BAD_SFT if stage == "sft" else BAD_PREFS
    assert here_counter.total == len(bad) and here_counter.kept == 64
    if stage == "sft":
        assert here_log[0].splitlines()[1:] == [
            "  2 x no assistant turn", "  1 x empty content in messages[*]",
            "  1 x messages is missing (null: a row without the key, where other rows have it), not a non-empty list "
            "of {role, content} turns"]


def test_parallel_raise_names_the_same_first_bad_row(bad_data, tok, parallel_spy):
    errors = []
    for num_proc in (1, 2):
        with pytest.raises(BadRow) as err:
            _load(_cfg(bad_data, "sft", on_bad_row="raise", num_proc=num_proc), "sft", tok)
        errors.append(str(err.value))
    assert parallel_spy == [2]
    assert errors[0] == errors[1] == f"row 4 of {bad_data / 'sft'}:train_sft: no assistant turn"
    # A file given with no split is named as itself.
    with pytest.raises(BadRow, match=rf"^row 4 of {bad_data / 'sft' / 'train_sft.jsonl'}: no assistant turn$"):
        _load(_cfg(bad_data, "sft", train=str(bad_data / "sft" / "train_sft.jsonl"), train_split=None,
                   on_bad_row="raise"), "sft", tok)


def test_worker_count():
    assert pipeline.worker_count(1, 10**6) == 1 and pipeline.worker_count(4, None) == 1
    assert pipeline.worker_count(4, 3 * pipeline.MIN_ROWS_PER_PROCESS) == 3  # enough rows for 3 workers only
    assert 1 <= pipeline.worker_count(0, 10**7) <= pipeline.MAX_AUTO_PROCESSES
    # one worker per CPU this process may run on, up to MAX_AUTO_PROCESSES
    assert pipeline.worker_count(0, 10**7) == min(pipeline.MAX_AUTO_PROCESSES, len(os.sched_getaffinity(0)))
    assert base("sft").data.num_proc == 0 and base("sft").data.cache_dir is None


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_second_call_reads_the_cache(bad_data, tok, stage, tmp_path, monkeypatch):
    cfg = _cfg(bad_data, stage, cache_dir=str(tmp_path / "cache"))
    first, first_counter, log = _load(cfg, stage, tok)
    assert log[-1].startswith(f"tokenized examples of {cfg.train}:{cfg.train_split} cached to {tmp_path}/cache/")
    assert [f for f in os.listdir(tmp_path / "cache")] == [os.path.basename(log[-1].split(" cached to ")[1])]

    monkeypatch.setattr(pipeline, "process_rows", lambda *a, **k: pytest.fail("tokenized again"))
    # Nor read again: local files are keyed by their stat (a hit type-checked every row: 10 s of 18 s on 40k rows)
    monkeypatch.setattr(sources, "load_rows", lambda *a, **k: pytest.fail("rows read again"))
    again, counter, log = _load(cfg, stage, tok)
    _assert_same(first, again)
    assert counter.as_dict() == first_counter.as_dict() and log[1] == first_counter.summary()
    assert log[0].startswith(f"tokenized examples of {cfg.train}:{cfg.train_split} from cache {tmp_path}/cache/")


def _entries(directory):
    return sorted(f for f in os.listdir(directory) if f.endswith(".npz"))


def test_cache_misses_when_anything_that_changes_the_examples_changes(bad_data, tok, tmp_path, monkeypatch):
    cfg = _cfg(bad_data, "sft", cache_dir=str(tmp_path / "cache"), loss_on="all")
    examples, _, _ = _load(cfg, "sft", tok)
    cfg.max_length = 16
    shorter, _, log = _load(cfg, "sft", tok)
    assert "cached to" in log[-1] and len(_entries(cfg.cache_dir)) == 2
    assert max(len(e.ids) for e in shorter) == 16 < max(len(e.ids) for e in examples)

    with open(bad_data / "sft" / "train_sft.jsonl", "a") as f:  # an edited data file
        f.write(json.dumps({"prompt": "y", "messages": [USER, REPLY]}) + "\n")
    edited, counter, log = _load(cfg, "sft", tok)
    assert "cached to" in log[-1] and len(edited) == len(shorter) + 1 and counter.kept == 65
    # The entry of the old file for the same settings can never be read again: replaced, not kept beside it
    # (the other max_length's entry stays).
    assert any("removed the superseded tokenized-example cache" in line for line in log)
    assert len(_entries(cfg.cache_dir)) == 2
    monkeypatch.setattr(cache, "code_hash", lambda: "another checkout's code")
    _load(cfg, "sft", tok)  # another checkout (or library version) may still read its entries: they stay
    assert len(_entries(cfg.cache_dir)) == 3

    other = pickle.loads(pickle.dumps(tok))
    other.chat_template = other.chat_template.replace("<|user|>", "<|human|>")
    parts = lambda t: cache.key_parts(stage="sft", source=cfg.train, split=cfg.train_split, data_dir=None, limit=-1,
                                      rows=[], tok=t, args=pipeline.example_args(cfg, "sft"), on_bad_row="skip")
    assert cache.entry_path("d", parts(tok)) == cache.entry_path("d", parts(load_tokenizer()))  # no temp paths
    assert cache.entry_path("d", parts(tok)) != cache.entry_path("d", parts(other))
    # Another end-of-turn token (the template writes eos_token after each turn) with the same backend definition.
    other = pickle.loads(pickle.dumps(tok))
    other.eos_token = "<unk>"
    from zephyr_jax.data import sft_example

    ids = lambda t: sft_example({"messages": [USER, REPLY]}, 0, t, loss_on="all", max_length=64).ids.tolist()
    assert ids(tok) != ids(other) and cache.entry_path("d", parts(tok)) != cache.entry_path("d", parts(other))
    cfg.max_train_examples = 10
    _, counter, log = _load(cfg, "sft", tok)
    assert "cached to" in log[-1] and counter.seen == 10


def test_corrupt_or_foreign_cache_file_is_rebuilt_with_a_warning(bad_data, tok, tmp_path):
    cfg = _cfg(bad_data, "dpo", cache_dir=str(tmp_path / "cache"))
    examples, _, log = _load(cfg, "dpo", tok)
    path = log[-1].split(" cached to ")[1]
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])  # a truncated file (as a crash without os.replace would leave)
    rebuilt, _, log = _load(cfg, "dpo", tok)
    assert log[0].startswith(f"warning: ignoring the unreadable tokenized-example cache {path}")
    assert log[-1].endswith(f"cached to {path}")
    _assert_same(examples, rebuilt)
    assert "from cache" in _load(cfg, "dpo", tok)[2][0]  # rewritten whole

    cfg.max_length = 48  # another key's entry copied onto this key's path
    other = _load(cfg, "dpo", tok)[2][-1].split(" cached to ")[1]
    shutil.copyfile(path, other)
    _, _, log = _load(cfg, "dpo", tok)
    assert log[0] == f"warning: ignoring the tokenized-example cache {other}: it was written for another key"


def test_failed_write_leaves_nothing_behind(bad_data, tok, tmp_path, monkeypatch):
    def savez(f, **arrays):
        f.write(b"PK partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.np, "savez", savez)
    cfg = _cfg(bad_data, "sft", cache_dir=str(tmp_path / "cache"))
    examples, _, log = _load(cfg, "sft", tok)
    assert len(examples) == 64 and "could not write" in log[-1] and os.listdir(tmp_path / "cache") == []

    def interrupted(f, **arrays):  # Ctrl-C in the middle of a write
        f.write(b"PK partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(cache.np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _load(cfg, "sft", tok)
    assert os.listdir(tmp_path / "cache") == []


def test_cache_dir_setting_env_and_off(bad_data, tok, tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV_VAR, str(tmp_path / "env"))
    _, _, log = _load(_cfg(bad_data, "sft", cache_dir=None), "sft", tok)
    assert f"cached to {tmp_path}/env/" in log[-1]
    _, _, log = _load(_cfg(bad_data, "sft", cache_dir=""), "sft", tok)  # "" turns it off
    assert log == [log[0]] and not log[0].startswith("tokenized") and len(_entries(tmp_path / "env")) == 1
    monkeypatch.delenv(cache.ENV_VAR)
    assert cache.cache_dir(None) == os.path.expanduser("~/.cache/zephyr_jax/tokenized")


def test_only_process_zero_writes(bad_data, tok, tmp_path, monkeypatch):
    monkeypatch.setattr(cache, "process_index", lambda: 1)
    cfg = _cfg(bad_data, "sft", cache_dir=str(tmp_path / "cache"))
    examples, _, log = _load(cfg, "sft", tok)
    assert len(examples) == 64 and not os.path.exists(tmp_path / "cache") and len(log) == 1


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_examples_cut_to_max_length_are_counted_fresh_and_from_the_cache(bad_data, tok, stage, tmp_path):
    length = 24 if stage == "dpo" else 32
    cfg = _cfg(bad_data, stage, cache_dir=str(tmp_path / "cache"), max_length=length, max_prompt_length=8,
               loss_on="all")
    for _ in range(2):  # tokenized, then read from the cache
        examples, _, log = _load(cfg, stage, tok)
        cut = sum(e.truncated for e in examples)
        assert cut > 0
        said = [line for line in log if f"were longer than max_length={length}" in line]
        assert said and said[0].startswith(f"{cut} of {len(examples)} examples of {cfg.train}:{cfg.train_split}")


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(bad_data, tok, tmp_path):
    """kill -9 during a write skips its clean-up: a whole entry's size (~1.3 GiB for UltraChat) left for good."""
    folder = tmp_path / "cache"
    cfg = _cfg(bad_data, "sft", cache_dir=str(folder))
    _load(cfg, "sft", tok)
    [entry] = os.listdir(folder)
    (folder / f"{entry}.k1ll3d.tmp").write_bytes(b"half an entry")
    os.remove(folder / entry)
    _load(cfg, "sft", tok)
    assert os.listdir(folder) == [entry]


def _stat(pid) -> list:
    """/proc/PID/stat's fields after the command's parenthesis: [state, ppid, ...]; [] once it is gone."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return []


def _children(pid: int) -> set:
    return {int(p) for p in filter(str.isdigit, os.listdir("/proc")) if _stat(p)[1:2] == [str(pid)]}


def _alive(pid: int) -> bool:
    return _stat(pid)[:1] not in ([], ["Z"])  # a zombie has ended (an init that does not reap keeps it)


def test_tokenizer_workers_end_with_a_killed_parent():
    """A worker waits on a queue whose write end it holds itself: after its parent's kill -9 (the OOM killer) it
    slept for good, holding its memory (~420 MB each, eight of them with num_proc=0)."""
    code = ("import operator, time; from zephyr_jax.data import pipeline; pipeline.MIN_ROWS_PER_PROCESS = 1; "
            "pipeline.process_rows([time.sleep] * 100, operator.call, num_proc=2, progress=False)")  # sleep(index)
    parent = subprocess.Popen([sys.executable, "-c", code])
    workers, deadline = set(), time.monotonic() + 120
    while len(workers) < 2 and time.monotonic() < deadline and parent.poll() is None:
        time.sleep(0.5)
        workers = _children(parent.pid)  # the two workers, and multiprocessing's resource tracker
    assert len(workers) >= 2, "the workers did not start"
    time.sleep(3)  # the workers started and took their rows
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(map(_alive, workers)):
        time.sleep(0.5)
    left = [p for p in workers if _alive(p)]
    for p in left:
        os.kill(p, signal.SIGKILL)
    assert not left, f"worker processes {left} outlived their parent"


def _sigint_handler_here(row, index):  # (run in a worker process)
    return signal.getsignal(signal.SIGINT)


def test_tokenizer_workers_leave_ctrl_c_to_their_parent(parallel_spy):
    """Ctrl-C reaches the whole foreground process group: the workers ignore it (the parent stops, train saving
    its state, and ends them), so no worker prints a KeyboardInterrupt traceback of its own."""
    handlers, _ = pipeline.process_rows(list(range(4)), _sigint_handler_here, progress=False, log=lambda s: None,
                                        num_proc=2)
    assert parallel_spy == [2] and handlers == [signal.SIG_IGN] * 4


def test_parallel_rows_that_leave_the_last_chunk_short(parallel_spy):
    """37 rows in two workers' chunks of 2: the last chunk holds one row. Every row comes back once, in order,
    with its own index, as in this process (operator.add: the row plus the index it was given)."""
    rows = [10 * i for i in range(37)]
    here, _ = pipeline.process_rows(rows, operator.add, progress=False, log=lambda s: None, num_proc=1)
    there, _ = pipeline.process_rows(rows, operator.add, progress=False, log=lambda s: None, num_proc=2)
    assert parallel_spy == [2]
    assert there == here and len(here) == len(rows)


def test_a_data_file_edited_to_the_same_size_is_tokenized_again(bad_data, tok, tmp_path):
    """The key holds each local file's size and its mtime: an edit that keeps the size (a reply's digit changed)
    read back the old file's examples. Against the edited file's examples tokenized without a cache."""
    cfg = _cfg(bad_data, "sft", cache_dir=str(tmp_path / "cache"))
    _load(cfg, "sft", tok)
    path = bad_data / "sft" / "train_sft.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    row = json.loads(lines[0])
    reply = row["messages"][-1]
    reply["content"] = reply["content"].translate(str.maketrans("0123456789", "1234567890"))
    edited = json.dumps(row) + "\n"
    assert edited != lines[0] and len(edited) == len(lines[0])
    before = os.stat(path)
    path.write_text(edited + "".join(lines[1:]))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10 ** 9))  # saved a second later
    assert os.path.getsize(path) == before.st_size
    fresh, _, _ = _load(_cfg(bad_data, "sft"), "sft", tok)
    again, _, log = _load(cfg, "sft", tok)
    assert not log[0].startswith("tokenized examples of") and "cached to" in log[-1]
    _assert_same(again, fresh)


def test_a_strict_run_is_not_served_a_skipping_runs_entry(bad_data, tok, tmp_path):
    """on_bad_row is part of the key: a run with on_bad_row="raise" stops at the first bad row, as it does
    without a cache, even after a run that skipped the bad rows cached its examples."""
    cfg = _cfg(bad_data, "sft", cache_dir=str(tmp_path / "cache"))
    _load(cfg, "sft", tok)
    strict = _cfg(bad_data, "sft", on_bad_row="raise")
    with pytest.raises(BadRow) as uncached:
        _load(strict, "sft", tok)
    strict.cache_dir = cfg.cache_dir
    with pytest.raises(BadRow) as cached:
        _load(strict, "sft", tok)
    assert str(cached.value) == str(uncached.value)


@pytest.mark.parametrize("too_long", ["drop", "truncate"])
def test_too_long_reaches_the_loaded_examples_and_their_cache_key(bad_data, tok, tmp_path, too_long):
    """data.too_long decides what load_examples makes of a row over max_length ("drop": skipped, "truncate": cut),
    fresh and from the cache, with an entry of the other setting beside it: against sft_example on each row."""
    from zephyr_jax.data import sft_example
    from zephyr_jax.data.sources import load_rows

    path = bad_data / "sft" / "train_sft.jsonl"
    long = {"prompt": "x", "messages": [{"role": "user", "content": "word " * 80}, REPLY]}
    path.write_text(path.read_text() + json.dumps(long) + "\n")  # one row over max_length=64
    rows = load_rows(str(bad_data / "sft"), "train_sft")
    expected = []
    for index, row in enumerate(rows):
        try:
            expected.append(sft_example(row, index, tok, loss_on="all", max_length=64, too_long=too_long))
        except BadRow:
            pass
    other = "truncate" if too_long == "drop" else "drop"
    _load(_cfg(bad_data, "sft", cache_dir=str(tmp_path / "cache"), loss_on="all", too_long=other), "sft", tok)
    for _ in range(2):  # tokenized, then read from the cache
        examples, _, _ = _load(_cfg(bad_data, "sft", cache_dir=str(tmp_path / "cache"), loss_on="all",
                                    too_long=too_long), "sft", tok)
        _assert_same(examples, expected)


def test_every_module_the_example_builders_call_is_in_the_cache_key():
    """Editing a module whose functions turn rows into examples must invalidate every entry: each zephyr_jax
    module that the builders' modules take functions or classes from is one whose code the key hashes."""
    import importlib

    builders = ("zephyr_jax.data.sft", "zephyr_jax.data.preference", "zephyr_jax.data.conversation")
    used = {getattr(value, "__module__", None) for name in builders
            for value in vars(importlib.import_module(name)).values() if callable(value)}
    used = {m for m in used if m and m.startswith("zephyr_jax")}
    assert {"zephyr_jax.tokenizer", "zephyr_jax.data.errors"} <= used and used <= set(cache.CODE)


def test_the_eval_split_is_read_with_its_own_source_split_and_limit(bad_data, tok, tmp_path):
    """which="eval" takes data.eval, eval_split and max_eval_examples (not the train split's, nor its limit),
    against sft_example on the eval file's first rows."""
    from zephyr_jax.data import sft_example

    rows = [{"messages": [{"role": "user", "content": f"eval question {i}"}, REPLY]} for i in range(6)]
    _write(bad_data / "sft" / "test_sft.jsonl", rows)
    expected = [sft_example(row, i, tok, loss_on="assistant", max_length=64, too_long="truncate")
                for i, row in enumerate(rows[:4])]
    cfg = _cfg(bad_data, "sft", eval=str(bad_data / "sft"), eval_split="test_sft", max_eval_examples=4,
               max_train_examples=2)
    _assert_same(pipeline.load_examples(cfg, "sft", tok, "eval", log=lambda *_: None)[0], expected)


def test_skip_counts_read_back_from_an_entry_in_the_order_they_were_met():
    """An entry's skip counts keep their reasons in the order rows met them: the summary breaks ties by that
    order, so a run that reads the cache prints the summary the tokenizing run printed (not an alphabetical one)."""
    from zephyr_jax.data.errors import SkipCounter

    counter = SkipCounter("src")
    counter.keep(5)
    for reason in ("zeta", "alpha", "zeta", "alpha", "mu"):
        counter.skip(reason)
    back = cache._counter_from(json.loads(json.dumps(cache._counter_state(counter))))
    assert back.summary() == counter.summary() and back.as_dict() == counter.as_dict()
