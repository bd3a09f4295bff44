"""UltraFeedback-style AI feedback: K completions per prompt from a pool of generators, rated by a judge, written in
UltraFeedback's raw schema so that `python -m zephyr_jax.data.binarize` turns them into preference pairs.

CLI:
    python -m zephyr_jax.data.feedback --prompts=SOURCE [--split=train] --generators=SPEC [--generators=SPEC ...]
        (--judge=SPEC | --judge_fn=module:function) --output=DIR [--completions_per_prompt=4] [--seed=42]
        [--concurrency=16] [--max_tokens=1024] [--parse_retries=10] [--principles=ultrafeedback] [--limit=N]
        [--timeout=120] [--max_retries=6] [--api_key_env=OPENAI_API_KEY] [--judge_price=IN,OUT]
        [--generator_price=IN,OUT] [--mesh=D,F,T] [--overwrite] [--on_bad_row=skip|raise]
SPEC is a backend spec (zephyr_jax.data.backends): endpoint:MODEL@URL[,URL...], engine:PATH or
callable:module:function. Repeat --generators for a pool (endpoint specs hold commas between their URLs). The
Python API is `collect_feedback(...)` (below); it takes Backend objects. For example:

    # off-policy, as UltraFeedback: open models on a vLLM fleet write, a hosted model judges
    python -m zephyr_jax.data.feedback --prompts=prompts.jsonl --output=aif \
        --generators=endpoint:meta-llama/Llama-3.1-8B-Instruct@http://gpu1:8000/v1,http://gpu2:8000/v1 \
        --generators=endpoint:mistralai/Mistral-7B-Instruct-v0.3@http://gpu3:8000/v1 \
        --judge=endpoint:gpt-4o@https://api.openai.com/v1 --judge_price=2.5,10
    # on-policy: the dSFT model samples 4 replies per prompt in-process, a checker rates them
    python -m zephyr_jax.data.feedback --prompts=prompts.jsonl --output=aif --generators=engine:workdirs/sft \
        --principles=none --judge_fn=mypackage.checks:score
    python -m zephyr_jax.data.binarize --input=aif --split=train --output=prefs

Prompts: any source `sources.load_rows` reads; the prompt is the row's "instruction", else its "prompt", else the
first user turn of its "messages"; "source" (default "custom") picks the principle mix. prompt_id =
sha256(prompt) hex. Rows without a prompt, repeated prompts and prompts with special-token text ("</s>", which
binarize refuses) are skipped and counted.

Completions: for each prompt, K generators are drawn from the pool, without replacement when the pool has K or
more, else with replacement (one generator sampled K times: on-policy data); sample index s = 0..K-1 tells the
completions apart. Each gets a principle (helpfulness, honesty, truthfulness, verbalized_calibration) drawn as
UltraFeedback did for its source (`PRINCIPLE_MIX`), and a system prompt from that principle's pool
(`SYSTEM_PROMPTS`, this project's wording); `principles="none"` sends no system prompt (on-policy sampling
from a model trained without one), a principle name uses that one for all. Sampling: temperature 1, top_p 1,
up to max_tokens, seed from (seed, prompt_id, generator, s). All draws come from (seed, prompt_id), so a rerun,
a resumed run and a run with other prompts around give the same choices for a prompt. Every text the models are
shown, and the parsers of the judge's replies, are in data/feedback_prompts.py.

Judges:
- LLM judge (a Backend): one call per aspect (instruction_following, honesty, truthfulness, helpfulness) rates
  all of a prompt's completions together, shown in a seeded random order, at temperature 0, on this project's
  rubric (`RUBRICS`); plus one critique call per completion (feedback text and an overall score 1-10). Replies
  are parsed per completion with regular expressions (a wordy tail such as "4 (almost there)" is dropped; any
  other number in a rating is an error); a reply that does not follow the format is re-asked (the bad reply
  and what was wrong are shown to the judge) up to parse_retries times, then recorded as a parse failure: the
  ratings stay "N/A" (rationales null; critique and overall_score null), the completion names it in its
  "judge_errors", and stats count it. Never a crash and never a silent drop.
- Programmatic judge (`judge_fn`, "module:function"): fn(row, response) -> a number in [1, 5] used as every
  aspect's Rating, or a dict aspect -> number (aspects left out stay "N/A"). row is the input row, so a checker
  can read its answer column. overall_score = 1 + 9 * (mean rating - 1) / 4, the mean rating mapped linearly
  onto 1-10, so ranking by overall_score and by the mean aspect rating agree, ties included (but for two
  means a few units in the last place apart, which may map to one score). Rationales and the
  critique read "programmatic: module:function". An exception or an invalid value is counted (judge_errors)
  and the completion stays unrated.

Output: DIR/train.jsonl, one row per kept prompt in input order (`load_rows(DIR, "train")` reads it; so does
`python -m zephyr_jax.data.binarize --input=DIR --split=train`):
    {source, prompt_id, instruction, models,
     completions: [{model, principle, custom_system_prompt, response,
                    annotations: {instruction_following: {Rating, Rationale}, honesty: {Rating, Rationale},
                                  truthfulness: {Type, Rationale, Rating, Rationale For Rating},
                                  helpfulness: {Type, Rationale, Rating, Rationale For Rating}},
                    critique, overall_score, fine-grained_score,
                    sample_index, seed, prompt_tokens, completion_tokens, finish_reason, error, judge_errors}],
     correct_answers, incorrect_answers}
Ratings are strings ("1".."5", "N/A") and Type a list of strings (["1", "3"] or ["None"]), as in UltraFeedback;
fine-grained_score is the mean of the numeric aspect ratings. DIR/stats.json holds the counts (of the output and
of this run: calls, re-asks, parse failures, failed calls, tokens, each backend's stats with its retries and
estimated cost).

Failed generations (the backend gave up: see its retries) are kept in the output with response null and the
error, counted, and not judged; binarize skips them (a completion without a response is not usable). So are empty
replies (content null, a tool call only: stats "unusable_generations"), which are journaled. Replies cut off at
max_tokens (finish_reason "length") are judged and counted ("cut_off_generations"). A backend that refuses every
call (401, 404, 429 out of quota, or a server that never answered: data.endpoint.EndpointRefused) stops the
run with its URL and status; what finished is journaled.

Ties are kept in the raw output; binarize decides, as for the published data: it ranks by the mean aspect
rating, chooses the first maximum, never rejects a completion tied with the chosen one, and skips a row whose
usable completions all tie.

Resume: every finished call is a line of DIR/journal.jsonl (`journal.Journal`), keyed ("completion", prompt_id,
generator, sample index), ("rating", prompt_id, aspect) and ("critique", prompt_id, sample index). After a crash
or kill -9, the same command skips the journaled keys and makes only the missing calls; DIR/train.jsonl is then
assembled from the journal in input order and written atomically, equal to an uninterrupted run's. Failed calls
are not journaled, so a rerun tries them again; parse failures are journaled (their calls were paid). A prompt
whose generations did not all succeed has its ratings keyed by the samples they cover as well ("samples 0,1,3"):
a rerun where the same generation fails again reuses them, and one where it succeeds rates all K anew.
The settings that shape the outputs (`_settings`) sit beside the journal; a rerun with other settings is refused
unless --overwrite, which starts afresh. The prompts are not a setting: more prompts (a larger --limit) reuse
what is done.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import hashlib
import math
import numbers
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable

from zephyr_jax.data.backends import (ENGINE_MESH_HELP, Backend, BackendSet, Call, load_callable,
                                      map_bounded)
from zephyr_jax.data.binarize import (ASPECTS, check_output_flag, completion_score, is_text, prompt_id, write_json,
                                     write_jsonl)
from zephyr_jax.data.conversation import SPECIAL_TEXTS, has_special_text
from zephyr_jax.data.errors import ON_BAD_ROW, BadRow, SkipCounter, check_on_bad_row, handle_bad_row
from zephyr_jax.data.feedback_prompts import (CALIBRATION_SHARE, PRINCIPLES, SYSTEM_PROMPTS, TYPED_ASPECTS, FormatError,
                                              critique_messages, parse_critique_reply, parse_rating_reply,
                                              principle_mix, prompts_digest, rating_messages, reask_message,
                                              world_knowledge)
from zephyr_jax.data.journal import Journal

OUTPUT_FILE, STATS_FILE, JOURNAL_FILE = "train.jsonl", "stats.json", "journal.jsonl"
FORMAT_VERSION = 1  # bump when the journal's values change meaning


# ---------------------------------------------------------------------------------------------------------------
# Deterministic draws


def _rng(*parts) -> random.Random:
    """A generator fixed by `parts` (str seeds are hashed with SHA-512: the same in every process and version)."""
    return random.Random(":".join(map(str, parts)))


def derive_seed(*parts) -> int:
    """A 31-bit seed from `parts` (for the backends' `Call.seed`)."""
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:4], "big") & 0x7FFFFFFF


