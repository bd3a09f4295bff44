"""The engine's prefill and decoding calls for a 7B over a TPU slice's or GPUs' mesh, compiled on this machine
(libtpu; JAX's CUDA plugin on PYTHONPATH for GPUs, as the planner's GPU topologies).

    python bench/engine_mesh_compile.py [--topology=v5e-8] [--mesh=1,-1,1] [--slots=64] [--max_length=4096] \
        [--prefill=P,T,KV ...] [--decode=R,KV ...] [--layer-weights=platform|stacked|own]

Mistral-7B in bf16 from abstract shapes (nothing is allocated), its parameters laid out by the sharding rules over
the --mesh of --topology (compile_targets.target_for), the KV cache as Engine lays it out (Engine._cache_sharding,
the platform's storage order), the layer weights stacked or in buffers of their own as Engine keeps them
(--layer-weights=platform: own on GPUs, mistral.per_layer_weights). Each --prefill compiles engine._prefill for P
prompts of T tokens attending over KV cached positions; each --decode engine._decode for R rows (8 tokens a call)
over KV positions. Prints the bytes a chip holds (parameters, cache) and each program's temporaries and peak
against the chip's memory. Nothing is timed.
"""

from __future__ import annotations

import argparse
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zephyr_jax import compile_targets, engine, plan
from zephyr_jax.model import Mistral, MistralConfig, kv_cache, mistral
from zephyr_jax.sharding import DEFAULT_RULES, make_mesh, mesh_shape, named, param_specs

GiB = 2 ** 30


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5e-8")
    p.add_argument("--mesh", type=mesh_shape, default=(1, -1, 1))
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--max_length", type=int, default=4096)
    p.add_argument("--prefill", action="append", default=[], help="P,T,KV")
    p.add_argument("--decode", action="append", default=[], help="R,KV")
    p.add_argument("--layer-weights", choices=["platform", "stacked", "own"], default="platform")
    args = p.parse_args()
    target = compile_targets.target_for(args.topology)
    mesh = make_mesh(args.mesh, target.devices)
    cfg = MistralConfig.mistral_7b_v0_1(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    own = args.layer_weights == "own" or (args.layer_weights == "platform"
                                          and engine.per_layer_weights_on(target.devices[0].platform))

    def build():
        model = Mistral(cfg, rngs=nnx.Rngs(0))
        return mistral.per_layer_weights(model) if own else model

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                         named(mesh, param_specs(abstract, DEFAULT_RULES)))
    heads_first = kv_cache.heads_first_on(target.devices[0].platform)
    cache_sharding = engine.Engine._cache_sharding(types.SimpleNamespace(config=cfg, max_slots=args.slots), mesh,
                                                   heads_first)
    sizes = dict(layers=cfg.num_hidden_layers, slots=args.slots, length=args.max_length,
                 kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim)
    shape = tuple(sizes[a] for a in kv_cache.axes(heads_first))
    buffer = jax.ShapeDtypeStruct(shape, cfg.dtype, sharding=cache_sharding)
    cache = kv_cache.KVCache(k=buffer, v=buffer, heads_first=heads_first)
    chip = lambda x: int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize  # noqa: E731
    print(f"{args.topology}, mesh {dict(mesh.shape)}, layer weights {'own' if own else 'stacked'}, "
          f"{args.slots} slots x {args.max_length}, cache "
          f"{cache_sharding.spec}: parameters {sum(map(chip, jax.tree.leaves(state))) / GiB:.2f} GiB a chip, cache "
          f"{2 * chip(buffer) / GiB:.2f} GiB a chip, of {target.hbm_bytes / GiB:.2f}")
    of = lambda dtype, *shape: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    sampling = lambda n: (of(jnp.float32, n), of(jnp.int32, n), of(jnp.float32, n), of(jnp.uint32, n),  # noqa: E731
                          of(jnp.uint32, n))
    calls = [(f"prefill P={P} T={T} KV={KV}", lambda P=P, T=T, KV=KV: engine._prefill.lower(
                 graphdef, state, cache, of(jnp.int32, P, T), of(jnp.int32, P, T), of(jnp.int32, P),
                 of(jnp.int32, P), of(jnp.int32, P, T), sampling(P), kv_length=KV, top_n=-1, prompt_top_n=-1))
             for P, T, KV in (map(int, s.split(",")) for s in args.prefill)]
    calls += [(f"decode R={R} KV={KV}", lambda R=R, KV=KV: engine._decode.lower(
                  graphdef, state, cache, None if R == args.slots else of(jnp.int32, R), of(jnp.int32, R),
                  of(jnp.int32, R), of(jnp.bool_, R), of(jnp.int32, R), of(jnp.int32, R, engine.MAX_STOP_TOKENS),
                  sampling(R), steps=8, kv_length=KV, top_n=-1))
              for R, KV in (map(int, s.split(",")) for s in args.decode)]
    with jax.set_mesh(mesh):
        for label, lower in calls:
            try:
                memory = plan.compiled_bytes(lower().compile())
            except Exception as e:  # noqa: BLE001 -- XLA's out-of-memory refusal is a result here
                oom = plan.out_of_memory(e)
                if oom is None:
                    raise
                print(f"{label}: does not fit: needs {oom['total'] / GiB:.2f} GiB")
                continue
            print(f"{label}: temporaries {memory['temporaries'] / GiB:.2f} GiB, peak {memory['total'] / GiB:.2f} GiB")


if __name__ == "__main__":
    main()
