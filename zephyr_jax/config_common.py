"""Fields shared by configs/sft.py and configs/dpo.py: model init, mesh, loop, checkpoints, logging.

The stage configs set the recipe's values on top of these; every field can be overridden on the command line
(`--config.train.global_batch_size=64`). A key that is not defined here or in the stage config is an error.
"""

import dataclasses
import re

import ml_collections

from zephyr_jax.model.config import HF_FIELDS, MistralConfig
from zephyr_jax.sharding import DEFAULT_RULES, rules_table

# JAX's persistent compilation cache: train's default (train.compilation_cache_dir) and chat's, serve's and
# evaluate's --compilation_cache, so every command finds what another compiled.
COMPILATION_CACHE_DIR = "~/.cache/zephyr_jax/xla"

# A small Mistral-shaped model for the demo and the tests: the real 32000-token vocabulary, tiny everything else.
TINY_ARCH = dict(vocab_size=32000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, sliding_window=4096)


def random_arch() -> dict:
    """config.model.arch's values: every architecture field of MistralConfig (config.json's names: rope_theta,
    tie_word_embeddings, head_dim, ...), at its defaults, with TINY_ARCH's sizes."""
    defaults = {f.name: f.default for f in dataclasses.fields(MistralConfig) if f.name in HF_FIELDS}
    return {**defaults, **TINY_ARCH}


def _arch_config() -> ml_collections.ConfigDict:
    # A field whose default is None takes a value from the command line through a typed placeholder.
    return ml_collections.ConfigDict({k: ml_collections.config_dict.placeholder(int) if v is None else v
                                      for k, v in random_arch().items()})


def base(stage: str) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.stage = stage  # "sft" or "dpo"
    c.seed = 42  # the alignment-handbook recipes' seed

    c.model = ml_collections.ConfigDict()
    c.model.init = "hf"  # "hf": a HF directory or hub name; "orbax": a zephyr_jax workdir; "random"
    c.model.path = "mistralai/Mistral-7B-v0.1"
    c.model.step = -1  # orbax init: the checkpoint step (-1: latest)
    c.model.arch = _arch_config()  # random init only: the architecture (random_arch)
    c.model.dtype = "bfloat16"  # compute (paper: bf16)
    c.model.param_dtype = "float32"  # master weights
    c.model.attention_impl = "auto"  # the platform's kernel: splash (TPU), cuDNN (GPU), else "xla" einsum
    c.model.remat = "full"  # none, full, save_dots, save_all_but_mlp, offload (TPU/GPU): see model/mistral.py
    c.model.scan_layers = True  # one compiled layer under lax.scan; False unrolls it (per-layer profiles)
    # None: dSFT takes Mistral-7B-v0.1 (from mistral-common) with the Zephyr chat template; dDPO takes its SFT
    # model's own tokenizer and template (tokenizer.tokenizer_source). Templateless tokenizers get Zephyr's.
    c.tokenizer = ml_collections.config_dict.placeholder(str)

    c.data = ml_collections.ConfigDict()
    c.data.data_dir = ml_collections.config_dict.placeholder(str)  # TFDS data_dir
    c.data.on_bad_row = "skip"  # "skip": count and report; "raise": stop at the first bad row
    c.data.max_train_examples = -1  # -1: all
    c.data.max_eval_examples = -1
    c.data.num_proc = 0  # tokenizing processes: 0: min(8, CPUs), 1: in this process; 2000+ rows per process
    # Tokenized examples are cached here (data/cache.py): None: $ZEPHYR_JAX_CACHE or ~/.cache/zephyr_jax/tokenized;
    # "": off. Keyed by the data files, tokenizer and processing args, so it never serves stale examples.
    c.data.cache_dir = ml_collections.config_dict.placeholder(str)
    # Padded lengths; (): powers of two up to max_length, multiples of min(128, max_length) for packed DPO rows
    # (given ones must reach the fullest row: max_length for packed SFT, (ceil(2 * pairs / rows) + 1) * max_length
    # for packed DPO; only packed DPO rows may pass max_length)
    c.data.buckets = ()
    c.data.packing = True  # several sequences per row, each its own segment (data/batches.py); False: one a row

    c.optim = ml_collections.ConfigDict()
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8  # AdamW defaults of HF Trainer, used by the recipe
    c.optim.weight_decay = 0.0  # paper: AdamW without weight decay (> 0: every weight but the norms, as in TRL)
    c.optim.clip_norm = 1.0  # HF Trainer's max_grad_norm default
    c.optim.mu_dtype = "float32"  # Adam's first moment; "bfloat16" stores it in 2 bytes a parameter, not 4

    c.train = ml_collections.ConfigDict()
    c.train.grad_accum = 1  # micro-batches per optimizer step (global_batch_size must divide); > 1 recomputes each
    # layer in the backward (as remat="full") to add its gradient into the running sum in place (model/accumulate.py)
    c.train.max_steps = -1  # -1: num_epochs worth of steps
    c.train.log_every = 10
    c.train.eval_every = 200  # 0: only at the end
    # An eval batch's examples, pairs, or packed dSFT rows (train.eval_split); a split of fewer goes in one batch
    # just large enough to hold it and split over the batch shards (train.eval_size), not filled with repeats
    c.train.eval_batch_size = 64
    c.train.save_every = 200
    c.train.keep_checkpoints = 2
    c.train.progress = True  # tqdm bars: the steps, the reference pass, the data's loading and tokenizing
    c.train.compilation_cache_dir = COMPILATION_CACHE_DIR  # JAX's persistent compilation cache; "": off
    c.train.peak_tflops = 0.0  # per device, for MFU; 0: the data-sheet figure (metrics.PEAK_FLOPS); none on CPUs
    # A jax.profiler trace of steps profile_start .. profile_start + profile_steps - 1 in WORKDIR/tensorboard
    # (TensorBoard's Profile tab; `python -m zephyr_jax.profiling WORKDIR` lists its operations); 0: none.
    c.train.profile_start = 0
    c.train.profile_steps = 3

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor); -1 takes the remaining devices
    c.mesh.num_devices = -1  # -1: every device; N: the first N (e.g. to compare with a smaller run)
    c.mesh.device_order = "auto"  # "auto": physical topology; "interleave_processes": pod-like order for CPU tests
    # logical axis -> the mesh axes that split it (zephyr_jax/sharding.py); one rule: --config.mesh.rules.vocab=()
    c.mesh.rules = ml_collections.ConfigDict(dict(rules_table(DEFAULT_RULES)))

    c.logging = ml_collections.ConfigDict()
    c.logging.tensorboard = True
    c.logging.wandb_project = ml_collections.config_dict.placeholder(str)  # set to log to W&B (pip install wandb)
    return c


