"""Training throughput of the real jitted SFT and DPO train steps, on the batches the real batching code makes
from a length mix.

    python bench/throughput.py --config=configs/dpo.py:tiny [--config.key=value ...] [--stage=sft|dpo|both]
        [--batch=B] [--length_mix=SPEC] [--batches=N] [--warmup=W] [--repeats=R] [--profile=DIR]

Builds the mesh, parameters, optimizer state, DPO reference and the jitted step exactly as zephyr_jax/train.py does
(same functions, same shardings, same donation). The batches are N global batches that train.py's batching (SFT
packing or padding, DPO pairs packed into rows or a row per sequence, the LM head's loss positions) makes from a
length mix (zephyr_jax.plan.length_mix; default: plan.DEFAULT_MIX, the recipe's data as the dataset cards describe
it), with random token ids. Each batch shape compiles once (not timed); after W untimed passes over the batches, R
passes are timed, every step with block_until_ready; --profile=DIR then traces one more pass into DIR/STAGE and
lists its XLA operations by kernel time (zephyr_jax.profiling). Defaults: B = train.global_batch_size, the stage of
the config. Models that the config would load from a checkpoint (init "hf" or "orbax") get random weights of the
architecture read from that checkpoint's config; without the checkpoint, pass --config.model.init=random and
--config.model.arch.*.

Real tokens/s counts only the real positions of the batches (no padding); "positions/s" counts every position the
step computes. FLOPs: zephyr_jax.metrics.step_flops of the real sequences (the MFU numerator, with the frozen
reference's forward; attention over the whole T x T, as PaLM counts it). "MFU (causal attention)" counts only the
query-key pairs the causal and sliding-window mask keeps (what a flash kernel that skips masked blocks computes,
MaxText's convention): lower by the attention's share. Both credit DPO's LM head at prompt positions, which the step
skips (2.1% of the counted FLOPs for the 1B model on the recipe's mix, 0.6% at 7B; a review's count). MFU needs the
device's peak (metrics.peak_flops): n/a on CPUs. "CPU s/step" is this process's CPU time per step, "other load" the
cores other processes kept busy meanwhile (on a shared machine, rerun when it is above ~0.05). "peak memory" is the
device allocator's peak so far in this process (GPUs, TPUs; n/a on CPUs), so a stage's figure includes those
measured before it in the same run. "XLA GiB" is what the planner (`python -m zephyr_jax.plan --topology=local`)
reports for the same step: XLA's memory analysis of the compiled program (the largest of the batch shapes), per
device.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from zephyr_jax import plan, profiling, train  # noqa: E402
from zephyr_jax import train_steps as steps  # noqa: E402
from zephyr_jax.metrics import peak_flops, step_flops  # noqa: E402

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


def mix_batches(cfg, mesh, spec: str, num_batches: int, seed: int = 0) -> list:
    """plan.batches_of_mix's global batches (the real batching code on the length mix) with random token ids."""
    rng = np.random.default_rng(seed)
    out = []
    for b in plan.batches_of_mix(cfg, mesh, spec, num_batches):
        batch = dict(b.batch)
        real = batch["segment_ids"] > 0
        tokens = rng.integers(3, cfg.model.arch.vocab_size, batch["inputs"].shape, dtype=np.int32)
        batch["inputs"], batch["targets"] = np.where(real, tokens, 0), np.where(real, np.roll(tokens, -1, 1), 0)
        if "reference_logps" in batch:
            batch["reference_logps"] = np.where(batch["sequence_pair"] >= 0, -100.0, 0.0).astype(np.float32)
        out.append(b._replace(batch=batch))
    return out


