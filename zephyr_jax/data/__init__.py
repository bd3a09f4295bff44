"""The Zephyr data pipeline: sources -> (binarize) -> tokenized examples -> packed / padded batches -> loader."""

from zephyr_jax.data.batches import FIELDS, default_buckets, pack, pack_pairs, pad_sft
from zephyr_jax.data.errors import BadRow, SkipCounter
from zephyr_jax.data.loader import Loader
from zephyr_jax.data.pipeline import process_rows
from zephyr_jax.data.preference import PreferenceExample, preference_example
from zephyr_jax.data.sft import SFTExample, sft_example

__all__ = ["FIELDS", "BadRow", "Loader", "PreferenceExample", "SFTExample", "SkipCounter", "default_buckets",
           "pack", "pack_pairs", "pad_sft", "preference_example", "process_rows", "sft_example"]
