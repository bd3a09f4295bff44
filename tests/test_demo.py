"""The embedded demo's data (determinism, schemas, answers) and its task metric."""

import filecmp
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from zephyr_jax import config_common, demo
from zephyr_jax.data import preference_example, sft_example
from zephyr_jax.data.sources import load_rows
from zephyr_jax.model import Mistral, MistralConfig
from zephyr_jax.tokenizer import load_tokenizer

SIZES = {"n_sft": 200, "n_pref": 100, "n_test": 40}
FILES = ("train_sft", "test_sft", "train_prefs", "test_prefs", "test_prompts")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo.make_demo_data(tmp_path_factory.mktemp("demo"), seed=0, **SIZES)


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def question(prompt):
    """(kind, digits) parsed back from a prompt, independently of demo's generator."""
    words, _, digits = prompt.rstrip("?").partition(":") if ":" in prompt else prompt.rstrip("?").partition(" of ")
    kind = "max" if any(w in words.lower() for w in ("biggest", "largest")) else "min"
    assert kind == "max" or any(w in words.lower() for w in ("lowest", "smallest")), prompt
    return kind, [int(d) for d in digits.split()]


def test_same_seed_same_files_other_seed_other_files(data, tmp_path, capsys):
    again = demo.make_demo_data(tmp_path / "again", seed=0, **SIZES)
    other = demo.make_demo_data(tmp_path / "other", seed=1, **SIZES)
    for name in FILES:
        assert filecmp.cmp(data[name], again[name], shallow=False), name
        assert not filecmp.cmp(data[name], other[name], shallow=False), name
    assert [len(read(data[n])) for n in FILES] == [200, 40, 100, 40, 40]
    # A count below 1 is refused: it wrote an empty file, and training failed on it later
    for flag in ("--n_sft=-1", "--n_pref=0", "--n_test=0"):
        with pytest.raises(SystemExit):
            demo.main(["make-data", f"--out={tmp_path / 'none'}", flag])
        assert f"{flag}: must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    # The command line writes the same files for the same seed and sizes, and names each
    demo.main(["make-data", f"--out={tmp_path / 'cli'}", *(f"--{k}={v}" for k, v in SIZES.items())])
    listed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(listed) == set(data) and all(filecmp.cmp(data[n], listed[n], shallow=False) for n in FILES)


def test_layout_loads_with_load_rows(data):
    assert len(load_rows(data["sft"], "train_sft")) == 200
    assert len(load_rows(data["sft"], "test_sft")) == 40
    assert len(load_rows(data["prefs"], "train_prefs")) == 100
    assert len(load_rows(data["prefs"], "test_prefs")) == 40
    assert data["sft"] == os.path.dirname(data["train_sft"])


def test_sft_rows(data, tok):
    rows = read(data["train_sft"]) + read(data["test_sft"])
    correct = 0
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "prompt_id", "messages"}
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
        assert row["messages"][0]["content"] == row["prompt"]
        kind, digits = question(row["prompt"])
        reply = int(row["messages"][1]["content"])
        assert reply in digits  # the weak teacher answers with a number from the list...
        correct += reply == (max(digits) if kind == "max" else min(digits))
        ex = sft_example(row, i, tok, loss_on="assistant", max_length=64, too_long="drop")
        assert len(ex.ids) <= 44 and ex.ids[-1] == tok.eos_token_id
        assert ex.loss_mask.sum() == 2  # the digit and </s>
    assert 0.3 < correct / len(rows) < 0.6  # ... and is right only some of the time