def measure(cfg, stage: str, batch: int | None = None, spec: str | None = None, num_batches: int = 4,
            warmup: int = 1, repeats: int = 1, profile_dir: str | None = None) -> dict:
    """Times one step on each of `num_batches` mix batches of `stage` for `cfg`; returns what `report` prints.
    profile_dir: then one more pass over the batches, traced there (zephyr_jax.profiling), untimed."""
    cfg = cfg.copy_and_resolve_references()
    with cfg.unlocked():
        cfg.stage = stage
        cfg.train.global_batch_size = batch or cfg.train.global_batch_size
        if stage == "dpo" and "dpo" not in cfg:
            cfg.dpo = ml_collections.ConfigDict(dict(DPO_DEFAULTS, reference_dtype=cfg.model.dtype))
        if stage == "dpo" and "max_prompt_length" not in cfg.data:  # configs/dpo.py's ratio (512 of 1024)
            cfg.data.max_prompt_length = cfg.data.max_length // 2
        if stage == "dpo" and "packed_rows" not in cfg.data:  # each stage config holds its own packing key
            cfg.data.packed_rows = 0
        if stage == "sft" and "pack_window" not in cfg.data:
            cfg.data.pack_window = 1000
        arch_cfg = train.model_config(cfg)  # reads the architecture of an hf/orbax model without its weights
        cfg.model.init = "random"
        cfg.model.arch = ml_collections.ConfigDict({k: getattr(arch_cfg, k) for k in cfg.model.arch})
    spec = spec or plan.DEFAULT_MIX[stage]
    dpo, rules = stage == "dpo", cfg.mesh.rules

    mesh = train.mesh_for(cfg)
    devices = mesh.devices.flatten()
    sharding = train.batch_sharding(mesh, rules)
    batches = mix_batches(cfg, mesh, spec, num_batches, cfg.seed)

    # Model, optimizer state and reference, as train.run builds them.
    graphdef, params, param_shardings = train.init_params(cfg, arch_cfg, mesh)
    tx = steps.make_optimizer(cfg.optim, steps.make_schedule(cfg.optim, 1000))
    hparams = steps.step_hparams(cfg, cfg.optim.lr)  # the learning rate is an argument: no schedule to run
    state_shardings = train.train_state_shardings(tx, params, param_shardings, mesh)
    state = train.initial_state(tx, params, state_shardings)
    reference = None
    if dpo and not cfg.dpo.precompute_reference and not cfg.dpo.reference_free:
        reference = train.frozen_copy(params, param_shardings, jnp.dtype(cfg.dpo.reference_dtype))
    if not (dpo and cfg.dpo.precompute_reference):
        batches = [b._replace(batch={k: v for k, v in b.batch.items() if k != "reference_logps"}) for b in batches]
    step_fn = train.jit_train_step(cfg, graphdef, state_shardings, sharding,
                                   frozen_reference=reference is not None,
                                   max_segments=train.max_segments(cfg, [b.batch for b in batches]))

    with jax.set_mesh(mesh):
        placed = [train.place(b.batch, sharding, np.arange(len(b.batch["inputs"])), len(b.batch["inputs"]))
                  for b in batches]
        compiled, compile_s = {}, 0.0
        for x in placed:  # one compile per batch shape, before any timing
            if train.batch_shape(x) not in compiled:
                t0 = time.perf_counter()
                compiled[train.batch_shape(x)] = step_fn.lower(state, x, reference, hparams).compile()
                compile_s += time.perf_counter() - t0
        run = lambda x: compiled[train.batch_shape(x)]
        times, load = [], CpuUse()
        for i in range(warmup + repeats):
            if i == warmup:
                load.start()
            for x in placed:
                t0 = time.perf_counter()
                state, metrics = run(x)(state, x, reference, hparams)
                jax.block_until_ready((state, metrics))
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
        load.stop()
        profile = None
        if profile_dir:  # after the timed passes: the profiler's own cost is in none of them
            try:
                trace = profiling.TraceWindow(1, len(placed), profile_dir)
                for i, x in enumerate(placed, 1):
                    trace.before(i)
                    with jax.profiler.StepTraceAnnotation(stage, step_num=i):
                        state, metrics = run(x)(state, x, reference, hparams)
                    trace.after(i, (state, metrics))
                profile = profiling.newest_trace(profile_dir)
            except Exception as e:  # noqa: BLE001  (a profiler that fails costs none of the timings)
                print(f"{stage}: profile failed: {type(e).__name__}: {e}")
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise FloatingPointError(f"{stage}: loss is {loss}")

    seconds = sum(times)
    real = repeats * sum(sum(b.sequences) for b in batches)
    positions = repeats * sum(b.batch["inputs"].size for b in batches)
    flops = repeats * sum(step_flops(arch_cfg, b.sequences, reference is not None) for b in batches)
    causal_flops = repeats * sum(step_flops(arch_cfg, b.sequences, reference is not None, causal=True)
                                 for b in batches)
    peak = peak_flops()
    memory = devices[0].memory_stats() or {}  # None on CPUs; GPUs and TPUs count the allocator's bytes
    shapes = sorted({b.batch["inputs"].shape for b in batches})
    return {"stage": stage, "batch": cfg.train.global_batch_size, "mix": spec, "shapes": shapes,
            "real_fraction": real / positions, "compile_s": compile_s, "compiles": len(compiled),
            "step_s": seconds / len(times), "median_s": float(np.median(times)), "min_s": min(times),
            "max_s": max(times),
            "real_tokens_per_s": real / seconds, "tokens_per_s": real / seconds, "positions_per_s": positions / seconds,
            "tflops": flops / seconds / 1e12, "mfu": flops / seconds / (peak * len(devices)) if peak else None,
            "mfu_causal": causal_flops / seconds / (peak * len(devices)) if peak else None,
            "params_m": arch_cfg.num_params / 1e6, "devices": len(devices), "device": devices[0].device_kind,
            "reference": "frozen" if reference is not None else ("precomputed" if dpo else "-"), "loss": loss,
            "remat": cfg.model.remat + ("" if cfg.model.scan_layers else ", layers unrolled"),
            "peak_gib": memory["peak_bytes_in_use"] / 2 ** 30 if "peak_bytes_in_use" in memory else None,
            "device_gib": memory["bytes_limit"] / 2 ** 30 if "bytes_limit" in memory else None,
            "xla_gib": max(plan.compiled_bytes(c)["total"] for c in compiled.values()) / 2 ** 30,
            "cpu_s": load.own / len(times) if load.wall else None, "other_load": load.other_cores,
            "profile": profile}


