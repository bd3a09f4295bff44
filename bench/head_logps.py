"""LM head + per-token log-probs, forward + backward: the full head, logprobs.head_logps, tokamax's chunked_xla.

    python bench/head_logps.py [--batch 4 --length 1024 --embed 1024 --vocab 32000 --chunk-size 256]
                               [--dtypes float32,bfloat16] [--runs 3]

The loss is DPO-shaped: minus the masked sum of per-token log-probs (a prompt prefix and padding masked),
differentiated with respect to the hidden states and the head kernel. Compared, for each dtype (hidden and
kernel both in it; the head multiplies in that dtype with float32 accumulation):

  (a) full:      logits = hidden @ kernel as float32 [B, K, V] (the model's head), then logprobs.token_logps
  (b) head_logps: logprobs.head_logps, the head computed chunk by chunk inside the log-softmax and its VJP
  (c) tokamax:   tokamax.linear_softmax_cross_entropy_loss(implementation="chunked_xla", reduction="none")
                 on the flattened [B*K, E] tokens; only if tokamax with chunked_xla imports (tokamax >= 0.0.13,
                 which needs Python >= 3.12), otherwise the row says why it is missing
  (c')           the same op with a v_block_size that divides V (tokamax pads V to a multiple of the block
                 with zero columns that enter its logsumexp: the default 2048 does not divide 32000)
  (a32)          for bf16 only: (a) in float32 on the same (bf16-valued) inputs, to show the size of bf16
                 rounding itself

Columns: temp = compiled temporary bytes of forward + backward (XLA memory_analysis; excludes the inputs and
the outputs, i.e. the loss and the two gradients); time = median wall time of --runs calls after a warm-up;
the differences are against (a) of the same dtype: |loss - loss_a| and max|g - g_a| / max|g_a| for the
hidden and kernel gradients.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from zephyr_jax import logprobs  # noqa: E402

MIB = 2**20


def tokamax_chunked_xla():
    """(loss function, description) for tokamax's chunked_xla op, or (None, why it is unavailable)."""
    try:
        import tokamax
        from tokamax._src.ops.linear_softmax_cross_entropy_loss import api
    except ImportError as e:
        return None, f"tokamax not importable ({e})"
    try:
        from importlib.metadata import version

        ver = version("tokamax")
    except Exception:  # pragma: no cover - metadata missing
        ver = "unknown version"
    if "chunked_xla" not in api.IMPLEMENTATIONS:
        return None, (f"tokamax {ver} has no chunked_xla implementation (only {sorted(api.IMPLEMENTATIONS)}; "
                      "chunked_xla arrived in 0.0.13, which needs Python >= 3.12)")

    from tokamax._src.ops.linear_softmax_cross_entropy_loss import chunked_xla

    def per_token_nll(hidden, kernel, targets, v_block_size=None):
        """-log p per token, [B, K]: the public API with its default config, or the op with v_block_size."""
        batch, length, embed = hidden.shape
        x, labels = hidden.reshape(batch * length, embed), targets.reshape(-1)
        if v_block_size is None:
            nll = tokamax.linear_softmax_cross_entropy_loss(x, labels, kernel, reduction="none",
                                                            implementation="chunked_xla")
        else:
            config = chunked_xla.Config(b_block_size=chunked_xla.Config().b_block_size, v_block_size=v_block_size)
            nll = chunked_xla.ChunkedXlaLinearSoftmaxCrossEntropyLoss(config=config)(x, labels, kernel,
                                                                                       reduction="none")
        return nll.reshape(batch, length)

    return per_token_nll, f"tokamax {ver} (default config {chunked_xla.Config()})"


