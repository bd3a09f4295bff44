"""AI-feedback binarization of raw UltraFeedback rows, on a hand-checked fixture and on random rows."""

import hashlib
import json
import math
import os
import random
import re

import pytest
from hypothesis import HealthCheck, Phase, event, find, given, settings
from hypothesis import strategies as st

from zephyr_jax.data.binarize import ASPECTS, binarize, binarize_row, completion_score, main, train_test_split
from zephyr_jax.data.conversation import SPECIAL_TEXTS, check_messages
from zephyr_jax.data.errors import BadRow, SkipCounter, handle_bad_row
from zephyr_jax.data.sources import load_rows


def completion(name, ratings, overall, response=None):
    """A raw UltraFeedback completion; ratings are the four aspect ratings (str "1".."5" or "N/A")."""
    return {
        "model": f"model-{name}",
        "principle": "helpfulness",
        "custom_system_prompt": "",
        "response": response if response is not None else f"answer {name}",
        "annotations": {a: {"Rating": str(r), "Rationale": "because"} for a, r in zip(ASPECTS, ratings)},
        "fine-grained_score": 0.0,  # not used for ranking
        "critique": "ok",
        "overall_score": float(overall),
    }


def raw_row(instruction, completions, source="evol_instruct"):
    return {"source": source, "instruction": instruction, "models": [c["model"] for c in completions],
            "completions": completions, "correct_answers": ["none"], "incorrect_answers": ["none"]}


def fixture_rows():
    return [
        # 0 normal: means A 4.5, B 3, C 2, D 4
        raw_row("Normal?", [completion("A", [5, 4, 5, 4], 8), completion("B", [3, 3, 3, 3], 5),
                            completion("C", [2, 2, 2, 2], 3), completion("D", [4, 4, 4, 4], 7)]),
        # 1 "N/A" ratings are ignored: A 5.0, B 4.0, C no numeric rating (unusable by mean), D 3.0
        raw_row("N/A?", [completion("A", [5, "N/A", "N/A", 5], 9), completion("B", [4, 4, 4, 4], 7),
                         completion("C", ["N/A"] * 4, 5), completion("D", [3, 3, "N/A", 3], 6)]),
        # 2 tie at the top: A 4, B 4.5, C 4.5, D 2 -> chosen B (first maximum); C (tied) is never rejected
        raw_row("Tie?", [completion("A", [4, 4, 4, 4], 7), completion("B", [5, 4, 5, 4], 8),
                         completion("C", [4, 5, 4, 5], 8), completion("D", [2, 2, 2, 2], 3)]),
        # 3 all equal -> skipped
        raw_row("Equal?", [completion(x, [3, 3, 3, 3], 6) for x in "ABCD"]),
        # 4 a single completion -> skipped
        raw_row("Single?", [completion("A", [5, 5, 5, 5], 9)]),
        # 5 empty instruction -> skipped
        raw_row("   ", [completion("A", [5, 5, 5, 5], 9), completion("B", [1, 1, 1, 1], 2)]),
        # 6 mean and overall disagree: mean A 5, B 3, C 4; overall A 6, B 9, C 7
        raw_row("Disagree?", [completion("A", [5, 5, 5, 5], 6), completion("B", [3, 3, 3, 3], 9),
                              completion("C", [4, 4, 4, 4], 7)]),
        # 7 from truthful_qa: A 5 beats B 1 either way
        raw_row("Truthful?", [completion("A", [5, 5, 5, 5], 9), completion("B", [1, 1, 1, 1], 2)],
                source="truthful_qa"),
        # 8 two completions, the better one second
        raw_row("Second?", [completion("A", [2, 2, 2, 2], 4), completion("B", [4, 4, 4, 4], 8)]),
    ]


# Hand-checked: row -> (chosen, the eligible rejected in list order, score_chosen) for each ranking.
EXPECTED = {
    "mean": {0: ("A", "BCD", 4.5), 1: ("A", "BD", 5.0), 2: ("B", "AD", 4.5), 6: ("A", "BC", 5.0),
             7: ("A", "B", 5.0), 8: ("B", "A", 4.0)},
    "overall": {0: ("A", "BCD", 8.0), 1: ("A", "BCD", 9.0), 2: ("B", "AD", 8.0), 6: ("B", "AC", 9.0),
                7: ("A", "B", 9.0), 8: ("B", "A", 8.0)},
}
SKIPS = {"no other response scores below the best": 1, "fewer than 2 usable completions": 1,
         "empty instruction": 1}


