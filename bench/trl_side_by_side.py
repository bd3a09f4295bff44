"""Training throughput: zephyr_jax's jitted train step vs TRL's DPOTrainer or SFTTrainer (PyTorch), same device.

    python bench/trl_side_by_side.py [--stage=dpo|sft] [--device=cpu|cuda] [--precision=float32|bf16]
        [--batch=4] [--prompt=64] [--completion=64] [--length=2048] [--steps=10] [--warmup=3]
        [--hidden=256] [--intermediate=768] [--layers=4] [--heads=4] [--kv-heads=2] [--vocab=32000]
        [--torch-threads=2] [--remat=configs|none]

Same Mistral architecture (random weights), same batch, every sequence the same length, so both run the model
on the same tokens. DPO (default): B pairs, each sequence prompt + completion = T tokens, all 2B in one pass
(chosen and rejected: TRL's [2B, T]; zephyr_jax's trainer packs them, about four sequences a row, each its own
segment: [4, 4096] for 8 pairs of 512 + 512), sigmoid DPO loss (beta 0.1), frozen reference model forward every
step. SFT: B rows of --length tokens, one example a row (a packed row of one full-length example: no padding on
either side), the next-token loss on every position. Both: AdamW with grad-norm clipping 1.0, no gradient
accumulation, no evaluation, logging or checkpoints.

--precision=float32 (default): float32 everywhere, no gradient checkpointing (zephyr_jax: configs/*.py:tiny).
--precision=bf16: float32 master weights and bf16 compute with the configs' remat ("full"; zephyr_jax: the
stage config's defaults, attention "auto": cuDNN on NVIDIA GPUs, the frozen DPO reference stored in bf16; TRL:
bf16=True autocast over the float32 model and reference, gradient_checkpointing=True, attn_implementation="sdpa").
--remat=none (with bf16): nothing recomputed on either side, for a model whose activations fit (zephyr_jax:
remat "none" with its layers unrolled, scan_layers=False: under a scan, XLA:GPU copies every saved activation into
the scan's stacked buffers; TRL: gradient_checkpointing=False).
Each side runs in its own fresh process, one after the other.

zephyr_jax: bench/throughput.py's measure() on the stage's config with this architecture (the trainer's own
jitted step). TRL: DPOTrainer/SFTTrainer.train() on an in-memory dataset of fixed-length texts over a word-level
tokenizer with one token per word, so every tokenized sequence is exactly T tokens (asserted after TRL's
tokenization); a TrainerCallback times each step from on_step_begin to on_step_end (forward, backward, clipping,
optimizer; data loading excluded; on CUDA synchronized at both ends). Both report the median of the timed steps
after warm-up; tokens per step = 2*B*T (DPO) or B*T (SFT) for both. A third row, for context only (DPO on the
CPU), times a hand-written eager PyTorch DPO step on the same model with full logits (what TRL's CPU path is
compared with in bench/RESULTS.md). "CPU s/step" is the process's CPU time per step; "other load" the cores
other processes used meanwhile (numbers taken with other load above ~0.05 cores are disturbed; rerun them).

PyTorch runs with torch.set_num_threads(2) (--torch-threads); XLA:CPU uses both cores too (its default intra-op pool).
"""

from __future__ import annotations

import argparse
import copy
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
    from zephyr_jax.config_common import load_config

    # float32: the tests' variant (random init, float32 compute and reference, no remat); bf16: the recipe's.
    variant = ":tiny" if args.precision == "float32" else ""
    cfg = load_config(os.path.join(REPO, "configs", f"{args.stage}.py") + variant)
    with cfg.unlocked():
        cfg.model.init = "random"
        cfg.model.arch.update(arch(args))
        cfg.mesh.shape = (1, -1, 1)
        if args.remat == "none":
            cfg.model.remat, cfg.model.scan_layers = "none", False
        if args.stage == "dpo":
            cfg.dpo.beta, cfg.dpo.loss_type = 0.1, "sigmoid"
            cfg.data.max_length, cfg.data.max_prompt_length = args.prompt + args.completion, args.prompt
        else:
            cfg.data.max_length = args.length
    # Every example the same: DPO token counts as TRL's rows have them; SFT one full row each.
    mix = os.path.join(tempfile.mkdtemp(), "lengths.txt")
    line = f"{args.prompt} {args.completion} {args.completion}\n" if args.stage == "dpo" else f"{args.length}\n"
    with open(mix, "w") as f:
        f.write(line * (args.batch * args.steps))
    # One batch (every batch is alike), stepped `warmup` times untimed and `steps` times timed, as TRL's run is
    # (a pass over `steps` batches per warm-up warmed up `warmup` x `steps` steps).
    r = throughput.measure(cfg, args.stage, args.batch, mix, num_batches=1, warmup=args.warmup, repeats=args.steps)
    # The median, as TRL's row (measure reports the mean, and its MFU from it); every row holds tokens(args) real
    # tokens.
    return dict(r, step_s=r["median_s"], tokens_per_s=tokens(args) / r["median_s"],
                mfu=r["mfu"] * r["step_s"] / r["median_s"] if r["mfu"] is not None else None)


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
    if args.stage == "dpo":
        data = Dataset.from_list([{"prompt": words(args.prompt),
                                   "chosen": " " + words(args.completion - 1) + " </s>",
                                   "rejected": " " + words(args.completion - 1) + " </s>"} for _ in range(n_rows)])
    else:  # the text ends in EOS already, so TRL adds none
        data = Dataset.from_list([{"text": words(args.length - 1) + " </s>"} for _ in range(n_rows)])

    bf16, cuda = args.precision == "bf16", args.device == "cuda"
    config = transformers.MistralConfig(**arch(args), tie_word_embeddings=False)
    if bf16:
        config._attn_implementation = "sdpa"
    model = transformers.MistralForCausalLM(config).to(torch.float32)  # float32 master weights (autocast: bf16)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class StepTimer(transformers.TrainerCallback):
        times, load = [], throughput.CpuUse()

        def on_step_begin(self, *a, **k):
            sync()
            if len(self.times) >= args.warmup:
                self.load.start()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync()
            self.times.append(time.perf_counter() - self.t0)
            if len(self.times) > args.warmup:
                self.load.stop()

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        common = dict(
            output_dir=out, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.warmup + args.steps, learning_rate=5e-7, lr_scheduler_type="linear", max_grad_norm=1.0,
            weight_decay=0.0, bf16=bf16, fp16=False, gradient_checkpointing=bf16 and args.remat != "none",
            use_cpu=not cuda,
            report_to="none", logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, seed=42)
        if common["gradient_checkpointing"]:
            common["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        if args.stage == "dpo":
            dpo_args = trl.DPOConfig(max_length=args.prompt + args.completion, padding_free=False,
                                     precompute_ref_log_probs=False, beta=0.1, loss_type=["sigmoid"], **common)
            trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model).eval(), args=dpo_args,
                                     train_dataset=data, processing_class=tok, callbacks=[timer])
            lengths = {len(r["prompt_ids"]) + len(r[k]) for r in trainer.train_dataset
                       for k in ("chosen_ids", "rejected_ids")}
            expected = args.prompt + args.completion
        else:
            sft_args = trl.SFTConfig(max_length=args.length, packing=False, padding_free=False,
                                     dataset_text_field="text", **common)
            trainer = trl.SFTTrainer(model=model, args=sft_args, train_dataset=data, processing_class=tok,
                                     callbacks=[timer])
            lengths = {len(r["input_ids"]) for r in trainer.train_dataset}
            expected = args.length
        assert lengths == {expected}, f"TRL sequence lengths {lengths}, expected {expected}"
        trainer.train()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}"
    if cuda:
        versions += f" ({torch.cuda.get_device_name()}, peak {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB)"
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
    return {"step_s": step_s, "min_s": min(times), "max_s": max(times), "tokens_per_s": tokens(args) / step_s,
            "cpu_s": load.own / len(times) if load.wall else None, "other_load": load.other_cores, **extra}


