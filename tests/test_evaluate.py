"""python -m zephyr_jax.evaluate (DPO preference metrics, MT-Bench and AlpacaEval answer files) and the
lm-evaluation-harness adapter, on a tiny random HF model and a tiny dDPO workdir trained on local data."""

import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import transformers

from tests.test_train import tiny_config
from zephyr_jax import evaluate, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DPO_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
               "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


# Its tests on one worker (xdist_group): each worker that ran one trained the run again.
ON_DPO_WORKDIR = pytest.mark.xdist_group("dpo_workdir")


@pytest.fixture(scope="module")
def dpo_workdir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("dpo_run"))
    cfg = tiny_config("dpo", data_dir, **{"train.max_steps": 3, "train.eval_every": 0, "train.save_every": 0})
    train.run(cfg, workdir)
    return workdir


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _last_eval(workdir):
    return [r for r in _read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"][-1]


# --- prefs ---------------------------------------------------------------------------------------------

@ON_DPO_WORKDIR
def test_prefs_from_workdir_equals_the_training_eval(dpo_workdir, tmp_path, monkeypatch, capsys):
    expected = _last_eval(dpo_workdir)
    out = tmp_path / "prefs.json"
    evaluate.main(["prefs", f"--workdir={dpo_workdir}", f"--out={out}"])
    printed = capsys.readouterr()
    assert "policy log-probs (test_prefs): 100%" in printed.err  # a bar over minutes of a 7B's split
    got = _read_json(out)
    assert json.loads(printed.out) == got  # stdout holds the JSON alone (`> prefs.json`); the loading lines: stderr
    assert got["step"] == expected["step"] == 3 and got["num_pairs"] == 8
    for k in DPO_METRICS:
        assert abs(got[k] - expected[k]) <= 1e-6, (k, got[k], expected[k])

    # Without the run's cached reference log-probs, the reference is rebuilt from the config (random init, seed).
    copy = tmp_path / "copy"
    shutil.copytree(dpo_workdir, copy, ignore=shutil.ignore_patterns("reference_logps"))
    again = evaluate.prefs_from_workdir(str(copy))
    for k in DPO_METRICS:
        assert abs(again[k] - expected[k]) <= 1e-6, (k, again[k], expected[k])
    # On another mesh than the run's (--mesh: a run's mesh may need devices this host lacks).
    # Its tensor axis splits the vocabulary, so each log-softmax sums in another order: float32 sums of ~20 nats
    # may differ in the last bits (1 ulp at 16-32 is 1.9e-6), hence a relative bound of a few ulps.
    other = evaluate.prefs_from_workdir(dpo_workdir, mesh=(1, 2, 2))
    for k in DPO_METRICS:
        assert abs(other[k] - expected[k]) <= 1e-6 * max(1.0, abs(expected[k])), (k, other[k], expected[k])
    # Only the eval batches need split over that mesh: a run of 8 packed rows in 8 micro-batches on one device was
    # refused on (1, 2, 2) ("data.packed_rows=8 must be a multiple of train.grad_accum x the mesh's batch shards").
    saved = evaluate.train_config(dpo_workdir)
    with saved.unlocked():
        saved.mesh.shape, saved.mesh.num_devices, saved.train.grad_accum, saved.data.packed_rows = (1, 1, 1), 1, 8, 8
    monkeypatch.setattr(evaluate, "train_config", lambda workdir: saved)
    one_device = evaluate.prefs_from_workdir(dpo_workdir)
    split = evaluate.prefs_from_workdir(dpo_workdir, mesh=(1, 2, 2))
    for k in DPO_METRICS:
        assert abs(split[k] - one_device[k]) <= 1e-6 * max(1.0, abs(one_device[k])), (k, split[k], one_device[k])
    # A run's mesh of more devices than this job has: the error says what to do about it (--mesh)
    with saved.unlocked():
        saved.mesh.shape, saved.mesh.num_devices = (1, -1, 1), 16
    with pytest.raises(evaluate.train.ConfigError, match=r"config.mesh.num_devices=16: .* \(the run's mesh, on this "
                                                          r"job's 8 devices\): pass --mesh, e.g. --mesh=1,-1,1"):
        evaluate.prefs_from_workdir(dpo_workdir)
    # Other data whose ids the model has no embedding for (a tokenizer's added tokens the run's data never held):
    # refused before the checkpoint is read, not scored as NaN metrics
    monkeypatch.undo()
    loaded = evaluate.load_examples

    def with_an_added_token(*args, **kwargs):
        examples, info = loaded(*args, **kwargs)
        return [examples[0]._replace(chosen=np.append(examples[0].chosen, 32000))] + examples[1:], info
    monkeypatch.setattr(evaluate, "load_examples", with_an_added_token)
    with pytest.raises(evaluate.train.ConfigError, match=r"data.eval \(.*\) holds token id 32000, but the model's "
                                                          r"vocabulary has 32000 entries"):
        evaluate.prefs_from_workdir(dpo_workdir)


@ON_DPO_WORKDIR
def test_prefs_policy_against_itself(dpo_workdir, data_dir, capsys):  # noqa: F811
    """--model/--reference: the same model twice gives zero rewards, loss log 2, and the policy's log-probs;
    the policy reuses the reference's compiled eval function (same architecture)."""
    expected = _last_eval(dpo_workdir)
    evaluate.steps.make_eval_fn.cache_clear()
    got = evaluate.main(["prefs", f"--model={dpo_workdir}", f"--reference={dpo_workdir}",
                         f"--data={data_dir / 'prefs'}", "--max_examples=8", "--max_length=128",
                         "--max_prompt_length=64", "--batch_size=8"])
    printed = capsys.readouterr()
    assert "reference log-probs: 100%" in printed.err and "policy log-probs: 100%" in printed.err
    assert json.loads(printed.out) == got
    assert got["num_pairs"] == 8
    assert got["rewards/chosen"] == got["rewards/margins"] == got["rewards/accuracies"] == 0.0
    assert got["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for k in ("logps/chosen", "logps/rejected"):
        assert got[k] == pytest.approx(expected[k], abs=1e-4)
    made = evaluate.steps.make_eval_fn.cache_info()
    assert (made.misses, made.hits) == (1, 1)  # one jitted function: made for the reference, reused by the policy
    sharded = evaluate.main(["prefs", f"--model={dpo_workdir}", "--reference_free", f"--data={data_dir / 'prefs'}",
                             "--max_examples=8", "--max_length=128", "--max_prompt_length=64", "--batch_size=8",
                             "--mesh=1,4,2"])  # the model over 8 devices
    for k in ("logps/chosen", "logps/rejected"):
        assert sharded[k] == pytest.approx(got[k], abs=1e-4)


@ON_DPO_WORKDIR
def test_pair_logps_packed_rows_equal_a_row_per_sequence(dpo_workdir, data_dir, monkeypatch):
    """evaluate.prefs scores packed rows (as training's eval does): the same log-probs as a row per sequence,
    in about half the positions; a split of fewer pairs than batch_size in one batch of its own pairs."""
    from zephyr_jax.data.pipeline import load_examples
    from zephyr_jax.loading import load_model
    from zephyr_jax.tokenizer import load_tokenizer

    cfg = tiny_config("dpo", data_dir)
    examples, _ = load_examples(cfg.data, "dpo", load_tokenizer(), "train", log=lambda *_: None)
    model = load_model(dpo_workdir, "float32")
    packed = evaluate.pair_logps(model, examples, 8)
    one_per_row = evaluate.pair_logps(model, examples, 8, buckets=(64, 128, 256))
    assert packed.shape == (len(examples), 2)
    np.testing.assert_allclose(packed, one_per_row, rtol=1e-5, atol=1e-4)
    # 3 pairs with batch_size 8: 3 pairs in 2 rows (train.eval_size), not filled to 8 with repeats in 4 rows
    run, computed = evaluate.steps.run_eval_batches, []

    def counting(eval_fn, params, batches, place):
        seen = lambda b: computed.append(((b["sequence_pair"] >= 0).sum() // 2, len(b["inputs"])))
        return run(eval_fn, params, ((seen(b) or b, real) for b, real in batches), place)
    monkeypatch.setattr(evaluate.steps, "run_eval_batches", counting)
    np.testing.assert_allclose(evaluate.pair_logps(model, examples[:3], 8), packed[:3], rtol=1e-6)
    assert computed == [(3, 2)]


def test_pair_logps_refuses_token_ids_outside_the_models_vocabulary(data_dir, tiny_model_dir, tmp_path,
                                                                    monkeypatch):
    """A tokenizer with ids the model has no embedding for (--tokenizer of another model): the jitted eval embedded
    them as NaN, and prefs reported loss, rewards and log-probs of NaN without an error."""
    from flax import nnx

    from zephyr_jax.data.pipeline import load_examples
    from zephyr_jax.model import Mistral, MistralConfig
    from zephyr_jax.tokenizer import load_tokenizer

    examples, _ = load_examples(tiny_config("dpo", data_dir).data, "dpo", load_tokenizer(), "eval", log=lambda *_: None)
    small = Mistral(MistralConfig(vocab_size=1000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"holds token id \d+, but the model's vocabulary has 1000 entries"):
        evaluate.pair_logps(small, examples, 8)
    # prefs with --model paths: the ids are checked against the config's vocabulary before any weight is read (it
    # was found in pair_logps, once the reference model had loaded: minutes for a 7B).
    folder = tmp_path / "small"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**json.loads(open(f"{tiny_model_dir}/config.json").read()),
                                                    "vocab_size": 1000}))
    monkeypatch.setattr(evaluate, "load_model", lambda *a, **k: pytest.fail("loaded before the ids were checked"))
    # The message names what chose the tokenizer (it said "the tokenizer ''" for one passed without a name).
    for model, reference, tokenizer, named in (
            (tiny_model_dir, str(folder), load_tokenizer(), "the tokenizer passed"),
            (str(folder), tiny_model_dir, tiny_model_dir, re.escape(f"--tokenizer={tiny_model_dir!r}")),
            (tiny_model_dir, str(folder), None, re.escape(f"the policy's own tokenizer ({tiny_model_dir})"))):
        with pytest.raises(ValueError, match=r"holds token id \d+, but the model's vocabulary has 1000 entries: "
                                             rf"{named} has tokens the model lacks"):
            evaluate.prefs(model, reference, data=str(data_dir / "prefs"), split="test_prefs", tokenizer=tokenizer)


@ON_DPO_WORKDIR
def test_prefs_argument_errors(dpo_workdir, capsys, tmp_path):
    with pytest.raises(SystemExit):
        evaluate.main(["prefs", f"--model={dpo_workdir}"])  # no reference
    # --workdir takes these from its config: they were accepted and silently ignored (the same numbers)
    with pytest.raises(SystemExit):
        evaluate.main(["prefs", f"--workdir={dpo_workdir}", "--beta=5", "--dtype=bfloat16", "--reference_free"])
    assert "--beta, --dtype, --reference_free would be ignored" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main(["prefs", f"--model={dpo_workdir}", "--reference_free", "--step=3"])
    assert "--step goes with --workdir" in capsys.readouterr().err
    for argv, message in ((["prefs", f"--workdir={dpo_workdir}", f"--model={dpo_workdir}"],
                           "pass either --workdir or --model/--reference, not both"),
                          (["prefs"], "pass --workdir=DPO_WORKDIR, or --model and --reference")):
        with pytest.raises(SystemExit):
            evaluate.main(argv)
        assert message in capsys.readouterr().err
    # the reference was not loaded, and the output named it as the reference of reference-free metrics
    assert "--reference and --reference_free exclude each other" in _cli_error(
        ["prefs", f"--model={dpo_workdir}", f"--reference={dpo_workdir}", "--reference_free"])
    assert "no data files for split 'nosuch'" in _cli_error(["prefs", f"--workdir={dpo_workdir}", "--split=nosuch"])
    # a --mesh that cannot be made is named as the shape given (it was blamed on config.mesh.num_devices=0)
    for mesh in ("0,8,1", "-2,1,1"):
        message = _cli_error(["prefs", f"--workdir={dpo_workdir}", f"--mesh={mesh}"])
        assert f"mesh shape ({mesh.replace(',', ', ')}): sizes must be positive" in message, message
        assert "pass --mesh" not in message, message  # (the advice for the run's own mesh, not for one given)
    # refused before scoring: the metrics were computed, then lost to an IsADirectoryError traceback
    assert _cli_error(["prefs", f"--workdir={dpo_workdir}", f"--out={tmp_path}"]) == \
        f"error: --out={tmp_path}: is a directory"
    # --max_examples=-3 scored every pair; 0 blamed the data ("no usable examples ... skipped 0 of 0 rows")
    for n in (0, -3):
        for model in ([f"--workdir={dpo_workdir}"], [f"--model={dpo_workdir}", "--reference_free"]):
            assert _cli_error(["prefs", *model, f"--max_examples={n}"]) == \
                f"error: --max_examples={n}: must be at least 1 (leave it out for every pair)"
        # and by the functions the command calls (0 read no pair and blamed the data, -3 scored every pair)
        with pytest.raises(ValueError, match=rf"^max_examples={n}: must be -1 \(all\) or positive"):
            evaluate.prefs_from_workdir(dpo_workdir, max_examples=n)
    with pytest.raises(ValueError, match="max_prompt_length"):
        evaluate.prefs("m", "r", max_length=64, max_prompt_length=64)
    # refused before any data or model is read (it was refused after scoring both models on every pair)
    for bad, message in [(dict(loss_type="hinge", label_smoothing=0.1), "does not use label_smoothing"),
                         (dict(beta=0.0), "beta must be positive"), (dict(loss_type="kto"), "unknown loss_type"),
                         (dict(batch_size=0), "batch_size=0: must be at least 1"),  # range() arg 3 must not be zero
                         (dict(batch_size=-2), "batch_size=-2: must be at least 1"),  # KeyError 'logps'
                         # (training refuses it too: every long pair's prompt was cut to its BOS alone)
                         (dict(max_prompt_length=0), "max_prompt_length=0 must be at least 1"),
                         (dict(max_examples=0), r"max_examples=0: must be -1 \(all\) or positive"),
                         (dict(max_examples=-3), r"max_examples=-3: must be -1 \(all\) or positive"),
                         (dict(max_examples=-2), r"max_examples=-2: must be -1 \(all\) or positive")]:
        with pytest.raises(ValueError, match=message):
            evaluate.prefs("no/such-model", "no/such-reference", data="no/such-data", **bad)


def _cli_error(argv) -> str:
    """The one-line `error: ...` that evaluate.main exits with (exit status 1, no traceback)."""
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(argv)
    message = exit_.value.code
    assert isinstance(message, str) and message.startswith("error: ") and "\n" not in message, message
    return message


def test_prefs_workdir_that_is_no_ddpo_run_and_a_missing_split_are_one_line_errors(tiny_model_dir, data_dir,
                                                                                   tmp_path):
    # A Hugging Face directory has a config.json too: it failed as AttributeError: 'stage'.
    message = _cli_error(["prefs", f"--workdir={tiny_model_dir}"])
    assert "is a Hugging Face model directory, not a zephyr_jax training workdir" in message and "--model" in message
    assert "no such directory" in _cli_error(["prefs", f"--workdir={tmp_path / 'nowhere'}"])
    assert _cli_error(["prefs", f"--workdir={tmp_path}"]) == \
        f"error: {tmp_path / 'config.json'} is missing: {tmp_path} is not a zephyr_jax training workdir"
    # and a model that is not there, for the answer-file commands: the loader's one line, no traceback
    questions = tmp_path / "question.jsonl"
    _write_questions(questions)
    assert _cli_error(["mt_bench", f"--model={tmp_path / 'nowhere'}", "--model_id=m", f"--question_file={questions}",
                       f"--answer_file={tmp_path / 'a.jsonl'}"]) == \
        f"error: model {tmp_path / 'nowhere'} does not exist (neither a local directory nor a Hugging Face hub name)"
    sft = tmp_path / "sft_run"
    (sft / "checkpoints").mkdir(parents=True)
    (sft / "model_config.json").write_text("{}")
    (sft / "config.json").write_text('{"stage": "sft"}')
    assert "is a 'sft' run: --workdir needs a dDPO workdir" in _cli_error(["prefs", f"--workdir={sft}"])
    assert "no data files for split 'nosuch'" in _cli_error(
        ["prefs", f"--model={tiny_model_dir}", f"--reference={tiny_model_dir}", f"--data={data_dir / 'prefs'}",
         "--split=nosuch"])
    # A hub dataset the hub does not give (conftest sets HF_HUB_OFFLINE): datasets' ConnectionError, a traceback
    assert "as a hub dataset it failed: Hugging Face dataset 'someone/no-such-data' (split 'test_prefs') could not " \
           "be reached" in _cli_error(["prefs", f"--model={tiny_model_dir}", "--reference_free",
                                       "--data=someone/no-such-data"])


# --- MT-Bench and AlpacaEval ---------------------------------------------------------------------------

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"question_id": 111, "category": "math", "turns": ["What is 2 + 3?", "And times 4?"]},
]


