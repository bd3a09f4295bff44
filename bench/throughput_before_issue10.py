"""The "before" row of bench/RESULTS.md's issue-10 table: bench/throughput.py's measurement (real tokens/s of the
train step on the batches a length mix makes) against the code of commit 31ea3eb, with that commit's own batching
(DPO: every pair padded to the global batch's power-of-two bucket, [B, 2, T]; SFT: next-fit packing), LM head at
every position and unrolled layers. It uses that commit's API, so it runs from a worktree of it:

    git worktree add /tmp/before 31ea3eb && cp bench/throughput_before_issue10.py /tmp/before/bench/
    cd /tmp/before && python bench/throughput_before_issue10.py CONFIG STAGE BATCH NUM_BATCHES [key=value ...]
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from zephyr_jax import plan, train  # noqa: E402
from zephyr_jax import train_steps as steps  # noqa: E402
from zephyr_jax.config_common import load_config  # noqa: E402
from zephyr_jax.data import pack, preference_batch  # noqa: E402
from zephyr_jax.data.batches import bucket, positions_needed, sequence_lengths  # noqa: E402


def main(spec_config, stage, batch_size, num_batches, *overrides):
    kv = dict(o.split("=", 1) for o in overrides)
    kv = {k: (eval(v) if v[:1].isdigit() or v in ("True", "False") else v) for k, v in kv.items()}
    cfg = load_config(spec_config, **{"train.global_batch_size": int(batch_size), **kv})
    mix = {"sft": "lognormal:1400,0.5", "dpo": "lognormal:117,276,0.7"}[stage]  # plan.DEFAULT_MIX today
    rng = np.random.default_rng(cfg.seed)
    examples = plan.fit_to_config(plan.length_mix(mix, stage, cfg.seed, 64 * int(batch_size)), cfg)
    size, buckets = int(batch_size), train.buckets_for(cfg.data)
    if stage == "sft":
        rows = pack(examples, cfg.data.max_length)
        examples = [{k: v[i] for k, v in rows.items()} for i in range(len(rows["inputs"]))]
    groups = [examples[i * size:(i + 1) * size] for i in range(int(num_batches))]
    batches = []
    for g in groups:
        if stage == "sft":
            b = {k: np.stack([r[k] for r in g]) for k in g[0]}
        else:
            b = preference_batch(g, bucket(max(positions_needed(e) for e in g), buckets))
        real = b["segment_ids"] > 0
        tokens = rng.integers(3, cfg.model.arch.vocab_size, b["inputs"].shape, dtype=np.int32)
        b["inputs"], b["targets"] = np.where(real, tokens, 0), np.where(real, np.roll(tokens, -1, -1), 0)
        batches.append((b, [n for e in g for n in sequence_lengths(e)]))

    mesh = train.mesh_for(cfg)
    mcfg = train.model_config(cfg)
    sharding = train.batch_sharding(mesh, cfg.mesh.rules)
    graphdef, params, pshard = train.init_params(cfg, mcfg, mesh)
    tx, schedule = steps.make_optimizer(cfg.optim, 100)
    sshard = train.train_state_shardings(tx, params, pshard, mesh)
    state = train.initial_state(tx, params, sshard)
    reference = train.frozen_copy(params, pshard, jnp.dtype(cfg.dpo.reference_dtype)) if stage == "dpo" else None
    step_fn = train.jit_train_step(cfg, graphdef, tx, schedule, sshard, sharding, frozen_reference=stage == "dpo")
    with jax.set_mesh(mesh):
        placed = [train.place(b, sharding, np.arange(size), size) for b, _ in batches]
        compiled, compile_s = {}, 0.0
        for x in placed:
            key = tuple(sorted((k, v.shape) for k, v in x.items()))
            if key not in compiled:
                t0 = time.perf_counter()
                compiled[key] = step_fn.lower(state, x, reference).compile()
                compile_s += time.perf_counter() - t0
        run = lambda x: compiled[tuple(sorted((k, v.shape) for k, v in x.items()))]
        for x in placed:  # warm-up pass
            state, metrics = run(x)(state, x, reference)
            jax.block_until_ready(metrics)
        times = []
        for x in placed:
            t0 = time.perf_counter()
            state, metrics = run(x)(state, x, reference)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
    real = sum(sum(s) for _, s in batches)
    positions = sum(b["inputs"].size for b, _ in batches)
    shapes = sorted({b["inputs"].shape for b, _ in batches})
    print(f"BEFORE {stage}: {mcfg.num_params / 1e6:.1f}M params, shapes {shapes}, "
          f"real {100 * real / positions:.1f}%, compiles {len(compiled)} ({compile_s:.1f} s), mean step "
          f"{sum(times) / len(times):.3f} s, real tokens/s {real / sum(times):,.0f}, positions/s "
          f"{positions / sum(times):,.0f}, loss {float(metrics['loss']):.3f}")


if __name__ == "__main__":
    main(*sys.argv[1:])
