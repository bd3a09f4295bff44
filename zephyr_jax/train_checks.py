"""What training checks before it spends compute: the config (every mistake it can hold, before anything is
loaded or compiled), a workdir's earlier run (resume_settings), the workdir itself, and the token ids the data holds
against the model's vocabulary. train.run calls each where its inputs are first known; the planner calls
check_config. (Whether the batch sizes divide over the mesh is checked where the mesh is made: train.mesh_for.)
"""

from __future__ import annotations

import glob
import importlib.util
import json
import numbers
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from zephyr_jax import train_steps as steps
from zephyr_jax.config_common import random_arch
from zephyr_jax.data.binarize import output_dir_problem
from zephyr_jax.data.errors import ON_BAD_ROW
from zephyr_jax.data.sft import LOSS_ON, TOO_LONG
from zephyr_jax.loading import is_workdir, run_config
from zephyr_jax.losses import check_dpo_settings
from zephyr_jax.model.attention import CUDNN_DTYPES
from zephyr_jax.model.config import ATTENTION_IMPLS, INT32_MAX, REMAT_POLICIES
from zephyr_jax.sharding import rules_table
from zephyr_jax.tokenizer import load_tokenizer, tokenizer_source


class ConfigError(ValueError):
    """A setting that cannot work (a value out of range, two that conflict, a workdir of another run, a model
    that does not fit the data). The message names the setting; the command line prints it without a traceback."""


class ConfigPathError(ConfigError, FileNotFoundError):
    """A path the config names that holds no model (or no longer the step a run started from)."""


# ---------------------------------------------------------------------------------------------------------
# The config: every mistake a config can hold is reported here, before anything is loaded or compiled.


