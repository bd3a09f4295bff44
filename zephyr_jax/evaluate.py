"""Evaluation: DPO preference metrics, MT-Bench and AlpacaEval answer files (lm-eval: see lm_eval_adapter.py).

    # The DPO metrics of a training run, recomputed exactly as its eval loop does (same split, same numbers):
    python -m zephyr_jax.evaluate prefs --workdir=DPO_WORKDIR [--step=N] [--out=prefs.json]
    # Any policy against any reference (HF dirs / hub names or zephyr_jax workdirs):
    python -m zephyr_jax.evaluate prefs --model=POLICY --reference=REFERENCE
        [--data=HuggingFaceH4/ultrafeedback_binarized] [--split=test_prefs] [--beta=0.1] [--loss_type=sigmoid]
        [--max_length=1024] [--max_prompt_length=512]
    # FastChat's MT-Bench: question.jsonl -> model_answer/<model_id>.jsonl (then FastChat's gen_judgment):
    python -m zephyr_jax.evaluate mt_bench --model=M --question_file=question.jsonl
        --answer_file=model_answer/ID.jsonl --model_id=ID
    # AlpacaEval: instruction set -> outputs.json (then `alpaca_eval --model_outputs outputs.json`):
    python -m zephyr_jax.evaluate alpaca_eval --model=M --instructions=alpaca_eval.json --out=outputs.json
        --generator=ID

The preference metrics carry TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected, loss); rewards/accuracies is the preference accuracy. With --workdir they come from
the training code itself (train.eval_batches, train_steps.make_eval_fn / run_eval_batches / dpo_eval_metrics, the
workdir's cached reference log-probs), so they equal the run's eval records.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import sys
import time
import uuid

import jax
import ml_collections
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from zephyr_jax import checkpoint, train
from zephyr_jax import train_steps as steps
from zephyr_jax.config_common import COMPILATION_CACHE_DIR
from zephyr_jax.data.batches import positions_needed
from zephyr_jax.data.binarize import write_json
from zephyr_jax.data.pipeline import load_examples
from zephyr_jax.data.sources import ULTRAFEEDBACK_BINARIZED, read_json_lines, source_name
from zephyr_jax.engine import SamplingParams
from zephyr_jax.losses import LOSS_TYPES, check_dpo_settings
from zephyr_jax.loading import config_vocab_size, is_workdir, load, load_model, run_config
from zephyr_jax.sharding import MESH_FLAG_HELP, local_mesh, mesh_shape
from zephyr_jax.tokenizer import load_tokenizer, tokenizer_source
from zephyr_jax.train_checks import TRAINING_DTYPES, check_token_ids

# ---------------------------------------------------------------------------------------------------------
# Preference metrics.


def train_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved training config a run saved in workdir/config.json (JSON lists back to tuples)."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{workdir}: no such directory (a zephyr_jax training workdir was expected)")
    if not is_workdir(workdir) and os.path.isfile(os.path.join(workdir, "config.json")):
        # (its config.json is the model's, not a run's: it failed as AttributeError 'stage')
        raise ValueError(f"{workdir} is a Hugging Face model directory, not a zephyr_jax training workdir: pass it "
                         "as --model (the policy) or --reference instead of --workdir")
    saved = run_config(workdir)
    if saved is None:
        raise FileNotFoundError(f"{os.path.join(workdir, 'config.json')} is missing: {workdir} is not a zephyr_jax "
                                "training workdir")

    def tuples(x):
        if isinstance(x, dict):
            return {k: tuples(v) for k, v in x.items()}
        if isinstance(x, list):
            return tuple(tuples(v) for v in x)
        return x

    return ml_collections.ConfigDict(tuples(saved))


def prefs_from_workdir(workdir: str, step: int = -1, data: str | None = None, split: str | None = None,
                       max_examples: int | None = None, mesh: tuple | None = None, log=print) -> dict:
    """DPO metrics of a dDPO workdir's checkpoint (latest when step == -1) on its config's eval split (or `data` /
    `split` / `max_examples` instead), computed by the training loop's own eval path: the same examples, batches,
    mesh, jitted eval function, reference log-probs (the workdir's cache, else the config's initial model) and
    metric function. On the run's eval split and final step the result equals its last eval record. `mesh`: a
    (data, fsdp, tensor) shape over this job's devices instead of the run's (which may need other devices)."""
    _check_max_examples(max_examples)  # now, not after the tokenizer and the data (None: the config's)
    cfg = train_config(workdir)
    if cfg.stage != "dpo":
        raise ValueError(f"{workdir} is a {cfg.stage!r} run: --workdir needs a dDPO workdir (any other model: pass "
                         "it as --model or --reference)")
    with cfg.unlocked():
        cfg.train.progress = True  # bars over the log-prob passes, also for a run trained without them (a batch job)
        if data is not None:
            cfg.data.eval = data
        if split is not None:
            cfg.data.eval_split = split
        if max_examples is not None:
            cfg.data.max_eval_examples = max_examples
        if mesh is not None:  # over this job's devices, or as many as a shape of positive sizes names
            cfg.mesh.shape = tuple(mesh)  # (one of 0 or below: make_mesh names the shape, not num_devices)
            cfg.mesh.num_devices = int(np.prod(mesh)) if min(mesh) > 0 else -1
    asked = mesh
    try:
        mesh = train.mesh_for(cfg, training=False)  # (the run's micro-batches need not split)
    except train.ConfigError as e:
        if asked is not None:
            raise
        raise train.ConfigError(f"{e} (the run's mesh, on this job's {jax.device_count()} devices): pass --mesh, "
                                "e.g. --mesh=1,-1,1 for all of them") from e
    rules = cfg.mesh.rules
    sharding = train.batch_sharding(mesh, rules)
    tok = load_tokenizer(cfg.tokenizer)
    examples, _ = load_examples(cfg.data, "dpo", tok, "eval", log=log)

    # The policy: the workdir's checkpoint, built and placed as train.run builds an orbax-initialised model.
    policy_cfg = ml_collections.ConfigDict(cfg.to_dict())
    policy_cfg.model.init, policy_cfg.model.path, policy_cfg.model.step = "orbax", os.path.abspath(workdir), step
    mcfg = train.model_config(policy_cfg)
    # (training checked its own data; other data may hold ids of added tokens the model lacks: NaN metrics)
    check_token_ids(examples, mcfg.vocab_size, f"data.eval ({cfg.data.eval})", f"config.tokenizer={cfg.tokenizer!r}")
    graphdef, params, _ = train.init_params(policy_cfg, mcfg, mesh)
    checkpoint_step = checkpoint.resolve_step(workdir, step)
    eval_fn = steps.make_eval_fn("dpo", graphdef, cfg.train.eval_batch_size)

    with jax.set_mesh(mesh):
        if cfg.dpo.reference_free:
            reference = np.zeros((len(examples), 2), np.float32)
        else:
            # The run's cache (keyed by model and data); only when it is missing (another split, a deleted
            # cache) is the reference model -- the run's initial one -- loaded.
            reference = train.reference_logps(cfg, workdir, examples, eval_fn,
                                              lambda: train.init_params(cfg, mcfg, mesh)[1], sharding, "eval")
        metrics = train.eval_metrics(cfg, eval_fn, params, examples, reference, sharding,
                                     desc=f"policy log-probs ({cfg.data.eval_split})")
    return {**metrics, "num_pairs": len(examples), "step": checkpoint_step,
            "data": f"{cfg.data.eval}:{cfg.data.eval_split}"}


def _check_max_examples(max_examples: int | None) -> None:
    """-1 (every pair) or positive, as training's data.max_eval_examples: 0 read no pair and blamed the data, and
    -3 scored every pair."""
    if max_examples is not None and (max_examples == 0 or max_examples < -1):
        raise ValueError(f"max_examples={max_examples}: must be -1 (all) or positive")


def pair_logps(model, examples, batch_size: int, buckets=None, desc: str | None = None) -> np.ndarray:
    """[N, 2] summed completion log-probs (chosen, rejected) of `model` on preference examples (on its devices),
    through the training code's eval batches and eval function (one per architecture: make_eval_fn is cached,
    so another model of the same shapes, or another call, compiles nothing again). buckets=None: packed, as
    training packs dDPO batches (about four sequences a row, rows in multiples of 128); else a row per sequence,
    padded to `buckets` (a row per sequence computed 2x the positions of packed rows on UltraFeedback-like
    lengths). A split of fewer than batch_size pairs goes in one batch of its own pairs (train.eval_size). desc
    names a progress bar over the batches."""
    check_token_ids(examples, model.config.vocab_size, "the preference data")  # else NaN metrics, no error
    graphdef, state = nnx.split(model)
    eval_fn = steps.make_eval_fn("dpo", graphdef, batch_size)
    # Training's eval batches (train.eval_size, eval_batcher) for these settings. The batch goes whole to the
    # default device (jax.device_put): an empty batch rule, so no mesh to split it over.
    cfg = ml_collections.ConfigDict({
        "stage": "dpo", "mesh": {"rules": {"batch": ()}},
        "train": {"eval_batch_size": batch_size, "global_batch_size": batch_size},
        "data": {"packing": buckets is None, "packed_rows": 0, "buckets": tuple(buckets or ()),
                 "max_length": max(positions_needed(e) for e in examples) + 1}})  # packed rows' bucket step
    size = train.eval_size(cfg, None, len(examples))
    batches = train.eval_batches(examples, size, train.eval_batcher(cfg, None, size)[0])
    if desc:
        batches = tqdm(batches, desc=desc, total=-(-len(examples) // size))
    return steps.run_eval_batches(eval_fn, state, batches, jax.device_put)["logps"]


def prefs(model, reference=None, *, data: str = ULTRAFEEDBACK_BINARIZED, split: str | None = "test_prefs",
          max_examples: int = -1, data_dir: str | None = None, on_bad_row: str = "skip", beta: float = 0.1,
          loss_type: str = "sigmoid", label_smoothing: float = 0.0, reference_free: bool = False,
          max_length: int = 1024, max_prompt_length: int = 512, batch_size: int = 16, dtype="float32",
          tokenizer=None, mesh: tuple | None = None, log=print) -> dict:
    """DPO metrics of policy `model` against `reference` on a preference split. Models: paths (HF dir / hub
    name / zephyr_jax workdir; loaded over `mesh`, a (data, fsdp, tensor) shape over this process's devices, or
    on one device) or Mistral modules; `tokenizer`: a tokenizer, a path, or None (the policy's).
    Defaults: the paper's test_prefs split, beta 0.1, sigmoid loss, max_length 1024, max_prompt_length 512."""
    check_dpo_settings(loss_type, beta, label_smoothing)  # now, not after scoring both models on every pair
    if not 1 <= max_prompt_length < max_length:  # (0 cut every long pair's prompt to its BOS alone)
        raise ValueError(f"max_prompt_length={max_prompt_length} must be at least 1 and below max_length={max_length}")
    _check_max_examples(max_examples)
    if batch_size < 1:  # 0 failed after the reference had scored ('range() arg 3 must not be zero'), < 0 as a KeyError
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    if reference is None and not reference_free:
        raise ValueError("pass a reference model (or reference_free=True; or evaluate a dDPO workdir with "
                         "--workdir, which takes the reference from its config)")
    if reference is not None and reference_free:  # it was ignored, and the CLI's output named it the reference
        raise ValueError("--reference and --reference_free exclude each other: pass one")
    data_cfg = ml_collections.ConfigDict(dict(
        eval=os.fspath(data), eval_split=split, max_eval_examples=max_examples, data_dir=data_dir,
        on_bad_row=on_bad_row, max_length=max_length, max_prompt_length=max_prompt_length, buckets=()))
    dpo_cfg = ml_collections.ConfigDict(dict(beta=beta, loss_type=loss_type, label_smoothing=label_smoothing,
                                             reference_free=reference_free))
    # What chose the tokenizer, for an error about its ids (one built from a model file has no name).
    if isinstance(tokenizer, str):
        chosen_by, tokenizer = f"--tokenizer={tokenizer!r}", load_tokenizer(tokenizer)
    elif tokenizer is None:  # the policy's own, as zephyr_jax.load reads it (tokenizer_for)
        source = tokenizer_source(model) if isinstance(model, str) else None
        chosen_by, tokenizer = f"the policy's own tokenizer ({source or 'Mistral-7B-v0.1'})", load_tokenizer(source)
    else:
        name = getattr(tokenizer, "name_or_path", "")
        chosen_by = f"the tokenizer {name!r}" if name else "the tokenizer passed"
    examples, _ = load_examples(data_cfg, "dpo", tokenizer, "eval", log=log)
    for m in (reference, model):  # local paths: from their configs, before minutes of loading weights
        if isinstance(m, str) and (vocab_size := config_vocab_size(m)) is not None:
            check_token_ids(examples, vocab_size, source_name(data, split), chosen_by)

    def logps_of(m, name):  # packed rows; the policy reuses the reference's compiled batches (same architecture)
        m = load_model(m, dtype, local_mesh(mesh)) if isinstance(m, str) else m
        return pair_logps(m, examples, batch_size, desc=f"{name} log-probs")

    if reference_free:
        ref_logps = np.zeros((len(examples), 2), np.float32)
    else:  # the reference first, released (when loaded here) before the policy: one model in memory at a time
        ref_logps = logps_of(reference, "reference")
    policy_logps = logps_of(model, "policy")
    lengths = np.array([[len(e.chosen), len(e.rejected)] for e in examples])
    metrics = steps.dpo_eval_metrics(policy_logps, ref_logps, lengths, dpo_cfg)
    return {**metrics, "num_pairs": len(examples), "data": source_name(data, split)}


# ---------------------------------------------------------------------------------------------------------
# Batched chat generation (MT-Bench, AlpacaEval).


def generate_chats(model, tok, conversations: list[list[dict]], *, batch_size: int = 8, max_new_tokens: int = 1024,
                   temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                   seed: int | list[int] = 0) -> list[str]:
    """The assistant's reply to each conversation (message lists): all of them on the engine at once, batch_size
    KV-cache slots (a finished reply's slot goes to the next conversation). Replies are stripped of surrounding
    whitespace, as FastChat does."""
    from zephyr_jax.generate import generate

    replies = generate(model, tok, conversations, max_new_tokens=max_new_tokens, temperature=temperature,
                       top_k=top_k, top_p=top_p, seed=seed, max_slots=batch_size,
                       progress=len(conversations) > batch_size)
    return [text.strip() for text in replies]


# FastChat's MT-Bench sampling temperatures per question category (fastchat/llm_judge/common.py, with its
# arena-hard-200 question set's); other categories get 0.7, as FastChat's gen_model_answer does.
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0,
                         "reasoning": 0.0, "stem": 0.1, "humanities": 0.1, "arena-hard-200": 0.0}
