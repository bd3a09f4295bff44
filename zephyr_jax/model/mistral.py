"""Mistral-7B in Flax NNX, top to bottom: embedding -> N x (RMSNorm, GQA attention with RoPE, RMSNorm, SwiGLU)
-> RMSNorm -> LM head (its own, or the embedding's with tie_word_embeddings). Parameter names mirror Hugging
Face's so the weight mapping in hf.py is obvious.

Every parameter carries `logical_axes` metadata; sharding.py maps those names onto the device mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from zephyr_jax.model import kv_cache
from zephyr_jax.model.accumulate import scan_layers_into
from zephyr_jax.model.attention import attend, cache_attention, kernel_residuals_saveable
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
        # Checkpointed: the backward pass keeps x and the scale in the compute dtype and redoes this cheap pass,
        # where it kept float32 copies of x and of the normalized x (4x a bf16 layer activation, twice a layer,
        # under remat "none"). No CSE barrier: a recomputed layer's own recompute of the norm serves both.
        return jax.checkpoint(self._normalize, prevent_cse=False)(x, self.scale[...])

    def _normalize(self, x, scale):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF's product of the scale and the normalized x in the compute dtype, taken in float32 (exact for two
        # bf16 numbers) and rounded once: the same values, but the scale's gradient, a sum over every token,
        # is then summed in float32 rather than in bf16 (7% off over 2,048 tokens).
        as_compute = lambda a: a.astype(self.dtype).astype(jnp.float32)  # noqa: E731
        return (as_compute(scale) * as_compute(x32)).astype(self.dtype)


def rope_tables(positions, head_dim, theta, dtype):
    """cos, sin [B, T, head_dim] for HF's rotate-half RoPE, computed in float32 and cast to the activations' dtype
    (as HF casts them) once here rather than in every layer."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


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

    def __call__(self, x, cos, sin, segment_ids, cache=None, max_segments=None):
        """Training / scoring: attend(...) with the config's kernel over this row's segments. Prefill chunks and
        decoding: cache = a kv_cache.CacheStep; the new keys and values are written into it, then the queries
        attend over its first kv_length positions."""
        cfg = self.cfg
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cache is not None:
            # Kept as plain [B, T, heads * head_dim] products: left free to fold the head split into them,
            # XLA:TPU computed a decoding call's projections heads-major and copied the stacked q/k/v kernels
            # into that layout every call (a 7B in bf16 on one v4 chip: 1.5 GiB written and read, 1.5 GiB scratch).
            q, k, v = jax.lax.optimization_barrier((q, k, v))
        q = q.reshape(b, t, cfg.num_attention_heads, cfg.head_dim)
        k = k.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        v = v.reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"), cfg.sharding_rules)
        k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"), cfg.sharding_rules)
        q, k, v = (checkpoint_name(a, n) for a, n in ((q, "q"), (k, "k"), (v, "v")))
        if cache is None:
            out = attend(q, k, v, segment_ids, sliding_window=cfg.sliding_window, impl=cfg.attention_impl,
                         rules=cfg.sharding_rules, max_segments=max_segments)
        else:
            cache = cache.write(k, v)
            keys, values = cache.read()
            out = cache_attention(q, keys.astype(q.dtype), values.astype(q.dtype), cache.mask)
        out = checkpoint_name(out.reshape(b, t, cfg.num_attention_heads * cfg.head_dim), "attention")
        return self.o_proj(out), cache


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

    def __call__(self, x, cos, sin, segment_ids, cache=None, max_segments=None):
        attn_out, cache = self.self_attn(self.input_layernorm(x), cos, sin, segment_ids, cache, max_segments)
        x = checkpoint_name(x + attn_out, "attention_residual")
        x = x + self.mlp(self.post_attention_layernorm(x))
        return constrain(x, ("batch", "length", "embed"), self.rules), cache


def remat_policy(name: str):
    """What the backward pass keeps of a layer's forward (the rest is recomputed). "none" keeps everything.
    Every policy but "full" also keeps the attention kernel's residuals (attention.kernel_residuals_saveable):
    without them the backward pass would run splash's or cuDNN's forward kernel again."""
    policies = jax.checkpoint_policies
    attention_side = ("q", "k", "v", "attention", "attention_residual")
    # True (kept in device memory) for the kernel's residuals, else what `policy` says (it may say offload).
    with_kernel_residuals = lambda policy: lambda prim, *args, **params: (
        kernel_residuals_saveable(prim, *args, **params) or policy(prim, *args, **params))
    table = {
        "full": policies.nothing_saveable,  # keep only each layer's input: +1 forward of FLOPs, least memory
        # Keep weight matmul outputs: recompute the cheap ops.
        "save_dots": with_kernel_residuals(policies.dots_with_no_batch_dims_saveable),
        # Recompute the MLP's [T, 14336] gate and up only.
        "save_all_but_mlp": with_kernel_residuals(policies.save_only_these_names(*attention_side)),
        # Like save_dots, but the matmul outputs wait in pinned host memory (TPU/GPU) instead of HBM.
        "offload": with_kernel_residuals(policies.offload_dot_with_no_batch_dims("device", "pinned_host")),
    }
    return table[name]