def reply(pair):
    return pair[-1]["content"]


@pytest.mark.parametrize("rank_by", ["mean", "overall"])
def test_fixture_by_hand(rank_by):
    counter = SkipCounter("fixture")
    out = binarize(fixture_rows(), rank_by=rank_by, seed=42, counter=counter)
    expected = EXPECTED[rank_by]
    assert len(out) == len(expected)
    rng = random.Random(42)  # documented: one rng.choice over the eligible completions per kept row, in order
    for row, (index, (chosen, eligible, score)) in zip(out, sorted(expected.items())):
        prompt = fixture_rows()[index]["instruction"]
        assert row["prompt"] == prompt
        assert row["prompt_id"] == hashlib.sha256(prompt.encode()).hexdigest()
        assert row["chosen"] == [{"role": "user", "content": prompt},
                                 {"role": "assistant", "content": f"answer {chosen}"}]
        assert row["messages"] == row["chosen"]
        assert row["rejected"][0] == {"role": "user", "content": prompt}
        assert reply(row["rejected"]) == f"answer {rng.choice(eligible)}"
        assert row["score_chosen"] == score
        assert row["score_rejected"] < row["score_chosen"]
    assert counter.kept == len(expected)
    assert counter.as_dict() == {"kept": len(expected), "skipped": 3, "reasons": SKIPS}
    assert counter.summary().startswith("skipped 3 of 9 rows of fixture:\n")


def test_scores():
    rows = fixture_rows()
    assert completion_score(rows[1]["completions"][0]) == 5.0
    assert completion_score(rows[1]["completions"][2]) is None  # all "N/A"
    assert completion_score(rows[1]["completions"][2], "overall") == 5.0
    assert completion_score(rows[6]["completions"][1], "overall") == 9.0
    off = {"response": "a", "overall_score": 11, "annotations": {a: {"Rating": "50"} for a in ASPECTS}}
    huge = {"response": "a", "overall_score": 10 ** 400, "annotations": {a: {"Rating": -10 ** 400} for a in ASPECTS}}
    # a corrupt rating must not decide the pair; the reason names it among the row's 4 x 4 ratings
    for rank_by, field, scale in (("mean", "annotations.instruction_following.Rating", "1-5"),
                                  ("overall", "overall_score", "1-10")):
        for bad in (off, huge):  # huge: an int no float holds raised OverflowError out of the CLI
            with pytest.raises(BadRow, match=rf"^row 5: completions\[0\]\.{re.escape(field)}=\S+ is outside {scale}$"):
                binarize_row({"instruction": "q", "completions": [bad, rows[1]["completions"][0]]}, 4,
                             rank_by=rank_by, rng=random.Random(0))
    # The same ratings in another order tie (a plain sum gave 2.825 and 2.8249999999999997, and B was rejected
    # though it ties with the chosen A).
    a, b = completion("A", [1.1, 2.2, 3.3, 4.7], 5), completion("B", [4.7, 3.3, 2.2, 1.1], 5)
    assert completion_score(a) == completion_score(b) == math.fsum([1.1, 2.2, 3.3, 4.7]) / 4
    with pytest.raises(BadRow, match="no other response scores below the best"):
        binarize_row(raw_row("q", [a, b]), 0, rng=random.Random(0))


def with_annotations(c, annotations):
    return {**c, "annotations": annotations}


