"""dDPO: the dSFT model aligned on binarized UltraFeedback preferences (Zephyr paper, section 4-5).

python -m zephyr_jax.train --config=configs/dpo.py[:VARIANT] --workdir=DIR --config.model.path=SFT_WORKDIR
Variants: zephyr (default; the paper's Zephyr-7B-β), handbook (alignment-handbook 2024-01 revision),
demo (CPU demo), tiny (tests).
"""

import ml_collections

from zephyr_jax.config_common import base


def get_config(arg=None):
    variant = arg or "zephyr"
    c = base("dpo")
    c.model.init = "orbax"  # paper: dDPO starts from the dSFT model (a zephyr_jax SFT workdir)
    c.model.path = "workdirs/sft"  # or init="hf" with a HF directory/hub name of an SFT model
    c.data.train = "HuggingFaceH4/ultrafeedback_binarized"  # the paper's; another: chosen/rejected rows (README: Data)
    c.data.train_split = "train_prefs"  # 61,135 pairs
    c.data.eval = "HuggingFaceH4/ultrafeedback_binarized"
    c.data.eval_split = "test_prefs"  # 2,000 pairs
    c.data.max_length = 1024  # paper and handbook: max_length 1024
    c.data.max_prompt_length = 512  # paper and handbook: max_prompt_length 512, prompt cut from the left
    # and a too-long pair's completions to max_length - max_prompt_length (TRL 0.7's DPOTrainer, the recipe's)
    c.data.packed_rows = 0  # packing: rows per global batch (0: about four sequences a row, mesh-aligned; at most 2 x
    # global_batch_size, a sequence a row)

    c.dpo = ml_collections.ConfigDict()
    c.dpo.beta = 0.1  # paper: beta 0.1
    c.dpo.loss_type = "sigmoid"  # paper: the DPO loss; the others: losses.LOSS_TYPES
    c.dpo.label_smoothing = 0.0  # > 0: conservative DPO (cDPO)
    c.dpo.reference_free = False
    c.dpo.precompute_reference = False  # True: one pass of reference log-probs before training, cached in workdir
    c.dpo.reference_dtype = "bfloat16"  # storage of the frozen reference copy (exact: the policy computes in bf16)

    # Optimizer: AdamW without weight decay (config_common), as the paper states. The released Zephyr-7B-β was
    # trained with RMSprop (the alignment-handbook's first dpo recipe, 2023-11: optim: rmsprop; its authors in
    # huggingface/alignment-handbook#43: "the paper and the model cards ... are incorrect"), which zephyr_jax does
    # not offer; the handbook's 2024-01 revision (:handbook) went to adamw_torch.
    c.optim.lr = 5e-7  # paper: peak lr 5e-7
    c.optim.schedule = "linear"  # paper: linear decay
    c.optim.warmup_ratio = 0.1  # paper: 10% warmup

    c.train.global_batch_size = 32  # paper: global batch 32
    c.train.num_epochs = 3  # paper: 3 epochs for Zephyr-7B-β
    c.train.eval_every = 100

    if variant == "zephyr":
        pass
    elif variant == "handbook":
        c.dpo.beta = 0.01  # alignment-handbook recipes/zephyr-7b-beta/dpo (2024-01): beta 0.01
        c.optim.schedule = "cosine"  # handbook: cosine
        c.train.num_epochs = 1  # handbook: 1 epoch
        c.train.global_batch_size = 128  # handbook: batch 128
    elif variant == "demo":  # values measured on 2 CPU cores (see zephyr_jax/demo.py)
        _small(c, "workdirs/demo_sft")
        c.data.max_length, c.data.max_prompt_length = 64, 32  # packed rows: lengths in multiples of 64
        c.data.max_eval_examples = 256
        c.train.global_batch_size = 32
        c.train.num_epochs = 1  # 53 / 59 steps on the demo run's on-policy pairs (seeds 0 / 1), 93 on make-data's
        c.train.eval_every = 0
        c.optim.lr = 1e-3
        c.dpo.beta = 1.0  # beta 0.1 broke the one-digit reply format on this tiny model
    elif variant == "tiny":
        _small(c, "workdirs/tiny_sft")
        c.model.init = "random"  # the tests' starting point; --config.model.init=orbax starts from workdirs/tiny_sft
        c.data.max_train_examples, c.data.max_eval_examples = 32, 8
        c.train.global_batch_size = 8
        c.train.max_steps = 6
        c.train.eval_every, c.train.save_every, c.train.log_every = 3, 3, 1
        c.optim.lr = 1e-3
        c.logging.tensorboard = False  # tensorboardX imports torch: 3-4 s of each test run (test_metrics has it)
    else:
        raise ValueError(f"unknown variant {variant!r}: expected zephyr, handbook, demo or tiny")
    return c


def _small(c: ml_collections.ConfigDict, sft_workdir: str) -> None:
    """A tiny model on the embedded demo preferences (python -m zephyr_jax.demo make-data)."""
    c.model.path = sft_workdir
    c.model.dtype = "float32"
    c.model.remat = "none"
    c.dpo.reference_dtype = "float32"
    c.data.train = "demo_data/prefs"
    c.data.eval = "demo_data/prefs"
    c.data.max_length = 128
    c.data.max_prompt_length = 64
    c.train.eval_batch_size = 32
    c.mesh.shape = (-1, 1, 1)