def make_inputs(batch, length, embed, vocab, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((batch, length, embed)).astype(np.float32)
    kernel = (rng.standard_normal((embed, vocab)) * (2.0 / np.sqrt(embed))).astype(np.float32)  # logits ~ N(0, 4)
    targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
    prompt = rng.integers(length // 8, length // 2, batch)  # masked prompt prefix
    end = rng.integers(3 * length // 4, length + 1, batch)  # right padding
    pos = np.arange(length)[None, :]
    mask = ((pos >= prompt[:, None]) & (pos < end[:, None])).astype(np.float32)
    return hidden, kernel, targets, mask


def methods(chunk, vocab, tokamax_fn):
    def full(h, w, t, m):
        logits = jnp.dot(h, w.astype(h.dtype), preferred_element_type=jnp.float32)
        return -jnp.sum(m * logprobs.token_logps(logits, t, chunk))

    def fused(h, w, t, m):
        return -jnp.sum(m * logprobs.head_logps(h, w, t, chunk)[0])

    out = {"(a) full": full, "(b) head_logps": fused}
    if tokamax_fn is not None:
        out["(c) tokamax chunked_xla, default config"] = lambda h, w, t, m: jnp.sum(m * tokamax_fn(h, w, t))
        # tokamax pads V up to a multiple of v_block_size with zero kernel columns and does not mask them out
        # of the logsumexp (0.0.15-0.0.17), so a block size that divides V is needed for correct values.
        v_block = max((b for b in range(128, 2049, 128) if vocab % b == 0), default=None)
        if v_block is not None:
            out[f"(c') tokamax chunked_xla, v_block_size={v_block}"] = (
                lambda h, w, t, m: jnp.sum(m * tokamax_fn(h, w, t, v_block)))
    return out


def measure(fn, args, runs):
    step = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    compiled = step.lower(*args).compile()
    analysis = compiled.memory_analysis()
    temp = analysis.temp_size_in_bytes if analysis is not None else float("nan")
    out = jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    loss, (d_hidden, d_kernel) = out
    return temp, statistics.median(times), (float(loss), np.asarray(d_hidden, np.float32),
                                            np.asarray(d_kernel, np.float32))


def rel_max_diff(x, ref):
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-30))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--embed", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk-size", type=int, default=logprobs.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    tokamax_fn, tokamax_note = tokamax_chunked_xla()
    b, k, e, v = args.batch, args.length, args.embed, args.vocab
    print(f"backend={jax.default_backend()} ({jax.device_count()} device(s), {os.cpu_count()} CPU cores) "
          f"jax={jax.__version__} python={sys.version.split()[0]}; {tokamax_note}")
    print(f"B={b} K={k} (B*K={b * k} tokens) E={e} V={v}; head_logps/token_logps chunk={args.chunk_size} positions "
          f"(= {b * args.chunk_size} tokens); one float32 [B*K, V] array = {b * k * v * 4 / MIB:.0f} MiB; "
          f"median of {args.runs} runs\n")
    print("| dtype | method | temp MiB | time s | abs diff loss | rel diff d_hidden | rel diff d_kernel |")
    print("|---|---|---:|---:|---:|---:|---:|")
    h32, w32, targets, mask = make_inputs(b, k, e, v)
    scale = []
    for dtype_name in args.dtypes.split(","):
        dtype = jnp.dtype(dtype_name)
        inputs = (jnp.asarray(h32, dtype), jnp.asarray(w32, dtype), jnp.asarray(targets), jnp.asarray(mask))
        rows = list(methods(args.chunk_size, v, tokamax_fn).items())
        if dtype != jnp.float32:
            full = rows[0][1]
            rows.append(("(a32) full in float32",
                         lambda h, w, t, m: full(h.astype(jnp.float32), w.astype(jnp.float32), t, m)))
        ref = None
        for name, fn in rows:
            temp, seconds, (loss, dh, dw) = measure(fn, inputs, args.runs)
            if ref is None:
                ref = (loss, dh, dw)
            print(f"| {dtype_name} | {name} | {temp / MIB:.1f} | {seconds:.2f} | {abs(loss - ref[0]):.3g} "
                  f"| {rel_max_diff(dh, ref[1]):.2e} | {rel_max_diff(dw, ref[2]):.2e} |", flush=True)
        if tokamax_fn is None:
            print(f"| {dtype_name} | (c) tokamax: skipped, {tokamax_note} | - | - | - | - | - |")
        scale.append(f"{dtype_name} {ref[0]:.6g}")
    print(f"\nloss_a (for scale; summed over {int(mask.sum())} masked-in tokens): {', '.join(scale)}")


if __name__ == "__main__":
    main()
