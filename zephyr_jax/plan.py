"""Will this config fit that slice, and what will a step cost? Compiled ahead of time, nothing allocated.

    python -m zephyr_jax.plan --config=configs/dpo.py[:VARIANT] --topology=v5e-64 [--config.key=value ...] [--json]

The model is config.model.path's (its config.json, or Mistral-7B-v0.1's shape for the recipe's paths); another
size without a checkpoint: --config.model.init=random --config.model.arch.hidden_size=2048 ... (MistralConfig's
config.json fields).

The train step that train.py jits (same function, shardings, donation, gradient accumulation, and DPO reference
parameters or precomputed log-probs) is lowered from abstract shapes and compiled by XLA for a TPU slice
(libtpu compiles for TPUs on a CPU-only machine: `pip install -e .[tpu]`), for NVIDIA GPUs (h100-8, h200-1, ...:
JAX's CUDA plugin compiles from a device description, no GPU or driver needed: `pip install -e .[gpu]`), or for
this job's own devices (--topology=local; the targets are compile_targets.py's). MaxText's train_compile.py does
the same for pre-training; this one covers SFT and DPO.

Per chip it reports the bytes of parameters, optimizer state, DPO reference, batch and XLA's temporaries against
the chip's HBM, with a verdict; the tokens a step holds and the real (non-padding) tokens it holds for a length
mix; FLOPs counted from the shapes the step processes; the compile time; and the attention kernel compiled.
XLA's own cost analysis is shown only where it is sane, and labelled as an estimate: it is not a throughput
measure for a whole train step (on a 7B DPO step it has counted about half the FLOPs and a negative time).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zephyr_jax import train, train_checks, xla_flags
from zephyr_jax import train_steps as steps
from zephyr_jax.data.batches import sequence_lengths
from zephyr_jax.data.preference import PreferenceExample, truncate_pair
from zephyr_jax.data.sft import SFTExample
from zephyr_jax.compile_targets import GiB, cudnn_checks_for, known_gpu_topologies, known_topologies, target_for
from zephyr_jax.hub import hub_error
from zephyr_jax.metrics import step_flops
from zephyr_jax.model import MistralConfig

# ---------------------------------------------------------------------------------------------------------
# The model a config trains, without reading weights.


BASE_MODEL = "mistralai/Mistral-7B-v0.1"


def planned_model_config(cfg) -> tuple[MistralConfig, str]:
    """(architecture, where it came from), without reading weights: a local HF directory or zephyr_jax workdir is
    read; Mistral-7B-v0.1 (by hub name, or a dSFT workdir that does not exist yet: the dDPO config before dSFT has
    run) is MistralConfig's defaults; another hub name has only its config.json fetched."""
    jax_settings = train.model_settings(cfg)
    init, path = cfg.model.init, cfg.model.path
    if init == "random" or (init == "orbax" and os.path.isdir(os.path.join(path, "checkpoints"))) or \
            (init == "hf" and os.path.isdir(path)):
        return train.model_config(cfg), "config.model.arch" if init == "random" else path
    if init == "orbax" or path == BASE_MODEL:
        why = f"{path} has no checkpoint yet: planned as the recipe's base" if init == "orbax" else path
        return MistralConfig.mistral_7b_v0_1(**jax_settings), f"Mistral-7B-v0.1's architecture ({why})"
    from huggingface_hub import hf_hub_download

    from zephyr_jax import hf

    try:
        config_file = hf_hub_download(path, hf.CONFIG_NAME)
    except Exception as e:
        raise ValueError(f"config.model.path={path!r}: not a local directory, and its {hf.CONFIG_NAME} could not be "
                         f"fetched from the Hugging Face Hub ({hub_error(e)})") from e
    return hf.load_config(os.path.dirname(config_file), **jax_settings), f"{path} ({hf.CONFIG_NAME} from the hub)"


# ---------------------------------------------------------------------------------------------------------
# Length mixes: what a step's rows really hold.


