"""A whole short run against TRL: zephyr_jax's dSFT and dDPO trainers beside TRL's SFTTrainer and DPOTrainer over
several epochs with the recipe's schedules, per optimizer step.

    python bench/trl_trajectory.py [--stage=sft|dpo|both] [--examples=N] [--epochs=N] [--batch=2] [--grad-accum=2]
        [--lr=0.01]

tests/test_trl_reference.py checks two steps at a constant rate; this runs the recipe's shape of a run: dSFT cosine
and dDPO linear, both warming up over ceil(0.1 x total steps) (transformers' rounding), grad-norm clipping 1.0,
gradient accumulation, a data set whose size the global batch does not divide, several epochs, on that test's tiny
random Mistral (real vocabulary) in float32 and its tokens (its helpers build both sides). Defaults: dSFT 45
dialogues in global batches of 4 (2 x 2 micro-batches) for 4 epochs = 44 steps, warmup ceil(4.4) = 5; dDPO 27
pairs, 6 epochs = 36 steps, warmup ceil(3.6) = 4.

Same batches: zephyr_jax drops each epoch's partial last batch (a reshuffled order leaves out other examples each
epoch); TRL keeps it. So TRL is given zephyr_jax's own order of each epoch (Loader.order), cut to its full batches,
through its train sampler, and the script checks that TRL read exactly those examples. The step count, warmup and
schedule each side reaches on its own are printed too: TRL's (transformers' Trainer) from its data loader over the
whole data set, which keeps the partial batch and a partial accumulation as one more step an epoch.

Prints a table by step (zephyr_jax's epoch, counted from 0; learning rate, loss and gradient norm before clipping
of each side, "ours" being zephyr_jax) and the worst differences, including the final weights' against how far
training moved them, and the eval loss after the run (TRL's in one eval batch: transformers averages the eval
batches' mean losses weighting each by its examples, zephyr_jax averages over all the split's tokens).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import datasets  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from flax import nnx  # noqa: E402

from tests.test_trl_reference import (BETA, ROOT, _dialogues, _model_dir, _OnTheRecipesTokens, _our_run,  # noqa: E402
                                      _pairs, _Record, _split_dir, _trl_args, _trl_rows)
from tests.torch_reference import save_torch  # noqa: E402
from zephyr_jax.config_common import load_config  # noqa: E402
from zephyr_jax.data import preference_example, sft_example  # noqa: E402
from zephyr_jax.data.loader import Loader  # noqa: E402
from zephyr_jax.loading import load_model  # noqa: E402
from zephyr_jax.tokenizer import load_tokenizer  # noqa: E402

SCHEDULES = {"sft": "cosine", "dpo": "linear"}  # configs/sft.py, configs/dpo.py (the paper's)
WARMUP_RATIO = 0.1


def dialogues(n: int) -> list:
    """The test's six dialogues, then arithmetic ones of varied lengths, one with a system turn in three."""
    rows = _dialogues()
    for i in range(len(rows), n):
        a, b = 3 * i + 1, 7 * i % 13
        messages = [{"role": "system", "content": "Show your working."}] if i % 3 == 0 else []
        messages += [{"role": "user", "content": f"Add {a} and {b}."},
                     {"role": "assistant", "content": f"{a} + {b} = {a + b}." + " Checked." * (i % 4)}]
        rows.append({"prompt": messages[-2]["content"], "prompt_id": str(i), "messages": messages})
    return rows[:n]


def pairs(n: int) -> list:
    """The test's four pairs, then arithmetic ones: a short right answer, and a longer wrong one (or the reverse)."""
    rows = _pairs()
    for i in range(len(rows), n):
        a, b = 5 * i + 2, 3 * i % 11
        prompt = [{"role": "user", "content": f"What is {a} times {b}?"}]
        right, wrong = f"{a * b}", f"I believe {a} times {b} is {a * b + i}, roughly." + " Maybe." * (i % 3)
        chosen, rejected = (right, wrong) if i % 2 else (wrong + " No: " + right, right)
        turn = lambda reply: prompt + [{"role": "assistant", "content": reply}]  # noqa: E731
        rows.append({"prompt": prompt[-1]["content"], "prompt_id": str(i), "chosen": turn(chosen),
                     "rejected": turn(rejected), "messages": turn(chosen), "score_chosen": 8.0,
                     "score_rejected": 3.0})
    return rows[:n]


class ZephyrOrder(torch.utils.data.Sampler):
    """zephyr_jax's example order of each epoch, cut to its full global batches; records what it gave."""

    def __init__(self, loader: Loader):
        self.loader, self.epoch, self.given = loader, 0, []

    def set_epoch(self, epoch: int):  # accelerate's data loader calls it at each epoch's start
        self.epoch = epoch

    def __len__(self):
        return self.loader.steps_per_epoch * self.loader.global_batch_size

    def __iter__(self):
        order = self.loader.order(self.epoch)[:len(self)]
        self.given.append(order)
        return iter(order.tolist())