def check_config(cfg, check_model_source: bool = True) -> None:
    """check_model_source=False (the planner) skips what only the training machine needs: the init checkpoint on
    disk, and wandb installed when logging.wandb_project is set."""
    check_value_types(cfg)
    if cfg.stage not in ("sft", "dpo"):
        raise ConfigError(f"config.stage={cfg.stage!r}: expected 'sft' or 'dpo'")
    if ("dpo" in cfg) != (cfg.stage == "dpo"):
        raise ConfigError(f"config.stage={cfg.stage!r} in a config {'with' if 'dpo' in cfg else 'without'} a dpo "
                          "section: the stage is the config file's (configs/sft.py or configs/dpo.py)")
    for key in ("model.dtype", "model.param_dtype", "optim.mu_dtype", "dpo.reference_dtype"):
        group, name = key.split(".")
        if group in cfg:
            check_float_dtype(cfg[group][name], key)
    if jnp.dtype(cfg.model.dtype) == jnp.float16:  # (chat, serve and evaluate compute in it; training cannot)
        raise ConfigError("model.dtype=float16: training in float16 needs loss scaling, which zephyr_jax does not "
                          "do: the LM head's small gradients underflow to 0 (60% of its entries over 16k tokens of "
                          "random logits). Use bfloat16 (TPUs, A100 and later GPUs) or float32")
    check_optim(cfg.optim)
    try:
        rules_table(cfg.mesh.rules)  # a rule naming something other than a mesh axis
    except ValueError as e:  # (sharding.py's own error, for the planner's and the engine's rules too)
        raise ConfigError(str(e)) from e
    if not isinstance(cfg.seed, numbers.Integral) or cfg.seed < 0:  # numpy's generators take none below 0
        raise ConfigError(f"config.seed={cfg.seed!r}: must be a whole number >= 0")
    if cfg.seed > 2 ** 32 - 1:  # JAX's keys take its low 32 bits: 2**32 initialises as 0 does (2**63 overflowed)
        raise ConfigError(f"config.seed={cfg.seed}: above 2**32 - 1, and the model's initialisation reads the low 32 "
                          "bits only (seeds s and s + 2**32 would initialise the same model)")
    if cfg.model.init == "random":
        # NaN at step 1 (0, or an inf initializer_range), no gradient at all, or inf in config.json
        for key in ("rope_theta", "rms_norm_eps", "initializer_range"):
            value = cfg.model.arch.get(key)
            if key in cfg.model.arch and not (isinstance(value, numbers.Real) and 0 < value < np.inf):
                raise ConfigError(f"config.model.arch.{key}={cfg.model.arch[key]}: must be positive and finite")
        check_special_token_ids(cfg.model.arch)
    if cfg.model.init not in ("hf", "orbax", "random"):
        raise ConfigError(f"config.model.init={cfg.model.init!r}: expected 'hf', 'orbax' or 'random'")
    if cfg.model.init != "random" and cfg.model.arch.to_dict() != random_arch():  # else unused, yet in config.json
        changed = sorted(k for k, v in cfg.model.arch.to_dict().items() if random_arch().get(k) != v)
        raise ConfigError(f"config.model.arch ({', '.join(changed)}) applies only to model.init='random'; with "
                          f"model.init={cfg.model.init!r} the architecture is {cfg.model.path!r}'s own")
    if cfg.model.init != "orbax" and cfg.model.step != -1:  # else the weights of another step than the one named
        raise ConfigError(f"config.model.step={cfg.model.step} applies only to model.init='orbax' (a zephyr_jax "
                          f"workdir's checkpoint); model.init={cfg.model.init!r} has no steps to choose from")
    for split in ("train", "eval"):
        if not cfg.data[split]:  # "--config.data.eval=": the eval split was looked for in the working directory
            raise ConfigError(f"data.{split} is empty: name a dataset (a hub name, a folder, or data files)")
    if check_model_source:
        check_model_source_exists(cfg.model)
        for split in ("train", "eval"):  # a local path: now, not after the other split is tokenized
            path = cfg.data[split]
            if path.startswith((".", "/", "~")) and not glob.has_magic(path) and \
                    not os.path.exists(os.path.expanduser(path)):
                raise ConfigPathError(f"data.{split}={path!r}: no such file or directory")
        if cfg.logging.wandb_project and importlib.util.find_spec("wandb") is None:  # now, not after the data work
            raise ConfigError(f"config.logging.wandb_project={cfg.logging.wandb_project!r}, but wandb is not "
                              "installed: pip install wandb, or leave logging.wandb_project unset (metrics.jsonl "
                              "and TensorBoard still get every record)")
    t = cfg.train
    for key in ("global_batch_size", "grad_accum", "eval_batch_size", "log_every", "keep_checkpoints"):
        if t[key] < 1:  # keep_checkpoints=0 would keep none, the final one included
            raise ConfigError(f"train.{key}={t[key]}: must be at least 1")
    for key in ("eval_every", "save_every", "profile_start"):
        if t[key] < 0:
            raise ConfigError(f"train.{key}={t[key]}: must be 0 (off) or positive")
    if not 0 <= t.peak_tflops < np.inf:  # an MFU below zero, NaN (nan passed "< 0") or 0 (inf)
        raise ConfigError(f"train.peak_tflops={t.peak_tflops}: must be 0 (the data sheet's) or positive and finite")
    if t.profile_start and t.profile_steps < 1:
        raise ConfigError(f"train.profile_steps={t.profile_steps} with train.profile_start={t.profile_start}: must "
                          "be at least 1 (profile_start=0 turns the trace off)")
    if t.global_batch_size % t.grad_accum:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by "
                          f"train.grad_accum={t.grad_accum}")
    if t.max_steps > INT32_MAX:  # optax counts steps in int32 (and the run lists every step's learning rate)
        raise ConfigError(f"train.max_steps={t.max_steps}: above 2**31 - 1, more steps than optax's int32 count holds")
    if t.max_steps <= 0 and t.num_epochs < 1:
        raise ConfigError(f"train.num_epochs={t.num_epochs} with train.max_steps={t.max_steps}: nothing to train "
                          "(set num_epochs >= 1, or max_steps)")
    for key in ("max_train_examples", "max_eval_examples"):  # 0 read no row and blamed the data; -5 read them all
        if cfg.data.get(key) is not None and (cfg.data[key] == 0 or cfg.data[key] < -1):  # (None: all, as -1)
            raise ConfigError(f"data.{key}={cfg.data[key]}: must be -1 (all) or positive")
    # 0: automatic (all examples at once / about four sequences a row / min(8, CPUs) processes); num_proc=-1 (all
    # CPUs, as joblib reads it) tokenized in this one process
    for key in ("pack_window", "packed_rows", "num_proc"):
        if key in cfg.data and cfg.data[key] < 0:
            raise ConfigError(f"data.{key}={cfg.data[key]}: must be 0 (automatic) or positive")
    if cfg.data.get("packed_rows") and not cfg.data.packing:  # (unpacked, a pair is two rows)
        raise ConfigError(f"data.packed_rows={cfg.data.packed_rows} applies only with data.packing=True")
    sequences = 2 * t.global_batch_size  # (dDPO: a pair is two sequences)
    if cfg.data.get("packed_rows", 0) > sequences:  # (2**31 rows hung building the batches)
        raise ConfigError(f"data.packed_rows={cfg.data.packed_rows}: more rows than the {sequences} sequences of a "
                          f"global batch (train.global_batch_size={t.global_batch_size} pairs), so some rows would be "
                          "padding only")
    for key, values in (("mesh.shape", cfg.mesh.shape), ("data.buckets", cfg.data.buckets)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            raise ConfigError(f"{key}={tuple(values)!r}: expected whole numbers")
    if cfg.data.max_length < 2:  # one token predicts nothing
        raise ConfigError(f"data.max_length={cfg.data.max_length}: must be at least 2")
    if cfg.data.max_length > INT32_MAX:  # positions are int32 (the packed dDPO row lengths were a MemoryError)
        raise ConfigError(f"data.max_length={cfg.data.max_length}: above 2**31 - 1, more positions than int32 holds")
    check_buckets(cfg)
    for key, allowed in (("remat", REMAT_POLICIES), ("attention_impl", ATTENTION_IMPLS)):
        if cfg.model[key] not in allowed:  # (MistralConfig's own check, with the setting's name)
            raise ConfigError(f"model.{key}={cfg.model[key]!r}: expected one of {allowed}")
    check_attention_kernel(cfg)
    for key, allowed in (("on_bad_row", ON_BAD_ROW), ("loss_on", LOSS_ON), ("too_long", TOO_LONG)):
        if key in cfg.data and cfg.data[key] not in allowed:  # else raised only once the source is read
            raise ConfigError(f"data.{key}={cfg.data[key]!r}: expected one of {allowed}")
    if cfg.stage == "dpo":
        try:  # the loss type, beta and label smoothing, by the rules dpo_loss itself applies
            check_dpo_settings(cfg.dpo.loss_type, cfg.dpo.beta, cfg.dpo.label_smoothing)
        except ValueError as e:
            raise ConfigError(f"config.dpo (beta={cfg.dpo.beta}, label_smoothing={cfg.dpo.label_smoothing}): {e}") \
                from None
        if cfg.dpo.precompute_reference and cfg.dpo.reference_free:
            raise ConfigError("dpo.precompute_reference=True with dpo.reference_free=True: a reference-free loss has "
                              "no reference log-probs to compute; set one of them")
        if not 1 <= cfg.data.max_prompt_length < cfg.data.max_length:
            raise ConfigError(f"data.max_prompt_length={cfg.data.max_prompt_length} must be at least 1 and below "
                              f"data.max_length={cfg.data.max_length}")


def check_special_token_ids(arch) -> None:
    """A random model's bos/eos/pad ids name rows of its own embedding: training never reads them (the tokenizer's
    ids are the data's), but the export writes them to config.json and generation_config.json, where an id past the
    vocabulary is a token the model can never emit (generate never stops at that EOS). None: no such token."""
    vocab = arch.vocab_size
    if not isinstance(vocab, numbers.Integral) or vocab < 1:  # MistralConfig names the vocabulary's own mistake
        return
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = arch.get(key)
        for token in value if isinstance(value, (tuple, list)) else (value,):
            if token is not None and not (isinstance(token, numbers.Integral) and not isinstance(token, bool)
                                          and 0 <= token < vocab):
                raise ConfigError(f"config.model.arch.{key}={value!r}: a token id in [0, vocab_size={vocab}), or "
                                  "None for none")


# The settings None means something for: unset (a placeholder), all examples, or off.
NULLABLE = ("tokenizer", "data.data_dir", "data.cache_dir", "data.train_split", "data.eval_split",
            "data.max_train_examples", "data.max_eval_examples", "logging.wandb_project", "train.compilation_cache_dir")
# The switches of the stage configs' own sections (base's are found from its values).
STAGE_SWITCHES = ("dpo.reference_free", "dpo.precompute_reference")


def check_value_types(cfg) -> None:
    """None and booleans where a setting takes neither. ConfigDict takes both for any key from Python (load_config,
    a notebook), though the command line refuses them: they failed the range checks as a TypeError naming no key, or
    passed as another setting (data.packing=None trained unpacked, train.global_batch_size=True in batches of 1; a
    boolean given for a float is 0.0 or 1.0 before this sees it). model.arch and mesh.rules are MistralConfig's and
    sharding.py's to check."""
    from zephyr_jax.config_common import base

    switches = {k for k, v in _leaves(base("sft").to_dict()) if isinstance(v, bool)} | set(STAGE_SWITCHES)
    for key, value in _leaves(cfg.to_dict()):
        if key.startswith(("model.arch.", "mesh.rules.")):
            continue
        if value is None and key not in NULLABLE:
            raise ConfigError(f"config.{key}=None: the setting takes a value (None is taken by {', '.join(NULLABLE)})")
        if isinstance(value, bool) and key not in switches:
            raise ConfigError(f"config.{key}={value}: a number, not a boolean")


def _leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) of every setting in a nested dict."""
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from _leaves(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


TRAINING_DTYPES = ("float32", "bfloat16", "float16")


def check_float_dtype(value, key: str) -> None:
    """float8 trained nothing (compute) or failed in the first step (weights, Adam); float64 ran as float32 unless
    jax_enable_x64 is set, while config.json and an export said float64."""
    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = None
    if name not in TRAINING_DTYPES:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(TRAINING_DTYPES)}")


def check_attention_kernel(cfg) -> None:
    """An explicit kernel's static needs, which the first step would otherwise find after the data work: cuDNN
    computes in bfloat16 or float16, splash takes lengths that are multiples of 128 (every length a batch can
    take: data.buckets', or packed dDPO rows' multiples of min(128, max_length))."""
    from zephyr_jax.train import buckets_for  # (train imports this module)

    impl, d = cfg.model.attention_impl, cfg.data
    if impl == "cudnn" and jnp.dtype(cfg.model.dtype) not in CUDNN_DTYPES:
        raise ConfigError(f"model.attention_impl='cudnn' with model.dtype={cfg.model.dtype!r}: cuDNN flash attention "
                          "computes in bfloat16 or float16 (set model.dtype, or attention_impl='auto' or 'xla')")
    if impl == "splash":
        packed_pairs = cfg.stage == "dpo" and d.packing and not d.buckets
        lengths = (min(128, d.max_length),) if packed_pairs else buckets_for(d)
        bad = [n for n in lengths if n % 128]
        if bad:
            raise ConfigError(f"model.attention_impl='splash' needs lengths that are multiples of 128; batches here "
                              f"can be {bad[0]} long (data.max_length={d.max_length}, data.buckets="
                              f"{tuple(d.buckets)}): set them so, or attention_impl='auto' (einsum attention there)")


def check_optim(o) -> None:
    """AdamW's and the schedule's settings in the ranges where they mean what the recipe means."""
    if o.schedule not in steps.SCHEDULES:
        raise ConfigError(f"optim.schedule={o.schedule!r}: expected one of {steps.SCHEDULES}")
    # lr or weight_decay inf: the first update makes every weight NaN while that step's loss and gradient norm are
    # finite, so it was saved as the last good checkpoint
    rules = {"lr": (0 < o.lr < np.inf, "must be positive and finite"),
             "warmup_ratio": (0 <= o.warmup_ratio <= 1, "must lie in [0, 1]"),
             "b1": (0 <= o.b1 < 1, "must lie in [0, 1)"), "b2": (0 <= o.b2 < 1, "must lie in [0, 1)"),
             # eps=0: Adam's update of a parameter without gradient (the embedding of a token no batch holds) is
             # 0/0, NaN weights after a step whose loss and gradient norm were finite (and which was saved)
             "eps": (0 < o.eps < np.inf, "must be positive and finite"),  # inf: every update 0, nothing learnt
             "weight_decay": (0 <= o.weight_decay < np.inf, "must be at least 0 and finite"),
             "clip_norm": (o.clip_norm >= 0, "must be 0 (off) or positive")}
    for key, (ok, rule) in rules.items():
        if not ok:
            raise ConfigError(f"optim.{key}={o[key]}: {rule}")


def check_buckets(cfg) -> None:
    """data.buckets must hold the longest row an example can make, else the first batch holding one fails mid-run:
    max_length - 1 positions (an example of max_length tokens), or exactly max_length for packed dSFT rows. Packed
    dDPO rows, whose bound depends on the mesh's rows, are checked where their batcher is made
    (train.preference_batcher). Only they hold more than max_length positions: elsewhere a longer bucket pads
    every row past the bucket below it to more than any row needs."""
    buckets, n = tuple(cfg.data.buckets), cfg.data.max_length
    if not buckets:
        return
    if min(buckets) < 1:
        raise ConfigError(f"data.buckets={buckets}: a bucket of {min(buckets)} positions holds no row")
    packed_pairs = cfg.stage == "dpo" and cfg.data.packing
    if not packed_pairs and max(buckets) > n:
        raise ConfigError(f"data.buckets={buckets}: {max(buckets)} is longer than data.max_length={n}, which no row "
                          "exceeds (rows past the bucket below it would be padded to it)")
    if cfg.stage == "sft" and cfg.data.packing:
        if n not in buckets:
            raise ConfigError(f"data.buckets={buckets} lacks data.max_length={n}, the length of every packed dSFT row")
    elif max(buckets) < n - 1:
        raise ConfigError(f"data.buckets={buckets}: an example of data.max_length={n} tokens needs {n - 1} positions, "
                          "more than the largest bucket")


def check_model_source_exists(model_cfg) -> None:
    if model_cfg.init == "hf" and is_workdir(model_cfg.path):
        raise ConfigError(f"config.model.path={model_cfg.path!r} is a zephyr_jax training workdir: set "
                          "config.model.init='orbax' to start from its checkpoint")
    if model_cfg.init == "orbax" and not os.path.isdir(os.path.join(model_cfg.path, "checkpoints")):
        raise ConfigPathError(f"config.model.path={model_cfg.path!r}: no zephyr_jax workdir with checkpoints "
                              "there (train the SFT stage first, or set config.model.init='hf')")
    if model_cfg.init == "hf" and (model_cfg.path.startswith((".", "/")) or os.path.sep * 2 in model_cfg.path) \
            and not os.path.isdir(model_cfg.path):
        raise ConfigPathError(f"config.model.path={model_cfg.path!r}: no such Hugging Face checkpoint directory")


# ---------------------------------------------------------------------------------------------------------
# Resuming: a workdir's checkpoints continue only the run that wrote them.


# Settings that give a workdir's checkpoints their meaning (the step, the loader's position, the optimizer state,
# the DPO reference): a run that resumes from them must share them. The mesh, grad_accum, eval, logging and the
# kernels may change (a resume on another mesh continues exactly).
# model.param_dtype: orbax casts the saved master weights and Adam moments to the new dtype without a word.
RESUME_KEYS = ("stage", "seed", "tokenizer", "model.init", "model.path", "model.step", "model.arch",
               "model.param_dtype", "data.train", "data.train_split", "data.max_train_examples", "data.max_length",
               "data.max_prompt_length", "data.packing", "data.pack_window", "data.packed_rows", "data.loss_on",
               "data.too_long", "train.global_batch_size", "dpo.reference_free")
# Allowed (more steps, a lower lr, another beta), and said with what follows from the change.
_SCHEDULE = "the learning-rate schedule follows the new values from here on"
RESIZING_KEYS = {"train.max_steps": _SCHEDULE, "train.num_epochs": _SCHEDULE,  # (optim: also clip_norm, mu_dtype)
                 "optim": "the optimizer follows the new values from here on, its learning-rate schedule too",
                 "dpo": "the DPO loss follows the new values from here on"}


def _differences(key: str, old, now) -> list[str]:
    """"key: old -> new" for each value that differs, inside sections too (model.arch.hidden_size, not the whole
    model.arch section twice)."""
    if isinstance(old, dict) and isinstance(now, dict):
        return [d for k in sorted(set(old) | set(now))
                for d in _differences(f"{key}.{k}", old.get(k, "<absent>"), now.get(k, "<absent>"))]
    return [] if old == now else [f"{key}: {old!r} -> {now!r}"]


def _setting(tree: dict, key: str):
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return "<absent>"
        tree = tree[part]
    return tree


def resume_settings(cfg, workdir: str) -> bool:
    """When `workdir` holds checkpoints (returns True): refuses a config that changes RESUME_KEYS from the run that
    wrote them (its config.json), naming each change; takes that run's init step where this config says "latest"
    (-1), so a DPO run resumed after its SFT workdir gained a checkpoint keeps its reference model, and a dDPO
    run's tokenizer where this config leaves it unset (the one it tokenized with)."""
    saved_path = os.path.join(workdir, "config.json")
    ckpts = os.path.join(workdir, "checkpoints")
    if not (os.path.exists(saved_path) and os.path.isdir(ckpts) and any(d.isdigit() for d in os.listdir(ckpts))):
        return False
    try:
        saved = run_config(workdir)
    except ValueError as e:  # an edit gone wrong: one line, not a traceback (the file's own error names it)
        raise ConfigError(f"--workdir={workdir}: {e}; its checkpoints are resumed only with the settings recorded "
                          "there (fix the file, or use another --workdir)") from None
    new = json.loads(cfg.to_json_best_effort())
    if cfg.model.step == -1 and isinstance(_setting(saved, "model.step"), int):
        cfg.model.step = new["model"]["step"] = saved["model"]["step"]
    if cfg.stage == "dpo" and cfg.tokenizer is None and _setting(saved, "tokenizer") != "<absent>":
        cfg.tokenizer = new["tokenizer"] = saved["tokenizer"]

    def same(k, old, now):
        # "/x/sft/" names the data "/x/sft" does, and so does "sft" in /x: a workdir written before run() made
        # local paths absolute (train.absolute_if_local) recorded them as given
        paths = k in ("data.train", "model.path", "tokenizer") and isinstance(old, str) and isinstance(now, str)
        return old == now or (paths and "://" not in old and
                              os.path.abspath(os.path.expanduser(old)) == os.path.abspath(now))

    # A key either config lacks does not apply (a stage's own key, or one that an older release kept elsewhere).
    pairs = [(k, _setting(saved, k), _setting(new, k)) for k in RESUME_KEYS
             if not (k == "model.arch" and cfg.model.init != "random")]
    changed = [d for k, old, now in pairs if "<absent>" not in (old, now) and not same(k, old, now)
               for d in _differences(k, old, now)]
    if changed:
        raise ConfigError(f"{workdir} holds checkpoints of a run with other settings ({saved_path}): resuming would "
                          "not continue it. Changed: " + "; ".join(changed) + ". Use another --workdir, or the "
                          "settings of that run.")
    for k, consequence in RESIZING_KEYS.items():
        if _setting(saved, k) not in ("<absent>", _setting(new, k)) and jax.process_index() == 0:
            print(f"resuming {workdir} with {'; '.join(_differences(k, _setting(saved, k), _setting(new, k)))}: "
                  f"{consequence}")
    return True


