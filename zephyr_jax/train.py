"""dSFT and dDPO training from an ml_collections config, on any device mesh.

    python -m zephyr_jax.train --config=configs/sft.py[:VARIANT] --workdir=DIR [--config.key=value ...]
    python -m zephyr_jax.train --config=configs/dpo.py --workdir=DIR --config.model.path=SFT_WORKDIR

Reads top to bottom: check the config -> mesh -> data -> model -> optimizer -> (DPO reference) -> resume ->
loop (step, log, eval, checkpoint) -> final eval and checkpoint. The step itself lives in train_steps.py, the
checks of the config, the workdir and the data in train_checks.py, the log lines in train_log.py.
Multi-process runs (TPU pods, SLURM, N local processes) pass --distributed or the --coordinator_address trio.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import signal
import sys
import traceback
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx
from jax.experimental import multihost_utils
from ml_collections import config_flags
from tqdm.auto import tqdm

from zephyr_jax import checkpoint, hf, profiling
from zephyr_jax import train_checks as checks
from zephyr_jax.train_checks import ConfigError, ConfigPathError
from zephyr_jax import train_steps as steps
from zephyr_jax.config_common import parse_flags
from zephyr_jax.data import Loader, default_buckets, pad_sft
from zephyr_jax.data.batches import PackedRow, pack_rows, packed_pair_buckets, sequence_lengths, stack_rows
from zephyr_jax.data.loader import examples_digest, padded_batcher, pair_batcher
from zephyr_jax.data.pipeline import load_examples
from zephyr_jax.loading import load_model
from zephyr_jax.metrics import MetricWriter, padding_fraction, peak_flops, throughput
from zephyr_jax.model import Mistral, MistralConfig
from zephyr_jax.sharding import check_params_fit_mesh, logical_to_spec, make_mesh, named, param_specs
from zephyr_jax.tokenizer import load_tokenizer, tokenizer_source
from zephyr_jax.train_log import StepLog

# ---------------------------------------------------------------------------------------------------------
# What the config implies: the remat that runs, the compilation cache, the mesh and the batches it takes.


def effective_remat(cfg) -> str:
    """The remat the train step really runs: more than one micro-batch recomputes every layer in the backward pass
    (model/accumulate.py), whatever model.remat says."""
    return "full" if cfg.train.grad_accum > 1 else cfg.model.remat


def rounded_reference_note(cfg) -> str | None:
    """What to say when dDPO's frozen reference copy is stored in a dtype that rounds the policy's compute: it is the
    initial policy rounded, not the initial policy, so the implicit rewards do not start at 0 (a bf16 copy of a
    float32 policy: 0.06-0.2 nats per sequence on a small random model). None when the reference is exact."""
    if cfg.stage != "dpo" or cfg.dpo.reference_free or cfg.dpo.precompute_reference:
        return None
    ref, compute = jnp.dtype(cfg.dpo.reference_dtype), jnp.dtype(cfg.model.dtype)
    exact = (compute, jnp.dtype(cfg.model.param_dtype))  # the weights' own dtype copies them as they are
    if ref in exact or ref.itemsize > compute.itemsize:  # float16 and bfloat16 round differently
        return None
    return (f"dpo.reference_dtype={ref.name} is not model.dtype={compute.name}: the frozen reference is the "
            f"initial policy rounded to {ref.name}, so the rewards and margins do not start at 0 "
            f"(dpo.reference_dtype={compute.name} or dpo.precompute_reference=True gives the exact reference)")


def positions_note(cfg, mcfg) -> str | None:
    """What to say when data.max_length passes the model's max_position_embeddings. Allowed, as transformers and the
    Engine allow it (RoPE computes any position; Mistral-7B-v0.1 states 32768 over a 4096 sliding window), but the
    model's positions past it were never trained. None when every position is within it."""
    if cfg.data.max_length <= mcfg.max_position_embeddings:
        return None
    source = "config.model.arch" if cfg.model.init == "random" else cfg.model.path
    return (f"data.max_length={cfg.data.max_length} is above the model's max_position_embeddings="
            f"{mcfg.max_position_embeddings} ({source}): training goes on, and teaches positions it was not "
            "trained at")


def use_compilation_cache(path: str | None) -> None:
    """JAX's persistent compilation cache: a restart, or a later run with the same shapes, loads each compiled
    step instead of compiling it again (minutes for a 7B step). Any path JAX can write, including gs:// buckets;
    "" turns it off. Programs that compile in under a second are not stored (JAX's default;
    $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS sets another bound)."""
    if path:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))


def check_batch_fits_mesh(cfg, mesh, training: bool = True) -> None:
    """Every micro-batch's rows split evenly over the mesh's batch shards. dDPO's rows are sequences, not pairs:
    packed, preference_rows_for rounds them up to the shards (data.packed_rows is checked here), so any number of
    pairs fits (the recipe's 32 on 64 chips); unpacked, a pair is two rows. training=False (an evaluation of a
    run's checkpoint): the eval batches only."""
    shards = batch_shards(mesh, cfg.mesh.rules)
    micro = cfg.train.global_batch_size // cfg.train.grad_accum
    if cfg.stage != "dpo":
        train_sizes = [("micro-batch (global_batch_size / grad_accum)", micro)]
        eval_sizes = [("train.eval_batch_size", cfg.train.eval_batch_size)]
    elif not cfg.data.packing:
        train_sizes = [("rows of a micro-batch (2 x global_batch_size / grad_accum pairs)", 2 * micro)]
        eval_sizes = [("rows of an eval batch (2 x train.eval_batch_size pairs)", 2 * cfg.train.eval_batch_size)]
    else:
        train_sizes, eval_sizes = [], []
    axes = " x ".join(batch_axes(cfg.mesh.rules)) or "no axis"
    for name, size in (train_sizes if training else []) + eval_sizes:
        if size % shards:
            raise ConfigError(f"{name}={size} does not divide over the mesh's {axes} = {shards} batch shards "
                              "(config.mesh.rules.batch)")
    rows = cfg.data.packed_rows if training and cfg.stage == "dpo" and cfg.data.packing else 0
    if rows % (shards * cfg.train.grad_accum):
        raise ConfigError(f"data.packed_rows={rows} must be a multiple of train.grad_accum x the mesh's batch shards "
                          f"({cfg.train.grad_accum} x {shards})")


def mesh_for(cfg, devices=None, training: bool = True):
    """The config's mesh over its devices (default: this job's), checked against the batch sizes (training=False:
    the eval batches' only)."""
    devices = jax.devices() if devices is None else devices
    devices = devices if cfg.mesh.num_devices == -1 else first_devices(devices, cfg.mesh.num_devices)
    try:
        mesh = make_mesh(cfg.mesh.shape, devices, order=cfg.mesh.device_order)
    except ValueError as e:  # (sharding.py's own error, also for the engine's --mesh)
        raise ConfigError(f"config.mesh: {e}") from e
    check_batch_fits_mesh(cfg, mesh, training)
    return mesh


