"""The devices a program is compiled for, with or without having them: a TPU slice (libtpu compiles for one on a
CPU-only machine), NVIDIA GPUs (JAX's CUDA plugin compiles from a device description, no GPU or driver needed), or
this job's own devices. The planner (plan.py) compiles the train step for them; bench/decode_compile.py and
bench/engine_mesh_compile.py compile the engine's decode step.

    target_for("v5e-64") / target_for("h100-8") / target_for("local") -> Target(name, devices, hbm_bytes, peak_flops)
"""

from __future__ import annotations

import contextlib
import dataclasses
import os

import jax

from zephyr_jax.metrics import PEAK_FLOPS, peak_flops

GiB = 1024 ** 3

# ---------------------------------------------------------------------------------------------------------
# TPU slices. Names follow Cloud TPU's: v4-N and v5p-N count TensorCores (two per chip, one JAX device per chip
# in megacore mode), v5e-N and v6e-N count chips. HBM is what XLA:TPU (libtpu 0.0.42) lets a program use per
# chip, as its out-of-memory errors state it; dense bf16 peaks are the data sheets'.


@dataclasses.dataclass(frozen=True)
class Chip:
    prefix: str  # libtpu's topology prefix
    chip_config: str  # "megacore": one device per chip (two TensorCores)
    cores_in_name: int  # how many of the name's count one chip is
    hbm_bytes: int
    peak_flops: float
    shapes: dict  # chips -> physical topology


_TWO_D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
_THREE_D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
            512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16"}
CHIPS = {
    "v4": Chip("v4", "megacore", 2, int(30.75 * GiB), PEAK_FLOPS["tpu v4"], _THREE_D),
    "v5e": Chip("v5e", "default", 1, int(15.75 * GiB), PEAK_FLOPS["tpu v5e"], _TWO_D),
    "v5p": Chip("v5", "megacore", 2, int(95.74 * GiB), PEAK_FLOPS["tpu v5p"], _THREE_D),
    "v6e": Chip("v6e", "default", 1, int(31.25 * GiB), PEAK_FLOPS["tpu v6e"], _TWO_D),
}


def known_topologies() -> list[str]:
    return [f"{gen}-{chips * chip.cores_in_name}" for gen, chip in CHIPS.items() for chips in chip.shapes]


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    devices: list
    hbm_bytes: int | None  # per chip; None where unknown (CPU devices)
    peak_flops: float | None  # per chip


def tpu_target(name: str) -> Target:
    """"v5e-64" -> 64 abstract v5e chips (an 8x8 slice) that XLA:TPU can compile for without a TPU."""
    gen, _, count = name.partition("-")
    chip = CHIPS.get("v5e" if gen == "v5litepod" else gen)  # v5litepod-N: Cloud TPU's accelerator type for v5e
    chips = int(count) // chip.cores_in_name if chip and count.isdigit() else None
    if chip is None or chips not in chip.shapes or int(count) % chip.cores_in_name:
        raise ValueError(f"unknown TPU topology {name!r}; known: {', '.join(known_topologies())} "
                         f"(GPUs: {', '.join(known_gpu_topologies()[:4])}, ...; or 'local' for this job's own "
                         "devices)")
    quiet_libtpu(name)
    # Hosts of 4 chips, but v5e-8 and v6e-8 are one host of 8 (Cloud TPU's v5litepod-8, v6e-8): planned as two,
    # they compiled for two processes.
    per_host = (2, 4, 1) if chips == 8 and chip.shapes is _TWO_D else (2, 2, 1) if chips >= 4 else (1, 1, 1)
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{chip.prefix}:{chip.shapes[chips]}", chip_config_name=chip.chip_config,
            chips_per_host_bounds=per_host, num_slices=1)
    except Exception as e:  # no libtpu: say how to get it
        raise RuntimeError(f"compiling for {name} needs libtpu (pip install -e .[tpu]): {e}") from e
    return Target(name, list(desc.devices), chip.hbm_bytes, chip.peak_flops)


def quiet_libtpu(name: str) -> None:
    """Compiling for a slice from a machine that is not in it: the environment a TPU VM of that slice would have,
    so libtpu does not look for TPU metadata and hosts (it warns at length otherwise), and several processes may
    load libtpu at once. Variables already set are kept."""
    gen, _, count = name.partition("-")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{'v5litepod' if gen == 'v5e' else gen}-{count}")


