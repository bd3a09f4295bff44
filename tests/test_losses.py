"""zephyr_jax.losses, and the logprobs.token_logps / head_logps they are built from, against independent
references: torch float64 log-softmax / cross-entropy, an unchunked JAX log-softmax, float64 numpy versions of the
DPO-family formulas (the DPO paper's eq. 7, IPO's eq. 17, TRL's hinge and robust losses), and
hand-computed cases."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.xla_memory import temp_bytes
from zephyr_jax import logprobs, losses

IGNORE = -100


def _random_batch(seed, batch=3, length=45, vocab=97, scale=3.0):
    """Logits, targets and a right-padded mask; targets at masked positions hold junk (-100 or >= vocab)."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((batch, length, vocab)) * scale).astype(np.float32)
    targets = rng.integers(0, vocab, (batch, length))
    lengths = rng.integers(1, length + 1, batch)
    lengths[0] = length  # one row with no padding at all
    mask = np.arange(length)[None, :] < lengths[:, None]
    mask[1, :2] = False  # a masked prompt prefix, as in DPO batches
    junk = np.where(rng.random((batch, length)) < 0.5, IGNORE, vocab + 3)
    targets = np.where(mask, targets, junk).astype(np.int32)
    return logits, targets, mask


def _torch_sequence_logps(logits, targets, mask, weights=None):
    """float64 torch reference: values [B] and, if weights is given, d(sum weights * logps)/dlogits."""
    x = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    t = torch.tensor(np.where(mask, targets, 0), dtype=torch.long)
    logp = torch.log_softmax(x, dim=-1).gather(-1, t[..., None])[..., 0]
    seq = (logp * torch.tensor(mask, dtype=torch.float64)).sum(-1)
    if weights is None:
        return seq.detach().numpy()
    (seq * torch.tensor(np.asarray(weights, np.float64))).sum().backward()
    return seq.detach().numpy(), x.grad.numpy()