def test_an_unreadable_rating_makes_the_whole_row_bad():
    """The best completion, rated "five" (or whose annotations were not a dict), was dropped without a word and the
    row binarized from the others: the pair chose the second best. Now the row is a bad row naming the field."""
    best, good, bad = completion("best", [5, 5, 5, 5], 10), completion("good", [3, 3, 3, 3], 6), \
        completion("bad", [1, 1, 1, 1], 2)
    aspect = {"Rating": "5", "Rationale": "because"}
    unreadable = {  # the best completion as written -> the reason
        "Rating 'five'": (completion("best", ["five"] * 4, 10),
                          "completions[1].annotations.instruction_following.Rating='five' is not a number"),
        "one Rating 'five'": (completion("best", [5, "five", 5, 5], 10),
                              "completions[1].annotations.honesty.Rating='five' is not a number"),
        "Rating ''": (completion("best", [5, 5, 5, ""], 10),
                      "completions[1].annotations.helpfulness.Rating='' is not a number"),
        "Rating True": (with_annotations(best, {a: {"Rating": True} for a in ASPECTS}),
                        "completions[1].annotations.instruction_following.Rating=True is not a number"),
        "Rating 'nan'": (completion("best", [5, 5, "nan", 5], 10),
                         "completions[1].annotations.truthfulness.Rating='nan' is not a number"),
        "annotations a string": (with_annotations(best, "5 5 5 5"),
                                 "completions[1].annotations='5 5 5 5' is not a dict"),
        "an aspect a string": (with_annotations(best, {"instruction_following": aspect, "honesty": "5"}),
                               "completions[1].annotations.honesty='5' is not a dict"),
        "completion a string": ("best answer", "completions[1] is not a dict"),
    }
    for case, (written, reason) in unreadable.items():
        row = raw_row("Which?", [good, written, bad]) if isinstance(written, dict) else \
            {"instruction": "Which?", "completions": [good, written, bad]}
        counter = SkipCounter()
        assert binarize([row], counter=counter) == [], case
        assert counter.as_dict() == {"kept": 0, "skipped": 1, "reasons": {reason.replace("[1]", "[*]"): 1}}, case
        with pytest.raises(BadRow, match=f"^row 1 of raw: {re.escape(reason)}$"):
            binarize([row], on_bad_row="raise", source="raw")
    # rank_by="overall" reads overall_score alone, by the same rules
    for score, reason in (("ten", "completions[1].overall_score='ten' is not a number"),
                          ([10], "completions[1].overall_score=[10] is not a number")):
        row = raw_row("Which?", [good, {**best, "overall_score": score}, bad])
        with pytest.raises(BadRow, match=f"^row 1: {re.escape(reason)}$"):
            binarize([row], rank_by="overall", on_bad_row="raise")
    # an infinite rating is a number off its scale (it was ignored, as a word was)
    with pytest.raises(BadRow, match=r"^row 1: completions\[1\]\.annotations\.honesty\.Rating='inf' is outside 1-5$"):
        binarize([raw_row("Which?", [good, completion("best", [5, "inf", 5, 5], 10), bad])], on_bad_row="raise")


def test_missing_and_numeric_ratings_still_rank():
    """What a rating may be, as before: a number, a numeric string, or missing ("N/A", null, an aspect or the
    annotations left out), which the mean leaves out; a completion with no rating is not usable, the row still is."""
    best = with_annotations(completion("best", [5] * 4, 10), {"instruction_following": {"Rating": " 5 "},
                                                                "honesty": {"Rating": 5}, "truthfulness": None,
                                                                "helpfulness": {"Rating": None}})
    half = with_annotations(completion("half", [0] * 4, 4),
                            {"honesty": {"Rating": 4.5}, "helpfulness": {"Rating": "n/a"}})
    unrated = [with_annotations(completion(f"unrated{i}", [0] * 4, 7), a) for i, a in enumerate((None, {}))]
    low = completion("low", [2, "N/A", "2", 2.0], 3)
    rows = [raw_row("Which?", [half, *unrated, best, low])]
    (pair,) = binarize(rows)
    assert (reply(pair["chosen"]), pair["score_chosen"]) == ("answer best", 5.0)
    assert {completion_score(c) for c in (half, low, *unrated)} == {4.5, 2.0, None}
    (pair,) = binarize(rows, rank_by="overall")  # overall_score: null and "N/A" are missing too
    assert reply(pair["chosen"]) == "answer best"
    for missing in (None, "N/A"):
        assert completion_score({**best, "overall_score": missing}, "overall") is None
    # datasets (Arrow: a parquet file, the hub) fills an aspect that another completion has and this one lacks with
    # null, as in UltraFeedback's own rows
    import datasets

    partial = with_annotations(completion("partial", [0] * 4, 4), {"honesty": {"Rating": "4", "Rationale": "ok"}})
    rows = [raw_row("Which?", [completion("full", [5, 5, "N/A", 5], 10), partial])]
    arrow_rows = datasets.Dataset.from_list(rows)
    assert arrow_rows[0]["completions"][1]["annotations"]["helpfulness"] is None
    assert binarize(arrow_rows) == binarize(rows) != []


