"""dSFT: Mistral-7B-v0.1 fine-tuned on UltraChat dialogues (Zephyr paper, section 4-5).

python -m zephyr_jax.train --config=configs/sft.py[:VARIANT] --workdir=DIR [--config.key=value ...]
Variants: zephyr (default; the paper), handbook (alignment-handbook 2024-01 revision), demo (CPU demo), tiny (tests).
"""

import ml_collections

from zephyr_jax.config_common import base


def get_config(arg=None):
    variant = arg or "zephyr"
    c = base("sft")
    c.data.train = "HuggingFaceH4/ultrachat_200k"  # the paper's dSFT data; another: rows of `messages` (README: Data)
    c.data.train_split = "train_sft"  # 207,865 dialogues
    c.data.eval = "HuggingFaceH4/ultrachat_200k"
    c.data.eval_split = "test_sft"  # 23,110 dialogues
    c.data.max_length = 2048  # paper: packed sequences of 2048 tokens
    c.data.packing = True  # paper: packing; here each example keeps its own segment (no cross-attention)
    c.data.pack_window = 1000  # best-fit decreasing over this many shuffled examples at a time (0: all at once)
    c.data.loss_on = "all"  # the recipe learns every token; "assistant" learns replies only
    # A dialogue longer than max_length is cut to it (the count is logged) or dropped. A departure: the recipe's
    # packing (TRL 0.7's ConstantLengthDataset) concatenates the dialogues and cuts the stream into rows, so a long
    # one spills into the next row and every token is learned.
    c.data.too_long = "truncate"  # or "drop" (counted as skipped, also with on_bad_row="raise")

    c.optim.lr = 2e-5  # paper: peak lr 2e-5
    c.optim.schedule = "cosine"  # paper: cosine
    c.optim.warmup_ratio = 0.1  # paper: 10% warmup

    c.train.global_batch_size = 512  # paper: global batch 512 (packed rows)
    c.train.num_epochs = 1  # paper: 1 epoch (1-3 explored)

    if variant == "zephyr":
        pass
    elif variant == "handbook":
        c.train.global_batch_size = 128  # alignment-handbook recipes/zephyr-7b-beta/sft (2024-01): batch 128
    elif variant == "demo":  # values measured on 2 CPU cores (see zephyr_jax/demo.py)
        _small(c, "demo")
        c.data.packing = False  # replies are one digit: unpacked rows padded to 48 are cheaper here
        c.data.loss_on = "assistant"
        c.data.max_length = 64
        c.data.buckets = (48, 64)  # every demo row fits 48; 64 is max_length's
        c.data.max_eval_examples = 256
        c.train.global_batch_size = 32
        c.train.num_epochs = 1  # 296 steps on the demo run's 9,500 distilled dialogues, 312 on make-data's 10,000
        c.train.eval_every = 0
        c.optim.lr = 2e-3
    elif variant == "tiny":
        _small(c, "tiny")
        c.data.max_train_examples, c.data.max_eval_examples = 64, 16
        c.train.global_batch_size = 8
        c.train.max_steps = 6
        c.train.eval_every, c.train.save_every, c.train.log_every = 3, 3, 1
        c.optim.lr = 1e-3
        c.logging.tensorboard = False  # tensorboardX imports torch: 3-4 s of each test run (test_metrics has it)
    else:
        raise ValueError(f"unknown variant {variant!r}: expected zephyr, handbook, demo or tiny")
    return c


def _small(c: ml_collections.ConfigDict, name: str) -> None:
    """A from-scratch tiny model on the embedded demo data (python -m zephyr_jax.demo make-data)."""
    c.model.init = "random"
    if name == "demo":  # hidden 96 learns the demo task much faster than 64 at about the same step cost
        c.model.arch.hidden_size, c.model.arch.intermediate_size = 96, 256
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.data.train = "demo_data/sft"
    c.data.eval = "demo_data/sft"
    c.data.max_length = 128
    c.train.eval_batch_size = 32
    c.mesh.shape = (-1, 1, 1)
