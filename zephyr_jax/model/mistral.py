"""Mistral-7B in Flax NNX, top to bottom: embedding -> N x (RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU)
-> RMSNorm -> untied LM head. Parameter names mirror Hugging Face's so the weight mapping in hf.py is obvious.

Every parameter carries `logical_axes` metadata; sharding.py maps those names onto the device mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from zephyr_jax.model.attention import attend, make_mask, xla_attention

from zephyr_jax.model.config import MistralConfig
from zephyr_jax.model.kv_cache import KVCache
from zephyr_jax.sharding import constrain

class Linear(nnx.Module):
    """y = x @ kernel (no bias); kernel [in, out] is HF's weight transposed."""

    def __init__(self, in_features, out_features, axes, cfg: MistralConfig, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), cfg.param_dtype),
                                logical_axes=axes)
        self.dtype = cfg.dtype

    def __call__(self, x):
        return jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 and cast back to the compute dtype (as HF does)."""

    def __init__(self, cfg: MistralConfig):
        self.scale = nnx.Param(jnp.ones((cfg.hidden_size,), cfg.param_dtype), logical_axes=("norm",))
        self.eps, self.dtype = cfg.rms_norm_eps, cfg.dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def rope_tables(positions, head_dim, theta):
    """cos, sin [B, T, head_dim] in float32 for HF's rotate-half RoPE."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, H, D]: x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1]."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


class Attention(nnx.Module):
    def __init__(self, cfg: MistralConfig, rngs: nnx.Rngs):
        h, d, n, k = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
        self.q_proj = Linear(h, n * d, ("embed", "heads"), cfg, rngs)
        self.k_proj = Linear(h, k * d, ("embed", "kv_heads"), cfg, rngs)
        self.v_proj = Linear(h, k * d, ("embed", "kv_heads"), cfg, rngs)
        self.o_proj = Linear(n * d, h, ("heads", "embed"), cfg, rngs)
        self.cfg = cfg

    def __call__(self, x, cos, sin, segment_ids, cache_kv=None, cache_mask=None, cache_index=None,
                 max_segments=None):
        """Training / scoring: attend(...) with the config's kernel over this row's segments. Decoding:
        cache_kv = (k, v) [B, S, K, D], the new keys and values written at cache_index, then einsum attention
        over the cache under cache_mask [B, 1, T, S]."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"), cfg.sharding_rules)
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"), cfg.sharding_rules)
        q, k, v = (checkpoint_name(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
        if cache_kv is None:
            out = attend(q, k, v, segment_ids, sliding_window=cfg.sliding_window, impl=cfg.attention_impl,
                         rules=cfg.sharding_rules, max_segments=max_segments)
        else:
            k = jax.lax.dynamic_update_slice_in_dim(cache_kv[0], k.astype(cache_kv[0].dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cache_kv[1], v.astype(cache_kv[1].dtype), cache_index, axis=1)
            cache_kv = (k, v)
            out = xla_attention(q, k.astype(q.dtype), v.astype(q.dtype), cache_mask)
        out = checkpoint_name(out.reshape(b, t, cfg.num_attention_heads * cfg.head_dim), "attention")
        return self.o_proj(out), cache_kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: MistralConfig, rngs: nnx.Rngs):
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, ("embed", "mlp"), cfg, rngs)
        self.up_proj = Linear(h, i, ("embed", "mlp"), cfg, rngs)
        self.down_proj = Linear(i, h, ("mlp", "embed"), cfg, rngs)
        self.rules = cfg.sharding_rules

    def __call__(self, x):
        hidden = jax.nn.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(constrain(hidden, ("batch", "length", "mlp"), self.rules))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: MistralConfig, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg)
        self.mlp = MLP(cfg, rngs)
        self.rules = cfg.sharding_rules

    def __call__(self, x, cos, sin, segment_ids, cache_kv=None, cache_mask=None, cache_index=None,
                 max_segments=None):
        attn_out, cache_kv = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, cache_kv, cache_mask,
                                            cache_index, max_segments)
        x = checkpoint_name(x + attn_out, "attention_residual")
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "embed"), self.rules), cache_kv


def remat_policy(name: str):
    """What the backward pass keeps of a layer's forward (the rest is recomputed). "none" keeps everything."""
    policies = jax.checkpoint_policies
    attention_side = ("q", "k", "v", "attention", "attention_residual")
    table = {
        "full": policies.nothing_saveable,  # keep only each layer's input: +1 forward of FLOPs, least memory
        "save_dots": policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs: recompute the cheap ops
        "save_all_but_mlp": policies.save_only_these_names(*attention_side),  # recompute the [T, 14336] MLP only
        # Like save_dots, but the matmul outputs wait in pinned host memory (TPU/GPU) instead of HBM.
        "offload": policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }
    return table[name]


def run_layers(layers: DecoderLayer, x, cos, sin, segment_ids, cache=None, cache_mask=None, *, remat="none",
               max_segments=None, unroll=False):
    """The decoder stack as one jax.lax.scan over the layers' stacked parameters, so XLA compiles one layer,
    not num_hidden_layers copies. `layers` is a DecoderLayer whose parameters carry a leading layer axis.
    cache: (k, v) stacked [L, B, S, K, D] and the write index (decoding), or None (training, prefill-free).
    Returns (x, new (k, v) or None). max_segments: see attention.attend (the cuDNN kernel needs it).

    A pure scan over (parameters, inputs) rather than nnx.scan: nothing is written back into the module, so it
    also runs on a model merged from arrays of an outer trace (the frozen DPO reference inside value_and_grad).
    """
    graphdef, stacked = nnx.split(layers)
    index = None if cache is None else cache[2]

    def body(x, per_layer):
        state, kv = per_layer
        return nnx.merge(graphdef, state)(x, cos, sin, segment_ids, kv, cache_mask, index, max_segments)

    if remat != "none":
        body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=False)
    return jax.lax.scan(body, x, (stacked, None if cache is None else cache[:2]), unroll=unroll)