def pick_generators(n_pool: int, k: int, seed: int, pid: str) -> list[int]:
    """Pool positions for sample indices 0..k-1: distinct when the pool has k or more, else drawn with
    replacement."""
    rng = _rng(seed, pid, "generators")
    if n_pool >= k:
        return rng.sample(range(n_pool), k)
    return [rng.randrange(n_pool) for _ in range(k)]


def pick_principle(source: str, principles: str, seed: int, pid: str, sample: int) -> tuple[str, str]:
    """(principle, system prompt) for one completion (see the module docstring)."""
    if principles == "none":
        return "none", ""
    rng = _rng(seed, pid, sample, "principle")
    if principles in PRINCIPLES:
        principle = principles
    else:
        principle = rng.choice(principle_mix(source))
        if principle == "honesty" and rng.random() < CALIBRATION_SHARE:
            principle = "verbalized_calibration"
    return principle, rng.choice(SYSTEM_PROMPTS[principle])


# ---------------------------------------------------------------------------------------------------------------
# Prompts


ANSWER_COLUMNS = ("correct_answers", "incorrect_answers")  # an LLM-judged run's world knowledge and output
PROMPT_COLUMNS = ("instruction", "prompt", "messages", "source", *ANSWER_COLUMNS)  # all it reads of a row


@dataclasses.dataclass
class Prompt:
    index: int  # position in the input
    row: dict  # the input row's ANSWER_COLUMNS, or (read_prompts' whole_rows) all of it
    instruction: str
    source: str
    pid: str


def instruction_of(row, index: int, source: str | None = None) -> str:
    """The row's prompt: "instruction", else "prompt", else the first user turn of "messages" (BadRow if none)."""
    if not isinstance(row, dict):
        raise BadRow(index, "row is not a dict", source)
    for key in ("instruction", "prompt"):
        if row.get(key) is not None:  # a column that other rows have is None in this one (datasets fills it)
            text = row[key]
            break
    else:
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise BadRow(index, "no 'instruction', 'prompt' or 'messages' column", source)
        users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise BadRow(index, "no user turn in messages", source)
        text = users[0]
    if not isinstance(text, str) or not text.strip():
        raise BadRow(index, "empty prompt", source)
    if not is_text(text):
        raise BadRow(index, "prompt is not valid Unicode (a lone surrogate)", source)
    if has_special_text(text):  # binarize refuses the row: its calls would be paid for nothing
        raise BadRow(index, f"prompt contains special-token text {SPECIAL_TEXTS}", source)
    return text