def test_seeds():
    rows = fixture_rows() * 5
    assert binarize(rows, seed=3) == binarize(rows, seed=3)
    outputs = {json.dumps(binarize(rows, seed=s)) for s in range(6)}
    assert len(outputs) > 1


def test_drop_truthful_qa():
    counter = SkipCounter()
    out = binarize(fixture_rows(), drop_sources=("truthful_qa",), counter=counter)
    assert "Truthful?" not in {r["prompt"] for r in out}
    assert counter.skipped["source 'truthful_qa' dropped"] == 1 and counter.kept == 5


def test_raise_names_row():
    """on_bad_row="raise" stops at the first malformed row (the empty instruction, row 6); rows 4 and 5 are
    well-formed and give no pair (all tied, a single completion): counted, as with "skip"."""
    counter = SkipCounter()
    with pytest.raises(BadRow, match=r"^row 6 of raw:train: empty instruction$") as e:
        binarize(fixture_rows(), on_bad_row="raise", source="raw:train", counter=counter)
    assert (e.value.index, e.value.source) == (5, "raw:train")
    assert counter.as_dict() == {"kept": 3, "skipped": 2, "reasons": {
        "no other response scores below the best": 1, "fewer than 2 usable completions": 1}}
    with pytest.raises(ValueError, match="on_bad_row"):
        binarize(fixture_rows(), on_bad_row="ignore")
    with pytest.raises(ValueError, match=r"rank_by='max'; expected one of \('mean', 'overall'\)"):
        binarize(fixture_rows(), rank_by="max")
    # An instruction the training loader would refuse (its tokenizer reads "</s>" as EOS): refused here too.
    row = raw_row("End your reply with </s>.", fixture_rows()[0]["completions"])
    with pytest.raises(BadRow, match=r"^row 1: instruction contains special-token text \('<s>', '</s>', '<unk>'\)$"):
        binarize([row], on_bad_row="raise")


def test_errors_helpers():
    err = BadRow(17, "unknown role 'bot' in messages[2]", "HuggingFaceH4/ultrachat_200k:train_sft")
    assert str(err) == "row 18 of HuggingFaceH4/ultrachat_200k:train_sft: unknown role 'bot' in messages[2]"
    counter = SkipCounter()
    handle_bad_row(err, "skip", counter)
    handle_bad_row(BadRow(3, "unknown role 'bot' in messages[0]"), "skip", counter)
    handle_bad_row(BadRow(4, "chosen == rejected"), "skip", counter)
    counter.keep(997)
    assert counter.total == 3
    assert counter.summary() == ("skipped 3 of 1000 rows:\n  2 x unknown role 'bot' in messages[*]\n"
                                 "  1 x chosen == rejected")
    with pytest.raises(BadRow):
        handle_bad_row(err, "raise", counter)
    with pytest.raises(ValueError):
        handle_bad_row(err, "warn", counter)


def test_train_test_split():
    train, test = train_test_split(list(range(10)), 3, seed=1)
    assert len(test) == 3 and sorted(train + test) == list(range(10))
    assert train == sorted(train) and test == sorted(test)
    assert train_test_split(list(range(10)), 3, seed=1) == (train, test)
    assert train_test_split(list(range(10)), 3, seed=2)[1] != test  # the seed is the one asked for
    with pytest.raises(ValueError):
        train_test_split(list(range(3)), 3)
    # By prompt: a prompt held twice (raw UltraFeedback repeats some instructions) lands in one split, not both
    rows = [{"prompt_id": p, "n": n} for n, p in enumerate("abcadbe")]
    for seed in range(20):
        train, test = train_test_split(rows, 2, seed, key=lambda r: r["prompt_id"])
        assert len({r["prompt_id"] for r in test}) == 2 and not {r["prompt_id"] for r in train} & \
            {r["prompt_id"] for r in test} and sorted(r["n"] for r in train + test) == list(range(7))
    # Prompts are drawn, not rows: a prompt of many rows is no likelier to be held out, and the test split
    # always holds test_size prompts.
    rows = [{"prompt_id": p, "n": n} for n, p in enumerate("aaaaaaaaabc")]
    for seed in range(20):
        _, test = train_test_split(rows, 2, seed, key=lambda r: r["prompt_id"])
        assert len({r["prompt_id"] for r in test}) == 2
    rows = [{"prompt_id": p, "n": n} for n, p in enumerate("abcadbe")]
    with pytest.raises(ValueError, match="test_size=5 needs 0 <= test_size < the 5 kept prompts"):
        train_test_split(rows, 5, key=lambda r: r["prompt_id"])


