"""AI feedback: raw openbmb/UltraFeedback rows -> binarized preference pairs (the ultrafeedback_binarized schema).

One raw row holds an instruction and (up to) 4 completions, each rated by GPT-4 on four aspects (1-5 or "N/A")
and given an overall_score (1-10). `binarize_row` turns it into
    {prompt, prompt_id = sha256(prompt) hex, chosen = [user, assistant], rejected = [user, assistant],
     messages = chosen, score_chosen, score_rejected}.

Rules (the paper's, §4 and the dataset card):
- score: rank_by="mean" (default) = mean of the numeric aspect ratings, missing ones ("N/A", null, an aspect or
  annotations left out) ignored; rank_by="overall" = overall_score (null or "N/A": none). A rating is a number or a
  numeric string. A completion is usable if it has a score and a non-blank response
  (valid UTF-8) free of special-token text ("<s>", "</s>", "<unk>"), which the training loader refuses (a pair
  built on one lost its prompt there though another pair was there to take).
- chosen: the highest score; among equal maxima, the first in list order.
- rejected: drawn uniformly from the other usable completions whose score is strictly below chosen's and whose
  response text differs from chosen's. Completions tied with chosen are never rejected (the paper's intent;
  the script that built HuggingFaceH4/ultrafeedback_binarized drew from all the others, so it could pick a tie,
  and it ranked by overall_score).
- randomness: one `rng.choice` per kept row, in row order; skipped rows draw nothing. So a seed fixes the
  output for a given input order.
- skipped (BadRow, counted by reason; on_bad_row="raise" stops at it): missing/empty instruction or one with
  special-token text, a rating off its scale (aspects 1-5, overall_score 1-10: a corrupt or mis-scaled row), a
  completion that is not a dict, or a rating that cannot be read (a word such as "five", annotations or an aspect
  that is not a dict; the reason names the field): dropping that completion alone could drop the best one and
  choose another.
- dropped (DroppedRow, counted by reason whatever on_bad_row says): a well-formed row that gives no pair, with
  fewer than 2 usable completions (failed generations leave none) or no other response scored strictly below the
  best (e.g. all scores equal).
- drop_sources: rows whose `source` is listed are dropped before binarizing (counted). The later H4 revision
  dropped "truthful_qa" (TruthfulQA contamination of the Open LLM Leaderboard); here it is off unless asked
  (`--drop_truthful_qa`).

CLI:
    python -m zephyr_jax.data.binarize --input=RAW --split=train --output=DIR [--rank_by=mean|overall]
        [--seed=42] [--test_size=2000] [--drop_truthful_qa] [--on_bad_row=skip|raise]
RAW is anything `sources.load_rows` reads (jsonl/parquet file, directory, hub name such as openbmb/UltraFeedback).
DIR receives train_prefs.jsonl and test_prefs.jsonl, so `load_rows(DIR, "train_prefs")` reads them back.
The test rows are those of `random.Random(seed).sample` of the kept rows' prompts (--test_size prompts; a prompt
the input holds twice goes to one split), a generator separate from the rejected draws; both splits keep the
input order.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import reprlib
import sys
from pathlib import Path

from zephyr_jax.data.conversation import SPECIAL_TEXTS, has_special_text
from zephyr_jax.data.errors import (ON_BAD_ROW, BadRow, DroppedRow, SkipCounter, check_on_bad_row, handle_bad_row,
                                    missing_key)

ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
RANK_BY = ("mean", "overall")
TRUTHFUL_QA = "truthful_qa"


def prompt_id(prompt: str) -> str:
    """The schema's prompt_id: the prompt's sha256 in hex (as the published datasets have it)."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def _number(x) -> float | None:
    """A float from a rating (int/float or numeric string; NaN is none, an infinity is off every scale); None for
    anything else."""
    if isinstance(x, bool):
        return None
    if isinstance(x, str):
        try:
            x = float(x.strip())
        except ValueError:
            return None
    if isinstance(x, int):  # clipped first: float(10**400) raises OverflowError (and is off any scale)
        x = float(max(-2 ** 1000, min(x, 2 ** 1000)))
    if isinstance(x, float) and not math.isnan(x):
        return x
    return None