def _write_questions(path):
    with open(path, "w") as f:
        f.writelines(json.dumps(q) + "\n" for q in QUESTIONS)


def test_mt_bench_turn_two_sees_turn_one_and_category_temperatures(monkeypatch):
    calls = []

    def fake(model, tok, conversations, **kw):
        calls.append((kw["temperature"], [list(c) for c in conversations]))
        return [f"answer {len(calls)}.{i}" for i in range(len(conversations))]

    monkeypatch.setattr(evaluate, "generate_chats", fake)
    records = evaluate.mt_bench_answers(None, None, QUESTIONS, "m")
    assert [t for t, _ in calls] == [0.7, 0.7, 0.0, 0.0]  # FastChat: writing 0.7, math 0.0; one batch per turn
    _, (conv,) = calls[1]
    # No system turn unless one is given: the Zephyr template adds its empty one when rendering, and templates
    # that refuse a system turn (Mistral-Instruct-v0.1's) take the conversation as given.
    assert conv == [{"role": "user", "content": "Write a haiku about rain."},
                    {"role": "assistant", "content": "answer 1.0"},
                    {"role": "user", "content": "Now make it rhyme."}]
    assert records[0]["choices"] == [{"index": 0, "turns": ["answer 1.0", "answer 2.0"]}]
    assert records[1]["choices"] == [{"index": 0, "turns": ["answer 3.0", "answer 4.0"]}]
    calls.clear()
    evaluate.mt_bench_answers(None, None, QUESTIONS, "m", temperature=0.3, system="Be brief.")
    assert [t for t, _ in calls] == [0.3, 0.3] and len(calls[0][1]) == 2
    assert calls[1][1][0][:2] == [{"role": "system", "content": "Be brief."}, conv[0]]