def read_prompts(rows, *, limit: int | None = None, counter: SkipCounter, on_bad_row: str = "skip",
                 source: str | None = None, whole_rows: bool = False) -> list[Prompt]:
    """The usable, distinct prompts in input order (at most `limit`); the others are counted in `counter`.

    A prompt keeps its row's ANSWER_COLUMNS, or with `whole_rows` (a programmatic judge, which may read any
    column) the whole row: held for the whole run, raw UltraFeedback rows as prompts, each with its 4 rated
    completions, took 0.44 GB for 16,000 prompts, and a Dataset's other columns are not even read (8 s there)."""
    if not whole_rows and getattr(rows, "column_names", None) is not None and hasattr(rows, "select_columns"):
        rows = rows.select_columns([c for c in rows.column_names if c in PROMPT_COLUMNS])
    prompts, seen = [], set()
    for i, row in enumerate(rows):
        if limit is not None and len(prompts) >= limit:
            break
        try:
            text = instruction_of(row, i, source)
        except BadRow as err:
            handle_bad_row(err, on_bad_row, counter)
            continue
        pid = prompt_id(text)
        if pid in seen:
            counter.skip("duplicate prompt")
            continue
        seen.add(pid)
        counter.keep()
        kept = row if whole_rows else {k: row[k] for k in ANSWER_COLUMNS if k in row}
        prompts.append(Prompt(i, kept, text, str(row.get("source") or "custom"), pid))
    return prompts


# ---------------------------------------------------------------------------------------------------------------
# Annotations: an unrated aspect, and a completion's mean rating


def empty_annotation(aspect: str) -> dict:
    """An unrated aspect: what a parse failure, a failed call or a missing generation leaves."""
    if aspect in TYPED_ASPECTS:
        return {"Type": None, "Rationale": None, "Rating": "N/A", "Rationale For Rating": None}
    return {"Rating": "N/A", "Rationale": None}


def not_judged(error: str) -> dict:
    """The judgement of a completion that got none (its generation unusable, the programmatic judge failed)."""
    return {"annotations": {a: empty_annotation(a) for a in ASPECTS}, "critique": None, "overall_score": None,
            "judge_errors": [error]}


def mean_rating(annotations: dict) -> float | None:
    """Mean of the numeric aspect ratings ("N/A" ignored), binarize's own ranking score; None if there is none."""
    return completion_score({"annotations": annotations}, "mean")


# ---------------------------------------------------------------------------------------------------------------
# Programmatic judges


def _judge_name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', getattr(fn, '__name__', '?'))}"


def programmatic_annotations(value, name: str) -> dict:
    """fn's result (a number, or a dict aspect -> number, each in [1, 5]) -> the four aspects' annotations."""
    if isinstance(value, dict):
        unknown = set(value) - set(ASPECTS)
        if unknown:
            raise ValueError(f"unknown aspects {sorted(unknown)}; expected some of {ASPECTS}")
        ratings = value
    else:
        ratings = dict.fromkeys(ASPECTS, value)
    why = f"programmatic: {name}"
    out = {}
    for aspect in ASPECTS:
        r = ratings.get(aspect)
        if r is None:
            out[aspect] = empty_annotation(aspect)
            continue
        if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 1 <= r <= 5:  # numpy numbers are Real
            raise ValueError(f"rating {r!r} for {aspect} is not a number from 1 to 5")
        r = float(r)  # written whole ("4") or in full ("4.1234564"): 6 digits made close scores tie
        text = str(int(r)) if r.is_integer() else repr(r)
        out[aspect] = {"Rating": text, "Rationale": why}
        if aspect in TYPED_ASPECTS:
            out[aspect] = {"Type": ["None"], "Rationale": why, "Rating": text, "Rationale For Rating": why}
    return out


def overall_from_mean(mean: float | None) -> float | None:
    """The programmatic judge's overall_score: the mean rating (1-5) mapped linearly onto 1-10 (not rounded:
    rounding to 4 places made means 1e-5 apart tie)."""
    return None if mean is None else 1 + 9 * (mean - 1) / 4


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Slot:
    """One completion to make: sample index, generator, principle and seed."""
    sample: int
    generator: Backend
    principle: str
    system_prompt: str
    seed: int


