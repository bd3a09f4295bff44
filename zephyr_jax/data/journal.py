"""Crash-safe, resumable outputs: an append-only JSONL of finished work items, keyed, with the run's settings
beside it.

Each finished call (a completion, a rating, a dialogue turn) is one line `{"key": [...], "value": {...}}`,
written and flushed as soon as it is known, so a killed run (kill -9, preemption, a lost node) keeps everything
it paid for. Flushed lines survive the process; only a power loss can take the last ones, which a rerun makes
again. A rerun with the same settings reads the journal, skips the keys it holds, and does only the
rest; the final output is assembled from the journal in input order, so it equals an uninterrupted run's.

The last line of a killed run may be cut off mid-write: it is dropped (and the file cut back to the last whole
line), and that item is done again. A run whose settings differ from those on disk is refused, naming the
settings that differ, unless `overwrite` is given, which starts afresh. One run at a time: a second process
opening the same journal is refused (an flock on PATH.lock, released when the holder ends, kill -9 included).
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from pathlib import Path

from tqdm.auto import tqdm

PROGRESS_DELAY = 2.0  # seconds: a resume's read that lasts longer shows a bar (UltraFeedback's journal: 12 s+)


class SettingsMismatch(ValueError):
    pass


class JournalInUse(ValueError):  # the CLIs print ValueErrors as one line
    pass


def _normal(settings: dict) -> dict:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


class Journal:
    def __init__(self, path: str | os.PathLike, settings: dict, *, overwrite: bool = False):
        self.path = Path(path)
        self.settings_path = self.path.with_name(self.path.name + ".settings.json")
        self._lock = threading.Lock()
        self._hold(self.path.with_name(self.path.name + ".lock"))
        try:
            self._open(_normal(settings), overwrite)
        except BaseException:
            self._holder.close()
            raise

    def _hold(self, lock_path: Path) -> None:
        """One run per journal: two appending to it would each miss the other's work. The lock goes with the
        process (kill -9 included)."""
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        self._holder = open(lock_path, "w")
        try:
            fcntl.flock(self._holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._holder.close()
            raise JournalInUse(f"{self.path} is in use by another run ({lock_path} is locked): one run per output "
                               "directory at a time") from None

    def _open(self, settings: dict, overwrite: bool) -> None:
        if overwrite:
            self.path.unlink(missing_ok=True)
            self.settings_path.unlink(missing_ok=True)
        if self.settings_path.exists():
            with open(self.settings_path, encoding="utf-8") as f:
                old = json.load(f)
            diff = sorted(k for k in old if old[k] != settings.get(k))
            if diff:
                changes = "; ".join(f"{k}: {old.get(k)!r} on disk, {settings.get(k)!r} now" for k in diff)
                raise SettingsMismatch(f"{self.path} was made with other settings ({changes}); rerun with the "
                                       f"same settings to resume, or pass --overwrite to start afresh")
            # A setting the journal predates (added to a CLI later) is not held against it, and is written down
            # now, so the runs that resume this one keep to its value.
            if settings.keys() - old.keys():
                self._write_settings({**settings, **old})
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._write_settings(settings)
        self.done: dict[tuple, dict] = {}
        self.resumed = self._read()
        self._file = open(self.path, "ab")

    def _write_settings(self, settings: dict) -> None:
        tmp = self.settings_path.with_name(self.settings_path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=1, sort_keys=True)
        os.replace(tmp, self.settings_path)  # whole or not at all

    def _read(self) -> int:
        """Loads the finished items; cuts off a partial last line. Returns how many items were read."""
        if not self.path.exists():
            return 0
        whole = 0  # bytes up to the end of the last whole line
        # Line by line, not read whole and split: that held the file twice over beside its items (feedback on 16k
        # prompts, a 372 MB journal, peaked at 1.44 GB, now 0.71 GB; UltraFeedback has 64k). A binary file's lines
        # end at b"\n" only: str.splitlines also splits at U+2028/U+2029/U+0085, which json.dumps with
        # ensure_ascii=False leaves unescaped inside a reply's text.
        with open(self.path, "rb") as f, tqdm(total=self.path.stat().st_size, desc=f"reading {self.path.name}",
                                              unit="B", unit_scale=True, delay=PROGRESS_DELAY, leave=False) as bar:
            for n, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):  # a last line cut off mid-write
                    break
                whole += len(raw)
                self._read_line(raw, n)
                if n % 1024 == 0:
                    bar.update(whole - bar.n)
        if whole < self.path.stat().st_size:
            with open(self.path, "r+b") as f:
                f.truncate(whole)
        return len(self.done)

    def _read_line(self, raw: bytes, n: int) -> None:
        """Loads line n (from 1) of the journal; blank lines are skipped."""
        if raw.strip():
            try:
                item = json.loads(raw.decode("utf-8"))  # UnicodeDecodeError is a ValueError
                key, value = tuple(item["key"]), item["value"]
                hash(key)  # a key holding a list or an object
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{self.path}:{n}: not a journal line ({e}); the file was edited or damaged, "
                                 f"rerun with --overwrite to start afresh") from e
            self.done.setdefault(key, value)

    def __contains__(self, key) -> bool:
        return tuple(key) in self.done

    def get(self, key, default=None):
        return self.done.get(tuple(key), default)

    def append(self, key, value: dict) -> None:
        key = tuple(key)
        # Encoded before the key counts as done: text UTF-8 cannot write (a lone surrogate) fails here.
        line = (json.dumps({"key": list(key), "value": value}, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            if key in self.done:
                return
            self.done[key] = value
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        self._file.close()
        self._holder.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
