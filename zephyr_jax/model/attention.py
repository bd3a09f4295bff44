"""Attention kernels and masks.

`attend` is self-attention for training and scoring (no KV cache), with the kernel picked by platform:
Pallas splash attention on TPUs, cuDNN flash attention on GPUs, einsum attention (`xla_attention` under
`make_mask`) elsewhere. Decoding with the KV cache (Mistral.with_cache) builds its causal / window mask over
cache positions and calls `cache_attention`, the same einsum attention over the cache's layouts.

Shapes: q [B, T, N, D]; k, v [B, S, K, D] with N = K * G (grouped-query attention). A query may attend to a
key when all of these hold:
  causal     the key's slot is not after the query's slot;
  window     query slot - key slot < sliding_window (HF's rule: a query sees `sliding_window` keys, itself
             included); a sequence's tokens are contiguous slots, so a padded or packed one sees the tokens it
             would alone (the KV cache counts cache positions, which are its slots);
  segments   both carry the same segment id (packed examples never see each other; padding is segment 0).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from zephyr_jax import sharding
from zephyr_jax.model.config import ATTENTION_IMPLS

CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Before jax 0.11.1 its cuDNN front end strided packed K/V offsets by the query heads (fixed in jax-ml/jax#39521,
# "Fix cuDNN packed-attention kv_offsets for GQA/MQA"): grouped K/V read the wrong keys there, unless repeated.
PACKED_KV_STRIDED_BY_QUERY_HEADS = jax.__version_info__ < (0, 11, 1)

# A flash kernel's backward reads its forward's output and log-sum-exp. Under a remat policy that keeps them
# (kernel_residuals_saveable), the backward pass does not run the forward kernel a second time.
KERNEL_RESIDUALS = "attention_kernel_residuals"  # the name splash gives them (residual_checkpoint_name)
_CUDNN_FORWARD = "dot_product_attention_fwd_wrapper"  # jax's cuDNN forward primitive: its residuals have no name
_NAMED_KERNEL_RESIDUALS = jax.checkpoint_policies.save_only_these_names(KERNEL_RESIDUALS)


def kernel_residuals_saveable(prim, *args, **params) -> bool:
    """A jax.checkpoint policy: keep what the splash or cuDNN forward kernel hands its backward kernel (about a
    layer's attention output in bytes), so the backward pass runs no second forward kernel. Einsum attention has
    no such residuals: its probabilities are recomputed as the policy it joins says."""
    return prim.name == _CUDNN_FORWARD or _NAMED_KERNEL_RESIDUALS(prim, *args, **params)


def make_mask(length: int, segment_ids=None, sliding_window=None) -> jax.Array:
    """Boolean [B, 1, T, T] self-attention mask (True = may attend) over T = `length` slots; segment_ids: [B, T]
    (None: one sequence a row, B = 1 broadcasting)."""
    slots = jnp.arange(length)
    mask = (slots[None, :] <= slots[:, None])[None]  # causal; slot distances are position distances in a segment
    if sliding_window is not None:
        mask = mask & (slots[:, None] - slots[None, :] < sliding_window)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask[:, None]


def _probabilities(scores, visible, head_dim: int, dtype) -> jax.Array:
    """softmax(scores / sqrt(head_dim)) in float32 over the visible keys (last axis), cast to `dtype`. Hidden keys
    get a finite minimum rather than -inf, so rows with no visible key (padding queries) stay NaN-free."""
    scores = scores / jnp.sqrt(head_dim).astype(jnp.float32)
    return jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(jnp.float32).min), axis=-1).astype(dtype)


def xla_attention(q, k, v, mask) -> jax.Array:
    """Plain einsum attention with float32 softmax; runs on every backend. Returns [B, T, N, D]."""
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, d)  # group the query heads that share a key/value head
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    probs = _probabilities(scores, mask[:, :, None], d, v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def cache_attention(q, k, v, mask) -> jax.Array:
    """xla_attention over the KV cache's read layout (model/kv_cache.py): q [B, T, N, D], keys and values
    [B, K, S, D], mask [B, 1, T, S]. Returns [B, T, N, D]. The queries of a KV head (its G heads at T positions)
    are one [G * T, D] block, so both products are plain batched matmuls over (B, K) with nothing transposed."""
    b, t, n, d = q.shape
    kv_heads, s = k.shape[1], k.shape[2]
    g = n // kv_heads
    q = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, d)
    scores = jnp.einsum("bkmd,bksd->bkms", q, k, preferred_element_type=jnp.float32)
    visible = jnp.broadcast_to(mask[:, :, None], (b, 1, g, t, s)).reshape(b, 1, g * t, s)
    probs = _probabilities(scores, visible, d, v.dtype)
    out = jnp.einsum("bkms,bksd->bkmd", probs, v)
    return out.reshape(b, kv_heads, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


# ---------------------------------------------------------------------------------------------------------
# attend: one entry point, the kernel chosen by platform.


def attend(q, k, v, segment_ids, *, sliding_window, impl="auto", rules=None, interpret=None,
           max_segments=None) -> jax.Array:
    """Causal self-attention for training and scoring (no KV cache; prefill and decoding: cache_attention).
    Returns [B, T, N, D] in q's dtype.

    q [B, T, N, D]; k, v [B, T, K, D] with N = K * G. segment_ids [B, T] int32, or None (every token real, one
    sequence per row): 0 marks padding, ids >= 1 packed sequences, each contiguous with positions restarting at 0,
    so the window applies on slots. A query sees a key when the key's slot is not after its own, both carry the
    same segment id, and (sliding_window not None) query slot - key slot < sliding_window. Padding queries give
    finite values of no meaning.

    impl: "xla" einsum attention under a dense mask (any backend); "splash" Pallas TPU splash attention;
    "cudnn" cuDNN flash attention (NVIDIA GPUs, bf16/fp16); "auto" the platform's kernel (the mesh's devices under
    `jax.set_mesh`, else jax.default_backend()): splash on TPUs when T is a multiple of 128, cudnn on GPUs when
    the dtype, head size and `max_segments` allow it, xla otherwise.
    rules: logical-axis rules (None: sharding.DEFAULT_RULES); under a mesh the kernels run per shard (shard_map)
    with batch and heads split as the rules say; length and head_dim must not be split.
    interpret: run the Pallas kernel in interpret mode (None: unless the platform is a TPU); splash only.
    max_segments: cudnn only, static (segment ids are traced): the most sequences one row holds. None: unknown,
    which the cudnn path refuses when segment_ids are given. 1: one right-padded sequence per row (cuDNN's
    sequence lengths). > 1: packed rows (cuDNN's segment offsets, Hopper or newer). Rows the stated layout cannot
    describe (more sequences, a sequence not starting at slot 0 when 1, an id used by two runs) raise a ValueError
    when segment_ids are concrete and come out NaN under jit, so the loss shows it: never a mask ignored.
    """
    _check_shapes(q, k, v, segment_ids)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention impl {impl!r}: expected one of {ATTENTION_IMPLS}")
    platform = _platform()
    if impl == "auto":
        impl = _auto_impl(platform, q, k, segment_ids, max_segments, rules)
    if impl == "xla":
        return _xla_self_attention(q, k, v, segment_ids, sliding_window).astype(q.dtype)
    if impl == "splash":
        _check_splash(q)
        interpret = platform != "tpu" if interpret is None else interpret
        kernel = functools.partial(_splash, sliding_window=sliding_window, interpret=bool(interpret))
    else:
        _check_cudnn(q, segment_ids, max_segments, platform)
        kernel = functools.partial(_cudnn, sliding_window=sliding_window, max_segments=max_segments)
    return _per_shard(kernel, q, k, v, segment_ids, rules).astype(q.dtype)


def _check_shapes(q, k, v, segment_ids):
    b, t, n, d = q.shape
    if k.shape != v.shape or k.shape[:2] != (b, t) or k.shape[3] != d or n % k.shape[2]:
        raise ValueError(f"attend is self-attention with grouped heads: q {q.shape} [B, T, N, D] needs k, v "
                         f"[B, T, K, D] with N a multiple of K; got k {k.shape}, v {v.shape}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids {segment_ids.shape} must be [B, T] = {(b, t)}")


def _platform() -> str:
    """The platform the program is traced for: the mesh's devices (which may be a TPU slice compiled for from a
    CPU host), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _auto_impl(platform, q, k, segment_ids, max_segments, rules) -> str:
    """The platform's kernel where its static requirements hold, else einsum attention."""
    if _shard_problem(q, k, rules):
        return "xla"
    if platform == "tpu" and q.shape[1] % 128 == 0:
        return "splash"
    if platform == "gpu" and q.dtype in CUDNN_DTYPES and q.shape[3] % 8 == 0 and q.shape[3] <= 256 and \
            (segment_ids is None or max_segments == 1 or (max_segments is not None and _hopper_or_newer())):
        return "cudnn"
    return "xla"


