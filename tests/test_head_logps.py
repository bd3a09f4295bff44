"""zephyr_jax.logprobs.head_logps (LM head fused into the chunked log-softmax) against the full-head path:
float32 logits = hidden @ kernel for every position, then logprobs.token_logps."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from tests.xla_memory import temp_bytes
from zephyr_jax import logprobs
from zephyr_jax.sharding import logical_to_spec, make_mesh


def _inputs(seed, batch=3, length=45, embed=16, vocab=97, dtype=jnp.float32):
    """hidden, kernel, targets, weights. About a third of the positions are masked (weight 0) and hold junk
    targets (-100 or >= vocab); a quarter of the rest target the argmax, so `correct` is mixed. Two junk targets
    sit where the argmax is the id they would clip to (0 for -100, vocab - 1 for vocab + 3): never `correct`."""
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((batch, length, embed))
    kernel = rng.standard_normal((embed, vocab)) / np.sqrt(embed) * 3.0
    hidden[0, 1], hidden[-1, -2] = kernel[:, 0] * 4.0, kernel[:, -1] * 4.0  # these argmaxes: 0 and vocab - 1
    hidden, kernel = jnp.asarray(hidden, dtype), jnp.asarray(kernel, dtype)
    argmax = np.asarray(jnp.argmax(_full_logits(hidden, kernel), axis=-1))
    assert argmax[0, 1] == 0 and argmax[-1, -2] == vocab - 1
    targets = np.where(rng.random((batch, length)) < 0.25, argmax, rng.integers(0, vocab, (batch, length)))
    weights = rng.standard_normal((batch, length)).astype(np.float32)
    masked = rng.random((batch, length)) < 0.3
    masked[0, 1] = masked[-1, -2] = True
    weights[masked] = 0.0
    targets = np.where(masked, np.where(rng.random((batch, length)) < 0.5, -100, vocab + 3), targets)
    targets[0, 1], targets[-1, -2] = -100, vocab + 3
    return hidden, kernel, jnp.asarray(targets, jnp.int32), jnp.asarray(weights)


def _full_logits(hidden, kernel):
    """The model's head: both operands in the compute dtype, float32 accumulation."""
    return jnp.dot(hidden, kernel.astype(hidden.dtype), preferred_element_type=jnp.float32)


def _full_path(hidden, kernel, targets, chunk_size=None):
    logits = _full_logits(hidden, kernel)
    vocab = kernel.shape[-1]
    correct = (jnp.argmax(logits, axis=-1) == targets) & (targets >= 0) & (targets < vocab)
    return logprobs.token_logps(logits, targets, chunk_size), correct


def _weighted_grads(fn, hidden, kernel, targets, weights):
    return jax.jit(jax.grad(lambda h, w: jnp.sum(weights * fn(h, w, targets)[0]), argnums=(0, 1)))(hidden, kernel)


