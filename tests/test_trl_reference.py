"""Training against TRL, the library the recipe trained with: the same PyTorch model, data and hyper-parameters in TRL's
DPOTrainer and SFTTrainer and in zephyr_jax's loop give, over two optimizer steps, the same loss, metrics, gradient
norm and weights."""

import json
import os

import datasets
import jax
import numpy as np
import pytest
import torch
import transformers
import trl  # the test extra pins it: a missing reference fails here rather than skipping
from flax import nnx
from packaging.version import Version

from tests.torch_reference import save_torch, torch_mistral
from zephyr_jax import train
from zephyr_jax.config_common import load_config
from zephyr_jax.data import preference_example, sft_example
from zephyr_jax.loading import load_model
from zephyr_jax.tokenizer import load_tokenizer

# transformers 4.x's Trainer logs the training loss rounded to 4 decimals (5.0 logs it whole); trl 1.16 takes 4.56+
pytestmark = pytest.mark.skipif(Version(transformers.__version__).major < 5,
                                reason="compares logged losses to 1e-5: needs transformers 5")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR, BETA, STEPS = 1e-2, 0.1, 2
DPO_METRICS = ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "logps/chosen", "logps/rejected")


def _pairs():
    """ultrafeedback_binarized rows: one- and two-turn prompts, one with a system turn, replies of unequal
    lengths (TRL pads them to a batch; zephyr_jax packs them into rows)."""
    def row(i, prompt_msgs, chosen, rejected):
        msgs = lambda reply: prompt_msgs + [{"role": "assistant", "content": reply}]  # noqa: E731
        return {"prompt": prompt_msgs[-1]["content"], "prompt_id": str(i), "chosen": msgs(chosen),
                "rejected": msgs(rejected), "messages": msgs(chosen), "score_chosen": 8.0, "score_rejected": 3.0}

    user = lambda text: {"role": "user", "content": text}  # noqa: E731
    return [
        row(0, [user("Which is the largest: 3 9 4?")], "9", "The largest number in the list is 4."),
        row(1, [{"role": "system", "content": "You answer in one word."}, user("Name a colour of the sky.")],
            "Blue.", "Grey, on a cloudy day, or black at night."),
        row(2, [user("Hi!"), {"role": "assistant", "content": "Hello. How can I help?"}, user("Add 2 and 3.")],
            "2 + 3 = 5.", "6"),
        row(3, [user("Spell 'cat' backwards.")], "tac", "It is 'tca', I think, though I am not sure."),
    ]


def _trl_rows(row):
    """TRL's conversational preference form: the prompt's messages, then the last reply of each side."""
    return {"prompt": row["chosen"][:-1], "chosen": row["chosen"][-1:], "rejected": row["rejected"][-1:]}


class _Record(transformers.TrainerCallback):
    """TRL's logged metrics, by optimizer step."""

    def __init__(self):
        self.logs = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.logs[state.global_step] = dict(logs)


class _OnTheRecipesTokens(trl.DPOTrainer):
    """TRL's collator, loss and optimizer on zephyr_jax's tokens, for training and evaluation alike (the tests'
    two splits are the same pairs). TRL's own tokens of the training split are kept in `trl_tokens`: they differ,
    as TRL 1.16 renders the chat template without BOS or the alignment-handbook's empty system turn."""

    def __init__(self, recipe_tokens: list, **kwargs):
        self.recipe_tokens = recipe_tokens  # before super().__init__, which prepares the datasets
        super().__init__(**kwargs)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        theirs = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        if dataset_name == "train":
            self.trl_tokens = theirs
        return datasets.Dataset.from_list(self.recipe_tokens)


def _model_dir(tmp_path, tok) -> str:
    """A random PyTorch Mistral with the real vocabulary, and the Zephyr tokenizer beside it."""
    model_dir = save_torch(torch_mistral(seed=0, vocab_size=32000, hidden_size=32, intermediate_size=64,
                                         initializer_range=0.2), tmp_path / "model")
    tok.save_pretrained(model_dir)
    return model_dir


