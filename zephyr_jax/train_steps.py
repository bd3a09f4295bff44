"""The pure, jit-compiled pieces of training: loss functions, the train step, and evaluation passes.

Parameters travel as an nnx.State (a pytree of arrays); `nnx.merge(graphdef, params)` rebuilds the model inside
jit at no cost. Batches are dicts of [rows, ...] arrays from zephyr_jax/data/batches.py. A DPO batch packs each
pair's chosen and rejected sequences as segments of its rows; "sequence_pair" maps a row's segment slots to
(pair, side), so per-sequence log-probs are summed by segment and regrouped into [pairs, 2] (`per_pair`).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zephyr_jax import logprobs, losses
from zephyr_jax.sharding import DEFAULT_RULES, constrain


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array


SCHEDULES = ("cosine", "linear", "constant")  # optim.schedule


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup, then cosine or linear decay to 0 or a constant rate (optim.schedule), sized on the real
    number of optimizer steps. Warmup is joined by hand: optax.warmup_constant_schedule(0, lr, 0) gives 0 at every
    step, and a warmup_ratio of 0 must give lr from the first step."""
    warmup = math.ceil(optim_cfg.warmup_ratio * total_steps)  # as transformers' TrainingArguments rounds it
    if optim_cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, optim_cfg.lr, warmup, max(total_steps, warmup + 1))
    if optim_cfg.schedule == "linear":
        return optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup),
                                     optax.linear_schedule(optim_cfg.lr, 0.0, max(total_steps - warmup, 1))],
                                    [warmup])
    if optim_cfg.schedule == "constant":
        return optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup),
                                     optax.constant_schedule(optim_cfg.lr)], [warmup])
    raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: expected one of {SCHEDULES}")


