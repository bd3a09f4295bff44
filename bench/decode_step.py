"""The engine's decoding call, per generated token, and its parts, on serve_throughput.py's model shape.

    python bench/decode_step.py [--rows=32] [--steps=8] [--kv=128,256,512,1024] [--cache-order=heads_first]

Times engine._decode (every slot decoding, greedy, `steps` tokens a call, attention over `kv` cache positions)
per token, then the same model's layers without a cache, its LM head and greedy sampling for the same rows, so
what the cache costs is the difference. Random weights, float32, on whatever device JAX picks, the KV cache
stored in that platform's order unless --cache-order names one (model/kv_cache.py).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from zephyr_jax import engine
from zephyr_jax.model import KVCache, Mistral, MistralConfig
from zephyr_jax.sampling import sample


def milliseconds(fn, repeats: int = 20) -> float:
    fn(), fn()  # compile and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kv", default="128,256,512,1024")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--cache-order", choices=["platform", "heads_first", "positions_first"], default="platform")
    args = parser.parse_args()
    cfg = MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=args.max_length)
    graphdef, state = nnx.split(Mistral(cfg, rngs=nnx.Rngs(0)))
    rows = args.rows
    greedy = (jnp.zeros((rows,)), jnp.zeros((rows,), jnp.int32), jnp.ones((rows,)), jnp.zeros((rows,), jnp.uint32),
              jnp.zeros((rows,), jnp.uint32))
    heads_first = None if args.cache_order == "platform" else args.cache_order == "heads_first"
    order = "heads first" if KVCache.init(cfg, 1, 1, heads_first=heads_first).heads_first else "positions first"
    print(f"{jax.devices()[0].device_kind}, {rows} rows, {args.steps} tokens a call, KV cache stored {order}")
    for kv in map(int, args.kv.split(",")):
        box = [KVCache.init(cfg, rows, args.max_length, heads_first=heads_first)]
        lengths = jnp.full((rows,), kv - args.steps - 1, jnp.int32)

        def call():
            box[0], out = engine._decode(graphdef, state, box[0], None, jnp.ones((rows,), jnp.int32), lengths,
                                         jnp.ones((rows,), bool), jnp.full((rows,), 10 ** 6, jnp.int32),
                                         jnp.full((rows, 4), -1, jnp.int32), greedy, steps=args.steps,
                                         kv_length=kv, top_n=0)
            jax.block_until_ready(out)

        print(f"decode, attention over {kv:>5} positions: {milliseconds(call) / args.steps:6.2f} ms per token")
    layers = jax.jit(lambda s, ids: nnx.merge(graphdef, s).hidden_states(ids))
    head = jax.jit(lambda s, h: nnx.merge(graphdef, s).logits(h))
    pick = jax.jit(lambda logits: sample(logits, *greedy)[:2])
    ids, hidden, logits = jnp.ones((rows, 1), jnp.int32), jnp.ones((rows, 1, cfg.hidden_size)), jnp.ones((rows, 32000))
    print(f"layers without a cache: {milliseconds(lambda: jax.block_until_ready(layers(state, ids))):6.2f} ms")
    print(f"LM head:                {milliseconds(lambda: jax.block_until_ready(head(state, hidden))):6.2f} ms")
    print(f"greedy sampling:        {milliseconds(lambda: jax.block_until_ready(pick(logits))):6.2f} ms")


if __name__ == "__main__":
    main()