# ---------------------------------------------------------------------------------------------------------
# NVIDIA GPUs, compiled for without one: XLA:GPU takes the device's description (a GpuTargetConfig) in place of a
# local GPU. "h100-8" is one host of 8 GPUs; more than 8 are hosts of 8. Memory is nvidia-smi's total; a program
# may use XLA_PYTHON_CLIENT_MEM_FRACTION of it (JAX's default 0.75: set the fraction the run will use). Bandwidth:
# the SXM data sheets'.


@dataclasses.dataclass(frozen=True)
class Gpu:
    description: str
    capability: tuple[int, int]
    multiprocessors: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    l2_bytes: int
    bandwidth: float  # bytes/s
    clock_ghz: float
    memory_bytes: int


GPUS = {  # the peak FLOP/s are metrics.PEAK_FLOPS', under the same names
    "a100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 108, 167936, 166912, 40 * 2 ** 20, 2.039e12, 1.41, 81920 * 2 ** 20),
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 132, 233472, 232448, 50 * 2 ** 20, 3.35e12, 1.98, 81559 * 2 ** 20),
    "h200": Gpu("NVIDIA H200", (9, 0), 132, 233472, 232448, 60 * 2 ** 20, 4.8e12, 1.98, 143771 * 2 ** 20),
}
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def gpu_target_config(gpu: Gpu) -> str:
    """The device description XLA:GPU compiles for (xla.gpu.GpuTargetConfigProto, text format)."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {gpu.shared_memory_per_core} threads_per_core_limit: 2048
  core_count: {gpu.multiprocessors} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(gpu.bandwidth)} l2_cache_size: {gpu.l2_bytes} clock_rate_ghz: {gpu.clock_ghz}
  device_memory_size: {gpu.memory_bytes} shared_memory_per_block_optin: {gpu.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {gpu.capability[0]} minor: {gpu.capability[1]} }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{gpu.description}"
"""


def gpu_target(name: str) -> Target:
    """"h100-16" -> 16 abstract H100s (2 hosts of 8) that XLA:GPU can compile for without a GPU."""
    kind, _, count = name.partition("-")
    gpu, n = GPUS.get(kind), int(count) if count.isdigit() else 0
    if gpu is None or n not in GPU_COUNTS:
        raise ValueError(f"unknown GPU topology {name!r}; known: {', '.join(known_gpu_topologies())}")
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver to check the CUDA libraries against
    try:
        from jax.experimental import topologies

        desc = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(gpu),
                                            topology=f"1x{max(n // 8, 1)}x{min(n, 8)}")
    except Exception as e:  # no CUDA plugin: say how to get it
        raise RuntimeError(f"compiling for {name} needs JAX's CUDA plugin (pip install -e .[gpu]): {e}") from e
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    return Target(name, list(desc.devices), int(fraction * gpu.memory_bytes), PEAK_FLOPS[kind])


def known_gpu_topologies() -> list[str]:
    return [f"{kind}-{n}" for kind in GPUS for n in GPU_COUNTS]


@contextlib.contextmanager
def cudnn_checks_for(target: Target):
    """JAX's cuDNN attention asks the first *local* GPU for its compute capability while tracing; compiling for a
    GPU topology from a host without one, it gets the target's instead (nothing else is patched)."""
    device = target.devices[0]
    if device.platform != "gpu" or target.name.startswith("local"):
        yield
        return
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    have = tuple(int(x) for x in str(device.compute_capability).split("."))
    saved = cudnn.check_compute_capability, cudnn.is_cuda_compute_capability_equal
    cudnn.check_compute_capability = lambda c: have >= tuple(int(x) for x in c.split("."))
    cudnn.is_cuda_compute_capability_equal = lambda c: have == tuple(int(x) for x in c.split("."))
    try:
        yield
    finally:
        cudnn.check_compute_capability, cudnn.is_cuda_compute_capability_equal = saved


def target_for(topology: str) -> Target:
    """"local", a TPU slice ("v5e-64") or GPUs ("h100-8")."""
    if topology == "local":
        return local_target()
    return gpu_target(topology) if topology.partition("-")[0] in GPUS else tpu_target(topology)


def local_target() -> Target:
    devices = jax.devices()
    hbm = (devices[0].memory_stats() or {}).get("bytes_limit") if devices[0].platform != "cpu" else None
    return Target(f"local ({len(devices)} x {devices[0].device_kind})", devices, hbm, peak_flops(devices[0]))