def test_preference_rows(data, tok):
    rows = read(data["train_prefs"]) + read(data["test_prefs"])
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "prompt_id", "chosen", "rejected", "messages", "score_chosen",
                            "score_rejected"}
        assert row["prompt_id"] == hashlib.sha256(row["prompt"].encode()).hexdigest()
        assert row["messages"] == row["chosen"]
        assert row["chosen"][0] == row["rejected"][0] == {"role": "user", "content": row["prompt"]}
        chosen, rejected = row["chosen"][1]["content"], row["rejected"][1]["content"]
        assert chosen != rejected
        kind, digits = question(row["prompt"])
        assert int(chosen) == (max(digits) if kind == "max" else min(digits))
        assert int(rejected) in digits
        assert row["score_chosen"] > row["score_rejected"] >= 1.0
        ex = preference_example(row, i, tok, max_length=64, max_prompt_length=64)
        assert not ex.truncated and len(ex.chosen) == len(ex.rejected) == 2


def test_task_prompts_are_held_out(data):
    tasks = read(data["test_prompts"])
    for row in tasks:
        kind, digits = question(row["prompt"])
        assert row["answer"] == str(max(digits) if kind == "max" else min(digits))
        assert row["messages"] == [{"role": "user", "content": row["prompt"]}]
    # The answer depends on the set of digits: no test set reaches training, in any order.
    train_sets = {frozenset(question(r["prompt"])[1]) for n in ("train_sft", "train_prefs") for r in read(data[n])}
    assert not train_sets & {frozenset(question(r["prompt"])[1]) for r in tasks}


@pytest.mark.parametrize("reply, answer, ok", [
    ("8", "8", True), (" 8\n", "8", True), ("8", 8, True), ("8 ", " 8", True),
    ("3", "8", False), ("8.", "8", False), ("88", "8", False), ("", "8", False), ("The answer is 8", "8", False),
])
def test_is_correct(reply, answer, ok):
    assert demo.is_correct(reply, answer) is ok


def test_task_accuracy_on_a_tiny_random_model(data, tok):
    cfg = MistralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, dtype=jnp.float32)
    model = Mistral(cfg, rngs=nnx.Rngs(0))
    rows = read(data["test_prompts"])[:10]
    _, replies = demo.task_replies(model, tok, rows, max_new_tokens=2, batch_size=8)
    assert demo.task_replies(model, tok, rows, max_new_tokens=2, batch_size=3)[1] == replies  # slots change no reply
    # The score is the share of exact matches: answers made to match the greedy reply on rows 0, 2, 4 only.
    scored = [dict(r, answer=reply if i in (0, 2, 4) else reply + " 7")
              for i, (r, reply) in enumerate(zip(rows, replies))]
    assert demo.task_accuracy(model, tok, scored, max_new_tokens=2, batch_size=8) == 0.3


# --- The demo's data half: the teacher (part 1), the judge and on-policy pairs (parts 2-3). ---

def call_for(prompt, seed):
    from zephyr_jax.data.backends import Call
    return Call(messages=[{"role": "user", "content": prompt}], seed=seed)


def test_the_teacher_is_the_weak_biased_teacher_and_repeats_itself_for_a_seed():
    prompts = demo.unique_questions(400, seed=3)
    replies = [demo.teacher(call_for(p, seed)) for seed, p in enumerate(prompts)]
    assert replies == [demo.teacher(call_for(p, seed)) for seed, p in enumerate(prompts)]
    right = first = 0
    for prompt, reply in zip(prompts, replies):
        kind, digits = question(prompt)
        answer = max(digits) if kind == "max" else min(digits)
        assert int(reply) in digits
        right += int(reply) == answer
        first += int(reply) != answer and int(reply) == digits[0]
    # Right about TEACHER_ACCURACY of the time; its mistakes are mostly the first number of the list.
    assert abs(right / len(prompts) - demo.TEACHER_ACCURACY) < 0.08
    assert first > 0.6 * (len(prompts) - right)
    with pytest.raises(ValueError, match="not a demo question"):
        demo.teacher(call_for("Write a poem", 0))


