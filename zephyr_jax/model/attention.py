"""Attention kernels and masks.

Shapes: q [B, T, N, D]; k, v [B, S, K, D] with N = K * G (grouped-query attention). A query may attend to a
key when all of these hold:
  causal     the key's slot is not after the query's slot;
  window     query position - key position < sliding_window (HF's rule: a query sees `sliding_window` keys,
             itself included); positions, not slots, so a left-padded row sees the same tokens as it would alone;
  segments   both carry the same segment id (packed examples never see each other);
  valid      the key is a real token (attention_mask / filled cache slot).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def make_mask(q_slots, k_slots, q_positions, k_positions, *, key_valid=None, q_segments=None,
                   k_segments=None, sliding_window=None) -> jax.Array:
    """Boolean [B, 1, T, S] mask (True = may attend). Slots: [T] / [S]; positions, segments: [B, T] / [B, S]."""
    mask = (k_slots[None, :] <= q_slots[:, None])[None]  # [1, T, S]
    if sliding_window is not None:
        mask = mask & (q_positions[:, :, None] - k_positions[:, None, :] < sliding_window)
    if q_segments is not None:
        mask = mask & (q_segments[:, :, None] == k_segments[:, None, :])
    if key_valid is not None:
        mask = mask & key_valid[:, None, :].astype(bool)
    return mask[:, None]


def xla_attention(q, k, v, mask) -> jax.Array:
    """Plain einsum attention with float32 softmax; runs on every backend. Returns [B, T, N, D]."""
    b, t, n, d = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, d)  # group the query heads that share a key/value head
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d).astype(
        jnp.float32)
    # A finite minimum rather than -inf, so rows with no visible key (padding queries) stay NaN-free.
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def fused_attention(q, k, v, mask, *, sliding_window, implementation="auto") -> jax.Array:
    """jax.nn.dot_product_attention (cuDNN flash attention on GPU) for self-attention without a cache.

    Causality and the sliding window go to the kernel natively; segment ids and padding arrive in `mask`
    (None when the batch has neither), which cuDNN applies as an additive bias: correct, somewhat slower.
    implementation="auto" picks cuDNN on a GPU backend and the XLA version of the same call elsewhere (None),
    which is how the CPU tests check this wiring.
    """
    if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" else None
    if q.shape[1] != k.shape[1]:
        raise ValueError("fused attention is self-attention only; decoding with a KV cache uses xla_attention")
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, local_window_size=window,
                                        implementation=implementation)