def report(results) -> None:
    print(f"device: {results[0]['devices']} x {results[0]['device']} ({jax.default_backend()}), "
          f"jax {jax.__version__}, model {results[0]['params_m']:.1f}M params")
    print("| stage | batch | length mix | rows x length | real tokens | reference | remat | compiles (s) "
          "| mean step s | real tokens/s | positions/s | TFLOP/s | MFU | MFU (causal attention) | peak memory GiB "
          "| XLA GiB | CPU s/step | other load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mfu_causal = "n/a" if r["mfu_causal"] is None else f"{100 * r['mfu_causal']:.1f}%"
        shapes = ", ".join(f"{a}x{b}" for a, b in r["shapes"])
        print(f"| {r['stage']} | {r['batch']} | {r['mix']} | {shapes} | {100 * r['real_fraction']:.1f}% "
              f"| {r['reference']} | {r['remat']} | {r['compiles']} ({r['compile_s']:.1f}) | {r['step_s']:.3f} "
              f"| {r['real_tokens_per_s']:,.0f} | {r['positions_per_s']:,.0f} | {r['tflops']:.3f} | {mfu} "
              f"| {mfu_causal} "
              f"| {peak_memory(r)} | {r['xla_gib']:.1f} | {fmt(r['cpu_s'])} | {fmt_load(r['other_load'])} |")


def peak_memory(r) -> str:
    """The process's peak device memory so far (not reset between stages) of the device's limit."""
    if r["peak_gib"] is None:
        return "n/a"
    return f"{r['peak_gib']:.1f}" + (f" of {r['device_gib']:.1f}" if r["device_gib"] else "")


def fmt(x, digits=3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def fmt_load(cores) -> str:
    """Busy cores from other processes during the timed steps (of os.cpu_count())."""
    return "n/a" if cores is None else f"{cores:.2f}/{os.cpu_count()} cores"


def cli():
    from absl import app, flags, logging
    from ml_collections import config_flags

    from zephyr_jax.config_common import parse_flags

    config = config_flags.DEFINE_config_file("config", None, "configs/sft.py or configs/dpo.py, with :VARIANT",
                                             lock_config=True)
    stage = flags.DEFINE_enum("stage", None, ["sft", "dpo", "both"], "default: the config's stage")
    batch = flags.DEFINE_integer("batch", None, "global batch (pairs for DPO); default train.global_batch_size")
    mix = flags.DEFINE_string("length_mix", None, "plan.length_mix spec or file; default plan.DEFAULT_MIX[stage]")
    num_batches = flags.DEFINE_integer("batches", 4, "global batches of the mix, each timed once a pass")
    warmup = flags.DEFINE_integer("warmup", 1, "untimed passes over the batches after compilation")
    repeats = flags.DEFINE_integer("repeats", 1, "timed passes over the batches")
    profile = flags.DEFINE_string("profile", None, "then trace one more pass in DIR/STAGE (jax.profiler) and list "
                                  "its XLA operations by time (zephyr_jax.profiling)")
    flags.mark_flags_as_required(["config"])

    def main(argv):
        del argv
        logging.set_verbosity(logging.WARNING)
        cfg = config.value
        stages = ["sft", "dpo"] if stage.value == "both" else [stage.value or cfg.stage]
        results = [measure(cfg, s, batch.value, mix.value, num_batches.value, warmup.value, repeats.value,
                           profile.value and os.path.join(profile.value, s)) for s in stages]
        report(results)
        for r in results:
            if r["profile"]:
                print(f"\n{r['stage']}: {profiling.report(r['profile'])}")

    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    cli()