def run_layers(layers: DecoderLayer, x, cos, sin, segment_ids, cache: kv_cache.CacheStep | None = None, *, remat="none",
               max_segments=None, unroll=False, grad_sum=None):
    """The decoder stack as one jax.lax.scan over the layers' stacked parameters, so XLA compiles one layer,
    not num_hidden_layers copies. `layers` is a DecoderLayer whose parameters carry a leading layer axis.
    cache: a CacheStep (decoding; its buffers ride in the scan's carry, so only the new tokens are written),
    or None (training, scoring). Returns (x, the updated KVCache or None). max_segments: see attention.attend.
    grad_sum: gradient accumulation's running sum of the layers' gradients; the backward pass adds into it in
    place (model/accumulate.py), recomputing each layer as remat="full" does.

    A pure scan over (parameters, inputs) rather than nnx.scan: nothing is written back into the module, so it
    also runs on a model merged from arrays of an outer trace (the frozen DPO reference inside value_and_grad).
    `layers` may instead be a list of DecoderLayers (per_layer_weights), run one after another (remat then does
    not apply: they are for decoding).
    """
    if isinstance(layers, (list, nnx.List)):
        if grad_sum is not None:  # gradient accumulation into the stacked layers' sum: nothing to add into here
            raise ValueError("grad_sum: per-layer weights (per_layer_weights) are for decoding; train the stacked "
                             "model")
        buffers = None if cache is None else (cache.k, cache.v)
        for i, layer in enumerate(layers):
            step = None if cache is None else cache._replace(k=buffers[0], v=buffers[1], layer=jnp.int32(i))
            x, step = layer(x, cos, sin, segment_ids, step, max_segments)
            buffers = None if step is None else (step.k, step.v)
        return x, None if buffers is None else KVCache(*buffers, heads_first=cache.heads_first)
    graphdef, stacked = nnx.split(layers)
    if grad_sum is not None:
        return scan_layers_into(graphdef, stacked, grad_sum, x, cos, sin, segment_ids, max_segments, unroll), None

    def body(carry, per_layer):
        x, buffers = carry
        state, layer = per_layer
        step = None if cache is None else cache._replace(k=buffers[0], v=buffers[1], layer=layer)
        x, step = nnx.merge(graphdef, state)(x, cos, sin, segment_ids, step, max_segments)
        return (x, None if step is None else (step.k, step.v)), None

    if remat != "none":  # unrolled, XLA's CSE would merge the recompute into the forward: remat undone
        body = jax.checkpoint(body, policy=remat_policy(remat), prevent_cse=bool(unroll))
    num_layers = jax.tree.leaves(stacked)[0].shape[0]
    buffers = None if cache is None else (cache.k, cache.v)
    (x, buffers), _ = jax.lax.scan(body, (x, buffers), (stacked, jnp.arange(num_layers)), unroll=unroll)
    return x, None if buffers is None else KVCache(*buffers, heads_first=cache.heads_first)


def stacked_layers(cfg: MistralConfig, rngs: nnx.Rngs) -> DecoderLayer:
    """num_hidden_layers decoder layers as one DecoderLayer with a leading "layers" axis on every parameter. The
    layers take the random stream one after another, as separate modules would, in a scan that carries it: one
    layer's program however deep the model (a Python loop of 32 layers stacked at the end took XLA:GPU 113 s to
    compile at 7B, the scan 2 s). Under jit, as training draws them, a seed gives the weights it always gave; op
    by op (no jit) a float32 draw's last bit may differ from before."""
    graphdef = None

    def draw(stream, _):
        nonlocal graphdef
        here = nnx.merge(rng_graph, stream)
        graphdef, layer = nnx.split(DecoderLayer(cfg, here))
        return nnx.state(here), layer

    rng_graph, stream = nnx.split(rngs)
    stream, stacked = jax.lax.scan(draw, stream, None, length=cfg.num_hidden_layers)
    nnx.update(rngs, stream)  # the draws after the layers (norm, LM head) continue the stream
    for _, param in nnx.iter_graph(stacked):
        if isinstance(param, nnx.Param):  # the sharding rules see the new axis (replicated by default)
            param.set_metadata("logical_axes", ("layers",) + tuple(param.get_metadata()["logical_axes"]))
    return nnx.merge(graphdef, stacked)