def length_mix(spec: str, stage: str, seed: int = 0, n: int = 4096) -> list:
    """Examples with the token counts of a length mix, for the real batching code to pack or pad.

    spec: "lognormal:MEDIAN,SIGMA" for SFT (tokens per example), "lognormal:PROMPT,COMPLETION,SIGMA" for DPO
    (medians; chosen and rejected are drawn independently), or a file with one example per line: its token
    count for SFT, "prompt chosen rejected" token counts for DPO."""
    rng = np.random.default_rng(seed)
    width = 3 if stage == "dpo" else 1
    if spec.startswith("lognormal:"):
        try:
            *medians, sigma = (float(x) for x in spec.split(":", 1)[1].split(","))
        except ValueError:
            medians, sigma = [], 0.0
        if len(medians) != (2 if stage == "dpo" else 1):
            raise ValueError(f"length mix {spec!r}: expected lognormal:" +
                             ("PROMPT,COMPLETION,SIGMA for DPO" if stage == "dpo" else "MEDIAN,SIGMA for SFT"))
        if not all(map(math.isfinite, [*medians, sigma])) or min(medians) <= 0 or sigma < 0:
            raise ValueError(f"length mix {spec!r}: the medians must be positive and SIGMA at least 0 (finite)")
        medians = [medians[0], medians[1], medians[1]] if stage == "dpo" else medians
        counts = np.stack([rng.lognormal(math.log(m), sigma, n) for m in medians], 1)
        counts = np.maximum(2, counts).astype(int)
    else:
        if not os.path.isfile(spec):
            raise ValueError(f"--length_mix={spec!r}: neither lognormal:... nor a file of example lengths")
        try:
            counts = np.loadtxt(spec, dtype=int, ndmin=2)
        except ValueError as e:
            raise ValueError(f"length mix {spec}: {e}") from e
        if counts.shape[1] != width:
            raise ValueError(f"length mix {spec}: expected {width} integer(s) per line for {stage}")
        # An SFT example needs a token to predict from; a pair, a prompt and two completions (a slice's bound).
        short = np.flatnonzero((counts < (1 if stage == "dpo" else 2)).any(1))
        if short.size:
            raise ValueError(f"length mix {spec}: example {short[0]} ({counts[short[0]].tolist()}) is shorter "
                             f"than {'1 token a part' if stage == 'dpo' else '2 tokens'}")
    # Views of one read-only array: only the lengths matter, and 65,536 arrays of their own took seconds to make.
    longest = int(counts.max(initial=0))
    ids, mask = np.ones(longest, np.int32), np.ones(longest, bool)
    ids.setflags(write=False)
    mask.setflags(write=False)
    if stage == "dpo":
        return [PreferenceExample(ids[:p], ids[:c], ids[:r], False) for p, c, r in counts.tolist()]
    return [SFTExample(ids[:k], mask[:k], False) for (k,) in counts.tolist()]


def fit_to_config(examples, cfg) -> list:
    """Cuts examples to the config's limits as the data pipeline does (SFT: max_length; DPO: data.preference's
    truncate_pair)."""
    d = cfg.data
    if cfg.stage == "sft":
        return [SFTExample(e.ids[:d.max_length], e.loss_mask[:d.max_length], False) for e in examples]
    return [truncate_pair(e.prompt, e.chosen, e.rejected, d.max_length, d.max_prompt_length) for e in examples]


# Without --length_mix, the recipe's data as the dataset cards describe it (bench/RESULTS.md, "Planner"): UltraChat
# dialogues around 1,400 tokens; UltraFeedback prompts around 117 and replies around 276 tokens.
DEFAULT_MIX = {"sft": "lognormal:1400,0.5", "dpo": "lognormal:117,276,0.7"}


class MixBatch(NamedTuple):
    """One global batch that the real batching code made from a length mix."""
    batch: dict  # numpy arrays, the whole global batch
    sequences: list  # real positions of each sequence
    loss_tokens: int  # positions with a loss


def batches_of_mix(cfg, mesh, spec: str, num_steps: int = 8) -> list[MixBatch]:
    """Up to `num_steps` global batches that train.py's batching code (SFT packing or padding; DPO pairs packed
    into rows or a row per sequence) makes from the length mix."""
    n = 2 * num_steps * cfg.train.global_batch_size  # a row holds one example or more: fewer never fill the steps
    while True:
        batches = _batches(cfg, mesh, length_mix(spec, cfg.stage, cfg.seed, n), num_steps)
        if len(batches) >= num_steps or not spec.startswith("lognormal:"):
            break
        n *= 4  # packing needs more examples than rows
    if not batches:
        raise ValueError(f"the length mix {spec} holds fewer than one global batch of {cfg.train.global_batch_size}")
    return batches


def _batches(cfg, mesh, examples, num_steps: int) -> list[MixBatch]:
    size = cfg.train.global_batch_size
    examples = fit_to_config(examples, cfg)
    if cfg.stage == "dpo" and cfg.dpo.precompute_reference:  # the batches then carry "reference_logps"
        examples = [e._replace(reference=np.full(2, -100.0, np.float32)) for e in examples]
    examples, batcher, _ = train.training_batches(cfg, mesh, examples, log=lambda _: None)
    out = []
    for start in range(0, min(len(examples) - size + 1, num_steps * size), size):
        group = examples[start:start + size]
        batch = batcher(group)[0]
        losses = int((batch["loss_positions"] >= 0).sum())  # (-1 fills a row past its own)
        out.append(MixBatch(batch, [n for e in group for n in sequence_lengths(e)], losses))
    return out


