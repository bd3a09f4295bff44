"""DPO training throughput on this CPU: zephyr_jax's jitted train step vs TRL's DPOTrainer (PyTorch).

    python bench/trl_side_by_side.py [--batch=4] [--prompt=64] [--completion=64] [--steps=10] [--warmup=3]
        [--hidden=256] [--intermediate=768] [--layers=4] [--heads=4] [--kv-heads=2] [--vocab=32000]
        [--torch-threads=2]

Same Mistral architecture (random weights), float32 everywhere, same batch of B pairs, every sequence
prompt + completion = T tokens long, so both run the model on [2B, T] (chosen and rejected in one pass), sigmoid
DPO loss (beta 0.1), frozen reference model forward every step, AdamW with grad-norm clipping 1.0, no gradient
checkpointing, no gradient accumulation, no evaluation, logging or checkpoints.

zephyr_jax: bench/throughput.py's measure() on configs/dpo.py:tiny with this architecture (the trainer's own
jitted step). TRL: DPOTrainer.train() on an in-memory dataset of fixed-length texts over a word-level tokenizer
with one token per word, so every tokenized sequence is exactly T tokens; a TrainerCallback times each step from
on_step_begin to on_step_end (forward, backward, clipping, optimizer; data loading excluded). Both report the
median of the timed steps after warm-up; tokens per step = 2*B*T for both. A third row, for context only, times
a hand-written eager PyTorch DPO step on the same model with full logits (what TRL's CPU path is compared with in
bench/RESULTS.md). "CPU s/step" is the process's CPU time per step; "other load" the cores other processes used
meanwhile (numbers taken with other load above ~0.05 cores are disturbed; rerun them).

PyTorch runs with torch.set_num_threads(2) (--torch-threads); XLA:CPU uses both cores too (its default intra-op pool).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import throughput  # noqa: E402  (bench/throughput.py)

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def arch(args) -> dict:
    return dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                max_position_embeddings=2048, sliding_window=4096)


def run_zephyr_jax(args) -> dict:
    spec = importlib.util.spec_from_file_location("dpo_config", os.path.join(REPO, "configs", "dpo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config("tiny")  # random init, float32 compute and reference, no remat, 1 device
    cfg.model.arch.update(arch(args))
    cfg.dpo.beta, cfg.dpo.loss_type = 0.1, "sigmoid"
    # Every pair the same: prompt and completion token counts as TRL's rows have them (one line per pair).
    mix = os.path.join(tempfile.mkdtemp(), "pairs.txt")
    with open(mix, "w") as f:
        f.write(f"{args.prompt} {args.completion} {args.completion}\n" * (args.batch * args.steps))
    with cfg.unlocked():
        cfg.data.max_length, cfg.data.max_prompt_length = args.prompt + args.completion, args.prompt
    return throughput.measure(cfg, "dpo", args.batch, mix, args.steps, args.warmup)  # step_s, cpu_s, ...


def run_trl(args) -> dict:
    import torch
    import transformers
    import trl
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    # One token per whitespace-separated word: "w3 w17 ..." -> [3, 17, ...]; no BOS is added.
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, args.vocab)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", bos_token="<s>",
                                               eos_token="</s>", pad_token="</s>")

    rng = np.random.default_rng(0)
    words = lambda n: " ".join(f"w{i}" for i in rng.integers(3, args.vocab, n))  # noqa: E731
    n_rows = args.batch * (args.warmup + args.steps)
    data = Dataset.from_list([{"prompt": words(args.prompt),
                               "chosen": " " + words(args.completion - 1) + " </s>",
                               "rejected": " " + words(args.completion - 1) + " </s>"} for _ in range(n_rows)])

    config = transformers.MistralConfig(**arch(args), tie_word_embeddings=False)
    model = transformers.MistralForCausalLM(config).to(torch.float32)
    reference = copy.deepcopy(model).eval()

    class StepTimer(transformers.TrainerCallback):
        times, load = [], throughput.CpuUse()

        def on_step_begin(self, *a, **k):
            if len(self.times) >= args.warmup:
                self.load.start()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self.t0)
            if len(self.times) > args.warmup:
                self.load.stop()

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        dpo_args = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps, max_length=args.prompt + args.completion, padding_free=False,
            precompute_ref_log_probs=False, beta=0.1, loss_type=["sigmoid"], learning_rate=5e-7,
            lr_scheduler_type="linear", max_grad_norm=1.0, weight_decay=0.0, bf16=False, fp16=False,
            gradient_checkpointing=False, use_cpu=True, report_to="none", logging_strategy="no",
            save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=42)
        trainer = trl.DPOTrainer(model=model, ref_model=reference, args=dpo_args, train_dataset=data,
                                 processing_class=tok, callbacks=[timer])
        lengths = {len(r["prompt_ids"]) + len(r[k]) for r in trainer.train_dataset for k in ("chosen_ids",
                                                                                           "rejected_ids")}
        assert lengths == {args.prompt + args.completion}, f"TRL sequence lengths {lengths}"
        trainer.train()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    return summary(args, timer.times[args.warmup:], timer.load,
                   optimizer=getattr(trainer.args.optim, "value", trainer.args.optim), versions=versions)


def run_plain_torch(args) -> dict:
    """Context, not TRL: the same HF model in a hand-written eager PyTorch DPO step with full logits and
    log_softmax (policy forward + backward, reference forward, sigmoid loss, clipping, fused AdamW)."""
    import torch
    import torch.nn.functional as F
    import transformers

    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**arch(args), tie_word_embeddings=False))
    reference = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-7, weight_decay=0.0, fused=True)
    seq = args.prompt + args.completion
    ids = torch.randint(3, args.vocab, (2 * args.batch, seq))
    mask = torch.zeros(2 * args.batch, seq - 1)
    mask[:, args.prompt - 1:] = 1  # completion tokens, as targets of the previous position

    def logps(m):
        logits = m(input_ids=ids).logits[:, :-1]
        return (logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] * mask).sum(-1)

    times, load = [], throughput.CpuUse()
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            load.start()
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = logps(reference)
        ratios = logps(model) - ref
        loss = -F.logsigmoid(0.1 * (ratios[0::2] - ratios[1::2])).mean()  # rows alternate chosen, rejected
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    load.stop()
    return summary(args, times[args.warmup:], load)


def summary(args, times, load, **extra) -> dict:
    step_s = statistics.median(times)
    return {"step_s": step_s, "min_s": min(times), "max_s": max(times),
            "tokens_per_s": 2 * args.batch * (args.prompt + args.completion) / step_s,
            "cpu_s": load.own / len(times) if load.wall else None, "other_load": load.other_cores, **extra}

def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, default in (("batch", 4), ("prompt", 64), ("completion", 64), ("steps", 10), ("warmup", 3),
                          ("hidden", 256), ("intermediate", 768), ("layers", 4), ("heads", 4), ("kv-heads", 2),
                          ("vocab", 32000), ("torch-threads", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()

    import jax

    ours = run_zephyr_jax(args)  # first, then PyTorch: the two never run at the same time
    theirs = run_trl(args)
    plain = run_plain_torch(args)
    seq = args.prompt + args.completion
    tokens = 2 * args.batch * seq
    print(f"\nMistral {arch(args)}, {ours['params_m']:.1f}M params, float32; batch {args.batch} pairs, "
          f"T = {args.prompt} + {args.completion} = {seq}, tokens/step = 2*B*T = {tokens}; "
          f"median of {args.steps} steps after {args.warmup} warm-up; {len(os.sched_getaffinity(0))} usable cores")
    print(f"jax {jax.__version__} (XLA:CPU, {ours['devices']} device); {theirs['versions']} "
          f"(optim {theirs['optimizer']}, {__import__('torch').get_num_threads()} threads)")
    print("| implementation | median step s (min-max) | tokens/s | vs TRL | CPU s/step | vs TRL | other load |")
    print("|---|---|---|---|---|---|---|")
    for name, r in (("zephyr_jax DPO train step", ours), ("TRL DPOTrainer", theirs),
                    ("(context) plain PyTorch DPO step, full logits", plain)):
        print(f"| {name} | {r['step_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['tokens_per_s']:,.0f} "
              f"| {r['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | {throughput.fmt(r['cpu_s'])} "
              f"| {theirs['cpu_s'] / r['cpu_s']:.2f}x | {throughput.fmt_load(r['other_load'])} |")

if __name__ == "__main__":
    main()