def per_layer_weights(model: "Mistral") -> "Mistral":
    """The model with each decoder layer's weights in buffers of their own (an nnx.List of DecoderLayers), for
    decoding on GPUs: there a layer's slice of the stacked weights is a copy, so each token read the weights,
    wrote and read them again (3x the bytes: 30% of the bandwidth bound for a 7B on an H200); the layers' own
    buffers are read where they lie. A new model beside `model` (the layer weights twice while both are held):
    the layers run one after another, not as a scan. A model already so is returned as it is."""
    if isinstance(model.layers, nnx.List):
        return model
    graphdef, stacked = nnx.split(model.layers)
    layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], stacked))
                       for i in range(model.config.num_hidden_layers)])
    for layer in layers:
        for _, param in nnx.iter_graph(layer):
            if isinstance(param, nnx.Param):  # the stack's axis is gone
                param.set_metadata("logical_axes", tuple(param.get_metadata()["logical_axes"])[1:])
    unstacked = nnx.merge(*nnx.split(model))
    unstacked.layers = layers
    return unstacked


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


def check_inputs(cfg: MistralConfig, input_ids, **others) -> None:
    """ValueError naming the input: ids that are not [batch, length] integers, another input of another shape
    (jax's broadcasting error named neither), and, when the ids are concrete (an eager call; jitted calls get
    checked ids), ids outside the vocabulary: jnp.take read -1 as the last row and filled vocab_size with NaN,
    which attention then spread over the whole row."""
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integer token ids of shape [batch, length], got {input_ids.dtype} "
                         f"{input_ids.shape}")
    for name, x in others.items():
        if x is not None and jnp.shape(x) != input_ids.shape:
            raise ValueError(f"{name} has shape {jnp.shape(x)}, input_ids {input_ids.shape}: they must match")
    if not isinstance(input_ids, jax.core.Tracer) and input_ids.size:
        ids = np.asarray(input_ids)  # numpy: under a trace, jnp's reductions of a constant are traced too
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"input_ids holds {lo if lo < 0 else hi}, outside the vocabulary [0, {cfg.vocab_size})")


class Mistral(nnx.Module):
    """Mistral-7B's architecture as an NNX module: `Mistral(MistralConfig(...), rngs=nnx.Rngs(seed))` draws random
    weights (zephyr_jax.load reads a checkpoint's). Parameter names mirror Hugging Face's, the decoder layers
    stacked on a leading axis (`layers.*`). `model(ids)`: all logits; `hidden_states`: the final norm's output,
    for the loss at chosen positions (logprobs.head_logps); `with_cache`: prefill and decoding over a KVCache."""

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
        attention_mask [B, T] (1 = real token, 0 = padding: left, right, or a gap, which positions skip).
        """
        return self.logits(self.hidden_states(input_ids, positions, segment_ids, attention_mask))

    def hidden_states(self, input_ids, positions=None, segment_ids=None, attention_mask=None, max_segments=None,
                      grad_sum=None):
        """The final norm's output [B, T, hidden] in the compute dtype: what the LM head reads. Training applies
        the head only at the loss positions (logprobs.head_logps). max_segments: the most sequences a row holds
        (static; GPU attention needs it for segment ids, see attention.attend). grad_sum: see run_layers."""
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        positions, segment_ids, attention_mask = (  # nested lists too, as input_ids (a list has no .astype)
            None if x is None else jnp.asarray(x) for x in (positions, segment_ids, attention_mask))
        check_inputs(cfg, input_ids, positions=positions, segment_ids=segment_ids, attention_mask=attention_mask)
        b, t = input_ids.shape
        if positions is None:  # counted before the mask joins the segment ids: a gap in it is no segment boundary
            real = jnp.ones((b, t), jnp.int32) if attention_mask is None else attention_mask
            positions = default_positions(real, segment_ids)
        if attention_mask is not None:  # padding is segment 0, which attends only to itself and carries no loss
            real = attention_mask.astype(jnp.int32)
            segment_ids = real if segment_ids is None else segment_ids * real
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)
        x, _ = run_layers(self.layers, self._embed(input_ids), cos, sin, segment_ids, remat=cfg.remat,
                          max_segments=max_segments, unroll=not cfg.scan_layers, grad_sum=grad_sum)
        return self.norm(x)

    def with_cache(self, input_ids, positions, cache: KVCache, rows=None, kv_length: int | None = None):
        """Runs input_ids [B, T] at positions [B, T] of cache rows `rows` [B] (None: row b is slot b), writing
        their keys and values at index = position and attending causally (and within the sliding window) over
        the first kv_length cache positions (static; default all). A prompt chunk for prefill, one token per
        row for decoding. Returns (final-norm hidden states [B, T, hidden], the updated cache): the caller
        applies `logits` where it needs them."""
        cfg = self.config
        kv_length = cache.max_length if kv_length is None else kv_length
        keys = jnp.arange(kv_length)
        mask = keys[None, None, :] <= positions[:, :, None]
        if cfg.sliding_window is not None:
            mask = mask & (positions[:, :, None] - keys[None, None, :] < cfg.sliding_window)
        step = kv_cache.CacheStep(cache.k, cache.v, jnp.zeros((), jnp.int32), rows, positions, mask[:, None],
                                  cache.heads_first)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta, cfg.dtype)
        x, cache = run_layers(self.layers, self._embed(input_ids), cos, sin, None, step,
                              unroll=not cfg.scan_layers)
        return self.norm(x), cache

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