def test_mt_bench_answer_file(model_dir, tmp_path, monkeypatch):
    questions, answers = tmp_path / "question.jsonl", tmp_path / "model_answer" / "tiny.jsonl"
    _write_questions(questions)
    caches = []  # the engine's programs come from JAX's persistent cache, as train's and serve's do
    monkeypatch.setattr(train, "use_compilation_cache", caches.append)
    evaluate.main(["mt_bench", f"--model={model_dir}", f"--question_file={questions}", f"--answer_file={answers}",
                   "--model_id=tiny", "--max_new_tokens=5", "--batch_size=2", "--temperature=0"])
    assert caches == ["~/.cache/zephyr_jax/xla"]
    lines = _read_jsonl(answers)
    assert [r["question_id"] for r in lines] == [81, 111]
    assert len({r["answer_id"] for r in lines}) == 2
    for r in lines:
        assert set(r) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert r["model_id"] == "tiny" and isinstance(r["tstamp"], float) and isinstance(r["answer_id"], str)
        assert len(r["choices"]) == 1 and r["choices"][0]["index"] == 0
        turns = r["choices"][0]["turns"]
        assert len(turns) == 2 and all(isinstance(t, str) and t for t in turns)
    # A top_k above the vocabulary, known once the model is loaded: the engine's ValueError was a traceback
    assert _cli_error(["mt_bench", f"--model={model_dir}", f"--question_file={questions}", "--model_id=tiny",
                       f"--answer_file={answers}", "--max_new_tokens=5", "--top_k=32001"]) == \
        "error: top_k=32001: must be in [0, 32000] (the model's vocabulary)"


