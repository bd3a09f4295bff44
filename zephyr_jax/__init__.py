"""zephyr_jax: Zephyr-7B (distilled SFT + AI feedback + distilled DPO on Mistral-7B) in JAX/Flax."""

__version__ = "0.1.0"