def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep the cache in tmp
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in fixture_rows()))
    out = tmp_path / "prefs"
    stats = main([f"--input={raw}", "--split=train", f"--output={out}", "--test_size=2", "--seed=7",
                  "--drop_truthful_qa"])
    printed = capsys.readouterr().out
    assert "skipped 4 of 9 rows" in printed and "1 x source 'truthful_qa' dropped" in printed
    assert stats["train_prefs"] == 3 and stats["test_prefs"] == 2
    expected = binarize(fixture_rows(), seed=7, drop_sources=("truthful_qa",))
    test_positions = set(random.Random(7).sample(range(len(expected)), 2))  # the documented split
    train, test = load_rows(out, "train_prefs"), load_rows(out, "test_prefs")
    assert list(train) == [r for i, r in enumerate(expected) if i not in test_positions]
    assert list(test) == [r for i, r in enumerate(expected) if i in test_positions]

    # Bad input ends with one line naming it, not a traceback; a test split too large says why so few were kept.
    for argv, message in (([f"--input={tmp_path / 'missing.jsonl'}"], "missing.jsonl"),
                          ([f"--input={raw}", "--test_size=-1"], None), ([f"--input={raw}", "--test_size=9"], None)):
        with pytest.raises(SystemExit) as stop:
            main([*argv, f"--output={tmp_path / 'bad'}"])
        assert stop.value.code != 0 and (message is None or message in str(stop.value.code))
    printed = capsys.readouterr()
    assert "--test_size=-1 is negative" in printed.err and "must be below the 6 prompts of the 6 kept rows" in \
        printed.err
    assert "skipped 3 of 9 rows" in printed.out  # the summary before the refusal
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(fixture_rows()[0]) + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"bad.jsonl:2"):
        main([f"--input={bad}", f"--output={tmp_path / 'bad'}"])
    # --on_bad_row=raise stops at the malformed row, naming it, and writes nothing (it always skipped)
    with pytest.raises(SystemExit) as stop:
        main([f"--input={raw}", f"--output={tmp_path / 'strict'}", "--test_size=1", "--on_bad_row=raise"])
    assert stop.value.code == f"error: row 6 of {raw}:train: empty instruction"
    assert not (tmp_path / "strict").exists()


def test_cli_refuses_an_output_that_is_a_file_before_reading_the_input(tmp_path, capsys):
    """A FileExistsError / NotADirectoryError traceback once every row had been read and binarized."""
    (tmp_path / "notes").write_text("mine")
    for out in (tmp_path / "notes", tmp_path / "notes" / "prefs"):
        with pytest.raises(SystemExit) as stop:
            main([f"--input={tmp_path / 'missing.jsonl'}", f"--output={out}"])
        assert stop.value.code == 2
        assert f"--output={out}: {tmp_path / 'notes'} is a file, not a directory" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "mine"
    # An empty --output (an unset variable in a script): os.makedirs('') raised FileNotFoundError after the work
    with pytest.raises(SystemExit) as stop:
        main([f"--input={tmp_path / 'missing.jsonl'}", "--output="])
    assert stop.value.code == 2 and "--output=: an empty path names no directory" in capsys.readouterr().err
    for name in ("prefs.jsonl", "prefs.json"):  # a file's name: the directory's files would go into prefs.jsonl/
        with pytest.raises(SystemExit) as stop:
            main([f"--input={tmp_path / 'missing.jsonl'}", f"--output={tmp_path / name}"])
        assert stop.value.code == 2
        assert "--output is a directory (it receives train_prefs.jsonl and test_prefs.jsonl)" in \
            capsys.readouterr().err