def test_a_sampled_mt_bench_answer_is_the_same_whatever_else_the_question_file_holds(model_dir):
    """Each answer's seed is keyed by its question_id, choice and turn: the questions are batched per temperature,
    and a seed from the position in that batch gave question 83 another answer in a file of fewer questions or
    with --temperature (which puts every category in one batch)."""
    import zephyr_jax

    model, tok = zephyr_jax.load(model_dir, dtype="float32")
    questions = [{"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now make it rhyme."]},
                 {"question_id": 82, "category": "roleplay", "turns": ["Pretend to be a cat."]},
                 {"question_id": 83, "category": "writing", "turns": ["Describe snow.", "Shorter."]}]
    answer = lambda qs, **kw: evaluate.mt_bench_answers(  # noqa: E731
        model, tok, qs, "m", max_new_tokens=4, batch_size=1, **kw)[-1]["choices"]
    whole = answer(questions)
    assert answer(questions[2:]) == whole and answer(questions[1:], temperature=0.7) == whole
    assert answer(questions[2:], seed=1) != whole
    from zephyr_jax.generate import request_seeds
    with pytest.raises(ValueError, match="seed holds 1 seeds for 2 prompts"):
        request_seeds([5], 2)
    assert request_seeds([0, 2 ** 32 - 1], 2) == [0, 2 ** 32 - 1]
    for bad in (True, 2 ** 32, -1, 1.0):  # (a JSON true, one past 32 bits, a float: named here, not in the engine)
        with pytest.raises(ValueError, match=rf"seed={bad!r}: a prompt's seed must be a whole number"):
            request_seeds([5, bad], 2)


def test_mt_bench_bad_question_file(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question_id": 1, "turns": "not a list"}) + "\n")
    with pytest.raises(ValueError, match="question_id 1.*turns"):
        evaluate.read_questions(str(path))
    for bad, match in (({"question_id": [1], "turns": ["q"]}, "no question_id"),
                       ({"question_id": 2, "category": ["math"], "turns": ["q"]}, "'category' must be a string"),
                       ({"question_id": 3, "turns": ["q", " "]}, "non-blank strings")):  # was asked as it is
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match=match):
            evaluate.read_questions(str(path))
    path.write_text("".join(json.dumps({"question_id": 4, "turns": [turn]}) + "\n" for turn in ("q", "r")))
    with pytest.raises(ValueError, match="q.jsonl: question 2: question_id 4 appears twice"):
        evaluate.read_questions(str(path))
    path.write_text("")  # wrote "0 answers" for FastChat's judge to trip over
    with pytest.raises(ValueError, match=r"q.jsonl holds no questions"):
        evaluate.read_questions(str(path))
    broken = tmp_path / "alpaca.json"
    for text, match in (('[{"instruction": "a",}]', "not valid JSON"), ("[]", "expected a non-empty list"),
                        ('[{"instruction": " "}]', r"item 1 has no 'instruction' string \(non-blank\)")):
        broken.write_text(text)
        with pytest.raises(ValueError, match=f"alpaca.json: {match}"):
            evaluate.read_instructions(str(broken))


def test_mt_bench_and_alpaca_eval_refuse_a_bad_file_or_flag_before_loading_the_model(monkeypatch, tmp_path):
    """The question / instruction file was read after the model (minutes for a 7B); --num_choices=0 and
    --max_new_tokens=0 wrote empty answers and exited 0; an output path that cannot be written failed at the end."""
    def no_load(*args, **kw):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(evaluate, "load", no_load)
    questions, broken = tmp_path / "question.jsonl", tmp_path / "broken.jsonl"
    _write_questions(questions)
    broken.write_text('{"question_id": 1, "turns": ["hi"]\n')
    instructions = tmp_path / "instructions.json"
    instructions.write_text(json.dumps([{"instruction": "Name a color.", "dataset": "helpful_base"}]))
    mt_bench = ["mt_bench", "--model=m", "--model_id=m", f"--answer_file={tmp_path / 'a.jsonl'}"]
    alpaca_eval = ["alpaca_eval", "--model=m", "--generator=g", f"--out={tmp_path / 'o.json'}"]
    for argv, expected in [
        (mt_bench + [f"--question_file={tmp_path / 'none.jsonl'}"], f"{tmp_path / 'none.jsonl'}: No such file"),
        (mt_bench + [f"--question_file={broken}"], f"{broken}:1: not valid JSON"),
        (alpaca_eval + [f"--instructions={tmp_path / 'none.json'}"], f"{tmp_path / 'none.json'}: No such file"),
        (alpaca_eval + [f"--instructions={broken}"], f"{broken}:1: not valid JSON"),
        (mt_bench + [f"--question_file={questions}", "--num_choices=0"], "--num_choices=0: must be at least 1"),
        (mt_bench + [f"--question_file={questions}", "--max_new_tokens=0"], "--max_new_tokens=0: must be at least 1"),
        (alpaca_eval + [f"--instructions={broken}", "--max_new_tokens=-1"], "--max_new_tokens=-1: must be at least 1"),
        (alpaca_eval + [f"--instructions={broken}", "--batch_size=0"], "--batch_size=0: must be at least 1"),
        # the engine refused these at the first reply, after the model's load, with a traceback
        (mt_bench + [f"--question_file={questions}", "--temperature=-1"], "temperature=-1.0: must be in [0, 100]"),
        (alpaca_eval + [f"--instructions={instructions}", "--top_p=0"], "top_p=0.0: must be in (0, 1]"),
        (alpaca_eval + [f"--instructions={instructions}", "--top_k=-3"], "top_k=-3: must be >= 0"),
        (mt_bench + [f"--question_file={questions}", "--seed=-1"], "seed=-1: must be in [0, 2**32)"),
        # an output that cannot be written was found after the generations (which it lost)
        (mt_bench + [f"--question_file={questions}", f"--answer_file={tmp_path}"], f"--answer_file={tmp_path}: is a "
                                                                                    "directory"),
        (alpaca_eval + [f"--instructions={instructions}", f"--out={questions}/o.json"],
         f"--out={questions}/o.json: {questions} is not a folder this process can write"),
    ]:
        assert _cli_error(argv).startswith(f"error: {expected}"), argv


def test_a_dtype_that_is_no_float_type_is_refused_before_loading(monkeypatch, tmp_path, assert_refused_dtype):
    def no_load(*args, **kw):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(evaluate, "load", no_load)
    monkeypatch.setattr(evaluate, "prefs", no_load)
    questions = tmp_path / "question.jsonl"
    _write_questions(questions)
    for argv in (["mt_bench", "--model=m", "--model_id=m", f"--question_file={questions}"],
                 ["alpaca_eval", "--model=m", "--generator=g", f"--instructions={questions}", "--out=o.json"],
                 ["prefs", "--model=m", "--reference=r"]):
        assert_refused_dtype(lambda: evaluate.main(argv + ["--dtype=fp8"]), "fp8")


