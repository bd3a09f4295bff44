"""The embedded demo: a tiny synthetic chat task on which dDPO measurably beats dSFT, trained on 2 CPU cores.

The task. The user asks for the largest or the smallest of a few distinct digits, in one of a few phrasings:

    <|user|>  Which is biggest: 3 8 5 1?
    <|assistant|>  8

Lists hold 3-5 distinct digits; four phrasings (two for max, two for min). Mistral's tokenizer gives every digit
its own token, so a whole conversation encodes to 38-43 tokens with the Zephyr template (an exchange of one-token
messages takes 29), and the reply is one digit and `</s>`.

dSFT data (UltraChat schema) imitates a weak teacher with a systematic bias, as distilled dialogue data
inherits its teacher's mistakes: it answers correctly only `TEACHER_ACCURACY` of the time and otherwise gives
the *first* number of the list (or, when that one is the answer, another one at random). A model that imitates
it would learn the format, the skill (45% of its data is right) and the teacher's favourite answer (55%); the
dSFT models measured below are right 43.0% and 69.6% of the time (seeds 0 and 1).

Preference data (ultrafeedback_binarized schema) is AI feedback on the teacher's replies: for each prompt,
chosen = the correct reply, rejected = a wrong reply drawn from the teacher's mistakes; scores mimic
UltraFeedback's 1-10 overall score (10 for the right answer, lower the further the rejected answer ranks from
it). dDPO on these pairs should move the greedy replies to the right answer.

The whole demo (`run_demo`, the README's first command) makes its own dSFT data through data.dialogues, with
`teacher` as the assistant on 10,000 unique questions, and by default its dDPO pairs on-policy: the dSFT model
samples 4 replies (temperature 1) for each of 3,000 prompts on the engine, `judge` checks every reply (5 right,
1 wrong) through data.feedback, and binarize pairs a right reply with a wrong one; prompts whose replies all tie
give no pair (1,900 and 2,072 pairs for seeds 0 and 1). The scripted pairs stay the held-out test for both kinds
of pairs. Measured 2026-12-07 on 2 cores with the split by digit set (below), greedy exact match dSFT -> dDPO:
on-policy 43.0% -> 87.4% (seed 0) and 69.6% -> 77.4% (seed 1); the scripted pairs from the same dSFT models:
79.2% and 77.4% (a last-bit change to float32 gradients moved these by up to 5 points: README). (With the
earlier split by ordered list, whose test sets reached training in other orders: 54.8% -> 88.0% and 62.8% ->
78.6%, 2026-12-01.) A judge that gave partial credit to a wrong answer near the right
one (so 23% of the pairs preferred one wrong answer to another) reached 80.8% (seed 0, the earlier split).

Held out: digit sets are split between train and test by a hash of the set, so no test question's digits (in
any order or phrasing) occur in the training data.

Files (`make_demo_data`), laid out for `zephyr_jax.data.sources.load_rows(DIR, split)`:
    DIR/sft/train_sft.jsonl   DIR/sft/test_sft.jsonl        load_rows(DIR + "/sft", "train_sft")
    DIR/prefs/train_prefs.jsonl DIR/prefs/test_prefs.jsonl  load_rows(DIR + "/prefs", "train_prefs")
    DIR/task/test_prompts.jsonl                             held-out prompts with their answers (task_accuracy)

    python -m zephyr_jax.demo make-data --out=demo_data

Measured before packing, with the earlier split by ordered list (throwaway loop on train_steps.make_train_step,
2 shared CPU cores, defaults n_sft=10000, n_pref=3000, n_test=500): a from-scratch Mistral with hidden 96,
intermediate 256, 2 layers, 4 query / 2 kv heads (0.2M non-embedding parameters, 6.35M with the 32000-token
embeddings and LM head);
dSFT 1 epoch, batch 32 unpacked rows padded to 48, loss on the assistant reply, AdamW lr 2e-3 cosine 10% warmup
(312 steps); dDPO from it, sigmoid loss, beta 1.0, batch 32 pairs padded to 48, lr 1e-3 linear 10% warmup,
1 epoch (93 steps). Greedy exact match on task/test_prompts.jsonl: dSFT 0.41 -> dDPO 0.82 (data seed 0),
0.34 -> 0.87 (seed 1); held-out preference accuracy (implicit reward, test_prefs) 0.00 -> 0.99 / 1.00.
dSFT ~150-200 s, dDPO ~80-140 s depending on the load. (beta 0.5, lr 5e-4, 2 epochs: 0.84; lr 1e-3 with
beta 0.5 breaks the reply format.)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys

import numpy as np

from zephyr_jax.data.binarize import output_dir_problem, prompt_id, write_jsonl

# (kind, template): kind picks max or min; {digits} is the list, space-separated (every digit its own token).
TEMPLATES = (
    ("max", "Which is biggest: {digits}?"),
    ("max", "Largest of {digits}?"),
    ("min", "Which is lowest: {digits}?"),
    ("min", "Smallest of {digits}?"),
)
LIST_LENGTHS = (3, 4, 5)  # distinct digits per question
TEACHER_ACCURACY = 0.45  # the dSFT teacher's rate of correct replies (else: its favourite wrong answer)
TEST_FRACTION = 0.1  # share of digit lists held out for the test splits
SCORE_CORRECT = 10.0


def _is_test_list(digits) -> bool:
    """Train/test split of digit sets by a hash (stable across runs, Python versions and machines): the answer
    depends only on the set and the kind, so a test list's digits must not reach training in another order."""
    h = hashlib.sha256(("".join(map(str, sorted(digits)))).encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0**64 < TEST_FRACTION


def _question(rng: random.Random, test: bool):
    """(prompt text, kind, digits) for a random question from the train or the test pool of digit lists."""
    while True:
        digits = rng.sample(range(10), rng.choice(LIST_LENGTHS))
        if _is_test_list(digits) == test:
            break
    kind, template = rng.choice(TEMPLATES)
    return template.format(digits=" ".join(map(str, digits))), kind, digits


def correct_answer(kind: str, digits) -> int:
    return max(digits) if kind == "max" else min(digits)


def _teacher_wrong(rng: random.Random, kind: str, digits) -> int:
    """The weak teacher's mistake: the first number of the list, or (if that is right) a random other one."""
    right = correct_answer(kind, digits)
    if digits[0] != right:
        return digits[0]
    return rng.choice([d for d in digits if d != right])


def _teacher_reply(rng: random.Random, kind: str, digits) -> int:
    if rng.random() < TEACHER_ACCURACY:
        return correct_answer(kind, digits)
    return _teacher_wrong(rng, kind, digits)


def _score(kind: str, digits, reply: int) -> float:
    """UltraFeedback-like 1-10 score: 10 for the right answer, lower the further the reply ranks from it."""
    ranked = sorted(digits, reverse=(kind == "max"))
    return round(SCORE_CORRECT - 9.0 * ranked.index(reply) / (len(digits) - 1), 2)


def parse_question(prompt: str):
    """(kind, digits) of a demo question, or None for any other text."""
    for kind, template in TEMPLATES:
        head, _, tail = template.partition("{digits}")
        if prompt.startswith(head) and prompt.endswith(tail):
            words = prompt[len(head):len(prompt) - len(tail)].split()
            if words and all(w.isdigit() and len(w) == 1 for w in words):
                return kind, [int(w) for w in words]
    return None


def teacher(call) -> str:
    """The demo's dSFT teacher as a `data.backends` callable: answers the last user turn as the weak teacher
    does, with randomness from the call's seed (so reruns and resumed runs agree)."""
    question = parse_question(call.messages[-1]["content"])
    if question is None:
        raise ValueError(f"not a demo question: {call.messages[-1]['content']!r}")
    return str(_teacher_reply(random.Random(call.seed), *question))


def judge(row: dict, response: str) -> float:
    """The programmatic judge for on-policy feedback: it checks the answer, 5 if right and 1 otherwise (partial
    credit did worse; see the module docstring)."""
    kind, digits = parse_question(row.get("instruction") or row["prompt"])
    return 5.0 if is_correct(response or "", correct_answer(kind, digits)) else 1.0


def _sft_row(rng, test):
    prompt, kind, digits = _question(rng, test)
    reply = str(_teacher_reply(rng, kind, digits))
    return {"prompt": prompt, "prompt_id": prompt_id(prompt),
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]}


