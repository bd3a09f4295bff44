"""Mistral-7B in Flax NNX."""

from zephyr_jax.model.config import MistralConfig
from zephyr_jax.model.kv_cache import KVCache
from zephyr_jax.model.mistral import Mistral

__all__ = ["MistralConfig", "Mistral", "KVCache"]