def test_alpaca_eval_outputs(model_dir, tmp_path):
    instructions = [{"instruction": "Name a color.", "dataset": "helpful_base"},
                    {"instruction": "Say hi.", "dataset": "koala"}, {"instruction": "Count to three."}]
    src, out = tmp_path / "alpaca_eval.json", tmp_path / "outputs.json"
    src.write_text(json.dumps(instructions))
    evaluate.main(["alpaca_eval", f"--model={model_dir}", f"--instructions={src}", f"--out={out}",
                   "--generator=tiny-zephyr", "--max_new_tokens=5", "--batch_size=2", "--temperature=0.7"])
    outputs = _read_json(out)
    assert isinstance(outputs, list) and len(outputs) == 3
    for row, given in zip(outputs, instructions):
        assert row["instruction"] == given["instruction"] and row["generator"] == "tiny-zephyr"
        assert isinstance(row["output"], str) and row["output"]
        assert set(row) == {"instruction", "output", "generator"} | ({"dataset"} & set(given))
        assert row.get("dataset") == given.get("dataset")
    jsonl = tmp_path / "alpaca_eval.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in instructions))
    assert evaluate.read_instructions(str(jsonl)) == instructions


# --- lm-evaluation-harness ---------------------------------------------------------------------------

def _lm_eval_tasks(root):
    """Three local tasks, one per request type: multiple choice, generation, rolling log-likelihood."""
    rows = {
        "mc": [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 7)],
                "label": 0} for a, b in ((1, 2), (3, 4), (2, 2))],
        "gen": [{"question": f"Repeat: {w}", "answer": w} for w in ("cat", "blue sky")],
        "rolling": [{"text": "The quick brown fox jumps over the lazy dog. " * 3}, {"text": "Hello world."}],
    }
    yaml = {
        "mc": "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
              "doc_to_choice: choices\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "gen": "output_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\ndoc_to_target: answer\n"
               "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n",
        "rolling": "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
                   "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                   "  - metric: bits_per_byte\n",
    }
    os.makedirs(root, exist_ok=True)
    for name, docs in rows.items():
        data = os.path.join(root, f"{name}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in docs)
        with open(os.path.join(root, f"zj_{name}.yaml"), "w") as f:
            f.write(f"task: zj_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
                    f"test_split: test\n{yaml[name]}metadata:\n  version: 1.0\n")
    return str(root)


def test_lm_eval_adapter_numbers(model_dir, monkeypatch):
    """loglikelihood equals an unpadded forward pass; rolling equals loglikelihood after <s>; greedy flags."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from zephyr_jax.lm_eval_adapter import ZephyrJaxLM

    lm = ZephyrJaxLM(pretrained=model_dir, batch_size=4, max_length=64)
    reference = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()  # PyTorch, unpadded
    req = lambda kind, args: Instance(kind, {}, args, 0)
    pairs = [("Question: What is 1 + 2?\nAnswer:", " 3"), ("The sky is ", "blue today"), ("", "Hello world")]
    got = lm.loglikelihood([req("loglikelihood", p) for p in pairs])
    for (context, continuation), (logp, greedy) in zip(pairs, got):
        ctx, cont = lm._encode_pair(context, continuation)
        ids, n = ctx + cont, len(cont)
        assert ids[0] == 1 and n > 0  # one BOS
        with torch.no_grad():
            logits = reference(torch.tensor([ids[:-1]])).logits[0, -n:].double()
        want = torch.log_softmax(logits, -1)[torch.arange(n), torch.tensor(cont)].sum().item()
        assert logp == pytest.approx(want, abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == torch.tensor(cont)).all())
    assert lm._encode_pair("The sky is ", "blue today")[1] == lm._encode_pair("The sky is", " blue today")[1]
    rolling = lm.loglikelihood_rolling([req("loglikelihood_rolling", ("Hello world",))])
    assert rolling[0] == pytest.approx(got[2][0], abs=1e-4)
    # A text longer than max_length is scored in windows: every token once.
    long_text = "one two three four five six seven eight nine ten " * 8
    assert len(lm.tok_encode(long_text)) > 64
    (windowed,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", (long_text,))])
    assert np.isfinite(windowed) and windowed < rolling[0]
    # ... and its value is the sum over lm-eval's own rolling windows (after <s>, max_length tokens each, every
    # token predicted once) of the unpadded PyTorch log-probs: every window counts, each once.
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    long_text = long_text * 2
    tokens = lm.tok_encode(long_text, bos=False)
    assert len(tokens) > 2 * 64  # three windows
    want = 0.0
    for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(tokens, prefix_token=1, max_seq_len=64,
                                                                          context_len=1)):
        with torch.no_grad():
            logits = reference(torch.tensor([(ctx + pred)[:-1]])).logits[0, -len(pred):].double()
        want += torch.log_softmax(logits, -1)[torch.arange(len(pred)), torch.tensor(pred)].sum().item()
    (windowed,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", (long_text,))])
    assert windowed == pytest.approx(want, abs=1e-3)
    # is_greedy is True for the model's own argmax token.
    ids = lm._encode_pair(*pairs[0])[0]
    with torch.no_grad():
        top = int(reference(torch.tensor([ids])).logits[0, -1].argmax())
    assert [g for _, g in lm._score_rows([(ids + [top], 1), (ids + [(top + 1) % 32000], 1)])] == [True, False]
    # Several continuation tokens: greedy only when every one is the argmax (one right and one wrong is not), and
    # continuations of 9 and 17 tokens (just past the power-of-two loss-position widths) are scored whole; each
    # against the unpadded PyTorch forward pass.
    with torch.no_grad():
        second = int(reference(torch.tensor([ids + [top]])).logits[0, -1].argmax())
    text_ids = lm.tok_encode("one two three four five six seven eight nine ten " * 2)
    assert len(text_ids) >= 18
    rows = [(ids + [top, second], 2), (ids + [top, (second + 1) % 32000], 2), (ids + [(top + 1) % 32000, second], 2),
            (text_ids[:10], 9), (text_ids[:18], 17)]
    for (ids_, n), (logp, greedy) in zip(rows, lm._score_rows(rows)):
        with torch.no_grad():
            logits = reference(torch.tensor([ids_[:-1]])).logits[0, -n:].double()
        cont = torch.tensor(ids_[-n:])
        assert logp == pytest.approx(torch.log_softmax(logits, -1)[torch.arange(n), cont].sum().item(), abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == cont).all()), (ids_, n)
    assert [g for _, g in lm._score_rows(rows[:3])] == [True, False, False]
    # Greedy generation does not depend on what else is in the batch (left padding, filler rows).
    gen = lambda prompt: req("generate_until", (prompt, {"until": ["\n\n"], "max_gen_toks": 4}))
    alone = lm.generate_until([gen("Hi there")])
    together = lm.generate_until([gen("Hi there"), gen("A much longer prompt than the other one, " * 3)])
    assert alone[0] == together[0] and all(isinstance(t, str) for t in together)
    # Generation settings as lm-eval normalises them: max_new_tokens is max_gen_toks; a temperature without
    # do_sample samples; a continuation longer than max_length is refused, not scored in part.
    assert lm._sampling({"until": "\n", "max_new_tokens": 4})[:3] == (("\n", "</s>"), 4, 0.0)
    assert lm._sampling({"temperature": 0.7, "max_gen_toks": 4})[2] == 0.7
    assert lm._sampling({"temperature": 0.7, "do_sample": False, "max_gen_toks": 4})[2] == 0.0
    assert lm._sampling({"do_sample": True, "max_gen_toks": 4})[2] == 1.0  # lm-eval then gives no temperature
    assert lm._sampling({"temperature": 0.0, "do_sample": False, "max_gen_toks": 4})[2] == 0.0
    assert "temperature" not in lm._warned  # greedy tasks carry temperature 0.0: honoured, not "ignored"
    with pytest.raises(ValueError, match="max_gen_toks=64 must be below the model's max_length=64"):
        lm._sampling({"max_gen_toks": 64})
    with pytest.raises(ValueError, match="continuation of 70 tokens does not fit max_length=64"):
        lm._score_rows([([1] + [5] * 70, 70)])
    with pytest.raises(ValueError, match="continuation of 65 tokens does not fit max_length=64"):
        lm._score_rows([([1] + [5] * 65, 65)])  # one token more than the 64 predicted positions: not scored in part
    # An id the model has no embedding for (a tokenizer=... of another model): an input embedded as NaN, a target
    # was clipped to the last token and scored as it; both returned without an error.
    for ids_ in ([1, 32000, 5], [1, 5, 32000]):
        with pytest.raises(ValueError, match=r"request 0 holds token id 32000, outside the model's vocabulary"):
            lm._score_rows([(ids_, 1)])
    # ... before any row is scored: it was found in its own batch, after the longer rows' batches (hours of them)
    import zephyr_jax.lm_eval_adapter as adapter

    monkeypatch.setattr(adapter, "_score", lambda *a: pytest.fail("a batch was scored before the rows were checked"))
    with pytest.raises(ValueError, match=r"request 4 holds token id 32000, outside the model's vocabulary"):
        lm._score_rows([([1] + [5] * 10, 1)] * 4 + [([1, 32000, 5], 1)])
    # ... and so is a continuation too long (it was found in its batch, after the longer rows had been scored)
    with pytest.raises(ValueError, match=r"continuation of 70 tokens does not fit max_length=64 \(request 4:"):
        lm._score_rows([([1] + [5] * 100, 1)] * 4 + [([1] + [5] * 70, 70)])
    # Rolling windows are named by their request's index (it said "request 3": the second request's last window).
    monkeypatch.setattr(lm, "tok_encode", lambda text, bos=None: [5] * 100 + ([32000] if text == "bad" else []))
    with pytest.raises(ValueError, match=r"request 1 holds token id 32000, outside the model's vocabulary"):
        lm.loglikelihood_rolling([req("loglikelihood_rolling", (text,)) for text in ("good", "bad")])


def test_lm_eval_loglikelihood_equals_lm_evals_own_hflm(model_dir):
    """The same numbers as lm-eval's HFLM on the same weights, also where the tokenizer merges the context's end
    with the continuation's start ("Hello" + "world", "It is" + "n't"): the scored tokens are the joint text's."""
    pytest.importorskip("accelerate")  # HFLM's import; .ci/run installs it
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from zephyr_jax.lm_eval_adapter import ZephyrJaxLM

    pairs = [("Hello", "world"), ("It is", "n't"), ("The sky is ", "blue"),
             ("x =", "  42"), ("", "Hello world"), ("", "<s>Hello"), ("Long " * 80, " tail end")]
    requests = [Instance("loglikelihood", {}, p, 0) for p in pairs]
    hflm = HFLM(pretrained=model_dir, backend="causal", dtype="float32", batch_size=4, max_length=64, device="cpu")
    reference = hflm.loglikelihood(requests)
    ours = ZephyrJaxLM(pretrained=model_dir, batch_size=4, max_length=64).loglikelihood(requests)
    for pair, (want, want_greedy), (got, greedy) in zip(pairs, reference, ours):
        assert got == pytest.approx(want, abs=1e-4), pair
        assert greedy == want_greedy, pair
    # model_args mesh=DxFxT shards the model over this host's devices (a 7B float32 fits no TPU v4/v5e chip).
    sharded = ZephyrJaxLM(pretrained=model_dir, batch_size=4, max_length=64, mesh="1x4x2")
    assert len(sharded.model.embed_tokens.get_value().sharding.device_set) == 8
    for (got, greedy), (want, want_greedy) in zip(sharded.loglikelihood(requests), ours):
        assert got == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    # Where the joint text has no more tokens than the context ("Fr" + "ance" is one token: HFLM asserts),
    # the joint text is still what is scored, split before the first token that differs.
    lm = ZephyrJaxLM(pretrained=model_dir, batch_size=4, max_length=64)
    # A context that brings its own <s> (a chat template's bos_token) gets no second one, as in HFLM.
    bos_pair = [Instance("loglikelihood", {}, ("<s>Question: 2+2?\nAnswer:", " 4"), 0)]
    ((got, greedy),), ((want, want_greedy),) = lm.loglikelihood(bos_pair), hflm.loglikelihood(bos_pair)
    assert got == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    ctx, cont = lm._encode_pair("Paris is in Fr", "ance")
    assert ctx + cont == lm.tok_encode("Paris is in France") and len(cont) >= 1
    with pytest.raises(ValueError, match="empty continuation"):  # HFLM refuses it; it is not the context's end
        lm.loglikelihood([Instance("loglikelihood", {}, ("The answer is", ""), 0)])
    ctx, cont = lm._encode_pair("The answer is ", "")  # the moved space, scored in the joint text, as HFLM
    assert ctx == lm.tok_encode("The answer is") and ctx + cont == lm.tok_encode("The answer is ") and len(cont) == 1
    # --apply_chat_template with a task's gen_prefix: lm-eval asks for no generation prompt, and the assistant
    # prefix is continued (not closed with </s>), the same text as HFLM's.
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "Answer:"}]
    text = lm.apply_chat_template(chat, add_generation_prompt=False)
    assert text == hflm.apply_chat_template(chat, add_generation_prompt=False) and text.endswith("Answer:")
    assert lm.apply_chat_template(chat[:2]) == hflm.apply_chat_template(chat[:2])
    assert lm.chat_template(True) == hflm.chat_template(True)
    # Named templates (a dict): the one lm-eval records is HFLM's choice, a string it can hash.
    named = {"default": hflm.tokenizer.chat_template, "tool_use": "{{ tools }}"}
    lm.tokenizer.chat_template = hflm.tokenizer.chat_template = named
    for choice in (True, "tool_use", "default"):
        assert lm.chat_template(choice) == hflm.chat_template(choice), choice
    with pytest.raises(ValueError, match=r"none is named 'chatml'"):
        lm.chat_template("chatml")


