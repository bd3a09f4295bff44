"""The training loop's log: each step's metrics wait on the device until a log line needs them, then become one
record (metrics.MetricWriter) with its throughput, and a loss or gradient norm that is not finite stops the run.
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import jax
import numpy as np

from zephyr_jax.data.loader import BatchInfo
from zephyr_jax.train_steps import to_host


class StepLog:
    """Train metrics on their way from the device to the log. `add` keeps a step's metrics on the device (at most
    two steps ahead of the host: the host then waits, so queued batches stay bounded); `write` fetches every
    pending step at once and writes one line: the mean of each metric over the steps since the last line (the
    learning rate: the last step's), throughput over the wall time they took (eval and checkpoint time excluded;
    not the step whose call compiled), and the padding fraction of all their batches. A non-finite loss or
    gradient norm stops the run after a line of the steps before it."""

    SHOWN = ("loss", "rewards/accuracies", "tokens_per_sec", "padding_fraction", "mfu")
    PRINTED = SHOWN[:2] + ("grad_norm", "lr") + SHOWN[2:] + ("step_time",)  # the line without a bar

    def __init__(self, writer, bar, mngr, workdir: str, throughput_of, padding_of=None):
        """throughput_of(the timed steps' BatchInfos, their wall seconds) -> metrics.throughput's figures;
        padding_of(every step's BatchInfos) -> metrics.padding_fraction (None: not logged)."""
        self.writer, self.bar, self.mngr, self.workdir = writer, bar, mngr, workdir
        self.throughput_of, self.padding_of = throughput_of, padding_of
        self.on_device, self.on_host, self.excluded = [], [], 0.0
        self.started, self.timed_from = time.perf_counter(), None

    def time_from(self, step: int, metrics) -> None:
        """Throughput counts the steps after `step` (whose call compiled the train step) from when it is done."""
        jax.block_until_ready(metrics)
        self.started, self.excluded, self.timed_from = time.perf_counter(), 0.0, step

    def add(self, step: int, metrics, info, **extra) -> None:
        self.on_device.append((step, metrics, info, extra))
        if len(self.on_device) > 2:
            jax.block_until_ready(self.on_device[-3][1])
        self.bar.update(1)

    def unwritten(self) -> list[dict]:
        """The steps of the line not yet written, as JSON (after check_finite): a preempted run saves them with its
        checkpoint, so the resumed run's line averages the same steps as an uninterrupted run's (carry_over)."""
        self.check_finite()
        return [{"step": step, "metrics": metrics, "indices": [int(i) for i in info.indices],
                 "length": int(info.length), "rows": int(info.rows), "extra": extra}
                for step, metrics, info, extra in self.on_host]

    def carry_over(self, records: list[dict]) -> None:
        """unwritten()'s steps of the run a preemption stopped, back in this run's line (they are not timed: they
        are at or before the step it starts from)."""
        self.on_host = [(r["step"], r["metrics"], BatchInfo(r["indices"], r["length"], r["rows"]), r["extra"])
                        for r in records] + self.on_host

    def check_finite(self) -> None:
        """Fetches the pending metrics; a non-finite loss or gradient norm stops the run (the step's state is never
        saved)."""
        if not self.on_device:
            return
        fetched = to_host([m for _, m, _, _ in self.on_device])
        for (step, _, info, extra), metrics in zip(self.on_device, fetched):
            loss, grad_norm = float(metrics["loss"]), float(metrics["grad_norm"])
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):  # a bad gradient: the update is bad
                self.mngr.wait_until_finished()
                self._write_line(with_throughput=False)  # the finite steps before it: what led up to it
                checkpoints, saved = os.path.join(self.workdir, "checkpoints"), self.mngr.latest_step()
                raise FloatingPointError(
                    f"loss is {loss} and grad_norm {grad_norm} at step {step}: stopping. "
                    + (f"The last good checkpoint is step {saved} in {checkpoints} (no later step was saved)"
                       if saved is not None else f"No checkpoint was saved in {checkpoints}")
                    + "; lower optim.lr, check the data, or use float32 compute to find the cause.")
            self.on_host.append((step, {k: float(v) for k, v in metrics.items()}, info, extra))
        self.on_device = []

    def write(self) -> None:
        self.check_finite()
        self._write_line(with_throughput=True)

    def _write_line(self, with_throughput: bool) -> None:
        """One record of the steps on the host. with_throughput=False leaves out throughput (a run stopping on a bad
        step: the wall time since the last line also holds steps after these)."""
        if not self.on_host:
            return
        seconds = time.perf_counter() - self.started - self.excluded
        line = {k: float(np.mean([m[k] for _, m, _, _ in self.on_host])) for k in self.on_host[-1][1]}
        line["lr"] = self.on_host[-1][1]["lr"]  # the rate at the line's step, not a mean over a warmup's
        timed = [info for step, _, info, _ in self.on_host if step > (self.timed_from or 0)] if with_throughput else []
        if timed:  # (a line of the compiling step alone has no throughput)
            line.update(self.throughput_of(timed, seconds))
            line["step_time"] = seconds / len(timed)
        if self.padding_of is not None:
            line["padding_fraction"] = self.padding_of([info for _, _, info, _ in self.on_host])
        line.update(self.on_host[-1][3])
        step = self.on_host[-1][0]
        self.writer.write(step, line)
        self.bar.set_postfix({k: f"{line[k]:.4g}" for k in self.SHOWN if k in line})
        if self.bar.disable and jax.process_index() == 0:  # no bar (train.progress=False, batch jobs' logs)
            print(f"step {step}: " + " ".join(f"{k}={line[k]:.4g}" for k in self.PRINTED if k in line), flush=True)
        self.on_host, self.excluded, self.started = [], 0.0, time.perf_counter()

    @contextlib.contextmanager
    def untimed(self):
        """Host work between steps, with the device idle (starting or stopping a profile), that is not step time;
        unlike paused(), nothing is waited for first."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - start

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (eval, checkpoints) is not step time. The steps still queued on the device are: they
        finish first (an eval or save waits behind them, which counted their time as paused)."""
        if self.on_device:
            jax.block_until_ready(self.on_device[-1][1])
        with self.untimed():
            yield
