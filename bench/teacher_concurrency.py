"""Teacher-call concurrency: wall time of N calls through data.endpoint.Endpoint against a scripted server that
answers every request after a fixed delay, for several per-URL concurrency bounds, and for a two-URL fleet.

With a server that never limits itself, wall time should be about N * delay / concurrency (the "ideal" column):
this measures the client's bound and its overhead (HTTP, JSON, retries bookkeeping), not any model.

    python bench/teacher_concurrency.py [--calls=64] [--delay=0.2] [--concurrency=1,2,4,8,16,32] [--fleet=8]
"""

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from tests.scripted_server import ScriptedServer, sleep, text  # noqa: E402
from zephyr_jax.data.backends import Call  # noqa: E402
from zephyr_jax.data.endpoint import Endpoint  # noqa: E402


def run(urls, concurrency: int, calls: int) -> tuple[float, Endpoint]:
    endpoint = Endpoint("bench-teacher", urls, concurrency=concurrency, timeout=30.0, max_retries=0)
    work = [Call(messages=[{"role": "user", "content": f"question {i}"}], max_tokens=8) for i in range(calls)]

    async def main():
        async with endpoint:
            await endpoint.complete(Call(messages=[{"role": "user", "content": "warm-up"}]))  # clients, connection
            endpoint.stats.clear()
            started = time.perf_counter()
            replies = await asyncio.gather(*(endpoint.complete(c) for c in work))
            wall = time.perf_counter() - started
        failed = [r.error for r in replies if not r.ok]
        if failed:
            raise SystemExit(f"{len(failed)} calls failed, e.g. {failed[0]}")
        return wall

    return asyncio.run(main()), endpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=64)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds the server waits before each answer")
    parser.add_argument("--concurrency", default="1,2,4,8,16,32", help="per-URL bounds to measure, comma-separated")
    parser.add_argument("--fleet", type=int, default=8, help="per-URL bound of the two-URL fleet run (0: skip)")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",") if c]

    def respond(body, attempt):
        return sleep(args.delay, text("an answer", completion_tokens=2))

    print(f"{args.calls} calls, server delay {args.delay:g} s\n")
    print("| URLs | concurrency per URL | wall s | calls/s | speedup vs 1 | ideal N*delay/c s |")
    print("|---|---|---|---|---|---|")
    base = None
    with ScriptedServer(respond) as one, ScriptedServer(respond) as two:
        runs = [([one.base_url], c) for c in levels]
        if args.fleet:
            runs.append(([one.base_url, two.base_url], args.fleet))
        for urls, c in runs:
            before = len(one.log)
            wall, endpoint = run(urls, c, args.calls)
            base = base or (wall if c == 1 and len(urls) == 1 else None)
            ideal = args.calls * args.delay / min(c * len(urls), args.calls)
            speedup = f"{base / wall:.1f}x" if base else "-"
            print(f"| {len(urls)} | {c} | {wall:.2f} | {args.calls / wall:.1f} | {speedup} | {ideal:.2f} |",
                  flush=True)
        if args.fleet:  # the last run was the fleet's (warm-up call included)
            print(f"\nfleet: {len(one.log) - before} requests to the first URL, {len(two.log)} to the second; "
                  f"most in flight at once on the second server: {two.max_in_flight} (bound {args.fleet})")


if __name__ == "__main__":
    main()
