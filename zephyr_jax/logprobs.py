"""Per-token log-probabilities without a float32 [B, T, V] array: what every loss in losses.py is built from.

* `token_logps(logits, targets)`: log softmax(logits)[targets], float32 [B, T], worked through the sequence in
  chunks so that neither the forward nor the backward pass holds a float32 [B, T, V] log-softmax (for Mistral's
  V = 32000 that array is B * T * 125 KiB: 500 MiB at B=4, T=1024, twice the bf16 logits themselves).
  bench/logps_memory.py measures the compiled temporary memory.
* `head_logps(hidden, kernel, targets)` fuses the LM head into the chunked log-softmax: it takes the final-norm
  hidden states [B, K, E] and the head kernel [E, V] instead of logits, and computes each chunk's float32 logits
  [B, chunk, V] inside the loop, so no float32 [B, K, V] array exists in the forward or the backward pass (nor
  the logits' gradient: its backward turns each chunk's d_logits straight into d_hidden and a float32 d_kernel
  sum). Its forward keeps only the [B, K] logsumexp; the backward recomputes the chunk's logits, one more head
  matmul per chunk. It is tested against the full-head path (logits, then `token_logps`). The train step runs it
  at the loss positions.

Both are custom VJPs over a `jax.lax.fori_loop` of chunks. Targets are already aligned with the logits
(targets[:, t] is the token that logits[:, t] predicts); out-of-range targets are clipped into the vocabulary, so
masked positions may hold anything (a pad id, -100, ...). Every log-prob is float32 whatever the input dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

DEFAULT_CHUNK_SIZE = 256

# ---------------------------------------------------------------------------------------------------------
# Per-token log-probabilities, chunked over the sequence
# ---------------------------------------------------------------------------------------------------------


def _num_chunks(length: int, chunk: int) -> tuple[int, int]:
    """Number of chunks and the chunk size actually used for a sequence of `length` tokens."""
    chunk = max(1, min(int(chunk), length))
    return -(-length // chunk), chunk


def _chunk_start(i, length: int, chunk: int):
    # The last chunk is slid back so that it ends at `length` instead of being padded: it overlaps the one
    # before it, recomputes identical values there, and overwrites them. This avoids copying the logits into
    # a padded [B, T', V] buffer; every position is computed by at least one chunk and written with the same
    # value by each chunk that covers it.
    return jnp.minimum(i * chunk, length - chunk)


def _chunk_stats(x, t):
    """float32 logsumexp and target log-prob of one chunk, and whether the target is the (first) argmax. x: [B, C, V]
    any float dtype, t: [B, C] int."""
    # A gather of the target logits rather than a one-hot select-and-sum: the select would be a second
    # [B, C, V] float32 temporary on XLA:CPU. (`token_logps` has clipped t into the vocabulary.)
    # (target - max) - log1p(the other terms' sum) rather than target - logsumexp(x): the logsumexp is rounded at
    # the size of the largest logit (ulp(60) = 3.8e-6), and a sum that holds the top logit's own term (exactly 1)
    # rounds the others (~1e-8 each for a near-certain token) at ulp(1) = 1.2e-7, more or fewer of them by the
    # reduction order XLA picks (it differs between XLA versions, and between the chunk loop and one chunk). Either
    # took a near-certain token's log-prob (about -1e-6) to 0 or to twice its value, a bias summed over every
    # completion token.
    x32 = x.astype(jnp.float32)
    top = jnp.max(x32, axis=-1, keepdims=True)
    vocab = x32.shape[-1]
    # One pass after the max (a variadic reduce, no [B, C, V] temporary): the other terms' sum, the number of tied
    # top logits, and the first index of the top one (jnp.argmax's tie rule; a NaN logit, which jnp.argmax would
    # pick, makes the row's logps NaN and no target correct). Three different comparisons, each used once: XLA:GPU
    # wrote one shared `x == top` out as a [B, C, V] mask (a kernel and a read of the logits more), and jnp.argmax
    # was a second pass over the logits. (Two plain sums were 25% faster on XLA:CPU but kept one more float32
    # [B, C, V] block alive in head_logps.)
    terms = (jnp.where(x32 < top, jnp.exp(x32 - top), 0.0), (x32 >= top).astype(jnp.float32),
             jnp.where(x32 == top, jax.lax.broadcasted_iota(jnp.int32, x32.shape, x32.ndim - 1), vocab))
    others, ties, first_top = jax.lax.reduce(
        terms, (jnp.float32(0), jnp.float32(0), jnp.int32(vocab)),
        lambda a, b: (a[0] + b[0], a[1] + b[1], jnp.minimum(a[2], b[2])), (x32.ndim - 1,))
    top, rest = top[..., 0], jnp.log1p(others + (ties - 1))
    tgt = jnp.take_along_axis(x, t[..., None], axis=-1)[..., 0].astype(jnp.float32)
    return top + rest, (tgt - top) - rest, first_top == t


def _token_logps_fwd_impl(logits, targets, chunk_size):
    batch, length, _ = logits.shape
    n, chunk = _num_chunks(length, chunk_size)
    if n == 1:
        lse, logp, _ = _chunk_stats(logits, targets)
        return logp, lse

    def body(i, carry):
        logps, lses = carry
        start = _chunk_start(i, length, chunk)
        x = jax.lax.dynamic_slice_in_dim(logits, start, chunk, axis=1)
        t = jax.lax.dynamic_slice_in_dim(targets, start, chunk, axis=1)
        lse, logp, _ = _chunk_stats(x, t)
        logps = jax.lax.dynamic_update_slice_in_dim(logps, logp, start, axis=1)
        lses = jax.lax.dynamic_update_slice_in_dim(lses, lse, start, axis=1)
        return logps, lses

    zeros = jnp.zeros((batch, length), jnp.float32)
    return jax.lax.fori_loop(0, n, body, (zeros, zeros))


def _chunk_grad(x, t, lse, g):
    """d(sum g * logp)/dx for one chunk: g * (onehot(t) - softmax(x)), in x's dtype."""
    p = jnp.exp(x.astype(jnp.float32) - lse[..., None])
    vocab = jax.lax.broadcasted_iota(jnp.int32, x.shape, 2)
    onehot = (vocab == t[..., None]).astype(jnp.float32)
    return (g[..., None] * (onehot - p)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _token_logps(logits, targets, chunk_size):
    return _token_logps_fwd_impl(logits, targets, chunk_size)[0]


def _token_logps_fwd(logits, targets, chunk_size):
    logps, lse = _token_logps_fwd_impl(logits, targets, chunk_size)
    # Residuals: the logits (alive anyway as the model's output) and the [B, T] float32 logsumexp.
    return logps, (logits, targets, lse)


def _token_logps_bwd(chunk_size, residuals, g):
    logits, targets, lse = residuals
    length = logits.shape[1]
    n, chunk = _num_chunks(length, chunk_size)
    g = g.astype(jnp.float32)
    if n == 1:
        return _chunk_grad(logits, targets, lse, g), None

    def body(i, grad):
        start = _chunk_start(i, length, chunk)
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=chunk, axis=1)
        dx = _chunk_grad(sl(logits), sl(targets), sl(lse), sl(g))
        return jax.lax.dynamic_update_slice_in_dim(grad, dx, start, axis=1)

    return jax.lax.fori_loop(0, n, body, jnp.zeros_like(logits)), None