def _assert_close_relative(got, ref, rel):
    """|got - ref| <= rel * max|ref| elementwise (plus rel elementwise): a tolerance relative to the array's
    scale, so near-zero entries of a gradient are not held to a relative bound they cannot meet."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    np.testing.assert_allclose(got, ref, rtol=rel, atol=rel * np.abs(ref).max())


@pytest.mark.parametrize("chunk_size", [None, 1, 7, 16])  # 7 and 16 do not divide K = 45; None: one chunk
def test_head_logps_float32_equals_full_head_path(chunk_size):
    hidden, kernel, targets, weights = _inputs(0)
    logps, correct = logprobs.head_logps(hidden, kernel, targets, chunk_size)
    ref_logps, ref_correct = _full_path(hidden, kernel, targets)
    assert logps.shape == correct.shape == targets.shape
    assert logps.dtype == jnp.float32 and correct.dtype == jnp.bool_
    np.testing.assert_allclose(logps, ref_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, ref_correct)
    assert 0 < int(correct.sum()) < correct.size

    fused = lambda h, w, t: logprobs.head_logps(h, w, t, chunk_size)  # noqa: E731
    d_hidden, d_kernel = _weighted_grads(fused, hidden, kernel, targets, weights)
    ref_hidden, ref_kernel = _weighted_grads(_full_path, hidden, kernel, targets, weights)
    assert d_hidden.dtype == hidden.dtype and d_kernel.dtype == kernel.dtype
    _assert_close_relative(d_hidden, ref_hidden, 1e-5)
    _assert_close_relative(d_kernel, ref_kernel, 1e-5)
    assert not np.any(np.asarray(d_hidden)[np.asarray(weights) == 0]), "masked positions get no gradient"


def test_head_logps_bfloat16_matches_full_head_path_with_the_same_matmul():
    """bf16 hidden and kernel; the reference is the full path with the same bf16 x bf16 -> float32 head.

    The logits are the same float32 sums of the same exact bf16 products (only the summation order may
    differ), so logps agree to float32 rounding: 1e-5. The gradients do not: head_logps rounds d_logits to
    bf16 before its two backward matmuls (the full path's autodiff keeps them float32) and returns bf16
    gradients, so each entry carries about two bf16 roundings (unit roundoff 2**-9 = 0.2%). Tolerance: 2%
    of the array's largest entry, plus 2% of the entry: ten times that rounding, and far below the size of a
    real error (a wrong softmax, a missing or doubled chunk moves entries by tens of percent).
    """
    hidden, kernel, targets, weights = _inputs(1, dtype=jnp.bfloat16)
    logps, correct = logprobs.head_logps(hidden, kernel, targets, 7)
    ref_logps, ref_correct = _full_path(hidden, kernel, targets)
    np.testing.assert_allclose(logps, ref_logps, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(correct, ref_correct)

    fused = lambda h, w, t: logprobs.head_logps(h, w, t, 7)  # noqa: E731
    d_hidden, d_kernel = _weighted_grads(fused, hidden, kernel, targets, weights)
    ref_hidden, ref_kernel = _weighted_grads(_full_path, hidden, kernel, targets, weights)
    assert d_hidden.dtype == d_kernel.dtype == jnp.bfloat16
    _assert_close_relative(d_hidden, ref_hidden, 2e-2)
    _assert_close_relative(d_kernel, ref_kernel, 2e-2)


@pytest.mark.parametrize("chunk_size", [16, None])  # None: one chunk (K = 45), the train step's usual case
def test_head_logps_float32_kernel_with_bfloat16_hidden(chunk_size):
    """A float32 kernel (the parameter) with bf16 activations: the head computes in bf16, d_kernel comes back
    float32 and is the float32 sum of the bf16 products. Both backward paths: the chunk loop and the single
    chunk (K <= chunk_size, as most train steps' loss positions are), which has its own d_kernel cast."""
    hidden, kernel, targets, weights = _inputs(2, dtype=jnp.bfloat16)
    kernel32 = kernel.astype(jnp.float32) * 1.001  # not bf16-representable: the cast must happen inside
    logps, _ = logprobs.head_logps(hidden, kernel32, targets, chunk_size)
    ref_logps, _ = _full_path(hidden, kernel32, targets)
    np.testing.assert_allclose(logps, ref_logps, rtol=1e-5, atol=1e-5)
    fused = lambda h, w, t: logprobs.head_logps(h, w, t, chunk_size)  # noqa: E731
    d_hidden, d_kernel = _weighted_grads(fused, hidden, kernel32, targets, weights)
    ref_hidden, ref_kernel = _weighted_grads(_full_path, hidden, kernel32, targets, weights)
    assert d_hidden.dtype == jnp.bfloat16 and d_kernel.dtype == jnp.float32
    _assert_close_relative(d_hidden, ref_hidden, 2e-2)  # bf16 d_logits, as in the test above
    _assert_close_relative(d_kernel, ref_kernel, 2e-2)


@pytest.mark.parametrize("chunk_size", [7, None])
def test_head_logps_bfloat16_matmuls_all_take_bfloat16_operands(chunk_size):
    """bf16 hidden and kernel: every matmul of the compiled forward + backward multiplies bf16 operands into a float32
    result, as the model's head does, including the two backward ones that turn d_logits into d_hidden and
    d_kernel (d_logits is cast to the compute dtype first, as the docstring says). A float32 d_logits there
    promotes those matmuls to float32 x float32 (several times slower on TPU/GPU, and a second float32
    [B, chunk, V] block), while the values stay close enough that the tolerance of the gradient tests above
    cannot see it."""
    hidden, kernel, targets, weights = _inputs(1, dtype=jnp.bfloat16)
    fn = jax.value_and_grad(lambda h, w: jnp.sum(weights * logprobs.head_logps(h, w, targets, chunk_size)[0]),
                            argnums=(0, 1))
    text = jax.jit(fn).lower(hidden, kernel).as_text()
    dots = re.findall(r"stablehlo\.dot_general .*?: \((tensor<[^>]*>), (tensor<[^>]*>)\) -> (tensor<[^>]*>)", text)
    assert len(dots) >= 4, text  # the forward head, its recomputation, d_hidden and d_kernel
    for lhs, rhs, out in dots:
        assert lhs.endswith("bf16>") and rhs.endswith("bf16>") and out.endswith("f32>"), (lhs, rhs, out)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_logps_never_materialises_the_full_logits(dtype):
    """Compiled forward + backward: head_logps' temp memory stays well below one float32 [B, K, V] array
    (it holds about two float32 [B, chunk, V] blocks: logits and d_logits), the full path's exceeds it."""
    batch, length, embed, vocab, chunk = 2, 1024, 64, 32000, 128
    full_f32 = batch * length * vocab * 4
    args = (jax.ShapeDtypeStruct((batch, length, embed), dtype), jax.ShapeDtypeStruct((embed, vocab), dtype),
            jax.ShapeDtypeStruct((batch, length), jnp.int32), jax.ShapeDtypeStruct((batch, length), jnp.float32))

    def fwd_bwd(fn):
        return jax.value_and_grad(lambda h, w, t, m: jnp.sum(m * fn(h, w, t, chunk)[0]), argnums=(0, 1))

    fused = temp_bytes(fwd_bwd(logprobs.head_logps), *args)
    full = temp_bytes(fwd_bwd(_full_path), *args)
    assert fused < 0.35 * full_f32, (fused, full_f32)
    assert full >= full_f32, (full, full_f32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_head_logps_sharded_equals_one_device(dtype):
    """hidden split on B over ("data", "fsdp"), kernel as [E over "fsdp", V over "tensor"] (DEFAULT_RULES) on a
    (1, 4, 2) mesh: the same values, `correct` and gradients as on one device, and the kernel is gathered
    before the chunk loops, not inside them."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    hidden, kernel, targets, weights = _inputs(3, batch=4, length=40, embed=16, vocab=64, dtype=dtype)

    def loss(h, w, t, m):
        logps, correct = logprobs.head_logps(h, w, t, 6)
        return jnp.sum(m * logps), correct

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (value, correct), grads = fn(hidden, kernel, targets, weights)
    mesh = make_mesh((1, 4, 2))
    with jax.set_mesh(mesh):
        put = lambda x, axes: jax.device_put(x, NamedSharding(mesh, logical_to_spec(axes)))  # noqa: E731
        sharded = (put(hidden, ("batch", "length", "embed")), put(kernel, ("embed", "vocab")),
                   put(targets, ("batch", "length")), put(weights, ("batch", "length")))
        assert sharded[1].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
        (value_s, correct_s), grads_s = fn(*sharded)
        hlo = fn.lower(*sharded).compile().as_text()
    rel = 1e-5 if dtype == jnp.float32 else 1e-2  # bf16 gradients: a reordered sum may round one ulp apart
    np.testing.assert_allclose(value_s, value, rtol=1e-5)
    np.testing.assert_array_equal(correct_s, correct)
    for got, ref in zip(grads_s, grads):
        assert got.dtype == ref.dtype
        _assert_close_relative(got, ref, rel)
    # The kernel gathered along E is [16, 64 / 2] (V stays split over "tensor"); the loops may gather small
    # things (the argmax's per-shard maxima), not that.
    kernel_gathers_in_loops = [line for line in hlo.splitlines()
                               if re.search(r"= \S+\[16,32\]\S* all-gather\(", line) and "while/body" in line]
    assert not kernel_gathers_in_loops, kernel_gathers_in_loops


def test_head_logps_bad_arguments_raise():
    hidden, kernel, targets, _ = _inputs(4, batch=2, length=5, embed=8, vocab=11)
    with pytest.raises(ValueError, match="hidden must be"):
        logprobs.head_logps(hidden[0], kernel, targets)
    with pytest.raises(ValueError, match="kernel must be"):
        logprobs.head_logps(hidden, kernel.T, targets)
    with pytest.raises(ValueError, match="targets shape"):
        logprobs.head_logps(hidden, kernel, targets[:, :4])
    with pytest.raises(ValueError, match="integer"):
        logprobs.head_logps(hidden, kernel, targets.astype(jnp.float32))
    with pytest.raises(ValueError, match="floating"):
        logprobs.head_logps(hidden.astype(jnp.int32), kernel, targets)
    with pytest.raises(ValueError, match="chunk_size"):
        logprobs.head_logps(hidden, kernel, targets, chunk_size=0)


def test_no_positions_give_empty_log_probs_and_no_loss():
    """A length of 0 (a batch without completion tokens): empty [B, 0] log-probs, a zero loss and zero gradients,
    as log_softmax gives (the chunk loop sliced one position out of none and failed while tracing)."""
    from zephyr_jax import losses

    hidden, kernel, targets = jnp.ones((2, 0, 8)), jnp.ones((8, 11)), jnp.zeros((2, 0), jnp.int32)
    logps, correct = logprobs.head_logps(hidden, kernel, targets)
    assert logps.shape == correct.shape == (2, 0) and logps.dtype == jnp.float32 and correct.dtype == bool
    d_hidden, d_kernel = jax.grad(lambda h, k: logprobs.head_logps(h, k, targets)[0].sum(), (0, 1))(hidden, kernel)
    assert d_hidden.shape == (2, 0, 8) and not d_kernel.any()
    logits = jnp.ones((2, 0, 11))
    assert logprobs.token_logps(logits, targets).shape == (2, 0)
    assert float(losses.sft_loss(logits, targets, jnp.zeros((2, 0)))[0]) == 0.0
    np.testing.assert_array_equal(losses.sequence_logps(logits, targets, jnp.zeros((2, 0))), [0.0, 0.0])


def test_correct_follows_argmax_on_tied_logits():
    """Two equal kernel columns (ids 5 and 9) tie for the top logit: jnp.argmax gives the first, so a target of 5
    is `correct` and one of 9 is not, and both get the same log-prob (the chunk's one pass finds the first top
    index as argmax does, rather than asking whether the target is a top logit)."""
    rng = np.random.default_rng(0)
    kernel = rng.standard_normal((16, 40)) / 4.0
    kernel[:, 9] = kernel[:, 5]
    hidden = np.stack([kernel[:, 5] * 8.0, kernel[:, 5] * 8.0, rng.standard_normal(16)])[None]
    hidden, kernel = jnp.asarray(hidden, jnp.float32), jnp.asarray(kernel, jnp.float32)
    targets = jnp.asarray([[5, 9, 9]], jnp.int32)
    logits = _full_logits(hidden, kernel)
    assert logits[0, 0, 5] == logits[0, 0, 9] == logits[0, 0].max()  # a real tie, in float32
    for chunk_size in (1, 2, None):
        logps, correct = logprobs.head_logps(hidden, kernel, targets, chunk_size)
        ref_logps, ref_correct = _full_path(hidden, kernel, targets)
        np.testing.assert_array_equal(correct, ref_correct)
        assert correct[0, :2].tolist() == [True, False]
        assert logps[0, 0] == logps[0, 1]
        np.testing.assert_allclose(logps, ref_logps, rtol=1e-6)