MT_BENCH_DEFAULT_TEMPERATURE = 0.7
# FastChat's gen_model_answer and AlpacaEval's zephyr-7b-beta config (huggingface_local_completions) pass
# transformers' generate no top_k, so a sampled reply keeps its default top-k of 50.
REFERENCE_TOP_K = 50


def read_questions(path: str) -> list[dict]:
    """FastChat's question.jsonl: one {"question_id", "category", "turns": [str, ...]} per line."""
    questions = read_json_lines(path)
    if not questions:  # (an empty answer file went on to FastChat's judging)
        raise ValueError(f"{path} holds no questions")
    seen = set()
    for number, q in enumerate(questions, 1):
        where = f"{path}: question {number}"
        if not isinstance(q, dict) or not isinstance(q.get("question_id"), (int, str)) or \
                isinstance(q["question_id"], bool):  # (true was question 1 again)
            raise ValueError(f"{where}: no question_id (an int or a string)")
        if not isinstance(q.get("category", ""), str):
            raise ValueError(f"{where} (question_id {q['question_id']}): 'category' must be a string")
        turns = q.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise ValueError(f"{where} (question_id {q['question_id']}): 'turns' must be a non-empty list of "
                             "non-blank strings")
        if q["question_id"] in seen:
            raise ValueError(f"{where}: question_id {q['question_id']} appears twice")
        seen.add(q["question_id"])
    return questions