@pytest.mark.parametrize("prompt, reply, score", [
    ("Which is biggest: 3 8 5 1?", "8", 5.0), ("Which is biggest: 3 8 5 1?", " 8\n", 5.0),
    ("Which is biggest: 3 8 5 1?", "5", 1.0), ("Smallest of 3 8 5?", "3", 5.0), ("Smallest of 3 8 5?", "8", 1.0),
    ("Smallest of 3 8 5?", "7", 1.0), ("Smallest of 3 8 5?", "three", 1.0), ("Smallest of 3 8 5?", "", 1.0),
])
def test_the_judge_checks_the_answer(prompt, reply, score):
    assert demo.judge({"instruction": prompt}, reply) == score
    assert demo.judge({"prompt": prompt}, reply) == score


def test_distilled_sft_data_is_the_teachers_replies_in_the_ultrachat_schema(tmp_path):
    out = demo.distill_sft_data(tmp_path / "dialogues", seed=0, n=100)
    train, test = list(load_rows(out, "train_sft")), list(load_rows(out, "test_sft"))
    assert (len(train), len(test)) == (90, 10)
    prompts = [r["prompt"] for r in train + test]
    assert sorted(prompts) == sorted(demo.unique_questions(100, seed=0))
    for row in train + test:
        user, assistant = row["messages"]
        assert user == {"role": "user", "content": row["prompt"]}
        assert int(assistant["content"]) in question(row["prompt"])[1]


def test_on_policy_pairs_prefer_a_right_reply_to_a_wrong_one(tmp_path):
    """The feedback stage with the teacher as the generator (the demo's is the dSFT model on the engine): every
    prompt with both right and wrong replies gives one pair, chosen right and rejected one of its wrong replies."""
    from zephyr_jax.data.backends import CallableBackend

    prefs = demo.on_policy_prefs(CallableBackend(demo.teacher), tmp_path / "on_policy", seed=0, n=80, samples=4)
    raw = list(load_rows(tmp_path / "on_policy" / "feedback", "train"))
    assert len(raw) == 80 and all(len(r["completions"]) == 4 for r in raw)
    mixed = {}
    for r in raw:
        kind, digits = question(r["instruction"])
        answer = str(max(digits) if kind == "max" else min(digits))
        replies = [c["response"].strip() for c in r["completions"]]
        if answer in replies and any(x != answer for x in replies):
            mixed[r["instruction"]] = (answer, set(replies) - {answer})
    pairs = list(load_rows(prefs, "train_prefs")) + list(load_rows(prefs, "test_prefs"))
    assert len(load_rows(prefs, "test_prefs")) == len(mixed) // 10
    assert sorted(p["prompt"] for p in pairs) == sorted(mixed)
    for p in pairs:
        answer, wrong = mixed[p["prompt"]]
        assert p["chosen"][1]["content"].strip() == answer
        assert p["rejected"][1]["content"].strip() in wrong


def test_on_policy_replies_that_all_tie_are_said_to_give_no_pairs(tmp_path):
    """A dSFT model that has not learned the reply format is wrong on every sample: no prompt gives a pair, and
    the demo says so, with the tie counts (it said "test_size=0 needs 0 <= test_size < the 0 kept prompts")."""
    from zephyr_jax.data.backends import CallableBackend

    with pytest.raises(ValueError, match=r"on-policy feedback: 20 prompts x 4 samples gave 0 pairs: .*"
                                         r"--pairs=synthetic.*\n.*skipped 20 of 20 rows"):
        demo.on_policy_prefs(CallableBackend(lambda call: "I am not sure."), tmp_path, seed=0, n=20, samples=4)