def step_flops_spent(mcfg: MistralConfig, *, positions: float, attention_pairs: float, head_positions: float,
                     frozen_reference: bool, remat: str | None = None, kernel_attention: bool = False) -> float:
    """FLOPs of one train step: the decoder layers at `positions` (padding included), attention over
    `attention_pairs` query-key pairs (what the kernel computes: a whole row for einsum attention, each segment's
    own for a kernel that skips masked blocks), the LM head at `head_positions`. Forward and backward (3 forward
    passes' worth), the frozen DPO reference's forward, and what is recomputed: the remat policy's part of the
    layers (`remat`, default mcfg.remat), and the head's logits (the fused head keeps none). kernel_attention:
    splash or cuDNN, whose residuals every policy but full keeps (mistral.remat_policy); einsum attention is
    recomputed under save_dots, and its scores under save_all_but_mlp."""
    e, v, layers = mcfg.hidden_size, mcfg.vocab_size, mcfg.num_hidden_layers
    layer_params = mcfg.matmul_params - v * e  # the LM head is head_fwd's
    mlp = 2 * 3 * e * mcfg.intermediate_size * layers * positions
    layer_fwd = 2 * layer_params * positions
    attention_fwd = 4 * layers * mcfg.num_attention_heads * mcfg.head_dim * attention_pairs
    head_fwd = 2 * e * v * head_positions
    forward = layer_fwd + attention_fwd + head_fwd
    # Full remat recomputes a layer's forward but its down_proj: the backward needs only that matmul's input (the
    # layer's output is the next layer's saved input), and JAX drops the rest.
    down_fwd = 2 * e * mcfg.intermediate_size * layers * positions
    dots = 0.0 if kernel_attention else attention_fwd  # save_dots keeps no matmul with batch dimensions
    # save_all_but_mlp: gate and up again (not down_proj, as above); einsum attention's scores too (the names keep
    # its output, not its probabilities), a kernel's nothing.
    but_mlp = mlp - down_fwd + (0.0 if kernel_attention else attention_fwd / 2)
    recompute = {"none": 0.0, "full": layer_fwd + attention_fwd - down_fwd, "save_all_but_mlp": but_mlp,
                 "save_dots": dots, "offload": dots}[remat or mcfg.remat]
    recompute += head_fwd  # logprobs.head_logps recomputes each chunk's logits in the backward pass
    return 3 * forward + recompute + (forward if frozen_reference else 0.0)


def attention_pairs(batch: dict, kernel_skips_masked: bool) -> float:
    """Query-key pairs attention computes on a batch: every row's T x T for einsum attention, each segment's
    l x l for a kernel that skips the blocks its mask rules out (splash, cuDNN)."""
    seg = batch["segment_ids"]
    if not kernel_skips_masked:
        return float(seg.shape[0]) * seg.shape[1] ** 2
    return float(sum((np.bincount(row[row > 0]).astype(np.float64) ** 2).sum() for row in seg))


def abstract_batch(batches: list[MixBatch]) -> dict:
    """The step's batch as ShapeDtypeStructs: the real batches' keys and dtypes, each dimension the largest any
    of them has (rows are fixed; length, loss positions and segment slots vary), so memory is the worst case."""
    first = batches[0].batch
    return {k: jax.ShapeDtypeStruct(tuple(max(b.batch[k].shape[i] for b in batches) for i in range(v.ndim)), v.dtype)
            for k, v in first.items()}


class StepInputs(NamedTuple):
    state: steps.TrainState  # ShapeDtypeStructs
    batch: dict
    reference: Any  # frozen DPO reference parameters, or None
    hparams: dict  # train_steps.step_hparams: the step's learning rate (and DPO's beta)
    shardings: tuple  # (state, batch, reference, hparams) shardings, the trees of the four above


def train_step_and_inputs(cfg, mcfg: MistralConfig, mesh, batches: list[MixBatch]):
    """(train.py's jitted train step for cfg, its abstract inputs): the batch is abstract_batch(batches), the
    step's max_segments what train.py finds in their rows (train.max_segments)."""
    batch = abstract_batch(batches)
    max_segments = train.max_segments(cfg, [b.batch for b in batches])
    dpo = cfg.stage == "dpo"
    frozen = dpo and not cfg.dpo.reference_free and not cfg.dpo.precompute_reference
    graphdef, params, param_shardings = train.abstract_params(cfg, mcfg, mesh)
    tx = steps.make_optimizer(cfg.optim, steps.make_schedule(cfg.optim, 1000))
    state_shardings = train.train_state_shardings(tx, params, param_shardings, mesh)
    state = steps.TrainState(params, jax.eval_shape(tx.init, params), jax.ShapeDtypeStruct((), jnp.int32))
    batch_sharding = train.batch_sharding(mesh, cfg.mesh.rules)
    reference = None
    if frozen:
        ref_dtype = jnp.dtype(cfg.dpo.reference_dtype)
        reference = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, ref_dtype), params)
    step = train.jit_train_step(cfg, graphdef, state_shardings, batch_sharding,
                                frozen_reference=frozen, max_segments=max_segments)
    hparams = steps.step_hparams(cfg, 0.0)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = (state_shardings, jax.tree.map(lambda _: batch_sharding, batch), param_shardings if frozen else None,
                 jax.tree.map(lambda _: replicated, hparams))
    return step, StepInputs(state, batch, reference, hparams, shardings)


def input_buffers(inputs: StepInputs) -> list[tuple[str, int]]:
    """(name, bytes one chip holds) of every input array of the step, largest first."""
    out = []
    for name, tree, sh in zip(("state", "batch", "reference", "hparams"), inputs[:4], inputs.shardings):
        if tree is None:
            continue
        shards = jax.tree.leaves(sh, is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))
        for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(tree), shards, strict=True):
            size = int(np.prod(s.shard_shape(x.shape))) * jnp.dtype(x.dtype).itemsize
            out.append((f"{name}.{jax.tree_util.keystr(path, simple=True, separator='.')}", size))
    return sorted(out, key=lambda kv: -kv[1])


def input_bytes(buffers) -> dict:
    """Per-chip bytes of the step's inputs by kind: parameters, optimizer state, DPO reference, batch (not the
    step's hparams: a few bytes)."""
    kinds = {"parameters": "state.params.", "optimizer_state": "state.opt_state.", "reference": "reference.",
             "batch": "batch."}
    return {kind: sum(b for n, b in buffers if n.startswith(prefix)) for kind, prefix in kinds.items()}