# ---------------------------------------------------------------------------------------------------------
# The workdir every process writes.


def check_workdir(workdir: str) -> None:
    """A URL (gs://...) is refused: the workdir is written with Python's file functions, which would make a local
    directory named 'gs:' (and orbax fails at the first save, hours in). A bucket mounted with GCSFuse is a path.
    A directory whose config.json is not a training run's (an exported Hugging Face model's) is refused too: the
    run would replace it."""
    if "://" in workdir:
        raise ConfigError(f"--workdir={workdir}: a URL; the workdir must be a path every process can write (a local "
                          "disk for one host; NFS/Filestore, or a bucket mounted with GCSFuse, for several)")
    if (why := output_dir_problem(os.path.expanduser(workdir))) is not None:  # (os.makedirs' traceback, later)
        raise ConfigError(f"--workdir={workdir}: {why}")
    try:
        saved = run_config(os.path.expanduser(workdir))
    except ValueError:  # not JSON: resume_settings names the file
        return
    if saved is not None and not (isinstance(saved, dict) and "stage" in saved):
        what = "a Hugging Face model directory" if isinstance(saved, dict) and "model_type" in saved else \
            "a directory whose config.json is not a zephyr_jax training run's"
        raise ConfigError(f"--workdir={workdir} is {what}: training would replace its config.json; use another "
                          "--workdir (a model to start from goes in config.model.path)")