class _Run:
    def __init__(self, generators, judge, judge_fn, judge_name, journal: Journal, opts: dict):
        self.generators, self.judge, self.judge_fn = generators, judge, judge_fn
        self.judge_name = judge_name.split(":", 1)[1]  # "module:function" or the LLM judge's name
        self.journal, self.o = journal, opts
        self.calls = {"generation": 0, "rating": 0, "critique": 0}  # calls made by this run
        self.failed = {"generation": 0, "rating": 0, "critique": 0}  # calls that failed for good
        self.reasks = {"rating": 0, "critique": 0}
        self.parse_failures = {"rating": 0, "critique": 0}  # judge calls given up on, this run
        self.judge_errors = 0  # programmatic judge exceptions / invalid values
        self.out: collections.Counter = collections.Counter()  # counts of the output (see `tally`)
        self.unusable: collections.Counter = collections.Counter()  # replied, but not judged: by reason
        self.first_errors: dict[str, str] = {}  # kind -> the first error of that kind (a wrong key, a bad URL)

    # -- generation ------------------------------------------------------------------------------------------
    def slots(self, p: Prompt) -> list[Slot]:
        o = self.o
        picks = pick_generators(len(self.generators), o["k"], o["seed"], p.pid)
        out = []
        for s, g in enumerate(picks):
            gen = self.generators[g]
            principle, system = pick_principle(p.source, o["principles"], o["seed"], p.pid, s)
            out.append(Slot(s, gen, principle, system, derive_seed(o["seed"], p.pid, gen.name, s)))
        return out

    async def generate(self, p: Prompt, slot: Slot) -> dict:
        key = ("completion", p.pid, slot.generator.name, slot.sample)
        if key in self.journal:
            return self.journal.get(key)
        messages = [{"role": "user", "content": p.instruction}]
        if slot.system_prompt:
            messages.insert(0, {"role": "system", "content": slot.system_prompt})
        o = self.o
        reply = await slot.generator.complete(Call(messages=messages, temperature=o["temperature"], top_p=o["top_p"],
                                                   max_tokens=o["max_tokens"], seed=slot.seed))
        self.calls["generation"] += 1
        value = {"response": reply.text, "principle": slot.principle, "custom_system_prompt": slot.system_prompt,
                 "seed": slot.seed, "prompt_tokens": reply.prompt_tokens,
                 "completion_tokens": reply.completion_tokens, "finish_reason": reply.finish_reason,
                 "error": reply.error}
        if reply.ok:
            self.journal.append(key, value)
        else:  # not journaled: a rerun tries again
            self.failed["generation"] += 1
            self.first_errors.setdefault("generation", f"{slot.generator.name}: {reply.error}")
        return value

    # -- the LLM judge ---------------------------------------------------------------------------------------
    async def ask(self, kind: str, messages: list[dict], parse, what: str, seed: int) -> dict:
        """A judge call, re-asked on format errors: {"parsed", "parse_failure", "error", "attempts", tokens}."""
        o = self.o
        base, tokens = messages, [0, 0]
        for attempt in range(o["parse_retries"] + 1):
            reply = await self.judge.complete(Call(messages=messages, temperature=0.0, top_p=1.0,
                                                   max_tokens=o["judge_max_tokens"], seed=seed))
            self.calls[kind] += 1
            tokens[0] += reply.prompt_tokens
            tokens[1] += reply.completion_tokens
            result = {"attempts": attempt + 1, "prompt_tokens": tokens[0], "completion_tokens": tokens[1]}
            if not reply.ok:
                self.failed[kind] += 1
                self.first_errors.setdefault(kind, f"{self.judge.name}: {reply.error}")
                return {**result, "parsed": None, "parse_failure": False, "error": f"call failed: {reply.error}"}
            try:
                return {**result, "parsed": parse(reply.text), "parse_failure": False, "error": None}
            except FormatError as e:
                error = str(e)
                if reply.finish_reason == "length":  # the same budget again would cut it again: ask for less
                    error += f"; the reply was cut off at {o['judge_max_tokens']} tokens: keep the rationales short"
            if attempt < o["parse_retries"]:
                self.reasks[kind] += 1
                # Show the bad reply and what is wrong: at temperature 0 the same question gets the same answer.
                messages = [*base, {"role": "assistant", "content": reply.text}, reask_message(error, what)]
        self.parse_failures[kind] += 1
        return {**result, "parsed": None, "parse_failure": True,
                "error": f"parse failure after {o['parse_retries'] + 1} attempts: {error}", "last_reply": reply.text}

    async def rate(self, p: Prompt, done: list[tuple[Slot, dict]], aspect: str, complete: bool) -> dict:
        # Keyed by the completions it covers when some are missing: a rerun whose generations fail again reuses
        # it, and one that makes the missing generation asks anew over all K (the key without samples).
        samples = () if complete else ("samples " + ",".join(str(slot.sample) for slot, _ in done),)
        key = ("rating", p.pid, aspect, *samples)
        if key in self.journal:
            return self.journal.get(key)
        order = [slot.sample for slot, _ in done]
        _rng(self.o["seed"], p.pid, aspect, "order").shuffle(order)
        texts = {slot.sample: g["response"] for slot, g in done}
        messages = rating_messages(aspect, p.instruction, [texts[s] for s in order],
                                   world_knowledge(p.row, p.source))
        result = await self.ask("rating", messages, lambda text: parse_rating_reply(text, aspect, len(order)),
                                f"the annotation of all {len(order)} texts", derive_seed(self.o["seed"], p.pid, aspect))
        parsed = result.pop("parsed")
        value = {"order": order, **result,
                 "annotations": None if parsed is None else {str(s): a for s, a in zip(order, parsed)}}
        if parsed is not None or value["parse_failure"]:  # the call ran (parsed or given up on)
            self.journal.append(key, value)
        return value

    async def critique(self, p: Prompt, slot: Slot, gen: dict) -> dict:
        key = ("critique", p.pid, slot.sample)
        if key in self.journal:
            return self.journal.get(key)
        messages = critique_messages(p.instruction, gen["response"], gen["custom_system_prompt"])
        result = await self.ask("critique", messages, parse_critique_reply, "the feedback and the overall score",
                                derive_seed(self.o["seed"], p.pid, slot.sample, "critique"))
        parsed = result.pop("parsed")
        feedback, score = parsed if parsed is not None else (None, None)
        value = {**result, "critique": feedback, "overall_score": score}
        if parsed is not None or result["parse_failure"]:
            self.journal.append(key, value)
        return value

    # -- one prompt ------------------------------------------------------------------------------------------
    async def prompt(self, p: Prompt) -> dict:
        slots = self.slots(p)
        gens = await asyncio.gather(*(self.generate(p, s) for s in slots))
        done = [(s, g) for s, g in zip(slots, gens) if unusable(g) is None]
        if self.judge_fn is not None:
            judged = await asyncio.gather(*(asyncio.to_thread(self.judge_programmatic, p, g) for _, g in done))
            for j in judged:  # counted here, in the event loop, not in the worker threads
                if j["judge_errors"]:
                    self.judge_errors += 1
                    self.first_errors.setdefault("judge", j["judge_errors"][0])
            self.tally(gens, [], [])
            return self.row(p, slots, gens, {s.sample: j for (s, _), j in zip(done, judged)})
        complete = len(done) == len(slots)
        ratings = await asyncio.gather(*(self.rate(p, done, a, complete) for a in ASPECTS)) if done else []
        critiques = await asyncio.gather(*(self.critique(p, s, g) for s, g in done))
        self.tally(gens, ratings, critiques)
        by_sample = {s.sample: self.llm_judgement(s.sample, dict(zip(ASPECTS, ratings)), c)
                     for (s, _), c in zip(done, critiques)}
        return self.row(p, slots, gens, by_sample)

    def tally(self, gens: list[dict], ratings: list[dict], critiques: list[dict]) -> None:
        """Counts of the output (journaled results included), once per prompt."""
        out = self.out
        out["prompts"] += 1
        out["completions"] += len(gens)
        out["failed_generations"] += sum(g["response"] is None for g in gens)
        self.unusable.update(unusable(g) for g in gens if g["response"] is not None and unusable(g))
        out["cut_off_generations"] += sum(g.get("finish_reason") == "length" and not unusable(g) for g in gens)
        for kind, values in (("rating", ratings), ("critique", critiques)):
            out[f"{kind}_parse_failures"] += sum(bool(v["parse_failure"]) for v in values)
            out[f"failed_{kind}_calls"] += sum(bool(v["error"]) and not v["parse_failure"] for v in values)
        for v in (*gens, *ratings, *critiques):
            out["prompt_tokens"] += v.get("prompt_tokens") or 0
            out["completion_tokens"] += v.get("completion_tokens") or 0

    def judge_programmatic(self, p: Prompt, gen: dict) -> dict:
        try:
            annotations = programmatic_annotations(self.judge_fn(p.row, gen["response"]), self.judge_name)
        except Exception as e:  # noqa: BLE001 - a checker's failure is recorded, the run goes on
            return not_judged(f"{self.judge_name} failed on row {p.index + 1}: {type(e).__name__}: {e}")
        return {"annotations": annotations, "critique": f"programmatic: {self.judge_name}",
                "overall_score": overall_from_mean(mean_rating(annotations)), "judge_errors": []}

    @staticmethod
    def llm_judgement(sample: int, ratings: dict, critique: dict) -> dict:
        annotations, errors = {}, []
        for aspect in ASPECTS:
            value = ratings[aspect]
            got = (value.get("annotations") or {}).get(str(sample))
            annotations[aspect] = got or empty_annotation(aspect)
            if got is None:
                errors.append(f"{aspect}: {value.get('error')}")
        if critique["error"]:
            errors.append(f"critique: {critique['error']}")
        return {"annotations": annotations, "critique": critique["critique"],
                "overall_score": critique["overall_score"], "judge_errors": errors}

    def row(self, p: Prompt, slots: list[Slot], gens: list[dict], judged: dict) -> dict:
        completions = []
        for slot, g in zip(slots, gens):
            j = judged.get(slot.sample) or not_judged(f"not judged: {unusable(g)}")
            completions.append({
                "model": slot.generator.name, "principle": g["principle"],
                "custom_system_prompt": g["custom_system_prompt"], "response": g["response"],
                "annotations": j["annotations"], "critique": j["critique"], "overall_score": j["overall_score"],
                "fine-grained_score": mean_rating(j["annotations"]),
                "sample_index": slot.sample, "seed": g["seed"], "prompt_tokens": g["prompt_tokens"],
                "completion_tokens": g["completion_tokens"], "finish_reason": g["finish_reason"],
                "error": g["error"], "judge_errors": j["judge_errors"]})
        self.out["rated_completions"] += sum(c["fine-grained_score"] is not None for c in completions)
        return {"source": p.source, "prompt_id": p.pid, "instruction": p.instruction,
                "models": [c["model"] for c in completions], "completions": completions,
                "correct_answers": _strings(p.row.get("correct_answers")),
                "incorrect_answers": _strings(p.row.get("incorrect_answers"))}