def test_a_missing_configs_directory_stops_the_demo_before_it_makes_data(tmp_path, monkeypatch):
    """`pip install .` (not -e) copies the package without configs/: the demo says so at once and writes nothing."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert demo.configs_root() == repo  # this clone, wherever the tests run from
    monkeypatch.chdir(tmp_path)
    assert demo.configs_root(repo) == repo
    with pytest.raises(FileNotFoundError, match="configs/sft.py and configs/dpo.py.*pip install -e"):
        demo.run_demo(str(tmp_path / "out"), repo_root=str(tmp_path))
    assert not (tmp_path / "out").exists()
    # A training stage preempted (SIGTERM): the command exits with train's preempted status, as train does, so a
    # scheduler requeues it
    from zephyr_jax.train import PREEMPTED_EXIT_CODE, Preempted

    def preempted(*args, **kw):
        raise Preempted("saved at step 3")

    monkeypatch.setattr(demo, "run_demo", preempted)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["run", f"--out={tmp_path / 'out'}"])
    assert exit_.value.code == PREEMPTED_EXIT_CODE


@pytest.mark.parametrize("command", ["make-data", "run"])
def test_an_out_that_is_a_file_is_a_one_line_error(tmp_path, capsys, command):
    (tmp_path / "notes").write_text("")
    with pytest.raises(SystemExit) as exit_info:  # was NotADirectoryError's traceback
        demo.main([command, f"--out={tmp_path / 'notes' / 'demo'}"])
    assert exit_info.value.code == 2 and f"{tmp_path / 'notes'} is a file, not a directory" in capsys.readouterr().err


@pytest.mark.long
def test_the_whole_demo_connects_its_stages_at_a_small_size(tmp_path, monkeypatch, capsys):
    """run_demo, the README's first command, end to end at a small size (its parts have their own tests; this one
    checks that they connect): the teacher's dialogues train dSFT, the dSFT checkpoint samples the on-policy pairs
    on the engine, dDPO starts from that checkpoint on those pairs and is evaluated on the scripted held-out pairs,
    the export holds dDPO's last weights, and the table compares the two models."""
    import functools

    import numpy as np

    from zephyr_jax.loading import load_model

    monkeypatch.setattr(demo, "make_demo_data", functools.partial(demo.make_demo_data, **SIZES))
    # One CPU device, as the README's command runs on a laptop (dSFT took 65 s on the suite's 8, 34 s on 1)
    load_config = config_common.load_config
    monkeypatch.setattr(config_common, "load_config", lambda spec, **overrides: load_config(
        spec, **overrides, **{"mesh.num_devices": 1}))
    monkeypatch.setattr(demo, "distill_sft_data", functools.partial(demo.distill_sft_data, n=4000))
    monkeypatch.setattr(demo, "on_policy_prefs", functools.partial(demo.on_policy_prefs, n=200))
    out = tmp_path / "out"
    results = demo.run_demo(str(out), repo_root=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    printed = capsys.readouterr().out
    sft, dpo = (json.load(open(out / stage / "config.json")) for stage in ("sft", "dpo"))
    assert sft["data"]["train"] == str(out / "data" / "dialogues") and sft["mesh"]["num_devices"] == 1
    assert len(read(out / "data" / "dialogues" / "train_sft.jsonl")) == 4000 - 400  # (a tenth held out)
    assert dpo["model"]["init"] == "orbax" and dpo["model"]["path"] == str(out / "sft")
    assert dpo["model"]["step"] == 3600 // 32  # dSFT's last step: 1 epoch in batches of 32
    assert dpo["data"]["train"] == str(out / "data" / "on_policy" / "prefs")
    assert dpo["data"]["eval"] == str(out / "data" / "prefs")
    train, test = (len(read(out / "data" / "on_policy" / "prefs" / f"{s}_prefs.jsonl")) for s in ("train", "test"))
    assert f"on-policy feedback: 200 prompts x 4 samples -> {train + test} pairs ({train} train)" in printed
    exported = jax.tree.leaves(nnx.state(load_model(str(out / "hf"), dtype="float32")))
    trained = jax.tree.leaves(nnx.state(load_model(str(out / "dpo"), dtype="float32")))
    assert all(np.array_equal(a, b) for a, b in zip(exported, trained, strict=True))
    for stage in ("sft", "dpo"):
        assert set(results[stage]) == {"task_accuracy", "preference_accuracy"}
        assert all(0 <= v <= 1 for v in results[stage].values())
    assert "held-out effect of dDPO (on-policy pairs)" in printed and "sample chat reply" in printed