def first_devices(devices, n: int) -> list:
    """config.mesh.num_devices=n: the first n devices, as many from each process. (The first n of the job were
    all process 0's: the others held no part of the mesh, and one crashed while another waited for ever.)"""
    if n < 1:  # (-1 never comes here: mesh_for takes every device)
        raise ConfigError(f"config.mesh.num_devices={n}: must be -1 (every device) or positive")
    processes = sorted({d.process_index for d in devices})
    per, left = divmod(n, len(processes))
    held = {p: [d for d in devices if d.process_index == p] for p in processes}
    if left or per < 1 or any(len(held[p]) < per for p in processes):
        raise ConfigError(f"config.mesh.num_devices={n}: must be a multiple of the {len(processes)} processes, each "
                          f"giving an equal part of at most {min(len(h) for h in held.values())} devices")
    return [d for p in processes for d in held[p][:per]]


def buckets_for(data_cfg) -> tuple:
    """The config's padded lengths, else powers of two from min(128, max_length) up to max_length."""
    return tuple(data_cfg.buckets) or default_buckets(data_cfg.max_length, min(128, data_cfg.max_length))


def batch_axes(rules) -> tuple:
    """The mesh axes a batch's rows split over: the "batch" rule's (data and fsdp by default)."""
    axes = logical_to_spec(("batch",), rules)[0]
    return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def batch_shards(mesh, rules) -> int:
    return int(np.prod([mesh.shape[a] for a in batch_axes(rules)]))