def unusable(gen: dict) -> str | None:
    """Why a completion is not judged, or None: a failed call, or an empty reply (content null, a tool call only;
    journaled, so a rerun does not pay for it again, and counted in stats["unusable_generations"]). A reply cut
    off at max_tokens is judged (the judge sees it end mid-way) and counted in stats["cut_off_generations"]."""
    if gen["response"] is None:
        return "generation failed"
    if not gen["response"].strip():
        return "empty reply"
    return None


def _strings(value) -> list[str]:
    """A list column passed through as strings (one type for every row, as Arrow wants); [] if absent."""
    return [str(x) for x in value] if isinstance(value, (list, tuple)) else []


def _settings(generators, judge_name: str, o: dict) -> dict:
    """What shapes the outputs: a resumed run must match these (journal.Journal refuses otherwise)."""
    return {"format": FORMAT_VERSION, "generators": [g.name for g in generators], "judge": judge_name,
            "prompts": prompts_digest(),  # an edited rubric must not resume into a mixed output
            **{k: o[k] for k in ("k", "seed", "max_tokens", "temperature", "top_p", "principles")},
            **({} if judge_name.startswith("programmatic:") else
               {"parse_retries": o["parse_retries"], "judge_max_tokens": o["judge_max_tokens"]})}


def _check(generators, judge, o: dict, concurrency: int, limit: int | None):
    if isinstance(generators, Backend) or not generators or not all(isinstance(g, Backend) for g in generators):
        raise ValueError("generators must be a non-empty list of Backend objects (see zephyr_jax.data.backends; "
                         "backend_from_spec makes one from a spec string)")
    names = [g.name for g in generators]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"generator names must differ (they key the journal): {repeated} given more than once; "
                         f"a smaller pool is sampled with replacement, so one generator is enough for K samples")
    _check_options(o, concurrency, limit)
    if judge is None:
        raise ValueError("a judge is needed: a Backend (LLM judge) or a function / 'module:function' (programmatic)")


