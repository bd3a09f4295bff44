"""Training throughput of the real jitted SFT and DPO train steps, on synthetic batches of a fixed shape.

    python bench/throughput.py --config=configs/dpo.py:tiny [--config.key=value ...] [--stage=sft|dpo|both]
        [--batch=B] [--seq=T] [--steps=N] [--warmup=W]

Builds the mesh, parameters, optimizer state, DPO reference and the jitted step exactly as zephyr_jax/train.py
does (same functions, same shardings, same donation), feeds random-token batches in the loader's format
(inputs, targets, loss_mask, positions, segment_ids; DPO arrays [B, 2, T]), compiles once, warms up, then times
N steps with block_until_ready and reports the median. Defaults: B = train.global_batch_size,
T = data.max_length, the stage of the config. Models that the config would load from a checkpoint (init "hf"
or "orbax") get random weights of the architecture read from that checkpoint's config; without the checkpoint,
pass --config.model.init=random and the --config.model.arch.* fields.

Tokens per step: B*T for SFT, 2*B*T for DPO (chosen + rejected; every position counts, as in MFU).
FLOPs: zephyr_jax.metrics.flops_per_token (6N + attention) per token, times 4/3 for DPO with a frozen
reference model (its forward pass). MFU needs the device's peak (metrics.peak_flops): n/a on CPUs.
"CPU s/step" is this process's CPU time per step, "other load" the cores other processes kept busy meanwhile
(on a shared machine, rerun when it is above ~0.05).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from zephyr_jax import train  # noqa: E402
from zephyr_jax import train_steps as steps  # noqa: E402
from zephyr_jax.metrics import flops_per_token, peak_flops  # noqa: E402

# configs/dpo.py's DPO settings, for timing the DPO step of an SFT config.
DPO_DEFAULTS = dict(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, reference_free=False,
                    precompute_reference=False, reference_dtype="float32")


class CpuUse:
    """CPU time between start() and stop() calls: this process's own (user + system, all threads) and the cores
    kept busy by other processes (/proc/stat busy time minus our own, per second of wall time). Linux only (None
    elsewhere). On a shared machine the second says how much the timings were disturbed; for a process pinned to
    one core with one thread, the first is a contention-robust measure of the work."""

    def __init__(self):
        self.own = self.other = self.wall = 0.0
        self._t0 = None

    @staticmethod
    def _now():
        with open("/proc/stat") as f:
            user, nice, system, _, _, irq, softirq = (int(x) for x in f.readline().split()[1:8])
        busy, own = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK"), os.times()
        return time.perf_counter(), busy, own.user + own.system

    def start(self):
        self._t0 = self._now() if os.path.exists("/proc/stat") else None

    def stop(self):
        if self._t0 is not None:
            (w0, b0, o0), (w1, b1, o1) = self._t0, self._now()
            self.wall += w1 - w0
            self.own += o1 - o0
            self.other += max((b1 - b0) - (o1 - o0), 0.0)

    @property
    def other_cores(self):
        return self.other / self.wall if self.wall else None


def synthetic_batch(stage: str, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Random tokens in the loader's format: no padding, one segment per row; DPO rows [B, 2, T] with the loss
    on the second half (the completion)."""
    rng = np.random.default_rng(seed)
    shape = (batch, 2, seq) if stage == "dpo" else (batch, seq)
    tokens = rng.integers(0, vocab, shape[:-1] + (seq + 1,), dtype=np.int32)
    loss_mask = np.ones(shape, np.int32)
    if stage == "dpo":
        loss_mask[..., :seq // 2] = 0
    return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:], "loss_mask": loss_mask,
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), shape).copy(),
            "segment_ids": np.ones(shape, np.int32)}