def _hopper_or_newer() -> bool:
    """cuDNN's packed (segment offsets) layout needs compute capability 9.0 or newer (H100, H200); on an A100,
    packed rows take einsum attention. The GPU asked is the mesh's under `jax.set_mesh` (which may be a GPU
    topology compiled for from a host without one, as the planner does), else the first local GPU."""
    from jax._src import mesh as mesh_lib

    try:
        mesh = mesh_lib.get_concrete_mesh()
        device = mesh.devices.flat[0] if mesh is not None and not mesh.empty else jax.devices("gpu")[0]
        return float(device.compute_capability) >= 9.0
    except Exception:  # no GPU or no capability reported: do not assume the packed layout works
        return False


def _xla_self_attention(q, k, v, segment_ids, sliding_window):
    return xla_attention(q, k, v, make_mask(q.shape[1], segment_ids, sliding_window))


# ---------------------------------------------------------------------------------------------------------
# Sharding: Pallas and cuDNN calls run per shard, batch and heads split as the rules say.


def _specs(rules):
    rules = sharding.DEFAULT_RULES if rules is None else rules
    return (sharding.logical_to_spec(("batch", "length", "heads", "head_dim"), rules),
            sharding.logical_to_spec(("batch", "length", "kv_heads", "head_dim"), rules),
            sharding.logical_to_spec(("batch", "length"), rules))


