"""The engine's decoding call compiled for an accelerator this machine does not have, in both KV-cache orders.

    python bench/decode_compile.py [--topology=h200-1] [--layers=2] [--rows=64] [--max_length=4096] [--kv=1024]

Compiles engine._decode (8 tokens a call, greedy, attention over --kv of --max_length cached positions) for one
device of --topology (compile_targets.target_for: "h100-1", "h200-1", "a100-1" with JAX's CUDA plugin, "v5e-4"
... with libtpu) on a Mistral-7B-wide model of --layers layers in bf16: the cache stored heads first and positions
first (model/kv_cache.py) with the layer weights stacked, and heads first with each layer's weights in buffers of
their own (mistral.per_layer_weights: the engine's layout on GPUs), from abstract shapes: nothing is allocated.
Prints each program's scratch memory, the transposes it makes of a whole cache buffer outside the decoding loop
(a copy of the cache on every call), and the copies it makes of a layer's MLP kernel before a matmul reads it.
Nothing is timed: bench/decode_step.py times the call on a device.
"""

from __future__ import annotations

import argparse
import math
import re

import jax
import jax.numpy as jnp
from flax import nnx

from zephyr_jax import compile_targets, engine
from zephyr_jax.model import KVCache, Mistral, MistralConfig, mistral


def compile_decode(device, cfg, rows: int, max_length: int, kv_length: int, heads_first: bool,
                   per_layer: bool = False):
    sharding = jax.sharding.SingleDeviceSharding(device)
    placed = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)  # noqa: E731

    def build():
        model = Mistral(cfg, rngs=nnx.Rngs(0))
        return mistral.per_layer_weights(model) if per_layer else model

    graphdef, state = nnx.split(nnx.eval_shape(build))
    state = jax.tree.map(placed, state)
    cache = jax.tree.map(placed, jax.eval_shape(lambda: KVCache.init(cfg, rows, max_length, heads_first=heads_first)))
    of = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    sampling = (of(jnp.float32, rows), of(jnp.int32, rows), of(jnp.float32, rows), of(jnp.uint32, rows),
                of(jnp.uint32, rows))
    traced = engine._decode.trace(graphdef, state, cache, None, of(jnp.int32, rows), of(jnp.int32, rows),
                                  of(jnp.bool_, rows), of(jnp.int32, rows), of(jnp.int32, rows, 4), sampling,
                                  steps=8, kv_length=kv_length, top_n=0)
    compiled = traced.lower(lowering_platforms=(device.platform if device.platform != "gpu" else "cuda",)).compile()
    return compiled, cache.k.shape


def layer_weight_copies(hlo: str, cfg) -> int:
    """Copies or slices of one layer's kernel (e.g. bf16[1,4096,14336]) standing alone in a fusion of their own, the
    layer's weights written out before a matmul reads them (a slice fused into the matmul reads in place)."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    kernels = {(1, h, i), (1, i, h), (h, i), (i, h)}
    roots = re.findall(r"ROOT %[\w.]+ = \w+\[([\d,]+)\]\{[^}]*\} (?:copy|slice|dynamic-slice)\(", hlo)
    return sum(tuple(map(int, d.split(","))) in kernels for d in roots)


def whole_cache_transposes(hlo: str, cache_shape: tuple) -> int:
    """Transposes in the program whose result has as many elements as a whole cache buffer."""
    dims = re.findall(r"= \w+\[([\d,]+)\]\{[^}]*\} transpose\(", hlo)
    return sum(math.prod(map(int, d.split(","))) == math.prod(cache_shape) for d in dims)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--topology", default="h200-1")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--kv", type=int, default=1024)
    args = parser.parse_args()
    target = compile_targets.target_for(args.topology)
    device = target.devices[0]
    cfg = MistralConfig(num_hidden_layers=args.layers, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                        max_position_embeddings=args.max_length)
    print(f"engine._decode for {device.device_kind} ({args.topology}): Mistral-7B-wide, {args.layers} layers, bf16, "
          f"{args.rows} rows, attention over {args.kv} of {args.max_length} cached positions, 8 tokens a call")
    print("| cache stored | layer weights | scratch MiB | whole-cache transposes | MLP kernel copy fusions |")
    print("|---|---|---|---|---|")
    for heads_first, per_layer in ((True, False), (False, False), (True, True)):
        with compile_targets.cudnn_checks_for(target):
            compiled, shape = compile_decode(device, cfg, args.rows, args.max_length, args.kv, heads_first,
                                             per_layer)
        hlo = compiled.as_text()
        print(f"| {'heads first' if heads_first else 'positions first'} "
              f"| {'own buffers' if per_layer else 'stacked'} "
              f"| {compiled.memory_analysis().temp_size_in_bytes / 2 ** 20:,.0f} "
              f"| {whole_cache_transposes(hlo, shape)} | {layer_weight_copies(hlo, cfg)} |")


if __name__ == "__main__":
    main()