def _check_options(o: dict, concurrency: int, limit: int | None):
    """The numbers and principles (the CLI checks them before its engine: backends load their models)."""
    k, parse_retries, principles = o["k"], o["parse_retries"], o["principles"]
    if k < 1 or parse_retries < 0 or concurrency < 1:
        raise ValueError(f"need completions_per_prompt >= 1, parse_retries >= 0 and concurrency >= 1, got {k}, "
                         f"{parse_retries}, {concurrency}")
    for key in ("max_tokens", "judge_max_tokens"):  # 0 asks for replies of nothing, and each is judged or refused
        if o[key] < 1:
            raise ValueError(f"{key}={o[key]}: must be at least 1")
    if principles not in ("ultrafeedback", "none", *PRINCIPLES):
        raise ValueError(f"principles={principles!r}; expected ultrafeedback, none or one of {PRINCIPLES}")
    if limit is not None and limit < 1:  # it would read no prompt, and the error would blame the input
        raise ValueError(f"limit={limit}: must be at least 1 (None: every prompt)")


def _resolve_judge(judge):
    """(backend, fn, name) from a Backend, a function, or "module:function"."""
    if isinstance(judge, Backend):
        return judge, None, f"llm:{judge.name}"
    if isinstance(judge, str):
        spec = judge.removeprefix("programmatic:")
        return None, load_callable(spec), f"programmatic:{spec}"
    if callable(judge):
        return None, judge, f"programmatic:{_judge_name(judge)}"
    raise ValueError(f"judge {judge!r} is neither a Backend nor a function nor 'module:function'")


def _backend_stats(backends) -> dict:
    """name -> stats (with "cost" where the backend estimates one); a backend in two roles is counted once."""
    out = {}
    for b in {id(b): b for b in backends}.values():
        stats = dict(b.stats)
        if hasattr(b, "cost"):
            stats["cost"] = b.cost()
        name, n = b.name, 1
        while name in out:  # e.g. a judge and a generator that serve the same model name at other URLs
            n += 1
            name = f"{b.name}#{n}"
        out[name] = stats
    return out


async def collect_feedback_async(rows_or_source, generators: list[Backend], judge, output_dir, *,
                                 split: str | None = "train", completions_per_prompt: int = 4, seed: int = 42,
                                 concurrency: int = 16, max_tokens: int = 1024, temperature: float = 1.0,
                                 top_p: float = 1.0, parse_retries: int = 10, judge_max_tokens: int = 1024,
                                 principles: str = "ultrafeedback", limit: int | None = None,
                                 overwrite: bool = False, on_bad_row: str = "skip", data_dir=None,
                                 log: Callable[[str], None] = print) -> dict:
    """`collect_feedback` inside a running event loop."""
    from zephyr_jax.data.sources import load_rows, source_name

    check_on_bad_row(on_bad_row)
    opts = {"k": completions_per_prompt, "seed": seed, "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p, "parse_retries": parse_retries, "judge_max_tokens": judge_max_tokens,
            "principles": principles}
    _check(generators, judge, opts, concurrency, limit)
    judge_backend, judge_fn, judge_name = _resolve_judge(judge)
    out_dir = Path(output_dir)
    source = "rows"
    if isinstance(rows_or_source, (str, os.PathLike)):
        source = source_name(rows_or_source, split)
        rows = load_rows(rows_or_source, split, data_dir=data_dir)
    else:
        rows = rows_or_source
    counter = SkipCounter(source)
    prompts = read_prompts(rows, limit=limit, counter=counter, on_bad_row=on_bad_row, source=source,
                           whole_rows=judge_fn is not None)
    if not prompts:
        raise ValueError(f"no usable prompt in {source} ({counter.summary()})")
    settings = _settings(generators, judge_name, opts)
    backends = [b for b in (*generators, judge_backend) if b is not None]
    start = time.time()
    with Journal(out_dir / JOURNAL_FILE, settings, overwrite=overwrite) as journal:
        if journal.resumed:
            log(f"resuming: {journal.resumed} finished calls in {journal.path}")
        run = _Run(generators, judge_backend, judge_fn, judge_name, journal, opts)
        try:
            rows_out = await map_bounded(run.prompt, prompts, concurrency, desc="feedback", unit=" prompts")
        finally:
            for b in {id(b): b for b in backends}.values():
                if hasattr(b, "aclose"):
                    await b.aclose()  # connection pools belong to this event loop
        write_jsonl(rows_out, out_dir / OUTPUT_FILE)  # the journal's lock held until the outputs are written
        stats = _stats(run, counter, journal.resumed, settings, backends, time.time() - start, out_dir)
        write_json(stats, out_dir / STATS_FILE)
    log(summary(stats))
    return stats


