"""Bad input rows: one error type that names the row, and a counter for rows skipped on purpose.

Every stage of the data pipeline raises `BadRow(index, reason, source)` for a row it cannot use. The caller
decides, through `on_bad_row`, whether that stops the run ("raise") or is counted and skipped ("skip"); a row left
out by a setting (`DroppedRow`) is counted either way. Skipped rows are never lost silently:
`SkipCounter.summary()` reports them by reason.
"""

from __future__ import annotations

import re
from collections import Counter

ON_BAD_ROW = ("raise", "skip")


class BadRow(ValueError):
    """A row that cannot be used. `reason` is a short stable string ("missing key 'messages' (the row's keys:
    'text')", "empty content in messages[3]"), `index` the row's position in `source` (a "name:split" or a file
    path), from 0; the message counts rows from 1, as a file's lines are counted (index 0 is "row 1")."""

    stops_a_strict_run = True  # on_bad_row="raise" stops at it

    def __init__(self, index: int | None, reason: str, source: str | None = None):
        self.index, self.reason, self.source = index, reason, source
        where = "row" if index is None else f"row {index + 1}"
        if source:
            where += f" of {source}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # keeps the fields across pickling (multiprocessing data workers)
        return type(self), (self.index, self.reason, self.source)


class DroppedRow(BadRow):
    """A usable row left out on purpose (data.too_long="drop"): counted, never raised, whatever on_bad_row says
    (on_bad_row="raise" is strictness about malformed rows, not a reason to stop at the first long one)."""

    stops_a_strict_run = False


def missing_key(row, key: str) -> str:
    """The reason for a row without `key`, with the keys it has: a file of another schema (ShareGPT's
    conversations, a question / good / bad pair) is recognised from the skip count, not from the code."""
    if not isinstance(row, dict):
        return f"missing key {key!r} (the row is a {type(row).__name__}, not a dict)"
    keys = sorted(map(str, row))
    if not keys:
        return f"missing key {key!r} (the row has no keys)"
    shown = ", ".join(map(repr, keys[:8])) + (", ..." if len(keys) > 8 else "")
    return f"missing key {key!r} (the row's keys: {shown})"


def reason_kind(reason: str) -> str:
    """The reason with list positions blanked ("messages[3]" -> "messages[*]"), so skips group by kind."""
    return re.sub(r"\[\d+\]", "[*]", reason)


class SkipCounter:
    """Counts kept and skipped rows; skips are grouped by `reason_kind(reason)`."""

    def __init__(self, source: str | None = None):
        self.source = source
        self.skipped: Counter[str] = Counter()
        self.kept = 0

    def keep(self, n: int = 1) -> None:
        self.kept += n

    def skip(self, reason: str) -> None:
        self.skipped[reason_kind(reason)] += 1

    @property
    def total(self) -> int:
        """Rows skipped."""
        return sum(self.skipped.values())

    @property
    def seen(self) -> int:
        return self.kept + self.total

    def as_dict(self) -> dict:
        return {"kept": self.kept, "skipped": self.total, "reasons": dict(self.skipped.most_common())}

    def summary(self) -> str:
        """E.g. "skipped 3 of 1000 rows of X:\\n  2 x empty content in messages[*]\\n  1 x chosen == rejected"."""
        of = f" of {self.source}" if self.source else ""
        head = f"skipped {self.total} of {self.seen} rows{of}"
        if not self.total:
            return head
        return head + ":\n" + "\n".join(f"  {n} x {reason}" for reason, n in self.skipped.most_common())

    def __repr__(self) -> str:
        return f"SkipCounter({self.as_dict()})"


def check_on_bad_row(on_bad_row: str) -> None:
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row={on_bad_row!r}; expected one of {ON_BAD_ROW}")


def handle_bad_row(err: BadRow, on_bad_row: str, counter: SkipCounter | None) -> None:
    """"raise": re-raises `err`; "skip": counts it in `counter` and returns. A DroppedRow is always counted."""
    check_on_bad_row(on_bad_row)
    if on_bad_row == "raise" and err.stops_a_strict_run:
        raise err
    if counter is not None:
        counter.skip(err.reason)
