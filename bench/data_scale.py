"""The data CLIs at the real data's scale: time, CPU, peak memory and, for a resume, the seconds until the first new
teacher call, on synthetic rows in the real schemas (lorem text of realistic lengths: prompts 100-300 words,
replies 200-500; UltraChat-like dialogues of 1-6 turns). The teachers and the judge are callables defined here
(instant, seeded), so the figures are the pipeline's own cost.

    python bench/data_scale.py WORKDIR [--prompts=16000] [--dialogues=20000]

Steps, each in a fresh process: the JSON type check of load_rows on the raw rows; binarize; feedback with an LLM
judge (4 completions, 4 ratings, 4 critiques a prompt), then resumed from its journal cut 5 MB short (a kill);
dialogues (--sector=all), then resumed from its journal cut 3 MB short. The resumed outputs are compared with the
uninterrupted runs'. UltraFeedback: 64k prompts; UltraChat 200k: 208k dialogues."""

import argparse
import json
import multiprocessing
import os
import random
import re
import resource
import shutil
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORDS = ("lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt ut labore et "
         "dolore magna aliqua enim ad minim veniam quis nostrud exercitation ullamco laboris nisi aliquip ex ea "
         "commodo consequat duis aute irure in reprehenderit voluptate velit esse cillum fugiat nulla").split()
FIRST_CALL = "DATA_SCALE_FIRST_CALL"  # a file the first teacher call of a process writes its time into


def text(rng, lo, hi) -> str:
    return " ".join(rng.choices(WORDS, k=rng.randint(lo, hi))).capitalize() + "."


def raw_feedback_row(rng, i) -> dict:
    """An openbmb/UltraFeedback row: an instruction and 4 rated completions."""
    def aspect(typed):
        rated = {"Rating": str(rng.randint(1, 5)), "Rationale": text(rng, 20, 40)}
        return {"Type": ["1"], **rated, "Rationale For Rating": text(rng, 20, 40)} if typed else rated

    completions = [{"model": f"m{k}", "principle": "helpfulness", "custom_system_prompt": "Be helpful.",
                    "response": text(rng, 200, 500), "critique": text(rng, 40, 80),
                    "overall_score": float(rng.randint(1, 10)), "fine-grained_score": 3.0,
                    "annotations": {"instruction_following": aspect(False), "honesty": aspect(False),
                                    "truthfulness": aspect(True), "helpfulness": aspect(True)}} for k in range(4)]
    return {"source": rng.choice(["evol_instruct", "sharegpt", "ultrachat", "flan_v2_niv2", "truthful_qa"]),
            "instruction": f"[{i}] " + text(rng, 100, 300), "models": [f"m{k}" for k in range(4)],
            "completions": completions, "correct_answers": ["None"], "incorrect_answers": ["None"]}


# ---------------------------------------------------------------------------------- teachers (callable:...)

def _first_call():
    path = os.environ.get(FIRST_CALL)
    if path and not os.path.exists(path):
        with open(path, "w") as f:
            f.write(repr(time.time()))


def generate(call):
    _first_call()
    return text(random.Random(call.seed), 200, 500)


def judge(call):
    """Well-formed ratings and critiques, seeded by the request."""
    from zephyr_jax.data.binarize import ASPECTS
    from zephyr_jax.data.feedback_prompts import RUBRICS, TYPED_ASPECTS

    _first_call()
    user = call.messages[1]["content"]
    rng = random.Random(zlib.crc32(user.encode()))
    if "Overall Score" in user:
        return f"Feedback: {text(rng, 40, 80)}\nOverall Score: {rng.randint(1, 10)}"
    aspect = next(a for a in ASPECTS if RUBRICS[a] in user)
    blocks = []
    for i in range(1, len(re.findall(r"^<text \d+> ", user, re.M)) + 1):
        r = rng.randint(1, 5)
        typed = f"Type: 1\nRationale: {text(rng, 20, 40)}\n" if aspect in TYPED_ASPECTS else ""
        tail = f"\nRationale For Rating: {text(rng, 20, 40)}" if typed else f"\nRationale: {text(rng, 20, 40)}"
        blocks.append(f"#### Output for Text {i}\n{typed}Rating: {r}{tail}")
    return "\n\n".join(blocks)


def user(call):
    _first_call()
    return "Question: " + text(random.Random(call.seed), 20, 90)


def assistant(call):
    _first_call()
    return text(random.Random(call.seed), 80, 200)


# ---------------------------------------------------------------------------------- measuring