def config_file(spec: str) -> str:
    """The file of a --config value ("configs/dpo.py:demo" -> "configs/dpo.py"); FileNotFoundError naming it and
    the directory when there is none."""
    import os

    path = spec.partition(":")[0]
    if not os.path.exists(path):
        raise FileNotFoundError(f"no file {path!r} (from {os.getcwd()}; the configs are configs/sft.py and "
                                "configs/dpo.py in the repository)")
    return path


def load_config(spec: str, **overrides) -> ml_collections.ConfigDict:
    """The config of "configs/dpo.py:demo" (as --config takes it), with dotted-key overrides applied:
    load_config("configs/dpo.py:demo", **{"dpo.beta": 0.05}). Unknown keys raise, as on the command line."""
    import importlib.util

    path, arg = config_file(spec), spec.partition(":")[2]
    module_spec = importlib.util.spec_from_file_location(f"zephyr_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg or None)
    cfg.lock()
    for key, value in overrides.items():
        node = cfg
        for p in key.split("."):
            if not isinstance(node, ml_collections.ConfigDict) or p not in node:  # ("seed.x": seed is a number)
                raise KeyError(f"config {spec} has no key {key!r}")
            parent, node = node, node[p]
        parent[p] = value
    return cfg


def parse_flags(argv):
    """absl's flag parsing (app.run's flags_parser), with a missing config file and an override of a key the
    config lacks said in one line: ml_collections raises them from inside absl, with their tracebacks."""
    import sys

    from absl import flags

    # ml_collections loads the file only when the config is first read: a mistyped path came out there as two
    # chained tracebacks, the cause (no such file) inside the second.
    given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")]
    given += [b for a, b in zip(argv[1:], argv[2:]) if a == "--config"]
    for spec in given:
        try:
            config_file(spec)
        except FileNotFoundError as e:
            sys.exit(f"FATAL Flags parsing error: --config={spec}: {e}")
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        message = str(e)
        # A config file's get_config that refuses its variant (configs/sft.py:tiyn): ml_collections puts the whole
        # traceback into the message; its last line is the config's own error.
        if "Error whilst parsing config file" in message and "Traceback" in message:
            message = f"{message.split(': Error whilst parsing', 1)[0]}: {message.strip().splitlines()[-1]}"
        sys.exit(f"FATAL Flags parsing error: {message}\nPass --helpshort or --helpfull to see help on flags.")
    except (AttributeError, KeyError) as e:
        reason = e
        while isinstance(reason, BaseException) and reason.args:  # AttributeError(KeyError("'key'\nDid you ..."))
            reason = reason.args[0]
        key = str(reason).split("\n")[0].strip("'\"")
        overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
        below = re.search(r"Attempting to lookup: ([\w.]+)", str(reason))  # "--config.seed.x": seed is a number
        if below and f"--config.{below.group(1)}" in overrides:
            path = below.group(1)
            sys.exit(f"FATAL Flags parsing error: --config.{path}: config.{path.rsplit('.', 1)[0]} is a value, not "
                     f"a section with keys")
        if not any(key in o.split(".")[1:] for o in overrides):
            raise  # not an override's key: an error inside the config file itself
        sys.exit(f"FATAL Flags parsing error: a --config override names a key the config does not have: "
                 f"{str(reason).replace(chr(10), '; ')} (overrides given: {', '.join(overrides)})")
