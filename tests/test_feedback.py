"""python -m zephyr_jax.data.feedback: generators, programmatic and LLM judges, parse failures, HTTP faults,
kill -9 and resume, settings checks, and the way through binarize into a dDPO run.

The generator and judge functions below are also loaded by the CLI tests (callable:tests.test_feedback:NAME), so
this module's top-level imports stay light."""

import asyncio
import collections
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from zephyr_jax.data import feedback, feedback_prompts
from zephyr_jax.data.backends import Call, CallableBackend, Reply
from zephyr_jax.data.binarize import ASPECTS, binarize
from zephyr_jax.data.errors import SkipCounter
from zephyr_jax.data.feedback import collect_feedback
from zephyr_jax.data.feedback_prompts import RUBRICS, TYPED_ASPECTS
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


_calls_made = itertools.count(1)  # this process's calls (next() is atomic)


def _log_call(kind: str) -> None:
    """Appends the call's kind to $FEEDBACK_CALL_LOG (the CLI tests count the calls each run makes); the
    $FEEDBACK_TEST_HOLD_FROM-th call and those after it wait for the test's kill, so the run cannot end first."""
    path = os.environ.get("FEEDBACK_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(kind + "\n")
    if next(_calls_made) >= int(os.environ.get("FEEDBACK_TEST_HOLD_FROM", sys.maxsize)):
        time.sleep(300)


def slow_right(call):
    """CLI generator (callable:tests.test_feedback:slow_right): the right sum, after a short wait."""
    time.sleep(0.04)
    _log_call("completion")
    return make_generator("right")(call)


def slow_off(call):
    time.sleep(0.04)
    _log_call("completion")
    return make_generator("off")(call)


def slow_judge(call):
    """CLI LLM judge: well-formed replies after a short wait."""
    time.sleep(0.04)
    kind = judge_request(call.messages)[0]
    _log_call("critique" if kind == "critique" else "rating")
    return well_formed(call.messages)


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
            assert c["principle"] in feedback_prompts.PRINCIPLES and c["custom_system_prompt"]
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


def test_unusable_prompts_are_counted_skips():
    rows = [{"prompt": "ok?"}, {"prompt": "  "}, {"prompt": json.loads('"half \\ud83d"')}, {"prompt": "ok?"},
            {"text": "no prompt"}, ["ok?"], {"messages": [{"role": "assistant", "content": "a reply alone"}]}]
    counter = SkipCounter()
    prompts = feedback.read_prompts(rows, counter=counter)
    assert [p.instruction for p in prompts] == ["ok?"]
    assert counter.skipped == {"empty prompt": 1, "prompt is not valid Unicode (a lone surrogate)": 1,
                               "duplicate prompt": 1, "no 'instruction', 'prompt' or 'messages' column": 1,
                               "row is not a dict": 1, "no user turn in messages": 1}


def test_a_prompt_binarize_would_refuse_is_skipped_before_any_call(tmp_path):
    # binarize refuses an instruction with special-token text ("</s>") as a bad row: judging it paid K generations,
    # 4 ratings and K critiques for nothing, and `binarize --on_bad_row=raise` stopped at feedback's own output.
    rows = [{"prompt": "What does the HTML tag <s> do?"}, *arithmetic_rows(2)[:2]]
    stats = collect_feedback(rows, pool("right", "off"), check_sum, tmp_path, completions_per_prompt=2,
                             log=lambda s: None)
    assert stats["prompts"] == 2 and stats["this_run"]["calls"]["generation"] == 4
    assert stats["input"]["reasons"] == {"prompt contains special-token text ('<s>', '</s>', '<unk>')": 1}
    assert len(binarize(load_rows(tmp_path, "train"), on_bad_row="raise")) == 2


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
    assert 0.55 < draws["helpfulness"] / 2000 < 0.65 and set(draws) == set(feedback_prompts.PRINCIPLES)
    tqa = collections.Counter(feedback.pick_principle("truthful_qa", "ultrafeedback", 0, f"p{i}", 0)[0]
                              for i in range(2000))
    assert "helpfulness" not in tqa and 0.44 < tqa["truthfulness"] / 2000 < 0.56
    assert set(feedback.pick_principle("custom", "ultrafeedback", 0, f"p{i}", 0)[0] for i in range(50)) == \
        {"helpfulness"}
    for source in ("flan_v2_niv2", "flan_v2_cot", "flan_v2_p3", "flan_v2_flan2021"):  # openbmb's FLAN names
        flan = collections.Counter(feedback.pick_principle(source, "ultrafeedback", 0, f"p{i}", 0)[0]
                                   for i in range(1000))
        assert set(flan) == {"helpfulness", "verbalized_calibration"}, source
        assert 0.15 < flan["verbalized_calibration"] / 1000 < 0.25, source
    for principle in feedback_prompts.PRINCIPLES:  # principles=<a name>: that one for all, with its own prompts
        picks = {feedback.pick_principle(source, principle, 0, f"p{i}", 0) for i in range(50)
                 for source in ("truthful_qa", "flan_v2_cot", "custom")}
        assert {name for name, _ in picks} == {principle}, principle  # (honesty too: no calibration draw)
        assert {system for _, system in picks} == set(feedback_prompts.SYSTEM_PROMPTS[principle]), principle
    assert feedback.pick_principle("truthful_qa", "none", 0, "p", 0) == ("none", "")


# ---------------------------------------------------------------------------------------------------------------
# The LLM judge: parsing, re-asks and parse failures


def test_parsers():
    typed = ("**Output for Text 2**\nType: None\nRationale: fine\nRating: 4/5\nRationale: ok\n\n"
             "### Output for Text 1\nType: 3, 1\nRationale: a\nmulti-line\nRating: 2\nRationale For Rating: b")
    assert feedback_prompts.parse_rating_reply(typed, "truthfulness", 2) == [
        {"Type": ["1", "3"], "Rationale": "a\nmulti-line", "Rating": "2", "Rationale For Rating": "b"},
        {"Type": ["None"], "Rationale": "fine", "Rating": "4", "Rationale For Rating": "ok"}]
    plain = "#### Output for Text 1\nRating: N/A\nRationale: creative\n#### Output for Text 2\nRating: 5\nRationale: x"
    assert [a["Rating"] for a in feedback_prompts.parse_rating_reply(plain, "honesty", 2)] == ["N/A", "5"]
    for bad, aspect, n in ((plain, "instruction_following", 2), (plain, "honesty", 3), ("Rating: 5", "honesty", 1),
                           (plain.replace("5", "7"), "honesty", 2), (plain.replace("5", "0"), "honesty", 2),
                           (plain.replace("x", " "), "honesty", 2)):  # ratings run 1-5: 0 and 7 are asked again
        with pytest.raises(feedback_prompts.FormatError):
            feedback_prompts.parse_rating_reply(bad, aspect, n)
    # A section without one of its lines is asked again, naming the text and the lines it needs
    with pytest.raises(feedback_prompts.FormatError, match="^text 2: expected the lines Type, Rationale, Rating, "):
        feedback_prompts.parse_rating_reply(typed.replace("Type: None\n", ""), "truthfulness", 2)
    with pytest.raises(feedback_prompts.FormatError, match="^text 1: expected the lines Rating and Rationale$"):
        feedback_prompts.parse_rating_reply(plain.replace("Rating: N/A\n", ""), "honesty", 2)
    assert feedback_prompts.parse_critique_reply("### Feedback\nGood.\nOverall Score: 1/10") == ("Good.", 1.0)
    assert feedback_prompts.parse_critique_reply("Feedback: Fine.\n**Overall Score:** 7.5") == ("Fine.", 7.5)
    for bad in ("Nice.", "Overall Score: 8", "Meh.\nOverall Score: 11", "Meh.\nOverall Score: 0.5"):  # scores 1-10
        with pytest.raises(feedback_prompts.FormatError):
            feedback_prompts.parse_critique_reply(bad)
    # A reply in \r\n lines (its headings matched nothing, so every call was re-asked and the aspect lost).
    assert feedback_prompts.parse_rating_reply(typed.replace("\n", "\r\n"), "truthfulness", 2) == \
        feedback_prompts.parse_rating_reply(typed, "truthfulness", 2)
    assert feedback_prompts.parse_critique_reply("Fine.\r\nOverall Score: 7\r\n") == ("Fine.", 7.0)
    # A judge that corrects itself in a section: its first rating was kept, the second read as rationale.
    corrected = plain.replace("Rationale: creative", "Rationale: creative\nRating: 2\nRationale: no, weak")
    with pytest.raises(feedback_prompts.FormatError, match="text 1: more than one Rating line"):
        feedback_prompts.parse_rating_reply(corrected, "honesty", 2)
    with pytest.raises(feedback_prompts.FormatError, match="text 1: more than one Type line"):
        feedback_prompts.parse_rating_reply(typed.replace("Rationale: a\n", "Rationale: a\nType: 2\n"),
                                            "truthfulness", 2)
    with pytest.raises(feedback_prompts.FormatError):  # int() of 4,301+ digits raised ValueError, which ended the run
        feedback_prompts.parse_rating_reply("#### Output for Text " + "1" * 4400 + "\nRating: 4\nRationale: ok",
                                            "honesty", 1)


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
        if n < self.bad.get((kind, instruction), 0):  # a re-ask says why, and asks for less after a cut reply
            assert n == 0 or ("does not follow the format" in call.messages[-1]["content"] and
                              "the reply was cut off at 1024 tokens" in call.messages[-1]["content"])
            return Reply("I think they are all fine.", finish_reason="length")
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


def test_failed_calls_are_made_again_on_a_rerun(tmp_path):
    rows = arithmetic_rows(3)[:3]
    broken = {"on": True}

    def flaky(call):
        if broken["on"] and _question(call) == rows[0]["prompt"]:
            raise RuntimeError("generator down")
        return make_generator("off")(call)

    def judge(call):
        kind, instruction, _ = judge_request(call.messages)
        if broken["on"] and (kind, instruction) == ("honesty", rows[1]["prompt"]):
            raise RuntimeError("judge down")
        return well_formed(call.messages)

    def run(out):  # fresh backends with the same names: the same settings
        backends = [CallableBackend(make_generator("right"), name="right"), CallableBackend(flaky, name="flaky")]
        return collect_feedback(rows, backends, CallableBackend(judge, name="judge"), out, completions_per_prompt=2,
                                log=lambda s: None)

    first = run(tmp_path / "a")
    assert first["failed_generations"] == 1 and first["failed_judge_calls"] == {"rating": 1, "critique": 0}
    row0 = load_rows(tmp_path / "a", "train")[0]
    assert [c["response"] is None for c in row0["completions"]].count(True) == 1
    written = (tmp_path / "a" / "train.jsonl").read_text()
    again = run(tmp_path / "a")  # the same failures: only the failed calls are made again (row 0's ratings of
    assert again["this_run"]["calls"] == {"generation": 1, "rating": 1, "critique": 0}  # one completion are kept)
    assert (tmp_path / "a" / "train.jsonl").read_text() == written
    broken["on"] = False
    second = run(tmp_path / "a")
    # made again: row 0's failed generation, its 4 aspect ratings (now over both completions) and the new
    # completion's critique; row 1's failed honesty rating
    assert second["this_run"]["calls"] == {"generation": 1, "rating": 4 + 1, "critique": 1}
    assert second["failed_generations"] == 0 and second["failed_judge_calls"] == {"rating": 0, "critique": 0}
    run(tmp_path / "b")  # no failures from the start
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()


# ---------------------------------------------------------------------------------------------------------------
# Settings


def test_empty_replies_are_not_judged_and_cut_off_ones_are_counted(tmp_path):
    """A generator whose reply is empty (content null, a tool call only) counted as a success, and the judge was
    paid to rate the empty text; one cut off at max_tokens went by uncounted."""
    empty = CallableBackend(lambda call: Reply("", finish_reason="tool_calls"), name="empty")
    cut = CallableBackend(lambda call: Reply(str(_sum(_question(call)) or 0) + " and the", finish_reason="length"),
                          name="cut")
    judged = []

    def judge(row, response):
        judged.append(response)
        return check_sum(row, response)

    rows = arithmetic_rows(3)[:3]
    stats = collect_feedback(rows, [empty, cut], judge, tmp_path, completions_per_prompt=2, log=lambda s: None)
    assert stats["unusable_generations"] == {"empty reply": 3} and stats["cut_off_generations"] == 3
    assert stats["failed_generations"] == 0 and stats["rated_completions"] == 3 and "" not in judged
    for row in load_rows(tmp_path, "train"):
        by_model = {c["model"]: c for c in row["completions"]}
        assert by_model["empty"]["judge_errors"] == ["not judged: empty reply"]
        assert by_model["empty"]["fine-grained_score"] is None and by_model["cut"]["fine-grained_score"] is not None


def test_the_prompts_digest_covers_the_wording_the_message_builders_add(monkeypatch):
    """A resumed run is refused when the judge would be asked otherwise: the rubric texts, and also the draw
    fallback and the wording that the functions write around them (answer format, re-ask, knowledge labels)."""
    from zephyr_jax.data import feedback_prompts as fp

    before = fp.prompts_digest()
    for name, value in (("DEFAULT_MIX", ("honesty",)), ("_answer_format", lambda aspect, n: "Answer."),
                        ("reask_message", lambda error, what: {"role": "user", "content": "Again."})):
        with monkeypatch.context() as m:
            m.setattr(fp, name, value)
            assert fp.prompts_digest() != before, name
    assert fp.prompts_digest() == before


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
    for key in ("max_tokens", "judge_max_tokens"):  # 0 was taken: replies of nothing, each judged or refused
        with pytest.raises(ValueError, match=f"{key}=0: must be at least 1"):
            collect_feedback(rows, pool("right"), check_sum, tmp_path / "z", **{key: 0}, log=lambda s: None)


def test_the_summary_says_why_input_rows_were_skipped(tmp_path):
    """It gave their number only; the reasons were in stats.json."""
    logged = []
    collect_feedback([*arithmetic_rows(2)[:2], {"text": "x"}], pool("right"), check_sum, tmp_path,
                     completions_per_prompt=1, log=logged.append)
    summary = logged[-1].splitlines()
    assert "(1 input rows skipped)" in summary[0] and summary[1].startswith("  input rows skipped: 1 x "), summary


# ---------------------------------------------------------------------------------------------------------------
# Over real HTTP: the scripted server as generators and judge, with faults


def test_scripted_server_faults_and_counts(tmp_path):
    from tests.scripted_server import ScriptedServer, drop, sleep, status, text

    from zephyr_jax.data.backends import backend_from_spec

    rows = arithmetic_rows(5)[:5]
    q = [r["prompt"] for r in rows]

    def respond(body, attempt):
        messages = body["messages"]
        if body["model"] == "judge":
            kind, instruction, payload = judge_request(messages)
            if (kind, instruction) == ("honesty", q[0]) and len(messages) == 2:
                return text("All four look honest to me.")  # malformed once; the re-ask (4 messages) is answered
            if (kind, instruction) == ("helpfulness", q[1]):
                return text("Helpful, all of them.")  # malformed every time: a parse failure
            if kind == "critique" and instruction == q[2] and is_right(instruction, payload) and attempt == 0:
                return status(429, retry_after=0.3)
            return text(well_formed(messages))
        question = messages[-1]["content"]
        total = _sum(question)
        answer = text(str(total) if body["model"] == "gen-a" else str(total + 1))
        if body["model"] == "gen-b":
            return status(500) if question == q[4] else answer  # q4: gen-b fails for good
        if attempt > 0:
            return answer
        faults = {q[0]: status(429, retry_after=0.3), q[1]: status(500), q[2]: sleep(3.6, answer), q[3]: drop()}
        return faults.get(question, answer)

    with ScriptedServer(respond) as server:
        spec = lambda model: f"endpoint:{model}@{server.base_url}"  # noqa: E731
        # timeout: q2's sleep must outlast it, and nothing else may on a loaded machine (test_endpoint's TIMEOUT)
        options = dict(concurrency=4, timeout=3.0, max_retries=2, backoff=0.01, max_backoff=1.0)
        generators = [backend_from_spec(spec(m), **options) for m in ("gen-a", "gen-b")]
        judge = backend_from_spec(spec("judge"), **options)
        stats = collect_feedback(rows, generators, judge, tmp_path, completions_per_prompt=2, parse_retries=2,
                                 concurrency=5, log=lambda s: None)
        log = list(server.log)

    by_model = collections.Counter((e["body"]["model"], e["action"]) for e in log)
    b = stats["backends"]
    assert (b["gen-a"]["retry_429"], b["gen-a"]["retry_5xx"], b["gen-a"]["retry_timeout"],
            b["gen-a"]["retry_connection"]) == (1, 1, 1, 1) == (by_model["gen-a", "429"], by_model["gen-a", "500"],
                                                                by_model["gen-a", "sleep"], by_model["gen-a", "drop"])
    assert b["gen-b"]["retries"] == by_model["gen-b", "500"] - 1 == 2 and b["gen-b"]["failures"] == 1
    assert b["judge"]["retries"] == b["judge"]["retry_429"] == by_model["judge", "429"] == 1
    for model in ("gen-a", "gen-b", "judge"):  # every HTTP request is a call or a retry
        assert sum(n for (m, _), n in by_model.items() if m == model) == b[model]["calls"] + b[model]["retries"]
    # Retry-After honoured: the retry came at least 0.3 s after the 429
    first = next(e for e in log if e["action"] == "429" and e["body"]["model"] == "gen-a")
    again = next(e for e in log if e["body"] == first["body"] and e["attempt"] == 1)
    assert again["time"] - first["time"] >= 0.3
    # parse failures and re-asks match the script: honesty q0 re-asked once, helpfulness q1 given up after 3
    assert stats["this_run"]["reasks"] == {"rating": 1 + 2, "critique": 0}
    assert stats["parse_failures"] == {"rating": 1, "critique": 0}
    assert sum(1 for e in log if e["body"]["model"] == "judge" and judge_request(e["body"]["messages"])[:2] ==
               ("helpfulness", q[1])) == 3
    # the output is complete: every prompt, both completions, q4's failed one kept with its error
    out = {r["instruction"]: r for r in load_rows(tmp_path, "train")}
    assert list(out) == q and stats["failed_generations"] == 1
    for question, row in out.items():
        assert row["models"] == ["gen-a", "gen-b"] or row["models"] == ["gen-b", "gen-a"]
        for c in row["completions"]:
            if question == q[4] and c["model"] == "gen-b":
                assert c["response"] is None and "500" in c["error"]
                continue
            assert c["response"] == str(_sum(question) + (c["model"] == "gen-b"))
            rated = {a: c["annotations"][a]["Rating"] for a in ASPECTS}
            expected = "5" if c["model"] == "gen-a" else "2"
            assert rated == {a: "N/A" if (a, question) == ("helpfulness", q[1]) else expected for a in ASPECTS}
            assert c["overall_score"] == (9.0 if c["model"] == "gen-a" else 3.0)
            assert c["completion_tokens"] == 1 and c["prompt_tokens"] > 0
    assert stats["tokens"]["prompt"] > 0 and stats["this_run"]["failed_calls"] == {"generation": 1, "rating": 0,
                                                                                    "critique": 0}


# ---------------------------------------------------------------------------------------------------------------
# The CLI: kill -9 at several points, then the same command again


def _cli(tmp_path, out, log, *extra, kill_at=None):
    """Runs the CLI on 8 prompts (K=2: 16 generations, 32 ratings, 16 critiques = 64 journal lines); with
    `kill_at`, SIGKILLs it once its journal holds that many lines. Returns (returncode, stdout + stderr)."""
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(8)[:8]))
    cmd = [sys.executable, "-m", "zephyr_jax.data.feedback", f"--prompts={prompts}", f"--output={out}",
           "--generators=callable:tests.test_feedback:slow_right",
           "--generators=callable:tests.test_feedback:slow_off", "--judge=callable:tests.test_feedback:slow_judge",
           "--completions_per_prompt=2", "--concurrency=2", *extra]
    with open(tmp_path / "output.txt", "w") as output:
        # With kill_at, the 64th call waits for the kill: the run's last 9 calls took 0.2 s, which a loaded
        # machine's pause of this poll can outlast (up to 100-305 ms a minute on 2 busy cores): a finished run.
        hold = {"FEEDBACK_TEST_HOLD_FROM": "64"} if kill_at is not None else {}
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "FEEDBACK_CALL_LOG": str(log), **hold},
                                stdout=output, stderr=subprocess.STDOUT)
        try:
            if kill_at is not None:
                journal, deadline = out / "journal.jsonl", time.time() + 120
                while not (journal.exists() and journal.read_bytes().count(b"\n") >= kill_at):
                    assert proc.poll() is None, f"finished before {kill_at} journal lines"
                    assert time.time() < deadline
                    time.sleep(0.003)
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=120)
        finally:  # a failed check or a timeout leaves no run behind
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, (tmp_path / "output.txt").read_text()


