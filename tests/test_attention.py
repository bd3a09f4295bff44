"""attend(): the kernel chosen by platform gives what einsum attention under make_mask gives.

Splash attention runs in Pallas interpret mode on these CPUs, alone and per shard under a mesh, and compiles to a
Mosaic kernel for a TPU slice. cuDNN cannot run here: its sequence lengths / offsets are checked against
make_mask, its call against jax's own shape checks, and its refusals of what it cannot honour."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zephyr_jax.model import attention
from zephyr_jax.model.attention import attend, make_mask, segment_offsets
from zephyr_jax.sharding import DEFAULT_RULES, make_mesh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _qkv(b, t, n, k, d, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(s), dtype) for s in [(b, t, n, d), (b, t, k, d), (b, t, k, d)])


def _rows(t, *layouts):
    """Segment ids [len(layouts), t]: each layout lists (id, length) runs; the rest of the row is padding."""
    ids = np.zeros((len(layouts), t), np.int32)
    for r, runs in enumerate(layouts):
        start = 0
        for segment, length in runs:
            ids[r, start:start + length] = segment
            start += length
    return jnp.asarray(ids)


def _assert_close(out, ref, rel=1e-5):
    out, ref = np.asarray(out), np.asarray(ref)
    assert np.isfinite(out).all()
    assert np.abs(out - ref).max() <= rel * np.abs(ref).max(), (np.abs(out - ref).max(), np.abs(ref).max())


def _output_and_grads(impl, q, k, v, segment_ids, window, **kwargs):
    """attend's output and the gradients of a fixed projection of it with respect to q, k, v, jitted."""
    cotangent = jnp.asarray(np.random.default_rng(9).standard_normal(q.shape), q.dtype)

    def f(q, k, v, s):
        out = attend(q, k, v, s, sliding_window=window, impl=impl, **kwargs)
        return (out * cotangent).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v, segment_ids)
    return out, grads


# T=256 is one 256-block per head; T=384 is 3 x 3 blocks of 128, which the window leaves partly empty.
SPLASH_CASES = {
    "gqa_window_padding_and_3_packed": (256, 100, ((1, 200),), ((1, 80), (2, 90), (3, 70))),
    "window_across_blocks_no_segments": (384, 150, None, None),
    "packed_across_blocks_no_window": (384, None, ((1, 384),), ((1, 130), (2, 200), (3, 30))),
}


@pytest.mark.parametrize("case", SPLASH_CASES, ids=list(SPLASH_CASES))
def test_splash_matches_einsum_attention_and_its_gradients(case):
    t, window, *layouts = SPLASH_CASES[case]
    q, k, v = _qkv(2, t, 4, 2, 128)
    segments = None if layouts[0] is None else _rows(t, *layouts)
    out, grads = _output_and_grads("splash", q, k, v, segments, window, interpret=True)
    ref, ref_grads = _output_and_grads("xla", q, k, v, segments, window)
    assert out.shape == q.shape and out.dtype == q.dtype
    _assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r)


def test_splash_per_shard_under_a_mesh_equals_the_unsharded_kernel():
    q, k, v = _qkv(2, 256, 4, 2, 128, seed=1)
    segments = _rows(256, ((1, 256),), ((1, 100), (2, 100)))
    ref, ref_grads = _output_and_grads("splash", q, k, v, segments, 64, interpret=True)
    with jax.set_mesh(make_mesh((1, 2, 2), jax.devices()[:4])):  # batch over fsdp, (kv) heads over tensor
        out, grads = _output_and_grads("splash", q, k, v, segments, 64, interpret=True)
        text = jax.jit(lambda q, k, v, s: attend(q, k, v, s, sliding_window=64, impl="splash")).lower(
            q, k, v, segments).as_text()
        # rows without segment ids (one whole sequence each: scoring, prefill) per shard too, against einsum
        whole = jax.jit(lambda q, k, v: attend(q, k, v, None, sliding_window=64, impl="splash", interpret=True))
        _assert_close(whole(q, k, v), attend(q, k, v, None, sliding_window=64, impl="xla"))
    assert "manual_computation" in text  # shard_map: the kernel runs per shard, not on gathered arrays
    _assert_close(out, ref, rel=1e-6)
    for g, r in zip(grads, ref_grads):
        _assert_close(g, r, rel=1e-6)