def test_lm_eval_command_line_gets_the_models_batch_size_only_where_it_evaluates(monkeypatch):
    """lm_eval's own --batch_size default (1) scored a row at a time; its other subcommands take no --batch_size
    (`ls tasks` failed with "unrecognized arguments"), and a batch size given in any spelling stays."""
    lm_eval_main = pytest.importorskip("lm_eval.__main__")
    from zephyr_jax import lm_eval_adapter

    seen = []
    monkeypatch.setattr(lm_eval_main, "cli_evaluate", lambda: seen.append(sys.argv[1:]))
    for args in (["--model", "zephyr_jax"], ["run", "--model", "zephyr_jax"], ["ls", "tasks"], ["--help"], [],
                 ["--model", "zephyr_jax", "--batch", "16"], ["--model", "zephyr_jax", "-b", "4"]):
        lm_eval_adapter.main(args)
    assert seen == [["--model", "zephyr_jax", "--batch_size", "8"], ["run", "--model", "zephyr_jax", "--batch_size",
                    "8"], ["ls", "tasks"], ["--help"], [], ["--model", "zephyr_jax", "--batch", "16"],
                    ["--model", "zephyr_jax", "-b", "4"]]


def test_lm_eval_adapter_refuses_a_dtype_that_is_no_float_type():
    pytest.importorskip("lm_eval")
    from zephyr_jax.lm_eval_adapter import ZephyrJaxLM

    # (a TypeError deep in numpy; refused before the model, so no such model is looked for)
    with pytest.raises(ValueError, match="dtype='fp8': expected one of float32, bfloat16, float16"):
        ZephyrJaxLM(pretrained="no/such-model", dtype="fp8")
    # batch_size=-1 scored nothing and returned None for every request; 0 failed as "range() arg 3 must not be
    # zero"; max_length=-8 dropped each row's first 8 tokens
    for args, message in (({"batch_size": -1}, "batch_size=-1: must be at least 1"),
                          ({"batch_size": "0"}, "batch_size=0: must be at least 1"),
                          ({"max_length": -8}, "max_length=-8: must be at least 1")):
        with pytest.raises(ValueError, match=message):
            ZephyrJaxLM(pretrained="no/such-model", **args)


