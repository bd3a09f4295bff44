"""Checks the planner's bytes per device against the measured peak of a real train step on the local CPU devices.

    python bench/plan_memory.py --config=configs/dpo.py:tiny [--devices=8] [--config.key=value ...]

CPU devices report no memory statistics, so the peak is the process's: the kernel's resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs just before the step) minus the resident set before it, plus the step's
input arrays, which are already resident. Across N devices the process holds N devices' worth, so the figure
per device is the total over N. The step is compiled before the window (compilation allocates too) and runs
once. Linux only. Prints one JSON line: planned and measured bytes per device and their ratio.
"""

from __future__ import annotations

import json
import os
import tempfile

from absl import app, flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sft.py or configs/dpo.py, with :VARIANT",
                                         lock_config=True)
DEVICES = flags.DEFINE_integer("devices", 1, "CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count)")


def main(argv):
    del argv
    flag = f"--xla_force_host_platform_device_count={DEVICES.value}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"  # the last of a flag given twice wins
    os.environ["JAX_PLATFORMS"] = "cpu"  # read when the first array is made, after this

    import jax
    import jax.numpy as jnp
    import numpy as np

    from zephyr_jax import plan, train
    from zephyr_jax import train_steps as steps

    cfg = CONFIG.value
    # The planner compiles this very step: kept in a cache of this run's own, the step below loads it (once
    # more, it took as long to compile as the step took to run).
    cache = tempfile.TemporaryDirectory()
    jax.config.update("jax_compilation_cache_dir", cache.name)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    planned = plan.plan(cfg, "local")["memory"]["total"]

    # The same step with real arrays: parameters on the mesh, random tokens in the planner's batch shapes.
    mesh = train.mesh_for(cfg)
    mcfg, _ = plan.planned_model_config(cfg)
    batches = plan.batches_of_mix(cfg, mesh, plan.DEFAULT_MIX[cfg.stage])  # the planner's own (same seed)
    step, inputs = plan.train_step_and_inputs(cfg, mcfg, mesh, batches)
    _, params, _ = train.init_params(cfg, mcfg, mesh)
    state_shardings, batch_shardings, ref_shardings, _ = inputs.shardings
    tx = steps.make_optimizer(cfg.optim, steps.make_schedule(cfg.optim, 1000))
    state = train.initial_state(tx, params, state_shardings)
    rng = np.random.default_rng(0)
    batch = jax.device_put({k: rng.integers(1, 100, x.shape).astype(x.dtype) for k, x in inputs.batch.items()},
                           batch_shardings)  # values do not change memory; shapes do
    reference = None if inputs.reference is None else train.frozen_copy(params, ref_shardings,
                                                                        jnp.dtype(cfg.dpo.reference_dtype))
    with jax.set_mesh(mesh):
        compiled = step.lower(state, batch, reference, inputs.hparams).compile()
        # What the devices hold: every device's shards (a replicated array is held once per device).
        resident = sum(s.data.nbytes for x in jax.tree.leaves((state, batch, reference)) for s in x.addressable_shards)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        before = _status("VmRSS")
        jax.block_until_ready(compiled(state, batch, reference, inputs.hparams))
        peak = _status("VmHWM")
    measured = (peak - before + resident) / mesh.size
    print(json.dumps({"stage": cfg.stage, "devices": mesh.size, "mesh": dict(mesh.shape),
                      "global_batch_size": cfg.train.global_batch_size, "planned_bytes": planned,
                      "measured_bytes": measured, "ratio": measured / planned}))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
