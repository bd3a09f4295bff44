"""zephyr_jax: Zephyr-7B (distilled SFT + AI feedback + distilled DPO on Mistral-7B) in JAX/Flax.

    model, tok = zephyr_jax.load("HuggingFaceH4/zephyr-7b-beta")   # or a HF directory, or a training workdir

`load` (zephyr_jax/loading.py) is imported on first use, so `import zephyr_jax` stays cheap.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "load":
        from zephyr_jax.loading import load

        return load
    raise AttributeError(f"module 'zephyr_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), "load"])