def _child(target, args, queue):
    os.environ[FIRST_CALL] = first = os.path.join(os.environ["DATA_SCALE_DIR"], f"first-{os.getpid()}")
    start = time.time()
    result = target(*args)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    seconds_to_first = float(open(first).read()) - start if os.path.exists(first) else None
    queue.put({"wall_s": round(time.time() - start, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
               "peak_gb": round(usage.ru_maxrss / 1e6, 2), "result": result,
               "first_call_s": seconds_to_first and round(seconds_to_first, 1)})


def measure(name, target, *args) -> dict:
    queue = multiprocessing.get_context("spawn").Queue()
    process = multiprocessing.get_context("spawn").Process(target=_child, args=(target, args, queue))
    process.start()
    process.join()  # (the row is small: the queue does not hold the child up)
    if process.exitcode:
        sys.exit(f"{name} failed (exit {process.exitcode})")
    row = queue.get(timeout=60)
    print(json.dumps({"step": name, **row}), flush=True)
    return row


def type_check(path):
    from zephyr_jax.data.sources import _json_types_agree

    return _json_types_agree([path])


def cli(module, argv):
    import importlib
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):
        importlib.import_module(module).main(argv)


def crash(src, dst, journal, cut):
    """dst: a copy of run directory src whose journal lost its last `cut` bytes, outputs gone (a kill)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock", "train*.jsonl", "test*.jsonl", "stats.json"))
    with open(os.path.join(src, journal), "rb") as f:
        data = f.read()
    with open(os.path.join(dst, journal), "wb") as f:
        f.write(data[:len(data) - cut])


def same(a, b) -> bool:
    with open(a, "rb") as f, open(b, "rb") as g:
        return f.read() == g.read()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("workdir")
    p.add_argument("--prompts", type=int, default=16000)
    p.add_argument("--dialogues", type=int, default=20000)
    args = p.parse_args()
    work = os.path.abspath(args.workdir)
    os.makedirs(work, exist_ok=True)
    os.environ["DATA_SCALE_DIR"] = work
    os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(work, "hf_datasets"))
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "bench")])  # for callable:data_scale:...
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    raw = os.path.join(work, "raw", "train.jsonl")
    if not os.path.exists(raw):
        os.makedirs(os.path.dirname(raw), exist_ok=True)
        rng = random.Random(0)
        with open(raw + ".tmp", "w") as f:
            f.writelines(json.dumps(raw_feedback_row(rng, i)) + "\n" for i in range(args.prompts))
        os.replace(raw + ".tmp", raw)
    print(f"raw rows: {args.prompts} prompts, {os.path.getsize(raw) / 1e6:.0f} MB", flush=True)
    measure("type check", type_check, raw)
    measure("binarize", cli, "zephyr_jax.data.binarize",
            [f"--input={os.path.dirname(raw)}", "--split=train", f"--output={work}/prefs",
             f"--test_size={min(2000, args.prompts // 10)}"])
    teachers = ["--generators=callable:data_scale:generate", "--judge=callable:data_scale:judge"]
    shutil.rmtree(f"{work}/feedback", ignore_errors=True)
    measure("feedback", cli, "zephyr_jax.data.feedback",
            [f"--prompts={os.path.dirname(raw)}", *teachers, f"--output={work}/feedback"])
    crash(f"{work}/feedback", f"{work}/feedback_resumed", "journal.jsonl", 5_000_000)
    measure("feedback resumed", cli, "zephyr_jax.data.feedback",
            [f"--prompts={os.path.dirname(raw)}", *teachers, f"--output={work}/feedback_resumed"])
    print("feedback resumed output identical:", same(f"{work}/feedback/train.jsonl",
                                                     f"{work}/feedback_resumed/train.jsonl"))
    chat = ["--user=callable:data_scale:user", "--assistant=callable:data_scale:assistant", "--sector=all",
            f"--num_dialogues={args.dialogues}"]
    shutil.rmtree(f"{work}/dialogues", ignore_errors=True)
    measure("dialogues", cli, "zephyr_jax.data.dialogues", [*chat, f"--output={work}/dialogues"])
    crash(f"{work}/dialogues", f"{work}/dialogues_resumed", "journal/dialogues.jsonl", 3_000_000)
    measure("dialogues resumed", cli, "zephyr_jax.data.dialogues", [*chat, f"--output={work}/dialogues_resumed"])
    print("dialogues resumed output identical:", same(f"{work}/dialogues/train_sft.jsonl",
                                                      f"{work}/dialogues_resumed/train_sft.jsonl"))


if __name__ == "__main__":
    main()