def in_order(trainer_class, sampler):
    class InZephyrOrder(trainer_class):
        def _get_train_sampler(self, train_dataset=None):
            return sampler
    return InZephyrOrder


def trls_own_plan(trainer, n: int, args) -> dict:
    """The steps, warmup and rates transformers' Trainer gives this run over all n examples (no sampler of ours,
    dataloader_drop_last=False: TRL's default)."""
    loader = torch.utils.data.DataLoader(range(n), batch_size=args.per_device_train_batch_size, drop_last=False)
    max_steps = trainer.set_initial_training_values(args, loader)[-1]
    warmup = args.get_warmup_steps(max_steps)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    sched = transformers.get_scheduler(args.lr_scheduler_type, opt, num_warmup_steps=warmup,
                                       num_training_steps=max_steps)
    rates = []
    for _ in range(max_steps):
        rates.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return {"steps": max_steps, "warmup": warmup, "rates": rates}


def run_stage(stage: str, a, tmp: pathlib.Path) -> dict:
    tok = load_tokenizer()
    model_dir = _model_dir(tmp, tok)
    rows = dialogues(a.examples) if stage == "sft" else pairs(a.examples)
    split = "train_sft" if stage == "sft" else "train_prefs"
    data = _split_dir(tmp / "data", split, rows)
    global_batch = a.batch * a.grad_accum
    if stage == "sft":
        examples = [sft_example(r, i, tok, loss_on="all") for i, r in enumerate(rows)]
        recipe_tokens = [{"input_ids": e.ids.tolist()} for e in examples]
    else:
        examples = [preference_example(r, i, tok) for i, r in enumerate(rows)]
        recipe_tokens = [{"prompt_ids": e.prompt.tolist(), "chosen_ids": e.chosen.tolist(),
                          "rejected_ids": e.rejected.tolist()} for e in examples]
    assert not any(e.truncated for e in examples)
    seed = load_config(f"{ROOT}/configs/{stage}.py:tiny").seed
    sampler = ZephyrOrder(Loader(examples, global_batch, batcher=None, seed=seed))

    # (eval in one batch: transformers averages the eval batches' mean losses, weighting each by its examples)
    schedule = {"lr_scheduler_type": SCHEDULES[stage], "warmup_steps": WARMUP_RATIO, "max_steps": -1,
                "num_train_epochs": a.epochs, "learning_rate": a.lr, "gradient_accumulation_steps": a.grad_accum,
                "per_device_eval_batch_size": len(rows)}
    record = _Record()
    if stage == "sft":
        args = _trl_args(trl.SFTConfig, tmp, a.batch, packing=False, **schedule)
        dataset = datasets.Dataset.from_list(recipe_tokens)
        trainer = in_order(trl.SFTTrainer, sampler)(
            model=model_dir, args=args, processing_class=transformers.AutoTokenizer.from_pretrained(model_dir),
            callbacks=[record], train_dataset=dataset, eval_dataset=dataset)
    else:
        args = _trl_args(trl.DPOConfig, tmp, a.batch, beta=BETA, loss_type=["sigmoid"], label_smoothing=0.0,
                         precompute_ref_log_probs=False, **schedule)
        prefs = datasets.Dataset.from_list([_trl_rows(r) for r in rows])
        trainer = in_order(_OnTheRecipesTokens, sampler)(
            recipe_tokens, model=model_dir, args=args, callbacks=[record], train_dataset=prefs, eval_dataset=prefs,
            processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    own = trls_own_plan(trainer, len(rows), args)
    trainer.train()
    wanted = [sampler.loader.order(e)[:len(sampler)] for e in range(a.epochs)]
    assert len(sampler.given) == a.epochs and all(map(np.array_equal, sampler.given, wanted)), \
        "TRL did not read zephyr_jax's batches"
    trl_eval = trainer.evaluate()["eval_loss"]

    overrides = {"train.global_batch_size": global_batch, "train.grad_accum": a.grad_accum, "train.max_steps": -1,
                 "train.num_epochs": a.epochs, "train.save_every": 0, "optim.lr": a.lr,
                 "optim.schedule": SCHEDULES[stage], "optim.warmup_ratio": WARMUP_RATIO}
    if stage == "sft":
        overrides.update({"data.packing": False, "data.loss_on": "all", "data.max_length": 512})
    else:
        overrides.update({"data.max_length": 1024, "data.max_prompt_length": 512, "dpo.beta": BETA,
                          "dpo.loss_type": "sigmoid", "dpo.label_smoothing": 0.0})
    ours, workdir = _our_run(tmp, stage, model_dir, data, **overrides)

    start = nnx.state(load_model(model_dir, dtype="float32"), nnx.Param)
    theirs_w = nnx.state(load_model(save_torch(trainer.model, tmp / "trl_after"), dtype="float32"), nnx.Param)
    ours_w = nnx.state(load_model(workdir, dtype="float32"), nnx.Param)
    leaves = lambda f, *trees: max(jax.tree.leaves(jax.tree.map(f, *trees)))  # noqa: E731
    return {"stage": stage, "rows": len(rows), "global_batch": global_batch, "ours": ours, "trl": record.logs,
            "trl_epoch": trainer.state.epoch, "trl_steps": trainer.state.global_step, "trl_own": own,
            "eval": (ours["eval"]["loss"], trl_eval),
            "weights_diff": float(leaves(lambda x, y: np.abs(np.asarray(x) - np.asarray(y)).max(), ours_w, theirs_w)),
            "weights_moved": float(leaves(lambda x, y: np.abs(np.asarray(x) - np.asarray(y)).max(), theirs_w, start))}


def report(r: dict, a) -> None:
    ours, trl_logs = r["ours"], r["trl"]
    steps = sorted(k for k in ours if k != "eval")
    print(f"\n{r['stage'].upper()}: {r['rows']} examples, global batch {r['global_batch']} ({a.batch} x {a.grad_accum} "
          f"micro-batches), {a.epochs} epochs, {SCHEDULES[r['stage']]} schedule, warmup ratio {WARMUP_RATIO}, "
          f"peak lr {a.lr}")
    print(f"steps: zephyr_jax {len(steps)}, TRL on the same batches {r['trl_steps']} (epoch {r['trl_epoch']}); "
          f"TRL on its own over all {r['rows']} examples: {r['trl_own']['steps']} steps, warmup "
          f"{r['trl_own']['warmup']}")
    print("| step | epoch | lr ours | lr TRL | loss ours | loss TRL | grad norm ours | grad norm TRL |")
    print("|---|---|---|---|---|---|---|---|")
    worst = {"lr": 0.0, "loss": 0.0, "grad_norm": 0.0}
    for s in steps:
        o, t = ours[s], trl_logs[s]
        print(f"| {s} | {o['epoch']} | {o['lr']:.6e} | {t['learning_rate']:.6e} | {o['loss']:.6f} | {t['loss']:.6f} "
              f"| {o['grad_norm']:.6f} | {t['grad_norm']:.6f} |")
        worst["lr"] = max(worst["lr"], abs(o["lr"] - t["learning_rate"]) / a.lr)
        worst["loss"] = max(worst["loss"], abs(o["loss"] - t["loss"]))
        worst["grad_norm"] = max(worst["grad_norm"], abs(o["grad_norm"] - t["grad_norm"]) / t["grad_norm"])
    # steps before the first at the peak
    warmup = lambda rates: next(i for i, r in enumerate(rates) if r >= a.lr * (1 - 1e-6))  # noqa: E731
    clipped = sum(trl_logs[s]["grad_norm"] > 1.0 for s in steps)
    print(f"warmup steps (before the first at the peak): zephyr_jax {warmup([ours[s]['lr'] for s in steps])}, TRL "
          f"{warmup([trl_logs[s]['learning_rate'] for s in steps])} (ceil({WARMUP_RATIO} x {len(steps)})); steps "
          f"clipped (norm > 1): {clipped} of {len(steps)}")
    print(f"worst: |lr diff| / peak {worst['lr']:.2e}, |loss diff| {worst['loss']:.2e}, grad norm rel diff "
          f"{worst['grad_norm']:.2e}; eval loss zephyr_jax {r['eval'][0]:.6f}, TRL {r['eval'][1]:.6f}; final weights "
          f"max |diff| {r['weights_diff']:.2e} (training moved a weight up to {r['weights_moved']:.2e})")
    own = np.asarray(r["trl_own"]["rates"][:len(steps)])
    ours_lr = np.asarray([ours[s]["lr"] for s in steps])
    print(f"TRL's own plan's rates against zephyr_jax's (steps 1-{len(steps)}): max |diff| / peak "
          f"{np.abs(own - ours_lr).max() / a.lr:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["sft", "dpo", "both"], default="both")
    p.add_argument("--examples", type=int, default=0, help="0: 45 dialogues (dSFT), 27 pairs (dDPO)")
    p.add_argument("--epochs", type=int, default=0, help="0: 4 (dSFT), 6 (dDPO)")
    p.add_argument("--batch", type=int, default=2, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2, help="peak rate (the test's)")
    a = p.parse_args()
    torch.set_num_threads(2)
    print(f"jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}")
    for stage in ("sft", "dpo") if a.stage == "both" else (a.stage,):
        stage_args = argparse.Namespace(**vars(a))
        stage_args.examples = a.examples or {"sft": 45, "dpo": 27}[stage]
        stage_args.epochs = a.epochs or {"sft": 4, "dpo": 6}[stage]
        with tempfile.TemporaryDirectory() as tmp:
            report(run_stage(stage, stage_args, pathlib.Path(tmp)), stage_args)


if __name__ == "__main__":
    main()