def _split(entry, sizes) -> int:
    """How many ways a PartitionSpec entry (None, an axis name, or a tuple of them) splits its dimension."""
    return math.prod(sizes[a] for a in _split_axes(entry, sizes))


def _split_axes(entry, sizes) -> tuple:
    """The mesh axes of more than one device that a PartitionSpec entry splits its dimension over."""
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in names if sizes[a] > 1)


def _shard_problem(q, k, rules) -> str | None:
    """Why the kernels cannot run per shard under the enclosing mesh (None: they can, or there is no mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    q_spec, kv_spec, _ = _specs(rules)
    for spec, x, heads in ((q_spec, q, "heads"), (kv_spec, k, "kv_heads")):
        if _split(spec[1], sizes) > 1 or _split(spec[3], sizes) > 1:
            return (f"attention kernels need whole sequences and heads on each device; the rules split length or "
                    f"head_dim ({spec} over {sizes}): map them to None, or use impl='xla'")
        if x.shape[2] % _split(spec[2], sizes) or x.shape[0] % _split(spec[0], sizes):
            return (f"{x.shape[2]} {heads} and batch {x.shape[0]} must divide over the mesh axes {spec[2]} and "
                    f"{spec[0]} ({sizes}): change the mesh or use impl='xla'")
    # A shard's query heads attend to that shard's KV heads: the grouping holds only if both split alike.
    q_heads, kv_heads = (_split_axes(spec[2], sizes) for spec in (q_spec, kv_spec))
    if q_heads != kv_heads:
        name = lambda axes: " x ".join(axes) or "none"  # noqa: E731
        return (f"heads and kv_heads must split over the same mesh axes ({name(q_heads)} and {name(kv_heads)}, "
                f"{sizes}) for the kernels' grouped heads: change the rules (config.mesh.rules) or use impl='xla'")
    return None


def _per_shard(kernel, q, k, v, segment_ids, rules):
    """kernel(q, k, v, segment_ids) on each device's shard under the enclosing mesh (XLA cannot partition a
    Pallas or cuDNN custom call itself); a plain call without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, segment_ids)
    problem = _shard_problem(q, k, rules)
    if problem:
        raise ValueError(problem)
    q_spec, kv_spec, seg_spec = _specs(rules)
    if segment_ids is None:
        fn = jax.shard_map(lambda q, k, v: kernel(q, k, v, None), in_specs=(q_spec, kv_spec, kv_spec),
                           out_specs=q_spec, check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec, check_vma=False)
    return fn(q, k, v, segment_ids)


