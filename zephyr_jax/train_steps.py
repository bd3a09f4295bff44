"""The pure, jit-compiled pieces of training: loss functions, the train step, and evaluation passes.

Parameters travel as an nnx.State (a pytree of arrays); `nnx.merge(graphdef, params)` rebuilds the model inside
jit at no cost. Batches are dicts of [B, ...] arrays from zephyr_jax/data/batches.py; DPO batches are
[B, 2, T] (chosen, rejected), folded to [2B, T] for one forward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from zephyr_jax import losses
from zephyr_jax.sharding import DEFAULT_RULES, constrain


class TrainState(NamedTuple):
    params: nnx.State
    opt_state: optax.OptState
    step: jax.Array


def make_optimizer(optim_cfg, total_steps: int):
    """AdamW with linear warmup then cosine or linear decay to 0, sized on the real number of optimizer steps."""
    warmup = int(round(optim_cfg.warmup_ratio * total_steps))
    if optim_cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(0.0, optim_cfg.lr, warmup, max(total_steps, warmup + 1))
    elif optim_cfg.schedule == "linear":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup),
                                         optax.linear_schedule(optim_cfg.lr, 0.0, max(total_steps - warmup, 1))],
                                        [warmup])
    elif optim_cfg.schedule == "constant":
        schedule = optax.join_schedules([optax.linear_schedule(0.0, optim_cfg.lr, warmup),
                                         optax.constant_schedule(optim_cfg.lr)], [warmup])
    else:
        raise ValueError(f"optim.schedule={optim_cfg.schedule!r}: expected cosine, linear or constant")
    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity(),
        optax.adamw(schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps,
                    weight_decay=optim_cfg.weight_decay))
    return tx, schedule


def forward(graphdef, params, batch):
    """Logits [rows, T, V] for a batch of rows [rows, T]."""
    model = nnx.merge(graphdef, params)
    return model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])


def fold_pairs(batch):
    """[B, 2, T] -> [2B, T] (chosen and rejected of a pair stay adjacent)."""
    return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items() if v.ndim >= 3}


def pair_logps(graphdef, params, batch) -> jax.Array:
    """Summed completion log-probs [B, 2] (chosen, rejected) of a preference batch, in one forward pass."""
    rows = fold_pairs(batch)
    logps = losses.sequence_logps(forward(graphdef, params, rows), rows["targets"], rows["loss_mask"])
    return logps.reshape(-1, 2)


def sft_loss_fn(params, graphdef, batch, normalizer):
    logits = forward(graphdef, params, batch)
    return losses.sft_loss(logits, batch["targets"], batch["loss_mask"], normalizer=normalizer)


def dpo_loss_fn(params, graphdef, batch, reference_logps, dpo_cfg):
    policy = pair_logps(graphdef, params, batch)
    lengths = batch["loss_mask"].sum(axis=-1)
    return losses.dpo_loss(policy[:, 0], policy[:, 1], reference_logps[:, 0], reference_logps[:, 1],
                           beta=dpo_cfg.beta, loss_type=dpo_cfg.loss_type, label_smoothing=dpo_cfg.label_smoothing,
                           chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
                           reference_free=dpo_cfg.reference_free)


def split_micro(batch, n: int):
    """[B, ...] -> [n, B/n, ...]; micro-batch i takes rows i, i+n, ..., so each device's contiguous block of
    rows feeds every micro-batch and micro-batches stay evenly sharded."""
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1), batch)


# optax renamed tree_l2_norm to tree_norm in 0.2.5; take whichever this install has.
_tree_norm = getattr(optax.tree_utils, "tree_norm", None) or optax.tree_utils.tree_l2_norm


def make_train_step(stage: str, graphdef, tx, schedule, grad_accum: int, dpo_cfg=None, rules=DEFAULT_RULES):
    """train_step(state, batch, reference) -> (state, metrics). reference: DPO only, either frozen reference
    parameters (an nnx.State) or None when the batch carries precomputed "reference_logps" [B, 2].
    rules: the logical-axis rules that shard each micro-batch's rows (under `jax.set_mesh`)."""

    def micro_loss(params, micro, reference, normalizer):
        micro = jax.tree.map(lambda x: constrain(x, ("batch",) + (None,) * (x.ndim - 1), rules), micro)
        if stage == "sft":
            loss, metrics = sft_loss_fn(params, graphdef, micro, normalizer)
            metrics = {"loss": loss, "correct": metrics["token_accuracy"] * metrics["num_tokens"],
                       "num_tokens": metrics["num_tokens"]}
            return loss, metrics
        if "reference_logps" in micro:
            ref = micro["reference_logps"]
        elif dpo_cfg.reference_free:
            ref = jnp.zeros(micro["inputs"].shape[:2], jnp.float32)
        else:
            ref = jax.lax.stop_gradient(pair_logps(graphdef, reference, micro))
        loss, metrics = dpo_loss_fn(params, graphdef, micro, ref, dpo_cfg)
        return loss / grad_accum, {k: v / grad_accum for k, v in metrics.items()}  # means of equal-sized parts

    def train_step(state: TrainState, batch, reference):
        normalizer = jnp.maximum(batch["loss_mask"].sum(), 1).astype(jnp.float32) if stage == "sft" else None
        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

        def accumulate(grads, micro):
            (_, metrics), g = grad_fn(state.params, micro, reference, normalizer)
            return jax.tree.map(jnp.add, grads, g), metrics

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, metrics = jax.lax.scan(accumulate, zeros, split_micro(batch, grad_accum))
        metrics = jax.tree.map(jnp.sum, metrics)
        if stage == "sft":
            metrics["token_accuracy"] = metrics.pop("correct") / jnp.maximum(metrics["num_tokens"], 1)
        metrics["grad_norm"] = _tree_norm(grads)
        metrics["lr"] = schedule(state.step)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state, state.step + 1), metrics

    return train_step


