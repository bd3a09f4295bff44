"""Where the planner's compile time goes: its phases timed apart, for one config and topology.

    python bench/plan_compile.py --config=configs/sft.py --topology=v5e-8 [--config.key=value ...]

The planner's own pieces (plan.py): the length mix's batches, the jitted train step's tracing (jaxpr), its
lowering to StableHLO, and XLA's compile, each in wall seconds and the compile also in this process's CPU seconds
(on a machine whose cores other jobs share, the wall time is theirs too). Also the program's size at each stage and
what the compiled program holds: while loops (a kept layer scan), Mosaic kernels (tpu_custom_call), jitted
functions traced and compiled (jax's own logs). Prints one JSON line. Results: bench/RESULTS.md, "where the
planner's compile time goes".
"""

from __future__ import annotations

import json
import logging
import os
import re
import time

from absl import app, flags
from ml_collections import config_flags

CONFIG = config_flags.DEFINE_config_file("config", None, "configs/sft.py or configs/dpo.py, with :VARIANT",
                                         lock_config=True)
TOPOLOGY = flags.DEFINE_string("topology", "local", "as plan's --topology")


class _Count(logging.Handler):
    """jax's "Finished tracing" / "Finished XLA compilation" records, counted by what they name."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def emit(self, record):
        m = re.match(r"Finished (tracing \S+|XLA compilation of \S+)", record.getMessage())
        if m:
            self.counts[m.group(1)] = self.counts.get(m.group(1), 0) + 1


def main(argv):
    del argv
    if TOPOLOGY.value != "local":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")  # libtpu / the CUDA plugin only compile
    import jax

    from zephyr_jax import plan, train, train_checks
    from zephyr_jax.compile_targets import cudnn_checks_for, target_for

    cfg = CONFIG.value
    train_checks.check_config(cfg, check_model_source=False)
    target = target_for(TOPOLOGY.value)
    mesh = train.mesh_for(cfg, target.devices)
    mcfg, _ = plan.planned_model_config(cfg)
    counter = _Count()
    logging.getLogger("jax").addHandler(counter)
    jax.config.update("jax_log_compiles", True)
    t = [time.perf_counter()]
    batches = plan.batches_of_mix(cfg, mesh, plan.DEFAULT_MIX[cfg.stage])
    step, inputs = plan.train_step_and_inputs(cfg, mcfg, mesh, batches)
    t.append(time.perf_counter())
    with jax.set_mesh(mesh), cudnn_checks_for(target):
        traced = step.trace(inputs.state, inputs.batch, inputs.reference, inputs.hparams)
        t.append(time.perf_counter())
        lowered = traced.lower()
        t.append(time.perf_counter())
        cpu = time.process_time()
        compiled = lowered.compile()
        cpu = time.process_time() - cpu
        t.append(time.perf_counter())
    text = compiled.as_text()
    print(json.dumps({
        "topology": target.name, "mesh": dict(mesh.shape), "batch": list(inputs.batch["inputs"].shape),
        "layers": mcfg.num_hidden_layers, "batches_s": round(t[1] - t[0], 2), "trace_s": round(t[2] - t[1], 2),
        "lower_s": round(t[3] - t[2], 2), "compile_s": round(t[4] - t[3], 2), "compile_cpu_s": round(cpu, 2),
        "stablehlo_chars": len(lowered.as_text()), "compiled_hlo_chars": len(text),
        "while_loops": len(re.findall(r" while\(", text)), "mosaic_kernels": text.count('"tpu_custom_call"'),
        "jax_log": counter.counts}))


if __name__ == "__main__":
    from zephyr_jax.config_common import parse_flags

    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