def attention_kernel(compiled_text: str, mcfg: MistralConfig) -> str:
    """What the compiled program runs for attention: a fused kernel's custom call, or XLA's einsum softmax."""
    for marker, name in (("cudnn$fmha", "cuDNN flash attention"), ("splash", "Pallas splash attention"),
                         ("flash", "Pallas flash attention")):
        if marker in compiled_text:
            return name
    return f"XLA einsum attention (attention_impl={mcfg.attention_impl!r}; no fused kernel in the program)"


# XLA:TPU refuses to compile a program that does not fit, in one of two messages. Before scheduling: "the total
# memory required for HLO temporaries (X) exceeds available HBM (Y)", where X counts arguments, outputs and
# temporaries together (checked with programs whose arguments alone exceed HBM). After: "Used Y of Y hbm. Exceeded
# hbm capacity by Z", followed by its list of the largest allocations.
_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
_NUMBER = r"([\d.]+)([KMGT]?)"
_OOM_BEFORE = re.compile(rf"required for HLO temporaries \({_NUMBER}\) exceeds available HBM \({_NUMBER}\)")
_OOM_AFTER = re.compile(rf"Used {_NUMBER} of {_NUMBER} hbm\. Exceeded hbm capacity by {_NUMBER}")


def _bytes(number: str, unit: str) -> float:
    return float(number) * _UNITS[unit]


def out_of_memory(error: Exception) -> dict | None:
    """{"total", "hbm", "largest"} from XLA:TPU's out-of-memory compile error (bytes per chip; `largest`: XLA's
    biggest temporaries as (description, bytes)), or None for any other error."""
    text = str(error)
    if m := _OOM_BEFORE.search(text):
        return {"total": _bytes(*m.group(1, 2)), "hbm": _bytes(*m.group(3, 4)), "largest": []}
    if m := _OOM_AFTER.search(text):
        hbm = _bytes(*m.group(3, 4))
        section = text.partition("Largest program allocations in hbm:")[2].partition("Largest program arguments")[0]
        largest = []
        for entry in section.split("=========================="):
            size, shape = re.search(rf"Size: {_NUMBER}", entry), re.search(r"Shape: (\S+)", entry)
            op = re.search(r'op_name="([^"]+)"', entry)
            if size and shape:
                where = "/".join(op.group(1).split("/")[-2:]) if op else "?"
                largest.append((f"{shape.group(1).split('{')[0]} ({where})", _bytes(*size.group(1, 2))))
        return {"total": hbm + _bytes(*m.group(5, 6)), "hbm": hbm, "largest": largest}
    return None


# ---------------------------------------------------------------------------------------------------------
# The plan.


def compiled_bytes(compiled) -> dict:
    """A compiled program's bytes per device from XLA's memory analysis: its arguments, the outputs that do not
    reuse a donated argument, temporaries and code, their sum, and the total that must fit in the device's memory.

    On GPUs and CPUs the temporaries are one buffer allocated beside the arguments, so the total is the sum.
    XLA:TPU reports its own peak from its buffer assignment, which can be below the sum; it is the figure XLA:TPU
    checks against HBM (it compiles a 7B dDPO step for v5e-8 at a 15.58 GiB peak, 17.83 GiB summed, and refuses
    one with more pairs that needs 16.14 GiB), so it is the total there."""
    mem = compiled.memory_analysis()
    not_donated = mem.output_size_in_bytes - mem.alias_size_in_bytes
    parts = {"arguments": mem.argument_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
             "outputs_not_donated": not_donated, "code": mem.generated_code_size_in_bytes}
    summed = sum(parts.values())
    peak = getattr(mem, "peak_memory_in_bytes", 0)  # absent from older jax releases
    platform = next(iter(jax.tree.leaves(compiled.input_shardings)[0].device_set)).platform
    return {**parts, "sum": summed, "total": peak if platform == "tpu" and peak else summed}