def test_splash_refuses_a_length_or_head_split_it_cannot_run():
    q, k, v = _qkv(1, 200, 4, 2, 128)
    with pytest.raises(ValueError, match="T=200"):
        attend(q, k, v, None, sliding_window=None, impl="splash", interpret=True)
    q, k, v = _qkv(1, 128, 4, 2, 128)
    with jax.set_mesh(make_mesh((1, 1, 8))):  # 4 heads cannot split 8 ways
        with pytest.raises(ValueError, match="4 heads and batch 1 must divide"):
            attend(q, k, v, None, sliding_window=None, impl="splash", interpret=True)
        auto = attend(q, k, v, None, sliding_window=None, impl="auto")  # auto falls back to einsum attention
    np.testing.assert_allclose(auto, attend(q, k, v, None, sliding_window=None, impl="xla"), atol=1e-6)
    with pytest.raises(ValueError, match="attention impl 'flash'"):
        attend(q, k, v, None, sliding_window=None, impl="flash")
    # A rule that splits the sequence (length over tensor) leaves a kernel no whole sequence: refused, auto is einsum
    rules = tuple((name, "tensor" if name == "length" else axes) for name, axes in DEFAULT_RULES)
    with jax.set_mesh(make_mesh((1, 1, 2), jax.devices()[:2])):
        with pytest.raises(ValueError, match="attention kernels need whole sequences and heads on each device; the "
                                             "rules split length or head_dim"):
            attend(q, k, v, None, sliding_window=None, impl="splash", rules=rules, interpret=True)
        assert attention._auto_impl("tpu", q, k, None, None, rules) == "xla"


def test_attend_refuses_keys_values_or_segment_ids_of_other_shapes():
    """Checked before any kernel or mask: keys of another length, head count not dividing the query heads', or
    segment ids not [B, T] are named with every shape (not an einsum or broadcast error inside XLA)."""
    q, k, v = _qkv(1, 64, 4, 2, 16)
    for bad_k, bad_v in ((k[:, :32], v[:, :32]), (k, v[..., :8]), (*_qkv(1, 64, 4, 3, 16)[1:],)):
        with pytest.raises(ValueError, match=re.escape(f"q {q.shape} [B, T, N, D] needs k, v [B, T, K, D] with N a "
                                                       f"multiple of K; got k {bad_k.shape}, v {bad_v.shape}")):
            attend(q, bad_k, bad_v, None, sliding_window=None, impl="xla")
    with pytest.raises(ValueError, match=re.escape("segment_ids (1, 63) must be [B, T] = (1, 64)")):
        attend(q, k, v, jnp.ones((1, 63), jnp.int32), sliding_window=None, impl="xla")


def test_splash_refuses_query_and_kv_heads_split_over_other_axes():
    """Per shard, the kernel pairs a shard's query heads with that shard's KV heads: with the KV heads left whole
    (--config.mesh.rules.kv_heads=()) and the query heads split, query head 2 of 4 met KV head 0 of 2, not 1
    (wrong outputs, no error). Refused for splash, and "auto" takes einsum attention on a TPU."""
    q, k, v = _qkv(2, 128, 4, 2, 128, seed=1)
    rules = tuple((name, () if name == "kv_heads" else axes) for name, axes in DEFAULT_RULES)
    with jax.set_mesh(make_mesh((1, 1, 2), jax.devices()[:2])):
        with pytest.raises(ValueError, match=r"heads and kv_heads must split over the same mesh axes \(tensor and "
                                             r"none, "):
            attend(q, k, v, None, sliding_window=None, impl="splash", rules=rules, interpret=True)
        assert attention._auto_impl("tpu", q, k, None, None, rules) == "xla"


