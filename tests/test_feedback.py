"""python -m zephyr_jax.data.feedback: generators, programmatic and LLM judges, parse failures, HTTP faults,
kill -9 and resume, settings checks, and the way through binarize into a dDPO run.

The generator and judge functions below are also loaded by the CLI tests (callable:tests.test_feedback:NAME), so
this module's top-level imports stay light."""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from zephyr_jax.data import feedback
from zephyr_jax.data.backends import CallableBackend, Reply
from zephyr_jax.data.binarize import ASPECTS, binarize
from zephyr_jax.data.errors import SkipCounter
from zephyr_jax.data.feedback import RUBRICS, TYPED_ASPECTS, collect_feedback
from zephyr_jax.data.sources import load_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIE_PROMPT = "Say anything."  # the programmatic judge rates every reply to it 3: all completions tie


# ---------------------------------------------------------------------------------------------------------------
# Prompts, generators and judges


def arithmetic_rows(n=12):
    rows = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b), "source": "custom"}
            for a, b in ((i % 7 + 1, i // 2 + 3) for i in range(n))]
    return rows + [{"prompt": TIE_PROMPT, "answer": "", "source": "evol_instruct"}]


def _question(call) -> str:
    return [m["content"] for m in call.messages if m["role"] == "user"][-1]


def _sum(question: str):
    m = re.fullmatch(r"What is (\d+) \+ (\d+)\?", question)
    return int(m.group(1)) + int(m.group(2)) if m else None


def make_generator(kind: str):
    """A deterministic generator: "right" answers "N", "verbose" "The answer is N." (also right), "off" N+1,
    "wrong" N+5; "wrong" raises on questions with a 7 in them (a failed generation)."""
    def generate(call):
        question = _question(call)
        total = _sum(question)
        if total is None:
            return f"{kind} says hello (seed {call.seed})"
        if kind == "wrong" and "7" in question:
            raise RuntimeError("generator down")
        return {"right": str(total), "verbose": f"The answer is {total}.", "off": str(total + 1),
                "wrong": str(total + 5)}[kind]
    generate.__name__ = kind
    return generate


def check_sum(row, response):
    """Programmatic judge: 5 for the right sum, 3 one off (and for TIE_PROMPT), 1 otherwise."""
    if row["prompt"] == TIE_PROMPT:
        return 3
    numbers = re.findall(r"\d+", response)
    if not numbers:
        return 1
    miss = abs(int(numbers[-1]) - int(row["answer"]))
    return 5 if miss == 0 else 3 if miss == 1 else 1


def pool(*kinds):
    return [CallableBackend(make_generator(k), name=k) for k in kinds]


def judge_request(messages):
    """What a judge call asks: (kind, instruction, payload) with kind "critique" and payload the response, or
    kind an aspect and payload the texts in the order shown."""
    user = messages[1]["content"]
    instruction = re.search(r"^(?:Instruction: |### Instruction\n)(.*)$", user, re.M)[1]
    if "Overall Score" in user:
        return "critique", instruction, user.split("### My answer\n", 1)[1].split("\n\n### Reply format", 1)[0]
    aspect = next(a for a in ASPECTS if RUBRICS[a] in user)
    return aspect, instruction, re.findall(r"^<text \d+> (.*)$", user, re.M)


def is_right(instruction: str, text: str) -> bool:
    numbers = re.findall(r"\d+", text)
    return bool(numbers) and int(numbers[-1]) == _sum(instruction)


def well_formed(messages) -> str:
    """A well-formed judge reply to `messages`: 5 (critique 9) for a right sum, else 2 (critique 3)."""
    kind, instruction, payload = judge_request(messages)
    if kind == "critique":
        return f"Feedback: clear enough, check the sum.\nOverall Score: {9 if is_right(instruction, payload) else 3}"
    blocks = []
    for i, text in enumerate(payload, 1):
        r = 5 if is_right(instruction, text) else 2
        if kind in TYPED_ASPECTS:
            blocks.append(f"#### Output for Text {i}\nType: 1, 3\nRationale: looked at it.\nRating: {r}\n"
                          f"Rationale For Rating: rated {r}.")
        else:
            blocks.append(f"#### Output for Text {i}\nRating: {r}\nRationale: rated {r}.")
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------------------------
# Programmatic judge: schema, binarize, ties, failed generations


def test_programmatic_judge_schema_binarize_and_ties(tmp_path):
    rows = arithmetic_rows(12)
    stats = collect_feedback(rows, pool("right", "verbose", "off", "wrong"), check_sum, tmp_path, seed=3,
                             concurrency=4, log=lambda s: None)
    out = load_rows(tmp_path, "train")  # through `datasets`: one Arrow schema for all rows
    assert len(out) == len(rows) and [r["instruction"] for r in out] == [r["prompt"] for r in rows]
    failed = 0
    for row, raw in zip(out, rows):
        assert row["prompt_id"] == feedback.prompt_id(raw["prompt"]) and row["source"] == raw["source"]
        assert sorted(row["models"]) == ["off", "right", "verbose", "wrong"]  # pool of K: without replacement
        assert [c["sample_index"] for c in row["completions"]] == [0, 1, 2, 3]
        for c in row["completions"]:
            assert set(c["annotations"]) == set(ASPECTS) and c["model"] in row["models"]
            assert c["principle"] in feedback.PRINCIPLES and c["custom_system_prompt"]
            if c["response"] is None:  # the "wrong" generator's failures: kept, unrated, with the error
                failed += 1
                assert c["model"] == "wrong" and "generator down" in c["error"]
                assert all(a["Rating"] == "N/A" for a in c["annotations"].values()) and c["overall_score"] is None
                continue
            r = check_sum(raw, c["response"])
            assert all(c["annotations"][a]["Rating"] == str(r) for a in ASPECTS)
            assert c["annotations"]["helpfulness"]["Rationale"] == "programmatic: tests.test_feedback:check_sum"
            assert c["fine-grained_score"] == r and c["overall_score"] == 1 + 9 * (r - 1) / 4
    assert failed == stats["failed_generations"] == sum("7" in r["prompt"] for r in rows) > 0
    assert stats["prompts"] == len(rows) and stats["completions"] == 4 * len(rows)
    assert stats["this_run"]["calls"]["generation"] == 4 * len(rows)
    assert stats["backends"]["wrong"]["failures"] == failed
    assert json.load(open(tmp_path / "stats.json")) == stats

    counter = SkipCounter()
    pairs = binarize(out, counter=counter)
    assert counter.skipped == {"no other response scores below the best": 1}  # the all-tie row, nothing else
    for pair, raw in zip(pairs, rows):  # TIE_PROMPT is last, so the pairs line up with the first rows
        row = next(r for r in out if r["instruction"] == raw["prompt"])
        usable = [c for c in row["completions"] if c["response"] is not None]
        best = [c["response"] for c in usable if check_sum(raw, c["response"]) == 5]
        assert pair["chosen"][1]["content"] == best[0]  # the first maximum in list order
        assert pair["rejected"][1]["content"] not in best  # a tie with chosen is never rejected
        assert pair["score_chosen"] == 5.0 and pair["score_rejected"] < 5.0


def test_pool_smaller_than_k_samples_with_replacement(tmp_path):
    rows = arithmetic_rows(3)[:3]
    collect_feedback(rows, pool("right"), check_sum, tmp_path, completions_per_prompt=4, principles="none",
                     log=lambda s: None)
    out = load_rows(tmp_path, "train")
    for row in out:
        assert row["models"] == ["right"] * 4 and [c["sample_index"] for c in row["completions"]] == [0, 1, 2, 3]
        assert len({c["seed"] for c in row["completions"]}) == 4  # a seed per sample index
        assert all(c["principle"] == "none" and c["custom_system_prompt"] == "" for c in row["completions"])
    assert len(binarize(out)) == 0  # four equal answers: every row ties


def test_draws_are_fixed_by_seed_and_prompt():
    a = [feedback.pick_generators(5, 4, 42, "p") for _ in range(3)]
    assert a[0] == a[1] == a[2] and len(set(a[0])) == 4
    assert feedback.pick_generators(5, 4, 43, "p") != a[0] or feedback.pick_generators(5, 4, 42, "q") != a[0]
    draws = collections.Counter(feedback.pick_principle("sharegpt", "ultrafeedback", 0, f"p{i}", 0)[0]
                                for i in range(2000))
    assert 0.55 < draws["helpfulness"] / 2000 < 0.65 and set(draws) == set(feedback.PRINCIPLES)
    tqa = collections.Counter(feedback.pick_principle("truthful_qa", "ultrafeedback", 0, f"p{i}", 0)[0]
                              for i in range(2000))
    assert "helpfulness" not in tqa and 0.44 < tqa["truthfulness"] / 2000 < 0.56
    assert set(feedback.pick_principle("custom", "ultrafeedback", 0, f"p{i}", 0)[0] for i in range(50)) == \
        {"helpfulness"}


# ---------------------------------------------------------------------------------------------------------------
# The LLM judge: parsing, re-asks and parse failures


def test_parsers():
    typed = ("**Output for Text 2**\nType: None\nRationale: fine\nRating: 4/5\nRationale: ok\n\n"
             "### Output for Text 1\nType: 3, 1\nRationale: a\nmulti-line\nRating: 2\nRationale For Rating: b")
    assert feedback.parse_rating_reply(typed, "truthfulness", 2) == [
        {"Type": ["1", "3"], "Rationale": "a\nmulti-line", "Rating": "2", "Rationale For Rating": "b"},
        {"Type": ["None"], "Rationale": "fine", "Rating": "4", "Rationale For Rating": "ok"}]
    plain = "#### Output for Text 1\nRating: N/A\nRationale: creative\n#### Output for Text 2\nRating: 5\nRationale: x"
    assert [a["Rating"] for a in feedback.parse_rating_reply(plain, "honesty", 2)] == ["N/A", "5"]
    for bad, aspect, n in ((plain, "instruction_following", 2), (plain, "honesty", 3), ("Rating: 5", "honesty", 1),
                           (plain.replace("5", "7"), "honesty", 2), (plain.replace("x", " "), "honesty", 2)):
        with pytest.raises(feedback.FormatError):
            feedback.parse_rating_reply(bad, aspect, n)
    assert feedback.parse_critique_reply("### Feedback\nGood.\nOverall Score: 1/10") == ("Good.", 1.0)
    assert feedback.parse_critique_reply("Feedback: Fine.\n**Overall Score:** 7.5") == ("Fine.", 7.5)
    for bad in ("Nice.", "Overall Score: 8", "Meh.\nOverall Score: 11"):
        with pytest.raises(feedback.FormatError):
            feedback.parse_critique_reply(bad)


class ScriptedJudge:
    """A judge callable: well-formed replies, except `bad[(kind, instruction)] = n` malformed ones first for each
    call (n > the retries: a parse failure; each critique is its own call). Counts every call."""

    def __init__(self, bad=None):
        self.bad, self.calls, self.lock = dict(bad or {}), collections.Counter(), threading.Lock()

    def __call__(self, call):
        kind, instruction, payload = judge_request(call.messages)
        key = (kind, instruction, payload if kind == "critique" else None)
        with self.lock:
            n = self.calls[key]
            self.calls[key] += 1
        if n < self.bad.get((kind, instruction), 0):
            assert n == 0 or "does not follow the format" in call.messages[-1]["content"]  # a re-ask says why
            return "I think they are all fine."
        return Reply(well_formed(call.messages), prompt_tokens=10, completion_tokens=5)

    def count(self, kind, instruction):
        return sum(n for (k, i, _), n in self.calls.items() if (k, i) == (kind, instruction))


def test_llm_judge_ratings_reasks_and_parse_failures(tmp_path):
    rows = arithmetic_rows(4)[:4]
    q0, q1, q2 = (r["prompt"] for r in rows[:3])
    bad = {("honesty", q0): 2, ("helpfulness", q1): 99, ("critique", q2): 99, ("critique", q0): 1}
    judge = ScriptedJudge(bad)
    stats = collect_feedback(rows, pool("right", "verbose", "off"), CallableBackend(judge, name="judge"), tmp_path,
                             completions_per_prompt=3, parse_retries=3, seed=1, log=lambda s: None)
    out = {r["instruction"]: r for r in load_rows(tmp_path, "train")}
    assert sum(judge.calls.values()) == stats["backends"]["judge"]["calls"]
    assert judge.count("honesty", q0) == 3 and judge.count("helpfulness", q1) == 4  # 1 + parse_retries
    assert judge.count("critique", q2) == 3 * 4 and judge.count("critique", q0) == 3 * 2
    assert stats["this_run"]["reasks"] == {"rating": 2 + 3, "critique": 3 * 3 + 3}
    assert stats["parse_failures"] == {"rating": 1, "critique": 3} == stats["this_run"]["parse_failures"]
    for instruction, row in out.items():
        for c in row["completions"]:
            good = is_right(instruction, c["response"])
            for aspect in ASPECTS:
                a = c["annotations"][aspect]
                if (aspect, instruction) == ("helpfulness", q1):  # given up on: unrated, named in judge_errors
                    assert a["Rating"] == "N/A" and a["Rationale"] is None
                    assert any(e.startswith("helpfulness: parse failure after 4 attempts")
                               for e in c["judge_errors"])
                else:
                    assert a["Rating"] == ("5" if good else "2")
                    assert a.get("Type", ["1", "3"]) == ["1", "3"]
            if instruction == q2:
                assert c["critique"] is None and c["overall_score"] is None
            else:
                assert c["overall_score"] == (9.0 if good else 3.0) and c["critique"].startswith("clear enough")
    # binarize still ranks the q1 row on its three numeric aspects
    pairs = {p["prompt"]: p for p in binarize(list(out.values()))}
    assert pairs[q1]["score_chosen"] == 5.0 and not is_right(q1, pairs[q1]["rejected"][1]["content"])


def test_shown_order_is_shuffled_and_mapped_back(tmp_path):
    rows = arithmetic_rows(6)[:6]
    orders = []

    def judge(call):
        kind, _, texts = judge_request(call.messages)
        if kind != "critique":
            orders.append(texts)
        return well_formed(call.messages)

    collect_feedback(rows, pool("right", "off", "wrong"), CallableBackend(judge, name="judge"), tmp_path,
                     completions_per_prompt=3, log=lambda s: None)
    for row in load_rows(tmp_path, "train"):  # ratings follow the texts, whatever order they were shown in
        for c in row["completions"]:
            if c["response"] is not None:
                assert c["annotations"]["honesty"]["Rating"] == ("5" if is_right(row["instruction"], c["response"])
                                                                  else "2")
    first = {}
    for texts in orders:
        first.setdefault(tuple(sorted(texts)), set()).add(texts[0])
    assert any(len(v) > 1 for v in first.values())  # not always the list order


# ---------------------------------------------------------------------------------------------------------------
# Settings


def test_other_settings_are_refused_and_overwrite_starts_afresh(tmp_path):
    rows = arithmetic_rows(2)[:2]
    collect_feedback(rows, pool("right", "off"), check_sum, tmp_path, completions_per_prompt=2, log=lambda s: None)
    with pytest.raises(ValueError, match=r"other settings \(seed: 42 on disk, 7 now\).*--overwrite"):
        collect_feedback(rows, pool("right", "off"), check_sum, tmp_path, completions_per_prompt=2, seed=7,
                         log=lambda s: None)
    again = collect_feedback(rows, pool("right", "off"), check_sum, tmp_path, completions_per_prompt=2,
                             log=lambda s: None)
    assert again["this_run"]["calls"]["generation"] == 0 and again["this_run"]["resumed_calls"] == 4
    fresh = collect_feedback(rows, pool("right", "off"), check_sum, tmp_path, completions_per_prompt=2, seed=7,
                             overwrite=True, log=lambda s: None)
    assert fresh["this_run"]["calls"]["generation"] == 4 and fresh["this_run"]["resumed_calls"] == 0
    with pytest.raises(ValueError, match="names must differ"):
        collect_feedback(rows, pool("right", "right"), check_sum, tmp_path / "x", log=lambda s: None)
    with pytest.raises(ValueError, match="no usable prompt"):
        collect_feedback([{"text": "x"}], pool("right"), check_sum, tmp_path / "y", log=lambda s: None)
