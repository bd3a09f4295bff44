"""XLA_FLAGS for the tests' CPU devices, for the test process and the subprocesses it starts.

The suite's models are tiny, so compiling is most of its time on a machine whose compilation cache is empty, as
CI's is (the whole suite took ~1,790 s there without these flags, ~1,100 s with a warm cache; ~1,100 s cold with
them and conftest's persistent-cache setting). XLA:CPU's older elemental emitters compile a
tiny model's programs ~30% faster than its MLIR fusion emitters (bench: 13.7 s -> 9.6 s of backend compile for
generation and train-step programs of three sizes), with the same results in every test. LLVM at -O0 or -O1 would
compile faster still, but changes float32 rounding (two DPO steps then differ from TRL's by 1.04e-4 > 1e-4): not
used.

Under `pytest -n N` with a worker for each core (README's command), each worker's XLA computes on one thread, and
torch on one (conftest): two workers' thread pools had spun against each other. Side by side, two copies of
test_packing took 53.6 s with XLA's threads, 48.9 s without; two of the TRL DPO comparisons 67 s with torch's, 49 s
without. The whole suite: 1,383 -> 1,303 s on 2 cores, with test_demo's run on one device.
"""

import os
import subprocess
import sys

FAST_COMPILE = ("--xla_cpu_use_fusion_emitters=false",)
ONE_THREAD = ("--xla_cpu_multi_thread_eigen=false",)
_KNOWN = "ZEPHYR_JAX_TEST_XLA_FLAGS_KNOWN"  # "1"/"0": the probe's answer, inherited by xdist workers and subprocesses


def known(flags: tuple[str, ...]) -> tuple[str, ...]:
    """flags where this jaxlib's XLA knows FAST_COMPILE and ONE_THREAD; () where it does not (an unknown flag in
    XLA_FLAGS aborts the process at its first computation, so another jaxlib must not end the suite)."""
    if _KNOWN not in os.environ:
        probe = subprocess.run([sys.executable, "-c", "import jax; jax.jit(lambda x: x + 1)(1.0)"],
                               env={**os.environ, "JAX_PLATFORMS": "cpu",
                                    "XLA_FLAGS": " ".join(FAST_COMPILE + ONE_THREAD)},
                               capture_output=True, timeout=120)
        os.environ[_KNOWN] = "1" if probe.returncode == 0 else "0"
    return flags if os.environ[_KNOWN] == "1" else ()


def one_thread_flags() -> tuple[str, ...]:
    """ONE_THREAD where pytest-xdist runs a worker for each core (its workers' environment says how many)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return known(ONE_THREAD) if workers >= (os.cpu_count() or 1) else ()


def flags(devices: int) -> str:
    """XLA_FLAGS giving `devices` CPU devices, compiling and computing as fast as the tests do."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *known(FAST_COMPILE),
                     *one_thread_flags()))
