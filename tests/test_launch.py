"""launch/tpu_pod.sh drives gcloud: checked with a stand-in gcloud that records its arguments; the XLA flags
launch/slurm_gpu.sbatch sets, with a stand-in srun. (The local and SLURM launchers run real training in
tests/test_train.py::test_two_processes_match_one_process.)"""

import os
import signal
import subprocess
import sys
import time

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
    # in a session of its own (a dropped ssh connection leaves it training), its output followed until it exits
    # (the log emptied first: tail neither finds it missing, which lost the exit status, nor shows the last run's)
    # (and not while a trainer runs there: a second `run` emptied its log and found the TPUs taken)
    trainer = "'^[^ ]*python[0-9.]* -m zephyr_jax[.]train --distributed'"
    assert command == ("cd zephyr_jax && if pgrep -f " + trainer + " >/dev/null; then echo \"a trainer is running "
                       "on $(hostname): launch/tpu_pod.sh wait (or stop) first\" >&2; exit 1; fi && "
                       ": >$HOME/zephyr_train.log && { setsid -w nohup "
                       "$HOME/zephyr_venv/bin/python -m zephyr_jax.train "
                       "--distributed --config=configs/dpo.py --workdir=/mnt/shared/dpo "
                       "--config.model.path=/mnt/shared/sft\\ dir >>$HOME/zephyr_train.log 2>&1 </dev/null & } "
                       "&& pid=$! && tail -n +1 -f --pid=$pid $HOME/zephyr_train.log && wait $pid")
    for sub, remote in (("wait", f"while pgrep -f {trainer}"), ("stop", f"pkill -TERM -f {trainer}")):
        out, argv = _tpu_pod(tmp_path, sub, TPU_NAME="zephyr", ZONE="us-central2-b")
        assert out.returncode == 0 and "--worker=all" in argv and argv[argv.index("--command") + 1].startswith(remote)
    # install: a Python 3.11 environment (the TPU VM images run 3.10, which current JAX does not support)
    out, argv = _tpu_pod(tmp_path, "install", TPU_NAME="zephyr", ZONE="us-central2-b")
    command = argv[argv.index("--command") + 1]
    assert out.returncode == 0 and "uv venv -p 3.11 $HOME/zephyr_venv" in command
    assert "uv pip install -p $HOME/zephyr_venv/bin/python -e '.[tpu]'" in command