def plan(cfg, topology: str = "local", length_mix_spec: str | None = None) -> dict:
    """Compiles cfg's train step for `topology` ("local", a TPU slice or GPUs: see target_for) and returns the
    report."""
    train_checks.check_config(cfg, check_model_source=False)
    target = target_for(topology)
    mesh = train.mesh_for(cfg, target.devices)
    mcfg, model_source = planned_model_config(cfg)
    dpo = cfg.stage == "dpo"
    frozen = dpo and not cfg.dpo.reference_free and not cfg.dpo.precompute_reference
    spec = length_mix_spec or DEFAULT_MIX[cfg.stage]
    batches = batches_of_mix(cfg, mesh, spec)
    batch = abstract_batch(batches)  # the largest shapes among them set the memory
    rows, length = batch["inputs"].shape
    remat = train.effective_remat(cfg)
    report = {
        "config": {"stage": cfg.stage, "mesh": dict(mesh.shape), "global_batch_size": cfg.train.global_batch_size,
                   "grad_accum": cfg.train.grad_accum, "rows": rows, "length": length,
                   "loss_positions": batch["loss_positions"].shape[1], "packing": bool(cfg.data.packing),
                   "segment_slots": batch["sequence_pair"].shape[1] if dpo else None,
                   "remat": remat + (" (grad_accum recomputes each layer)" if remat != mcfg.remat else ""),
                   "dtype": str(mcfg.dtype), "param_dtype": str(mcfg.param_dtype),
                   "reference": _reference_kind(cfg)},
        "target": {"name": target.name, "chips": len(target.devices), "hbm_bytes": target.hbm_bytes,
                   "peak_flops": target.peak_flops,
                   **({"xla_flags": os.environ.get("XLA_FLAGS", "")} if topology in known_gpu_topologies() else {})},
        "model": {"source": model_source, "params": mcfg.num_params}}

    # Compile, then the bytes per chip: the inputs from their shapes and shardings, the rest from XLA.
    step, inputs = train_step_and_inputs(cfg, mcfg, mesh, batches)
    buffers = input_buffers(inputs)
    parts = input_bytes(buffers)
    start = time.perf_counter()
    # A 7B step compiles for minutes: say what, on stderr (stdout holds the report, or its JSON).
    print(f"plan: compiling the {cfg.stage} step for {target.name}, mesh {dict(mesh.shape)}, {rows} x {length} "
          "positions...", file=sys.stderr, flush=True)
    try:
        with jax.set_mesh(mesh), cudnn_checks_for(target):
            compiled = step.lower(inputs.state, inputs.batch, inputs.reference, inputs.hparams).compile()
    except Exception as e:
        oom = out_of_memory(e)
        if oom is None:
            raise
        report["compile_seconds"] = time.perf_counter() - start  # until XLA refused it
        report["memory"] = {**parts, "temporaries_inferred": oom["total"] - sum(parts.values()), "total": oom["total"],
                            "hbm": oom["hbm"], "xla_largest_temporaries": oom["largest"][:5],
                            "xla_error": str(e).strip().splitlines()[0]}
    else:
        report["compile_seconds"] = time.perf_counter() - start
        xla = compiled_bytes(compiled)
        report["memory"] = {**parts, **{k: v for k, v in xla.items() if k not in ("arguments", "sum")},
                            "hbm": target.hbm_bytes}
        if xla["total"] != xla["sum"]:  # XLA:TPU's peak: say what the parts shown add up to beside it
            report["memory"]["sum_of_parts"] = sum(parts.values()) + sum(
                xla[k] for k in ("temporaries", "outputs_not_donated", "code"))
        text = compiled.as_text()
        report["attention"] = attention_kernel(text, mcfg)
    report["memory"]["largest_inputs"] = buffers[:5]

    # Tokens and FLOPs of the mix's batches, counted from what the step computes and from what it had to.
    skips = any(k in report.get("attention", _expected_kernel(mcfg, target, length)) for k in ("splash", "cuDNN"))
    spent = lambda p, pairs, head: step_flops_spent(mcfg, positions=p, attention_pairs=pairs, head_positions=head,
                                                    frozen_reference=frozen, remat=remat, kernel_attention=skips)
    per_batch = []
    for b in batches:
        real = sum(b.sequences)
        per_batch.append(dict(
            real=real, positions=b.batch["inputs"].size, head=b.batch["loss_positions"].size, loss=b.loss_tokens,
            spent=spent(b.batch["inputs"].size, attention_pairs(b.batch, skips), b.batch["loss_positions"].size),
            ideal=spent(real, float(np.sum(np.square(np.asarray(b.sequences, np.float64)))), b.loss_tokens),
            model=step_flops(mcfg, b.sequences, frozen)))
    mean = lambda k: float(np.mean([x[k] for x in per_batch]))
    real = mean("real")
    flops = spent(rows * length, rows * length ** 2, rows * batch["loss_positions"].shape[1])  # the compiled shape
    report["tokens"] = {
        "length_mix": spec + ("" if length_mix_spec else " (default)"), "batches": len(batches),
        "positions_per_step": rows * length, "flops_per_step": flops, "real_tokens_per_step": real,
        "padded_positions_per_step": mean("positions"), "padding_fraction": 1 - real / mean("positions"),
        "loss_tokens_per_step": mean("loss"), "head_positions_per_step": mean("head"),
        "flops_per_real_token": mean("spent") / real, "ideal_flops_per_real_token": mean("ideal") / real,
        "overhead_vs_ideal": mean("spent") / mean("ideal"), "model_flops_per_real_token": mean("model") / real,
        # Per segment: the real sequences' FLOPs, l^2 each as PaLM counts them. The kernels' own work differs: cuDNN
        # computes each segment's causal half, splash the causal block triangle of the whole row.
        "attention_flops_counted": "each segment (l^2)" if skips else "whole rows"}
    # The mesh's chips share the step: config.mesh.num_devices may leave some of the target's out.
    if target.peak_flops:
        report["ideal_step_seconds"] = mean("spent") / (target.peak_flops * mesh.size)
    if "attention" in report:
        report["xla_estimate"] = xla_estimate(compiled, flops, mesh.size, report.get("ideal_step_seconds"))
    report["verdict"] = verdict(report["memory"])
    return report


def _expected_kernel(mcfg, target, length: int) -> str:
    """The attention kernel of a program XLA:TPU refused as out of memory (there is no compiled program to ask),
    for counting its FLOPs."""
    platform = target.devices[0].platform
    if mcfg.attention_impl == "splash" or (mcfg.attention_impl == "auto" and platform == "tpu" and length % 128 == 0):
        return "splash"
    return "cuDNN" if mcfg.attention_impl == "cudnn" else "xla"