def test_auto_is_einsum_attention_on_cpu():
    assert not attention._hopper_or_newer()  # no GPU to ask: packed rows are not given cuDNN's packed layout
    with jax.set_mesh(make_mesh((1, 8, 1))):  # nor under a mesh of CPU devices (no compute capability)
        assert not attention._hopper_or_newer()
    q, k, v = _qkv(2, 128, 4, 2, 16, dtype=jnp.bfloat16)
    segments = _rows(128, ((1, 100),), ((1, 50), (2, 78)))
    f = lambda impl: (lambda q, k, v, s: attend(q, k, v, s, sliding_window=32, impl=impl))
    assert "pallas_call" not in str(jax.make_jaxpr(f("auto"))(q, k, v, segments))
    np.testing.assert_array_equal(jax.jit(f("auto"))(q, k, v, segments), jax.jit(f("xla"))(q, k, v, segments))


@pytest.mark.parametrize("t", [1, 5])
def test_cache_attention_on_the_cache_read_layout_equals_einsum_attention(t):
    """Decoding (T = 1) and a prefill chunk (T = 5) over 24 cache positions, 8 query heads on 2 KV heads, with a
    causal, windowed mask of different lengths per row: keys and values as the KV cache reads them ([B, K, S, D])
    give xla_attention's result."""
    q, _, _ = _qkv(3, t, 8, 2, 16)
    _, k, v = _qkv(3, 24, 8, 2, 16, seed=1)
    positions = jnp.array([[20], [7], [15]]) + jnp.arange(t)[None]  # [B, T]
    keys = jnp.arange(24)
    mask = ((keys[None, None] <= positions[..., None]) & (positions[..., None] - keys[None, None] < 6))[:, None]
    expected = attention.xla_attention(q, k, v, mask)
    got = attention.cache_attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bf16_einsum_attention_forms_scores_and_softmax_in_float32():
    """bf16 queries, keys and values (q and k scaled x4: sharp softmaxes, as trained models have): both einsum
    paths form the scores and the softmax in float32, so against float64 attention of the same bf16 values they
    are within one bf16 step of the largest outputs (2^-6 for values in [2, 4); measured 0.013). Scores rounded
    to bf16 before the softmax, or their matmul accumulated in bf16, were 0.19 off."""
    rng = np.random.default_rng(0)
    b, t, n, kv_heads, d = 2, 64, 8, 2, 64
    q, k, v = (jnp.asarray(scale * rng.standard_normal(shape), jnp.bfloat16)
               for scale, shape in ((4, (b, t, n, d)), (4, (b, t, kv_heads, d)), (1, (b, t, kv_heads, d))))
    q64, k64, v64 = (np.repeat(np.asarray(x, np.float64), n // x.shape[2], axis=2) for x in (q, k, v))
    scores = np.einsum("btnd,bsnd->bnts", q64, k64) / np.sqrt(d)
    scores = np.where(np.tril(np.ones((t, t), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bnts,bsnd->btnd", probs / probs.sum(-1, keepdims=True), v64)
    assert 2 <= np.abs(expected).max() < 4
    mask = make_mask(t)
    cached = lambda x: x.transpose(0, 2, 1, 3)  # the KV cache's read layout [B, K, S, D]
    for got in (attention.xla_attention(q, k, v, mask), attention.cache_attention(q, cached(k), cached(v), mask)):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=0, atol=2 ** -6)


# ---------------------------------------------------------------------------------------------------------
# cuDNN: what its lengths and offsets describe, against make_mask.


def _described_mask(lengths, offsets, t, window):
    """[B, T, T]: the mask cuDNN applies for these lengths (and offsets): causal within each sequence
    [offset, offset + length), a query seeing `window` keys, itself included."""
    lengths = np.asarray(lengths)
    if offsets is None:  # one sequence per row, from slot 0
        lengths, offsets = lengths[:, None], np.zeros_like(lengths)[:, None]
    offsets = np.asarray(offsets)
    mask = np.zeros((len(lengths), t, t), bool)
    qi, ki = np.arange(t)[:, None], np.arange(t)[None, :]
    for b in range(len(lengths)):
        for length, start in zip(lengths[b], offsets[b]):
            if length < 0:
                continue
            inside = (qi >= start) & (qi < start + length) & (ki >= start) & (ki <= qi)
            mask[b] |= inside & ((qi - ki < window) if window else True)
    return mask


def _expected_mask(segment_ids, window):
    return np.asarray(make_mask(segment_ids.shape[1], segment_ids, window))[:, 0]


OFFSET_CASES = {  # max_segments -> rows (id, length runs) and whether the lengths/offsets can describe each
    1: [(((1, 16),), True), (((1, 11),), True), ((), True), (((1, 5), (2, 6)), False), (((0, 3), (1, 9)), False)],
    3: [(((1, 4), (2, 7), (3, 3)), True), (((0, 5), (1, 11)), True), (((1, 4), (0, 2), (2, 5)), True),
        (((7, 16),), True), ((), True), (((1, 3), (2, 3), (3, 3), (4, 3)), False),
        (((1, 2), (2, 2), (1, 4)), False)],
}


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("max_segments", sorted(OFFSET_CASES))
def test_cudnn_lengths_and_offsets_reproduce_make_mask(max_segments, window):
    rows = OFFSET_CASES[max_segments]
    segment_ids = _rows(16, *(runs for runs, _ in rows))
    lengths, offsets, ok = jax.jit(segment_offsets, static_argnums=1)(segment_ids, max_segments)
    assert np.asarray(ok).tolist() == [fits for _, fits in rows]
    if max_segments == 1:
        assert offsets is None and lengths.shape == (len(rows),)
    else:
        assert lengths.shape == (len(rows), max_segments) and offsets.shape == (len(rows), max_segments + 1)
    assert lengths.dtype == jnp.int32 and (offsets is None or offsets.dtype == jnp.int32)
    described, expected = _described_mask(lengths, offsets, 16, window), _expected_mask(segment_ids, window)
    real = np.asarray(segment_ids) > 0  # padding queries carry no loss: their rows may differ
    for b, (_, fits) in enumerate(rows):
        if fits:
            np.testing.assert_array_equal(described[b][real[b]], expected[b][real[b]], err_msg=f"row {b}")
        else:  # a row the lengths/offsets cannot describe: some real query's keys differ, hence the NaN guard
            assert (described[b][real[b]] != expected[b][real[b]]).any(), f"row {b}"


def test_cudnn_refuses_what_it_cannot_honour():
    q, k, v = _qkv(2, 16, 4, 2, 16, dtype=jnp.bfloat16)
    packed = _rows(16, ((1, 16),), ((1, 8), (2, 8)))
    with pytest.raises(ValueError, match="bfloat16 or float16, not float32"):
        attend(*(x.astype(jnp.float32) for x in (q, k, v)), None, sliding_window=4, impl="cudnn")
    with pytest.raises(ValueError, match="needs max_segments"):
        attend(q, k, v, packed, sliding_window=4, impl="cudnn")
    with pytest.raises(ValueError, match=r"rows \[1\] of segment_ids do not fit max_segments=1"):
        attend(q, k, v, packed, sliding_window=4, impl="cudnn", max_segments=1)
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs; this program is for cpu"):
        attend(q, k, v, packed, sliding_window=4, impl="cudnn", max_segments=2)
    with pytest.raises(ValueError, match="runs on NVIDIA GPUs; this program is for cpu"):  # traced ids: unread
        jax.jit(lambda s: attend(q, k, v, s, sliding_window=4, impl="cudnn", max_segments=1))(packed)


TRACE_ROWS = {1: (((1, 100),), ((1, 50),)), 3: (((1, 100),), ((1, 50), (2, 40), (3, 38)))}


def _traced_as_on_a_hopper_gpu(monkeypatch):
    """attend traces its cuDNN path here as on a Hopper GPU, through jax's own front-end checks (nothing runs)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    monkeypatch.setattr(attention, "_hopper_or_newer", lambda: True)


@pytest.mark.parametrize("max_segments", [None, 1, 3])
def test_cudnn_call_passes_jaxs_own_checks(monkeypatch, max_segments):
    """Traced (not run) as if on a Hopper GPU: jax's fused-attention front end checks shapes, dtypes and the
    packed layout of what attend passes, forward and backward."""
    _traced_as_on_a_hopper_gpu(monkeypatch)
    q, k, v = _qkv(2, 128, 8, 2, 64, dtype=jnp.bfloat16)
    segments = None if max_segments is None else _rows(128, *TRACE_ROWS[max_segments])
    loss = lambda q, k, v: attend(q, k, v, segments, sliding_window=32, impl="auto",
                                  max_segments=max_segments).astype(jnp.float32).sum()
    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v))
    assert "dot_product_attention_fwd" in jaxpr and "dot_product_attention_bwd" in jaxpr  # auto chose cuDNN
    assert "sliding_window_length=32" in jaxpr
    wide = lambda q, k, v: attend(q, k, v, segments, sliding_window=4096, impl="auto", max_segments=max_segments)
    assert "sliding_window_length=None" in str(jax.make_jaxpr(wide)(q, k, v))  # a window that cannot bind: causal
    # Before Hopper (an A100) cuDNN has no packed layout: packed rows take einsum attention, single rows cuDNN.
    monkeypatch.setattr(attention, "_hopper_or_newer", lambda: False)
    jaxpr = str(jax.make_jaxpr(loss)(q, k, v))
    assert ("dot_product_attention_fwd" in jaxpr) == (max_segments in (None, 1))


@pytest.mark.parametrize("strided_by_query_heads", [True, False])
def test_packed_rows_repeat_grouped_kv_only_where_jax_needs_it(monkeypatch, strided_by_query_heads):
    """Before jax 0.11.1 its cuDNN front end strided packed K/V offsets by the query heads
    (attention.PACKED_KV_STRIDED_BY_QUERY_HEADS): there grouped K/V go in repeated to q's 8 heads, elsewhere as
    their own 2; jax's own checks take both, forward and backward (traced as if on a Hopper GPU)."""
    _traced_as_on_a_hopper_gpu(monkeypatch)
    monkeypatch.setattr(attention, "PACKED_KV_STRIDED_BY_QUERY_HEADS", strided_by_query_heads)
    q, k, v = _qkv(2, 128, 8, 2, 64, dtype=jnp.bfloat16)
    segments = _rows(128, *TRACE_ROWS[3])
    loss = lambda q, k, v: attend(q, k, v, segments, sliding_window=32, impl="cudnn",
                                  max_segments=3).astype(jnp.float32).sum()
    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    calls = [e for e in jaxpr.jaxpr.eqns if "dot_product_attention" in e.primitive.name]
    assert any("fwd" in e.primitive.name for e in calls) and any("bwd" in e.primitive.name for e in calls)
    for call in calls:
        assert call.invars[1].aval.shape[2] == (8 if strided_by_query_heads else 2)  # K's heads


def _kernel_leaving_padding_unwritten(segments):
    """A stand-in for jax's cuDNN call: the XLA path, with NaN in the rows outside every sequence, forward and
    backward (cuDNN writes no output or dq/dk/dv rows there)."""
    real = (segments > 0)[:, :, None, None]

    def call(q, k, v, *args, sliding_window_length=None, **kwargs):
        @jax.custom_vjp
        def kernel(q, k, v):
            return jnp.where(real, attention._xla_self_attention(q, k, v, segments, sliding_window_length), jnp.nan)

        def fwd(q, k, v):
            return kernel(q, k, v), (q, k, v)

        def bwd(residuals, g):
            _, vjp = jax.vjp(lambda *a: attention._xla_self_attention(*a, segments, sliding_window_length), *residuals)
            return tuple(jnp.where(real, d, jnp.nan) for d in vjp(g))

        kernel.defvjp(fwd, bwd)
        return kernel(q, k, v)

    return call


def _as_on_a_hopper_gpu(monkeypatch, segments):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "dot_product_attention", _kernel_leaving_padding_unwritten(segments))
    monkeypatch.setattr(attention, "_platform", lambda: "gpu")
    monkeypatch.setattr(attention, "_hopper_or_newer", lambda: True)


@pytest.mark.parametrize("max_segments,strided_by_query_heads", [(1, True), (3, True), (3, False)])
def test_cudnn_gradients_at_padding_are_zero_whatever_the_kernel_leaves_there(monkeypatch, max_segments,
                                                                              strided_by_query_heads):
    """What cuDNN leaves in the rows outside every sequence (here NaN, forward and backward) must not reach
    attend's gradients: finite, 0 at padding, and the XLA path's at the real slots; packed rows with grouped K/V
    repeated to q's heads (jax before 0.11.1) or not."""
    packed = ((1, 30),), ((1, 20), (2, 14), (3, 10))  # then padding: 34 and 20 slots
    segments = _rows(64, *packed) if max_segments == 3 else _rows(64, ((1, 64),), ((1, 40),))
    real = (segments > 0)[:, :, None, None]
    _as_on_a_hopper_gpu(monkeypatch, segments)
    monkeypatch.setattr(attention, "PACKED_KV_STRIDED_BY_QUERY_HEADS", strided_by_query_heads)
    q, k, v = _qkv(2, 64, 4, 2, 16, dtype=jnp.bfloat16)
    cot = jax.random.normal(jax.random.key(1), q.shape, jnp.float32) * real  # padding outputs carry no loss

    def grads(impl):
        loss = lambda q, k, v: jnp.sum(cot * attend(q, k, v, segments, sliding_window=8, impl=impl,
                                                    max_segments=max_segments if impl == "cudnn" else None))
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    pad = ~np.asarray(real[..., 0, 0])
    for got, want in zip(grads("cudnn"), grads("xla")):
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        assert np.isfinite(got).all()
        assert (got[pad] == 0).all()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())  # both bf16; rounding only


def test_cudnn_padding_masks_cross_a_layer_scan_as_rows(monkeypatch):
    """Under a layer scan JAX hoists loop-invariant residuals out of the loop: masks made by jnp.where over
    [B, T, N, D] became full arrays that every layer read, forward and backward (XLA:GPU, the 1B model's SFT step:
    640 MiB a layer for the output's select where 256 do). The cuDNN path keeps its masks [B, T]: no boolean
    array of q's shape goes into or out of the scans of a 2-layer stack's gradient."""
    segments = _rows(64, ((1, 30),), ((1, 20), (2, 14), (3, 10)))
    _as_on_a_hopper_gpu(monkeypatch, segments)
    q = _qkv(2, 64, 4, 2, 16, dtype=jnp.bfloat16)[0]
    mix = jnp.asarray(np.random.default_rng(3).standard_normal((2, 16, 16)), jnp.bfloat16)

    def loss(q, mix):
        def layer(x, w):
            x = jnp.einsum("btnd,de->btne", x, w)
            out = attend(x, x[:, :, :2], x[:, :, 2:], segments, sliding_window=8, impl="cudnn", max_segments=3)
            return out, None

        return jnp.sum(jax.lax.scan(jax.checkpoint(layer), q, mix)[0].astype(jnp.float32))

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(q, mix)
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 2  # forward, backward
    crossing = [v.aval for e in scans for v in (*e.invars, *e.outvars) if hasattr(v, "aval")]
    assert not [a for a in crossing if a.dtype == jnp.bool_ and a.shape == q.shape], crossing


def _live_forward_kernels(jaxpr) -> int:
    """Splash's and cuDNN's forward kernels a jaxpr runs, after dead-code elimination (JAX leaves a recompute
    nothing reads in the jaxpr; XLA drops it), a scan's body counted once."""
    from jax._src.interpreters import partial_eval as pe
    from jax.extend import core

    def count(j):
        n = 0
        for e in j.eqns:
            n += e.primitive.name == "dot_product_attention_fwd_wrapper" or (
                e.primitive.name == "pallas_call" and "_fwd" in str(e.params["name"]))
            subs = [v for p in e.params.values() for v in (p if isinstance(p, (tuple, list)) else [p])]
            n += sum(count(v.jaxpr if isinstance(v, core.ClosedJaxpr) else v) for v in subs
                     if isinstance(v, (core.ClosedJaxpr, core.Jaxpr)))
        return n

    live, _ = pe.dce_jaxpr(jaxpr.jaxpr, [True] * len(jaxpr.jaxpr.outvars))
    return count(live)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_remat_policies_but_full_keep_the_attention_kernels_residuals(monkeypatch, impl):
    """A 2-layer model's loss and gradients: the backward pass runs splash's or cuDNN's forward kernel again only
    under remat="full" (save_dots used to recompute it, since a kernel's output is not a weight matmul's; so did
    save_all_but_mlp). Splash runs here (interpret mode): its gradients under each policy equal those without
    remat. cuDNN is traced as on a Hopper GPU."""
    from flax import nnx

    from zephyr_jax.model import Mistral, MistralConfig

    if impl == "cudnn":
        _traced_as_on_a_hopper_gpu(monkeypatch)
    dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 64, (2, 128)), jnp.int32)
    segments = _rows(128, ((1, 128),), ((1, 50), (2, 60)))
    grads = {}
    for remat in ["none", "full", "save_dots", "save_all_but_mlp", "offload"]:
        cfg = MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, dtype=dtype,
                            attention_impl=impl, remat=remat)
        graphdef, params = nnx.split(Mistral(cfg, rngs=nnx.Rngs(0)))

        def loss(params):
            x = nnx.merge(graphdef, params).hidden_states(ids, segment_ids=segments, max_segments=2)
            return jnp.sum(jnp.tanh(x.astype(jnp.float32)))

        kernels = _live_forward_kernels(jax.make_jaxpr(jax.value_and_grad(loss))(params))
        assert kernels == {"none": 1, "full": 2}.get(remat, 1), (remat, kernels)  # the forward scan's, the backward's
        if impl == "splash" and remat != "offload":  # (pinned host memory: TPU/GPU)
            grads[remat] = jax.grad(loss)(params)
    for remat, g in grads.items():
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), g, grads["none"])