@pytest.mark.long
def test_lm_eval_simple_evaluate_and_cli(model_dir, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    import zephyr_jax.lm_eval_adapter  # noqa: F401  (registers "zephyr_jax")

    tasks = _lm_eval_tasks(tmp_path / "tasks")
    task_manager = TaskManager(include_path=tasks)  # (one: it indexes lm_eval's thousands of task files, 7 s)
    out = lm_eval.simple_evaluate(model="zephyr_jax", model_args=f"pretrained={model_dir},batch_size=4",
                                  tasks=["zj_mc", "zj_gen", "zj_rolling"], task_manager=task_manager, bootstrap_iters=0,
                                  log_samples=False)
    results = out["results"]
    assert 0.0 <= results["zj_mc"]["acc,none"] <= 1.0 and "acc_norm,none" in results["zj_mc"]
    zephyr_jax.lm_eval_adapter.ZephyrJaxLM(pretrained=model_dir, trust_remote_code=True)  # lm_eval's flag adds it
    with pytest.raises(ValueError, match="add_bos_token='ture': expected true or false"):  # ran as False, no <s>
        zephyr_jax.lm_eval_adapter.ZephyrJaxLM(pretrained=model_dir, add_bos_token="ture")
    with pytest.raises(TypeError, match="zephyr_jax model_args: unknown dtpye, max_lenght"):  # ran with defaults
        lm_eval.simple_evaluate(model="zephyr_jax", model_args=f"pretrained={model_dir},dtpye=bfloat16,max_lenght=64",
                                tasks=["zj_mc"], task_manager=task_manager)
    assert 0.0 <= results["zj_gen"]["exact_match,none"] <= 1.0
    assert results["zj_rolling"]["word_perplexity,none"] > 1.0 and "bits_per_byte,none" in results["zj_rolling"]

    # The command line: lm_eval's own CLI through the adapter module (which registers the model first).
    cli = subprocess.run([sys.executable, "-m", "zephyr_jax.lm_eval_adapter", "--model", "zephyr_jax",
                          "--model_args", f"pretrained={model_dir}", "--tasks", "zj_mc",
                          "--include_path", tasks, "--output_path", str(tmp_path / "out")],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert cli.returncode == 0, cli.stderr[-3000:]
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.startswith("results")]
    assert len(files) == 1, files
    saved = _read_json(files[0])
    assert saved["results"]["zj_mc"]["acc,none"] == pytest.approx(results["zj_mc"]["acc,none"])
    assert str(saved["config"]["batch_size"]) == "8"  # the model's default, not lm_eval's 1 (a row at a time)


# --- Found by mutation testing: seeds, the reference, FastChat's temperatures and reply stripping. ---

def test_mt_bench_choices_are_drawn_with_different_seeds(monkeypatch):
    seeds = []
    monkeypatch.setattr(evaluate, "generate_chats",
                        lambda model, tok, convs, **kw: seeds.extend(kw["seed"]) or ["x"] * len(convs))
    q = [{"question_id": 1, "category": "writing", "turns": ["a", "b"]}]
    evaluate.mt_bench_answers(None, None, q, "m", num_choices=2)
    assert len(seeds) == 4 and len(set(seeds)) == 4  # (choice, turn): each its own stream


def test_prefs_reports_the_policy_against_the_reference(monkeypatch, data_dir, tmp_path):
    from zephyr_jax.tokenizer import load_tokenizer

    rng = np.random.default_rng(0)
    drawn = {}

    def fake_logps(model, examples, batch_size, desc=None):
        drawn["examples"] = examples
        return drawn.setdefault(model, rng.normal(-50, 5, (len(examples), 2)).astype(np.float32))

    monkeypatch.setattr(evaluate, "load_model", lambda path, *a, **k: path)
    monkeypatch.setattr(evaluate, "pair_logps", fake_logps)
    got = evaluate.prefs("POLICY", "REFERENCE", data=str(data_dir / "prefs"), split="test_prefs", max_examples=8,
                         max_length=128, max_prompt_length=64, tokenizer=load_tokenizer(), log=lambda *_: None,
                         beta=0.3, label_smoothing=0.2)  # not the defaults, which a prefs ignoring them would use
    policy, reference = drawn["POLICY"], drawn["REFERENCE"]
    assert got["logps/chosen"] == pytest.approx(float(policy[:, 0].mean()), rel=1e-6)
    margins = 0.3 * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    assert got["rewards/margins"] == pytest.approx(float(margins.mean()), rel=1e-5, abs=1e-6)
    log_sigmoid = lambda x: -np.logaddexp(0.0, -np.asarray(x, np.float64))  # noqa: E731
    cdpo = -0.8 * log_sigmoid(margins) - 0.2 * log_sigmoid(-margins)  # cDPO, label smoothing 0.2
    assert got["loss"] == pytest.approx(float(cdpo.mean()), rel=1e-5)
    # IPO averages each log-ratio over its own completion's tokens (TRL's ipo: logps / completion length, then
    # (chosen - rejected - 1 / (2 beta))^2): chosen and rejected lengths must not be swapped.
    # (Rejected replies of other lengths than the chosen ones: the toy task's are one digit each.)
    rows = [json.loads(line) for line in (data_dir / "prefs" / "test_prefs.jsonl").read_text().splitlines()][:8]
    for i, row in enumerate(rows):
        row["rejected"][-1]["content"] += " or so" * i
    (tmp_path / "test_prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn.clear()
    got = evaluate.prefs("POLICY", "REFERENCE", data=str(tmp_path), split="test_prefs", max_examples=8,
                         max_length=128, max_prompt_length=64, tokenizer=load_tokenizer(), log=lambda *_: None,
                         loss_type="ipo", beta=0.3)
    policy, reference = drawn["POLICY"], drawn["REFERENCE"]
    lengths = np.array([[len(e.chosen), len(e.rejected)] for e in drawn["examples"]], np.float64)
    assert np.any(lengths[:, 0] != lengths[:, 1])
    ratios = (policy.astype(np.float64) - reference) / lengths
    assert got["loss"] == pytest.approx(float(np.mean((ratios[:, 0] - ratios[:, 1] - 1 / (2 * 0.3)) ** 2)), rel=1e-5)


def test_mt_bench_temperature_of_every_fastchat_category():
    # fastchat/llm_judge/common.py temperature_config (lm-sys/FastChat 631d62f6, 2023-10-12, onwards)
    fastchat = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
                "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
    assert {c: evaluate.question_temperature({"category": c}) for c in fastchat} == fastchat
    assert evaluate.question_temperature({"category": "other"}) == 0.7


def test_mt_bench_and_alpaca_eval_sample_as_their_references_by_default(monkeypatch, tmp_path):
    """FastChat's gen_model_answer and AlpacaEval's zephyr-7b-beta config (huggingface_local_completions) call
    transformers' generate with temperature, max_new_tokens (and top_p 1.0) only: its top_k default of 50 stays."""
    seen = {}
    vocabulary = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=32000))  # (--top_k is checked on it)
    monkeypatch.setattr(evaluate, "load", lambda *a, **k: (vocabulary, None))
    monkeypatch.setattr(evaluate, "mt_bench_answers", lambda *a, **k: seen.update(mt_bench=k) or [])
    monkeypatch.setattr(evaluate, "alpaca_eval_outputs", lambda *a, **k: seen.update(alpaca_eval=k) or [])
    questions, instructions = tmp_path / "question.jsonl", tmp_path / "instructions.json"
    _write_questions(questions)
    instructions.write_text(json.dumps([{"instruction": "Name a color."}]))
    evaluate.main(["mt_bench", "--model=m", "--model_id=m", f"--question_file={questions}",
                   f"--answer_file={tmp_path / 'a.jsonl'}"])
    evaluate.main(["alpaca_eval", "--model=m", "--generator=g", f"--instructions={instructions}",
                   f"--out={tmp_path / 'o.json'}"])
    sampling = lambda k: (k["temperature"], k["top_k"], k["top_p"], k["max_new_tokens"])  # noqa: E731
    assert sampling(seen["mt_bench"]) == (None, 50, 1.0, 1024)  # None: FastChat's per-category temperatures
    assert sampling(seen["alpaca_eval"]) == (0.7, 50, 1.0, 2048)


