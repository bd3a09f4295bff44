"""Where a train step's time goes: a jax.profiler trace of a few steps, and a table of its XLA operations.

    python -m zephyr_jax.train --config=configs/sft.py --config.train.profile_start=10 [...profile_steps=3]
    python -m zephyr_jax.profiling WORKDIR [--top=25]

The trace lands in WORKDIR/tensorboard/plugins/profile/<time>/<host>.xplane.pb, where TensorBoard's Profile tab
and XProf find it; every train step in it carries its number (a jax.profiler.StepTraceAnnotation). Only process 0
traces: processes that share a host would write the same file.

The table sums, per XLA operation (its `hlo_op`), the time its kernels ran: on a GPU the device planes' kernels
and copies (a command buffer, a CUDA graph of many operations' kernels under one name, a row per kernel), on a
TPU its "XLA Ops" line, on a CPU the XLA:CPU thunks; a loop counts its own time, not its body's. Kernels on
concurrent streams overlap, so the shares are of the summed kernel time, not of the wall time. The kind (matmul,
attention, collective, copy, other) is read from the operation's and its kernel's names: a first look at what to
speed up, not a roofline (XProf's op profile is that). An eval or a save inside the window runs programs of its
own: the table lists them with their module, and "a step" counts only the train step's (jit_train_step).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import os
import re

import jax

# Name patterns (an operation's hlo_op or its kernel's name) -> kind; the first that matches wins.
KINDS = (
    ("attention", r"fmha|flash|splash|attention"),
    ("matmul", r"gemm|cublas|nvjet|xmma|matmul|dot|convolution|wgmma"),
    ("collective", r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|nccl|allreduce"),
    ("copy", r"copy|memcpy|memset|transpose|dynamic-update-slice"),
)
COMMAND_BUFFER = re.compile(r"command_buffer")  # XLA:GPU's name for an operation that is a CUDA graph


class TraceWindow:
    """Traces steps `start` .. `start + count - 1` of a loop into `logdir` (start 0: never). Call
    `before(step, pending)` just before dispatching a step (numbered from 1; `pending`: the outputs of the steps
    still running, which finish before the trace starts), `after(step, outputs)` after it, and `close()` when the
    loop ends, also on an error: a trace still open then (the loop stopped inside the window) keeps the steps
    it holds. `untimed`: a context for the starting and stopping (the training loop's: not step time; writing a
    7B step's trace takes seconds)."""

    def __init__(self, start: int, count: int, logdir: str, untimed=contextlib.nullcontext):
        self.start, self.last, self.logdir, self.untimed = start, start + count - 1, logdir, untimed
        self.active, self.traced = False, None

    def before(self, step: int, pending=None) -> None:
        if self.start and step == self.start and jax.process_index() == 0:
            jax.block_until_ready(pending)  # steps still queued on the device finish outside the trace
            with self.untimed():
                jax.profiler.start_trace(self.logdir)
            self.active = True

    def after(self, step: int, outputs) -> None:
        if self.active:
            self.traced = step
            if step >= self.last:
                jax.block_until_ready(outputs)  # the window's kernels finish inside the trace
                self.close()

    def close(self) -> None:
        if self.active:
            self.active = False
            with self.untimed():
                jax.profiler.stop_trace()
            steps = f"steps {self.start}-{self.traced}" if self.traced else f"step {self.start} (stopped inside it)"
            print(f"profile of {steps}: {newest_trace(self.logdir)} (TensorBoard's "
                  f"Profile tab; `python -m zephyr_jax.profiling {self.logdir}` lists its operations)")


def newest_trace(path: str) -> str:
    """The newest .xplane.pb at or under `path` (a workdir, its tensorboard folder, or the file itself)."""
    if os.path.isfile(path):
        return path
    files = glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no .xplane.pb trace under {path} (train with --config.train.profile_start=N)")
    return max(files, key=os.path.getmtime)


def kind_of(*names: str) -> str:
    text = " ".join(names).lower()
    return next((kind for kind, pattern in KINDS if re.search(pattern, text)), "other")


# A profile's derived lines: they repeat, per operation, module or step, the time the kernels' own lines hold.
DERIVED_LINES = ("Steps", "XLA Modules", "XLA Ops", "Async XLA Ops", "XLA TraceMe", "TensorFlow Ops",
                 "Framework Ops", "Framework Name Scope", "TensorFlow Name Scope", "Source code")


def _self_times(events) -> list[float]:
    """Each event's seconds less the part of it that later events on its line cover: a loop or a call spans the
    operations it runs (XLA:CPU's while thunks, a TPU's XLA Ops line), and counts only its own time."""
    order = sorted(range(len(events)), key=lambda i: (events[i].start_ns, -events[i].duration_ns))
    seconds, spanning = [e.duration_ns * 1e-9 for e in events], []
    for i in order:
        e = events[i]
        while spanning and events[spanning[-1]].end_ns <= e.start_ns:
            spanning.pop()
        if spanning:
            parent = events[spanning[-1]]
            seconds[spanning[-1]] -= (min(e.end_ns, parent.end_ns) - e.start_ns) * 1e-9
        spanning.append(i)
    return seconds


def _op_events(plane):
    """(op, module, kernel name, seconds, device) of each kernel on a plane: the events that name their XLA
    operation (hlo_op: GPU kernels and copies, XLA:CPU thunks, which say their device); where none does (a TPU),
    the plane's "XLA Ops" line. A device plane is one device."""
    named = []
    for line in plane.lines:
        if line.name in DERIVED_LINES:
            continue
        events = [(e, dict(e.stats)) for e in line.events]
        events = [(e, stats) for e, stats in events if stats.get("hlo_op")]
        for (e, stats), seconds in zip(events, _self_times([e for e, _ in events])):
            named.append((str(stats["hlo_op"]), str(stats.get("hlo_module", "?")), e.name, seconds,
                          (plane.name, stats.get("device_ordinal"))))  # (a name that reads as a number is one)
    return named or _xla_ops_line(plane)


def _xla_ops_line(plane):
    """A TPU plane's operations, from its "XLA Ops" line (each for its self time); an operation's module is the
    "XLA Modules" event it falls in ("jit_train_step(12)": the name before the program id)."""
    lines = {line.name: list(line.events) for line in plane.lines}
    modules = [(e.start_ns, e.end_ns, re.sub(r"\(\d+\)$", "", e.name)) for e in lines.get("XLA Modules", [])]
    ops = lines.get("XLA Ops", [])
    return [(e.name, next((name for start, end, name in modules if start <= e.start_ns < end), "?"), e.name,
             seconds, (plane.name, None)) for e, seconds in zip(ops, _self_times(ops))]


def op_times(path: str) -> tuple[list[dict], dict]:
    """(one row per XLA operation, most time first: module, op, kernel (the first seen), kind, calls (kernel runs:
    one operation may launch several kernels), seconds; a GPU command buffer one row per kernel; facts about the
    trace: the planes read, how many devices ran operations, the step numbers it marks)."""
    data = jax.profiler.ProfileData.from_file(path)
    # A GPU's or TPU's kernels are on its device plane; XLA:CPU's on the host's, read only where no device plane
    # holds any (libtpu's Megascale trace, where jax[tpu] is installed, is a "/device:" plane without operations).
    found = {p.name: _op_events(p) for p in data.planes if p.name.startswith("/device:")}
    chosen = {name: ops for name, ops in found.items() if ops} or \
        {p.name: _op_events(p) for p in data.planes if p.name == "/host:CPU"}
    steps = set()  # the step markers, on the host's Python thread
    for line in (line for plane in data.planes if plane.name.startswith("/host") for line in plane.lines):
        steps.update(int(stats["step_num"]) for stats in map(dict, (e.stats for e in line.events))
                     if "step_num" in stats)
    rows, devices = {}, set()
    for ops in chosen.values():
        for op, module, kernel, seconds, device in ops:
            devices.add(device)
            # A GPU command buffer (a CUDA graph) runs many operations' kernels under its own name: one row a
            # kernel there, so each kernel's kind counts (else the first kernel's name labels them all).
            key = (module, op, kernel) if COMMAND_BUFFER.match(op) else (module, op)
            row = rows.setdefault(key, {"module": module, "op": op, "kernel": kernel, "calls": 0, "seconds": 0.0})
            row["calls"] += 1
            row["seconds"] += seconds
    ordered = sorted(rows.values(), key=lambda r: -r["seconds"])
    for row in ordered:
        row["kind"] = kind_of(row["kernel"]) if COMMAND_BUFFER.match(row["op"]) else kind_of(row["op"], row["kernel"])
    return ordered, {"planes": sorted(chosen), "devices": len(devices), "steps": sorted(steps)}


def report(path: str, top: int = 25) -> str:
    """The trace's operations as markdown: the kinds' shares, then the `top` operations by time."""
    rows, facts = op_times(path)
    total = sum(r["seconds"] for r in rows)
    if not total:
        raise ValueError(f"{path}: no XLA operation in planes {facts['planes']} (was a step run while tracing?)")
    steps, devices = facts["steps"], facts["devices"]
    modules, by_kind = collections.Counter(), collections.Counter()
    for r in rows:
        modules[r["module"]] += r["seconds"]
        by_kind[r["kind"]] += r["seconds"]
    # An eval or a checkpoint inside the window runs other programs: a step's time is the train step's own.
    step_time = modules.get("jit_train_step", total)
    per_step = (f", {1e3 * step_time / len(steps) / devices:.2f} ms a step a device over steps {steps[0]}-{steps[-1]}"
                if steps else "")
    out = [f"{path}: {len(rows)} operations, {1e3 * total:.2f} ms of kernel time on {devices} device(s) "
           f"({', '.join(facts['planes'])}){per_step}",
           "kinds: " + ", ".join(f"{k} {100 * s / total:.1f}%" for k, s in by_kind.most_common()),
           "modules: " + ", ".join(f"{m} {1e3 * s:.2f} ms" for m, s in modules.most_common()),
           "", "| operation | module | kind | runs | ms | share | kernel |", "|---|---|---|---|---|---|---|"]
    for r in rows[:top]:
        kernel = r["kernel"] if r["kernel"] != r["op"] else ""
        out.append(f"| {r['op']} | {r['module']} | {r['kind']} | {r['calls']} | {1e3 * r['seconds']:.3f} "
                   f"| {100 * r['seconds'] / total:.1f}% | {kernel[:60]} |")
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zephyr_jax.profiling",
                                     description="The XLA operations of a jax.profiler trace, most time first.")
    parser.add_argument("path", help="a training workdir, a folder holding traces, or an .xplane.pb file")
    parser.add_argument("--top", type=int, default=25, help="operations to list")
    args = parser.parse_args(argv)
    if args.top < 1:  # -3 listed all but the last 3 operations (rows[:top])
        raise SystemExit(f"error: --top={args.top}: must be at least 1")
    try:
        print(report(newest_trace(args.path), args.top))
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # RuntimeError: not an XSpace (or cut short)
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
