"""launch/tpu_pod.sh drives gcloud: checked with a stand-in gcloud that records its arguments; the XLA flags
launch/slurm_gpu.sbatch sets, with a stand-in srun. (The local and SLURM launchers run real training in
tests/test_train.py::test_two_processes_match_one_process.)"""

import os
import signal
import socket
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
    out, argv = _tpu_pod(tmp_path, "run", TPU_NAME="zephyr", ZONE="us-central2-b")  # no arguments: none passed
    assert out.returncode == 0 and "zephyr_jax.train --distributed >>" in argv[argv.index("--command") + 1]
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
    # A token file there before (written by hand, or by an older huggingface-cli login) ends mode 600: it kept 644
    path.write_text("hf_old")
    path.chmod(0o644)
    out = subprocess.run(["bash", "launch/tpu_pod.sh", "login"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
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


# --- What each launcher hands the trainers (stand-ins record it), and how local.sh combines their exit statuses. ---

_RECORD_ARGV = 'id=x; for a; do case $a in --process_id=*) id=${a#*=} ;; esac; done\n' \
               'printf "%s\\n" "$@" > "$LOG_DIR/argv_$id"\n' \
               'printf "%s\\n" "${JAX_PLATFORMS-unset}" "${XLA_FLAGS-unset}" > "$LOG_DIR/env_$id"\n' \
               'rc=RC_$id; exit "${!rc:-0}"\n'


def test_local_launcher_gives_each_process_its_rank_one_coordinator_and_the_args_verbatim(tmp_path):
    """Process i of N gets --process_id=i (0..N-1, each once), --num_processes=N, the one coordinator address every
    process dials, and the training arguments exactly as given (a workdir with a space stays one argument);
    --cpu_devices=K reaches each process's JAX (exported, not a shell variable of the launcher)."""
    env = _shims(tmp_path, python=_RECORD_ARGV)
    for var in ("JAX_PLATFORMS", "XLA_FLAGS", "COORDINATOR_PORT"):
        env.pop(var, None)
    train_args = ["--config=configs/sft.py:tiny", f"--workdir={tmp_path / 'a dir' / 'w'}", "--config.seed=3"]
    out = subprocess.run(["bash", "launch/local.sh", "3", "--cpu_devices=2", "--", *train_args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argvs = [(tmp_path / f"argv_{i}").read_text().splitlines() for i in range(3)]
    coordinators = {a[2] for a in argvs}
    assert len(coordinators) == 1 and next(iter(coordinators)).startswith("--coordinator_address=localhost:")
    coordinator = next(iter(coordinators))
    for i, argv in enumerate(argvs):
        assert argv == ["-m", "zephyr_jax.train", coordinator, "--num_processes=3", f"--process_id={i}",
                        *train_args], argv
        assert (tmp_path / f"env_{i}").read_text().splitlines() == [
            "cpu", "--xla_force_host_platform_device_count=2"]
    # The caller's XLA_FLAGS are kept, the device count after them (XLA takes a repeated flag's last value).
    out = subprocess.run(["bash", "launch/local.sh", "1", "--cpu_devices=2", "--", *train_args], cwd=ROOT,
                         env={**env, "XLA_FLAGS": "--xla_dump_hlo_as_text --xla_force_host_platform_device_count=8"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "env_0").read_text().splitlines() == ["cpu", "--xla_dump_hlo_as_text "
                                                              "--xla_force_host_platform_device_count=8 "
                                                              "--xla_force_host_platform_device_count=2"]
    out = subprocess.run(["bash", "launch/local.sh", "2", "--", "--config=x"], cwd=ROOT, capture_output=True,
                         text=True, env={**env, "COORDINATOR_PORT": "23456", "CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert out.returncode == 0, out.stderr
    for i in range(2):
        assert "--coordinator_address=localhost:23456" in (tmp_path / f"argv_{i}").read_text().splitlines()
    # A port something listens on is refused before any process starts (process 0's coordinator could not bind it,
    # and the others waited for it until JAX's initialization timed out); the launcher's own pick is free and
    # below Linux's ephemeral range, where outgoing connections take theirs.
    assert 20000 <= int(coordinator.rsplit(":", 1)[1]) < 32768
    with socket.create_server(("127.0.0.1", 0)) as taken:
        busy = str(taken.getsockname()[1])
        out = subprocess.run(["bash", "launch/local.sh", "2", "--", "--config=x"], cwd=ROOT, capture_output=True,
                             text=True, env={**env, "COORDINATOR_PORT": busy, "LOG_DIR": str(tmp_path / "busy")},
                             timeout=60)
    assert out.returncode == 2 and f"COORDINATOR_PORT={busy} is in use" in out.stderr
    assert not (tmp_path / "busy").exists()  # no process was started


def test_local_launcher_fails_if_any_process_fails_else_75_if_any_stopped_early(tmp_path):
    """The launcher's status is the job's: 1 if any process failed (whichever it is, and whatever the others did,
    a 75 included), else 75 if any stopped early after saving (so a dDPO stage chained on it does not start), else
    0. A stand-in python exits with RC_<process id>."""
    env = _shims(tmp_path, python=_RECORD_ARGV)
    env["CUDA_VISIBLE_DEVICES"] = ""  # no GPU to split
    cases = [({}, 0), ({"RC_1": "1"}, 1), ({"RC_0": "1"}, 1), ({"RC_2": "3"}, 1), ({"RC_1": "75"}, 75),
             ({"RC_0": "75", "RC_1": "75", "RC_2": "75"}, 75), ({"RC_0": "1", "RC_1": "75"}, 1),
             ({"RC_0": "75", "RC_2": "1"}, 1)]
    for rcs, expected in cases:
        out = subprocess.run(["bash", "launch/local.sh", "3", "--", "--config=x"], cwd=ROOT, capture_output=True,
                             text=True, env={**env, **rcs}, timeout=60)
        assert out.returncode == expected, (rcs, out.returncode, out.stderr)
        for key, rc in rcs.items():
            i = int(key[3:])
            if rc == "75":
                assert f"process {i} stopped early after saving (status 75)" in out.stderr
            else:
                assert f"process {i} failed with status {rc}" in out.stderr, out.stderr
                if i:
                    assert f"log: {tmp_path / f'process_{i}.log'}" in out.stderr


def _sbatch_directives(path):
    """The #SBATCH options as sbatch reads them: from the lines before the script's first command only."""
    options = {}
    for line in open(path).read().splitlines()[1:]:
        if line.strip() and not line.lstrip().startswith("#"):
            break
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].strip().partition("=")
            options[key] = value
    return options


def test_slurm_gpu_runs_one_distributed_trainer_per_gpu_with_the_args_verbatim(tmp_path):
    """srun starts `python -m zephyr_jax.train --distributed` with the sbatch arguments unchanged (a path with a
    space stays one argument) and the GPU memory fraction exported (the user's wins); the job asks for one task
    per GPU and a SIGTERM (train's saved stop) before its time limit, all read by sbatch (before any command)."""
    env = _shims(tmp_path, srun='printf "%s\\n" "$@" > "$LOG_DIR/argv"\n'
                                'printf "%s" "${XLA_PYTHON_CLIENT_MEM_FRACTION-unset}" > "$LOG_DIR/fraction"\n')
    for var in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "SLURM_CPUS_PER_TASK"):
        env.pop(var, None)
    env["XLA_FLAGS"] = "--x"
    args = ["--config=configs/sft.py", "--workdir=/shared/zephyr dir/sft", "--config.mesh.shape=(1,16,1)"]
    out = subprocess.run(["bash", "launch/slurm_gpu.sbatch", *args], cwd=ROOT, capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    assert argv[argv.index("python"):] == ["python", "-m", "zephyr_jax.train", "--distributed", *args], argv
    assert (tmp_path / "fraction").read_text() == "0.92"
    out = subprocess.run(["bash", "launch/slurm_gpu.sbatch", *args], cwd=ROOT, capture_output=True, text=True,
                         env={**env, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}, timeout=60)
    assert out.returncode == 0 and (tmp_path / "fraction").read_text() == "0.5"

    options = _sbatch_directives(os.path.join(ROOT, "launch", "slurm_gpu.sbatch"))
    assert options["--ntasks-per-node"] == options["--gpus-per-node"], options  # one process per GPU
    signal_name, _, seconds = options["--signal"].partition("@")
    assert signal_name in ("TERM", "SIGTERM") and int(seconds) > 0, options  # train saves on SIGTERM
    assert "--nodes" in options and "--time" in options


def test_tpu_pod_logs_follow_one_worker_export_runs_on_worker_0_and_delete_names_the_zone(tmp_path):
    out, argv = _tpu_pod(tmp_path, "logs", TPU_NAME="zephyr", ZONE="us-central2-b")
    assert out.returncode == 0 and argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "zephyr"]
    assert "--worker=0" in argv and "--worker=all" not in argv and argv[argv.index("--zone") + 1] == "us-central2-b"
    tail = argv[argv.index("--command") + 1].split()
    assert tail[0] == "tail" and "-f" in tail and tail[-1] == "$HOME/zephyr_train.log", tail  # follows `run`'s log
    # another worker's log: where an error found on that worker is printed (the others may end in an abort dump)
    out, argv = _tpu_pod(tmp_path, "logs", "3", TPU_NAME="zephyr", ZONE="us-central2-b")
    assert out.returncode == 0 and "--worker=3" in argv and "--worker=0" not in argv
    out, argv = _tpu_pod(tmp_path, "logs", "all", TPU_NAME="zephyr", ZONE="us-central2-b")
    assert out.returncode == 2 and "logs takes a worker number" in out.stderr and "'all'" in out.stderr
    # export: one process, on worker 0 alone (it starts no TPU, so no other host need join), the args verbatim
    out, argv = _tpu_pod(tmp_path, "export", "--", "--workdir=/mnt/shared/dpo", "--out=/mnt/shared/my model",
                         TPU_NAME="zephyr", ZONE="us-central2-b")
    assert out.returncode == 0 and argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "zephyr"]
    assert "--worker=0" in argv and "--worker=all" not in argv and argv[argv.index("--zone") + 1] == "us-central2-b"
    assert argv[argv.index("--command") + 1] == ("cd zephyr_jax && $HOME/zephyr_venv/bin/python -m zephyr_jax.export "
                                                 "--workdir=/mnt/shared/dpo --out=/mnt/shared/my\\ model")
    out, argv = _tpu_pod(tmp_path, "delete", TPU_NAME="zephyr", ZONE="us-central2-b")
    assert out.returncode == 0 and argv[:5] == ["compute", "tpus", "tpu-vm", "delete", "zephyr"]
    assert argv[argv.index("--zone") + 1] == "us-central2-b" and "--quiet" in argv  # no prompt


def test_tpu_pod_install_clones_then_updates_keeps_the_venv_and_stops_at_a_failed_step(tmp_path):
    """`install` run by sshd's `bash -c` in a stand-in home, with stand-ins for git and uv that record their calls:
    the first install clones and makes the venv; a second one pulls the checkout and reinstalls into the same venv
    (not a new one); a step that fails (the clone) fails the install before anything is installed."""
    home = tmp_path / "home"
    home.mkdir()
    calls = tmp_path / "calls"
    env = _bash_c_gcloud(tmp_path, home, CALLS=str(calls), REPO="https://example.invalid/fork.git")
    _shims(tmp_path,
           git='echo "git $*" >>"$CALLS"\n[[ -n "${GIT_FAIL:-}" ]] && exit 128\n'
               '[[ "$1" == clone ]] && mkdir -p "${@: -1}"\nexit 0\n',
           uv='echo "uv $* (in $(basename "$PWD"))" >>"$CALLS"\n'
              'if [[ "$1" == venv ]]; then mkdir -p "${@: -1}/bin" && touch "${@: -1}/bin/python" '
              '&& chmod +x "${@: -1}/bin/python"; fi\n')
    venv = home / "zephyr_venv"

    def install(**extra):
        calls.write_text("")
        out = subprocess.run(["bash", "launch/tpu_pod.sh", "install"], cwd=ROOT, env={**env, **extra},
                             capture_output=True, text=True, timeout=60)
        return out, calls.read_text().splitlines()

    out, first = install()
    assert out.returncode == 0, out.stderr
    assert first[0] == "git clone https://example.invalid/fork.git zephyr_jax", first
    assert f"uv venv -p 3.11 {venv} (in zephyr_jax)" in first
    assert first[-1] == f"uv pip install -p {venv}/bin/python -e .[tpu] (in zephyr_jax)", first
    out, second = install()
    assert out.returncode == 0, out.stderr
    assert second == ["git pull", f"uv pip install -p {venv}/bin/python -e .[tpu] (in zephyr_jax)"], second
    (home / "zephyr_jax").rmdir()
    out, failed = install(GIT_FAIL="1")
    assert out.returncode != 0 and failed == ["git clone https://example.invalid/fork.git zephyr_jax"], failed


def _readme_blocks():
    text = open(os.path.join(ROOT, "launch", "README.md")).read()
    return [b.split("\n", 1)[1] for b in text.split("```")[1::2] if b.startswith("bash\n")]


def _flag(argv, name):
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_readme_recipes_chain_ddpo_on_the_finished_dsft_workdir(tmp_path):
    """launch/README.md's recipes, run as written with stand-ins for sbatch, python and launch/tpu_pod.sh that
    record their arguments: each dDPO starts from the dSFT workdir launched before it (model.path), only once
    that dSFT has finished (SLURM: afterok on its job id, which a dSFT stopped with status 75 never satisfies;
    TPU: `wait` between the two), and the export reads the dDPO workdir (TPU: after a `wait`, on worker 0)."""
    from zephyr_jax import hf

    blocks = _readme_blocks()
    assert blocks
    record = 'printf "%s\\x1f" "$(basename "$0")" "$@" >>"$CALLS"; echo >>"$CALLS"\n'
    env = _shims(tmp_path, sbatch=record + '[[ " $* " == *" --parsable "* ]] && echo 4242\nexit 0\n',
                 python=record, hf=record)
    (tmp_path / "cwd" / "launch").mkdir(parents=True)
    (tmp_path / "cwd" / "launch" / "tpu_pod.sh").write_text("#!/usr/bin/env bash\n" + record)
    (tmp_path / "cwd" / "launch" / "tpu_pod.sh").chmod(0o755)
    calls = tmp_path / "calls"
    chained = downloads = exports = 0
    for block in blocks:
        calls.write_text("")
        out = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path / "cwd", capture_output=True,
                             text=True, env={**env, "CALLS": str(calls)}, timeout=60)
        assert out.returncode == 0, (block, out.stderr)
        runs = [line.split("\x1f")[:-1] for line in calls.read_text().splitlines()]
        sft_workdir = dpo_workdir = sft_job = None
        waited = False
        for argv in runs:
            program, args = argv[0], argv[1:]
            if program == "tpu_pod.sh" and args[:1] == ["wait"]:
                waited = True
            launch = program == "sbatch" or (program == "tpu_pod.sh" and args[:1] == ["run"])
            configs = [a for a in args if a.startswith("--config=")] if launch else []
            if configs == ["--config=configs/sft.py"]:
                sft_workdir, waited = _flag(args, "workdir"), False
                if program == "sbatch":
                    assert "--parsable" in args
                    sft_job = "4242"
            elif configs == ["--config=configs/dpo.py"]:
                assert sft_workdir is not None, block
                assert _flag(args, "config.model.path") == sft_workdir, args
                dpo_workdir = _flag(args, "workdir")
                assert dpo_workdir != sft_workdir
                if program == "sbatch":
                    assert _flag(args, "dependency") == f"afterok:{sft_job}", args
                else:
                    assert waited, args
                chained, waited = chained + 1, False
            elif args[:2] == ["-m", "zephyr_jax.export"] or (program == "tpu_pod.sh" and args[:1] == ["export"]):
                assert _flag(args, "workdir") == dpo_workdir, args
                assert program != "tpu_pod.sh" or waited, args  # dDPO's final step
                exports += 1
            elif program == "hf" and "--repo-type" not in args:  # the weights fetched to shared storage
                included = [args[i + 1] for i, a in enumerate(args) if a == "--include"]
                assert sorted(included) == sorted(hf.HUB_PATTERNS), args  # the files training reads
                downloads += 1
    assert chained == exports == 3  # 16 A100s, the large TPU pods, the one-host slices
    assert downloads == 1