def test_splash_compiles_to_a_mosaic_kernel_for_a_tpu_slice():
    """attend(impl="auto") under a mesh of v5e chips (compiled on this CPU with libtpu) is splash attention, per
    shard, forward and backward. In a child process: libtpu and its environment stay out of this one."""
    pytest.importorskip("libtpu")
    script = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding
from zephyr_jax.model.attention import _specs, attend
from zephyr_jax.compile_targets import tpu_target
from zephyr_jax.sharding import make_mesh

mesh = make_mesh((1, 2, 2), devices=tpu_target("v5e-4").devices)
arg = lambda shape, dtype, spec: jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))
q_spec, kv_spec, seg_spec = _specs(None)
args = (arg((2, 1024, 8, 128), jnp.bfloat16, q_spec), arg((2, 1024, 4, 128), jnp.bfloat16, kv_spec),
        arg((2, 1024, 4, 128), jnp.bfloat16, kv_spec), arg((2, 1024), jnp.int32, seg_spec))
loss = lambda q, k, v, s: attend(q, k, v, s, sliding_window=512).astype(jnp.float32).sum()
with jax.set_mesh(mesh):
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
print("KERNELS", text.count("tpu_custom_call"), "splash" in text)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    # forward, dq and dkv kernels
    assert "KERNELS 3 True" in out.stdout, out.stdout[-2000:]