_token_logps.defvjp(_token_logps_fwd, _token_logps_bwd)


def check_shapes(logits, targets, loss_mask=None):
    """logits [B, T, V], integer targets [B, T] and loss_mask [B, T], or a ValueError naming the shapes."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be [batch, length, vocab], got shape {logits.shape}")
    if targets.shape != logits.shape[:2]:
        raise ValueError(f"targets shape {targets.shape} does not match logits' [batch, length] {logits.shape[:2]}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if loss_mask is not None and loss_mask.shape != targets.shape:
        raise ValueError(f"loss_mask shape {loss_mask.shape} does not match targets shape {targets.shape}")


def token_logps(logits: jax.Array, targets: jax.Array, chunk_size: int | None = None) -> jax.Array:
    """Per-token log-probabilities log softmax(logits)[b, t, targets[b, t]] as float32 [B, T].

    Computed as (logits[target] - max) - log sum exp(logits - max) in float32 (see `_chunk_stats`), `chunk_size`
    positions of the sequence at a time (default min(T, 256)), so only one chunk's float32 [B, chunk, V] copy
    exists at once. The gradient is a custom VJP that also walks the chunks: d/dlogits = g * (onehot(target) -
    softmax(logits)), written chunk by chunk into a gradient of the logits' dtype. A chunk size that does not
    divide T is fine (the last chunk overlaps the previous one). Out-of-range targets are clipped into [0, V) (no
    error): mask them out.
    """
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    check_shapes(logits, targets)
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    # Junk targets at masked positions (-100, a pad id) read a real logit instead of going out of bounds;
    # forward and backward both see the clipped ids, so the gradient matches the value.
    targets = jnp.clip(targets.astype(jnp.int32), 0, logits.shape[-1] - 1)
    if targets.shape[1] == 0:  # no positions: no chunk to loop over
        return jnp.zeros(targets.shape, jnp.float32)
    return _token_logps(logits, targets, int(chunk_size))


# ---------------------------------------------------------------------------------------------------------
# The LM head fused into the chunked log-softmax
# ---------------------------------------------------------------------------------------------------------


def _head_logits(h, w):
    """float32 logits of one chunk, as the model's head computes them: h [B, C, E] @ w [E, V] with both in the
    compute dtype (h's) and float32 accumulation."""
    return jnp.dot(h, w, preferred_element_type=jnp.float32)


def _head_weight(kernel, dtype):
    """The kernel in the compute dtype, gathered whole along E before the chunk loop.

    Under GSPMD with an FSDP-sharded kernel ([E over "fsdp", V over "tensor"]) XLA otherwise all-gathers E
    inside the loop, once per chunk and matmul, rather than once. The constraint fixes only E (replicated) and
    leaves V to propagation, so it names no mesh axis; outside a mesh it does nothing. The cast comes first,
    so a float32 kernel is gathered at the compute dtype's width (as the model's head gathers it)."""
    w = kernel.astype(dtype)
    if jax.sharding.get_abstract_mesh().empty:
        return w
    P = jax.sharding.PartitionSpec
    return jax.lax.with_sharding_constraint(w, P(None, P.UNCONSTRAINED))


def _head_chunk_fwd(h, w, t):
    logits = _head_logits(h, w)
    lse, logp, correct = _chunk_stats(logits, t)
    return logp, lse, correct


def _head_logps_fwd_impl(hidden, kernel, targets, chunk_size):
    w = _head_weight(kernel, hidden.dtype)
    batch, length, _ = hidden.shape
    n, chunk = _num_chunks(length, chunk_size)
    if n == 1:
        return _head_chunk_fwd(hidden, w, targets)

    def body(i, carry):
        start = _chunk_start(i, length, chunk)
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=chunk, axis=1)
        new = _head_chunk_fwd(sl(hidden), w, sl(targets))
        return tuple(jax.lax.dynamic_update_slice_in_dim(a, x, start, axis=1) for a, x in zip(carry, new))

    zeros = jnp.zeros((batch, length), jnp.float32)
    return jax.lax.fori_loop(0, n, body, (zeros, zeros, jnp.zeros((batch, length), bool)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _head_logps(hidden, kernel, targets, chunk_size):
    logps, _, correct = _head_logps_fwd_impl(hidden, kernel, targets, chunk_size)
    return logps, correct


def _head_logps_fwd(hidden, kernel, targets, chunk_size):
    logps, lse, correct = _head_logps_fwd_impl(hidden, kernel, targets, chunk_size)
    # Residuals: the inputs and the [B, K] float32 logsumexp; the logits are recomputed chunk by chunk.
    return (logps, correct), (hidden, kernel, targets, lse)


def _head_chunk_bwd(h, w, t, lse, g):
    """One chunk's d_hidden [B, C, E] (hidden's dtype) and the float32 d_logits [B, C, V] cast to the compute
    dtype, ready for the d_kernel matmul."""
    dlogits = _chunk_grad(_head_logits(h, w), t, lse, g).astype(h.dtype)  # g * (onehot - softmax)
    dh = jnp.einsum("bcv,ev->bce", dlogits, w, preferred_element_type=jnp.float32)
    return dh.astype(h.dtype), dlogits


def _head_logps_bwd(chunk_size, residuals, cotangents):
    hidden, kernel, targets, lse = residuals
    g = cotangents[0].astype(jnp.float32)  # `correct` is boolean: its cotangent is float0, nothing to pass on
    w = _head_weight(kernel, hidden.dtype)
    length = hidden.shape[1]
    n, chunk = _num_chunks(length, chunk_size)
    kernel_grad = functools.partial(jnp.einsum, "bce,bcv->ev", preferred_element_type=jnp.float32)
    if n == 1:
        dh, dlogits = _head_chunk_bwd(hidden, w, targets, lse, g)
        return dh, kernel_grad(hidden, dlogits).astype(kernel.dtype), None

    def body(i, carry):
        d_hidden, d_kernel = carry
        start = _chunk_start(i, length, chunk)
        sl = functools.partial(jax.lax.dynamic_slice_in_dim, start_index=start, slice_size=chunk, axis=1)
        h = sl(hidden)
        dh, dlogits = _head_chunk_bwd(h, w, sl(targets), sl(lse), sl(g))
        # d_hidden is written (the slid-back last chunk rewrites its overlap with the same values), but
        # d_kernel is a sum: positions that an earlier chunk already added are zeroed in the hidden states
        # here (a [B, C, E] select rather than one on the [B, C, V] d_logits).
        fresh = start + jnp.arange(chunk) >= i * chunk
        d_kernel = d_kernel + kernel_grad(jnp.where(fresh[None, :, None], h, jnp.zeros((), h.dtype)), dlogits)
        return jax.lax.dynamic_update_slice_in_dim(d_hidden, dh, start, axis=1), d_kernel

    init = (jnp.zeros_like(hidden), jnp.zeros(kernel.shape, jnp.float32))
    d_hidden, d_kernel = jax.lax.fori_loop(0, n, body, init)
    return d_hidden, d_kernel.astype(kernel.dtype), None


_head_logps.defvjp(_head_logps_fwd, _head_logps_bwd)


def head_logps(
    hidden: jax.Array, kernel: jax.Array, targets: jax.Array, chunk_size: int | None = None
) -> tuple[jax.Array, jax.Array]:
    """LM head + per-token log-probabilities in one chunked pass: log_softmax(hidden @ kernel)[targets].

    hidden [B, K, E]: the final-norm output at the K loss positions (any float dtype; it is the compute
    dtype), kernel [E, V]: the LM head (any float dtype; cast to hidden's dtype, as the model's head does),
    targets [B, K] int. Each chunk of `chunk_size` positions along K (default min(K, 256); B stays whole, it
    is the sharded batch axis) gets its logits from jnp.dot(h, w, preferred_element_type=float32), so at most
    one float32 [B, chunk, V] block of logits exists at a time, in the forward and in the backward pass. A
    chunk size that does not divide K is fine (the last chunk is slid back, as in `token_logps`).

    Returns (logps float32 [B, K], correct bool [B, K]: argmax of the logits == target, no gradient).
    Out-of-range targets are clipped into [0, V) for logps, as in `token_logps`, and are never `correct`.

    Custom VJP: the forward saves hidden, kernel, targets and the float32 [B, K] logsumexp. The backward
    recomputes each chunk's logits, forms d_logits = g * (onehot(target) - softmax) in float32, casts it to
    the compute dtype and returns d_hidden = d_logits @ kernel^T (float32 accumulation, hidden's dtype) and
    d_kernel = sum over chunks of h^T @ d_logits, accumulated in float32 and cast to kernel's dtype.

    Sharding (GSPMD, no shard_map): with hidden split on B and the kernel as [E over "fsdp", V over "tensor"],
    the kernel is gathered along E once before each loop and V stays split, so a device holds a
    [B / batch shards, chunk, V / tensor] block of logits. The price of chunking: each chunk's float32 d_kernel
    [E, V / tensor] contribution is summed over the batch shards inside the loop (the full path does this
    once), so larger chunks mean fewer of these reductions.
    """
    hidden, kernel, targets = jnp.asarray(hidden), jnp.asarray(kernel), jnp.asarray(targets)
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [batch, length, embed], got shape {hidden.shape}")
    if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
        raise ValueError(f"kernel must be [embed, vocab] with embed = {hidden.shape[-1]}, got shape {kernel.shape}")
    if not (jnp.issubdtype(hidden.dtype, jnp.floating) and jnp.issubdtype(kernel.dtype, jnp.floating)):
        raise ValueError(f"hidden and kernel must be floating point, got {hidden.dtype} and {kernel.dtype}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets shape {targets.shape} does not match hidden's [batch, length] {hidden.shape[:2]}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must be integer token ids, got dtype {targets.dtype}")
    if chunk_size is None:
        chunk_size = DEFAULT_CHUNK_SIZE
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size}")
    vocab = kernel.shape[-1]
    if targets.shape[1] == 0:  # no positions: no chunk to loop over
        return jnp.zeros(targets.shape, jnp.float32), jnp.zeros(targets.shape, bool)
    clipped = jnp.clip(targets.astype(jnp.int32), 0, vocab - 1)
    logps, correct = _head_logps(hidden, kernel, clipped, int(chunk_size))
    return logps, correct & (targets >= 0) & (targets < vocab)