def test_tpu_pod_stop_ends_the_trainers_and_run_returns_their_exit_status(tmp_path):
    """`run` attached, then `stop`: each worker's trainer saves and exits 75, and `run` returns 75 (stop's pattern
    also matched run's remote shell, so run died with 143); a second `run` meanwhile is refused. A stand-in gcloud
    runs each command under `bash -c` in a stand-in home (as sshd on each worker); the stand-in trainer is
    `python -m zephyr_jax.train` from it."""
    home = tmp_path / "home"
    (home / "zephyr_jax" / "zephyr_jax").mkdir(parents=True)
    (home / "zephyr_jax" / "zephyr_jax" / "__init__.py").write_text("")
    (home / "zephyr_jax" / "zephyr_jax" / "train.py").write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGTERM, lambda *_: (print('saved', flush=True), sys.exit(75)))\n"
        "print('training', flush=True)\n"
        "time.sleep(60)\n")
    (home / "venv" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, home / "venv" / "bin" / "python")
    env = _bash_c_gcloud(tmp_path, home, VENV=str(home / "venv"))
    run = subprocess.Popen(["bash", "launch/tpu_pod.sh", "run", "--", "--config=x"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, deadline = home / "zephyr_train.log", time.time() + 30
        while time.time() < deadline and not (log.exists() and "training" in log.read_text()):
            time.sleep(0.1)
        again = subprocess.run(["bash", "launch/tpu_pod.sh", "run", "--", "--config=x"], cwd=ROOT, env=env,
                               capture_output=True, text=True, timeout=30)  # refused: the log is kept
        assert again.returncode == 1 and "a trainer is running on" in again.stderr and "training" in log.read_text()
        stop = subprocess.run(["bash", "launch/tpu_pod.sh", "stop"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=30)
        assert stop.returncode == 0, stop.stderr
        out, _ = run.communicate(timeout=30)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 75 and out.split() == ["training", "saved"], (run.returncode, out)
    waited = subprocess.run(["bash", "launch/tpu_pod.sh", "wait"], cwd=ROOT, env=env, capture_output=True,
                            timeout=30)  # no trainer left: returns at once (its own shell does not match)
    assert waited.returncode == 0


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
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env['PATH']}"  # the stand-in gcloud, should the check let one by
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "create"], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode != 0 and "TPU_NAME" in out.stderr


def test_slurm_gpu_xla_flags_are_known_to_this_jaxlib(tmp_path):
    """launch/slurm_gpu.sbatch exports MaxText's GPU XLA flags unless XLA_FLAGS is set. XLA parses every backend's
    flags at start-up and aborts on one it does not know (a renamed flag would crash each GPU launch), so a
    stand-in srun starts JAX on the CPU under the script's environment."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nprintf "%s" "$XLA_FLAGS" > "$FLAGS_LOG"\n'
                                  'printf "%s\\n" "$@" > "$FLAGS_LOG.argv"\n'
                                  'exec python -c "import jax; jax.numpy.ones(3).sum().block_until_ready()"\n')
    (bin_dir / "srun").chmod(0o755)
    log = tmp_path / "flags"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FLAGS_LOG=str(log), JAX_PLATFORMS="cpu")
    out = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "--config=configs/sft.py"], cwd=ROOT,
                         capture_output=True, text=True, env={**env, "SLURM_CPUS_PER_TASK": "12"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # the job's CPUs per task passed on (SLURM 22.05-23.02's srun gave each task one CPU); lines tagged by task
    assert (tmp_path / "flags.argv").read_text().split("\n")[:3] == ["--kill-on-bad-exit=1", "--cpus-per-task=12",
                                                                     "--label"]
    flags = log.read_text().split()
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags and len(flags) == 12, flags

    out = subprocess.run(["bash", "launch/slurm_gpu.sbatch"], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "XLA_FLAGS": "--xla_dump_hlo_as_text"}, timeout=120)
    assert out.returncode == 0 and log.read_text() == "--xla_dump_hlo_as_text"  # the user's XLA_FLAGS win

    # A flags command that fails stops the job (`export X=$(cmd)` hid it: the job ran with no flags).
    (bin_dir / "python").write_text("#!/usr/bin/env bash\nexit 3\n")
    (bin_dir / "python").chmod(0o755)
    log.unlink()
    out = subprocess.run(["bash", "launch/slurm_gpu.sbatch"], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 3 and not log.exists()


def _shims(tmp_path, **scripts):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "LOG_DIR": str(tmp_path)}


def test_local_launcher_gives_each_process_its_gpus_and_waits_for_a_save_after_sigterm(tmp_path):
    """A stand-in `python` (train.py) reports its CUDA_VISIBLE_DEVICES, and on SIGTERM takes a second to "save" and
    exits 0: the launcher passes the signal on, waits for every process, and succeeds."""
    env = _shims(tmp_path, **{
        "nvidia-smi": 'for i in 0 1 2 3; do echo "GPU $i: NVIDIA H100 (UUID: GPU-$i)"; done\n',
        "python": 'echo "gpus=$CUDA_VISIBLE_DEVICES"; trap \'kill $nap; sleep 1; echo saved; exit 0\' TERM\n'
                  'sleep 30 & nap=$!; wait $nap\n'})
    env.pop("CUDA_VISIBLE_DEVICES", None)
    launcher = subprocess.Popen(["bash", "launch/local.sh", "2", "--", "--config=x"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=30)
    assert launcher.returncode == 0, err
    assert "gpus=0,1" in out and out.rstrip().endswith("saved")  # process 0 saved before the launcher returned
    log = (tmp_path / "process_1.log").read_text()
    assert "gpus=2,3" in log and "saved" in log
    out = subprocess.run(["bash", "launch/local.sh", "3", "--", "--config=x"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "do not split the 4 GPUs (0 1 2 3) evenly" in out.stderr
    for bad in ("0", "-1", "2x"):
        out = subprocess.run(["bash", "launch/local.sh", bad, "--", "--config=x"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and f"NUM_PROCESSES={bad} is not a positive number" in out.stderr
        out = subprocess.run(["bash", "launch/local.sh", "2", f"--cpu_devices={bad}", "--", "--config=x"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)  # XLA crashed on them
        assert out.returncode == 2 and f"--cpu_devices={bad} is not a positive number" in out.stderr


def test_local_launcher_splits_the_gpus_cuda_visible_devices_names(tmp_path):
    """GPUs already narrowed by CUDA_VISIBLE_DEVICES are split among the processes (each took all of them)."""
    env = _shims(tmp_path, python='echo "gpus=$CUDA_VISIBLE_DEVICES"\n')
    env["LOG_DIR"] = str(tmp_path / "logs" / "new")  # made by the launcher (process 1 could not start without it)
    out = subprocess.run(["bash", "launch/local.sh", "2", "--", "--config=x"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30, env={**env, "CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    assert out.returncode == 0, out.stderr
    assert "gpus=4,5" in out.stdout and "gpus=6,7" in (tmp_path / "logs" / "new" / "process_1.log").read_text()
    for none in ("-1", "NoDevFiles", ""):  # no GPU: nothing to split, every process keeps the setting
        out = subprocess.run(["bash", "launch/local.sh", "2", "--", "--config=x"], cwd=ROOT, capture_output=True,
                             text=True, timeout=30, env={**env, "CUDA_VISIBLE_DEVICES": none})
        assert out.returncode == 0 and f"gpus={none}\n" in out.stdout, (none, out.stderr)


def _bash_c_gcloud(tmp_path, home, **env):
    """The environment of a stand-in gcloud that runs `--command`'s text under `bash -c` in `home`, as sshd does on
    each worker."""
    shimmed = _shims(tmp_path, gcloud='while [[ $# -gt 0 && "$1" != --command ]]; do shift; done\n'
                                      'cd "$HOME" && exec bash -c "$2"\n')
    return {**shimmed, "HOME": str(home), "TPU_NAME": "z", "ZONE": "z", **env}


def test_tpu_pod_login_writes_the_token_where_huggingface_hub_reads_it_and_only_the_owner_can(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    token = "hf_a'b c$HOME\"`x`"  # quotes, a space and shell syntax arrive as they are
    env = _bash_c_gcloud(tmp_path, home, HF_TOKEN=token)
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "login"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    path = home / ".cache" / "huggingface" / "token"
    assert path.read_text() == token and (path.stat().st_mode & 0o777) == 0o600
    del env["HF_TOKEN"]
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "login"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0 and "set HF_TOKEN" in out.stderr


def test_local_launcher_inside_a_slurm_allocation_gives_each_process_its_share_of_the_gpus(tmp_path):
    """Inside `srun --pty bash` or an sbatch job, SLURM's variables are set; with SLURM_LOCALID among them JAX's
    cluster detection takes one GPU a process (jax.distributed.initialize's local_device_ids), so each process
    would keep only the first of its GPUs. A stand-in python prints what a process sees."""
    env = {**_shims(tmp_path, python='echo "gpus=$CUDA_VISIBLE_DEVICES localid=${SLURM_LOCALID-unset}"\n'),
           "CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "1",
           "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    out = subprocess.run(["bash", "launch/local.sh", "2", "--", "--config=x"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["gpus=0,1", "localid=unset"]
    assert (tmp_path / "process_1.log").read_text().split() == ["gpus=2,3", "localid=unset"]