SHARED_MARK = "process_0_mark"  # at every start, process 0 makes WORKDIR/process_0_mark.<random>; the others look


def check_shared_workdir(workdir: str) -> None:
    """Every process must see what process 0 writes in the workdir: on a disk of its own, orbax's first save waits
    10 minutes for a directory process 0 made, and then every process hangs. The mark has a new name at every
    start, so no host's metadata cache (NFS, GCSFuse) holds an answer for it. Every process calls this (it runs
    collectives) and all raise alike."""
    token = multihost_utils.broadcast_one_to_all(np.frombuffer(os.urandom(16), np.uint8))  # process 0's
    path = os.path.join(workdir, f"{SHARED_MARK}.{np.asarray(token, np.uint8).tobytes().hex()}")
    if jax.process_index() == 0:
        for old in glob.glob(os.path.join(workdir, SHARED_MARK + ".*")):
            os.remove(old)
        open(path, "w").close()
    multihost_utils.sync_global_devices("zephyr_jax: process 0's workdir mark is written")
    seen = multihost_utils.process_allgather(np.int32(os.path.exists(path)))
    blind = [p for p in range(len(seen)) if not seen[p]]
    if blind:
        raise ConfigError(f"--workdir={workdir} is not shared: processes {blind} do not see what process 0 wrote there "
                          f"({os.path.basename(path)}); every process must write the same directory (NFS/Filestore "
                          "or a GCSFuse mount on several hosts; a relative path is taken from each process's own "
                          "directory)")


