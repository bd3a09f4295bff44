"""Losses for dSFT and dDPO: pure, stateless, jit-able functions of arrays.

Three public functions (the design doc's public surface), for anyone holding logits:

* `sequence_logps(logits, targets, loss_mask)`: log pi(y|x) summed over the completion tokens, the quantity
  every preference loss is built from (through logprobs.token_logps: chunked, so neither pass holds a float32
  [B, T, V] log-softmax).
* `sft_loss(logits, targets, loss_mask)`: token-level cross-entropy averaged over every masked token of the
  batch (not a mean of per-sequence means), so micro-batching and sharding reproduce the big-batch value.
* `dpo_loss(...)`: DPO (Rafailov et al. 2023, eq. 7) and its variants on per-sequence log-probabilities:
  conservative DPO / label smoothing (cDPO), robust DPO (Chowdhury et al. 2024), hinge (SLiC, Zhao et al.
  2023) and IPO (Azar et al. 2023, eq. 17). Metrics use TRL's names.

What training runs (train_steps.py): `logprobs.head_logps` (the LM head fused into the chunked log-softmax) at
the loss positions, then `sft_loss_from_logps` (dSFT), or per-sequence sums of those log-probs into `dpo_loss`
(dDPO). A change to the objective goes into those two functions (`sft_loss` is `sft_loss_from_logps` on full
logits; `sequence_logps` the same sum on full logits); a new config.dpo setting reaches `dpo_loss` through
`train_steps.dpo_loss_settings`, which the train step and the eval metrics both call.

Conventions: `targets` are already aligned with `logits` (targets[:, t] is the token that logits[:, t]
predicts); `loss_mask` is 0/1 or bool, and targets at masked positions are never read for the result, so they
may hold anything (a pad id, -100, ...). Every result is float32 whatever the logits dtype.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zephyr_jax import logprobs

LOSS_TYPES = ("sigmoid", "robust", "hinge", "ipo")

# ---------------------------------------------------------------------------------------------------------
# log pi(y | x): the sequence log-likelihood
# ---------------------------------------------------------------------------------------------------------


def _as_mask(loss_mask):
    return jnp.asarray(loss_mask).astype(bool)


def sequence_logps(
    logits: jax.Array, targets: jax.Array, loss_mask: jax.Array, chunk_size: int | None = None
) -> jax.Array:
    """log pi(y | x) = sum over masked positions t of log softmax(logits[b, t])[targets[b, t]], float32 [B].

    This is the sequence log-likelihood in the DPO objective (Rafailov et al. 2023, eq. 7): log-probs summed
    over the completion tokens, with `loss_mask` selecting them. Memory: see `logprobs.token_logps`; neither pass
    materialises a float32 [B, T, V] array besides the gradient itself (which has the logits' dtype).
    Exception: XLA:CPU has no bf16 dynamic-slice and converts bf16 logits to one float32 copy for the loop;
    GPU/TPU slice bf16 natively, and float32 logits (what the model returns) are unaffected.
    """
    mask = _as_mask(loss_mask)
    logprobs.check_shapes(jnp.asarray(logits), jnp.asarray(targets), mask)
    logps = logprobs.token_logps(logits, targets, chunk_size)
    return jnp.sum(jnp.where(mask, logps, 0.0), axis=-1)


# ---------------------------------------------------------------------------------------------------------
# dSFT: token cross-entropy
# ---------------------------------------------------------------------------------------------------------


def sft_loss_from_logps(logps: jax.Array, loss_mask: jax.Array, normalizer=None) -> jax.Array:
    """-sum_{masked} logps / normalizer (default: the number of masked tokens; either is clamped to at least 1):
    the cross-entropy of `sft_loss` from per-token log-probs, e.g. the train step's (logprobs.head_logps)."""
    mask = _as_mask(loss_mask)
    denom = jnp.sum(mask, dtype=jnp.float32) if normalizer is None else jnp.asarray(normalizer, jnp.float32)
    return -jnp.sum(jnp.where(mask, logps, 0.0)) / jnp.maximum(denom, 1.0)


def sft_loss(
    logits: jax.Array,
    targets: jax.Array,
    loss_mask: jax.Array,
    normalizer: jax.Array | float | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-level cross-entropy: -sum_{masked b,t} log p(targets[b,t]) / normalizer.

    By default the normalizer is the number of masked tokens in this batch, i.e. the mean over every
    supervised token of the batch (a long sequence weighs more than a short one; this is not a mean of
    per-sequence means). That mean is what one big batch gives, so:

    * sharding the batch over devices changes nothing (the sums are global under jit);
    * for gradient accumulation, pass `normalizer` = the number of masked tokens of the whole global batch
      (sum of `loss_mask` over all micro-batches) to every micro-batch and *sum* the micro-batch losses and
      gradients: the result equals the full-batch loss and gradient exactly (up to float rounding).

    An all-masked batch gives loss 0 (the normalizer is clamped to at least 1).

    Returns (loss, metrics) with metrics {"loss", "token_accuracy" (argmax == target over this batch's
    masked tokens), "num_tokens" (this batch's masked tokens)}. Metrics carry no gradient.
    """
    mask = _as_mask(loss_mask)
    logits = jnp.asarray(logits)
    logprobs.check_shapes(logits, jnp.asarray(targets), mask)
    loss = sft_loss_from_logps(logprobs.token_logps(logits, targets, chunk_size), mask, normalizer)
    num_tokens = jnp.sum(mask, dtype=jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == targets) & mask
    metrics = {
        "loss": jax.lax.stop_gradient(loss),
        "token_accuracy": jnp.sum(correct, dtype=jnp.float32) / jnp.maximum(num_tokens, 1.0),
        "num_tokens": num_tokens,
    }
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# dDPO: preference losses on sequence log-probabilities
# ---------------------------------------------------------------------------------------------------------


def _is_static_number(x: Any) -> bool:
    """A number known now: Python's, numpy's, or a concrete jax scalar (np.float32(0) skipped the check)."""
    if isinstance(x, bool) or isinstance(x, jax.core.Tracer):
        return False
    return isinstance(x, (int, float, np.number)) or (isinstance(x, (np.ndarray, jax.Array)) and x.ndim == 0)


def check_dpo_settings(loss_type: str, beta=0.1, label_smoothing=0.0) -> None:
    """Raises ValueError for a loss type, beta or label smoothing dpo_loss does not define (traced values pass:
    their range is the caller's to check)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {', '.join(LOSS_TYPES)}")
    # inf (or past float32's range, where the loss computes): inf x the first step's margin of 0 is NaN
    if _is_static_number(beta) and not 0 < float(beta) <= float(np.finfo(np.float32).max):
        raise ValueError(f"beta must be positive and finite, got {beta}")
    if _is_static_number(label_smoothing):
        eps = float(label_smoothing)
        if loss_type == "robust" and not 0.0 <= eps < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5) for loss_type='robust', got {eps}")
        if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5] for loss_type='sigmoid', got {eps}")
        if loss_type not in ("sigmoid", "robust") and eps != 0.0:  # the only two that smooth labels
            raise ValueError(f"loss_type={loss_type!r} does not use label_smoothing; got {eps}, expected 0")


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    reference_chosen_logps: jax.Array,
    reference_rejected_logps: jax.Array,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    reference_free: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Preference loss on [B] sequence log-probabilities; returns (mean loss over the batch, metrics).

    Let pc, pr be the policy's log pi(y_w|x), log pi(y_l|x) (summed over completion tokens, see
    `sequence_logps`), rc, rr the reference model's, and the implicit-reward margin

        z = (pc - rc) - (pr - rr).

    With eps = `label_smoothing` and b = `beta`, per example:

    * "sigmoid" (DPO, Rafailov et al. 2023, eq. 7): -log sigma(b z). With eps > 0 this is conservative DPO
      (cDPO, Mitchell 2023: the preference label is flipped with probability eps):
      -(1 - eps) log sigma(b z) - eps log sigma(-b z). eps must lie in [0, 0.5].
    * "robust" (robust DPO, Chowdhury et al. 2024, the unbiased loss under label-flip rate eps):
      (-(1 - eps) log sigma(b z) + eps log sigma(-b z)) / (1 - 2 eps). eps must lie in [0, 0.5).
    * "hinge" (SLiC-HF, Zhao et al. 2023, calibration hinge with delta = 1/b): relu(1 - b z).
    * "ipo" (IPO, Azar et al. 2023, eq. 17, in TRL's form with log-ratios averaged per completion token):
      ((pc - rc) / |y_w| - (pr - rr) / |y_l| - 1 / (2 b))^2. Needs `chosen_lengths` and `rejected_lengths`
      ([B] numbers of completion tokens, i.e. the loss_mask sums; clamped to at least 1).

    `reference_free=True` drops the reference model (rc = rr = 0). "hinge" and "ipo" take no label smoothing.

    Metrics (TRL's names; computed without gradient, means over the batch): "loss"; "rewards/chosen" =
    mean b(pc - rc); "rewards/rejected" = mean b(pr - rr); "rewards/accuracies" = mean(chosen reward >
    rejected reward), strict, so ties count as wrong; "rewards/margins" = mean(chosen - rejected reward);
    "logps/chosen" = mean pc; "logps/rejected" = mean pr. For "ipo" the rewards stay b times the *summed*
    log-ratios, as for the other losses.
    """
    check_dpo_settings(loss_type, beta, label_smoothing)
    if loss_type == "ipo" and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(
            "loss_type='ipo' averages log-ratios per completion token: pass chosen_lengths and "
            "rejected_lengths (the number of completion tokens of each chosen / rejected sequence, [B])"
        )

    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
    pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
    if reference_free:
        rc, rr = jnp.zeros_like(pc), jnp.zeros_like(pr)
    else:
        rc, rr = f32(reference_chosen_logps), f32(reference_rejected_logps)
    shapes = {x.shape for x in (pc, pr, rc, rr)}
    if len(shapes) != 1 or pc.ndim != 1:
        raise ValueError(
            "policy/reference chosen/rejected logps must all be [batch], got shapes "
            f"{pc.shape}, {pr.shape}, {rc.shape}, {rr.shape}"
        )
    beta = f32(beta)
    eps = f32(label_smoothing)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    z = chosen_ratio - rejected_ratio

    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * jax.nn.log_sigmoid(beta * z) - eps * jax.nn.log_sigmoid(-beta * z)
    elif loss_type == "robust":
        # Both weights from a Python number in float64: in float32, 1 - 2 eps loses its digits as eps nears 0.5
        # (eps = 0.49999999 rounds to 0.5, a division by zero), where TRL's Python float does not.
        e = float(label_smoothing) if _is_static_number(label_smoothing) else eps
        keep, flip = f32((1.0 - e) / (1.0 - 2.0 * e)), f32(e / (1.0 - 2.0 * e))
        losses = -keep * jax.nn.log_sigmoid(beta * z) + flip * jax.nn.log_sigmoid(-beta * z)
    elif loss_type == "hinge":
        losses = jax.nn.relu(1.0 - beta * z)
    elif loss_type == "ipo":
        len_w, len_l = f32(chosen_lengths), f32(rejected_lengths)
        if len_w.shape != pc.shape or len_l.shape != pc.shape:  # [B, T] masks broadcast into a wrong loss
            raise ValueError(f"chosen_lengths / rejected_lengths must be [batch] {pc.shape} (each sequence's "
                             f"completion token count), got {len_w.shape}, {len_l.shape}")
        len_w, len_l = jnp.maximum(len_w, 1.0), jnp.maximum(len_l, 1.0)
        losses = (chosen_ratio / len_w - rejected_ratio / len_l - 1.0 / (2.0 * beta)) ** 2
    else:  # a name added to LOSS_TYPES without its formula here
        raise NotImplementedError(f"loss_type {loss_type!r} is in LOSS_TYPES but dpo_loss has no branch for it")
    loss = jnp.mean(losses)

    sg = jax.lax.stop_gradient
    chosen_rewards, rejected_rewards = sg(beta * chosen_ratio), sg(beta * rejected_ratio)
    metrics = {
        "loss": sg(loss),
        "rewards/chosen": jnp.mean(chosen_rewards),
        "rewards/rejected": jnp.mean(rejected_rewards),
        "rewards/accuracies": jnp.mean((chosen_rewards > rejected_rewards).astype(jnp.float32)),
        "rewards/margins": jnp.mean(chosen_rewards - rejected_rewards),
        "logps/chosen": jnp.mean(sg(pc)),
        "logps/rejected": jnp.mean(sg(pr)),
    }
    return loss, metrics