# ---------------------------------------------------------------------------------------------------------
# TPU: Pallas splash attention.

SPLASH_BLOCKS = (512, 256, 128)  # the largest that divides T; 512 is what MaxText uses on v5e/v6e


def _check_splash(q):
    t = q.shape[1]
    if t % 128:
        raise ValueError(f"splash attention needs T (sequence length) a multiple of 128; got T={t}: pad the batch "
                         "to a multiple of 128 or use impl='xla'")


def _splash(q, k, v, segment_ids, *, sliding_window, interpret):
    """Splash attention on one shard: causal, or local (W - 1 keys back) for a sliding window, with segment ids;
    the grouped-head (GQA) form of the kernel, so K/V are not repeated. [B, T, N, D] -> [B, T, N, D]."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    _, t, n, d = q.shape
    if sliding_window is None or sliding_window >= t:
        head_mask = masks.CausalMask((t, t))
    else:
        head_mask = masks.LocalMask((t, t), window_size=(sliding_window - 1, 0), offset=0)
    block = next(b for b in SPLASH_BLOCKS if t % b == 0)
    blocks = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                               block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([head_mask] * n), block_sizes=blocks, head_shards=1,
                                    q_seq_shards=1, residual_checkpoint_name=KERNEL_RESIDUALS, interpret=interpret)
    heads_first = lambda x: x.swapaxes(1, 2)  # the kernel takes [heads, T, D] per batch row
    q = heads_first(q * (1 / math.sqrt(d))).astype(q.dtype)  # the kernel does not scale
    k, v = heads_first(k), heads_first(v)
    if segment_ids is None:
        out = jax.vmap(kernel)(q, k, v)
    else:
        rows = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
        out = jax.vmap(rows)(q, k, v, segment_ids.astype(jnp.int32))
    return heads_first(out)


# ---------------------------------------------------------------------------------------------------------
# GPU: cuDNN flash attention, padding and packing as sequence lengths / offsets (no dense mask).


def segment_offsets(segment_ids, max_segments: int):
    """segment_ids [B, T] -> (lengths, offsets, ok): the rows in the form cuDNN's fused attention takes them.

    A sequence is a run of equal non-zero ids. max_segments == 1: lengths [B] int32 (the first run's length; the
    kernel reads a right-padded row), offsets None. max_segments = M > 1: lengths [B, M] and offsets [B, M + 1]
    int32, each run's length and start slot, -1 where a row has fewer runs. ok [B] bool: the row is exactly what
    lengths/offsets describe (at most M runs; with M == 1 the run starts at slot 0; no id in two runs)."""
    ids = segment_ids.astype(jnp.int32)
    b, t = ids.shape
    real = ids > 0
    previous = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), ids[:, :-1]], axis=1)
    starts = real & (ids != previous)
    count = starts.sum(axis=1)
    run = jnp.cumsum(starts, axis=1) - 1  # each real token's run index
    slots = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments, fill_value=-1)[0])(starts).astype(jnp.int32)
    found = slots >= 0  # [B, M]
    lengths = ((run[:, None, :] == jnp.arange(max_segments)[None, :, None]) & real[:, None, :]).sum(axis=2)
    lengths = jnp.where(found, lengths, -1).astype(jnp.int32)
    run_ids = jnp.where(found, jnp.take_along_axis(ids, jnp.maximum(slots, 0), axis=1), -1)
    shared = (run_ids[:, :, None] == run_ids[:, None, :]) & found[:, :, None] & ~jnp.eye(max_segments, dtype=bool)
    ok = (count <= max_segments) & ~shared.any(axis=(1, 2))
    if max_segments == 1:
        ok &= (count == 0) | (slots[:, 0] == 0)
        return jnp.maximum(lengths[:, 0], 0), None, ok
    offsets = jnp.concatenate([slots, jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return lengths, offsets, ok


def _check_cudnn(q, segment_ids, max_segments, platform):
    if q.dtype not in CUDNN_DTYPES:
        raise ValueError(f"cuDNN flash attention takes bfloat16 or float16, not {q.dtype}: compute in bfloat16 "
                         "or use impl='xla'")
    if segment_ids is not None:
        if max_segments is None or max_segments < 1:
            raise ValueError("impl='cudnn' with segment ids needs max_segments (static): the most sequences one "
                             "row holds, 1 for right-padded rows; or use impl='xla'")
        if not isinstance(segment_ids, jax.core.Tracer):  # concrete ids: say which rows now rather than NaN later
            with jax.ensure_compile_time_eval():  # even inside a trace that closed over them
                ok = jax.jit(segment_offsets, static_argnums=1)(segment_ids, max_segments)[2]
            bad = np.flatnonzero(~np.asarray(ok)).tolist()
            if bad:
                layout = "one sequence from slot 0" if max_segments == 1 else f"{max_segments} sequences"
                raise ValueError(f"rows {bad} of segment_ids do not fit max_segments={max_segments} ({layout} per "
                                 "row, each id one contiguous run): raise max_segments or use impl='xla'")
    if platform != "gpu":
        raise ValueError(f"impl='cudnn' runs on NVIDIA GPUs; this program is for {platform}: use impl='auto' or "
                         "'xla'")


# The masks below are [B, T] and broadcast inside each rule. As plain jnp.where calls under the layer scan, JAX
# hoists the loop-invariant broadcast masks (and the zero / NaN fills) out of the loop as full [B, T, N, D]
# residuals, which every layer then reads: on XLA:GPU (an H200, the 1B model's 16 x 2,048 SFT step) 640 MiB a
# layer for the output's select where 256 do.
@jax.custom_vjp
def _zero_cotangent_outside(x, real):
    """x unchanged; its cotangent zeroed where real [B, T] is False (where the kernel wrote no gradient rows)."""
    return x


def _zero_cotangent_outside_fwd(x, real):
    return x, real


def _zero_cotangent_outside_bwd(real, g):
    return jnp.where(real[:, :, None, None], g, jnp.zeros((), g.dtype)), None


_zero_cotangent_outside.defvjp(_zero_cotangent_outside_fwd, _zero_cotangent_outside_bwd)


@jax.custom_vjp
def _keep_rows(x, keep, fill):
    """where(keep [B, T], x, fill [B]) over x [B, T, N, D]: slots the kernel left unwritten get their row's fill."""
    return jnp.where(keep[:, :, None, None], x, fill[:, None, None, None])