def test_generate_chats_strips_replies_as_fastchat_does(monkeypatch):
    import zephyr_jax.generate

    monkeypatch.setattr(zephyr_jax.generate, "generate", lambda *a, **k: ["  Paris.\n", "\nYes "])
    assert evaluate.generate_chats(None, None, [[], []]) == ["Paris.", "Yes"]


def test_generate_until_seeds_each_request_and_keeps_a_long_prompts_tail(model_dir, monkeypatch, caplog):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from zephyr_jax import lm_eval_adapter

    lm = lm_eval_adapter.ZephyrJaxLM(pretrained=model_dir, batch_size=4, max_length=64)

    seen = {}

    def fake_run(model, prompts, params, tokenizer, **kw):
        seen.update(prompts=prompts, params=params)
        return [type("R", (), {"text": "t"})() for _ in prompts]

    monkeypatch.setattr(lm_eval_adapter, "run", fake_run)
    kwargs = {"until": ["\n"], "max_gen_toks": 4, "do_sample": True, "temperature": 1.0}
    long_prompt = "one two three four five six seven eight nine ten " * 8
    # lm-eval's gen_kwargs of a sampling task: each stop string (and EOS), the length and the sampling settings
    # reach the engine.
    sampled = {"until": ["\n\n", "Question:"], "max_gen_toks": 5, "do_sample": True, "temperature": 0.5,
               "top_k": 7, "top_p": 0.9}
    lm.generate_until([Instance("generate_until", {}, ("Hi", kwargs), 0),
                       Instance("generate_until", {}, ("Hi", kwargs), 1),
                       Instance("generate_until", {}, (long_prompt, kwargs), 2),
                       Instance("generate_until", {}, ("Hi", sampled), 3)])
    p = seen["params"][3]
    assert (p.max_tokens, p.temperature, p.top_k, p.top_p) == (5, 0.5, 7, 0.9)
    assert set(p.stop) == {"\n\n", "Question:", lm.tokenizer.decode([lm.eos])}
    assert seen["params"][0].seed != seen["params"][1].seed  # two samples of one prompt are two draws
    assert seen["prompts"][2] == lm.tok_encode(long_prompt)[-(64 - 4):]  # left-truncated to leave the reply room
    # A request's draws do not depend on what else lm-eval hands over in the call (every task's requests come in
    # one list): keyed by its task, document, index and prompt; `repeats` copies of one instance are several draws.
    gsm = Instance("generate_until", {}, ("Q: 2+2?", kwargs), 0, ("gsm8k", 7, 2))
    lm.generate_until([gsm, gsm])
    alone = [p.seed for p in seen["params"]]
    lm.generate_until([Instance("generate_until", {}, ("Q: 2+3?", kwargs), 0, ("other", 0, 1)), gsm, gsm])
    assert [p.seed for p in seen["params"][1:]] == alone and alone[0] != alone[1]
    # Another task's request of the same document, index and prompt (gsm8k and gsm8k_cot) is drawn apart.
    lm.generate_until([Instance("generate_until", {}, ("Q: 2+2?", kwargs), 0, ("gsm8k_cot", 7, 2))])
    assert seen["params"][0].seed != alone[0]
    # A setting the engine does not implement is said, once a run, not dropped unsaid; so is batch_size=auto (no
    # search), for a model built in Python too (its own module and tokenizer, no load).
    beams = Instance("generate_until", {}, ("Hi", {**kwargs, "num_beams": 4}), 0)
    with caplog.at_level(logging.WARNING, logger="zephyr_jax.lm_eval_adapter"):
        lm.generate_until([beams, beams])
        built = lm_eval_adapter.ZephyrJaxLM(pretrained=lm.model, tokenizer=lm.tokenizer, batch_size="auto")
    assert [r.getMessage() for r in caplog.records if r.name == "zephyr_jax.lm_eval_adapter"] == [
        "zephyr_jax ignores these generation settings: ['num_beams']",
        "zephyr_jax does not search for a batch size (batch_size=auto): it scores 8 rows at a time; pass "
        "batch_size=N for more"]
    assert (built.model, built.tokenizer, built.batch_size, built.pretrained) == (lm.model, lm.tokenizer, 8,
                                                                                   "Mistral")
