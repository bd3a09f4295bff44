"""Memory traffic of the train step as XLA:GPU compiles it, kernel by kernel, for a GPU this machine does not have.

    python bench/step_traffic.py --config=configs/sft.py [--config.key=value ...] [--topology=h200-1]
        [--length_mix=SPEC] [--top=25] [--grouped_kv]

Compiles the train step that train.py jits (the planner's way: zephyr_jax.plan, same function, shardings and
batch shapes: the largest of the length mix's batches) for --topology (compile_targets.target_for; GPUs need JAX's
CUDA plugin: `PYTHONPATH=.ci/cuda`, and `XLA_PYTHON_CLIENT_MEM_FRACTION=0.95` for the planner's memory) and reads
the optimized program: every kernel's bytes read and written, from its operands' and result's shapes (a dynamic
slice or a gather reads what it takes, a dynamic-update-slice writes its update in place), each loop body's
kernels times the loop's trip count. Matmuls (cuBLAS or Triton GEMM fusions), cuDNN attention and collectives
(their bytes cross the interconnect) are counted apart from the rest: the rest is bandwidth-bound work
(normalisation, RoPE, SwiGLU, masks, the optimizer, casts, copies), whose bytes over the HBM bandwidth are time a
step spends outside its matmuls. A static estimate from the
program, not a measurement: the autotuner here picks kernels without a GPU, and caches are ignored. XLA:TPU's
programs are read too, but without trip counts (each loop counted once, and named).

XLA_FLAGS is what the environment says (unset: XLA's defaults, as bench/throughput.py runs); the program a
launch/slurm_gpu.sbatch job runs: `XLA_FLAGS="$(python -m zephyr_jax.xla_flags)"` (cuBLAS GEMMs, no XLA
rematerialisation: its fusions differ). --grouped_kv: cuDNN's packed rows take grouped K/V as they are, as on jax
0.11.1 and later, whatever this machine's jax (attention.PACKED_KV_STRIDED_BY_QUERY_HEADS).

Prints each loop's and the whole step's bytes, the time the non-matmul bytes take at --bandwidth GB/s, and the
--top non-matmul kernels of the whole step (bytes times trips) with the JAX operation each came from.
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from zephyr_jax import plan, train  # noqa: E402
from zephyr_jax.compile_targets import cudnn_checks_for, target_for  # noqa: E402
from zephyr_jax.model import attention  # noqa: E402

BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
         "f64": 8, "s64": 8, "u64": 8}
SHAPE = re.compile(r"\b(" + "|".join(BYTES) + r")\[([\d,]*)\]")
NOT_KERNELS = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call", "conditional",
               "after-all", "partition-id", "replica-id"}


def shape_bytes(text: str) -> int:
    return sum(BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d) for dtype, dims in SHAPE.findall(text))


def computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """{name: instruction lines} of an HLO module's text, and the entry computation's name."""
    comps, entry, name = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(2)
            comps[name] = []
            entry = name if head.group(1) else entry
        elif line.startswith("  ") and name:
            comps[name].append(line.strip())
    return comps, entry


def instructions(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        m = re.match(r"(ROOT )?%([\w.\-]+) = (.+?) ([\w\-]+)\((.*)", line)
        if m:
            operands = m.group(5).split("), ")[0] if "), " in m.group(5) else m.group(5)
            out.append(dict(root=bool(m.group(1)), name=m.group(2), shape=m.group(3), op=m.group(4),
                            operands=re.findall(r"%([\w.\-]+)", operands), line=line))
    return out


def fused_traffic(body: list[dict], operand_shapes: list[str], result: str) -> tuple[int, int]:
    """(bytes read, bytes written) of a fusion: an operand only sliced or gathered from reads what is taken, the
    buffer a dynamic-update-slice updates in place is not read, and such a fusion writes only the update."""
    users = collections.defaultdict(list)
    for ins in body:
        for i, operand in enumerate(ins["operands"]):
            users[operand].append((ins, i))
    read = 0
    for ins in body:
        if ins["op"] != "parameter":
            continue
        index = int(re.search(r"parameter\((\d+)\)", ins["line"]).group(1))
        full = shape_bytes(operand_shapes[index]) if index < len(operand_shapes) else 0
        uses, seen = [], [ins["name"]]
        while seen:  # through bitcasts, which read nothing
            for use, i in users[seen.pop()]:
                (seen.append(use["name"]) if use["op"] == "bitcast" else uses.append((use, i)))
        if uses and all(u["op"] in ("dynamic-slice", "gather") and i == 0 for u, i in uses):
            dtype = SHAPE.search(operand_shapes[index]).group(1)
            read += sum(shape_bytes(u["shape"].split(" ")[0]) // BYTES[SHAPE.search(u["shape"]).group(1)]
                        * BYTES[dtype] for u, _ in uses)
        elif not (uses and all(u["op"] == "dynamic-update-slice" and i == 0 for u, i in uses)):
            read += full
    written = shape_bytes(result)
    root = next((ins for ins in body if ins["root"]), None)
    if root is not None and root["op"] == "dynamic-update-slice":
        update = next((ins for ins in body if ins["name"] == root["operands"][1]), None)
        written = shape_bytes(update["shape"]) if update is not None else written
    return read, written


COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def kind(ins: dict, comps: dict) -> str:
    line = ins["line"]
    if "__cudnn$fmha" in line:
        return "attention"
    if ins["op"].removesuffix("-start") in COLLECTIVES:  # over the interconnect, overlapped: no HBM-bound kernel
        return "collective"
    if ins["op"] in ("dot", "convolution") or "__cublas" in line or (
            ins["op"] == "fusion" and any(" dot(" in x or " convolution(" in x
                                          for x in comps.get(_called(line) or "", []))):
        return "matmul"
    return "other"


def _called(line: str) -> str | None:
    m = re.search(r"calls=%([\w.\-]+)", line)
    return m.group(1) if m else None


def kernels(comps: dict, name: str) -> list[dict]:
    """The kernels of one computation, each with its bytes read and written, kind and JAX operation."""
    body = instructions(comps[name])
    shapes = {ins["name"]: ins["shape"] for ins in body}
    out = []
    for ins in body:
        if ins["op"] in NOT_KERNELS or ins["op"].endswith("-done"):
            continue
        operand_shapes = [shapes.get(o, "") for o in ins["operands"]]
        called = _called(ins["line"])
        if ins["op"] == "fusion" and called in comps:
            read, written = fused_traffic(instructions(comps[called]), operand_shapes, ins["shape"])
        elif ins["op"] in ("dynamic-slice", "gather"):
            read = written = shape_bytes(ins["shape"])
        elif ins["op"] == "dynamic-update-slice":
            read = written = shape_bytes(operand_shapes[1])
        else:
            read, written = sum(shape_bytes(s) for s in operand_shapes), shape_bytes(ins["shape"])
        op_name = re.search(r'op_name="([^"]*)"', ins["line"])
        out.append(dict(name=ins["name"], kind=kind(ins, comps), bytes=read + written,
                        result=ins["shape"].split(" ")[0][:60],
                        source="/".join(op_name.group(1).split("/")[-2:]) if op_name else ""))
    return out


def loops(comps: dict, entry: str) -> list[tuple[str, int]]:
    """(computation, times it runs a step): the entry once, each while body its known trip count times its
    enclosing computation's count (XLA:GPU records the count; a loop without one counts once, and is named), a
    called computation as often as its caller."""
    runs, todo = [(entry, 1)], [(entry, 1)]
    while todo:
        name, times = todo.pop()
        for line in comps[name]:
            if " while(" in line:
                body = re.search(r"body=%([\w.\-]+)", line).group(1)
                trips = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
                if trips is None:
                    print(f"note: loop {body} has no known trip count; counted once")
                runs.append((body, times * (int(trips.group(1)) if trips else 1)))
                todo.append(runs[-1])
            elif " call(" in line:
                runs.append((re.search(r"to_apply=%([\w.\-]+)", line).group(1), times))
                todo.append(runs[-1])
    return runs


def compile_step(cfg, topology: str, spec: str | None):
    """The train step compiled for `topology`, as the planner compiles it."""
    target = target_for(topology)
    mesh = train.mesh_for(cfg, target.devices)
    mcfg, _ = plan.planned_model_config(cfg)
    batches = plan.batches_of_mix(cfg, mesh, spec or plan.DEFAULT_MIX[cfg.stage])
    step, inputs = plan.train_step_and_inputs(cfg, mcfg, mesh, batches)
    with jax.set_mesh(mesh), cudnn_checks_for(target):
        return step.lower(inputs.state, inputs.batch, inputs.reference, inputs.hparams).compile(), target


def report(cfg, topology: str, spec: str | None, bandwidth: float, top_n: int, grouped_kv: bool) -> None:
    if grouped_kv:
        attention.PACKED_KV_STRIDED_BY_QUERY_HEADS = False
    compiled, target = compile_step(cfg, topology, spec)
    comps, entry = computations(compiled.as_text())
    gib = lambda b: f"{b / 2 ** 30:,.2f}"  # noqa: E731
    kv = "repeated to q's heads" if attention.PACKED_KV_STRIDED_BY_QUERY_HEADS else "grouped"
    print(f"train step ({cfg.stage}) for {target.name}, per device; GiB read + written, from the compiled program "
          f"(XLA_FLAGS: {os.environ.get('XLA_FLAGS') or 'none'}; cuDNN packed K/V {kv})")
    print("| computation | runs a step | matmuls | attention | other | other x runs |")
    print("| --- | --- | --- | --- | --- | --- |")
    totals, top = collections.Counter(), collections.Counter()
    for name, times in loops(comps, entry):
        ks = kernels(comps, name)
        by = collections.Counter()
        for k in ks:
            by[k["kind"]] += k["bytes"]
            totals[k["kind"]] += times * k["bytes"]
            if k["kind"] == "other":
                top[(name, times, k["name"], k["result"], k["source"])] += times * k["bytes"]
        print(f"| {name} | {times} | {gib(by['matmul'])} | {gib(by['attention'])} | {gib(by['other'])} "
              f"| {gib(times * by['other'])} |")
    seconds = totals["other"] / (bandwidth * 1e9)
    print(f"\nstep: {gib(totals['matmul'])} GiB in matmuls, {gib(totals['attention'])} in attention, "
          f"{gib(totals['collective'])} in collectives (not timed here), {gib(totals['other'])} in everything else: "
          f"{seconds * 1e3:.1f} ms at {bandwidth:,.0f} GB/s")
    print(f"\nthe {top_n} largest of everything else (GiB a step):")
    for (name, times, kernel, result, source), b in top.most_common(top_n):
        print(f"  {gib(b):>7}  {kernel} in {name} x{times}: {result}  ({source})")


def cli():
    from absl import app, flags

    from zephyr_jax.config_common import parse_flags

    config = config_flags.DEFINE_config_file("config", None, "configs/sft.py or configs/dpo.py, with :VARIANT",
                                             lock_config=True)
    topology = flags.DEFINE_string("topology", "h200-1", "compile_targets.target_for: h200-1, h100-8, v5e-4, ...")
    mix = flags.DEFINE_string("length_mix", None, "plan.length_mix spec or file; default plan.DEFAULT_MIX[stage]")
    top = flags.DEFINE_integer("top", 25, "how many of the largest non-matmul kernels to list")
    bandwidth = flags.DEFINE_float("bandwidth", 3300.0, "GB/s for the time estimate (an H200's device-to-device "
                                   "copy measured 3,524 GB/s, 2026-12-04)")
    grouped_kv = flags.DEFINE_bool("grouped_kv", False, "cuDNN's packed rows take grouped K/V unrepeated, as on "
                                   "jax >= 0.11.1, whatever this machine's jax")
    flags.mark_flags_as_required(["config"])
    app.run(lambda argv: report(config.value, topology.value, mix.value, bandwidth.value, top.value,
                                grouped_kv.value), flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