# --- Evaluation and reference passes: per-example numbers, aggregated on the host. ---

def make_eval_fn(stage: str, graphdef):
    """SFT: per-row (sum of target NLL, tokens, correct tokens). DPO: pair log-probs [B, 2]."""

    def sft_eval(params, batch):
        logits = forward(graphdef, params, batch)
        mask = batch["loss_mask"].astype(bool)
        logps = losses.token_logps(logits, batch["targets"])
        correct = (jnp.argmax(logits, axis=-1) == batch["targets"]) & mask
        return {"nll": -jnp.sum(jnp.where(mask, logps, 0.0), axis=-1), "tokens": mask.sum(-1),
                "correct": correct.sum(-1)}

    def dpo_eval(params, batch):
        return {"logps": pair_logps(graphdef, params, batch)}

    return jax.jit(sft_eval if stage == "sft" else dpo_eval)


def to_host(tree):
    """Global arrays -> numpy on every process (an all-gather when the array spans several processes)."""
    from jax.experimental import multihost_utils

    def fetch(x):
        if jax.process_count() == 1 or x.is_fully_replicated:
            return np.asarray(jax.device_get(x))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(fetch, tree)


def run_eval_batches(eval_fn, params, batches, place) -> dict:
    """Concatenates eval_fn outputs over batches ((batch dict, number of real rows) pairs)."""
    out = {}
    for batch, real in batches:
        result = to_host(eval_fn(params, place(batch)))
        for k, v in result.items():
            out.setdefault(k, []).append(np.asarray(v)[:real])
    return {k: np.concatenate(v) for k, v in out.items()}


def sft_eval_metrics(out) -> dict:
    tokens = max(int(out["tokens"].sum()), 1)
    return {"loss": float(out["nll"].sum() / tokens), "token_accuracy": float(out["correct"].sum() / tokens),
            "num_tokens": int(out["tokens"].sum())}


def dpo_eval_metrics(policy, reference, lengths, dpo_cfg) -> dict:
    """DPO metrics over a whole split (one call over every pair, so they are exact means)."""
    loss, metrics = losses.dpo_loss(jnp.asarray(policy[:, 0]), jnp.asarray(policy[:, 1]),
                                    jnp.asarray(reference[:, 0]), jnp.asarray(reference[:, 1]),
                                    beta=dpo_cfg.beta, loss_type=dpo_cfg.loss_type,
                                    label_smoothing=dpo_cfg.label_smoothing, chosen_lengths=jnp.asarray(lengths[:, 0]),
                                    rejected_lengths=jnp.asarray(lengths[:, 1]), reference_free=dpo_cfg.reference_free)
    return {k: float(v) for k, v in metrics.items()}
