"""Serving throughput: N concurrent streaming chat clients on a mix of prompt and reply lengths, against
  - zephyr_jax.serve (continuous batching over KV-cache slots),
  - `transformers serve --continuous-batching` (PyTorch, paged attention), on the same weights,
  - static batches of zephyr_jax's generate() on the same requests (in process: each call of `clients` prompts
    returns when its longest reply ends, then the next batch starts; no HTTP; the engine drops finished rows
    from its decoding calls, so only the waiting is static);
  - `static_before`: the same with the generate() before the engine (commit 005ba0e: a padded while_loop that
    computes every row until the longest ends), run from a checkout of that commit:
    git worktree add /tmp/before 005ba0e && PYTHONPATH=/tmp/before python bench/serve_throughput.py \
      --systems=static_before --model=HF_DIR
Reports requests/s, output tokens/s, time to first token and latency (p50 / p99). Each load runs --warmups times
before the measured run, which compiles the shapes it meets (zephyr_jax) and warms the caches (all systems);
zephyr_jax.serve starts with --warmup (every decoding shape compiled before it serves) and warms up again (at
most 6 more times) until two warm-up runs in a row compile no program. For zephyr_jax
the row also says how many programs were still compiled during the measured run, and the share of computed
prefill / decode positions that were real tokens.

    python bench/serve_throughput.py [--clients=1,8,32] [--systems=zephyr,transformers,static] [--model=HF_DIR]

`transformers serve` needs `pip install "transformers[serving]" accelerate`. Both servers run float32 on the CPU
(`--device=cpu --dtype=float32` / `--dtype=float32`), zephyr_jax with --max-slots = the largest client count.

Without --model a random Mistral-shaped model (hidden 256, 4 layers, 32000-token vocabulary) is written to a
temporary directory with the Zephyr tokenizer. Replies are fixed in length (`ignore_eos` where the server has
it; a random model practically never emits `</s>` anyway): output tokens are counted from `usage`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("the cat sat on a mat while rain fell over hills and rivers in spring light so birds sang songs "
         "about bright mornings near quiet towns").split()


def make_model(path: str) -> str:
    from flax import nnx

    from zephyr_jax import hf
    from zephyr_jax.model import Mistral, MistralConfig
    from zephyr_jax.tokenizer import load_tokenizer

    cfg = MistralConfig(vocab_size=32000, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                        initializer_range=0.05)
    hf.save_pretrained(Mistral(cfg, rngs=nnx.Rngs(0)), path, tokenizer=load_tokenizer())
    return path


def request_set(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, reply tokens): prompts of about 10-400 words, replies of 8-256 tokens (log-uniform mixes)."""
    rng = np.random.default_rng(seed)
    prompt_words = np.exp(rng.uniform(np.log(10), np.log(400), n)).astype(int)
    replies = np.exp(rng.uniform(np.log(8), np.log(256), n)).astype(int)
    return [(" ".join(rng.choice(WORDS, size=w)), int(r)) for w, r in zip(prompt_words, replies)]


def summary(name: str, clients: int, results: list[dict], seconds: float) -> dict:
    ttft = np.array([r["ttft"] for r in results])
    latency = np.array([r["latency"] for r in results])
    tokens = sum(r["tokens"] for r in results)
    return {"system": name, "clients": clients, "requests": len(results), "seconds": round(seconds, 2),
            "requests_per_s": round(len(results) / seconds, 3), "output_tokens_per_s": round(tokens / seconds, 1),
            "ttft_p50_s": round(float(np.median(ttft)), 3), "latency_p50_s": round(float(np.median(latency)), 3),
            "latency_p99_s": round(float(np.percentile(latency, 99)), 3), "output_tokens": tokens}


# --- HTTP servers ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], port: int, log_path: str, timeout: float = 600):
    import httpx

    log = open(log_path, "w")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(1)
    proc.kill()
    raise RuntimeError(f"{command[:3]} did not come up; see {log_path}")