def _journaled(out) -> collections.Counter:
    """Whole journal lines by kind (a line cut by the kill is not whole, and is done again)."""
    data = (out / "journal.jsonl").read_bytes()
    return collections.Counter(json.loads(line)["key"][0] for line in data[:data.rfind(b"\n") + 1].splitlines())


def _calls(log) -> collections.Counter:
    return collections.Counter(log.read_text().split()) if log.exists() else collections.Counter()


def test_cli_kill_9_and_resume_equals_uninterrupted_run(tmp_path):
    whole = tmp_path / "whole"
    code, err = _cli(tmp_path, whole, tmp_path / "whole.log")
    assert code == 0, err[-3000:]
    total = _calls(tmp_path / "whole.log")
    assert total == {"completion": 16, "rating": 32, "critique": 16}
    expected = (whole / "train.jsonl").read_text().splitlines()

    out = tmp_path / "killed"
    for i, kill_at in enumerate((1, 20, 55)):
        code, err = _cli(tmp_path, out, tmp_path / f"run{i}.log", kill_at=kill_at)
        assert code == -signal.SIGKILL and not (out / "train.jsonl").exists(), err[-3000:]
        done = _journaled(out)
        assert sum(done.values()) >= kill_at
        code, err = _cli(tmp_path, out, tmp_path / f"resume{i}.log")  # the same command, to the end
        assert code == 0, err[-3000:]
        assert "resuming" in err
        # journaled calls are not made again; every other one is made once
        assert _calls(tmp_path / f"resume{i}.log") == {k: n - done[k] for k, n in total.items() if n > done[k]}
        assert (out / "train.jsonl").read_text().splitlines() == expected  # row by row
        (out / "train.jsonl").unlink()
        os.rename(out / "journal.jsonl", tmp_path / f"journal{i}.jsonl")  # the next kill starts from nothing
        (out / "journal.jsonl.settings.json").unlink()
    stats = json.load(open(whole / "stats.json"))
    assert stats["prompts"] == 8 and stats["this_run"]["resumed_calls"] == 0

    # other settings are refused, naming the difference; --overwrite starts afresh
    code, err = _cli(tmp_path, whole, tmp_path / "refused.log", "--seed=7")
    assert code == 2 and "seed: 42 on disk, 7 now" in err and "--overwrite" in err
    assert not _calls(tmp_path / "refused.log")
    code, err = _cli(tmp_path, whole, tmp_path / "fresh.log", "--seed=7", "--overwrite")
    assert code == 0, err[-3000:]
    assert _calls(tmp_path / "fresh.log") == total