def is_text(x) -> bool:
    """A non-blank str that UTF-8 can encode (JSON may carry lone surrogates, which cannot be written back)."""
    if not isinstance(x, str) or not x.strip():
        return False
    try:
        x.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


SCALES = {"mean": (1.0, 5.0), "overall": (1.0, 10.0)}  # UltraFeedback: aspect ratings 1-5, overall_score 1-10


class OffScale(ValueError):
    """A rating outside its scale: a corrupt or mis-scaled row, which must not decide a pair."""


class UnreadableRating(ValueError):
    """A rating (or the annotations that hold it) that is neither a number nor missing; the message names the field
    within the completion ("annotations.honesty.Rating='five' is not a number")."""


def _is_missing(x) -> bool:
    """UltraFeedback's unrated: "N/A", or null (Arrow fills a field that another row has and this one lacks)."""
    return x is None or isinstance(x, str) and x.strip().upper() == "N/A"


def _rating(x, field: str, rank_by: str) -> float | None:
    """The rating as a float, None if missing; OffScale outside its scale, UnreadableRating for anything else (both
    name the field: one row holds 16 aspect ratings)."""
    if _is_missing(x):
        return None
    number = _number(x)
    if number is None:
        raise UnreadableRating(f"{field}={reprlib.repr(x)} is not a number")
    low, high = SCALES[rank_by]
    if not low <= number <= high:
        raise OffScale(f"{field}={reprlib.repr(x)} is outside {low:g}-{high:g}")
    return number


def _aspect_ratings(annotations) -> list[float | None]:
    if annotations is None:  # null, or left out: unrated
        return []
    if not isinstance(annotations, dict):
        raise UnreadableRating(f"annotations={reprlib.repr(annotations)} is not a dict")
    ratings = []
    for aspect in ASPECTS:
        field = f"annotations.{aspect}"
        value = annotations.get(aspect)
        if value is None:
            continue
        if not isinstance(value, dict):
            raise UnreadableRating(f"{field}={reprlib.repr(value)} is not a dict")
        ratings.append(_rating(value.get("Rating"), f"{field}.Rating", "mean"))
    return ratings


def completion_score(completion, rank_by: str = "mean") -> float | None:
    """The completion's score, or None if it has none (its ratings / overall_score missing, see _is_missing).
    OffScale for a rating outside its scale (SCALES), UnreadableRating for one that is not a number."""
    if not isinstance(completion, dict):
        return None
    if rank_by == "overall":
        ratings = [_rating(completion.get("overall_score"), "overall_score", "overall")]
    else:
        ratings = _aspect_ratings(completion.get("annotations"))
    ratings = [r for r in ratings if r is not None]
    # fsum: the sum correctly rounded, so the same ratings in another order give the same mean (a plain sum of
    # 1.1, 2.2, 3.3, 4.7 and of its reverse differ in the last bit, and the tie was broken)
    return math.fsum(ratings) / len(ratings) if ratings else None