async def one_chat(client, url: str, model: str, prompt: str, max_tokens: int, extra: dict) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **extra}
    start = time.perf_counter()
    first, chunks, usage = None, 0, None
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:300]}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    chunks += 1
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    return {"ttft": (first or end) - start, "latency": end - start, "tokens": tokens}


async def drive(url: str, model: str, requests: list[tuple[str, int]], clients: int,
                extra: dict) -> tuple[list[dict], float]:
    """`clients` workers, each sending its next request as soon as its last one ended."""
    import httpx

    queue = list(reversed(requests))
    results = []
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=clients)) as client:
        async def worker():
            while queue:
                prompt, n = queue.pop()
                results.append(await one_chat(client, url, model, prompt, n, extra))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
    return results, time.perf_counter() - start


def bench_server(name: str, command: list[str], port: int, model_id: str, loads, workdir: str,
                 extra: dict, warmups: int) -> list[dict]:
    """extra: request fields beyond OpenAI's (transformers serve refuses unknown ones)."""
    import httpx

    proc = start(command, port, os.path.join(workdir, f"{name}.log"))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    rows = []
    try:
        health = lambda: httpx.get(f"http://127.0.0.1:{port}/health").json().get("stats", {})
        for clients, requests in loads:
            # Compile / load / allocate what this load needs. Which shapes zephyr_jax meets depends on timing
            # (how many rows decode together at the end of a run, how far they have got), so it warms up (at
            # most 6 times more) until two runs in a row compile nothing new.
            quiet = 0
            for i in range(warmups + 6):
                before = health().get("compiled_programs", 0)
                asyncio.run(drive(url, model_id, requests, clients, extra))
                quiet = quiet + 1 if health().get("compiled_programs", 0) == before else 0
                if i + 1 >= warmups and quiet >= min(2, warmups):
                    break
            before = health()
            results, seconds = asyncio.run(drive(url, model_id, requests, clients, extra))
            after = health()
            rows.append(summary(name, clients, results, seconds))
            if "compiled_programs" in after:  # zephyr_jax: compiles and padding during the measured run
                rows[-1]["compiled_during_run"] = after["compiled_programs"] - before["compiled_programs"]
                for kind in ("prefill", "decode"):
                    real = after.get(f"{kind}_tokens" if kind == "prefill" else "tokens", 0) - \
                        before.get(f"{kind}_tokens" if kind == "prefill" else "tokens", 0)
                    computed = after.get(f"{kind}_positions", 0) - before.get(f"{kind}_positions", 0)
                    rows[-1][f"{kind}_real_fraction"] = round(real / max(computed, 1), 3)
            print(json.dumps(rows[-1]), flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return rows


# --- static batches in process ----------------------------------------------------------------------------


def bench_static(model_dir: str, loads, warmups: int) -> list[dict]:
    import zephyr_jax
    from zephyr_jax.engine import SamplingParams
    from zephyr_jax.generate import run
    from zephyr_jax.tokenizer import render_chat

    model, tok = zephyr_jax.load(model_dir, dtype="float32")
    encode = lambda p: tok(render_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)).input_ids

    def serve(clients, requests):
        prompts = [encode(p) for p, _ in requests]
        params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in requests]
        results, start = [], time.perf_counter()
        for i in range(0, len(prompts), clients):  # one generate() call per static batch
            batch_start = time.perf_counter()
            done = run(model, prompts[i:i + clients], params[i:i + clients], tok, max_slots=clients,
                       max_length=2048)
            results += [{"ttft": r.first_token_at - batch_start, "latency": r.finished_at - batch_start,
                         "tokens": r.generated} for r in done]
        return summary("static generate()", clients, results, time.perf_counter() - start)

    rows = []
    for clients, requests in loads:
        for _ in range(warmups):
            serve(clients, requests)  # warm-up: every shape compiled once
        rows.append(serve(clients, requests))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bench_static_before(model_dir: str, loads, warmups: int) -> list[dict]:
    """Static batches of the generate() of commit 005ba0e (before the engine: one jax.lax.while_loop over a
    left-padded batch, every row computed until the longest reply ends). Run with PYTHONPATH set to a checkout of
    that commit (`git worktree add /tmp/before 005ba0e`): the batch asks for its longest reply, and each request
    counts only its own tokens, ending when the batch does."""
    import jax.numpy as jnp

    from zephyr_jax import hf
    from zephyr_jax.generate import generate
    from zephyr_jax.tokenizer import load_tokenizer

    assert not hasattr(hf, "read_weights"), "run this with PYTHONPATH pointing at a checkout of commit 005ba0e"
    model = hf.load_pretrained(model_dir, dtype=jnp.float32)
    tok = load_tokenizer(model_dir)

    def serve(clients, requests):
        results, start = [], time.perf_counter()
        for i in range(0, len(requests), clients):
            batch = requests[i:i + clients]
            batch_start = time.perf_counter()
            generate(model, tok, [[{"role": "user", "content": p}] for p, _ in batch],
                     max_new_tokens=max(n for _, n in batch))
            end = time.perf_counter()  # a static batch returns all its replies at once
            results += [{"ttft": end - batch_start, "latency": end - batch_start, "tokens": n} for _, n in batch]
        return summary("static generate() before the engine (005ba0e)", clients, results,
                       time.perf_counter() - start)

    rows = []
    for clients, requests in loads:
        for _ in range(warmups):
            serve(clients, requests)
        rows.append(serve(clients, requests))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", default="8,32,64", help="requests per client count")
    parser.add_argument("--systems", default="zephyr,transformers,static")
    parser.add_argument("--decode-steps", type=int, default=8, help="zephyr_jax.serve's tokens per decoding call")
    parser.add_argument("--warmups", type=int, default=2, help="unmeasured runs of each load before the measured one")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()

    clients, requests = args.clients.split(","), args.requests.split(",")
    if len(clients) != len(requests):  # (zip dropped the loads past the shorter list)
        parser.error(f"--clients={args.clients} names {len(clients)} loads but --requests={args.requests} "
                     f"{len(requests)}: give one request count per client count")
    workdir = tempfile.mkdtemp(prefix="serve_bench_")
    model_dir = args.model or make_model(os.path.join(workdir, "model"))
    loads = [(int(c), request_set(int(n), seed=int(c))) for c, n in zip(clients, requests)]
    systems = args.systems.split(",")
    max_clients = max(c for c, _ in loads)
    rows = []
    if "zephyr" in systems:
        port = free_port()
        rows += bench_server("zephyr_jax.serve", [
            sys.executable, "-m", "zephyr_jax.serve", f"--model={model_dir}", "--dtype=float32", f"--port={port}",
            "--served-model-name=bench", f"--max-slots={max_clients}", "--max-length=2048",
            f"--max-queue={4 * max_clients}", f"--decode-steps={args.decode_steps}", "--warmup"], port, "bench", loads,
            workdir,
            {"ignore_eos": True}, args.warmups)
    if "transformers" in systems:
        port = free_port()
        rows += bench_server("transformers serve --continuous-batching", [
            "transformers", "serve", model_dir, "--continuous-batching", "--device=cpu", "--dtype=float32",
            f"--port={port}", "--host=127.0.0.1"], port, model_dir, loads, workdir, {}, args.warmups)
    if "static" in systems:
        rows += bench_static(model_dir, loads, args.warmups)
    if "static_before" in systems:
        rows += bench_static_before(model_dir, loads, args.warmups)
    print("\n| system | clients | requests | req/s | output tok/s | TTFT p50 (s) | latency p50 (s) | p99 (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['system']} | {r['clients']} | {r['requests']} | {r['requests_per_s']} | "
              f"{r['output_tokens_per_s']} | {r['ttft_p50_s']} | {r['latency_p50_s']} | {r['latency_p99_s']} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