def _keep_rows_fwd(x, keep, fill):
    return _keep_rows(x, keep, fill), keep


def _keep_rows_bwd(keep, g):
    return jnp.where(keep[:, :, None, None], g, jnp.zeros((), g.dtype)), None, None


_keep_rows.defvjp(_keep_rows_fwd, _keep_rows_bwd)


def _cudnn(q, k, v, segment_ids, *, sliding_window, max_segments):
    """cuDNN flash attention on one shard, the mask as causal + window + sequence lengths/offsets."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_attention

    if sliding_window is not None and sliding_window >= q.shape[1]:  # never binds: plain causal, cuDNN's main path
        sliding_window = None
    call = functools.partial(cudnn_attention, scale=1 / math.sqrt(q.shape[3]), sliding_window_length=sliding_window)
    if segment_ids is None:
        return call(q, k, v, mask_type=MaskType.CAUSAL)
    lengths, offsets, ok = segment_offsets(segment_ids, max_segments)
    # cuDNN writes no output or dq/dk/dv rows at slots outside every sequence and reads none of them (but an
    # all-padding row's slot 0, below): the output's rows there are replaced, and the cotangents of q, k, v zeroed
    # there, so whatever the backward kernel left in those rows goes nowhere.
    real = segment_ids > 0
    q, k, v = (_zero_cotangent_outside(x, real) for x in (q, k, v))
    if offsets is None:
        # An all-padding row as a one-token sequence: its output is zeroed below, and no sequence is empty.
        lengths = jnp.maximum(lengths, 1)
        out = call(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, mask_type=MaskType.PADDING_CAUSAL)
    else:
        if PACKED_KV_STRIDED_BY_QUERY_HEADS:  # K/V in with as many heads as q, at G times their bytes
            groups = q.shape[2] // k.shape[2]
            k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        out = call(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets, kv_offsets=offsets,
                   mask_type=MaskType.PADDING_CAUSAL)
    # cuDNN leaves padding queries unwritten: zeros there; rows the lengths/offsets misdescribe: NaN, loud not wrong
    return _keep_rows(out, real & ok[:, None], jnp.where(ok, 0, jnp.nan).astype(out.dtype))
