"""The batch shapes a config's training data makes, and so how many times the train step compiles: the real
loader and batcher over a synthetic length mix (plan.length_mix), no model.

    python bench/batch_shapes.py --config=configs/dpo.py [--steps=1910] [--epochs=3] [--shards=8] [--mix=SPEC]

Prints the distinct (row length, loss-position width, segment slots) shapes, the step at which each first
appears, the LM head's positions (rows x width) against the rows' positions and the loss tokens among them, the
periodic eval's batch shapes and real-token fraction, and the process's peak host memory (the examples, and for
dSFT the packed rows the loader holds). --shards: the batch shards of the mesh the rows must divide over (8: one
8-GPU node).
"""

import argparse
import collections
import json
import os
import resource
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from zephyr_jax import plan, train  # noqa: E402
from zephyr_jax.config_common import load_config  # noqa: E402
from zephyr_jax.data.loader import Loader  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--steps", type=int, default=1910, help="steps of an epoch (1910: 61,135 pairs / 32)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--eval_examples", type=int, default=0,
                   help="held-out examples to batch as the periodic eval does (0: 23,110 for dSFT, UltraChat-200k's "
                        "test_sft; 2,000 for dDPO, UltraFeedback's test_prefs)")
    p.add_argument("--mix", default=None, help="plan.length_mix spec (default: plan.DEFAULT_MIX of the stage)")
    args = p.parse_args()
    cfg = load_config(args.config)
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": args.shards, "tensor": 1})  # only its shape is read
    n = args.steps * cfg.train.global_batch_size
    mix = plan.length_mix(args.mix or plan.DEFAULT_MIX[cfg.stage], cfg.stage, cfg.seed, n)
    examples, batcher, _ = train.training_batches(cfg, mesh, plan.fit_to_config(mix, cfg), log=lambda *a: None)
    loader = Loader(examples, cfg.train.global_batch_size, batcher, seed=cfg.seed)
    shapes, first, head, positions, loss = collections.Counter(), {}, 0, 0, 0
    for step in range(min(args.steps, loader.steps_per_epoch) * args.epochs):
        batch, info = next(loader)
        slots = batch["sequence_pair"].shape[1] if "sequence_pair" in batch else 1
        key = (info.length, batch["loss_positions"].shape[1], slots)
        shapes[key] += 1
        first.setdefault(key, step)
        head += batch["loss_positions"].size
        loss += int((batch["loss_positions"] >= 0).sum())
        positions += batch["inputs"].size
    held_out = args.eval_examples or (2000 if cfg.stage == "dpo" else 23110)
    mix = plan.length_mix(args.mix or plan.DEFAULT_MIX[cfg.stage], cfg.stage, cfg.seed + 1, held_out)
    split = train.eval_split(cfg, plan.fit_to_config(mix, cfg), log=lambda *a: None)  # dSFT: packed rows
    eval_shapes, eval_real, eval_positions = set(), 0, 0
    size = train.eval_size(cfg, mesh, len(split))
    for batch, _ in train.eval_batches(split, size, train.eval_batcher(cfg, mesh, size)[0]):
        eval_shapes.add(batch["inputs"].shape)
        eval_real += int((batch["segment_ids"] > 0).sum())  # the last batch's repeats counted as real: a bound
        eval_positions += batch["inputs"].size
    print(json.dumps({"config": args.config, "loader_examples": len(examples), "steps": sum(shapes.values()),
                      "shapes": len(shapes), "lengths": len({k[0] for k in shapes}),
                      "widths": len({k[1] for k in shapes}),
                      "slots": sorted({k[2] for k in shapes}), "first_seen": sorted(first.values()),
                      "head_positions_per_row_position": round(head / positions, 4),
                      "loss_tokens_per_head_position": round(loss / head, 4),
                      "eval_shapes": len(eval_shapes), "eval_real_fraction": round(eval_real / eval_positions, 4),
                      "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}))


if __name__ == "__main__":
    main()
