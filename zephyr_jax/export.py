"""Orbax checkpoint of a training workdir -> a Hugging Face directory ready for transformers and the Hub.

    python -m zephyr_jax.export --workdir=DIR [--step=N] --out=HF_DIR [--dtype=bfloat16] [--max_shard_size=5GB]

Writes the weights as safetensors (shards of --max_shard_size and an index when they need more than one file),
config.json, generation_config.json, the run's tokenizer with its chat template (the Zephyr template unless the
tokenizer has its own), and a model card (README.md) recording the training config and the final metrics.

The weights go through host memory only (the CPU device; 14.5 GB for Mistral-7B in bf16, 29 GB in float32): an
export needs no GPU or TPU, and the command does not start one. So it runs on any machine that sees the workdir,
beside a training job that holds the accelerators, or on one worker of a TPU pod slice (a lone JAX process that
starts a multi-host slice's TPUs waits for the other hosts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

from zephyr_jax import checkpoint, hf
from zephyr_jax.hub import is_hub_name
from zephyr_jax.loading import is_workdir, load_model, run_config
from zephyr_jax.tokenizer import is_zephyr_template, tokenizer_for


def final_metrics(workdir: str, step: int | None = None) -> dict:
    """The last train and eval records of workdir/metrics.jsonl up to `step` (the exported checkpoint's: the file
    may hold later steps)."""
    last = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:  # a line cut short by a kill (metrics.set_aside_replayed skips them too)
                    record = json.loads(line)
                    if step is None or record.get("step", 0) <= step:
                        last[record["split"]] = record
                except (ValueError, AttributeError, KeyError, TypeError):
                    continue
    return last


CARD_TITLE = "# zephyr_jax checkpoint"


def hub_lineage(train_config: dict, depth: int = 8) -> tuple[str | None, list[str]]:
    """(the Hub model the run started from, the Hub datasets it and the runs before it trained on, earliest first),
    for the card's metadata: a run initialised from another workdir (model.init=orbax: dDPO from dSFT) reads that
    workdir's config.json in turn. A local directory or file names nothing on the Hub and is left out: training
    records local paths as absolute ones (train.absolute_if_local), which no hub name is."""
    base, datasets, config = None, [], train_config
    for _ in range(depth):
        model, data = config.get("model") or {}, config.get("data") or {}
        if is_hub_name(data.get("train")) and data["train"] not in datasets:
            datasets.insert(0, data["train"])
        if model.get("init") == "hf" and is_hub_name(model.get("path")):
            base = model["path"]
        if model.get("init") != "orbax" or not isinstance(model.get("path"), str):
            break
        try:
            config = run_config(model["path"]) or {}
        except (ValueError, OSError):  # the init workdir gone or its config unreadable: the card says what it can
            break
    return base, datasets


def model_card(workdir: str, step: int, train_config: dict, metrics: dict, zephyr_template: bool = True) -> str:
    stage = train_config.get("stage", "?")
    what = {"sft": "distilled supervised fine-tuning (dSFT)", "dpo": "distilled direct preference optimization "
            "(dDPO)"}.get(stage, stage)
    data = train_config.get("data", {})
    model = train_config.get("model", {})
    init = model.get("init")
    if init != "random":  # model.arch configures a random model only: the card shows config.json's architecture
        train_config = {**train_config, "model": {k: v for k, v in model.items() if k != "arch"}}
    base, datasets = hub_lineage(train_config)
    lineage = ([f"base_model: {json.dumps(base)}"] if base else []) + (
        [f"datasets: {json.dumps(datasets)}"] if datasets else [])  # (JSON is YAML: the Hub links them)
    lines = [
        "---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [zephyr_jax, mistral, "
        f"{stage}]", *lineage, "---", "", CARD_TITLE, "",
        f"Mistral-architecture model trained with zephyr_jax by {what}, following Zephyr "
        "(arXiv 2310.16944).", "",
        f"- training workdir: `{os.path.abspath(workdir)}`, step {step}",
        f"- data: `{data.get('train')}` ({data.get('train_split')}), evaluated on `{data.get('eval')}` "
        f"({data.get('eval_split')})",
        "- init: " + ("random weights" if init == "random" else f"{init} `{model.get('path')}`"
                      + (f", step {model.get('step')}" if init == "orbax" else "")),
        "- architecture: the exported `config.json`", "",
        "## Chat format", "",
        ("The Zephyr template (`tokenizer.apply_chat_template`): `<|system|>`, `<|user|>`, `<|assistant|>` turns, "
         "each ending in `</s>`; generation starts after `<|assistant|>\\n`. Prompt it as it was trained: an empty "
         "system turn first when there is none, the conversation rendered as text "
         "(`apply_chat_template(messages, tokenize=False, add_generation_prompt=True)`), and that text encoded "
         "with the tokenizer, which adds the one `<s>` (the template writes none, so `tokenize=True` gives ids "
         "without it)." if zephyr_template else
         "The tokenizer's own chat template (`tokenizer.apply_chat_template(messages, add_generation_prompt=True)`), "
         "the messages as given, as it was trained."), "",
        "## Final metrics", "",
    ]
    for split in ("eval", "train"):
        if split in metrics:
            shown = {k: v for k, v in metrics[split].items() if k not in ("split",)}
            lines += [f"**{split}**", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.5g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown.items()]
            lines.append("")
    lines += ["## Training config", "", "```json", json.dumps(train_config, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def export(workdir: str, out_dir: str, step: int = -1, dtype: str = "bfloat16", max_shard_size="5GB",
           tokenizer: str | None = None) -> str:
    workdir, out_dir = os.path.expanduser(workdir), os.path.expanduser(out_dir)
    if os.path.abspath(out_dir) == os.path.abspath(workdir):  # its config.json would overwrite the training one
        raise ValueError(f"--out={out_dir} is the workdir itself: export to another directory")
    if is_workdir(out_dir) or os.path.isdir(os.path.join(out_dir, "checkpoints")):  # ... or another run's
        raise ValueError(f"--out={out_dir} is a zephyr_jax training workdir (its config.json would be replaced): "
                         "export to another directory")
    existing = os.path.abspath(out_dir)  # out_dir or the folder it would be made in
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):  # found by os.makedirs after the weights' load, as a traceback
        raise ValueError(f"--out={out_dir}: {existing} is a file, not a folder")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not holds_a_model(out_dir):
        raise ValueError(f"--out={out_dir} is not empty and holds no Hugging Face model: the export would replace "
                         "files of the same names there (README.md, config.json, ...); export to a new or empty "
                         "directory")
    hf.parse_size(max_shard_size)  # a malformed size ("5G"): now, not after the weights' load
    step = checkpoint.resolve_step(workdir, step)
    tok = tokenizer_for(workdir, tokenizer)  # a --tokenizer that is not there: now, not after the weights' load
    # Read straight into the saved dtype (orbax casts on the host): a bf16 export never holds float32 weights.
    # Onto the CPU device: the writer reads them there without a copy, and no accelerator memory is used.
    with jax.default_device(host_device()):
        model = load_model(workdir, dtype, step=step)
    train_config = run_config(workdir) or {}
    card = model_card(workdir, step, train_config, final_metrics(workdir, step),
                      zephyr_template=is_zephyr_template(tok))
    hf.save_pretrained(model, out_dir, tokenizer=tok, max_shard_size=max_shard_size, dtype=jnp.dtype(dtype),
                       model_card=card)
    print(f"exported {workdir} step {step} -> {out_dir}")
    return out_dir


def host_device() -> jax.Device | None:
    """The CPU device, or None (the default device) where the CPU platform is left out (JAX_PLATFORMS=tpu)."""
    try:
        return jax.local_devices(backend="cpu")[0]
    except RuntimeError:
        return None


def holds_a_model(out_dir: str) -> bool:
    """An earlier export (or another model's folder), which an export replaces: a config.json with a model_type,
    weights, or this module's model card (an export killed before its weights: hf.save_pretrained writes the card,
    then the weights, then config.json)."""
    if "model_type" in (run_config(out_dir) or {}) or any(f.endswith(".safetensors") for f in os.listdir(out_dir)):
        return True
    card = os.path.join(out_dir, "README.md")
    if not os.path.isfile(card):
        return False
    with open(card, encoding="utf-8", errors="replace") as f:
        return CARD_TITLE in f.read()


def cli(argv=None):
    """`python -m zephyr_jax.export`. It leaves this process's JAX the CPU backend alone unless JAX_PLATFORMS is
    set (from Python, call `export`, which only places the weights on the CPU)."""
    parser = argparse.ArgumentParser(prog="python -m zephyr_jax.export", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True, help="training workdir (checkpoints/, model_config.json)")
    parser.add_argument("--out", required=True, help="output Hugging Face directory")
    parser.add_argument("--step", type=int, default=-1, help="checkpoint step (-1: latest)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                        help="dtype of the saved weights (default bfloat16; float32 keeps "
                        "the float32 master weights exactly)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest safetensors shard")
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir/hub name (default: the training config's)")
    args = parser.parse_args(argv)
    if not os.environ.get("JAX_PLATFORMS"):  # (a JAX_PLATFORMS of the caller's is kept)
        jax.config.update("jax_platforms", "cpu")  # the CPU backend only: see the module's docstring
    try:  # no such workdir or step, a checkpoint of another shape: the message names it; no traceback
        export(args.workdir, args.out, args.step, args.dtype, args.max_shard_size, args.tokenizer)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    cli()