def test_cli_says_when_no_row_was_kept(tmp_path, capsys, monkeypatch):
    """It said "--test_size=0 must be below the 0 prompts of the 0 kept rows"; the reasons stay above the error."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")  # keep the cache in tmp
    raw = tmp_path / "raw.jsonl"
    raw.write_text("".join(json.dumps(fixture_rows()[i]) + "\n" for i in (3, 4)))  # all equal, a single completion
    with pytest.raises(SystemExit) as stop:
        main([f"--input={raw}", "--test_size=0", f"--output={tmp_path / 'prefs'}"])
    assert stop.value.code == f"error: no row of {raw}:train was kept (2 of 2 skipped, by reason above)"
    assert capsys.readouterr().out == (f"skipped 2 of 2 rows of {raw}:train:\n  1 x no other response scores below "
                                       "the best\n  1 x fewer than 2 usable completions\n")
    assert not (tmp_path / "prefs").exists()


# --------------------------------------------------------------------------------------------- property

def mostly(good, bad, one_in=4):
    """bad once in `one_in` draws, else good (st.one_of would weigh each of bad's own branches like good)."""
    return st.integers(0, one_in - 1).flatmap(lambda k: bad if k == 0 else good)


junk = st.one_of(st.none(), st.text(max_size=3), st.integers(-2, 12), st.booleans(),
                st.floats(allow_nan=True, allow_infinity=True), st.lists(st.integers(), max_size=2))
# a rating that is not a number makes the whole row bad, so it is rarer than other junk: most rows stay usable
ratings = mostly(st.sampled_from(["1", "2", "3", "4", "5", "N/A"]), st.one_of(st.sampled_from([" 4 ", "", "x"]), junk),
                 one_in=16)
good_completions = st.fixed_dictionaries({
    "response": mostly(st.sampled_from(["a", "b", "c", "d", "e"]),  # a lone surrogate cannot be written; the loader
                       st.one_of(st.sampled_from(["", " ", "\ud800", "<s>x</s>", "<unk>"]), junk)),  # refuses "<s>"
    "annotations": st.fixed_dictionaries({a: st.fixed_dictionaries({"Rating": ratings}) for a in ASPECTS}),
    "overall_score": mostly(st.sampled_from([1.0, 5.5, 7.0, 9.0]), junk, one_in=16),  # a rating, as above
})
junk_completions = st.one_of(junk, st.fixed_dictionaries({}, optional={
    "response": st.one_of(st.sampled_from(["a", "b"]), junk),
    "annotations": st.one_of(junk, st.dictionaries(st.sampled_from(ASPECTS + ("other",)),
                                                    st.one_of(st.fixed_dictionaries({"Rating": ratings}), junk))),
    "overall_score": st.one_of(st.sampled_from([2.0, 8.0]), junk),
}))
good_rows = st.fixed_dictionaries({
    "instruction": mostly(st.sampled_from(["Why?", "Write a poem."]),
                          st.one_of(st.sampled_from(["", " ", "a\udfff", "Why </s>?"]), st.text())),
    "completions": st.lists(mostly(good_completions, junk_completions, one_in=8), max_size=5),
}, optional={"source": st.sampled_from(["evol_instruct", "truthful_qa"])})
junk_rows = st.one_of(junk, st.fixed_dictionaries({}, optional={"instruction": st.one_of(st.text(max_size=3), junk),
                                                                 "completions": st.one_of(st.lists(junk_completions,
                                                                                                   max_size=3), junk)}))


def kept(row, rank_by="mean"):
    try:
        binarize_row(row, 0, rank_by=rank_by, rng=random.Random(0))
        return True
    except BadRow:
        return False


def test_strategy_reaches_both_outcomes():
    for rank_by in ("mean", "overall"):
        # no deadline or too-slow check: a loaded machine (CI's 2 cores) must not fail a search that succeeds
        no_shrinking = settings(database=None, phases=[Phase.generate], deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])
        # the property is not vacuous
        find(good_rows, lambda r, rank_by=rank_by: kept(r, rank_by), settings=no_shrinking)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(row=good_rows, rank_by=st.sampled_from(["mean", "overall"]), seed=st.integers(0, 2**32))