# ---------------------------------------------------------------------------------------------------------------
# Feedback -> binarize -> dDPO


def test_feedback_output_binarizes_and_trains_dpo(tmp_path):
    from zephyr_jax import train
    from zephyr_jax.config_common import load_config
    from zephyr_jax.data import binarize as binarize_cli

    aif, prefs = tmp_path / "aif", tmp_path / "prefs"
    collect_feedback(arithmetic_rows(24), pool("right", "verbose", "off", "wrong"), check_sum, aif,
                     log=lambda s: None)
    counts = binarize_cli.main([f"--input={aif}", "--split=train", f"--output={prefs}", "--test_size=4"])
    assert counts["train_prefs"] == 20 and counts["test_prefs"] == 4 and counts["skipped"] == 1  # the all-tie row
    cfg = load_config(os.path.join(ROOT, "configs", "dpo.py:tiny"), **{
        "data.train": str(prefs), "data.eval": str(prefs), "train.progress": False, "logging.tensorboard": False,
        "train.max_steps": 2, "train.eval_every": 0, "train.save_every": 0})
    train.run(cfg, str(tmp_path / "dpo"))
    records = [json.loads(line) for line in open(tmp_path / "dpo" / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 2 and all(0 < loss < 10 for loss in losses)


# ---------------------------------------------------------------------------------------------------------------
# The engine in-process (the demo's on-policy path): a tiny random model as generator and as a garbage judge


def test_engine_on_policy_samples_and_garbage_judge(tiny_model_dir, tmp_path):
    from zephyr_jax.data.backends import EngineBackend, backend_from_spec

    engine = EngineBackend.from_path(tiny_model_dir, dtype="float32", max_slots=4, max_length=1024)
    try:
        rows = arithmetic_rows(1)[:1]
        stats = collect_feedback(rows, [engine], engine, tmp_path, completions_per_prompt=2, principles="none",
                                 max_tokens=6, judge_max_tokens=8, parse_retries=1, log=lambda s: None)
        scored = collect_feedback(rows, [engine], check_sum, tmp_path / "programmatic", completions_per_prompt=2,
                                  principles="none", max_tokens=6, log=lambda s: None)
        # A chat template that refuses a system turn (as some models' do) fails the call, not the run: its
        # jinja2 TemplateError escaped Backend.complete.
        template, engine.tokenizer.chat_template = engine.tokenizer.chat_template, (
            "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
            "{% endif %}{{ m['content'] }}{% endfor %}")
        try:
            refused = asyncio.run(engine.complete(Call(messages=[{"role": "system", "content": "Be brief."},
                                                                 {"role": "user", "content": "Hi"}])))
        finally:
            engine.tokenizer.chat_template = template
        assert refused.text is None and "chat template cannot render this call: TemplateError: System role not " \
            "supported" in refused.error
        # A call cancelled (a run stopped midway: asyncio.run cancels its tasks) cancels its request. It ran on to
        # its max_tokens, holding its slot, then called into the closed event loop.
        submitted, submit, eos = [], engine.engine.submit, engine.engine.eos_id
        engine.engine.submit, engine.engine.eos_id = lambda r: submitted.append(r) or submit(r), None

        async def stopped():
            task = asyncio.create_task(engine.complete(Call(prompt="Hi", max_tokens=900)))
            while not (submitted and submitted[0].generated):
                await asyncio.sleep(0.01)
            task.cancel()

        try:
            asyncio.run(stopped())
            assert submitted[0].done.wait(20) and submitted[0].finish_reason == "cancelled", submitted[0].generated
        finally:
            engine.engine.submit, engine.engine.eos_id = submit, eos
        # An engine whose thread could not go on (no cache could be made again) refuses every call: the run stops,
        # as at an endpoint that refuses every call, with the CLIs' one-line error (it was a RuntimeError's traceback).
        from zephyr_jax.data.endpoint import EndpointRefused

        engine.engine.stopped_by = "MemoryError: RESOURCE_EXHAUSTED"
        try:
            with pytest.raises(EndpointRefused, match=rf"^{re.escape(engine.name)}: every call is refused: the "
                                                      r"engine's thread stopped \(MemoryError: RESOURCE_EXHAUSTED\)"):
                asyncio.run(engine.complete(Call(prompt="Hi", max_tokens=2)))
        finally:
            engine.engine.stopped_by = None
    finally:
        engine.close()
    # garbage ratings: every judge call is re-asked once, then counted as a parse failure; nothing crashes
    assert stats["parse_failures"] == {"rating": 4, "critique": 2}
    assert stats["this_run"]["reasks"] == {"rating": 4, "critique": 2}
    assert stats["backends"][engine.name]["calls"] == 2 + 2 * (4 + 2)
    out = load_rows(tmp_path, "train")
    for row in out:  # one model sampled K times, each sample with its own seed
        assert row["models"] == [engine.name] * 2 and len({c["seed"] for c in row["completions"]}) == 2
        assert all(isinstance(c["response"], str) and c["completion_tokens"] > 0 for c in row["completions"])
        assert all(len(c["judge_errors"]) == 5 for c in row["completions"])  # 4 aspects + the critique
    # the same seeds give the same on-policy samples, whatever the judge
    again = load_rows(tmp_path / "programmatic", "train")
    assert [c["response"] for r in again for c in r["completions"]] == \
        [c["response"] for r in out for c in r["completions"]]
    assert scored["judge_errors"] == 0
    # The CLIs' --mesh: the engine's model (and its cache) over this host's devices (8 here).
    sharded = backend_from_spec(f"engine:{tiny_model_dir}", dtype="float32", max_slots=4, mesh="1,4,2")
    try:
        assert len(sharded.engine.cache.k.sharding.device_set) == 8
        on_mesh = collect_feedback(rows, [sharded], check_sum, tmp_path / "mesh", completions_per_prompt=2,
                                   principles="none", max_tokens=6, log=lambda s: None)
    finally:
        sharded.close()
    assert on_mesh["judge_errors"] == 0 and len(load_rows(tmp_path / "mesh", "train")) == 1


def test_an_engine_on_a_training_workdir_is_named_with_its_checkpoint_step(data_dir, tmp_path):
    """engine:workdirs/sft was named "sft" whatever its latest step: a feedback journal resumed after the workdir
    gained a checkpoint went on under the same name with another model's completions."""
    from tests.test_train import tiny_config
    from zephyr_jax import train
    from zephyr_jax.data.backends import backend_from_spec

    workdir = tmp_path / "sft"
    train.run(tiny_config("sft", data_dir, **{"train.max_steps": 2, "train.eval_every": 0, "train.save_every": 1}),
              str(workdir))
    engine = backend_from_spec(f"engine:{workdir}", dtype="float32", max_slots=2, max_length=256)
    try:
        assert engine.name == "sft@step2"
        reply = asyncio.run(engine.complete(Call(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)))
        assert reply.ok
    finally:
        engine.close()


def test_programmatic_judge_errors_are_counted_not_fatal(tmp_path):
    rows = arithmetic_rows(3)[:3]

    def judge(row, response):
        if row["prompt"] == rows[0]["prompt"]:
            raise KeyError("answer")
        if row["prompt"] == rows[1]["prompt"]:
            return 7  # out of range
        return {"helpfulness": 4, "honesty": 2}  # two aspects; the others stay "N/A"

    stats = collect_feedback(rows, pool("right", "off"), judge, tmp_path, completions_per_prompt=2,
                             log=lambda s: None)
    assert stats["judge_errors"] == 4 and "KeyError" in stats["this_run"]["first_errors"]["judge"]
    out = list(load_rows(tmp_path, "train"))
    for row in out[:2]:
        assert all(c["overall_score"] is None and len(c["judge_errors"]) == 1 for c in row["completions"])
    ratings = {a: out[2]["completions"][0]["annotations"][a]["Rating"] for a in ASPECTS}
    assert ratings == {"instruction_following": "N/A", "honesty": "2", "truthfulness": "N/A", "helpfulness": "4"}
    assert out[2]["completions"][0]["overall_score"] == 1 + 9 * (3 - 1) / 4  # from the mean rating, 3


def test_programmatic_ratings_may_be_numpy_numbers():
    import numpy as np

    for value, shown in ((np.int64(5), "5"), (np.float32(4.5), "4.5"), (3, "3"), ({"honesty": np.float64(2)}, "2")):
        annotations = feedback.programmatic_annotations(value, "checker")
        assert annotations["honesty"]["Rating"] == shown
    with pytest.raises(ValueError, match="is not a number from 1 to 5"):
        feedback.programmatic_annotations(np.int64(6), "checker")
    # A reward model's close scores stay apart: written with 6 digits (and overall_score rounded to 4 places) they
    # tied, and binarize skipped the prompt.
    close = [feedback.programmatic_annotations(x, "rm") for x in (4.1234564, 4.1234561)]
    assert [a["helpfulness"]["Rating"] for a in close] == ["4.1234564", "4.1234561"]
    completions = [{"response": text, "annotations": a, "overall_score": feedback.overall_from_mean(
        feedback.mean_rating(a))} for text, a in zip("AB", close)]
    for rank_by in ("mean", "overall"):
        (pair,) = binarize([{"instruction": "q", "completions": completions}], rank_by=rank_by)
        assert (pair["chosen"][1]["content"], pair["rejected"][1]["content"]) == ("A", "B"), rank_by


def test_cli_fails_when_every_generation_failed(tmp_path, capsys):
    """It exited 0 with a warning, so `feedback && binarize && train` went on with completions that were errors."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in arithmetic_rows(2)[:2]))
    with pytest.raises(SystemExit) as exit_:
        feedback.main([f"--prompts={prompts}", f"--output={tmp_path / 'out'}", "--completions_per_prompt=2",
                       "--generators=callable:tests.test_dialogues:unreachable",
                       "--judge=callable:tests.test_feedback:slow_judge"])
    assert exit_.value.code == 1
    assert re.search(r"error: every one of the 4 generations failed \(first errors: .*connection refused",
                     capsys.readouterr().err)
    # A judge whose every call fails (a wrong key) left no rating to binarize, and exited 0
    with pytest.raises(SystemExit) as exit_:
        feedback.main([f"--prompts={prompts}", f"--output={tmp_path / 'unjudged'}", "--completions_per_prompt=2",
                       "--generators=callable:tests.test_feedback:slow_right",
                       "--judge=callable:tests.test_dialogues:unreachable", "--parse_retries=0", "--max_retries=0"])
    assert exit_.value.code == 1
    assert re.search(r"error: none of the 4 completions judged got a rating \(first errors: .*connection refused",
                     capsys.readouterr().err)
    # Every reply empty (a reasoning model cut off before its answer): the judge was never called, yet the warning
    # said every judge call failed and the error spoke of "none of the 0 completions judged"
    with pytest.raises(SystemExit) as exit_:
        feedback.main([f"--prompts={prompts}", f"--output={tmp_path / 'empty'}", "--completions_per_prompt=2",
                       "--generators=callable:tests.test_feedback:empty_reply",
                       "--judge=callable:tests.test_feedback:slow_judge"])
    assert exit_.value.code == 1
    captured = capsys.readouterr()
    assert "WARNING: no generation could be judged (0 failed, 4 empty reply)" in captured.out
    assert "judge call" not in captured.out
    assert "error: none of the 4 generations could be judged (0 failed, 4 empty reply)" in captured.err


def empty_reply(call):
    """CLI generator: no content (a reasoning model cut off before its answer, a tool call only)."""
    return Reply("", finish_reason="length")


def test_cli_on_bad_row_raise_stops_at_the_row_before_any_call(tmp_path, capsys):
    """The CLI always skipped a row without a prompt (on_bad_row was the Python call's only)."""
    prompts = tmp_path / "prompts.jsonl"
    rows = arithmetic_rows(2)[:2]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in [rows[0], {"prompt": "  "}, rows[1]]))
    argv = [f"--prompts={prompts}", "--completions_per_prompt=1",
            "--generators=callable:tests.test_feedback:slow_right", "--judge=callable:tests.test_feedback:slow_judge"]
    with pytest.raises(SystemExit) as exit_:
        feedback.main([*argv, f"--output={tmp_path / 'strict'}", "--on_bad_row=raise"])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.endswith(f"\nerror: row 2 of {prompts}:train: empty prompt\n")
    assert not (tmp_path / "strict").exists()  # nothing called, no journal
    stats = feedback.main([*argv, f"--output={tmp_path / 'lenient'}"])
    assert stats["input"] == {"kept": 2, "skipped": 1, "reasons": {"empty prompt": 1}}


def test_cli_refuses_bad_numbers_before_an_engine_loads(tmp_path, capsys, monkeypatch):
    """They were checked inside collect_feedback, after every engine: backend had loaded its model (minutes); so
    was a missing --prompts source found."""
    from zephyr_jax.data import backends

    def no_load(*args, **kw):
        raise AssertionError("an engine model was loaded before the arguments were checked")

    monkeypatch.setattr(backends.EngineBackend, "from_path", no_load)
    argv = [f"--prompts={tmp_path / 'prompts.jsonl'}", f"--output={tmp_path / 'out'}", "--generators=engine:sft",
            "--judge=engine:judge"]
    for flag, message in (("--completions_per_prompt=0", "need completions_per_prompt >= 1, parse_retries >= 0 "
                                                         "and concurrency >= 1, got 0, 10, 16"),
                          ("--concurrency=0", "got 4, 10, 0"), ("--max_tokens=0", "max_tokens=0: must be at least 1"),
                          ("--principles=helpful", "principles='helpful'; expected ultrafeedback"),
                          ("--limit=0", "limit=0: must be at least 1"),
                          # (read by nothing before: a negative or nan price gave that cost estimate)
                          ("--judge_price=2.5", "argument --judge_price: '2.5' is not IN,OUT (prices per million"),
                          ("--generator_price=-1,5", "argument --generator_price: '-1,5': prices per million tokens "
                                                     "are finite and at least 0"),
                          ("--judge_price=nan,10", "'nan,10': prices per million tokens are finite"),
                          ("--judge_price=1,-2", "'1,-2': prices per million"),  # (each of the two is checked)
                          ("--generator_price=3,inf", "'3,inf': prices per million tokens are finite")):
        with pytest.raises(SystemExit) as exit_:
            feedback.main([*argv, flag])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, flag
    args = feedback._parser().parse_args([*argv, "--judge_price=0,0", "--generator_price=0.15,6e-1"])  # (a free one)
    assert (args.judge_price, args.generator_price) == ((0.0, 0.0), (0.15, 0.6))
    with pytest.raises(SystemExit) as exit_:  # a --judge_fn that does not import: after the generators' load too
        feedback.main([*argv[:3], "--judge_fn=no_such_module:judge"])
    assert exit_.value.code == 2 and "cannot load 'no_such_module:judge'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (tmp_path / "notes").write_text("mine")  # (an error from the journal's folder, after the models' load)
    with pytest.raises(SystemExit):
        feedback.main([*argv, f"--output={tmp_path / 'notes'}"])
    assert f"--output={tmp_path / 'notes'}: {tmp_path / 'notes'} is a file, not a directory" in \
        capsys.readouterr().err
    # --prompts not there: it was read only once every engine had loaded its model.
    for prompts, message in ((tmp_path / "prompts.jsonl", f"no data file matches '{tmp_path / 'prompts.jsonl'}'"),
                             (tmp_path, f"no data files for split 'train' in {tmp_path}"),
                             (tmp_path / "no_dir", f"'{tmp_path / 'no_dir'}' is neither a directory nor a")):
        with pytest.raises(SystemExit) as exit_:
            feedback.main([f"--prompts={prompts}", *argv[1:]])
        assert exit_.value.code == 2 and message in capsys.readouterr().err, prompts


def test_one_generator_where_a_pool_belongs_is_named(tmp_path):
    """A Backend passed as `generators` failed with "'CallableBackend' object is not iterable"."""
    with pytest.raises(ValueError, match="generators must be a non-empty list of Backend objects"):
        collect_feedback(arithmetic_rows(2), CallableBackend(slow_right), slow_judge, tmp_path)
    # And the judge's other forms, and a call from inside a running event loop (a notebook's): each named
    with pytest.raises(ValueError, match=r"^a judge is needed: a Backend \(LLM judge\) or a function"):
        collect_feedback(arithmetic_rows(2), pool("right"), None, tmp_path)
    with pytest.raises(ValueError, match=r"^judge 5 is neither a Backend nor a function nor 'module:function'$"):
        collect_feedback(arithmetic_rows(2), pool("right"), 5, tmp_path)

    async def in_a_notebook():
        return collect_feedback(arithmetic_rows(2), pool("right"), slow_judge, tmp_path)
    with pytest.raises(RuntimeError, match=r"inside a running event loop .*use `await collect_feedback_async"):
        asyncio.run(in_a_notebook())
    assert not any(tmp_path.iterdir())  # refused before the journal
    # A judge and a generator of one model name (at other URLs): the stats keep both, the second one numbered
    assert list(feedback._backend_stats(pool("right", "right"))) == ["right", "right#2"]


# --- Found by mutation testing: parsers and feedback runs that were untested at these edges. ---

def test_hallucination_and_informativeness_types_run_1_to_3():
    ok = "#### Output for Text 1\nType: 1, 3\nRationale: r\nRating: 4\nRationale For Rating: x"
    assert feedback_prompts.parse_rating_reply(ok, "truthfulness", 1)[0]["Type"] == ["1", "3"]
    for bad in ("4", "1, 4", "0"):
        with pytest.raises(feedback_prompts.FormatError):
            feedback_prompts.parse_rating_reply(ok.replace("Type: 1, 3", f"Type: {bad}"), "truthfulness", 1)


def test_a_text_rated_twice_is_a_format_error():
    sec = "#### Output for Text {}\nRating: {}\nRationale: r\n"
    rated = feedback_prompts.parse_rating_reply(sec.format(1, 2) + sec.format(2, 4), "honesty", 2)
    assert [a["Rating"] for a in rated] == ["2", "4"]
    with pytest.raises(feedback_prompts.FormatError, match="found 1, 1, 2"):
        feedback_prompts.parse_rating_reply(sec.format(1, 2) + sec.format(1, 5) + sec.format(2, 4), "honesty", 2)


def test_an_overall_score_of_0_is_a_format_error():
    assert feedback_prompts.parse_critique_reply("Weak.\nOverall Score: 1") == ("Weak.", 1.0)
    for score in ("0", "0.5"):
        with pytest.raises(feedback_prompts.FormatError, match="not between 1 and 10"):
            feedback_prompts.parse_critique_reply(f"Weak.\nOverall Score: {score}")


def test_world_knowledge_goes_to_truthfulness_and_helpfulness_only():
    knowledge = 'Some correct answers: ["c"]'
    shown = {a: "Some correct answers" in feedback_prompts.rating_messages(a, "q", ["t"], knowledge)[1]["content"]
             for a in ("instruction_following", "honesty", "truthfulness", "helpfulness")}
    assert shown == {"instruction_following": False, "honesty": False, "truthfulness": True, "helpfulness": True}


def test_honesty_becomes_verbalized_calibration_one_time_in_ten():
    draws = collections.Counter(feedback.pick_principle("truthful_qa", "ultrafeedback", 0, f"p{i}", 0)[0]
                                for i in range(4000))
    assert 0.03 < draws["verbalized_calibration"] / 4000 < 0.08  # 0.5 * 0.1
    assert 0.40 < draws["honesty"] / 4000 < 0.50


def test_a_failed_critique_call_is_made_again_on_a_rerun(tmp_path):
    rows = arithmetic_rows(2)[:2]
    broken = {"on": True}

    def judge(call):
        kind, instruction, _ = judge_request(call.messages)
        if broken["on"] and kind == "critique" and instruction == rows[0]["prompt"]:
            raise RuntimeError("judge down")
        return well_formed(call.messages)

    def run():
        return collect_feedback(rows, pool("right", "off"), CallableBackend(judge, name="judge"), tmp_path,
                                completions_per_prompt=2, log=lambda s: None)
    first = run()
    assert first["failed_judge_calls"] == {"rating": 0, "critique": 2}
    broken["on"] = False
    second = run()
    assert second["this_run"]["calls"] == {"generation": 0, "rating": 0, "critique": 2}
    assert second["failed_judge_calls"] == {"rating": 0, "critique": 0}


def test_tokens_of_reasked_judge_replies_are_counted(tmp_path):
    seen = set()

    def judge(call):
        kind, instruction, _ = judge_request(call.messages)
        if kind == "honesty" and kind not in seen:
            seen.add(kind)
            return Reply("not the format", prompt_tokens=100, completion_tokens=50)
        return Reply(well_formed(call.messages), prompt_tokens=10, completion_tokens=5)

    rows = arithmetic_rows(1)[:1]
    stats = collect_feedback(rows, pool("right"), CallableBackend(judge, name="judge"), tmp_path,
                             completions_per_prompt=1, log=lambda s: None)
    assert stats["this_run"]["reasks"]["rating"] == 1
    # a fresh run: the output's tokens are every call's, re-asks and critiques included
    for k in ("prompt", "completion"):
        assert stats["tokens"][k] == sum(b[f"{k}_tokens"] for b in stats["backends"].values()), k


def test_a_parse_failure_is_not_a_failed_call(tmp_path):

    def judge(call):
        kind, _, _ = judge_request(call.messages)
        return "not the format" if kind in ("honesty", "critique") else well_formed(call.messages)

    stats = collect_feedback(arithmetic_rows(1)[:1], pool("right"), CallableBackend(judge, name="judge"), tmp_path,
                             completions_per_prompt=1, parse_retries=0, log=lambda s: None)
    assert stats["parse_failures"] == {"rating": 1, "critique": 1}
    assert stats["failed_judge_calls"] == {"rating": 0, "critique": 0}


def test_a_programmatic_rating_below_1_is_an_error():
    assert feedback.programmatic_annotations(1, "f")["honesty"]["Rating"] == "1"
    for bad in (0, 0.5, 5.5, {"honesty": 0}):
        with pytest.raises(ValueError, match="not a number from 1 to 5"):
            feedback.programmatic_annotations(bad, "f")
    with pytest.raises(ValueError, match=r"unknown aspects \['helpful'\]; expected some of \('instruction_follow"):
        feedback.programmatic_annotations({"helpful": 5, "honesty": 4}, "f")  # a misspelt aspect, not ignored


def test_prompts_keep_only_the_columns_the_run_reads():
    """Every prompt kept its whole input row for the run: with raw UltraFeedback as the prompts (each row holding its
    4 rated completions), 16,000 prompts held 0.44 GB, and reading them formatted every completion (8 s). An LLM
    judge reads the answer columns only; a programmatic judge gets the whole row."""
    import datasets

    rows = [{"instruction": f"q{i}", "source": "truthful_qa", "correct_answers": ["yes"], "incorrect_answers": [],
             "completions": [{"response": "r" * 1000}] * 4} for i in range(3)]
    table = datasets.Dataset.from_list(rows)
    for given in (rows, table):
        prompts = feedback.read_prompts(given, counter=SkipCounter())
        assert [(p.instruction, p.source, p.row) for p in prompts] == [
            (f"q{i}", "truthful_qa", {"correct_answers": ["yes"], "incorrect_answers": []}) for i in range(3)]
        whole = feedback.read_prompts(given, counter=SkipCounter(), whole_rows=True)
        assert [p.row for p in whole] == rows
    # A Dataset's prompt is still found in each column it may come from ("instruction", "prompt", "messages").
    for column, value in (("prompt", "q"), ("messages", [{"role": "user", "content": "q"}])):
        table = datasets.Dataset.from_list([{column: value, "completions": ["r"]}])
        assert [p.instruction for p in feedback.read_prompts(table, counter=SkipCounter())] == ["q"], column


def test_limit_is_the_number_of_prompts_used(tmp_path):
    rows = [{"prompt": f"q{i}"} for i in range(5)]
    assert [p.instruction for p in feedback.read_prompts(rows, limit=2, counter=SkipCounter())] == ["q0", "q1"]
    assert feedback.read_prompts(rows, limit=0, counter=SkipCounter()) == []
    for bad in (0, -1):  # a setting that reads no prompt is named, not reported as "no usable prompt in rows"
        with pytest.raises(ValueError, match=f"limit={bad}: must be at least 1"):
            collect_feedback(rows, pool("right"), check_sum, tmp_path, limit=bad, log=lambda s: None)


def test_another_k_is_refused_on_resume(tmp_path):
    from zephyr_jax.data.journal import SettingsMismatch
    rows = arithmetic_rows(1)[:1]
    collect_feedback(rows, pool("right", "off"), check_sum, tmp_path, completions_per_prompt=2, log=lambda s: None)
    with pytest.raises(SettingsMismatch, match=r"k: 2 on disk, 3 now"):
        collect_feedback(rows, pool("right", "off"), check_sum, tmp_path, completions_per_prompt=3,
                         log=lambda s: None)


def test_more_prompts_reuse_what_is_done(tmp_path):
    """The prompts are not a setting (module docstring): a rerun with a larger --limit makes only the new
    prompts' calls, and writes what one run over all of them writes."""
    rows = arithmetic_rows(3)[:3]

    def run(out, n):
        judge = CallableBackend(lambda call: well_formed(call.messages), name="judge")
        return collect_feedback(rows[:n], pool("right", "off"), judge, out, completions_per_prompt=2,
                                log=lambda s: None)

    two = run(tmp_path / "a", 2)["this_run"]["calls"]
    three = run(tmp_path / "a", 3)["this_run"]
    assert three["calls"] == {kind: n // 2 for kind, n in two.items()}
    assert three["resumed_calls"] == sum(two.values())
    assert len(load_rows(tmp_path / "a", "train")) == 3
    run(tmp_path / "b", 3)
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()


def test_instruction_is_read_before_prompt():
    messages = [{"role": "user", "content": "c"}]
    assert feedback.instruction_of({"instruction": "a", "prompt": "b", "messages": messages}, 0) == "a"
    assert feedback.instruction_of({"prompt": "b", "messages": messages}, 0) == "b"


def test_an_empty_reply_cut_at_max_tokens_is_not_a_cut_off_generation(tmp_path):
    empty = CallableBackend(lambda call: Reply("", finish_reason="length"), name="empty")
    stats = collect_feedback(arithmetic_rows(2)[:2], [empty], check_sum, tmp_path, completions_per_prompt=1,
                             log=lambda s: None)
    assert stats["unusable_generations"] == {"empty reply": 2} and stats["cut_off_generations"] == 0