def _split_dir(folder, split: str, rows: list):
    """A data directory holding one jsonl split, as the loader reads it."""
    folder.mkdir()
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _trl_args(config_class, tmp_path, batch_size: int, **fields):
    """Two steps of the whole data set, AdamW with a constant LR, in float32: TRL's configs default bf16 to True,
    which autocasts even on the CPU (and wraps DPO's reference model's forward). fields: more, or others (a
    schedule, epochs: bench/trl_trajectory.py)."""
    return config_class(**{
        "output_dir": str(tmp_path / "trl"), "per_device_train_batch_size": batch_size, "max_steps": STEPS,
        "learning_rate": LR, "lr_scheduler_type": "constant", "warmup_steps": 0, "weight_decay": 0.0,
        "max_grad_norm": 1.0, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_epsilon": 1e-8, "optim": "adamw_torch",
        "bf16": False, "max_length": None, "logging_steps": 1, "per_device_eval_batch_size": 8, "save_strategy": "no",
        "report_to": "none", "use_cpu": True, "seed": 0, "dataloader_drop_last": False,
        "model_init_kwargs": {"dtype": torch.float32, "attn_implementation": "eager"}, **fields})


def _our_run(tmp_path, stage: str, model_dir: str, data, **overrides) -> tuple[dict, str]:
    """zephyr_jax's training loop for two steps with the same optimizer, then its evaluation on the same data:
    (metrics by step and under "eval", workdir). overrides: more config, or other (a schedule, epochs)."""
    split = "train_sft" if stage == "sft" else "train_prefs"
    cfg = load_config(f"{ROOT}/configs/{stage}.py:tiny", **{
        "model.init": "hf", "model.path": model_dir, "tokenizer": model_dir, "data.train": str(data),
        "data.eval": str(data), "data.eval_split": split, "data.max_train_examples": -1,
        "data.max_eval_examples": -1, "train.max_steps": STEPS, "train.eval_every": 0, "train.save_every": STEPS,
        "train.log_every": 1, "train.progress": False, "logging.tensorboard": False, "optim.lr": LR,
        "optim.schedule": "constant", "optim.warmup_ratio": 0.0, "optim.clip_norm": 1.0, "optim.b1": 0.9,
        "optim.b2": 0.999, "optim.eps": 1e-8, "optim.weight_decay": 0.0, "mesh.num_devices": 1, **overrides})
    workdir = str(tmp_path / "ours")
    train.run(cfg, workdir)
    with open(f"{workdir}/metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    by_step = {r["step"]: r for r in records if r["split"] == "train"}
    by_step["eval"] = [r for r in records if r["split"] == "eval"][-1]  # the evaluation after the last step
    return by_step, workdir


def _same_weights(workdir, trl_model, tmp_path):
    """Two Adam steps move a weight by up to 2 LR (0.02 here); the two trainers' weights agree to LR / 100."""
    want = nnx.state(load_model(save_torch(trl_model, tmp_path / "trl_after"), dtype="float32"), nnx.Param)
    got = nnx.state(load_model(workdir, dtype="float32"), nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=LR / 100), got, want)


@pytest.mark.parametrize("loss_type,label_smoothing,trls_loss,precompute", [
    ("sigmoid", 0.0, "sigmoid", False), ("sigmoid", 0.0, "sigmoid", True), ("sigmoid", 0.1, "aot", False),
    ("ipo", 0.0, "ipo", False), ("robust", 0.2, "robust", False), ("hinge", 0.0, "hinge", False)])