def question_temperature(question: dict, override: float | None = None) -> float:
    if override is not None:
        return float(override)
    return MT_BENCH_TEMPERATURES.get(question.get("category"), MT_BENCH_DEFAULT_TEMPERATURE)


def _system_turn(system: str) -> list[dict]:
    """The conversation's start: a system turn when one is given. None otherwise: the Zephyr template gets its
    empty one (tokenizer.render_template), and another template is rendered as given (some refuse system turns)."""
    return [{"role": "system", "content": system}] if system else []


def answer_seed(seed: int, question_id, choice: int, turn: int) -> int:
    """The sampling seed of one MT-Bench answer, keyed by its question_id: a question is answered alike whatever
    else the question file holds (the questions are batched per temperature, and a seed from the position in a
    batch changed with every other question of its category, with --temperature, or a file of fewer questions)."""
    from zephyr_jax.generate import keyed_seed

    return keyed_seed(seed, question_id, choice, turn)


def mt_bench_answers(model, tok, questions: list[dict], model_id: str, *, max_new_tokens: int = 1024,
                     temperature: float | None = None, top_k: int = REFERENCE_TOP_K, top_p: float = 1.0,
                     batch_size: int = 8, num_choices: int = 1, seed: int = 0, system: str = "") -> list[dict]:
    """FastChat model_answer records, one per question in the questions' order. Each turn is answered with the
    conversation so far (turn 2 sees turn 1's question and this model's answer); questions are batched per
    sampling temperature (FastChat's per-category table unless `temperature` overrides it)."""
    groups: dict[float, list[int]] = {}
    for i, q in enumerate(questions):
        groups.setdefault(question_temperature(q, temperature), []).append(i)
    choices = [[None] * num_choices for _ in questions]
    for temp, members in groups.items():
        for c in range(num_choices):
            history = {i: _system_turn(system) for i in members}
            answers = {i: [] for i in members}
            for turn in range(max(len(questions[i]["turns"]) for i in members)):
                active = [i for i in members if turn < len(questions[i]["turns"])]
                for i in active:
                    history[i].append({"role": "user", "content": questions[i]["turns"][turn]})
                seeds = [answer_seed(seed, questions[i]["question_id"], c, turn) for i in active]
                replies = generate_chats(model, tok, [history[i] for i in active], batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, temperature=temp, top_k=top_k, top_p=top_p,
                                         seed=seeds)
                for i, reply in zip(active, replies):
                    history[i].append({"role": "assistant", "content": reply})
                    answers[i].append(reply)
            for i in members:
                choices[i][c] = {"index": c, "turns": answers[i]}
    return [{"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
             "choices": choices[i], "tstamp": time.time()} for i, q in enumerate(questions)]