def _reference_kind(cfg) -> str | None:
    if cfg.stage != "dpo":
        return None
    if cfg.dpo.reference_free:
        return "none (reference-free)"
    if cfg.dpo.precompute_reference:
        return "precomputed log-probs"
    return f"frozen copy in {cfg.dpo.reference_dtype}"


def memory_changes(cfg, mesh: dict) -> list[tuple[str, Any, str]]:
    """Single config changes that lower a step's bytes per chip, each with what it costs the run: (key, value,
    cost). mesh: the planned mesh's axis sizes. --suggest plans each, so a config that does not fit shows which
    one change makes it fit."""
    changes = []
    if mesh["data"] > 1:  # replicated weights and optimizer state: FSDP shards them over the same devices
        changes.append(("mesh.shape", (1, mesh["data"] * mesh["fsdp"], mesh["tensor"]),
                        "the data axis folded into fsdp: weights gathered layer by layer"))
    if cfg.stage == "dpo" and not cfg.dpo.precompute_reference and not cfg.dpo.reference_free:
        changes.append(("dpo.precompute_reference", True, "one scoring pass before training, the same log-probs"))
    if train.effective_remat(cfg) != "full":  # more micro-batches already recompute every layer
        changes.append(("model.remat", "full", "each layer's forward computed again in the backward pass"))
    if cfg.optim.mu_dtype != "bfloat16":
        changes.append(("optim.mu_dtype", "bfloat16", "Adam's first moment rounded to bf16"))
    changes.append(("train.grad_accum", 2 * cfg.train.grad_accum,  # suggest() doubles it again while that helps
                    "smaller micro-batches, each layer recomputed in the backward pass"))
    return changes


REMAT_BY_RECOMPUTE = ("full", "save_all_but_mlp", "save_dots", "none")  # most recomputed first
_REMAT_KEEPS = {"save_all_but_mlp": "the attention side kept, the MLP recomputed",
                "save_dots": "weight matmul outputs kept, the elementwise ops recomputed",
                "none": "every activation kept, nothing recomputed"}


def speed_changes(cfg) -> list[tuple[str, Any, str]]:
    """Single config changes that lower the FLOPs a step computes, each with what it keeps in memory instead:
    each remat policy that recomputes less than cfg's. --suggest plans them when the run fits: which still fit.
    (Not offload's neighbours, nor with more micro-batches, which recompute every layer whatever the policy.)"""
    remat = cfg.model.remat
    if cfg.train.grad_accum > 1 or remat not in REMAT_BY_RECOMPUTE:
        return []
    return [("model.remat", r, _REMAT_KEEPS[r]) for r in REMAT_BY_RECOMPUTE[REMAT_BY_RECOMPUTE.index(remat) + 1:]]


def suggest(cfg, report: dict, topology: str, length_mix_spec: str | None = None) -> list[dict]:
    """plan() with each of memory_changes applied alone to cfg (planned as `report`): the change, its cost, the
    bytes per chip and the verdict. More micro-batches are doubled again while the run does not fit and the bytes
    keep falling. When no change fits alone, those that lowered the bytes are combined, the most effective first,
    one more at a time until the run fits (rows with "together": True). When the run fits, each of speed_changes
    too, with the FLOPs per real token it would compute (rows with "faster": True)."""
    out = _memory_suggestions(cfg, report, topology, length_mix_spec)
    memory = report["memory"]
    if memory.get("hbm") and memory["total"] <= memory["hbm"]:
        out += [{**_planned_change(cfg, {key: value}, topology, length_mix_spec), "cost": cost, "faster": True}
                for key, value, cost in speed_changes(cfg)]
    return out


def _memory_suggestions(cfg, report: dict, topology: str, length_mix_spec: str | None) -> list[dict]:
    out, lowering = [], []
    for key, value, cost in memory_changes(cfg, report["config"]["mesh"]):
        row = _planned_change(cfg, {key: value}, topology, length_mix_spec)
        while key == "train.grad_accum" and row.get("fits") is False:
            more = _planned_change(cfg, {key: 2 * value}, topology, length_mix_spec)
            if "error" in more or more["total"] >= row["total"]:
                break
            value, row = 2 * value, more
        out.append({**row, "cost": cost})
        if row.get("total", float("inf")) < report["memory"]["total"]:
            lowering.append((row["total"], key, value))
    if not report["memory"].get("hbm") or any(x.get("fits") for x in out) or len(lowering) < 2:
        return out  # (without the device's capacity nothing can be said to fit)
    if any(key == "train.grad_accum" for _, key, _ in lowering):  # it recomputes every layer: remat is moot
        lowering = [t for t in lowering if t[1] != "model.remat"]
    combined = {}
    for _, key, value in sorted(lowering, key=lambda t: t[0]):
        combined[key] = value
        if len(combined) > 1:
            out.append({**_planned_change(cfg, dict(combined), topology, length_mix_spec), "together": True})
            if "error" in out[-1] or out[-1]["fits"]:
                break
    return out