def test_two_dpo_steps_equal_trls_dpo_trainer(tmp_path, loss_type, label_smoothing, trls_loss, precompute):
    """The paper's loss, and the others TRL 1.16 has in the same form (IPO over per-token log-ratios). TRL 1.16's
    sigmoid loss has no label smoothing; its "aot" loss sorts the batch's log-ratios, so one pair a micro-batch
    makes it conservative DPO (cDPO): -(1 - eps) log sigmoid(beta z) - eps log sigmoid(-beta z). precompute: the
    reference's log-probs computed once before training on both sides, in place of a frozen copy."""
    tok = load_tokenizer()
    model_dir = _model_dir(tmp_path, tok)
    rows = _pairs()
    data = _split_dir(tmp_path / "prefs", "train_prefs", rows)

    micro_batches = len(rows) if trls_loss == "aot" else 1
    args = _trl_args(trl.DPOConfig, tmp_path, len(rows) // micro_batches, gradient_accumulation_steps=micro_batches,
                     beta=BETA, loss_type=[trls_loss], label_smoothing=label_smoothing,
                     precompute_ref_log_probs=precompute)
    examples = [preference_example(r, i, tok) for i, r in enumerate(rows)]
    assert not any(e.truncated for e in examples)
    recipe_tokens = [{"prompt_ids": e.prompt.tolist(), "chosen_ids": e.chosen.tolist(),
                      "rejected_ids": e.rejected.tolist()} for e in examples]
    record = _Record()
    pairs = datasets.Dataset.from_list([_trl_rows(r) for r in rows])
    trainer = _OnTheRecipesTokens(
        recipe_tokens, model=model_dir, args=args, callbacks=[record], train_dataset=pairs, eval_dataset=pairs,
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir))
    # Where TRL's own tokens differ: the prompt's start (BOS and the handbook's empty system turn; after it the
    # user turn's first token differs too, "<" rather than " <", so the prompts are compared as text), and the
    # template's "\n" after a reply's </s>, which zephyr_jax leaves out (a sequence ends at EOS, where generation
    # stops). The completions, where the loss is, are otherwise the same tokens.
    for i, (e, theirs) in enumerate(zip(examples, trainer.trl_tokens)):
        assert tok.decode(e.prompt).endswith(tok.decode(theirs["prompt_ids"])), i
        assert tok.decode(e.prompt).startswith(tok.bos_token + " <|system|>\n"), i
        for name in ("chosen", "rejected"):
            ours, trls = getattr(e, name).tolist(), list(theirs[f"{name}_ids"])
            assert trls[:len(ours)] == ours and tok.decode(trls[len(ours):]).strip() == "", (i, name)
    trainer.train()
    record.logs["eval"] = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}

    ours, workdir = _our_run(tmp_path, "dpo", model_dir, data, **{
        "train.global_batch_size": len(rows), "data.max_length": 1024, "data.max_prompt_length": 512,
        "dpo.beta": BETA, "dpo.loss_type": loss_type, "dpo.label_smoothing": label_smoothing,
        "dpo.precompute_reference": precompute})  # pairs packed into rows
    # precompute: neither side keeps a reference model (TRL drops it; ours scored the training pairs first)
    scored = any(name.startswith("train-") for name in os.listdir(f"{workdir}/reference_logps"))
    assert (trainer.ref_model is None) == precompute == scored

    for step in (1, STEPS, "eval"):  # 1: log-probs and the gradient; 2: the loss after one update; eval: the end's
        for name in DPO_METRICS:
            if name == "grad_norm" and step == "eval":
                continue
            if step == 1 and name == "rewards/accuracies":
                continue  # the policy is the reference: every reward is 0 up to rounding, a strict > is a coin toss
            # The loss is a function of differences of float32 log-prob sums near -140, which round at ~1.5e-5
            # between the two (eval losses: IPO 1.777889 vs 1.777869, hinge 0.036088 vs 0.036090)
            atol = 5e-5 if name == "loss" else 1e-6
            np.testing.assert_allclose(ours[step][name], record.logs[step][name], rtol=1e-5, atol=atol,
                                       err_msg=f"step {step}: {name}")
    assert abs(ours[2]["loss"] - ours[1]["loss"]) > 1e-3  # the first update moved the loss (the test has teeth)
    _same_weights(workdir, trainer.model, tmp_path)