def make_optimizer(optim_cfg, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Gradient clipping, then AdamW at the rates `schedule` gives. Its state has optax.adamw's structure whatever
    the schedule: the train step builds it again with its own argument as the rate (make_train_step)."""
    adamw = optax.chain(  # optax.adamw's three steps, its decay on decayed_weights only
        optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                            mu_dtype=jnp.dtype(optim_cfg.mu_dtype)),
        decay_weights(optim_cfg.weight_decay),
        optax.scale_by_learning_rate(schedule))
    clip = optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, adamw)


def learning_rates(schedule: optax.Schedule, total_steps: int) -> np.ndarray:
    """The rate of each of a run's steps (0-based, as optax counts them), computed once, as one small program."""
    return np.asarray(jax.jit(jax.vmap(schedule))(np.arange(total_steps)), np.float32)


def step_hparams(cfg, lr) -> dict:
    """The float settings a train step takes as arguments, not as constants of its program, so a run with another
    learning rate, schedule length or DPO beta (a sweep, or a resume that changes them) reuses the compiled step:
    this step's rate and, for dDPO, the loss's beta. (dpo.label_smoothing stays a constant: the robust loss
    weighs by 1 / (1 - 2 eps) from the Python float, which float32 would round to a division by 0 near 0.5.)"""
    hparams = {"lr": np.float32(lr)}
    if cfg.stage == "dpo":
        hparams["beta"] = np.float32(cfg.dpo.beta)
    return hparams


def decayed_weights(params):
    """Weight decay's mask: every parameter but the RMSNorm scales, as transformers' Trainer (and so TRL) decays
    every weight but biases and norms (Trainer.get_decay_parameter_names)."""
    is_norm = lambda path: any(str(getattr(k, "key", "")).endswith("norm") for k in path)  # noqa: E731
    return jax.tree_util.tree_map_with_path(lambda path, _: not is_norm(path), params)


def decay_weights(rate: float) -> optax.GradientTransformation:
    """AdamW's decoupled decay, updates + rate * params, on decayed_weights(params). Stateless, as optax's unmasked
    add_decayed_weights: its masked form keeps a MaskedState, so a checkpoint saved before would not restore, nor
    one resumed with another weight_decay (a change resuming allows)."""

    def decay(updates, params):
        if rate == 0:
            return updates
        return jax.tree.map(lambda u, p, d: u + rate * p if d else u, updates, params, decayed_weights(params))

    return optax.stateless(decay)


def loss_position_logps(graphdef, params, batch, max_segments: int | None = None, layer_grad_sum=None):
    """Log-probs of the targets at each row's loss positions, the LM head applied there only (fused with the
    log-softmax, chunked: logprobs.head_logps). Returns (logps, correct, valid, segment), each [rows, K]: valid
    marks real entries of batch["loss_positions"] (-1 fills the rest), segment is their segment id.
    layer_grad_sum: gradient accumulation's running sum for params["layers"] (model/accumulate.py)."""
    model = nnx.merge(graphdef, params)
    hidden = model.hidden_states(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"],
                                 max_segments=segments_per_row(batch, max_segments), grad_sum=layer_grad_sum)
    where = batch["loss_positions"]
    valid = where >= 0
    where = jnp.maximum(where, 0)
    pick = lambda x: jnp.take_along_axis(x, where, axis=1)
    hidden = jnp.take_along_axis(hidden, where[..., None], axis=1)
    logps, correct = logprobs.head_logps(hidden, model.head_kernel(), pick(batch["targets"]))
    return jnp.where(valid, logps, 0.0), correct & valid, valid, pick(batch["segment_ids"])


def segments_per_row(batch, known: int | None = None) -> int:
    """The most sequences a row of this batch can hold, static under jit (the GPU kernel needs it): a DPO row's
    segment slots; for SFT `known` (1 for rows of one example), else half the row length (every example takes
    at least two positions)."""
    if "sequence_pair" in batch:
        return batch["sequence_pair"].shape[1]
    return known or max(1, batch["inputs"].shape[1] // 2)


def segment_sums(values, segment, slots: int):
    """[rows, K] values summed per segment slot (segment id s + 1 -> slot s): [rows, slots]. A masked sum, not a
    one-hot matmul: at default precision a TPU matmul rounds its float32 inputs to bfloat16 (a GPU's to TF32),
    which put ~0.1 nats of noise into each 400-token sequence's log-prob."""
    one_hot = segment[..., None] == jnp.arange(1, slots + 1)
    return jnp.where(one_hot, values.astype(jnp.float32)[..., None], 0.0).sum(axis=1)


def per_pair(slot_values, sequence_pair, num_pairs: int, micro_batches: int = 1):
    """[rows, slots] per-sequence values -> [num_pairs, 2] (chosen, rejected), through "sequence_pair"
    (2 * pair + side in the global batch, -1 empty). In micro-batch m of n, pair p is local pair p // n."""
    pair, side = sequence_pair // 2, sequence_pair % 2
    index = jnp.where(sequence_pair >= 0, 2 * (pair // micro_batches) + side, 2 * num_pairs)  # -1: dropped
    table = jax.ops.segment_sum(slot_values.reshape(-1), index.reshape(-1), num_segments=2 * num_pairs)
    return table.reshape(num_pairs, 2)


def pair_logps(graphdef, params, batch, num_pairs: int, micro_batches: int = 1, layer_grad_sum=None):
    """(summed completion log-probs, completion lengths), each [num_pairs, 2] (chosen, rejected)."""
    logps, _, valid, segment = loss_position_logps(graphdef, params, batch, layer_grad_sum=layer_grad_sum)
    slots = batch["sequence_pair"].shape[1]
    table = lambda x: per_pair(segment_sums(x, segment, slots), batch["sequence_pair"], num_pairs, micro_batches)
    return table(logps), table(valid)


def sft_loss_fn(params, graphdef, batch, normalizer, max_segments=None, layer_grad_sum=None):
    """losses.sft_loss's token cross-entropy, on the loss positions only."""
    logps, correct, valid, _ = loss_position_logps(graphdef, params, batch, max_segments, layer_grad_sum)
    loss = losses.sft_loss_from_logps(logps, valid, normalizer)
    return loss, {"loss": jax.lax.stop_gradient(loss), "correct": correct.sum(dtype=jnp.float32),
                  "num_tokens": valid.sum(dtype=jnp.float32)}


def dpo_loss_settings(dpo_cfg) -> dict:
    """losses.dpo_loss's keyword settings from config.dpo, beta aside (the train step's argument): the one place
    the train step and the eval metrics read them, so a setting added here reaches both."""
    return dict(loss_type=dpo_cfg.loss_type, label_smoothing=dpo_cfg.label_smoothing,
                reference_free=dpo_cfg.reference_free)


def dpo_loss_fn(params, graphdef, batch, reference_logps, dpo_cfg, num_pairs: int, micro_batches: int,
                layer_grad_sum=None, hparams=None):
    """losses.dpo_loss on the batch's pairs. beta: hparams' (the train step's argument), else dpo_cfg's."""
    beta = dpo_cfg.beta if hparams is None else hparams["beta"]
    policy, lengths = pair_logps(graphdef, params, batch, num_pairs, micro_batches, layer_grad_sum)
    return losses.dpo_loss(policy[:, 0], policy[:, 1], reference_logps[:, 0], reference_logps[:, 1], beta=beta,
                           chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1], **dpo_loss_settings(dpo_cfg))


def split_micro(batch, n: int):
    """[B, ...] -> [n, B/n, ...]; micro-batch i takes rows i, i+n, ..., so each device's contiguous block of
    rows feeds every micro-batch and micro-batches stay evenly sharded."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


# optax renamed tree_l2_norm to tree_norm in 0.2.5; take whichever this install has.
_tree_norm = getattr(optax.tree_utils, "tree_norm", None) or optax.tree_utils.tree_l2_norm


def make_train_step(stage: str, graphdef, optimizer, grad_accum: int, dpo_cfg=None, rules=DEFAULT_RULES,
                    num_pairs: int | None = None, max_segments: int | None = None):
    """train_step(state, batch, reference, hparams) -> (state, metrics). reference: DPO only, either frozen
    reference parameters (an nnx.State) or None when the batch carries precomputed per-sequence "reference_logps".
    hparams: step_hparams(cfg, rate of this step). optimizer: schedule -> optax transformation (train.py:
    make_optimizer with the config's optim), called in the step with the constant schedule hparams["lr"].
    num_pairs: DPO pairs per global batch. max_segments: SFT, the most sequences a row holds
    (train.max_segments(cfg, rows): 1 for unpacked rows).
    rules: the logical-axis rules that shard each micro-batch's rows (under `jax.set_mesh`)."""

    def micro_loss(params, micro, reference, normalizer, layer_grad_sum, hparams):
        micro = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1), rules), micro)
        if stage == "sft":
            return sft_loss_fn(params, graphdef, micro, normalizer, max_segments, layer_grad_sum)
        pairs = num_pairs // grad_accum
        if "reference_logps" in micro:
            ref = per_pair(micro["reference_logps"], micro["sequence_pair"], pairs, grad_accum)
        elif dpo_cfg.reference_free:
            ref = jnp.zeros((pairs, 2), jnp.float32)
        else:
            ref = jax.lax.stop_gradient(pair_logps(graphdef, reference, micro, pairs, grad_accum)[0])
        loss, metrics = dpo_loss_fn(params, graphdef, micro, ref, dpo_cfg, pairs, grad_accum, layer_grad_sum,
                                    hparams)
        return loss / grad_accum, {k: v / grad_accum for k, v in metrics.items()}  # means of equal-sized parts

    def train_step(state: TrainState, batch, reference, hparams):
        # SFT: the mean over every token with a loss in the global batch (-1 fills loss_positions past a row's own)
        normalizer = jnp.maximum((batch["loss_positions"] >= 0).sum(), 1).astype(jnp.float32) \
            if stage == "sft" else None
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(grads, micro):
            if grad_accum == 1:
                (_, metrics), g = grad_fn(state.params, micro, reference, normalizer, None, hparams)
                return jax.tree.map(jnp.add, grads, g), metrics
            # The layers' backward adds into grads["layers"] in place and returns the sum (model/accumulate.py):
            # one float32 tree of layer gradients, not a micro-batch's beside the running sum.
            (_, metrics), g = grad_fn(state.params, micro, reference, normalizer, grads["layers"], hparams)
            add = lambda path, total, new: new if path[0].key == "layers" else total + new
            return jax.tree_util.tree_map_with_path(add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, metrics = jax.lax.scan(accumulate, zeros, split_micro(batch, grad_accum))
        metrics = jax.tree.map(jnp.sum, metrics)
        if stage == "sft":
            metrics["token_accuracy"] = metrics.pop("correct") / jnp.maximum(metrics["num_tokens"], 1)
        metrics["grad_norm"] = _tree_norm(grads)
        metrics["lr"] = hparams["lr"]
        tx = optimizer(lambda _: hparams["lr"])  # the rate is an argument: no schedule's constants in the program
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), metrics

    return train_step


# --- Evaluation and reference passes: per-example numbers, aggregated on the host. ---

@functools.lru_cache(maxsize=8)  # models of one architecture share the jitted function: a batch shape compiles once
def make_eval_fn(stage: str, graphdef, num_pairs: int | None = None, max_segments: int | None = 1):
    """SFT: per-row (sum of target NLL, tokens, correct tokens) of rows holding up to max_segments examples
    (train.max_segments(cfg, rows)). DPO: pair log-probs [num_pairs, 2] (the pairs of an eval batch, in order; a
    batch of fewer pairs, a split smaller than train.eval_batch_size, leaves zeros after them, which
    run_eval_batches drops; a batch of more is its ValueError)."""

    def sft_eval(params, batch):
        logps, correct, valid, _ = loss_position_logps(graphdef, params, batch, max_segments=max_segments)
        return {"nll": -logps.sum(-1), "tokens": valid.sum(-1), "correct": correct.sum(-1)}

    def dpo_eval(params, batch):
        return {"logps": pair_logps(graphdef, params, batch, num_pairs)[0]}

    eval_fn = jax.jit(sft_eval if stage == "sft" else dpo_eval)
    # per_pair's segment_sum drops pairs past num_pairs without a word, and a packed batch's shapes do not give its
    # pair count: run_eval_batches checks each batch's on the host, before the call
    eval_fn.num_pairs = num_pairs if stage == "dpo" else None
    return eval_fn


def to_host(tree):
    """Global arrays -> numpy on every process (an all-gather when the array spans several processes). The arrays
    this process holds whole come in one round trip, every copy started before any is waited on (a fetch an array
    waited 120 times in turn for a log line of 10 steps' metrics)."""
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(tree)
    spread = [jax.process_count() > 1 and not x.is_fully_replicated for x in leaves]
    local = iter(jax.device_get([x for x, s in zip(leaves, spread) if not s]))
    return jax.tree.unflatten(treedef, [np.asarray(multihost_utils.process_allgather(x, tiled=True) if s
                                                   else next(local)) for x, s in zip(leaves, spread)])


def run_eval_batches(eval_fn, params, batches, place) -> dict:
    """Concatenates eval_fn outputs over batches ((batch dict, number of real rows) pairs). A batch's outputs are
    fetched once the next batch is built, placed and queued: the device runs one while the host makes the next. A DPO
    batch of more pairs than eval_fn was made for is a ValueError before its call (check_pair_count)."""
    out, queued = {}, None

    def fetch(outputs, real):
        for k, v in to_host(outputs).items():
            out.setdefault(k, []).append(np.asarray(v)[:real])

    for batch, real in batches:
        check_pair_count(eval_fn, batch)
        outputs = eval_fn(params, place(batch))
        if queued is not None:
            fetch(*queued)
        queued = outputs, real
    if queued is not None:
        fetch(*queued)
    return {k: np.concatenate(v) for k, v in out.items()}


def check_pair_count(eval_fn, batch) -> None:
    """A DPO batch (host arrays: the rows this process built) of more pairs than its eval function was made for
    is a ValueError: the log-probs of the pairs past them would be dropped."""
    made_for = getattr(eval_fn, "num_pairs", None)
    if made_for is None or not batch["sequence_pair"].size:
        return
    pairs = int(batch["sequence_pair"].max()) // 2 + 1
    if pairs > made_for:
        raise ValueError(f"an eval batch of {pairs} pairs for an eval function made for {made_for} "
                         f"(make_eval_fn's num_pairs): the pairs past the first {made_for} would be dropped")


def sft_eval_metrics(out) -> dict:
    tokens = max(int(out["tokens"].sum()), 1)
    return {"loss": float(out["nll"].sum() / tokens), "token_accuracy": float(out["correct"].sum() / tokens),
            "num_tokens": int(out["tokens"].sum())}


def dpo_eval_metrics(policy, reference, lengths, dpo_cfg) -> dict:
    """DPO metrics over a whole split (one call over every pair, so they are exact means)."""
    loss, metrics = losses.dpo_loss(jnp.asarray(policy[:, 0]), jnp.asarray(policy[:, 1]),
                                    jnp.asarray(reference[:, 0]), jnp.asarray(reference[:, 1]), beta=dpo_cfg.beta,
                                    chosen_lengths=jnp.asarray(lengths[:, 0]),
                                    rejected_lengths=jnp.asarray(lengths[:, 1]), **dpo_loss_settings(dpo_cfg))
    return {k: float(v) for k, v in metrics.items()}