def preference_rows_for(cfg, mesh, pairs: int, micro_batches: int) -> int:
    """Rows a batch of `pairs` preference pairs goes into: 2 * pairs without packing (a row per sequence); with
    packing about four sequences a row, or data.packed_rows for train.global_batch_size pairs (an eval batch of
    other size: as many sequences a row), rounded up so that every micro-batch splits evenly over the batch
    shards."""
    if not cfg.data.packing:
        return 2 * pairs
    unit = batch_shards(mesh, cfg.mesh.rules) * micro_batches
    packed_rows, batch = cfg.data.packed_rows, cfg.train.global_batch_size
    wanted = -(-packed_rows * pairs // batch) if packed_rows else -(-pairs // 2)
    return max(unit, -(-wanted // unit) * unit)


def preference_batcher(cfg, mesh, pairs: int, micro_batches: int = 1):
    """The loader's batcher for DPO batches of `pairs` pairs. Packed rows get packed_pair_buckets's lengths,
    unless data.buckets says otherwise."""
    rows = preference_rows_for(cfg, mesh, pairs, micro_batches)
    buckets = buckets_for(cfg.data)
    if cfg.data.packing and not cfg.data.buckets:
        buckets = packed_pair_buckets(pairs, rows, cfg.data.max_length)
    elif cfg.data.packing:  # checked here, not at the batch of long pairs that would not fit, hours in
        need = packed_pair_buckets(pairs, rows, cfg.data.max_length)[-1]
        if max(buckets) < need:
            raise ConfigError(f"data.buckets={tuple(cfg.data.buckets)}: {pairs} pairs packed into {rows} rows may "
                              f"need rows of {need} positions (their share of sequences and one more, each up to "
                              f"data.max_length={cfg.data.max_length}), more than the largest bucket; add one of "
                              f"{need}, or leave data.buckets empty (packed_pair_buckets' lengths)")
    return pair_batcher(rows, buckets, micro_batches)


# ---------------------------------------------------------------------------------------------------------
# Model initialisation, straight onto the mesh.


def model_settings(cfg) -> dict:
    """The MistralConfig fields a run's config sets on top of the architecture: dtypes, kernels, remat, sharding."""
    return dict(dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, attention_impl=cfg.model.attention_impl,
                remat=cfg.model.remat, scan_layers=cfg.model.scan_layers, sharding_rules=cfg.mesh.rules)


def model_config(cfg) -> MistralConfig:
    """The architecture: from the HF checkpoint, the SFT workdir, or config.model.arch for random init."""
    jax_settings = model_settings(cfg)
    if cfg.model.init == "random":
        try:
            mcfg = MistralConfig(**cfg.model.arch.to_dict(), **jax_settings)
        except ValueError as e:  # heads that do not divide, an odd head size, ...
            raise ConfigError(f"config.model.arch: {e}") from None
    else:  # a file missing or not a Mistral config.json: named as the setting (the command line printed a traceback)
        try:
            if cfg.model.init == "orbax":
                mcfg = checkpoint.load_model_config(cfg.model.path, **jax_settings)
            else:
                mcfg = hf.load_config(hf.resolve(cfg.model.path), **jax_settings)
        except FileNotFoundError as e:
            raise ConfigPathError(f"config.model.path={cfg.model.path!r}: {e}") from None
        except ValueError as e:
            raise ConfigError(f"config.model.path={cfg.model.path!r}: {e}") from None
    if mcfg.attention_dropout:  # inference never drops; training here would silently differ from transformers'
        source = "config.model.arch" if cfg.model.init == "random" else cfg.model.path
        raise ConfigError(f"the model's attention_dropout={mcfg.attention_dropout} ({source}): attention dropout is "
                          "not implemented in training; set it to 0.0 (Mistral-7B's value)")
    return mcfg


def abstract_params(cfg, mcfg: MistralConfig, mesh):
    """(graphdef, parameter shapes and dtypes, their shardings on `mesh`): nothing is allocated."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Mistral(mcfg, rngs=nnx.Rngs(cfg.seed))))
    try:
        specs = param_specs(abstract, cfg.mesh.rules)
        check_params_fit_mesh(abstract, specs, mesh)
    except ValueError as e:  # sharding.py names the parameter and its rule: a mistake of the config's mesh
        raise ConfigError(str(e)) from e
    return graphdef, abstract, named(mesh, specs)


def init_params(cfg, mcfg: MistralConfig, mesh):
    """(graphdef, params on the mesh, their shardings): random (a jitted init, each device making its shards), or
    read by loading.load_model from the orbax workdir / HF checkpoint in config.model.path straight onto the mesh."""
    graphdef, _, shardings = abstract_params(cfg, mcfg, mesh)
    if cfg.model.init == "random":
        init = jax.jit(lambda: nnx.split(Mistral(mcfg, rngs=nnx.Rngs(cfg.seed)))[1], out_shardings=shardings)
        return graphdef, init(), shardings
    step = -1
    if cfg.model.init == "orbax":
        step = checkpoint.resolve_step(cfg.model.path, cfg.model.step)
    settings = {k: v for k, v in model_settings(cfg).items() if k not in ("dtype", "param_dtype")}
    model = load_model(cfg.model.path, mcfg.dtype, mesh, step=step, param_dtype=mcfg.param_dtype,
                       rules=cfg.mesh.rules, **settings)
    if cfg.model.init == "orbax":
        print(f"initialised from {cfg.model.path} step {step}")
    return graphdef, nnx.state(model), shardings


def frozen_copy(params, shardings, dtype):
    """The DPO reference: a separate copy of the initial parameters (never donated), optionally in bf16."""
    copy = jax.jit(lambda p: jax.tree.map(lambda x: (x.astype(dtype) if x.dtype != dtype else x) + 0, p),
                   out_shardings=shardings)
    return copy(params)


# ---------------------------------------------------------------------------------------------------------
# Batches: host numpy -> global arrays on the mesh, row by global row index.


def check_same_examples_everywhere(splits: dict) -> None:
    """{split: (examples, digest)}: every process must hold the same examples of each split, as each builds its
    rows of the same global batches (a host's stale copy of a file trained, or was scored, as a mix). Raised on
    every process alike, so none is left waiting in a collective."""
    names = list(splits)
    mine = np.stack([np.frombuffer(bytes.fromhex(splits[n][1]), np.uint8) for n in names])
    everyone = multihost_utils.process_allgather(mine)  # [processes, splits, 16]
    for i, name in enumerate(names):
        differ = [p for p in range(len(everyone)) if not np.array_equal(everyone[p, i], everyone[0, i])]
        if differ:
            examples, digest = splits[name]
            unit = "packed rows" if examples and isinstance(examples[0], PackedRow) else "examples"
            raise ValueError(f"processes {differ} hold other {name} examples than process 0 (this one, process "
                             f"{jax.process_index()}: {len(examples)} {unit}, digest {digest[:12]}): every "
                             "process must read the same data files with the same code")


# The settings each process must share, by section; host-local paths may differ (each host's copy of the same data
# or Hugging Face weights, which the examples' and weights' digests check; an orbax init's workdir is shared).
SETTINGS_SECTIONS = ("stage", "seed", "model", "data", "optim", "train", "dpo", "mesh", "logging")
HOST_LOCAL_SETTINGS = {"model": ("path",), "data": ("train", "eval", "cache_dir", "data_dir"),
                       "train": ("compilation_cache_dir",)}


def settings_digests(cfg) -> np.ndarray:
    """[sections, 16] uint8: a digest of each of SETTINGS_SECTIONS (an absent one digests as null)."""
    rows = []
    for name in SETTINGS_SECTIONS:
        value = cfg.get(name)
        value = value.to_dict() if hasattr(value, "to_dict") else value
        if isinstance(value, dict):
            local = HOST_LOCAL_SETTINGS.get(name, ())
            if name == "model" and value.get("init") != "hf":  # nothing compares the checkpoints each restores from
                local = ()
            value = {k: v for k, v in value.items() if k not in local}
        text = json.dumps(value, sort_keys=True, default=repr)
        rows.append(np.frombuffer(hashlib.blake2b(text.encode(), digest_size=16).digest(), np.uint8))
    return np.stack(rows)


def check_same_settings_everywhere(cfg) -> None:
    """Every process must run the same settings (each builds its rows of the same global batches and applies the
    same updates): a host given another seed, learning rate or beta trained a silent mix. Raised on every process
    alike, before any other check, so none is left waiting in a collective."""
    everyone = multihost_utils.process_allgather(settings_digests(cfg))  # [processes, sections, 16]
    differ = {name: [p for p in range(len(everyone)) if not np.array_equal(everyone[p, i], everyone[0, i])]
              for i, name in enumerate(SETTINGS_SECTIONS)}
    differ = {name: procs for name, procs in differ.items() if procs}
    if differ:
        raise ConfigError("the processes were given other settings: " + "; ".join(
            f"config.{name} differs on processes {procs} from process 0's" for name, procs in differ.items()) +
            " (each prints its config). Give every process the same command line")


def batch_sharding(mesh, rules):
    return jax.sharding.NamedSharding(mesh, logical_to_spec(("batch",), rules))


def local_rows(sharding, num_rows: int) -> np.ndarray:
    """The global batch rows (ascending) held by this process's devices. On a pod the mesh follows the physical
    topology, so they need not be one contiguous block, and rows replicated over other axes may also be held
    by other processes."""
    held = set()
    for index in sharding.addressable_devices_indices_map((num_rows,)).values():
        held.update(range(*index[0].indices(num_rows)))
    return np.array(sorted(held), np.int64)


def place(local_batch: dict, sharding, rows, num_rows: int) -> dict:
    """This process's rows of a global batch of `num_rows` (local_batch[k][i] is global row rows[i]) -> global
    jax arrays sharded over the batch axes; each device gets exactly the global rows its shard covers."""
    where = {int(r): i for i, r in enumerate(rows)}

    def put(x):
        pick = lambda index: x[[where[r] for r in range(*index[0].indices(num_rows))]]
        return jax.make_array_from_callback((num_rows,) + x.shape[1:], sharding, pick)

    return {k: put(v) for k, v in local_batch.items()}


def training_batches(cfg, mesh, examples, log=print):
    """(the loader's examples, its batcher, rows per global batch) for the train split. dDPO: pairs, packed per
    batch. dSFT with packing: packed once, after a seeded shuffle so rows mix examples from the whole split, into
    rows the loader then treats as examples; without: an example per row."""
    batch_size = cfg.train.global_batch_size
    if cfg.stage == "dpo":
        return (examples, preference_batcher(cfg, mesh, batch_size, cfg.train.grad_accum),
                preference_rows_for(cfg, mesh, batch_size, cfg.train.grad_accum))
    if cfg.data.packing:
        order = np.random.default_rng(cfg.seed).permutation(len(examples))
        examples = pack_rows([examples[i] for i in order], cfg.data.max_length, cfg.data.pack_window)
        log(f"packed into {len(examples)} rows of {cfg.data.max_length} tokens")
    return examples, padded_batcher(stack_rows if cfg.data.packing else pad_sft, buckets_for(cfg.data)), batch_size


def eval_batches(examples, batch_size: int, batcher, rows=None):
    """All examples in order, in global batches of batch_size examples (the last one filled with repeats of its
    example of fewest positions: their outputs are dropped, and a long pair's repeats lengthened packed dDPO rows),
    each with its count of real examples; the process builds the batch rows `rows`."""
    for start in range(0, len(examples), batch_size):
        chunk = list(examples[start:start + batch_size])
        real = len(chunk)
        chunk += [min(chunk, key=lambda e: sum(sequence_lengths(e)))] * (batch_size - real)
        yield batcher(chunk, rows)[0], real


def eval_split(cfg, examples, log=print) -> list:
    """The held-out split as eval batches take it: dSFT with packing packs it into rows of max_length (in file
    order: its metrics are sums over tokens), so eval spends no compute on padding (an example a row padded to a
    power of two was 69% real tokens on UltraChat-like lengths); otherwise its examples."""
    if cfg.stage == "dpo" or not cfg.data.packing:
        return examples
    rows = pack_rows(examples, cfg.data.max_length, cfg.data.pack_window)
    log(f"eval: {len(examples)} examples packed into {len(rows)} rows of {cfg.data.max_length} tokens")
    return rows


def eval_size(cfg, mesh, count: int) -> int:
    """Examples (rows) or pairs per eval batch for a split of `count`: train.eval_batch_size, or for a split smaller
    than that the fewest that hold it and still split over the batch shards (a split of 6 packed rows filled 64 with
    repeats; 8 dDPO pairs were 32, in twice the rows). Packed pairs fit any shards (preference_rows_for rounds their
    rows); unpacked, a pair is two rows. The DPO eval function, made for eval_batch_size pairs, takes fewer."""
    shards = batch_shards(mesh, cfg.mesh.rules)
    unit = shards if cfg.stage != "dpo" else 1 if cfg.data.packing else shards // math.gcd(2, shards)
    return min(cfg.train.eval_batch_size, max(1, -(-count // unit)) * unit)


def eval_batcher(cfg, mesh, size: int | None = None):
    """(batcher, global rows) of eval batches of `size` examples (default train.eval_batch_size): eval_split's rows
    (packed dSFT), an example per row (SFT), or pairs (DPO)."""
    size = size or cfg.train.eval_batch_size
    if cfg.stage == "dpo":
        return preference_batcher(cfg, mesh, size), preference_rows_for(cfg, mesh, size, 1)
    return padded_batcher(stack_rows if cfg.data.packing else pad_sft, buckets_for(cfg.data)), size


# ---------------------------------------------------------------------------------------------------------
# DPO reference log-probs, computed once and cached in the workdir.


def run_eval(cfg, eval_fn, params, examples, sharding, desc=None) -> dict:
    """eval_fn's per-example outputs over `examples`, in example order. Call inside `jax.set_mesh(mesh)`."""
    size = eval_size(cfg, sharding.mesh, len(examples))
    batcher, num_rows = eval_batcher(cfg, sharding.mesh, size)
    rows = local_rows(sharding, num_rows)
    batches = eval_batches(examples, size, batcher, rows)
    if desc:
        batches = tqdm(batches, desc=desc, disable=not cfg.train.progress, total=-(-len(examples) // size))
    return steps.run_eval_batches(eval_fn, params, batches, lambda b: place(b, sharding, rows, num_rows))


def reference_key(cfg, examples) -> str:
    h = hashlib.sha256()
    model = {k: cfg.model[k] for k in ("init", "path", "step", "dtype", "param_dtype")}
    if cfg.model.init == "random":
        model.update(arch=cfg.model.arch.to_dict(), seed=cfg.seed)
    if cfg.model.init == "orbax":  # the checkpoint itself: an SFT run trained again in place has other weights
        model.update(committed_at=checkpoint.committed_at(cfg.model.path, cfg.model.step))
    if cfg.model.init == "hf" and os.path.isdir(cfg.model.path):  # and a folder exported again in place
        model.update(weights=weights_fingerprint(cfg.model.path))
    h.update(json.dumps(model, sort_keys=True, default=str).encode())
    for ex in examples:
        for part in (ex.prompt, ex.chosen, ex.rejected):
            h.update(np.asarray(part, np.int32).tobytes())
            h.update(b"|")
    return h.hexdigest()[:16]


def weights_fingerprint(folder: str, samples: int = 16) -> str:
    """A Hugging Face folder's weight files: their names, sizes and 64 KiB read at `samples` places in each. The
    same on every host that holds a copy (modification times are not), and quick (hashing a 7B model's 14 GB
    whole takes a minute)."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(folder, "model*.safetensors"))):
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size}|".encode())
        with open(path, "rb") as f:
            for i in range(samples):
                f.seek(size * i // samples)
                h.update(f.read(1 << 16))
    return h.hexdigest()


def reference_cache_path(cfg, workdir, examples, name: str) -> str:
    return os.path.join(workdir, "reference_logps", f"{name}-{reference_key(cfg, examples)}.npy")


def reference_logps(cfg, workdir, examples, eval_fn, params, sharding, name: str) -> np.ndarray:
    """[N, 2] reference log-probs of `examples` under `params` (the initial model), cached by model and data.
    `params` may be a function returning them, called only when the cache misses."""
    path = reference_cache_path(cfg, workdir, examples, name)
    cached = os.path.exists(path)
    if jax.process_count() > 1:  # decided alike: a process that skipped the scoring pass would hang the others
        cached = bool(np.all(multihost_utils.process_allgather(np.int32(cached))))
    if cached:
        return np.load(path)
    params = params() if callable(params) else params
    logps = run_eval(cfg, eval_fn, params, examples, sharding, desc=f"reference log-probs ({name})")["logps"]
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "wb") as f:  # a kill mid-write must not leave a cache that loads
            np.save(f, logps)
        os.replace(path + ".tmp", path)
    return logps


def eval_metrics(cfg, eval_fn, params, examples, reference, sharding, desc=None) -> dict:
    """Metrics over a whole held-out split: SFT loss and token accuracy, or the DPO metrics against `reference`
    log-probs [N, 2]; `desc` names a progress bar (none inside training, whose own bar stays). Call inside
    `jax.set_mesh(mesh)`."""
    out = run_eval(cfg, eval_fn, params, examples, sharding, desc=desc)
    if cfg.stage != "dpo":
        return steps.sft_eval_metrics(out)
    lengths = np.array([[len(e.chosen), len(e.rejected)] for e in examples])
    return steps.dpo_eval_metrics(out["logps"], reference, lengths, cfg.dpo)


# ---------------------------------------------------------------------------------------------------------
# The run's set-up: each step's failures as errors that name the setting.


def orbax_init_step(cfg, workdir: str, resumed: bool) -> int:
    """The number of the checkpoint step an orbax-initialised run starts from (config.model.step may say
    "latest"); a missing one named as the init path's or, for a resumed run, as rotated away there."""
    try:
        return checkpoint.resolve_step(cfg.model.path, cfg.model.step)
    except FileNotFoundError as e:
        if not resumed:
            raise ConfigPathError(f"config.model.path={cfg.model.path}, config.model.step={cfg.model.step}: "
                                  f"{e}") from e
        # The run started from that step (its reference model too), and the init workdir's own later saves
        # rotated it away (train.keep_checkpoints).
        raise ConfigPathError(
            f"{workdir} started from step {cfg.model.step} of config.model.path={cfg.model.path}, which is gone "
            f"there ({e}); a run that went on in that workdir deleted it (its train.keep_checkpoints). Put the "
            "step back, or start this run again in a new workdir") from e


def run_tokenizer(cfg):
    """config.tokenizer, loaded; a missing one or one without BOS or EOS named as the setting."""
    try:
        return load_tokenizer(cfg.tokenizer)
    except FileNotFoundError as e:
        raise ConfigPathError(f"config.tokenizer={cfg.tokenizer!r}: {e}") from None
    except ValueError as e:  # no BOS or EOS token
        raise ConfigError(f"config.tokenizer={cfg.tokenizer!r}: {e}") from None


def write_run_config(cfg, workdir: str) -> None:
    """Process 0 prints the resolved config and writes it to workdir/config.json, which resume, export and
    evaluate read."""
    os.makedirs(workdir, exist_ok=True)
    if jax.process_index() == 0:
        print(cfg)
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w") as f:  # replaced whole: other hosts read it (resume_settings)
            f.write(cfg.to_json_best_effort(indent=2))
        os.replace(path + ".tmp", path)


def setting_notes(cfg, mcfg: MistralConfig, mesh) -> list[str]:
    """What to say of settings that run otherwise than they read: KV heads the tensor axis does not divide,
    a model.remat that gradient accumulation overrides, a rounded frozen reference, positions past the model's."""
    notes = []
    tensor = mesh.shape["tensor"]
    if tensor > 1 and mcfg.num_key_value_heads % tensor:
        notes.append(f"the {mcfg.num_key_value_heads} KV heads do not split over tensor={tensor}: the K/V "
                     "projections are split inside a head, XLA gathers the keys and values, and attention runs "
                     "without its fused kernel (einsum attention); a tensor axis that divides the KV heads avoids it")
    if effective_remat(cfg) != cfg.model.remat:
        notes.append(f"train.grad_accum={cfg.train.grad_accum}: the layers are recomputed in the backward pass, as "
                     f"model.remat='full' does (model/accumulate.py), so model.remat={cfg.model.remat!r} has no "
                     "effect")
    notes += [note for note in (rounded_reference_note(cfg), positions_note(cfg, mcfg)) if note]
    return notes


def load_split(cfg, tok, split: str, vocab_size: int) -> list:
    """data.train's or data.eval's examples, their token ids checked against the model's vocabulary; a source
    not reached or not there, or bad rows, named as the setting."""
    try:
        examples, _ = load_examples(cfg.data, cfg.stage, tok, split, progress=cfg.train.progress)
    except (ConnectionError, FileNotFoundError) as e:  # a hub dataset not reached, or not there
        raise ConfigPathError(f"data.{split}={cfg.data[split]!r}: {e}") from e
    except ValueError as e:  # not JSON, a bad row (data.on_bad_row="raise"), no usable row, hub files unread
        raise ConfigError(f"data.{split}={cfg.data[split]!r}: {e}") from e
    checks.check_token_ids(examples, vocab_size, f"data.{split} ({cfg.data[split]})",
                          f"config.tokenizer={cfg.tokenizer!r}")
    return examples


def check_fills_a_batch(cfg, read: int, rows: int) -> None:
    """The `read` training examples, made into `rows` (packed dSFT: fewer), fill at least one global batch. Said
    here, naming the setting (the Loader would call packed rows examples)."""
    batch = cfg.train.global_batch_size
    if rows < batch and rows < read:
        raise ConfigError(f"data.train's {read} examples packed into {rows} rows of {cfg.data.max_length} tokens "
                          f"cannot fill one global batch of {batch} rows (with data.packing, "
                          "train.global_batch_size counts packed rows)")
    if rows < batch:
        unit = "pairs" if cfg.stage == "dpo" else "examples"
        raise ConfigError(f"data.train={cfg.data.train!r}: its {read} {unit} cannot fill one global batch of "
                          f"train.global_batch_size={batch}")


# ---------------------------------------------------------------------------------------------------------
# The run.


# The exit status of a run stopped early by SIGTERM / a preemption notice (BSD's EX_TEMPFAIL): not 0, so that a
# job scheduler's "after this job succeeded" (sbatch --dependency=afterok) does not start dDPO on an unfinished dSFT.
PREEMPTED_EXIT_CODE = 75


class Preempted(RuntimeError):
    """`run` stopped on SIGTERM, Ctrl-C or a preemption notice (StopSignals), its steps saved: the run is not
    finished, so what needs its result (dDPO after dSFT, an export) must not go on; the same call resumes it."""


def run(cfg, workdir: str) -> dict:
    """Trains per `cfg` in `workdir` (resuming from its latest checkpoint); returns the final eval metrics. Raises
    Preempted when SIGTERM, a first Ctrl-C or a preemption notice stopped it, at any phase (StopSignals): the same
    call resumes."""
    with StopSignals() as stop:
        try:
            final_eval = _run(cfg, workdir, stop)
        except _StopAsked:
            raise Preempted(f"stopped by {stop.name()} during set-up, before this run trained a step: the same "
                            "command runs it again (from its latest checkpoint, if any)") from None
        if stop.asked is not None:  # noted after the final eval (closing the checkpoints and logs): it was swallowed
            raise Preempted(f"stopped by {stop.name()} after the final eval, the last step saved: the same command "
                            "evaluates that step again")
        return final_eval


def _run(cfg, workdir: str, stop: StopSignals) -> dict:
    cfg = cfg.copy_and_resolve_references()  # this run's copy: model.step is set to the step it starts from
    if jax.process_count() > 1:
        check_same_settings_everywhere(cfg)
    checks.check_workdir(workdir)
    workdir = os.path.expanduser(workdir)
    cfg.model.path = absolute_if_local(cfg.model.path)
    cfg.data.train, cfg.data.eval = absolute_if_local(cfg.data.train), absolute_if_local(cfg.data.eval)
    cfg.tokenizer = absolute_if_local(cfg.tokenizer)  # export and zephyr_jax.load read it from any directory
    checks.check_config(cfg)
    if cfg.model.init == "hf":  # a hub name is fetched here (then read from the hub's cache), before any other work
        try:
            hf_dir = hf.resolve(cfg.model.path)
        except FileNotFoundError as e:
            raise ConfigPathError(f"config.model.path: {e}") from None
    use_compilation_cache(cfg.train.compilation_cache_dir)
    mesh = mesh_for(cfg)
    resumed = checks.resume_settings(cfg, workdir)
    if cfg.stage == "dpo" and cfg.tokenizer is None and cfg.model.init != "random" and not resumed:
        # the SFT model's own tokenizer and chat template: what it was trained on (config.json records it)
        cfg.tokenizer = tokenizer_source(cfg.model.path)
    if cfg.model.init == "orbax":  # the number, not "latest": config.json records it, the reference cache keys on it
        cfg.model.step = orbax_init_step(cfg, workdir, resumed)
    mcfg = model_config(cfg)
    abstract_params(cfg, mcfg, mesh)  # every parameter splits over the mesh: checked before any data is read
    if cfg.model.init == "hf":  # and the weights' names, shapes and sizes, from their headers
        try:
            hf.check_weights(hf_dir, mcfg)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"config.model.path={cfg.model.path!r}: {e}") from None
    if cfg.stage == "dpo":  # packed rows' data.buckets against this mesh's rows: also before the data work
        preference_batcher(cfg, mesh, cfg.train.global_batch_size, cfg.train.grad_accum)
        eval_batcher(cfg, mesh)  # (eval batches of other size: their rows may need longer buckets)
    tok = run_tokenizer(cfg)
    checks.check_default_tokenizer(cfg, mcfg.vocab_size, tok)
    write_run_config(cfg, workdir)
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local "
          f"{jax.default_backend()} device(s), mesh {dict(mesh.shape)}")
    if jax.process_index() == 0:
        for note in setting_notes(cfg, mcfg, mesh):
            print(note)
    sharding = batch_sharding(mesh, cfg.mesh.rules)

    # Data.
    train_examples, eval_examples = (load_split(cfg, tok, split, mcfg.vocab_size) for split in ("train", "eval"))
    eval_examples = eval_split(cfg, eval_examples)
    if cfg.stage == "dpo":  # a split smaller than an eval batch: fewer pairs (eval_size), which may need longer buckets
        scored = [eval_examples]  # the splits eval batches read: the train split for its reference log-probs only
        if cfg.dpo.precompute_reference and not cfg.dpo.reference_free:
            scored.append(train_examples)
        for examples in scored:
            eval_batcher(cfg, mesh, eval_size(cfg, mesh, len(examples)))
    read = len(train_examples)
    train_examples, batcher, num_rows = training_batches(cfg, mesh, train_examples)
    check_fills_a_batch(cfg, read, len(train_examples))
    train_rows = local_rows(sharding, num_rows)
    loader = Loader(train_examples, cfg.train.global_batch_size, batcher, seed=cfg.seed, rows=train_rows)
    if jax.process_count() > 1:  # each process builds its rows of the same global batches: same list, or wrong data
        check_same_examples_everywhere({"training": (train_examples, loader.digest),
                                        "eval": (eval_examples, examples_digest(eval_examples))})
        checks.check_shared_workdir(workdir)
    sequences = [sequence_lengths(e) for e in train_examples]  # real positions, for honest throughput
    total_steps = cfg.train.max_steps if cfg.train.max_steps > 0 else loader.steps_per_epoch * cfg.train.num_epochs
    left_out = len(train_examples) % cfg.train.global_batch_size
    if cfg.train.max_steps <= 0 and left_out and jax.process_index() == 0:
        print(f"each epoch trains {loader.steps_per_epoch} full batches: {left_out} of its {len(train_examples)} "
              f"{'rows' if cfg.stage == 'sft' and cfg.data.packing else 'examples'} are left out (others each "
              "epoch, as the order is shuffled)")

    # Model and optimizer, created directly with their shardings.
    try:
        graphdef, params, param_shardings = init_params(cfg, mcfg, mesh)
    except (ValueError, FileNotFoundError) as e:  # a damaged checkpoint: its message, not orbax's chain of causes
        if cfg.model.init == "random":
            raise
        raise ConfigError(f"config.model.path={cfg.model.path!r}: {e}") from None
    if jax.process_index() == 0:
        checkpoint.save_model_config(workdir, mcfg)
    schedule = steps.make_schedule(cfg.optim, total_steps)
    tx = steps.make_optimizer(cfg.optim, schedule)
    rates = steps.learning_rates(schedule, total_steps)  # each step's, an argument of the step (step_hparams)
    state_shardings = train_state_shardings(tx, params, param_shardings, mesh)
    state = initial_state(tx, params, state_shardings)
    eval_fn = steps.make_eval_fn(cfg.stage, graphdef, cfg.train.eval_batch_size, max_segments(cfg, eval_examples))

    # DPO reference: from the initial parameters, before any checkpoint is restored.
    reference, eval_reference = None, None
    with jax.set_mesh(mesh):
        if cfg.stage == "dpo" and not cfg.dpo.reference_free:
            if cfg.dpo.precompute_reference:
                logps = reference_logps(cfg, workdir, train_examples, eval_fn, params, sharding, "train")
                train_examples[:] = [ex._replace(reference=lp) for ex, lp in zip(train_examples, logps)]
            else:
                reference = frozen_copy(params, param_shardings, jnp.dtype(cfg.dpo.reference_dtype))
            eval_reference = reference_logps(cfg, workdir, eval_examples, eval_fn, params, sharding, "eval")
        elif cfg.stage == "dpo":
            eval_reference = np.zeros((len(eval_examples), 2), np.float32)

    # Resume.
    mngr = checkpoint.manager(workdir, keep=cfg.train.keep_checkpoints)
    eval_skipped = False  # a preemption at an eval step saved before evaluating: the resumed run evaluates first
    unwritten = []  # and one between log steps saved the steps of its unfinished log line: the resumed run ends it
    if mngr.latest_step() is not None:
        abstract_state = jax.eval_shape(lambda: state)
        # The initial weights and optimizer state are let go before the checkpoint's are read: `params` kept the
        # initial weights on the devices for the whole resumed run (a second float32 copy of the model).
        state = params = None
        state, meta = checkpoint.restore(mngr, mngr.latest_step(), abstract_state, state_shardings)
        loader.restore(meta["loader"])
        eval_skipped = bool(meta.get("eval_skipped"))
        unwritten = meta.get("unwritten_log", [])
        print(f"resumed from step {int(state.step)} of {workdir}")
        if int(state.step) > total_steps:
            print(f"step {int(state.step)} is past this run's {total_steps} steps: nothing to train")

    train_step = jit_train_step(cfg, graphdef, state_shardings, sharding,
                                frozen_reference=reference is not None,
                                max_segments=max_segments(cfg, train_examples))
    start = int(jax.device_get(state.step))  # 0, or the step resumed from: the records after it are written again
    stop.defer()  # from here a stop signal is a flag the loop reads: the steps and their records are this run's
    evaluates_start = start == total_steps or (eval_skipped and bool(cfg.train.eval_every))  # (as below)
    unwritten = unwritten if start < total_steps else []  # no step left to end the line at: the short one stands
    writer = MetricWriter(workdir, cfg.logging.tensorboard, cfg.logging.wandb_project, cfg.to_dict(),
                          resumed_from=start, evaluates_start=evaluates_start, rewrites_start=bool(unwritten))

    def evaluate(step):
        with jax.set_mesh(mesh):
            metrics = eval_metrics(cfg, eval_fn, state.params, eval_examples, eval_reference, sharding)
        writer.write(step, metrics, "eval")
        if jax.process_index() == 0:  # (tqdm.write: above the bar, which stays at the bottom)
            tqdm.write(f"eval at step {step}: " + json.dumps({k: round(v, 5) for k, v in metrics.items()}))
        return metrics

    # The loop. The host never waits for a step's result: metrics stay on the device until a log line, an eval or
    # a checkpoint needs them, and the next batch is built and placed while the device runs this one.
    step = start
    bar = tqdm(total=total_steps, initial=step, desc=cfg.stage, disable=not cfg.train.progress or
               jax.process_index() != 0, dynamic_ncols=True)
    real = lambda infos: [sequences[i] for info in infos for i in info.indices]
    log = StepLog(writer, bar, mngr, workdir, lambda infos, seconds: throughput(
        mcfg, real(infos), seconds, mesh.size, frozen_reference=reference is not None,
        peak=cfg.train.peak_tflops * 1e12 or peak_flops()),
        padding_of=lambda infos: padding_fraction(real(infos), sum(info.rows * info.length for info in infos)))
    log.carry_over(unwritten)

    first = cfg.train.profile_start  # a window that runs past the last step ends with it, before its log and save
    trace = profiling.TraceWindow(first, min(cfg.train.profile_steps, total_steps + 1 - first),
                                  os.path.join(workdir, "tensorboard"), untimed=log.untimed)
    if 0 < first <= start and jax.process_index() == 0:
        print(f"train.profile_start={first}: this run starts after step {start}, so no profile")
    elif first > total_steps and jax.process_index() == 0:
        print(f"train.profile_start={first} is past this run's {total_steps} steps, so no profile")

    def next_batch():  # runs on the prefetch thread
        local, info = next(loader)
        return place(local, sharding, train_rows, info.rows), info, loader.state()

    last_eval, preempted = {}, False
    shapes = set()  # the batch shapes the step has compiled for
    try:
        if eval_skipped and cfg.train.eval_every and step < total_steps:  # (at the last step: the final eval)
            last_eval = stop.unless_stopped(lambda: evaluate(step))
            preempted = last_eval is STOPPED  # (its checkpoint still says the eval was skipped)
        with ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch:
            upcoming = prefetch.submit(next_batch) if not preempted else None
            while step < total_steps and not preempted:
                batch, info, position = upcoming.result()
                trace.before(step + 1, state)
                # A shape first met after the first step compiles in this call (a dDPO run meets ~13 bucketed
                # shapes, 43 s each for 7B on a v5e-64): not step time
                shape = batch_shape(batch)
                compiles = log.timed_from is not None and shape not in shapes
                shapes.add(shape)
                with log.paused() if compiles else contextlib.nullcontext(), jax.set_mesh(mesh), \
                        jax.profiler.StepTraceAnnotation(cfg.stage, step_num=step + 1):
                    state, metrics = train_step(state, batch, reference, steps.step_hparams(cfg, rates[step]))
                step += 1
                trace.after(step, metrics)
                if step < total_steps:
                    upcoming = prefetch.submit(next_batch)
                log.add(step, metrics, info, epoch=position["epoch"])
                if not log.timed_from:  # this run's first call compiled the step: it is not step time
                    log.time_from(step, metrics)
                if step % cfg.train.log_every == 0 or step == total_steps:
                    log.write()
                # Preemption: every process sees the same answer at the same step (orbax over JAX's preemption
                # sync manager when jax.distributed runs; this process's own StopSignals when it runs alone).
                # Asked before the eval, so a preempted run spends its grace period saving, not evaluating; a
                # signal during the eval abandons it, and the step is saved as one whose eval was skipped.
                preempted = mngr.reached_preemption(step) or stop.asked is not None
                eval_step = bool(cfg.train.eval_every) and step % cfg.train.eval_every == 0
                if eval_step and step < total_steps and not preempted:
                    log.check_finite()  # no eval of weights a bad step made (it put NaN eval metrics on record)
                    with log.paused():
                        last_eval = stop.unless_stopped(lambda: evaluate(step))
                    preempted = last_eval is STOPPED
                scheduled = (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total_steps
                if scheduled or preempted:
                    # The steps up to the checkpoint on record (save_every need not be a log step), and never a
                    # save of a step whose loss went bad (write checks every queued step first).
                    # A preemption off the run's own line and save steps: its line's steps go in the checkpoint too,
                    # for the resumed run to end that line where the uninterrupted run does (its record written
                    # here stands until then).
                    carried = log.unwritten() if preempted and not scheduled else []
                    log.write()
                    skipped = preempted and (eval_step or step == total_steps)  # (the resumed run's first work)
                    with log.paused():
                        checkpoint.save(mngr, state, {"loader": position, "eval_skipped": skipped,
                                                      "unwritten_log": carried})
                        writer.flush()  # the records up to this step on disk before the checkpoint commits
                if preempted:
                    print(f"preempted ({'SIGINT' if stop.asked == 'SIGINT' else 'SIGTERM'}): process "
                          f"{jax.process_index()} saved step {step}; exiting")
                    break
            bar.close()
            trace.close()  # a loop stopped inside the window (preempted): before the final save and eval
            # The last save is committed before the final eval, which a stop signal abandons (the resumed run,
            # with no step left to train, evaluates the last step).
            mngr.wait_until_finished()
        if not preempted and step == total_steps:
            last_eval = stop.unless_stopped(lambda: evaluate(step))
            preempted = last_eval is STOPPED
    finally:
        # Also when the loop raised (a bad batch, an out-of-memory on a new shape, Ctrl-C): a checkpoint still
        # being written is finished, not left as a .orbax-checkpoint-tmp directory.
        trace.close()
        mngr.wait_until_finished()
        mngr.close()
        writer.close()
    if preempted:
        raise Preempted(f"stopped by {stop.name()} at step {step} of {total_steps}, saved in "
                        f"{os.path.join(workdir, 'checkpoints')}: the same command resumes it")
    return last_eval


def batch_shape(batch: dict) -> tuple:
    """What the jitted step compiles for: each array's shape."""
    return tuple(sorted((name, x.shape) for name, x in batch.items()))


def absolute_if_local(source):
    """A local path (file, directory or glob) made absolute: config.json and the DPO reference cache then name the
    same files whichever directory a resumed run starts in (a relative path was refused as a change when given
    absolute, and taken when it named other files from another directory). A hub name or URL is kept."""
    if not isinstance(source, str) or not source or "://" in source:
        return source
    path = os.path.expanduser(source)
    return os.path.abspath(path) if os.path.exists(path) or glob.has_magic(path) else source


def train_state_shardings(tx, abstract_params, param_shardings, mesh) -> steps.TrainState:
    """Shardings of the whole TrainState: parameters per the rules, optimizer state like the parameters it
    mirrors, the step replicated."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shardings = _opt_shardings(tx, jax.eval_shape(tx.init, abstract_params), param_shardings, mesh)
    return steps.TrainState(param_shardings, opt_shardings, replicated)


def initial_state(tx, params, state_shardings: steps.TrainState) -> steps.TrainState:
    """Step 0: the parameters, the optimizer's initial state and the step counter, each laid out per
    `state_shardings` (train_state_shardings)."""
    return steps.TrainState(params, jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params),
                            jax.device_put(jnp.zeros((), jnp.int32), state_shardings.step))


def max_segments(cfg, rows) -> int | None:
    """The static bound GPU attention (cuDNN) takes on the sequences a row holds: 1 for unpacked dSFT rows; for
    packed ones (PackedRows, or batches of them) the most any of `rows` holds, rounded up to a power of two; None
    for dDPO, whose batches carry their segment slots. (Half the row length, the bound that needs no data,
    made cuDNN's call and its float32 statistics ~500x larger than packed UltraChat rows need.)"""
    if cfg.stage == "dpo":
        return None
    if not cfg.data.packing:
        return 1
    most = max((len(r.examples) if isinstance(r, PackedRow) else int(np.max(r["segment_ids"], initial=1))
                for r in rows), default=1)
    return 1 << (most - 1).bit_length()


def jit_train_step(cfg, graphdef, state_shardings, batch_sharding_, *, frozen_reference: bool,
                   max_segments: int | None):
    """The jitted train step of this config: step(state, batch, reference, hparams), the state donated, batches
    sharded over the batch axes, a frozen DPO reference (when it runs in the step) laid out like the parameters,
    and steps.step_hparams replicated. max_segments: see max_segments(cfg, rows) (what the step's batches hold).
    The planner (zephyr_jax/plan.py) compiles this same function ahead of time."""
    ref_shardings = state_shardings.params if frozen_reference else None  # frozen_copy keeps the params' layout
    optimizer = functools.partial(steps.make_optimizer, cfg.optim)
    step = steps.make_train_step(cfg.stage, graphdef, optimizer, cfg.train.grad_accum, cfg.get("dpo"),
                                 rules=cfg.mesh.rules, num_pairs=cfg.train.global_batch_size,
                                 max_segments=max_segments)
    replicated = jax.sharding.NamedSharding(batch_sharding_.mesh, jax.sharding.PartitionSpec())
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding_, ref_shardings, replicated),
                   out_shardings=(state_shardings, None), donate_argnums=(0,))


def _opt_shardings(tx, abstract_opt, param_shardings, mesh):
    """Optimizer state sharded like the parameters it mirrors (Adam's mu and nu); scalars replicated."""
    import optax

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    base = jax.tree.map(lambda _: replicated, abstract_opt)
    return optax.tree_map_params(tx, lambda _, s: s, base, param_shardings,
                                 transform_non_params=lambda _: replicated)


STOPPED = object()  # StopSignals.unless_stopped's result for work a stop signal abandoned


class _StopAsked(BaseException):
    """A stop signal where nothing is to be saved. A BaseException, as KeyboardInterrupt is: an `except Exception`
    on its way up (checkpoint.restore's, which names a damaged step) must not take it for an error of its own."""


class StopSignals:
    """SIGTERM (a preempted TPU VM, `scancel`, a job scheduler) and a first Ctrl-C (SIGINT) stop a run at any phase
    with a saved state: `run` raises Preempted (train's PREEMPTED_EXIT_CODE, which launchers read as "resume me").
    Until `defer()` (set-up: reading weights, tokenizing, scoring the DPO reference) the signal ends the run at
    once: nothing is trained yet that a resumed run would not do again. After it, the loop reads the signal at its
    next step (`asked`) and saves that step; `unless_stopped` work (an eval) is abandoned at once, the checkpoint
    marking the eval for the resumed run. A second SIGTERM never cuts a save short; a second Ctrl-C stops at once
    (Python's KeyboardInterrupt: the resumed run starts from the last committed checkpoint).

    Only for a process running alone: under jax.distributed, JAX's preemption notifier owns SIGTERM and spreads
    the notice to every process (read through mngr.reached_preemption), which a Python handler would break, and a
    Ctrl-C reaching one process could not stop the others at the same step. Nor where SIGINT was ignored when the
    process started (a launcher's background process), or off the main thread (a notebook worker). The previous
    handlers come back when the run ends, so a caller that goes on (the demo) can still be stopped."""

    def __init__(self):
        self.asked = None  # the first stop signal's name
        self._raises = True  # set-up: a signal ends the run at once
        self._previous = {}

    def __enter__(self):
        if os.name != "posix" or jax.distributed.is_initialized():
            return self
        wanted = [signal.SIGTERM] + [signal.SIGINT] * (signal.getsignal(signal.SIGINT) is signal.default_int_handler)
        for signum in wanted:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: no handler
                break
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum, frame):
        first = self.asked is None
        self.asked = self.asked or signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C: Python's own (KeyboardInterrupt)
            signal.signal(signal.SIGINT, self._previous[signal.SIGINT])
        if first and self._raises:
            raise _StopAsked()

    def name(self) -> str:
        """What stopped the run, for its message (JAX's preemption notice comes from a SIGTERM too)."""
        return "SIGINT (Ctrl-C)" if self.asked == "SIGINT" else "SIGTERM / a preemption notice"

    def defer(self) -> None:
        """From here a stop signal is only noted (`asked`): the loop saves its step first."""
        self._raises = False

    def unless_stopped(self, work):
        """work()'s result, or STOPPED where a stop signal came before or during it (then abandoned at once: an
        eval of 7B weights outlasted SLURM's 300 s of notice, which went to the save)."""
        # _raises is set before `asked` is read and reset inside the outer try: a signal landing just before the
        # read (it was only noted, and the eval ran on) or in the `finally` after work() returned (its _StopAsked
        # escaped the run, as one in set-up, the step unsaved) is STOPPED too.
        try:
            try:
                self._raises = True
                return STOPPED if self.asked is not None else work()
            finally:
                self._raises = False
        except _StopAsked:
            return STOPPED


# ---------------------------------------------------------------------------------------------------------
# Command line.

def cli():
    """Flags are defined here, not at import, so other modules and tests can import this one."""
    config = config_flags.DEFINE_config_file("config", None, "configs/sft.py or configs/dpo.py, with :VARIANT",
                                             lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the resolved config")
    distributed = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() with auto-detection "
                                    "(TPU pods, SLURM)")
    coordinator = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (N local processes)")
    num_processes = flags.DEFINE_integer("num_processes", None, "number of processes (with coordinator_address)")
    process_id = flags.DEFINE_integer("process_id", None, "this process's index (with coordinator_address)")
    flags.mark_flags_as_required(["config", "workdir"])

    def main(argv):
        if len(argv) > 1:  # `--workdir=runs/sft handbook` meant the variant: not the default recipe without a word
            raise app.UsageError(f"unexpected arguments {argv[1:]}: flags are --name=value")
        logging.set_verbosity(logging.WARNING)  # orbax and jax log every checkpoint write at INFO
        given = {"--coordinator_address": coordinator.value, "--num_processes": num_processes.value,
                 "--process_id": process_id.value}
        if any(v is not None for v in given.values()) and (None in given.values() or distributed.value):
            # one of them alone trained the whole job as process 0 of 1 (two such processes into one workdir)
            raise app.UsageError(f"{', '.join(k for k, v in given.items() if v is not None)} given: "
                                 "--coordinator_address, --num_processes and --process_id go together, "
                                 "without --distributed (which detects them on TPU pods and SLURM)")
        if coordinator.value:
            jax.distributed.initialize(coordinator.value, num_processes.value, process_id.value)
        elif distributed.value:
            jax.distributed.initialize()
        try:
            run(config.value, workdir.value)
        except Preempted as e:
            print(f"process {jax.process_index()}: {e}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT_CODE)
        except (Exception, KeyboardInterrupt) as e:
            if isinstance(e, ConfigError):  # its message names the setting: no traceback to read through
                print(f"error: {e}", file=sys.stderr, flush=True)
                if jax.process_count() == 1:
                    sys.exit(1)
            elif jax.process_count() == 1:
                raise
            else:
                traceback.print_exc()
            # The other processes wait for this one in a collective. A normal exit would wait minutes more in
            # jax.distributed's shutdown barrier, then abort every process with a dump that names no cause; this
            # way the error is printed and the others stop when the coordinator misses this process.
            print(f"process {jax.process_index()} of {jax.process_count()} failed: exiting now", file=sys.stderr,
                  flush=True)
            sys.stdout.flush()
            os._exit(1)

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