def test_any_row_is_binarized_or_skipped(row, rank_by, seed):
    check_binarized_or_skipped(row, rank_by, seed)


@settings(max_examples=100, deadline=None)
@given(row=junk_rows, rank_by=st.sampled_from(["mean", "overall"]))
def test_junk_rows_are_skipped_with_a_reason(row, rank_by):
    check_binarized_or_skipped(row, rank_by, 0)


def check_binarized_or_skipped(row, rank_by, seed):
    """Either a valid pair from the row's own responses that the training loader takes, or a BadRow; no other
    exception."""
    try:
        out = binarize_row(row, 0, rank_by=rank_by, rng=random.Random(seed))
    except BadRow as e:
        assert e.index == 0 and e.reason
        event(e.reason)
        return
    event("kept")
    responses = [c["response"] for c in row["completions"] if isinstance(c, dict) and "response" in c]
    assert out["prompt"] == row["instruction"] and out["prompt"].strip()
    assert out["score_chosen"] > out["score_rejected"]
    assert reply(out["chosen"]) in responses and reply(out["rejected"]) in responses
    assert reply(out["chosen"]) != reply(out["rejected"])
    usable = lambda c: isinstance(c.get("response"), str) and c["response"].strip() and c["response"] != "\ud800" \
        and all(t not in c["response"] for t in SPECIAL_TEXTS)  # noqa: E731
    scores = {(c["response"], completion_score(c, rank_by)) for c in row["completions"]
              if isinstance(c, dict) and usable(c)}
    json.dumps(out, ensure_ascii=False).encode("utf-8")  # can be written
    for side in ("chosen", "rejected"):  # and read for dDPO (a pair the loader refused lost its prompt)
        check_messages(out[side], 0, None, side)
    assert (reply(out["chosen"]), out["score_chosen"]) in scores
    assert (reply(out["rejected"]), out["score_rejected"]) in scores
    assert out["score_chosen"] == max(s for _, s in scores if s is not None)


def test_a_slow_write_shows_its_progress(tmp_path, monkeypatch, capsys):
    """The data CLIs' outputs were written without a word after their last bar (feedback's train.jsonl for
    16,000 prompts: 324 MB, 3-5 s; 64,000: 15 s); a write that lasts over PROGRESS_DELAY seconds shows a bar."""
    from zephyr_jax.data import binarize, journal

    import tqdm.auto

    monkeypatch.setattr(journal, "PROGRESS_DELAY", 0)
    bars = []

    class Bar(tqdm.auto.tqdm):  # the rows it counted, out of the rows it was told of
        def close(self):
            bars.append((self.n, self.total))
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    binarize.write_jsonl([{"a": 1}, {"a": 2}], tmp_path / "rows.jsonl")
    assert "writing rows.jsonl" in capsys.readouterr().err
    assert bars[0] == (2, 2), bars
    assert load_rows(str(tmp_path / "rows.jsonl"), None)["a"] == [1, 2]


def test_a_kill_between_the_two_split_files_leaves_no_train_file(tmp_path, monkeypatch):
    """The new train file beside an earlier run's test file (whose rows it may hold) read as a whole data set
    after a kill between the two replaces; now the earlier train file goes first and the new one comes last.
    (data.dialogues writes train_sft / test_sft through the same function.)"""
    from zephyr_jax.data import binarize as module

    pairs = lambda n: [{"prompt_id": str(i)} for i in range(n)]  # noqa: E731
    module.write_splits(pairs(10), tmp_path, test_size=2)
    real, written = module.write_jsonl, []

    def killed_after_one_file(rows, path):
        if written:
            raise KeyboardInterrupt  # stands in for the kill
        written.append(os.path.basename(path))
        real(rows, path)

    monkeypatch.setattr(module, "write_jsonl", killed_after_one_file)
    with pytest.raises(KeyboardInterrupt):
        module.write_splits(pairs(20), tmp_path, test_size=4)
    assert written == ["test_prefs.jsonl"] and sorted(os.listdir(tmp_path)) == ["test_prefs.jsonl"]
    monkeypatch.setattr(module, "write_jsonl", real)
    train, test = module.write_splits(pairs(20), tmp_path, test_size=4)
    assert [json.loads(line) for line in open(tmp_path / "train_prefs.jsonl")] == train and len(test) == 4