def read_instructions(source: str, split: str = "eval") -> list[dict]:
    """AlpacaEval's instruction set: a JSON list of {"instruction", "dataset", ...}, a jsonl file, or anything
    zephyr_jax.data.sources.load_rows reads (a hub dataset name with `split`, a saved dataset directory)."""
    if source.endswith(".jsonl"):
        rows = read_json_lines(source)
    elif source.endswith(".json"):
        with open(source, encoding="utf-8") as f:
            try:
                rows = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{source}: not valid JSON ({e})") from e
    else:
        from zephyr_jax.data.sources import load_rows

        rows = [dict(r) for r in load_rows(source, split)]
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{source}: expected a non-empty list of {{'instruction': ...}} objects")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise ValueError(f"{source}: item {number} has no 'instruction' string (non-blank)")
    return rows


def alpaca_eval_outputs(model, tok, instructions: list[dict], generator: str, *, max_new_tokens: int = 2048,
                        temperature: float = 0.7, top_k: int = REFERENCE_TOP_K, top_p: float = 1.0,
                        batch_size: int = 8, seed: int = 0, system: str = "") -> list[dict]:
    """AlpacaEval model outputs: [{"instruction", "output", "generator", "dataset" (when the input has it)}]."""
    chats = [[*_system_turn(system), {"role": "user", "content": r["instruction"]}] for r in instructions]
    outputs = generate_chats(model, tok, chats, batch_size=batch_size, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    records = []
    for row, output in zip(instructions, outputs):
        record = {"instruction": row["instruction"], "output": output, "generator": generator}
        if "dataset" in row:
            record["dataset"] = row["dataset"]
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------------------
# Command line.


def _writable(path: str) -> str | None:
    """Why `path` cannot be written (a directory, or its nearest existing folder read-only), or None."""
    if os.path.isdir(path):
        return "is a directory"
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return f"{folder} is not a folder this process can write"
    return None


def _write_json(path: str, obj) -> None:
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(obj, path)


def _model_args(p: argparse.ArgumentParser, sampling_defaults: dict) -> None:
    p.add_argument("--model", required=True, help="HF directory / hub name, or a zephyr_jax workdir")
    p.add_argument("--tokenizer", default=None, help="default: the model's own, else Mistral-7B-v0.1")
    p.add_argument("--dtype", default="bfloat16", choices=TRAINING_DTYPES,
                   help="compute and weight dtype (float32 for exact numbers)")
    p.add_argument("--batch_size", type=int, default=8,
                   help="the engine's KV-cache slots: replies decoded at once (every prompt is queued at once)")
    p.add_argument("--max_new_tokens", type=int, default=sampling_defaults["max_new_tokens"])
    p.add_argument("--top_k", type=int, default=sampling_defaults["top_k"], help="0: no top-k limit")
    p.add_argument("--top_p", type=float, default=sampling_defaults["top_p"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--system", default="", help="system message (none: the Zephyr template's empty one)")
    p.add_argument("--mesh", type=mesh_shape, default=None, help=MESH_FLAG_HELP)


# prefs()'s own defaults for the flags that go with --model only (a workdir's config has them).
PREFS_MODEL_DEFAULTS = {k: inspect.signature(prefs).parameters[k].default for k in (
    "data_dir", "beta", "loss_type", "label_smoothing", "max_length", "max_prompt_length", "batch_size", "dtype",
    "tokenizer")}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m zephyr_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prefs", help="DPO metrics / preference accuracy of a policy against a reference")
    p.add_argument("--workdir", default=None, help="a dDPO workdir: policy = its latest checkpoint; reference, "
                   "beta, loss, lengths and eval split from its config")
    p.add_argument("--step", type=int, default=None, help="--workdir: the checkpoint step (default: the latest)")
    p.add_argument("--model", default=None, help="the policy: HF directory / hub name or zephyr_jax workdir")
    p.add_argument("--reference", default=None, help="the reference model (as --model)")
    p.add_argument("--reference_free", action="store_true", help="no reference model (log-ratios against 0)")
    p.add_argument("--data", default=None, help=f"preference data (default {ULTRAFEEDBACK_BINARIZED}; --workdir: "
                   "its eval data); hub name, dataset dir or jsonl/json/parquet files")
    p.add_argument("--split", default=None, help="split (default test_prefs; --workdir: its eval split)")
    p.add_argument("--max_examples", type=int, default=None, help="evaluate the first N pairs (default: all)")
    # --model only (a workdir's config has them): None when not given, so --workdir can refuse them.
    p.add_argument("--data_dir", default=None, help="TFDS data dir (tfds: sources)")
    d = PREFS_MODEL_DEFAULTS
    p.add_argument("--beta", type=float, default=None, help=f"default {d['beta']}")
    p.add_argument("--loss_type", default=None, choices=LOSS_TYPES, help=f"default {d['loss_type']}")
    p.add_argument("--label_smoothing", type=float, default=None, help=f"default {d['label_smoothing']}")
    p.add_argument("--max_length", type=int, default=None, help=f"default {d['max_length']}")
    p.add_argument("--max_prompt_length", type=int, default=None, help=f"default {d['max_prompt_length']}")
    p.add_argument("--batch_size", type=int, default=None,
                   help=f"preference pairs per scoring batch (default {d['batch_size']})")
    p.add_argument("--dtype", default=None, choices=TRAINING_DTYPES,
                   help=f"compute and weight dtype (default {d['dtype']}: exact numbers; a run's own eval "
                        "computes in its model.dtype, bfloat16 in the recipe's configs)")
    p.add_argument("--tokenizer", default=None, help="default: the policy's own, else Mistral-7B-v0.1")
    p.add_argument("--mesh", type=mesh_shape, default=None, help=MESH_FLAG_HELP + " (--workdir: instead of the "
                   "run's mesh, which may need other devices)")
    p.add_argument("--out", default=None, help="write the metrics here as JSON")

    p = sub.add_parser("mt_bench", help="FastChat MT-Bench answers (model_answer jsonl)")
    _model_args(p, {"max_new_tokens": 1024, "top_k": REFERENCE_TOP_K, "top_p": 1.0})
    p.add_argument("--question_file", required=True, help="FastChat data/mt_bench/question.jsonl")
    p.add_argument("--answer_file", default=None, help="default: model_answer/<model_id>.jsonl")
    p.add_argument("--model_id", required=True, help="the name FastChat's judge and tables show")
    p.add_argument("--temperature", type=float, default=None, help="one temperature for every question "
                   "(default: FastChat's per category: writing/roleplay 0.7, extraction/math/coding/reasoning 0, "
                   "stem/humanities 0.1, arena-hard-200 0)")
    p.add_argument("--num_choices", type=int, default=1)

    p = sub.add_parser("alpaca_eval", help="AlpacaEval model outputs (JSON list)")
    _model_args(p, {"max_new_tokens": 2048, "top_k": REFERENCE_TOP_K, "top_p": 1.0})
    p.add_argument("--instructions", required=True, help="AlpacaEval eval set: JSON list / jsonl of "
                   "{instruction, dataset, ...}, or a hub dataset / dataset dir")
    p.add_argument("--split", default="eval", help="split of a hub dataset / dataset dir")
    p.add_argument("--out", required=True, help="outputs JSON for alpaca_eval --model_outputs")
    p.add_argument("--generator", required=True, help="the model's name in AlpacaEval's leaderboard")
    p.add_argument("--temperature", type=float, default=0.7, help="default 0.7, top_k 50, top_p 1.0, 2048 new "
                   "tokens: AlpacaEval's zephyr-7b-beta generation config (top_k: transformers' default)")
    for p in sub.choices.values():  # (as serve's: the engine's programs, a 7B's, take minutes to compile)
        p.add_argument("--compilation_cache", default=COMPILATION_CACHE_DIR,
                       help="JAX's persistent compilation cache, so a later run skips compiling ('' = off)")
    args = parser.parse_args(argv)
    train.use_compilation_cache(args.compilation_cache)

    if args.command == "prefs":
        if args.out and (why := _writable(args.out)) is not None:  # found after the scoring, which it lost
            sys.exit(f"error: --out={args.out}: {why}")
        if args.max_examples is not None and args.max_examples < 1:  # -3 scored every pair; 0 blamed the data
            sys.exit(f"error: --max_examples={args.max_examples}: must be at least 1 (leave it out for every pair)")
        if args.workdir:
            if args.model or args.reference:
                parser.error("prefs: pass either --workdir or --model/--reference, not both")
            given = [f"--{k}" for k in PREFS_MODEL_DEFAULTS if getattr(args, k) is not None]
            if given or args.reference_free:
                parser.error(f"prefs --workdir takes the model, reference, loss, lengths and dtype from the "
                             f"workdir's config: {', '.join(given + ['--reference_free'] * args.reference_free)} "
                             "would be ignored (use --model/--reference to set them)")
            step = -1 if args.step is None else args.step
            try:  # not a dDPO workdir, no such split: its message alone
                with contextlib.redirect_stdout(sys.stderr):  # (stdout: the JSON alone, for `> prefs.json` or jq)
                    metrics = prefs_from_workdir(args.workdir, step, args.data, args.split, args.max_examples,
                                                 args.mesh)
            except (FileNotFoundError, ConnectionError, ValueError) as e:  # ConnectionError: a hub dataset
                sys.exit(f"error: {e}")
        else:
            if not args.model:
                parser.error("prefs: pass --workdir=DPO_WORKDIR, or --model and --reference")
            if not args.reference and not args.reference_free:
                parser.error("prefs: --model needs --reference (or --reference_free)")
            if args.step is not None:  # it was ignored: --model takes a workdir's latest checkpoint
                parser.error("prefs: --step goes with --workdir (--model takes a workdir's latest checkpoint)")
            for k, default in PREFS_MODEL_DEFAULTS.items():
                setattr(args, k, default if getattr(args, k) is None else getattr(args, k))
            try:  # no such model, data (or a hub dataset not reached) or split, settings out of range: its message
                with contextlib.redirect_stdout(sys.stderr):  # (as above)
                    metrics = prefs(args.model, args.reference, data=args.data or ULTRAFEEDBACK_BINARIZED,
                                    split=args.split or "test_prefs",
                                    max_examples=-1 if args.max_examples is None else args.max_examples,
                                    data_dir=args.data_dir, beta=args.beta, loss_type=args.loss_type,
                                    label_smoothing=args.label_smoothing, reference_free=args.reference_free,
                                    max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                                    batch_size=args.batch_size, dtype=args.dtype, tokenizer=args.tokenizer,
                                    mesh=args.mesh)
            except (FileNotFoundError, ConnectionError, ValueError) as e:
                sys.exit(f"error: {e}")
        metrics = {**metrics, "policy": args.workdir or args.model,
                   "reference": "config" if args.workdir else (args.reference or "none")}
        if args.out:
            _write_json(args.out, metrics)
        print(json.dumps(metrics, indent=2))
        return metrics

    for flag in ("max_new_tokens", "batch_size", "num_choices"):
        value = getattr(args, flag, 1)  # (alpaca_eval has no --num_choices)
        if value < 1:  # 0 wrote empty answers, or none, and exited 0
            sys.exit(f"error: --{flag}={value}: must be at least 1")
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature or 0.0, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed)
    try:  # the engine's own ranges (it refused them at the first reply, after the model's load, with a traceback)
        params.check()
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:  # before the model, which takes minutes to load: a missing or malformed file is found now
        if args.command == "mt_bench":
            questions = read_questions(args.question_file)
        else:
            rows = read_instructions(args.instructions, args.split)
    except OSError as e:
        sys.exit(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}")
    except ValueError as e:
        sys.exit(f"error: {e}")
    flag, out = (("--answer_file", args.answer_file or os.path.join("model_answer", f"{args.model_id}.jsonl"))
                 if args.command == "mt_bench" else ("--out", args.out))
    if (why := _writable(out)) is not None:  # found after the generations, which it lost
        sys.exit(f"error: {flag}={out}: {why}")
    try:  # no such model, a checkpoint of another shape, a mesh the devices cannot fill: its message alone
        model, tok = load(args.model, args.dtype, local_mesh(args.mesh), tokenizer=args.tokenizer)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    try:  # and those that need its vocabulary, before any generation
        params.check(model.config.vocab_size)
    except ValueError as e:
        sys.exit(f"error: {e}")
    sampling = dict(max_new_tokens=args.max_new_tokens, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                    batch_size=args.batch_size, system=args.system)
    if args.command == "mt_bench":
        records = mt_bench_answers(model, tok, questions, args.model_id, temperature=args.temperature,
                                   num_choices=args.num_choices, **sampling)
        if os.path.dirname(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        print(f"wrote {len(records)} answers to {out}")
        return records
    records = alpaca_eval_outputs(model, tok, rows, args.generator, temperature=args.temperature, **sampling)
    _write_json(out, records)
    print(f"wrote {len(records)} outputs to {out}")
    return records


if __name__ == "__main__":
    main()