def _planned_change(cfg, changes: dict, topology: str, length_mix_spec: str | None) -> dict:
    """plan() of cfg with `changes` ({flattened key: value}) applied: the flags, and the bytes and verdict or the
    config's error."""
    changed = cfg.copy_and_resolve_references()
    changed.update_from_flattened_dict(changes)
    shown = lambda v: f"'{v}'".replace(" ", "") if isinstance(v, tuple) else v  # as a shell takes it
    row = {"change": " ".join(f"--config.{key}={shown(value)}" for key, value in changes.items())}
    print(f"plan --suggest: {row['change']}", file=sys.stderr, flush=True)
    try:
        planned = plan(changed, topology, length_mix_spec)
    except ValueError as e:  # e.g. a batch that two micro-batches cannot split over the mesh
        return {**row, "error": str(e)}
    total, hbm = planned["memory"]["total"], planned["memory"]["hbm"]
    flops = {"flops_per_real_token": planned["tokens"]["flops_per_real_token"]} if "tokens" in planned else {}
    return {**row, "total": total, "fits": total <= hbm if hbm else None, "verdict": planned["verdict"], **flops}


def verdict(memory: dict) -> str:
    hbm, total = memory.get("hbm"), memory["total"]
    if not hbm:
        return f"needs {total / GiB:.2f} GiB per device (the device's capacity is unknown)"
    if total <= hbm:
        return f"fits with {(hbm - total) / GiB:.2f} GiB free ({total / GiB:.2f} of {hbm / GiB:.2f} GiB per chip)"
    kinds = {k: v for k, v in memory.items() if k in ("parameters", "optimizer_state", "reference", "batch",
                                                      "temporaries", "temporaries_inferred") and v > 0}
    big = sorted(kinds.items(), key=lambda kv: -kv[1])[:3]
    arrays = memory.get("xla_largest_temporaries") or memory["largest_inputs"]
    arrays = ", ".join(f"{name} {size / GiB:.2f} GiB" for name, size in arrays[:3])
    kinds = ", ".join(f"{k.split('_inferred')[0].replace('_', ' ')} {v / GiB:.2f} GiB" for k, v in big)
    over = total - hbm
    over = f"{over / GiB:.2f} GiB" if over >= GiB / 100 else f"{over / 2 ** 20:.1f} MiB"
    return (f"does not fit by {over} ({total / GiB:.2f} of {hbm / GiB:.2f} GiB per chip): "
            f"the largest buffers are {kinds}; largest arrays: {arrays}")