def stacked_layers(cfg: MistralConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """num_hidden_layers decoder layers as one DecoderLayer with a leading "layers" axis on every parameter. The
    layers are drawn one after another, as separate modules would be, so a seed gives the same weights as ever."""
    layers = [DecoderLayer(cfg, rngs) for _ in range(cfg.num_hidden_layers)]
    graphdef, first = nnx.split(layers[0])
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), first, *[nnx.state(layer) for layer in layers[1:]])
    for _, param in nnx.iter_graph(stacked):
        if isinstance(param, nnx.Param):  # the sharding rules see the new axis (replicated by default)
            param.set_metadata("logical_axes", ("layers",) + tuple(param.get_metadata()["logical_axes"]))
    return nnx.merge(graphdef, stacked)


def default_positions(attention_mask, segment_ids):
    """Position ids when none are given: count real tokens (so left padding does not shift RoPE), restarting
    at 0 at every segment boundary of a packed row."""
    counted = attention_mask.astype(jnp.int32)
    if segment_ids is not None:
        new_segment = jnp.concatenate(
            [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        # Restart the running count at each boundary: subtract the count reached just before the segment began.
        total = jnp.cumsum(counted, axis=1)
        start = jnp.where(new_segment, total - counted, 0)
        start = jax.lax.cummax(start, axis=1)
        return jnp.maximum(total - start - 1, 0)
    return jnp.maximum(jnp.cumsum(counted, axis=1) - 1, 0)


class Mistral(nnx.Module):
    def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        init = jax.nn.initializers.normal(cfg.initializer_range)
        self.embed_tokens = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.hidden_size), cfg.param_dtype),
                                      logical_axes=("vocab", "embed"))
        self.layers = stacked_layers(cfg, rngs)
        self.norm = RMSNorm(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), cfg, rngs)

    def __call__(self, input_ids, positions=None, segment_ids=None, attention_mask=None):
        """Logits [B, T, vocab] in float32.

        input_ids [B, T]; positions [B, T] (default: counted from attention_mask / segment_ids);
        segment_ids [B, T] (packed rows: a token attends only inside its own segment; 0 = padding);
        attention_mask [B, T] (1 = real token, 0 = padding, left or right).
        """
        return self.logits(self.hidden_states(input_ids, positions, segment_ids, attention_mask))

    def hidden_states(self, input_ids, positions=None, segment_ids=None, attention_mask=None, max_segments=None):
        """The final norm's output [B, T, hidden] in the compute dtype: what the LM head reads. Training applies
        the head only at the loss positions (losses.head_logps). max_segments: the most sequences a row holds
        (static; GPU attention needs it for segment ids, see attention.attend)."""
        cfg = self.config
        b, t = input_ids.shape
        if attention_mask is not None:  # padding is segment 0, which attends only to itself and carries no loss
            real = attention_mask.astype(jnp.int32)
            segment_ids = real if segment_ids is None else segment_ids * real
        if positions is None:
            real = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
            positions = default_positions(real, segment_ids)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        x, _ = run_layers(self.layers, self._embed(input_ids), cos, sin, segment_ids, remat=cfg.remat,
                          max_segments=max_segments, unroll=not cfg.scan_layers)
        return self.norm(x)

    def with_cache(self, input_ids, cache: KVCache, attention_mask=None):
        """Appends `input_ids` [B, T] to the cache (a prompt for prefill, one token per decoding step).

        Returns (logits of the last new token [B, vocab] float32, updated cache). attention_mask [B, T] marks
        real tokens (left padding of the prompt); their positions continue from the cache's per-row lengths.
        """
        cfg = self.config
        b, t = input_ids.shape
        real = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask.astype(jnp.int32)
        positions = cache.lengths[:, None] + jnp.cumsum(real, axis=1) - 1
        key_positions = jax.lax.dynamic_update_slice_in_dim(
            cache.positions, jnp.where(real > 0, positions, -1), cache.index, axis=1)
        q_slots = cache.index + jnp.arange(t)
        k_slots = jnp.arange(cache.max_length)
        mask = make_mask(q_slots, k_slots, positions, key_positions, key_valid=key_positions >= 0,
                         sliding_window=cfg.sliding_window)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        x, (k, v) = run_layers(self.layers, self._embed(input_ids), cos, sin, None, (cache.k, cache.v, cache.index),
                               mask, unroll=not cfg.scan_layers)
        logits = self.logits(self.norm(x[:, -1:]))[:, 0]
        cache = KVCache(k=k, v=v, positions=key_positions, lengths=cache.lengths + real.sum(axis=1),
                        index=cache.index + t)
        return logits, cache

    def _embed(self, input_ids):
        x = jnp.take(self.embed_tokens[...], input_ids, axis=0).astype(self.config.dtype)
        return constrain(x, ("batch", "length", "embed"), self.config.sharding_rules)

    def head_kernel(self):
        """The LM head's [hidden, vocab] matrix (the embedding's transpose when tied)."""
        return self.embed_tokens[...].T if self.config.tie_word_embeddings else self.lm_head.kernel[...]

    def logits(self, x):
        """The LM head on hidden states [B, T, hidden]: float32 logits [B, T, vocab]."""
        w = self.head_kernel().astype(self.config.dtype)
        logits = jnp.dot(x.astype(self.config.dtype), w, preferred_element_type=jnp.float32)
        return constrain(logits, ("batch", "length", "vocab"), self.config.sharding_rules)