def _naive_sequence_logps(logits, targets, mask):
    """Unchunked JAX reference: the textbook full float32 log-softmax, then a gather."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, jnp.clip(targets, 0, logits.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


# ------------------------------------------------------------------------------------------------------------
# sequence_logps / token_logps
# ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16, 45, 64])
def test_sequence_logps_matches_torch_float64(chunk_size):
    logits, targets, mask = _random_batch(0)
    weights = np.random.default_rng(1).standard_normal(logits.shape[0]).astype(np.float32)
    ref, ref_grad = _torch_sequence_logps(logits, targets, mask, weights)

    got = losses.sequence_logps(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), chunk_size)
    assert got.shape == (logits.shape[0],) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    grad = jax.grad(lambda x: jnp.sum(losses.sequence_logps(x, targets, mask, chunk_size) * weights))(logits)
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
    assert not np.any(grad[~mask]), "masked positions must get zero gradient"


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 32])  # 7 and 16 do not divide T = 45
def test_chunked_equals_unchunked_values_and_gradients(chunk_size):
    logits, targets, mask = _random_batch(2, batch=4, length=45, vocab=61)
    weights = np.random.default_rng(3).standard_normal(4).astype(np.float32)

    def weighted(fn):
        return lambda x: jnp.sum(fn(x) * weights)

    chunked = lambda x: losses.sequence_logps(x, targets, mask, chunk_size)  # noqa: E731
    one_chunk = lambda x: losses.sequence_logps(x, targets, mask, chunk_size=45)  # noqa: E731
    naive = lambda x: _naive_sequence_logps(x, targets, mask)  # noqa: E731

    for ref in (one_chunk, naive):
        np.testing.assert_allclose(chunked(logits), ref(logits), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(
            jax.grad(weighted(chunked))(logits), jax.grad(weighted(ref))(logits), rtol=1e-5, atol=1e-5
        )
    # and the same under jit
    np.testing.assert_allclose(jax.jit(chunked)(logits), naive(logits), rtol=1e-5, atol=1e-5)


def test_token_logps_per_position():
    logits, targets, mask = _random_batch(4, batch=2, length=20, vocab=33)
    x = torch.tensor(logits, dtype=torch.float64)
    t = torch.tensor(np.where(mask, targets, 0), dtype=torch.long)
    ref = torch.log_softmax(x, -1).gather(-1, t[..., None])[..., 0].numpy()
    got = np.asarray(logprobs.token_logps(logits, np.where(mask, targets, 0), chunk_size=6))
    assert got.shape == (2, 20) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # Junk targets (-100, vocab + 3) read the clipped id's log-prob, as documented: finite, so a caller's
    # logps * mask stays finite too.
    clipped = torch.tensor(np.clip(targets, 0, logits.shape[-1] - 1), dtype=torch.long)
    junk = np.asarray(logprobs.token_logps(logits, targets, chunk_size=6))
    np.testing.assert_allclose(junk, torch.log_softmax(x, -1).gather(-1, clipped[..., None])[..., 0].numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top", [30.0, 60.0])
def test_near_certain_tokens_keep_their_log_probs(top):
    """A confident model's target logit far above the other 63 (log-prob about -2.7e-6) keeps its digits, in one
    chunk, in the chunk loop, through the fused head, and with tied top logits. Target - logsumexp lost them to a
    logsumexp rounded at the size of the top logit (ulp(60) = 3.8e-6; errors of 1.0e-6 and 1.3e-6 here) and to a
    sum that adds the small terms to the top one's 1 (errors up to 1.2e-6 in the chunk loop, and on one chunk with
    some XLA versions), a bias summed over every completion token."""
    rng = np.random.default_rng(0)
    batch, length, vocab = 2, 40, 64
    targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    logits = (top - 17.0 + rng.uniform(-0.5, 0.5, (batch, length, vocab))).astype(np.float32)
    np.put_along_axis(logits, targets[..., None], np.float32(top), axis=-1)
    x = torch.tensor(logits, dtype=torch.float64)
    ref = torch.log_softmax(x, -1).gather(-1, torch.tensor(targets, dtype=torch.long)[..., None])[..., 0].numpy()
    assert -4e-6 < ref.min() and ref.max() < -1e-6
    # Torch's float32 log_softmax, which sums the top term with the others, is off by up to 2.3 eps here.
    tol = 3 * np.finfo(np.float32).eps
    np.testing.assert_allclose(logprobs.token_logps(logits, targets), ref, rtol=0, atol=tol)
    np.testing.assert_allclose(jax.jit(logprobs.token_logps)(logits, targets), ref, rtol=0, atol=tol)
    np.testing.assert_allclose(logprobs.token_logps(logits, targets, chunk_size=8), ref, rtol=0, atol=tol)
    # The fused head: hidden states through an identity kernel give the same logits.
    got, _ = logprobs.head_logps(logits, np.eye(vocab, dtype=np.float32), targets)
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
    got, _ = logprobs.head_logps(logits, np.eye(vocab, dtype=np.float32), targets, 8)
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)
    # Tied top logits (common in bfloat16): each counts once.
    tied = logits.copy()
    tied[..., 0] = np.where(targets == 0, np.float32(top - 1), np.float32(top))
    ref = torch.log_softmax(torch.tensor(tied, dtype=torch.float64), -1).gather(
        -1, torch.tensor(targets, dtype=torch.long)[..., None])[..., 0].numpy()
    np.testing.assert_allclose(logprobs.token_logps(tied, targets, chunk_size=8), ref, rtol=0, atol=tol)


def test_bfloat16_logits():
    logits, targets, mask = _random_batch(5)
    x16 = jnp.asarray(logits, jnp.bfloat16)
    exact = np.asarray(x16.astype(jnp.float32))  # the values the bf16 array really holds
    weights = np.ones(logits.shape[0], np.float32)
    ref, ref_grad = _torch_sequence_logps(exact, targets, mask, weights)

    got = losses.sequence_logps(x16, targets, mask, chunk_size=16)
    assert got.dtype == jnp.float32  # accumulated in float32, not bf16
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)

    grad = jax.jit(jax.grad(lambda x: jnp.sum(losses.sequence_logps(x, targets, mask, chunk_size=16))))(x16)
    assert grad.dtype == jnp.bfloat16
    # only the final rounding of each gradient entry to bf16 (8 mantissa bits) separates it from float64
    np.testing.assert_allclose(np.asarray(grad.astype(jnp.float32)), ref_grad, rtol=2**-8, atol=1e-6)


def test_bad_shapes_raise():
    logits, targets, mask = _random_batch(6, batch=2, length=5, vocab=7)
    with pytest.raises(ValueError, match="targets shape"):
        losses.sequence_logps(logits, targets[:, :4], mask)
    with pytest.raises(ValueError, match="loss_mask shape"):
        losses.sequence_logps(logits, targets, mask[:, :4])
    with pytest.raises(ValueError, match="chunk_size"):
        losses.sequence_logps(logits, targets, mask, chunk_size=0)
    with pytest.raises(ValueError, match=r"logits must be \[batch, length, vocab\], got shape \(10, 7\)"):
        logprobs.token_logps(logits.reshape(10, 7), targets.reshape(10))
    with pytest.raises(ValueError, match="targets must be integer token ids, got dtype float32"):  # (not a mask)
        logprobs.token_logps(logits, targets.astype(jnp.float32))


def test_chunked_gradient_memory_stays_below_one_float32_logits_copy():
    """Compiled temp memory of grad(sequence_logps): chunked < half of B*T*V*4 bytes; the textbook
    full log-softmax needs at least B*T*V*4 (its float32 [B, T, V] log-softmax / softmax)."""
    batch, length, vocab, chunk = 2, 1024, 32000, 128
    full_f32 = batch * length * vocab * 4
    args = (
        jax.ShapeDtypeStruct((batch, length, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch, length), jnp.bool_),
    )

    grad_temp_bytes = lambda fn: temp_bytes(jax.grad(lambda x, t, m: jnp.sum(fn(x, t, m))), *args)

    chunked = grad_temp_bytes(lambda x, t, m: losses.sequence_logps(x, t, m, chunk_size=chunk))
    naive = grad_temp_bytes(_naive_sequence_logps)
    assert chunked < 0.5 * full_f32, (chunked, full_f32)
    assert naive >= full_f32, (naive, full_f32)


# ------------------------------------------------------------------------------------------------------------
# sft_loss
# ------------------------------------------------------------------------------------------------------------


def test_sft_loss_matches_torch_cross_entropy():
    logits, targets, mask = _random_batch(7)
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(logits, dtype=torch.float64).reshape(-1, logits.shape[-1]),
        torch.tensor(np.where(mask, targets, IGNORE), dtype=torch.long).reshape(-1),
        ignore_index=IGNORE,
    ).item()
    loss, metrics = losses.sft_loss(logits, targets, mask)
    np.testing.assert_allclose(loss, ref, rtol=1e-6)
    np.testing.assert_allclose(metrics["loss"], ref, rtol=1e-6)
    assert metrics["num_tokens"] == mask.sum()
    accuracy = ((logits.argmax(-1) == targets) & mask).sum() / mask.sum()
    np.testing.assert_allclose(metrics["token_accuracy"], accuracy, rtol=1e-6)


def test_sft_loss_token_accuracy_and_empty_batch():
    logits = np.zeros((1, 3, 4), np.float32)
    logits[0, 0, 2] = logits[0, 1, 1] = logits[0, 2, 0] = 5.0
    targets = np.array([[2, 3, 0]], np.int32)
    _, metrics = losses.sft_loss(logits, targets, np.array([[1, 1, 0]]))
    assert float(metrics["token_accuracy"]) == 0.5 and float(metrics["num_tokens"]) == 2

    # One loss token: its own cross-entropy (the normalizer's clamp at 1 leaves a count of 1 alone).
    loss, _ = losses.sft_loss(logits, targets, np.array([[1, 0, 0]]))
    np.testing.assert_allclose(float(loss), -float(torch.log_softmax(torch.tensor(logits[0, 0], dtype=torch.float64),
                                                                     -1)[2]), rtol=1e-6)

    loss, metrics = losses.sft_loss(logits, targets, np.zeros((1, 3), bool))
    assert float(loss) == 0.0 and float(metrics["token_accuracy"]) == 0.0 and float(metrics["num_tokens"]) == 0


def test_sft_loss_gradient_accumulation_is_exact():
    """4 micro-batches with the global token count as normalizer, summed, equal the full batch (loss and
    parameter gradient), although the micro-batches hold very different numbers of tokens."""
    rng = np.random.default_rng(8)
    batch, length, dim, vocab = 8, 12, 6, 19
    hidden = rng.standard_normal((batch, length, dim)).astype(np.float32)
    weight = (rng.standard_normal((dim, vocab)) * 0.5).astype(np.float32)
    targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    lengths = np.array([12, 12, 1, 2, 7, 3, 12, 5])
    mask = np.arange(length)[None, :] < lengths[:, None]

    def loss_fn(w, h, t, m, normalizer=None):
        return losses.sft_loss(jnp.einsum("btd,dv->btv", h, w), t, m, normalizer=normalizer, chunk_size=5)[0]

    full_loss, full_grad = jax.value_and_grad(loss_fn)(weight, hidden, targets, mask)
    total = mask.sum()
    acc_loss, acc_grad, micro_means = 0.0, np.zeros_like(weight), []
    for sl in np.split(np.arange(batch), 4):
        value, grad = jax.value_and_grad(loss_fn)(weight, hidden[sl], targets[sl], mask[sl], total)
        acc_loss, acc_grad = acc_loss + value, acc_grad + grad
        micro_means.append(loss_fn(weight, hidden[sl], targets[sl], mask[sl]))
    np.testing.assert_allclose(acc_loss, full_loss, rtol=1e-6)
    np.testing.assert_allclose(acc_grad, full_grad, rtol=1e-5, atol=1e-7)
    # the test has teeth: averaging per-micro-batch means would give a different number
    assert abs(np.mean(micro_means) - full_loss) > 1e-3


# ------------------------------------------------------------------------------------------------------------
# dpo_loss
# ------------------------------------------------------------------------------------------------------------


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _numpy_dpo(pc, pr, rc, rr, beta, loss_type, eps=0.0, len_w=None, len_l=None):
    """The papers' and TRL's formulas, float64, written independently of the JAX code."""
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (pc, pr, rc, rr))
    delta_w, delta_l = pc - rc, pr - rr
    z = delta_w - delta_l
    if loss_type == "sigmoid":
        per_example = -(1 - eps) * _log_sigmoid(beta * z) - eps * _log_sigmoid(-beta * z)
    elif loss_type == "robust":
        per_example = (-(1 - eps) * _log_sigmoid(beta * z) + eps * _log_sigmoid(-beta * z)) / (1 - 2 * eps)
    elif loss_type == "hinge":
        per_example = np.maximum(0.0, 1 - beta * z)
    elif loss_type == "ipo":  # TRL 1.16 clamps the token counts: completion_mask.sum(dim=1).clamp(min=1.0)
        per_example = (delta_w / np.maximum(len_w, 1) - delta_l / np.maximum(len_l, 1) - 1 / (2 * beta)) ** 2
    chosen, rejected = beta * delta_w, beta * delta_l
    metrics = {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/accuracies": (chosen > rejected).mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "logps/chosen": pc.mean(),
        "logps/rejected": pr.mean(),
    }
    return per_example.mean(), metrics


@st.composite
def _dpo_inputs(draw):
    batch = draw(st.integers(1, 6))
    logps = draw(hnp.arrays(np.float32, (4, batch), elements=st.floats(-300, 0, width=32)))
    beta = draw(st.floats(0.01, 1.0))
    lengths = draw(hnp.arrays(np.int32, (2, batch), elements=st.integers(0, 512)))  # 0: an empty completion
    return logps, beta, lengths


@pytest.mark.parametrize(
    "loss_type,eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.5), ("robust", 0.0), ("robust", 0.2),
                      ("hinge", 0.0), ("ipo", 0.0)]  # (sigmoid 0.5: cDPO's bound is inclusive, robust DPO's is not)
)
@settings(max_examples=40, deadline=None)
@given(inputs=_dpo_inputs())
def test_dpo_loss_matches_numpy_float64(loss_type, eps, inputs):
    logps, beta, lengths = inputs
    kwargs = {}
    if loss_type == "ipo":
        kwargs = dict(chosen_lengths=lengths[0], rejected_lengths=lengths[1])
    loss, metrics = losses.dpo_loss(*logps, beta=beta, loss_type=loss_type, label_smoothing=eps, **kwargs)
    ref_loss, ref_metrics = _numpy_dpo(*logps, beta, loss_type, eps, len_w=lengths[0], len_l=lengths[1])
    # float32 inputs of size <= 300: the differences z carry ~1e-5 absolute rounding, hence the atol
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(metrics["loss"], loss)
    for name, value in ref_metrics.items():
        if name == "rewards/accuracies":
            continue  # a strict comparison can flip on a float32 tie; checked exactly below
        np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-4, err_msg=name)
    chosen = beta * (logps[0].astype(np.float64) - logps[2])
    rejected = beta * (logps[1].astype(np.float64) - logps[3])
    if np.all(np.abs(chosen - rejected) > 1e-3):
        np.testing.assert_allclose(metrics["rewards/accuracies"], (chosen > rejected).mean(), rtol=1e-6)


def test_dpo_equal_logps_give_log2_and_zero_accuracy():
    x = jnp.full((4,), -20.0)
    loss, metrics = losses.dpo_loss(x, x, x, x, beta=0.1)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    assert float(metrics["rewards/accuracies"]) == 0.0  # ties are not wins: strict >
    assert float(metrics["rewards/margins"]) == 0.0
    assert float(metrics["rewards/chosen"]) == 0.0 and float(metrics["rewards/rejected"]) == 0.0
    np.testing.assert_allclose(metrics["logps/chosen"], -20.0)


def test_dpo_hand_computed_case():
    # z = (-10 - -12) - (-15 - -13) = 2 - (-2) = 4
    pc, pr, rc, rr = (jnp.array([v]) for v in (-10.0, -15.0, -12.0, -13.0))
    beta = 0.5  # beta * z = 2
    cases = {
        ("sigmoid", 0.0): math.log1p(math.exp(-2)),
        ("sigmoid", 0.25): 0.75 * math.log1p(math.exp(-2)) + 0.25 * math.log1p(math.exp(2)),
        ("robust", 0.25): (0.75 * math.log1p(math.exp(-2)) - 0.25 * math.log1p(math.exp(2))) / 0.5,
        ("hinge", 0.0): 0.0,  # relu(1 - 2)
    }
    for (loss_type, eps), expected in cases.items():
        loss, metrics = losses.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
        np.testing.assert_allclose(loss, expected, rtol=1e-6, atol=1e-7, err_msg=f"{loss_type} {eps}")
        assert float(metrics["rewards/chosen"]) == 1.0 and float(metrics["rewards/rejected"]) == -1.0
        assert float(metrics["rewards/margins"]) == 2.0 and float(metrics["rewards/accuracies"]) == 1.0
        assert float(metrics["logps/chosen"]) == -10.0 and float(metrics["logps/rejected"]) == -15.0
    loss, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.1, loss_type="hinge")
    np.testing.assert_allclose(loss, 0.6, rtol=1e-6)  # relu(1 - 0.4)
    # ipo with |yw| = 4, |yl| = 2: (2/4 - (-2)/2 - 1/(2*0.5))^2 = (0.5 + 1 - 1)^2 = 0.25
    loss, metrics = losses.dpo_loss(
        pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_lengths=jnp.array([4]), rejected_lengths=jnp.array([2])
    )
    np.testing.assert_allclose(loss, 0.25, rtol=1e-6)
    assert float(metrics["rewards/chosen"]) == 1.0  # rewards stay beta * summed log-ratios for ipo
    # An empty completion (0 tokens) counts as one token, as in TRL, not a division by zero
    loss, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_lengths=jnp.array([0]),
                              rejected_lengths=jnp.array([3]))
    np.testing.assert_allclose(loss, _numpy_dpo(pc, pr, rc, rr, 0.5, "ipo", len_w=0, len_l=3)[0], rtol=1e-6)


@pytest.mark.parametrize("eps", [0.4999, 0.4999999, 0.49999999])
def test_robust_dpo_near_half_label_smoothing_matches_float64(eps):
    # eps = 0.49999999 is 0.5 in float32: 1 - 2 eps taken there divided by zero (loss NaN); 0.4999999 was 12% off
    logps = np.array([[-10.0, -20.0], [-12.0, -17.0], [-11.0, -19.0], [-12.5, -18.5]], np.float32)
    loss, _ = losses.dpo_loss(*logps, beta=0.1, loss_type="robust", label_smoothing=eps)
    grads = jax.grad(lambda pc: losses.dpo_loss(pc, *logps[1:], beta=0.1, loss_type="robust",
                                                label_smoothing=eps)[0])(jnp.asarray(logps[0]))
    np.testing.assert_allclose(loss, _numpy_dpo(*logps, 0.1, "robust", eps)[0], rtol=1e-5)
    assert np.all(np.isfinite(grads))


def test_dpo_accuracy_is_strict_per_example():
    pc = jnp.array([-1.0, -2.0, -3.0, -4.0])
    pr = jnp.array([-2.0, -2.0, -1.0, -4.0])  # win, tie, loss, tie
    zero = jnp.zeros(4)
    _, metrics = losses.dpo_loss(pc, pr, zero, zero, beta=1.0)
    assert float(metrics["rewards/accuracies"]) == 0.25
    np.testing.assert_allclose(metrics["rewards/margins"], np.mean([1.0, 0.0, -2.0, 0.0]))


def test_dpo_reference_free():
    rng = np.random.default_rng(9)
    pc, pr, rc, rr = (jnp.asarray(rng.uniform(-50, -1, 5), jnp.float32) for _ in range(4))
    for loss_type in ("sigmoid", "hinge"):
        free, free_metrics = losses.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type, reference_free=True)
        zeros, zero_metrics = losses.dpo_loss(pc, pr, jnp.zeros(5), jnp.zeros(5), beta=0.2, loss_type=loss_type)
        with_ref, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.2, loss_type=loss_type)
        np.testing.assert_allclose(free, zeros, rtol=1e-7)
        for name in zero_metrics:
            np.testing.assert_allclose(free_metrics[name], zero_metrics[name], rtol=1e-7)
        assert not np.isclose(float(free), float(with_ref))
    # the reference log-probs are not needed at all
    none_ref, _ = losses.dpo_loss(pc, pr, None, None, beta=0.2, reference_free=True)
    free, _ = losses.dpo_loss(pc, pr, rc, rr, beta=0.2, reference_free=True)
    np.testing.assert_allclose(none_ref, free, rtol=1e-7)


def test_dpo_bad_arguments(monkeypatch):
    x = jnp.zeros(3)
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        losses.dpo_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths and rejected_lengths"):
        losses.dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=jnp.ones(3))
    with pytest.raises(ValueError, match="sigmoid, robust, hinge, ipo"):
        losses.dpo_loss(x, x, x, x, loss_type="kto")
    for eps in (0.5, 0.7, -0.1):
        with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
            losses.dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=eps)
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.dpo_loss(x, x, x, x, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[batch\]"):
        losses.dpo_loss(x, jnp.zeros(4), x, x)
    for zero in (np.float32(0.0), jnp.float32(0.0)):  # numpy and concrete jax scalars are checked too
        with pytest.raises(ValueError, match="beta must be positive"):
            losses.dpo_loss(x, x, x, x, beta=zero)
    # beta x a margin of 0 (the first step's) is NaN; 1e39 is inf in float32, where the loss computes
    for inf in (float("inf"), np.float32(np.inf), 1e39):
        with pytest.raises(ValueError, match=re.escape(f"beta must be positive and finite, got {inf}")):
            losses.dpo_loss(x, x, x, x, beta=inf)
    losses.dpo_loss(x, x, x, x, beta=float(np.finfo(np.float32).max))  # the largest float32 is taken
    # A name added to LOSS_TYPES without its formula: refused, not computed by another loss's branch, and not
    # given a label smoothing it would ignore.
    monkeypatch.setattr(losses, "LOSS_TYPES", (*losses.LOSS_TYPES, "new"))
    with pytest.raises(NotImplementedError, match="'new' is in LOSS_TYPES but dpo_loss has no branch"):
        losses.dpo_loss(x, x, x, x, loss_type="new", chosen_lengths=x + 1, rejected_lengths=x + 1)
    with pytest.raises(ValueError, match="loss_type='new' does not use label_smoothing"):
        losses.dpo_loss(x, x, x, x, loss_type="new", label_smoothing=0.1)
    masks = jnp.ones((3, 5))  # the [B, T] masks, not their sums: broadcast into a loss of the wrong shape
    with pytest.raises(ValueError, match=r"chosen_lengths / rejected_lengths must be \[batch\] \(3,\)"):
        losses.dpo_loss(x, x, x, x, loss_type="ipo", chosen_lengths=masks, rejected_lengths=masks)


def test_dpo_sigmoid_gradient_is_analytic():
    rng = np.random.default_rng(10)
    logps = [jnp.asarray(rng.uniform(-60, -5, 6), jnp.float32) for _ in range(4)]
    beta = 0.3
    z = (logps[0] - logps[2]) - (logps[1] - logps[3])
    weight = beta * jax.nn.sigmoid(-beta * z) / 6  # d(-log sigma(beta z))/dz / B
    grads = jax.grad(lambda *a: losses.dpo_loss(*a, beta=beta)[0], argnums=(0, 1, 2, 3))(*logps)
    np.testing.assert_allclose(grads[0], -weight, rtol=1e-5)
    np.testing.assert_allclose(grads[1], weight, rtol=1e-5)
    np.testing.assert_allclose(grads[2], weight, rtol=1e-5)
    np.testing.assert_allclose(grads[3], -weight, rtol=1e-5)
    # metrics carry no gradient
    metric_grad = jax.grad(lambda pc: losses.dpo_loss(pc, *logps[1:], beta=beta)[1]["rewards/chosen"])(logps[0])
    assert not np.any(metric_grad)


def test_dpo_loss_jits_end_to_end_with_sequence_logps():
    """The DPO path as the train step uses it: sequence_logps of policy logits -> dpo_loss, under jit."""
    logits, targets, mask = _random_batch(11, batch=4, length=30, vocab=41)
    ref_logps = _torch_sequence_logps(logits, targets, mask) - 1.0

    @jax.jit
    def step(x):
        def loss_fn(x):
            logps = losses.sequence_logps(x, targets, mask, chunk_size=8)
            return losses.dpo_loss(logps[:2], logps[2:], ref_logps[:2], ref_logps[2:], beta=0.1)

        return jax.value_and_grad(loss_fn, has_aux=True)(x)

    (loss, metrics), grad = step(logits)
    ref_loss, _ = _numpy_dpo(*np.split(_torch_sequence_logps(logits, targets, mask), 2),
                             *np.split(ref_logps, 2), 0.1, "sigmoid")
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert grad.shape == logits.shape and np.all(np.isfinite(grad))


def test_sequence_logps_sharded_batch_and_vocab_match_one_device():
    """Logits split over batch (data) and vocabulary (tensor) on the 8 simulated devices give the same values
    and gradients as one device."""
    devices = np.array(jax.devices())
    if devices.size < 8:
        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    mesh = jax.sharding.Mesh(devices[:8].reshape(4, 2), ("data", "tensor"))
    P, NamedSharding = jax.sharding.PartitionSpec, jax.sharding.NamedSharding
    logits, targets, mask = _random_batch(12, batch=4, length=20, vocab=64)
    fn = jax.jit(jax.value_and_grad(lambda x, t, m: jnp.sum(losses.sequence_logps(x, t, m, chunk_size=6) ** 2)))
    value, grad = fn(logits, targets, mask)
    sharded = (
        jax.device_put(logits, NamedSharding(mesh, P("data", None, "tensor"))),
        jax.device_put(targets, NamedSharding(mesh, P("data", None))),
        jax.device_put(mask, NamedSharding(mesh, P("data", None))),
    )
    value_s, grad_s = fn(*sharded)
    np.testing.assert_allclose(value_s, value, rtol=1e-6)
    np.testing.assert_allclose(grad_s, grad, rtol=1e-5, atol=1e-7)
