"""Compiled temporary memory of grad(sequence_logps): chunked (zephyr_jax.losses) vs a textbook full log-softmax.

    python bench/logps_memory.py [--chunk-size 256] [--dtypes float32,bfloat16] [--vocab 32000]

Nothing is allocated: each function is lowered and compiled for ShapeDtypeStruct inputs and XLA's
`memory_analysis()` is read. "temp" excludes the inputs (logits, targets, mask) and the output (the logits
gradient, B*T*V in the logits' dtype), which every implementation needs; "f32 BTV" is one float32 [B, T, V]
array, what the textbook version holds as its log-softmax.

Measured on XLA:CPU (jax 0.10.2, 2 cores), V = 32000, chunk 256, temp MiB of the compiled grad:

    dtype     B     T   f32 BTV   naive grad  chunked grad
    float32   1  1024     125.0        125.0          31.3
    float32   2  2048     500.0        500.0          62.6
    float32   4  1024     500.0        500.0         125.1
    float32   4  2048    1000.0       1000.0         125.1   (chunk 128: 62.6)
    bfloat16  1  1024     125.0        250.0         156.3
    bfloat16  4  2048    1000.0       1000.0        1125.1

With float32 logits (what the model returns) the chunked temp is one float32 [B, chunk, V] block,
B * chunk * V * 4 bytes, independent of T; the forward alone needs the same. With bf16 logits XLA:CPU adds
one float32 copy of all the logits: it has no bf16 dynamic-slice, so its float-normalization pass converts
the whole loop operand to float32 and hoists that out of the loop. GPU and TPU slice bf16 natively;
re-measure there (this script, unchanged) before drawing conclusions for bf16.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from zephyr_jax import logprobs, losses  # noqa: E402

MIB = 2**20


def naive_sequence_logps(logits, targets, mask):
    """The unchunked textbook version: a full float32 log-softmax, then a gather."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(mask, picked, 0.0), axis=-1)


def compiled_memory(fn, batch, length, vocab, dtype, grad=True):
    args = (
        jax.ShapeDtypeStruct((batch, length, vocab), dtype),
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((batch, length), jnp.bool_),
    )
    scalar = lambda x, t, m: jnp.sum(fn(x, t, m))  # noqa: E731
    compiled = jax.jit(jax.grad(scalar) if grad else scalar).lower(*args).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        raise SystemExit(f"memory_analysis() is not available on backend {jax.default_backend()}")
    return analysis.temp_size_in_bytes, analysis.output_size_in_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunk-size", type=int, default=logprobs.DEFAULT_CHUNK_SIZE)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batches", default="1,2,4")
    parser.add_argument("--lengths", default="1024,2048")
    args = parser.parse_args()

    chunked = lambda x, t, m: losses.sequence_logps(x, t, m, chunk_size=args.chunk_size)  # noqa: E731
    print(f"backend={jax.default_backend()} device={jax.devices()[0].device_kind} jax={jax.__version__} "
          f"vocab={args.vocab} chunk={args.chunk_size}; temp memory in MiB")
    header = ("dtype", "B", "T", "f32 BTV", "grad out", "naive fwd", "chunked fwd", "naive grad", "chunked grad",
              "ratio")
    print("{:<9} {:>2} {:>5} {:>9} {:>9} {:>10} {:>12} {:>11} {:>13} {:>6}".format(*header))
    for dtype_name in args.dtypes.split(","):
        dtype = jnp.dtype(dtype_name)
        for batch in map(int, args.batches.split(",")):
            for length in map(int, args.lengths.split(",")):
                shape = (batch, length, args.vocab, dtype)
                naive_grad, grad_out = compiled_memory(naive_sequence_logps, *shape)
                chunked_grad, _ = compiled_memory(chunked, *shape)
                naive_fwd, _ = compiled_memory(naive_sequence_logps, *shape, grad=False)
                chunked_fwd, _ = compiled_memory(chunked, *shape, grad=False)
                full = batch * length * args.vocab * 4
                print("{:<9} {:>2} {:>5} {:>9.1f} {:>9.1f} {:>10.1f} {:>12.1f} {:>11.1f} {:>13.1f} {:>6.2f}".format(
                    dtype_name, batch, length, full / MIB, grad_out / MIB, naive_fwd / MIB, chunked_fwd / MIB,
                    naive_grad / MIB, chunked_grad / MIB, chunked_grad / max(naive_grad, 1)))


if __name__ == "__main__":
    main()