def binarize_row(row, index: int, *, rank_by: str = "mean", rng: random.Random, source: str | None = None) -> dict:
    """One raw UltraFeedback row -> one preference pair; raises BadRow for rows it cannot use."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by={rank_by!r}; expected one of {RANK_BY}")
    if not isinstance(row, dict):
        raise BadRow(index, "row is not a dict", source)
    for key in ("instruction", "completions"):
        if key not in row:
            raise BadRow(index, missing_key(row, key), source)
    prompt = row["instruction"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRow(index, "empty instruction", source)
    if not is_text(prompt):
        raise BadRow(index, "instruction is not valid UTF-8 text", source)
    if has_special_text(prompt):
        raise BadRow(index, f"instruction contains special-token text {SPECIAL_TEXTS}", source)
    completions = row["completions"]
    if not isinstance(completions, (list, tuple)):
        raise BadRow(index, "completions is not a list", source)
    usable = []  # (score, response) in list order
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            raise BadRow(index, f"completions[{i}] is not a dict", source)
        try:
            score = completion_score(c, rank_by)
        except (OffScale, UnreadableRating) as e:
            raise BadRow(index, f"completions[{i}].{e}", source)
        response = c.get("response")
        if score is not None and is_text(response) and not has_special_text(response):
            usable.append((score, response))
    # A well-formed row that gives no pair (failed generations, tied ratings) is counted, not a reason to stop.
    if len(usable) < 2:
        raise DroppedRow(index, "fewer than 2 usable completions", source)
    best = max(score for score, _ in usable)
    chosen = next(c for c in usable if c[0] == best)  # the first of the maxima
    eligible = [c for c in usable if c[0] < best and c[1] != chosen[1]]
    if not eligible:
        raise DroppedRow(index, "no other response scores below the best", source)
    rejected = rng.choice(eligible)

    def pair(response):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]

    return {
        "prompt": prompt,
        "prompt_id": prompt_id(prompt),
        "chosen": pair(chosen[1]),
        "rejected": pair(rejected[1]),
        "messages": pair(chosen[1]),
        "score_chosen": chosen[0],
        "score_rejected": rejected[0],
    }


def binarize(rows, *, rank_by: str = "mean", seed: int = 42, drop_sources=(), on_bad_row: str = "skip",
             counter: SkipCounter | None = None, source: str | None = None, progress: bool = False) -> list[dict]:
    """Binarizes every row in order (see the module docstring); skipped rows are counted in `counter`."""
    check_on_bad_row(on_bad_row)
    rng = random.Random(seed)
    counter = counter if counter is not None else SkipCounter(source)
    if progress:
        from tqdm import tqdm

        rows = tqdm(rows, desc="binarize", unit=" rows")  # tqdm takes len(rows) when there is one
    out = []
    for i, row in enumerate(rows):
        if drop_sources and isinstance(row, dict) and row.get("source") in drop_sources:
            counter.skip(f"source {row['source']!r} dropped")
            continue
        try:
            out.append(binarize_row(row, i, rank_by=rank_by, rng=rng, source=source))
        except BadRow as err:
            handle_bad_row(err, on_bad_row, counter)
            continue
        counter.keep()
    return out


def train_test_split(rows: list, test_size: int, seed: int = 42, key=None) -> tuple[list, list]:
    """(train, test): test is `random.Random(seed).sample` of the row positions; both keep the input order. With
    `key` (a row -> its prompt's id), test_size counts prompts: every row of a sampled prompt goes to test, so a
    prompt that appears twice in the input is never in both splits."""
    keys = list(range(len(rows))) if key is None else [key(r) for r in rows]
    groups = list(dict.fromkeys(keys))  # first-seen order
    if not 0 <= test_size < len(groups):
        raise ValueError(f"test_size={test_size} needs 0 <= test_size < the {len(groups)} kept "
                         f"{'rows' if key is None else 'prompts'}")
    test = set(random.Random(seed).sample(groups, test_size))
    return [r for r, k in zip(rows, keys) if k not in test], [r for r, k in zip(rows, keys) if k in test]


def write_jsonl(rows, path) -> None:
    """rows as JSON Lines at path, replacing the file whole; a write that lasts over journal.PROGRESS_DELAY
    seconds shows a bar (64,000 feedback rows: 15 s)."""
    from tqdm.auto import tqdm

    from zephyr_jax.data import journal

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f, tqdm(rows, desc=f"writing {path.name}", unit=" rows",
                                                     delay=journal.PROGRESS_DELAY, leave=False) as bar:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in bar)
    os.replace(tmp, path)


def write_json(obj, path) -> None:
    """obj as indented JSON at path, replacing the file whole (a kill leaves the old one or the new one)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def output_dir_problem(path) -> str | None:
    """Why `path` cannot be made the directory of a CLI's outputs (it, or a folder above it, is a file), or None:
    os.makedirs found it only once the outputs were written, after the work."""
    if not str(path):  # ("" is the working directory to abspath, and no directory to os.makedirs)
        return "an empty path names no directory"
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    return None if os.path.isdir(existing) else f"{existing} is a file, not a directory"


def check_output_flag(parser, output: str, receives: str) -> None:
    """A data CLI's --output is a directory that can be made (it `receives` its files): parser.error, before any
    work, when it names a file (.jsonl / .json) or cannot be made (output_dir_problem)."""
    if output.endswith((".jsonl", ".json")):
        parser.error(f"--output is a directory (it receives {receives})")
    if (why := output_dir_problem(output)) is not None:
        parser.error(f"--output={output}: {why}")


def write_train_and_test(train: list, test: list, train_path, test_path) -> None:
    """The earlier train file goes first and the new one comes last: a kill between the two replaces leaves no
    train file (a clear error for a reader), never a new train file beside an earlier run's test file, whose rows
    it may hold."""
    Path(train_path).unlink(missing_ok=True)
    write_jsonl(test, test_path)
    write_jsonl(train, train_path)


def write_splits(pairs: list, output_dir, test_size: int, seed: int = 42) -> tuple[list, list]:
    """Splits the pairs by prompt (train_test_split, test_size prompts) into output_dir/train_prefs.jsonl and
    test_prefs.jsonl."""
    train, test = train_test_split(pairs, test_size, seed, key=lambda pair: pair["prompt_id"])
    os.makedirs(output_dir, exist_ok=True)
    write_train_and_test(train, test, os.path.join(output_dir, "train_prefs.jsonl"),
                         os.path.join(output_dir, "test_prefs.jsonl"))
    return train, test


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m zephyr_jax.data.binarize", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="raw UltraFeedback: jsonl/parquet file or dir, or a hub name")
    p.add_argument("--split", default="train", help="split of --input (ignored for a single file)")
    p.add_argument("--output", required=True, help="directory for train_prefs.jsonl and test_prefs.jsonl")
    p.add_argument("--rank_by", choices=RANK_BY, default="mean")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--test_size", type=int, default=2000)
    p.add_argument("--drop_truthful_qa", action="store_true", help="drop rows whose source is truthful_qa")
    p.add_argument("--data_dir", default=None, help="TFDS data dir for --input=tfds:NAME")
    p.add_argument("--on_bad_row", choices=ON_BAD_ROW, default="skip",
                   help="a malformed row: counted and skipped (default), or the run stops at it and writes nothing "
                        "(a well-formed row that gives no pair, all ratings tied, is counted either way)")
    args = p.parse_args(argv)
    check_output_flag(p, args.output, "train_prefs.jsonl and test_prefs.jsonl")
    if args.test_size < 0:
        p.error(f"--test_size={args.test_size} is negative")

    from zephyr_jax.data.sources import load_rows

    name = f"{args.input}:{args.split}"
    counter = SkipCounter(name)
    try:  # a missing file or a malformed one ends with its message (file and line), not a traceback
        rows = load_rows(args.input, args.split, data_dir=args.data_dir)
        kept = binarize(rows, rank_by=args.rank_by, seed=args.seed, counter=counter, source=name, progress=True,
                        drop_sources=(TRUTHFUL_QA,) if args.drop_truthful_qa else (), on_bad_row=args.on_bad_row)
    except (ValueError, OSError) as e:  # OSError: FileNotFoundError, and ConnectionError for a hub name
        sys.exit(f"error: {e}")
    if not kept:
        print(counter.summary())  # why none was kept
        sys.exit(f"error: no row of {name} was kept ({counter.total} of {counter.seen} skipped, by reason above)")
    prompts = len({pair["prompt_id"] for pair in kept})
    if args.test_size >= prompts:
        print(counter.summary())  # why so few were kept
        p.error(f"--test_size={args.test_size} must be below the {prompts} prompts of the {len(kept)} kept rows")
    train, test = write_splits(kept, args.output, args.test_size, args.seed)
    print(counter.summary())
    print(f"kept {len(kept)} rows: {len(train)} train_prefs, {len(test)} test_prefs -> {args.output}")
    return {"train_prefs": len(train), "test_prefs": len(test), **counter.as_dict()}


if __name__ == "__main__":
    main()