def collect_feedback(rows_or_source, generators: list[Backend], judge, output_dir, **options) -> dict:
    """UltraFeedback-style AI feedback (see the module docstring); returns the stats written to DIR/stats.json.

    rows_or_source: rows (dicts) or a source for `load_rows(source, split)`; generators: the pool (Backends with
    distinct names); judge: a Backend (LLM judge), or fn(row, response) -> number | dict, or "module:function"
    (programmatic judge). Options: split="train", completions_per_prompt=4, seed=42, concurrency=16 (prompts in
    flight; each backend bounds its own calls too), max_tokens=1024, temperature=1.0, top_p=1.0,
    parse_retries=10, judge_max_tokens=1024, principles="ultrafeedback" | "none" | a principle, limit=None,
    overwrite=False, on_bad_row="skip", data_dir=None (TFDS), log=print."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # no loop running: the usual case
        return asyncio.run(collect_feedback_async(rows_or_source, generators, judge, output_dir, **options))
    raise RuntimeError("collect_feedback was called inside a running event loop (a notebook?): "
                       "use `await collect_feedback_async(...)` there")


def _stats(run: _Run, counter: SkipCounter, resumed: int, settings: dict, backends, seconds: float, out_dir):
    backend_stats = _backend_stats(backends)
    costs = [s["cost"] for s in backend_stats.values() if "cost" in s]
    out = run.out
    return {
        "output": str(out_dir / OUTPUT_FILE),
        "prompts": out["prompts"], "completions": out["completions"],
        "failed_generations": out["failed_generations"],
        "unusable_generations": dict(run.unusable),  # replied, but not judged: by reason
        "cut_off_generations": out["cut_off_generations"],  # judged, though cut at max_tokens
        "rated_completions": out["rated_completions"],  # with a mean rating: what binarize ranks
        "parse_failures": {"rating": out["rating_parse_failures"], "critique": out["critique_parse_failures"]},
        "failed_judge_calls": {"rating": out["failed_rating_calls"], "critique": out["failed_critique_calls"]},
        "judge_errors": run.judge_errors,
        "tokens": {"prompt": out["prompt_tokens"], "completion": out["completion_tokens"]},
        "input": counter.as_dict(),
        "this_run": {"seconds": round(seconds, 3), "resumed_calls": resumed, "calls": run.calls,
                     "failed_calls": run.failed, "reasks": run.reasks, "parse_failures": run.parse_failures,
                     "judge_errors": run.judge_errors, "first_errors": run.first_errors},
        "backends": backend_stats,
        "estimated_cost": sum(costs) if costs else None,
        "settings": settings,
    }


def _judged(stats: dict) -> int:
    """Completions handed to the judge: neither failed nor unusable (an empty reply is never judged)."""
    return stats["completions"] - stats["failed_generations"] - sum(stats["unusable_generations"].values())


def _unjudged(stats: dict) -> str:
    """Why no generation was judged, by reason: "2 failed, 4 empty reply"."""
    return ", ".join([f"{stats['failed_generations']} failed",
                      *(f"{n} {why}" for why, n in stats["unusable_generations"].items())])


def summary(stats: dict) -> str:
    """The end-of-run report (counts of the output, then what this run did)."""
    r, pf, fj = stats["this_run"], stats["parse_failures"], stats["failed_judge_calls"]
    lines = [
        f"feedback: {stats['prompts']} prompts ({stats['input']['skipped']} input rows skipped), "
        f"{stats['completions']} completions ({stats['failed_generations']} failed generations"
        + "".join(f", {n} {why}" for why, n in stats["unusable_generations"].items())
        + (f", {stats['cut_off_generations']} cut off at max_tokens" if stats["cut_off_generations"] else "") + ")",
        *[f"  input rows skipped: {n} x {why}" for why, n in stats["input"]["reasons"].items()],
        f"  judge: parse failures {pf['rating']} aspect ratings + {pf['critique']} critiques; failed calls "
        f"{fj['rating']} + {fj['critique']}; programmatic judge errors {stats['judge_errors']}",
        f"  tokens: {stats['tokens']['prompt']} prompt + {stats['tokens']['completion']} completion",
        f"  this run: {sum(r['calls'].values())} calls ({r['resumed_calls']} resumed from the journal), "
        f"{sum(r['reasks'].values())} re-asks, {sum(r['failed_calls'].values())} failed, {r['seconds']:.1f} s",
    ]
    if stats["completions"] and stats["failed_generations"] == stats["completions"]:
        lines.append("  WARNING: every generation failed (see the first error below)")
    elif stats["completions"] and not _judged(stats):  # the judge was never called
        lines.append(f"  WARNING: no generation could be judged ({_unjudged(stats)})")
    elif stats["completions"] and not stats["rated_completions"]:
        lines.append("  WARNING: no completion got a rating: every judge call failed or was unreadable")
    lines += [f"  first {kind} error: {error}" for kind, error in r["first_errors"].items()]
    lines += [f"  {name}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in sorted(s.items())) for name, s in stats["backends"].items()]
    if stats["estimated_cost"] is not None:
        lines.append(f"  estimated cost: {stats['estimated_cost']:.4f}")
    lines.append(f"  -> {stats['output']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _price(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    try:
        price_in, price_out = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not IN,OUT (prices per million tokens)") from None
    if not all(math.isfinite(p) and p >= 0 for p in (price_in, price_out)):  # a negative or nan cost estimate
        raise argparse.ArgumentTypeError(f"{text!r}: prices per million tokens are finite and at least 0")
    return price_in, price_out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zephyr_jax.data.feedback", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", required=True, help="prompt source: jsonl/parquet file or dir, hub name, tfds:NAME")
    p.add_argument("--split", default="train", help="split of --prompts (ignored for a single file)")
    p.add_argument("--generators", action="append", required=True, metavar="SPEC",
                   help="a generator backend spec; repeat the flag for a pool")
    judge = p.add_mutually_exclusive_group(required=True)
    judge.add_argument("--judge", metavar="SPEC", help="LLM judge backend spec")
    judge.add_argument("--judge_fn", metavar="MODULE:FUNCTION", help="programmatic judge fn(row, response)")
    p.add_argument("--output", required=True, help="output directory (train.jsonl, stats.json, journal.jsonl)")
    p.add_argument("--completions_per_prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--concurrency", type=int, default=16, help="prompts in flight, and calls per backend (URL)")
    p.add_argument("--max_tokens", type=int, default=1024, help="new tokens per completion")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--judge_max_tokens", type=int, default=1024)
    p.add_argument("--parse_retries", type=int, default=10, help="re-asks of a judge reply in the wrong format")
    p.add_argument("--principles", default="ultrafeedback",
                   help="ultrafeedback (by source), none (no system prompt), or one of " + ", ".join(PRINCIPLES))
    p.add_argument("--limit", type=int, default=None, help="use the first N usable prompts")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per endpoint request")
    p.add_argument("--max_retries", type=int, default=6, help="endpoint retries of 429/5xx/timeouts/drops")
    p.add_argument("--mesh", default=None, help=ENGINE_MESH_HELP)
    p.add_argument("--api_key_env", default="OPENAI_API_KEY", help="environment variable with the endpoint key")
    p.add_argument("--judge_price", type=_price, default=None, metavar="IN,OUT",
                   help="judge endpoint price per million tokens (input, output), for the cost estimate")
    p.add_argument("--generator_price", type=_price, default=None, metavar="IN,OUT",
                   help="generator endpoints' price per million tokens (input, output)")
    p.add_argument("--overwrite", action="store_true", help="discard the journal and start afresh")
    p.add_argument("--data_dir", default=None, help="TFDS data dir for --prompts=tfds:NAME")
    p.add_argument("--on_bad_row", choices=ON_BAD_ROW, default="skip",
                   help="a prompt row without a usable prompt: counted and skipped (default), or the run stops at "
                        "it before any call")
    return p


def main(argv=None) -> dict:
    from zephyr_jax.data.sources import local_files

    p = _parser()
    args = p.parse_args(argv)
    # before the models load (the journal would find a bad --output only after it)
    check_output_flag(p, args.output, "train.jsonl, stats.json and journal.jsonl")

    def price(spec, value):  # an estimated cost only means something for a paid endpoint
        return {"price_per_million": value} if value is not None and spec.startswith("endpoint:") else {}

    try:  # settings mismatch, bad specs, missing sources: one clear line
        _check_options({"k": args.completions_per_prompt, "parse_retries": args.parse_retries,
                        "max_tokens": args.max_tokens, "judge_max_tokens": args.judge_max_tokens,
                        "principles": args.principles}, args.concurrency, args.limit)
        if args.judge_fn:  # a typo in it: now, not once every generator has loaded its model
            _resolve_judge(args.judge_fn)
        local_files(args.prompts, args.split)  # raises for missing local data (collect_feedback reads it late)
        with BackendSet(api_key_env=args.api_key_env, concurrency=args.concurrency, timeout=args.timeout,
                        max_retries=args.max_retries, mesh=args.mesh) as backends:
            generators = [backends.get(spec, **price(spec, args.generator_price)) for spec in args.generators]
            judge = backends.get(args.judge, **price(args.judge, args.judge_price)) if args.judge else args.judge_fn
            stats = collect_feedback(args.prompts, generators, judge, args.output, split=args.split,
                                    data_dir=args.data_dir, completions_per_prompt=args.completions_per_prompt,
                                    seed=args.seed, concurrency=args.concurrency, max_tokens=args.max_tokens,
                                    temperature=args.temperature, top_p=args.top_p,
                                    parse_retries=args.parse_retries, judge_max_tokens=args.judge_max_tokens,
                                    principles=args.principles, limit=args.limit, overwrite=args.overwrite,
                                    on_bad_row=args.on_bad_row)
    except (ValueError, OSError) as e:  # OSError: a missing file; a hub name unreachable
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if stats["completions"] and stats["failed_generations"] == stats["completions"]:
        # a script's next step (binarize, training) must not start on completions that are all errors
        print(f"error: every one of the {stats['completions']} generations failed (first errors: "
              f"{stats['this_run']['first_errors']}); the journal keeps what finished", file=sys.stderr)
        raise SystemExit(1)
    if stats["completions"] and not _judged(stats):  # failed or empty replies only: no judge call
        print(f"error: none of the {stats['completions']} generations could be judged ({_unjudged(stats)}); the "
              "journal keeps what finished", file=sys.stderr)
        raise SystemExit(1)
    if stats["completions"] and not stats["rated_completions"]:  # a judge with a wrong key: nothing to binarize
        print(f"error: none of the {_judged(stats)} completions judged got a rating "
              f"(first errors: {stats['this_run']['first_errors']}); the journal keeps what finished",
              file=sys.stderr)
        raise SystemExit(1)
    return stats


if __name__ == "__main__":
    main()