def _pref_row(rng, test):
    prompt, kind, digits = _question(rng, test)
    good, bad = correct_answer(kind, digits), _teacher_wrong(rng, kind, digits)
    user = {"role": "user", "content": prompt}
    chosen = [user, {"role": "assistant", "content": str(good)}]
    rejected = [user, {"role": "assistant", "content": str(bad)}]
    return {"prompt": prompt, "prompt_id": prompt_id(prompt), "chosen": chosen, "rejected": rejected,
            "messages": chosen, "score_chosen": _score(kind, digits, good),
            "score_rejected": _score(kind, digits, bad)}


def _task_row(rng, test):
    prompt, kind, digits = _question(rng, test)
    return {"prompt": prompt, "prompt_id": prompt_id(prompt), "messages": [{"role": "user", "content": prompt}],
            "answer": str(correct_answer(kind, digits)), "kind": kind, "digits": digits}


def _write_jsonl(path: str, rows) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_jsonl(rows, path)
    return path


def make_demo_data(out_dir, seed: int = 0, n_sft: int = 10000, n_pref: int = 3000, n_test: int = 500) -> dict:
    """Writes the demo's SFT, preference and task files under `out_dir` (see the module docstring); the same
    seed gives byte-identical files. n_test is the size of each held-out file. Returns {name: path}."""
    out_dir = os.fspath(out_dir)
    specs = {  # name: (path, row maker, count, test pool?)
        "train_sft": ("sft/train_sft.jsonl", _sft_row, n_sft, False),
        "test_sft": ("sft/test_sft.jsonl", _sft_row, n_test, True),
        "train_prefs": ("prefs/train_prefs.jsonl", _pref_row, n_pref, False),
        "test_prefs": ("prefs/test_prefs.jsonl", _pref_row, n_test, True),
        "test_prompts": ("task/test_prompts.jsonl", _task_row, n_test, True),
    }
    paths = {}
    for k, (name, (rel, make_row, count, test)) in enumerate(specs.items()):
        rng = random.Random(seed * 1000 + k)  # one stream per file: changing one size leaves the others alone
        paths[name] = _write_jsonl(os.path.join(out_dir, rel), (make_row(rng, test) for _ in range(count)))
    paths.update(sft=os.path.join(out_dir, "sft"), prefs=os.path.join(out_dir, "prefs"))
    return paths


