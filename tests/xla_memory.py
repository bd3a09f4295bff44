"""Compiled temporary memory of a function, for tests that check what an implementation never materialises."""

import jax
import pytest


def temp_bytes(fn, *args) -> int:
    """XLA's temp_size_in_bytes of jit(fn) compiled for `args`; skips the test where the backend reports none."""
    compiled = jax.jit(fn).lower(*args).compile()
    try:
        analysis = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, jax.errors.JaxRuntimeError) as e:  # pragma: no cover
        pytest.skip(f"memory_analysis unavailable on {jax.default_backend()}: {e}")
    if analysis is None:  # pragma: no cover
        pytest.skip(f"memory_analysis returns None on {jax.default_backend()}")
    return analysis.temp_size_in_bytes