def _dialogues():
    """ultrachat_200k rows of unequal lengths, one with a system turn and one with two exchanges."""
    def row(i, *turns):
        roles = ["system"] * (len(turns) % 2) + ["user", "assistant"] * (len(turns) // 2)
        messages = [{"role": r, "content": t} for r, t in zip(roles, turns)]
        return {"prompt": messages[-2]["content"], "prompt_id": str(i), "messages": messages}

    return [row(0, "Which is the largest: 3 9 4?", "9"),
            row(1, "You answer briefly.", "Name a colour of the sky.", "Blue, or grey on a cloudy day."),
            row(2, "Hi!", "Hello. How can I help?", "Add 2 and 3.", "2 + 3 = 5."),
            row(3, "Spell 'cat' backwards.", "tac"),
            row(4, "Write a haiku about rain.", "Soft rain on the roof,\nthe gutters hum a low song,\nnight keeps its "
                "secrets."),
            row(5, "Is 7 prime?", "Yes: its only divisors are 1 and 7.")]


@pytest.mark.parametrize("layout", ["padded", "packed", "two_micro_batches"])
def test_two_sft_steps_equal_trls_sft_trainer(tmp_path, layout):
    """The loss is every token's (the recipe's), averaged over the batch's tokens. TRL pads one dialogue a row;
    zephyr_jax does the same, or packs all six into one row (each its own segment), or splits the batch into two
    micro-batches of unequal token counts (TRL's gradient_accumulation_steps=2: transformers divides by the whole
    batch's tokens, and so does zephyr_jax; a mean of the micro-batches' means would differ)."""
    tok = load_tokenizer()
    model_dir = _model_dir(tmp_path, tok)
    rows = _dialogues()
    data = _split_dir(tmp_path / "sft", "train_sft", rows)

    examples = [sft_example(r, i, tok, loss_on="all") for i, r in enumerate(rows)]
    assert not any(e.truncated for e in examples)
    packing, micro_batches = layout == "packed", 2 if layout == "two_micro_batches" else 1
    record = _Record()
    recipe_tokens = datasets.Dataset.from_list([{"input_ids": e.ids.tolist()} for e in examples])
    trainer = trl.SFTTrainer(  # TRL takes the recipe's tokens as they are (a dataset with input_ids is not retokenized)
        model=model_dir, args=_trl_args(trl.SFTConfig, tmp_path, len(rows) // micro_batches, packing=False,
                                        gradient_accumulation_steps=micro_batches),
        processing_class=transformers.AutoTokenizer.from_pretrained(model_dir), callbacks=[record],
        train_dataset=recipe_tokens, eval_dataset=recipe_tokens)
    trainer.train()
    record.logs["eval"] = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}
    ours, workdir = _our_run(tmp_path, "sft", model_dir, data, **{
        "data.packing": packing, "data.loss_on": "all", "data.max_length": 512,
        "train.global_batch_size": 1 if packing else len(rows), "train.grad_accum": micro_batches})
    if packing:
        assert ours[1]["num_tokens"] == sum(len(e.ids) - 1 for e in examples)  # one row held every dialogue

    # rtol 3e-5: TRL's float32 CPU head is the rougher side here (step 1's gradient norm: float64 autograd of
    # transformers' model 3.3893779, zephyr_jax 3.3893780, TRL 3.3893401).
    # (Token accuracy is not compared: it is 0 on both sides for this random model, and TRL averages it over
    # micro-batches where zephyr_jax pools their tokens.)
    for step in (1, STEPS, "eval"):
        for name in ("loss", "grad_norm") if step != "eval" else ("loss",):
            np.testing.assert_allclose(ours[step][name], record.logs[step][name], rtol=3e-5, atol=1e-6,
                                       err_msg=f"step {step}: {name}")
    assert ours[2]["loss"] < ours[1]["loss"] - 0.1  # the first update moved the loss (the test has teeth)
    _same_weights(workdir, trainer.model, tmp_path)