# ---------------------------------------------------------------------------------------------------------
# The task metric


def normalize_reply(text: str) -> str:
    return text.strip()


def is_correct(reply: str, answer) -> bool:
    """Exact match of the reply with the answer, surrounding whitespace ignored."""
    return normalize_reply(reply) == normalize_reply(str(answer))


def load_task_rows(prompts_file_or_rows) -> list[dict]:
    if isinstance(prompts_file_or_rows, (str, os.PathLike)):
        with open(prompts_file_or_rows, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    return list(prompts_file_or_rows)


def task_replies(model, tokenizer, prompts_file_or_rows, max_new_tokens: int = 8, batch_size: int = 64):
    """(rows, greedy replies) for the task prompts, on the engine with `batch_size` slots."""
    from zephyr_jax.generate import generate

    rows = load_task_rows(prompts_file_or_rows)
    messages = [r.get("messages") or [{"role": "user", "content": r["prompt"]}] for r in rows]
    return rows, generate(model, tokenizer, messages, max_new_tokens=max_new_tokens, max_slots=batch_size)


def task_accuracy(model, tokenizer, prompts_file_or_rows, max_new_tokens: int = 8, batch_size: int = 64) -> float:
    """Exact-match accuracy of greedy replies on the task prompts (rows with "messages" or "prompt", and
    "answer"), e.g. DIR/task/test_prompts.jsonl."""
    rows, replies = task_replies(model, tokenizer, prompts_file_or_rows, max_new_tokens, batch_size)
    if not rows:
        raise ValueError("no task prompts")
    return sum(is_correct(reply, row["answer"]) for row, reply in zip(rows, replies)) / len(rows)


# ---------------------------------------------------------------------------------------------------------
# The whole demo: data -> dSFT -> dDPO -> export -> sample reply, with the held-out effect of dDPO.


def preference_accuracy(model, tok, prefs_dir, split="test_prefs", batch_size=32) -> float:
    """Fraction of held-out pairs where the model gives the chosen reply a higher log-prob than the rejected
    one (meaningful for any model, unlike DPO's rewards/accuracies, which compare with a reference)."""
    from zephyr_jax.data import preference_example, process_rows
    from zephyr_jax.data.sources import load_rows
    from zephyr_jax.evaluate import pair_logps

    rows = load_rows(prefs_dir, split)
    examples, _ = process_rows(rows, lambda r, i: preference_example(r, i, tok, max_length=128,
                                                                     max_prompt_length=64),
                               progress=False, log=lambda s: None)
    logps = pair_logps(model, examples, batch_size)  # packed rows: ~40-token pairs padded to 128 cost 10x
    return float(np.mean(logps[:, 0] > logps[:, 1]))


def unique_questions(n: int, seed: int, test: bool = False) -> list[str]:
    """n distinct demo questions from the train (or test) pool: the seeds of the data CLIs."""
    rng, seen = random.Random(seed), {}
    while len(seen) < n:
        seen.setdefault(_question(rng, test)[0], None)
    return list(seen)


def distill_sft_data(out_dir, seed: int = 0, n: int = 10000) -> str:
    """Part 1: the teacher writes the dSFT dialogues through data.dialogues (one turn each)."""
    from zephyr_jax.data.backends import CallableBackend
    from zephyr_jax.data.dialogues import make_dialogues

    make_dialogues(unique_questions(n, seed), None, CallableBackend(teacher, name="demo-teacher"), out_dir,
                   min_turns=1, max_turns=1, seed=seed, test_size=min(500, n // 10), max_tokens=8, log=lambda s: None)
    return out_dir


def on_policy_prefs(generator, out_dir, seed: int = 0, n: int = 3000, samples: int = 4) -> str:
    """Parts 2 and 3: `generator` (a data.backends backend; the demo's is the dSFT model on the engine) samples
    `samples` replies per prompt, the programmatic judge rates them (data.feedback, raw rows in out_dir/feedback),
    and binarize turns the ratings into pairs in out_dir/prefs. Prompts where every reply is right (or every one
    wrong) tie and give no pair. The held-out pairs stay the scripted DIR/prefs/test_prefs, so both kinds of
    pairs are measured on the same test."""
    from zephyr_jax.data.binarize import binarize, write_splits
    from zephyr_jax.data.errors import SkipCounter
    from zephyr_jax.data.feedback import collect_feedback
    from zephyr_jax.data.sources import load_rows

    prompts = [{"prompt": q} for q in unique_questions(n, seed + 1)]
    collect_feedback(prompts, [generator], judge, os.path.join(out_dir, "feedback"), completions_per_prompt=samples,
                     principles="none", max_tokens=8, seed=seed, concurrency=64, log=lambda s: None)
    counter = SkipCounter("on-policy feedback")
    pairs = binarize(load_rows(os.path.join(out_dir, "feedback"), "train"), seed=seed, counter=counter)
    if len(pairs) < 2:  # (was "test_size=0 needs 0 <= test_size < the 0 kept prompts")
        raise ValueError(f"on-policy feedback: {n} prompts x {samples} samples gave {len(pairs)} pairs: the dSFT "
                         "model's replies to almost every prompt were all right or all wrong (a tie gives no "
                         "pair); train dSFT on more dialogues, or use the scripted pairs (--pairs=synthetic).\n"
                         + counter.summary())
    train, _ = write_splits(pairs, os.path.join(out_dir, "prefs"), min(200, len(pairs) // 10), seed)
    print(f"on-policy feedback: {n} prompts x {samples} samples -> {len(pairs)} pairs ({len(train)} train)")
    return os.path.join(out_dir, "prefs")


def configs_root(repo_root: str | None = None) -> str:
    """The directory whose configs/ the demo trains with: repo_root, else the clone an editable install points at,
    else the working directory. Checked before any data is made: `pip install .` copies the package but not
    configs/, and the demo would otherwise fail after minutes of work."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = [repo_root] if repo_root else [package_parent, os.getcwd()]
    for root in candidates:
        if all(os.path.isfile(os.path.join(root, "configs", f)) for f in ("sft.py", "dpo.py")):
            return root
    raise FileNotFoundError(f"the demo needs configs/sft.py and configs/dpo.py; none in {candidates}: run it from "
                            "the repository's root, or install the clone with `pip install -e .`")


def run_demo(out: str, seed: int = 0, repo_root: str | None = None, pairs: str = "on-policy") -> dict:
    """Everything the README's first command does; returns the before/after numbers. pairs="on-policy": the
    dSFT model's own samples rated by the programmatic judge; "synthetic": the teacher's scripted pairs."""
    from zephyr_jax import train
    from zephyr_jax.chat import reply
    from zephyr_jax.data.backends import EngineBackend
    from zephyr_jax.config_common import load_config
    from zephyr_jax.engine import Engine
    from zephyr_jax.export import export
    from zephyr_jax.loading import load_model
    from zephyr_jax.tokenizer import load_tokenizer

    root = configs_root(repo_root)
    paths = make_demo_data(os.path.join(out, "data"), seed=seed)
    tok = load_tokenizer()
    data = lambda train_dir, eval_dir: {"data.train": train_dir, "data.eval": eval_dir, "logging.tensorboard": False}
    print("== 1. dSFT data: the teacher's dialogues (data.dialogues) ==")
    sft_data = distill_sft_data(os.path.join(out, "data", "dialogues"), seed=seed)
    print("== dSFT ==")
    train.run(load_config(os.path.join(root, "configs/sft.py:demo"), **data(sft_data, sft_data)),
              os.path.join(out, "sft"))
    prefs = paths["prefs"]
    if pairs == "on-policy":
        print("== 2-3. on-policy AI feedback (data.feedback) and binarize ==")
        generator = EngineBackend(load_model(os.path.join(out, "sft"), dtype="float32"), tok, name="dsft",
                                  max_slots=64, max_length=128)
        try:
            prefs = on_policy_prefs(generator, os.path.join(out, "data", "on_policy"), seed=seed)
        finally:
            generator.close()
    print("== 4. dDPO ==")
    dpo_eval = train.run(load_config(os.path.join(root, "configs/dpo.py:demo"), **data(prefs, paths["prefs"]),
                                     **{"model.path": os.path.join(out, "sft")}), os.path.join(out, "dpo"))
    hf_dir = export(os.path.join(out, "dpo"), os.path.join(out, "hf"), dtype="float32")
    results = {}
    for stage in ("sft", "dpo"):
        model = load_model(os.path.join(out, stage), dtype="float32")
        results[stage] = {"task_accuracy": task_accuracy(model, tok, paths["test_prompts"]),
                          "preference_accuracy": preference_accuracy(model, tok, paths["prefs"])}
    question = load_task_rows(paths["test_prompts"])[0]
    messages = question.get("messages") or [{"role": "user", "content": question["prompt"]}]
    print(f"\n== sample chat reply (exported model in {hf_dir}) ==\nuser> {messages[-1]['content']}\nzephyr> ",
          end="")
    reply(Engine(model, tok, max_slots=1, max_length=128), tok, messages, max_new_tokens=8, temperature=0.0)
    print(f"(correct answer: {question['answer']})\n")
    print(f"held-out effect of dDPO ({pairs} pairs)   dSFT     dSFT + dDPO")
    for k in ("task_accuracy", "preference_accuracy"):
        print(f"  {k:<30} {results['sft'][k]:>6.1%}   {results['dpo'][k]:>6.1%}")
    print(f"  dDPO eval rewards/accuracies                {dpo_eval['rewards/accuracies']:>6.1%}")
    return {**results, "dpo_eval": dpo_eval}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m zephyr_jax.demo", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-data", help="write the demo's SFT, preference and task jsonl files")
    make.add_argument("--out", default="demo_data", help="output directory (default: demo_data)")
    make.add_argument("--seed", type=int, default=0, help="the data's seed (default 0)")
    make.add_argument("--n_sft", type=int, default=10000)
    make.add_argument("--n_pref", type=int, default=3000)
    make.add_argument("--n_test", type=int, default=500)
    run = sub.add_parser("run", help="data -> dSFT -> dDPO -> export -> sample reply, with dDPO's held-out effect")
    run.add_argument("--out", default="workdirs/demo", help="where data, workdirs and the export go")
    run.add_argument("--seed", type=int, default=0,
                     help="the data's seed: the task's files, the teacher's dialogues, the on-policy samples and their "
                          "pairs (default 0); the models' initialisation and shuffles keep the configs' seed, 42")
    run.add_argument("--pairs", choices=("on-policy", "synthetic"), default="on-policy",
                     help="dDPO pairs: the dSFT model's own samples rated by a checker, or the scripted ones")
    args = parser.parse_args(argv)
    if (why := output_dir_problem(args.out)) is not None:  # (NotADirectoryError's traceback)
        parser.error(f"--out={args.out}: {why}")
    if args.command == "run":
        from zephyr_jax.train import PREEMPTED_EXIT_CODE, Preempted

        try:
            root = configs_root()
        except FileNotFoundError as e:
            parser.error(str(e))
        try:
            run_demo(args.out, seed=args.seed, repo_root=root, pairs=args.pairs)
        except Preempted as e:  # a training stage stopped early: no later stage starts from it
            print(f"demo stopped: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
    elif args.command == "make-data":
        for flag in ("n_sft", "n_pref", "n_test"):  # (an empty file was written, and training failed on it later)
            if getattr(args, flag) < 1:
                parser.error(f"--{flag}={getattr(args, flag)}: must be at least 1")
        paths = make_demo_data(args.out, seed=args.seed, n_sft=args.n_sft, n_pref=args.n_pref, n_test=args.n_test)
        for name, path in paths.items():
            print(f"{name}: {path}")


if __name__ == "__main__":
    main()
