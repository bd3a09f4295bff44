"""The engine's decoding call, per generated token, against the memory-bandwidth bound; then the engine's output
tokens/s with many concurrent requests.

    python bench/decode_step.py [--arch=small|7b] [--dtype=float32|bfloat16] [--rows=32[,R2...]] [--steps=8]
        [--kv=128,256,512,1024] [--cache-order=platform|heads_first|positions_first[,...]]
        [--layer-weights=platform|stacked|own[,...]] [--requests=0] [--prompt=128] [--max-tokens=256] [--no-parts]
        [--profile=DIR]

Times engine._decode (every slot decoding, greedy, `steps` tokens a call, attention over `kv` cache positions) per
token, for each number of rows and each cache order listed (one process, one copy of the weights). Each token reads
every parameter once but the input embedding, of which one row a decoding row (and the cache's first kv positions),
so the HBM-bandwidth bound of a token is those bytes over the device's bandwidth: measured here as a
device-to-device copy (bytes read + written over time), and the data sheet's where it is known. "of bound" is bound
/ measured time. Then (unless --no-parts) the same model's layers without a cache, its LM head and greedy sampling
for the first number of rows, so what the cache costs is the difference. --requests=N: N requests of --prompt random
tokens each generating --max-tokens (no EOS) through Engine.generate with N slots (the first cache order listed),
run twice; the second run's output tokens/s (no compile in it) is reported. --profile=DIR, last: 3 decoding calls
of the first rows, order and KV length traced (zephyr_jax.profiling): the decoding kernels' time a token against
the calls' wall time (how busy the device is), and the operations' table. Random weights (param dtype = --dtype)
on whatever device JAX picks, the KV cache stored in that platform's order unless --cache-order names one
(model/kv_cache.py), and the layer weights in the engine's layout for that platform unless --layer-weights names
one (each listed is timed): stacked (one array a kind of weight, the layers on its first axis) or own (each layer's
in buffers of its own: mistral.per_layer_weights, the engine's default on GPUs).

--arch=small: serve_throughput.py's model (hidden 256, 4 layers); 7b: Mistral-7B-v0.1's shape.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zephyr_jax import compile_targets, engine, profiling
from zephyr_jax.engine import Engine, Request, SamplingParams
from zephyr_jax.metrics import device_name
from zephyr_jax.model import KVCache, Mistral, MistralConfig, mistral
from zephyr_jax.sampling import sample

ARCHS = {"small": dict(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                       num_attention_heads=8, num_key_value_heads=2),
         "7b": {}}  # MistralConfig's defaults are Mistral-7B-v0.1's


def milliseconds(fn, repeats: int = 20) -> float:
    fn(), fn()  # compile and warm up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e3


def copy_bandwidth() -> float:
    """Bytes read + written per second by a jitted elementwise pass over a buffer far larger than any cache."""
    n = (1 << 30) if jax.default_backend() != "cpu" else (1 << 25)  # 4 GiB on accelerators
    x = jnp.ones((n,), jnp.float32)
    add = jax.jit(lambda a: a + 1)
    seconds = milliseconds(lambda: jax.block_until_ready(add(x)), repeats=10) / 1e3
    return 2 * x.nbytes / seconds


def datasheet_bandwidth() -> float | None:
    """The bandwidth in compile_targets.GPUS (SXM data sheets) for the device metrics names exactly: None for
    other devices (an H100 PCIe's 2.0 TB/s or NVL's 3.9 are not the SXM's 3.35)."""
    name = device_name()
    return compile_targets.GPUS[name].bandwidth if name in compile_targets.GPUS else None


def greedy(rows: int) -> tuple:
    """sample()'s per-row settings for greedy rows: temperature 0, top_k 0, top_p 1, seeds and counters 0."""
    return (jnp.zeros((rows,)), jnp.zeros((rows,), jnp.int32), jnp.ones((rows,)), jnp.zeros((rows,), jnp.uint32),
            jnp.zeros((rows,), jnp.uint32))


def decode_call(graphdef, state, cfg, args, rows, heads_first, kv):
    """One engine._decode call of `rows` decoding rows over `kv` cache positions (the cache donated and kept), and
    whether the cache is stored heads first."""
    box = [KVCache.init(cfg, rows, args.max_length, dtype=cfg.dtype, heads_first=heads_first)]
    lengths = jnp.full((rows,), kv - args.steps - 1, jnp.int32)

    def call():
        box[0], out = engine._decode(graphdef, state, box[0], None, jnp.ones((rows,), jnp.int32), lengths,
                                     jnp.ones((rows,), bool), jnp.full((rows,), 10 ** 6, jnp.int32),
                                     jnp.full((rows, 4), -1, jnp.int32), greedy(rows), steps=args.steps,
                                     kv_length=kv, top_n=0)
        jax.block_until_ready(out)

    return call, box[0].heads_first


def decode_per_token(graphdef, state, cfg, args, rows, heads_first, param_bytes, bandwidths, layout) -> None:
    measured, sheet = bandwidths
    item = jnp.dtype(cfg.dtype).itemsize
    for kv in map(int, args.kv.split(",")):
        call, stored_heads_first = decode_call(graphdef, state, cfg, args, rows, heads_first, kv)
        ms = milliseconds(call) / args.steps
        cache_bytes = 2 * cfg.num_hidden_layers * rows * kv * cfg.num_key_value_heads * cfg.head_dim * item
        # An untied embedding table is read one row per decoding row, not whole (the LM head is read whole).
        table = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * jnp.dtype(cfg.param_dtype).itemsize
        read = param_bytes - table + rows * table // cfg.vocab_size + cache_bytes
        bounds = [read / bw * 1e3 if bw else None for bw in (measured, sheet)]
        cells = " | ".join("n/a | n/a" if b is None else f"{b:.2f} | {100 * b / ms:.0f}%" for b in bounds)
        order = "heads first" if stored_heads_first else "positions first"
        print(f"| {rows} | {order} | {layout} | {kv} | {ms:.2f} | {rows * 1e3 / ms:,.0f} | {cells} |")


def profile_decode(graphdef, state, cfg, args, rows, heads_first, kv) -> None:
    """Traces 3 decoding calls (zephyr_jax.profiling): the device's kernel time a token beside the calls' wall
    time a token, whose difference is the device waiting (on the host, on launches; on a CPU, thunks on several
    threads overlap and can sum past it), then where the kernel time went."""
    call, _ = decode_call(graphdef, state, cfg, args, rows, heads_first, kv)
    call(), call()  # compiled and warm
    trace = profiling.TraceWindow(1, 3, args.profile)
    seconds = 0.0
    for i in range(1, 4):
        trace.before(i)
        start = time.perf_counter()
        with jax.profiler.StepTraceAnnotation("decode", step_num=i):
            call()  # (blocks until its tokens are ready)
        seconds += time.perf_counter() - start
        trace.after(i, None)
    path = profiling.newest_trace(args.profile)
    ops, facts = profiling.op_times(path)
    tokens = 3 * args.steps
    kernel_ms = 1e3 * sum(r["seconds"] for r in ops if r["module"] == "jit__decode") / facts["devices"] / tokens
    wall_ms = 1e3 * seconds / tokens
    print(f"profile, {rows} rows, {kv} KV positions: {kernel_ms:.2f} ms of decoding kernels a token in {wall_ms:.2f} "
          f"ms of wall time (traced) a token: the device busy {100 * kernel_ms / wall_ms:.0f}% of it")
    print(profiling.report(path, top=15))


def parts(graphdef, state, cfg, rows) -> None:
    layers = jax.jit(lambda s, ids: nnx.merge(graphdef, s).hidden_states(ids))
    head = jax.jit(lambda s, h: nnx.merge(graphdef, s).logits(h))
    pick = jax.jit(lambda logits: sample(logits, *greedy(rows))[:2])
    ids = jnp.ones((rows, 1), jnp.int32)
    hidden, logits = jnp.ones((rows, 1, cfg.hidden_size), cfg.dtype), jnp.ones((rows, cfg.vocab_size))
    print(f"layers without a cache: {milliseconds(lambda: jax.block_until_ready(layers(state, ids))):6.2f} ms")
    print(f"LM head:                {milliseconds(lambda: jax.block_until_ready(head(state, hidden))):6.2f} ms")
    print(f"greedy sampling:        {milliseconds(lambda: jax.block_until_ready(pick(logits))):6.2f} ms")


def concurrent_requests(model, args, heads_first, per_layer) -> None:
    n = args.requests
    eng = Engine(model, max_slots=n, max_length=args.prompt + args.max_tokens, heads_first_cache=heads_first,
                 per_layer_weights=per_layer)
    prompts = np.random.default_rng(0).integers(3, model.config.vocab_size, (n, args.prompt)).tolist()
    for run in ("compile", "measure"):
        requests = [Request(p, SamplingParams(max_tokens=args.max_tokens)) for p in prompts]
        start = time.perf_counter()
        done = eng.generate(requests)
        seconds = time.perf_counter() - start
    tokens = sum(len(r.tokens) for r in done)
    assert tokens == n * args.max_tokens, f"{tokens} tokens generated, expected {n * args.max_tokens}"
    print(f"engine: {n} concurrent requests, prompt {args.prompt}, {args.max_tokens} new tokens each (greedy): "
          f"{tokens:,} tokens in {seconds:.2f} s = {tokens / seconds:,.0f} output tokens/s (second run)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rows", default="32", help="comma-separated: each is timed")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--kv", default="128,256,512,1024")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--cache-order", default="platform",
                        help="comma-separated, each timed: platform, heads_first or positions_first")
    parser.add_argument("--layer-weights", default="platform",
                        help="comma-separated, each timed: platform, stacked or own (a layer's weights in buffers of "
                        "their own)")
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--no-parts", action="store_true")
    parser.add_argument("--profile", metavar="DIR", help="then trace 3 decoding calls of the first rows, cache "
                        "order and KV length into DIR and list their kernel time (zephyr_jax.profiling)")
    args = parser.parse_args()
    orders = args.cache_order.split(",")
    unknown = sorted(set(orders) - {"platform", "heads_first", "positions_first"})
    if unknown:
        parser.error(f"--cache-order: unknown {unknown}; expected platform, heads_first or positions_first")
    unknown = sorted(set(args.layer_weights.split(",")) - {"platform", "stacked", "own"})
    if unknown:
        parser.error(f"--layer-weights: unknown {unknown}; expected platform, stacked or own")
    dtype = jnp.dtype(args.dtype)
    cfg = MistralConfig(**ARCHS[args.arch], max_position_embeddings=args.max_length, dtype=dtype, param_dtype=dtype)
    model = Mistral(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    platform_layout = "own" if engine.per_layer_weights_on(jax.default_backend()) else "stacked"
    layouts = {}  # "stacked" / "own" -> (graphdef, state), one copy each however often listed
    for name in args.layer_weights.split(","):
        name = platform_layout if name == "platform" else name
        split = nnx.split(mistral.per_layer_weights(model)) if name == "own" else (graphdef, state)
        layouts.setdefault(name, (engine._hashed_once(split[0]), split[1]))  # (as the engine passes it to jit)
    heads_firsts = [None if o == "platform" else o == "heads_first" for o in orders]
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.arch} ({cfg.num_params / 1e9:.2f}B params, "
          f"{args.dtype})")
    param_bytes, bandwidths = sum(x.nbytes for x in jax.tree.leaves(state)), (copy_bandwidth(), datasheet_bandwidth())
    print(f"parameters {param_bytes / 1e9:.2f} GB; copy bandwidth {bandwidths[0] / 1e9:,.0f} GB/s measured"
          + (f", {bandwidths[1] / 1e9:,.0f} GB/s data sheet" if bandwidths[1] else ""))
    print(f"{args.steps} tokens a call, every row decoding")
    print("| rows | cache stored | layer weights | KV positions | ms/token | tokens/s (all rows) "
          "| bound ms/token (measured BW) | of bound | bound ms/token (data sheet) | of bound |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in rows:
        for heads_first in heads_firsts:
            for layout, (graphdef, state) in layouts.items():
                decode_per_token(graphdef, state, cfg, args, n, heads_first, param_bytes, bandwidths, layout)
    first = next(iter(layouts))
    graphdef, state = layouts[first]
    if not args.no_parts:
        parts(graphdef, state, cfg, rows[0])
    if args.requests:
        concurrent_requests(model, args, heads_firsts[0], first == "own")
    if args.profile:  # last, and a profiler that fails (no CUPTI on a GPU machine) costs none of the figures above
        try:
            profile_decode(graphdef, state, cfg, args, rows[0], heads_firsts[0], int(args.kv.split(",")[0]))
        except Exception as e:  # noqa: BLE001
            print(f"profile failed: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