def tokens(args) -> int:
    """Tokens one step computes: chosen and rejected of B pairs (DPO), B rows (SFT)."""
    return 2 * args.batch * (args.prompt + args.completion) if args.stage == "dpo" else args.batch * args.length


def isolated(fn, args) -> dict:
    """fn(args) in a fresh process: the frameworks never share a device's memory (JAX reserves most of a GPU's
    at start) or run at the same time."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, args).result()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stage", choices=["dpo", "sft"], default="dpo")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where PyTorch runs (JAX: its default)")
    p.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    p.add_argument("--remat", choices=["configs", "none"], default="configs",
                   help="configs: bf16 recomputes each layer on both sides (float32: neither); none: neither does")
    for name, default in (("batch", 4), ("prompt", 64), ("completion", 64), ("length", 2048), ("steps", 10),
                          ("warmup", 3), ("hidden", 256), ("intermediate", 768), ("layers", 4), ("heads", 4),
                          ("kv-heads", 2), ("vocab", 32000), ("torch-threads", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()

    import jax

    ours = isolated(run_zephyr_jax, args)  # first, then PyTorch: the two never run at the same time
    theirs = isolated(run_trl, args)
    rows = [(f"zephyr_jax {args.stage.upper()} train step", ours), (f"TRL {args.stage.upper()}Trainer", theirs)]
    if args.stage == "dpo" and args.device == "cpu":
        rows.append(("(context) plain PyTorch DPO step, full logits", isolated(run_plain_torch, args)))
    shape = (f"batch {args.batch} pairs, T = {args.prompt} + {args.completion} = {args.prompt + args.completion}, "
             f"tokens/step = 2*B*T = {tokens(args)}" if args.stage == "dpo" else
             f"batch {args.batch} rows, T = {args.length}, tokens/step = B*T = {tokens(args)}")
    remat = "nothing recomputed" if args.remat == "none" or args.precision == "float32" else "layers recomputed"
    print(f"\nMistral {arch(args)}, {ours['params_m']:.1f}M params, {args.precision}, {remat}; {shape}; "
          f"median of {args.steps} steps after {args.warmup} warm-up; {len(os.sched_getaffinity(0))} usable cores")
    mfu = "n/a" if ours["mfu"] is None else f"{100 * ours['mfu']:.1f}% (median step)"
    print(f"jax {jax.__version__} ({ours['devices']} x {ours['device']}, MFU {mfu}, "
          f"peak {throughput.peak_memory(ours)} GiB); {theirs['versions']} "
          f"(optim {theirs['optimizer']}, {args.torch_threads} threads)")
    print("| implementation | median step s (min-max) | tokens/s | vs TRL | CPU s/step | vs TRL | other load |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows:
        cpu_ratio = theirs["cpu_s"] / r["cpu_s"] if r["cpu_s"] and theirs["cpu_s"] else None
        print(f"| {name} | {r['step_s']:.3f} ({r['min_s']:.3f}-{r['max_s']:.3f}) | {r['tokens_per_s']:,.0f} "
              f"| {r['tokens_per_s'] / theirs['tokens_per_s']:.2f}x | {throughput.fmt(r['cpu_s'])} "
              f"| {throughput.fmt(cpu_ratio, 2)}x | {throughput.fmt_load(r['other_load'])} |")


if __name__ == "__main__":
    main()