# ---------------------------------------------------------------------------------------------------------
# The data's token ids against the model's vocabulary.


def largest_token_id(examples) -> int:
    """The largest token id in SFT examples or preference pairs (-1 for none)."""
    arrays = (a for e in examples for a in ((e.prompt, e.chosen, e.rejected) if hasattr(e, "prompt") else (e.ids,)))
    return max((int(a.max()) for a in arrays if a.size), default=-1)


def check_token_ids(examples, vocab_size: int, where: str, tokenizer: str = "the tokenizer") -> None:
    """Refuses token ids the model has no embedding for (a tokenizer with added tokens over a model without them):
    they embed as NaN, so training stopped at its first log line on a NaN loss and evaluation reported NaN
    metrics, naming neither. `tokenizer` says which setting chose the tokenizer."""
    most = largest_token_id(examples)
    if most >= vocab_size:
        raise ConfigError(f"{where} holds token id {most}, but the model's vocabulary has {vocab_size} entries: "
                          f"{tokenizer} has tokens the model lacks. Use the model's own tokenizer, or a model with "
                          "embeddings for every id")


def check_default_tokenizer(cfg, vocab_size: int, tok) -> None:
    """With config.tokenizer unset, a model read from a checkpoint trains with Mistral-7B-v0.1's tokenizer. Where
    the model's vocabulary is of another size and its own tokenizer (tokenizer_source) numbers the tokens otherwise,
    that is refused: Mistral-7B-v0.3 put 768 control tokens first, so every v0.1 id, all in range, meant another
    token. A v0.1 model with tokens added after its 32,000 trains as before; one without a tokenizer is said."""
    if cfg.tokenizer is not None or cfg.model.init == "random" or vocab_size == len(tok):
        return
    source = tokenizer_source(cfg.model.path)
    if source is None:
        if jax.process_index() == 0:
            print(f"model.path={cfg.model.path!r} has a vocabulary of {vocab_size} tokens and no tokenizer: training "
                  f"with Mistral-7B-v0.1's ({len(tok)} tokens; config.tokenizer names another)")
        return
    own = load_tokenizer(source)
    n = min(len(tok), len(own))
    if own.convert_ids_to_tokens(list(range(n))) != tok.convert_ids_to_tokens(list(range(n))):
        raise ConfigError(f"model.path={cfg.model.path!r} has a vocabulary of {vocab_size} tokens, and its own "
                          f"tokenizer ({source}) numbers them unlike Mistral-7B-v0.1's, which training takes while "
                          f"config.tokenizer is unset: set config.tokenizer={source!r}")
