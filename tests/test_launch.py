"""launch/tpu_pod.sh drives gcloud: checked with a stand-in gcloud that records its arguments; the XLA flags
launch/slurm_gpu.sbatch sets, with a stand-in srun. (The local and SLURM launchers run real training in
tests/test_train.py::test_two_processes_match_one_process.)"""

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tpu_pod(tmp_path, *args, **env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$GCLOUD_LOG"\n')
    (bin_dir / "gcloud").chmod(0o755)
    log = tmp_path / "gcloud.log"
    full_env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "GCLOUD_LOG": str(log), **env}
    out = subprocess.run(["bash", "launch/tpu_pod.sh", *args], cwd=ROOT, capture_output=True, text=True,
                         env=full_env, timeout=60)
    return out, (log.read_text().splitlines() if log.exists() else [])


def test_tpu_pod_runs_the_training_command_on_every_worker(tmp_path):
    out, argv = _tpu_pod(tmp_path, "run", "--", "--config=configs/dpo.py", "--workdir=/mnt/shared/dpo",
                         "--config.model.path=/mnt/shared/sft dir", TPU_NAME="zephyr", ZONE="us-central2-b")
    assert out.returncode == 0, out.stderr
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "zephyr"]
    assert "--worker=all" in argv and argv[argv.index("--zone") + 1] == "us-central2-b"
    command = argv[argv.index("--command") + 1]
    assert command == ("cd zephyr_jax && python -m zephyr_jax.train --distributed --config=configs/dpo.py "
                       "--workdir=/mnt/shared/dpo --config.model.path=/mnt/shared/sft\\ dir ")  # quoted for ssh


def test_tpu_pod_create_and_usage_errors(tmp_path):
    out, argv = _tpu_pod(tmp_path, "create", TPU_NAME="zephyr", ZONE="us-central2-b", ACCELERATOR="v5litepod-64")
    assert out.returncode == 0 and argv[:5] == ["compute", "tpus", "tpu-vm", "create", "zephyr"]
    assert argv[argv.index("--accelerator-type") + 1] == "v5litepod-64"
    # the software version follows the generation unless VERSION is set
    assert argv[argv.index("--version") + 1] == "v2-alpha-tpuv5-lite"
    for accelerator, version in (("v4-8", "tpu-ubuntu2204-base"), ("v5p-32", "v2-alpha-tpuv5"),
                                 ("v6e-16", "v2-alpha-tpuv6e")):
        _, argv = _tpu_pod(tmp_path, "create", TPU_NAME="z", ZONE="z", ACCELERATOR=accelerator)
        assert argv[argv.index("--version") + 1] == version, accelerator
    _, argv = _tpu_pod(tmp_path, "create", TPU_NAME="z", ZONE="z", ACCELERATOR="v4-8", VERSION="my-image")
    assert argv[argv.index("--version") + 1] == "my-image"
    out, _ = _tpu_pod(tmp_path, "resize", TPU_NAME="zephyr", ZONE="us-central2-b")
    assert out.returncode == 2 and "usage" in out.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE")}
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "create"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode != 0 and "TPU_NAME" in out.stderr


def test_slurm_gpu_xla_flags_are_known_to_this_jaxlib(tmp_path):
    """launch/slurm_gpu.sbatch exports MaxText's GPU XLA flags unless XLA_FLAGS is set. XLA parses every backend's
    flags at start-up and aborts on one it does not know (a renamed flag would crash each GPU launch), so a
    stand-in srun starts JAX on the CPU under the script's environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s" "$XLA_FLAGS" > "$FLAGS_LOG"\n'
                                  'exec python -c "import jax; jax.numpy.ones(3).sum().block_until_ready()"\n')
    (bin_dir / "srun").chmod(0o755)
    log = tmp_path / "flags"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FLAGS_LOG=str(log), JAX_PLATFORMS="cpu")
    out = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "--config=configs/sft.py"], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    flags = log.read_text().split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and len(flags) == 12, flags

    out = subprocess.run(["bash", "launch/slurm_gpu.sbatch"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "XLA_FLAGS": "--xla_dump_hlo_as_text"}, timeout=120)
    assert out.returncode == 0 and log.read_text() == "--xla_dump_hlo_as_text"  # the user's XLA_FLAGS win
