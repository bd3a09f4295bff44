"""The planner's table in bench/RESULTS.md: the recipe's configs compiled for TPU slices on this CPU machine.

    python bench/plan_table.py [--jobs=2] [--out=bench/plan_table.jsonl] [--only=dpo.py:zephyr@v5e-64]

Each row runs `python -m zephyr_jax.plan ... --json` in its own process (jobs at a time: one compile mostly uses
one core). A row's mesh is FSDP over every chip unless stated; its grad_accum is searched: starting from a guess,
halved while the step still fits and doubled while it does not, so a row reports the fewest micro-batches that
fit (or that none does). Prints the markdown table and appends every compile's report to --out.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

# The length mixes: assumptions derived from the published dataset cards (see bench/RESULTS.md).
MIX = {"sft": "lognormal:1400,0.5", "dpo": "lognormal:117,276,0.7"}

# (config, topology, mesh, first grad_accum to try)
ROWS = [
    ("configs/sft.py:zephyr", "v4-64", "(1,32,1)", 1), ("configs/sft.py:zephyr", "v5e-64", "(1,64,1)", 1),
    ("configs/sft.py:zephyr", "v5p-32", "(1,16,1)", 1),
    ("configs/sft.py:handbook", "v4-64", "(1,32,1)", 1), ("configs/sft.py:handbook", "v5e-64", "(1,64,1)", 1),
    ("configs/sft.py:handbook", "v5p-32", "(1,16,1)", 1),
    ("configs/dpo.py:zephyr", "v4-64", "(1,32,1)", 1), ("configs/dpo.py:zephyr", "v5e-64", "(1,32,2)", 1),
    ("configs/dpo.py:zephyr", "v5p-32", "(1,16,1)", 1),
    ("configs/dpo.py:handbook", "v4-64", "(1,32,1)", 1), ("configs/dpo.py:handbook", "v5e-64", "(1,64,1)", 1),
    ("configs/dpo.py:handbook", "v5p-32", "(1,16,1)", 1),
]


def plan_once(config: str, topology: str, mesh: str, grad_accum: int) -> dict:
    stage = "dpo" if "dpo.py" in config else "sft"
    cmd = [sys.executable, "-m", "zephyr_jax.plan", f"--config={config}", f"--topology={topology}", "--json",
           f"--config.mesh.shape={mesh}", f"--config.train.grad_accum={grad_accum}", f"--length_mix={MIX[stage]}"]
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    report = json.loads(out.stdout[out.stdout.index("{"):])
    report["command"] = " ".join(["python -m zephyr_jax.plan"] + cmd[3:])
    report["wall_seconds"] = time.perf_counter() - start
    return report


def fits(report: dict) -> bool:
    return report["verdict"].startswith("fits")


def search(row, log) -> dict:
    """The report at the fewest micro-batches that fit, trying halves of a fitting guess and doubles of a failing
    one (within what divides the batch over the mesh's batch shards)."""
    config, topology, mesh, grad_accum = row
    reports = {}

    def run(k):
        reports[k] = plan_once(config, topology, mesh, k)
        log(reports[k])
        print(f"{config} {topology} mesh {mesh} grad_accum {k}: {reports[k]['verdict']}", flush=True)
        return fits(reports[k])

    fitted = run(grad_accum)
    c = reports[grad_accum]["config"]
    size, shards = c["global_batch_size"], math.prod(ast.literal_eval(mesh)[:2])
    # A micro-batch's rows split over the batch shards (train.check_batch_fits_mesh): SFT's are its examples,
    # unpacked dDPO's two a pair; packed dDPO's are rounded up to the shards, so any number of pairs splits.
    rows = lambda k: 0 if c["stage"] == "dpo" and c["packing"] else size // k * (2 if c["stage"] == "dpo" else 1)
    valid = lambda k: size % k == 0 and rows(k) % shards == 0
    if fitted:
        while grad_accum > 1 and valid(grad_accum // 2) and run(grad_accum // 2):
            grad_accum //= 2
        return reports[grad_accum]
    while valid(grad_accum * 2):
        grad_accum *= 2
        if run(grad_accum):
            break
    return reports[grad_accum]


def table(reports) -> str:
    gib = lambda b: f"{b / 2 ** 30:.1f}"
    lines = ["| config | slice (chips) | mesh (data, fsdp, tensor) | batch x length, grad_accum | params + opt + ref "
             "GiB/chip | temporaries GiB/chip | total / usable GiB | verdict | real tokens/step (padding) | "
             "FLOPs/real token (model) | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        c, m, t = r["config"], r["memory"], r["tokens"]
        temps = m.get("temporaries", m.get("temporaries_inferred", 0))
        states = m["parameters"] + m["optimizer_state"] + m["reference"]
        pairs = " pairs" if c["stage"] == "dpo" else ""
        lines.append(
            f"| {r['name']} | {r['target']['name']} ({r['target']['chips']}) | {tuple(c['mesh'].values())} | "
            f"{c['global_batch_size']}{pairs} x {c['length']}, {c['grad_accum']} | {gib(states)} | {gib(temps)} | "
            f"{gib(m['total'])} / {gib(m['hbm'])} | {'fits' if fits(r) else 'does not fit'} | "
            f"{t['real_tokens_per_step']:,.0f} ({100 * t['padding_fraction']:.0f}%) | "
            f"{t['flops_per_real_token']:.3g} ({t['model_flops_per_real_token']:.3g}) | "
            f"{r.get('compile_seconds', float('nan')):.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="bench/plan_table.jsonl")
    parser.add_argument("--only", default=None, help="CONFIG_SUFFIX@TOPOLOGY, e.g. dpo.py:zephyr@v5e-64")
    args = parser.parse_args()
    name = lambda r: f"{r[0].split('/')[-1]}@{r[1]}"  # noqa: E731
    rows = [r for r in ROWS if args.only is None or name(r) == args.only]
    if not rows:  # (a typo printed an empty table)
        parser.error(f"--only={args.only}: no row; rows: {', '.join(map(name, ROWS))}")

    def log(report):
        with open(args.out, "a") as f:
            f.write(json.dumps(report, default=str) + "\n")

    def row_report(row):
        try:
            return dict(search(row, log), name=os.path.basename(row[0]))
        except Exception as e:  # one row's failure is reported, the others still run
            print(f"{row}: {e}", flush=True)

    with ThreadPoolExecutor(args.jobs) as pool:
        chosen = [r for r in pool.map(row_report, rows) if r is not None]
    print(table(chosen))


if __name__ == "__main__":
    main()