def measure(cfg, stage: str, batch: int | None = None, seq: int | None = None, num_steps: int = 10,
            warmup: int = 2) -> dict:
    """Times `num_steps` train steps of `stage` for `cfg`; returns the numbers `report` prints."""
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.stage = stage
        cfg.train.global_batch_size = batch or cfg.train.global_batch_size
        if stage == "dpo" and "dpo" not in cfg:
            cfg.dpo = ml_collections.ConfigDict(dict(DPO_DEFAULTS, reference_dtype=cfg.model.dtype))
        arch_cfg = train.model_config(cfg)  # reads the architecture of an hf/orbax model without its weights
        cfg.model.init = "random"
    batch, seq = cfg.train.global_batch_size, seq or cfg.data.max_length
    dpo, rules = stage == "dpo", cfg.mesh.rules

    mesh = train.mesh_for(cfg)
    devices = mesh.devices.flatten()
    sharding = train.batch_sharding(mesh, rules)

    # Model, optimizer state and reference, as train.run builds them.
    graphdef, params, param_shardings = train.init_params(cfg, arch_cfg, mesh)
    tx, schedule = steps.make_optimizer(cfg.optim, warmup + num_steps + 1)
    state_shardings = train.train_state_shardings(tx, params, param_shardings, mesh)
    state = train.initial_state(tx, params, state_shardings)
    local = synthetic_batch(stage, batch, seq, arch_cfg.vocab_size, cfg.seed)
    reference = None
    if dpo and cfg.dpo.precompute_reference and not cfg.dpo.reference_free:
        local["reference_logps"] = np.full((batch, 2), -float(seq), np.float32)
    elif dpo and not cfg.dpo.reference_free:
        reference = train.frozen_copy(params, param_shardings, jnp.dtype(cfg.dpo.reference_dtype))
    step_fn = train.jit_train_step(cfg, graphdef, tx, schedule, state_shardings, sharding,
                                   frozen_reference=reference is not None)

    with jax.set_mesh(mesh):
        placed = train.place(local, sharding, np.arange(batch), batch)
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, placed, reference).compile()
        compile_s = time.perf_counter() - t0
        times, load = [], CpuUse()
        for i in range(warmup + num_steps):
            if i == warmup:
                load.start()
            t0 = time.perf_counter()
            state, metrics = compiled(state, placed, reference)
            jax.block_until_ready((state, metrics))
            if i >= warmup:
                times.append(time.perf_counter() - t0)
        load.stop()
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{stage}: loss is {loss}")

    step_s = statistics.median(times)
    tokens = (2 if dpo else 1) * batch * seq
    flops = tokens * flops_per_token(arch_cfg, seq) * (4 / 3 if reference is not None else 1)
    peak = peak_flops()
    return {"stage": stage, "batch": batch, "seq": seq, "tokens": tokens, "compile_s": compile_s,
            "step_s": step_s, "min_s": min(times), "max_s": max(times), "tokens_per_s": tokens / step_s,
            "tflops": flops / step_s / 1e12, "mfu": flops / step_s / (peak * len(devices)) if peak else None,
            "params_m": arch_cfg.num_params / 1e6, "devices": len(devices), "device": devices[0].device_kind,
            "reference": "frozen" if reference is not None else ("precomputed" if dpo else "-"), "loss": loss,
            "cpu_s": load.own / num_steps if load.wall else None, "other_load": load.other_cores}


def report(results) -> None:
    print(f"device: {results[0]['devices']} x {results[0]['device']} ({jax.default_backend()}), "
          f"jax {jax.__version__}, model {results[0]['params_m']:.1f}M params")
    print("| stage | batch | seq | tokens/step | reference | compile s | median step s (min-max) | tokens/s "
          "| TFLOP/s | MFU | CPU s/step | other load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"| {r['stage']} | {r['batch']} | {r['seq']} | {r['tokens']} | {r['reference']} | {r['compile_s']:.1f} "
              f"| {r['step_s']:.4f} ({r['min_s']:.4f}-{r['max_s']:.4f}) | {r['tokens_per_s']:,.0f} "
              f"| {r['tflops']:.3f} | {mfu} | {fmt(r['cpu_s'])} | {fmt_load(r['other_load'])} |")


def fmt(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_load(cores) -> str:
    """Busy cores from other processes during the timed steps (of os.cpu_count())."""
    return "n/a" if cores is None else f"{cores:.2f}/{os.cpu_count()} cores"


def cli():
    from absl import app, flags, logging
    from ml_collections import config_flags

    config = config_flags.DEFINE_config_file("config", None, "configs/sft.py or configs/dpo.py, with :VARIANT",
                                             lock_config=True)
    stage = flags.DEFINE_enum("stage", None, ["sft", "dpo", "both"], "default: the config's stage")
    batch = flags.DEFINE_integer("batch", None, "global batch (pairs for DPO); default train.global_batch_size")
    seq = flags.DEFINE_integer("seq", None, "positions per row; default data.max_length")
    num_steps = flags.DEFINE_integer("steps", 10, "timed steps")
    warmup = flags.DEFINE_integer("warmup", 2, "untimed steps after compilation")
    flags.mark_flags_as_required(["config"])

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)
        cfg = config.value
        stages = ["sft", "dpo"] if stage.value == "both" else [stage.value or cfg.stage]
        report([measure(cfg, s, batch.value, seq.value, num_steps.value, warmup.value) for s in stages])

    app.run(main)


if __name__ == "__main__":
    cli()