def xla_estimate(compiled, counted_flops: float, chips: int, ideal_seconds: float | None) -> dict:
    """XLA's cost analysis, labelled an estimate and kept only where sane: its FLOPs (with their share of the
    counted FLOPs) when within 4x of the count either way (a lax.scan body, as in gradient accumulation, is counted
    once), the cost model's time when it is no faster than the counted FLOPs at the chips' peak."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends have none
        return {}
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    out = {}
    flops = float(cost.get("flops", -1))
    if 0.25 < flops * chips / counted_flops < 4:
        out.update(flops_per_chip=flops, share_of_counted=flops * chips / counted_flops)
    seconds = float(cost.get("optimal_seconds", -1))
    if 0 < seconds < math.inf and seconds >= (ideal_seconds or 0):
        out["optimal_seconds"] = seconds
    return out


def format_report(r: dict) -> str:
    c, t, m, tok = r["config"], r["target"], r["memory"], r["tokens"]
    gib = lambda b: f"{b / GiB:8.2f} GiB"
    params = r["model"]["params"]
    size = f"{params / 1e9:.2f}B" if params >= 1e8 else f"{params / 1e6:.1f}M"
    unit = "pairs" if c["stage"] == "dpo" else "rows"
    reference = f"; DPO reference: {c['reference']}" if c["reference"] else ""
    lines = [f"plan: {c['stage']} on {t['name']} ({t['chips']} chips), mesh {c['mesh']}"
             + (f", XLA_FLAGS {t['xla_flags']}" if t.get("xla_flags") else ""),
             f"  model: {size} parameters ({r['model']['source']}); {c['param_dtype']} weights, {c['dtype']} compute, "
             f"remat={c['remat']}",
             f"  batch: {c['global_batch_size']} {unit} in {c['rows']} rows x {c['length']} positions (the largest "
             f"of the mix's batches), head at {c['loss_positions']} positions a row, grad_accum {c['grad_accum']}"
             f"{', packed' if c['packing'] else ''}{reference}",
             "  bytes per chip:"]
    for key in ("parameters", "optimizer_state", "reference", "batch", "temporaries", "temporaries_inferred",
                "outputs_not_donated", "code"):
        if m.get(key) or (key in ("parameters", "temporaries") and key in m):
            label = "temporaries (XLA total minus inputs)" if key == "temporaries_inferred" else key.replace("_", " ")
            lines.append(f"    {label:36s}{gib(m[key])}")
    usable = f"  of {gib(m['hbm']).strip()} usable" if m.get("hbm") else ""
    total = "total (XLA:TPU's peak)" if "sum_of_parts" in m else "total"
    lines.append(f"    {total:36s}{gib(m['total'])}{usable}")
    if "sum_of_parts" in m:
        lines.append(f"      (the parts above sum to {m['sum_of_parts'] / GiB:.2f} GiB; XLA:TPU checks its peak "
                     "against HBM)")
    lines.append(f"  verdict: {r['verdict']}")
    lines.append(f"  length mix {tok['length_mix']}, {tok['batches']} batches: {tok['real_tokens_per_step']:,.0f} real "
                 f"tokens in {tok['padded_positions_per_step']:,.0f} positions per step "
                 f"({100 * (1 - tok['padding_fraction']):.1f}% real); LM head at "
                 f"{tok['head_positions_per_step']:,.0f} positions for {tok['loss_tokens_per_step']:,.0f} loss tokens")
    lines.append(f"  FLOPs per real token: {tok['flops_per_real_token']:.3g} computed, "
                 f"{tok['ideal_flops_per_real_token']:.3g} ideal (no padding, head at loss tokens only: "
                 f"{tok['overhead_vs_ideal']:.3f}x), {tok['model_flops_per_real_token']:.3g} model FLOPs (the MFU "
                 f"numerator); attention counted over {tok['attention_flops_counted']}")
    if r.get("ideal_step_seconds"):
        lines.append(f"  step time at 100% of peak: {r['ideal_step_seconds']:.3f} s (of the counted FLOPs; the "
                     "attention kernel's own work is a few % more or less)")
    x = r.get("xla_estimate") or {}
    if "flops_per_chip" in x:
        lines.append(f"  XLA cost analysis (an estimate, not a throughput measure): {x['flops_per_chip']:.3g} FLOPs "
                     f"per chip, {100 * x['share_of_counted']:.0f}% of the counted FLOPs"
                     + (f", {x['optimal_seconds']:.3f} s" if "optimal_seconds" in x else ""))
    if "attention" in r:
        lines.append(f"  attention: {r['attention']}")
    if "xla_error" in m:
        lines.append(f"  XLA:TPU refused the program after {r['compile_seconds']:.1f} s: {m['xla_error']}")
    else:
        lines.append(f"  compiled in {r['compile_seconds']:.1f} s")
    if "suggestions" in r:
        result = lambda x: f"error: {x['error']}" if "error" in x else \
            f"{gib(x['total'])}  {x['verdict'].split(' (')[0]}"
        lines.append("  one change at a time (--suggest):")
        lines += [f"    {x['change']:40s}{result(x)}  [{x['cost']}]" for x in r["suggestions"]
                  if "cost" in x and not x.get("faster")]
        together = [x for x in r["suggestions"] if x.get("together")]
        if together:
            lines.append("  no single change fits; those that lower the bytes, together, most effective first:")
            lines += [f"    {x['change']}\n      {result(x)}" for x in together]
        faster = [x for x in r["suggestions"] if x.get("faster")]
        if faster:
            now = tok["flops_per_real_token"]
            lines.append(f"  less recomputed, FLOPs per real token against {now:.3g} now (memory traffic not counted):")
            flops = lambda x: f"  {x['flops_per_real_token']:.3g} ({x['flops_per_real_token'] / now:.2f}x)" \
                if "flops_per_real_token" in x else ""
            lines += [f"    {x['change']:40s}{result(x)}{flops(x)}  [{x['cost']}]" for x in faster]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line.


def cli():
    from absl import app, flags
    from ml_collections import config_flags

    from zephyr_jax.config_common import parse_flags

    config = config_flags.DEFINE_config_file("config", None, "configs/sft.py or configs/dpo.py, with :VARIANT",
                                             lock_config=True)
    topology = flags.DEFINE_string("topology", "local", f"a TPU slice ({', '.join(known_topologies()[:6])}, ...), "
                                   f"NVIDIA GPUs ({', '.join(known_gpu_topologies()[:4])}, ..., h200-256: up to 8 a "
                                   "host) or 'local' for this job's devices")
    mix = flags.DEFINE_string("length_mix", None, "lognormal:MEDIAN,SIGMA (SFT), lognormal:PROMPT,COMPLETION,SIGMA "
                              "(DPO), or a file of example lengths (see plan.length_mix): real tokens per step")
    as_json = flags.DEFINE_bool("json", False, "print the report as JSON")
    suggestions = flags.DEFINE_bool("suggest", False, "also plan each single config change that lowers the "
                                    "memory (plan.memory_changes): which one makes the step fit; and when it "
                                    "fits, each remat that recomputes less (plan.speed_changes): which still fit")
    flags.mark_flags_as_required(["config"])

    def main(argv):
        if len(argv) > 1:  # `plan ... v5e-64` meant --topology=v5e-64: not a local plan without a word
            sys.exit(f"error: unexpected arguments {argv[1:]}: flags are --name=value")
        if topology.value != "local" and not os.environ.get("JAX_PLATFORMS"):
            jax.config.update("jax_platforms", "cpu")  # a CPU default backend; libtpu only compiles
        if topology.value in known_gpu_topologies() and not os.environ.get("XLA_FLAGS"):
            # Before XLA starts: the flags launch/slurm_gpu.sbatch runs under, so the plan is of that program.
            os.environ["XLA_FLAGS"] = " ".join(xla_flags.GPU)
        try:
            report = plan(config.value, topology.value, mix.value)
            if suggestions.value:
                report["suggestions"] = suggest(config.value, report, topology.value, mix.value)
        except (ValueError, RuntimeError, FileNotFoundError) as e:  # config, topology, a missing compiler plugin
            sys.exit(f"error: {e}")
        print(json.dumps(report, indent=2, default=str) if as_json.value else format_report(report))

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
