"""Several processes, as on a pod: batch rows placed by global index under a pod-like device order, and a
coordinated preemption through launch/local.sh. Tiny configs on CPU devices (the processes talk over loopback)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tests import cpu_xla
from tests.test_serve import _free_port
from tests.test_train import _params, split_records, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = {"JAX_PLATFORMS": "cpu"}


def _local_sh(num_processes, cpu_devices, log_dir, *train_args, **popen):
    env = {**os.environ, **CPU, "LOG_DIR": str(log_dir)}
    # A session of its own, so that a run that times out is killed with its trainers (_finish).
    return subprocess.Popen(["bash", "launch/local.sh", str(num_processes), f"--cpu_devices={cpu_devices}", "--",
                             *train_args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, **popen)


def _finish(proc, timeout=300):
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc.returncode, out


# --- A process's devices need not hold a contiguous block of the batch: rows go by global index. ---

@pytest.mark.long
def test_interleaved_processes_match_one_process(data_dir, tmp_path):
    """2 processes x 4 devices, with the mesh's device order alternating between the processes (process 0 holds
    batch rows 0, 2, 4, ...), give the losses, precomputed reference log-probs and eval metrics of 1 process x 8
    devices. IPO's length normalisation and eval's filler rows (8 eval pairs in a batch of 32) are both exercised."""
    args = ["--config=configs/dpo.py:tiny", f"--config.data.train={data_dir / 'prefs'}",
            f"--config.data.eval={data_dir / 'prefs'}", "--config.train.max_steps=3", "--config.train.eval_every=2",
            "--config.train.save_every=0", "--config.train.progress=False",
            "--config.mesh.shape=(8,1,1)", "--config.mesh.device_order=interleave_processes",
            "--config.dpo.precompute_reference=True", "--config.dpo.loss_type=ipo"]
    multi = _local_sh(2, 4, tmp_path, f"--workdir={tmp_path / 'two'}", *args)
    code, out = _finish(multi)
    assert code == 0, out[-3000:] + (tmp_path / "process_1.log").read_text()[-3000:]
    single = subprocess.run([sys.executable, "-m", "zephyr_jax.train", f"--workdir={tmp_path / 'one'}", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, **CPU, "XLA_FLAGS": cpu_xla.flags(8)})
    assert single.returncode == 0, single.stderr[-3000:]

    two, one = tmp_path / "two", tmp_path / "one"
    for split in ("train", "eval"):
        a, b = split_records(two, split), split_records(one, split)
        assert [r["step"] for r in a] == [r["step"] for r in b] and a
        for ra, rb in zip(a, b):
            for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"):
                np.testing.assert_allclose(ra[key], rb[key], rtol=1e-5, atol=1e-6, err_msg=f"{split} {key}")
    for name in sorted(os.listdir(one / "reference_logps")):
        ours, theirs = np.load(two / "reference_logps" / name), np.load(one / "reference_logps" / name)
        assert ours.shape == theirs.shape and ours.shape[1] == 2
        np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    assert sorted(os.listdir(two / "reference_logps")) == sorted(os.listdir(one / "reference_logps"))


def _two_hosts(tmp_path, *train_args) -> list:
    """Two trainers of one job, each started in its own folder tmp_path/host{i} (as two hosts with their own
    disks; relative paths resolve there), 1 CPU device each: [(process, its stderr)] when both have ended."""
    port, procs = _free_port(), []
    for i in range(2):
        (tmp_path / f"host{i}").mkdir(exist_ok=True)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "zephyr_jax.train", f"--config={ROOT}/configs/sft.py:tiny", *PREEMPT_ARGS[1:],
             *train_args, f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
            cwd=tmp_path / f"host{i}", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **CPU, "PYTHONPATH": ROOT, "XLA_FLAGS": cpu_xla.flags(1)}))
    try:
        errors = [p.communicate(timeout=180)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return list(zip(procs, errors))


def test_a_workdir_the_processes_do_not_share_is_refused_at_once(data_dir, tmp_path):
    """The same relative --workdir from two directories (as two hosts with their own disks): both processes stop
    with the error before training (orbax's first save waited 10 minutes for process 0's directory, then hung)."""
    for p, err in _two_hosts(tmp_path, "--workdir=w", *_data_args(data_dir)):
        assert p.returncode != 0 and "--workdir=w is not shared: processes [1] do not see" in err, err[-3000:]
    assert not os.path.exists(tmp_path / "host0" / "w" / "checkpoints")


def test_an_eval_split_that_differs_between_processes_is_refused_at_once(data_dir, tmp_path):
    """A relative data.eval read from each host's own disk, one copy stale (an answer changed): each process builds
    its rows of every eval batch from its own copy, so the metrics were a silent mix of the two. Both processes stop
    with the error before training, as for the training split."""
    rows = (data_dir / "sft" / "test_sft.jsonl").read_text().splitlines(keepends=True)
    stale = json.loads(rows[-1])
    stale["messages"][-1]["content"] += "0"
    for i, copy in enumerate((rows, rows[:-1] + [json.dumps(stale) + "\n"])):
        (tmp_path / f"host{i}" / "ev").mkdir(parents=True)
        (tmp_path / f"host{i}" / "ev" / "test_sft.jsonl").write_text("".join(copy))
    for p, err in _two_hosts(tmp_path, f"--workdir={tmp_path / 'w'}", f"--config.data.train={data_dir / 'sft'}",
                             "--config.data.eval=ev"):
        assert p.returncode != 0 and "processes [1] hold other eval examples than process 0" in err, err[-3000:]
    assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_an_error_on_one_process_ends_every_process_soon_and_is_printed(data_dir, tmp_path):
    """Data that only host 0 has: process 1 fails while process 0 waits for it in a collective. Both exit non-zero
    within a minute, process 1 printing its error (they hung for minutes in jax.distributed's shutdown, then
    aborted with a dump that named no cause)."""
    (tmp_path / "host0").mkdir()
    os.symlink(data_dir / "sft", tmp_path / "host0" / "d")
    start = time.monotonic()
    (p0, err0), (p1, err1) = _two_hosts(tmp_path, f"--workdir={tmp_path / 'w'}", "--config.data.train=d",
                                        "--config.data.eval=d")
    assert time.monotonic() - start < 120 and p0.returncode == p1.returncode == 1, err0[-2000:] + err1[-2000:]
    assert "'d' is not a local path" in err1 and "process 1 of 2 failed: exiting now" in err1, err1[-3000:]


# Each of 2 processes (2 CPU devices each) reads a Hugging Face folder onto a mesh over all 4 devices: argv[1]
# (the same folder), then argv[2 + process] (its own copy). It prints the most bytes one all-gather took.
_READ_WEIGHTS = """
import sys
import jax
import numpy as np
jax.distributed.initialize(f"127.0.0.1:{sys.argv[4]}", 2, int(sys.argv[5]))
from flax import nnx
from jax.experimental import multihost_utils
from zephyr_jax.loading import load_model
from zephyr_jax.sharding import make_mesh
gathered, allgather = [0], multihost_utils.process_allgather
def counted(tree, tiled=False):
    gathered.append(sum(int(np.asarray(x).nbytes) for x in jax.tree.leaves(tree)))
    return allgather(tree, tiled)
multihost_utils.process_allgather = counted
model = load_model(sys.argv[1], "float32", make_mesh((1, -1, 1)))
local = load_model(sys.argv[1], "float32")  # on this process's default device
for ours, whole in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(local))):
    for shard in ours.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), np.asarray(whole)[shard.index])
print("largest all-gather:", max(gathered), "bytes", flush=True)
from zephyr_jax.model.kv_cache import KVCache
(device,) = KVCache.init(local.config, 1, 8).k.sharding.device_set  # an engine's cache beside uncommitted weights
print("cache on process", device.process_index, flush=True)
from zephyr_jax.model import kv_cache
def free(device):  # each process checks the memory of its own devices only (another's memory_stats is not its)
    assert device.process_index == jax.process_index(), device
    return 2 ** 40
kv_cache.free_device_bytes = free
whole = jax.sharding.NamedSharding(make_mesh((1, -1, 1)), jax.sharding.PartitionSpec(None, "fsdp"))
shards = KVCache.init(local.config, 4, 8, sharding=whole).k.addressable_shards
print("global cache shards here:", len(shards), flush=True)
try:
    load_model(sys.argv[2 + jax.process_index()], "float32", make_mesh((1, -1, 1)))
except ValueError as e:
    print("own copies:", e, flush=True)
"""


def test_weights_read_over_processes_gather_no_parameter_and_copies_that_differ_are_named(tiny_model_dir, tmp_path):
    """A Hugging Face checkpoint read onto a mesh over 2 processes: each process places the shards its devices hold
    (jax.device_put of the host copy first all-gathered the whole parameter from every process onto every device to
    compare them: 7.5 GB float32 of Mistral-7B's stacked MLP weights times the processes on each chip); host copies
    that differ (a stale copy of the folder on one host) are still refused, naming the parameter."""
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    with open(other / "model.safetensors", "r+b") as f:  # the last value of the last tensor, changed
        f.seek(-4, os.SEEK_END)
        f.write(np.float32(7.0).tobytes())
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-c", _READ_WEIGHTS, tiny_model_dir, tiny_model_dir, str(other),
                               str(port), str(i)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, env={**os.environ, **CPU, "XLA_FLAGS": cpu_xla.flags(2)})
             for i in range(2)]
    try:
        outs = [p.communicate(timeout=90)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "largest all-gather:" in out, out[-3000:]
        assert int(out.split("largest all-gather:")[1].split()[0]) <= 64, out[-3000:]  # digests, not weights
        assert f"cache on process {procs.index(p)}" in out, out[-3000:]  # (was process 0's device on both)
        assert "global cache shards here: 2" in out, out[-3000:]  # (it asked another process's devices too)
        assert "own copies: parameter " in out and "differs between processes [1] and process 0" in out, out[-3000:]


def test_a_differing_split_is_named_in_its_own_units(monkeypatch):
    """The error counts what each process holds: examples, or, for packed dSFT training, packed rows (one process
    here, the other process's digest differing)."""
    from zephyr_jax import train
    from zephyr_jax.data.batches import PackedRow

    def other_process_differs(mine):
        return np.stack([mine, np.where(np.arange(mine.shape[1]) == 0, mine ^ 1, mine)])

    monkeypatch.setattr(train.multihost_utils, "process_allgather", other_process_differs)
    rows = [PackedRow((), 64)] * 3
    with pytest.raises(ValueError, match=r"processes \[1\] hold other training examples than process 0 \(this one, "
                                         r"process 0: 3 packed rows, digest 00112233"):
        train.check_same_examples_everywhere({"training": (rows, "00112233" * 4)})
    with pytest.raises(ValueError, match=r"hold other eval examples .*: 2 examples, digest"):
        train.check_same_examples_everywhere({"eval": (["a", "b"], "ff" * 16)})
    # Each split against its own digest on process 0: one that differs after one that agrees is found too.
    monkeypatch.setattr(train.multihost_utils, "process_allgather",
                        lambda mine: np.stack([mine, np.concatenate([mine[:1], mine[1:] ^ 1])]))
    with pytest.raises(ValueError, match=r"processes \[1\] hold other eval examples .*: 2 examples, digest ff"):
        train.check_same_examples_everywhere({"training": (rows, "00112233" * 4), "eval": (["a", "b"], "ff" * 16)})


# --- SIGTERM to one process: every process saves the same step and exits 75; the resumed run is exact. ---

def _python_children(proc):
    return [p for p in psutil.Process(proc.pid).children(recursive=True) if "zephyr_jax.train" in " ".join(
        p.cmdline())]


PREEMPT_ARGS = ["--config=configs/sft.py:tiny", "--config.train.max_steps=12", "--config.train.save_every=0",
                "--config.train.eval_every=0", "--config.train.progress=False"]


def _data_args(data_dir):
    return [f"--config.data.train={data_dir / 'sft'}", f"--config.data.eval={data_dir / 'sft'}"]


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    """The parameters of the same 2-process run left to finish its 12 steps."""
    root = tmp_path_factory.mktemp("uninterrupted")
    (root / "logs").mkdir()
    code, out = _finish(_local_sh(2, 2, root / "logs", f"--workdir={root / 'w'}", *PREEMPT_ARGS,
                                  *_data_args(data_dir)))
    assert code == 0, out[-3000:]
    return _params(root / "w")


@pytest.mark.long
@pytest.mark.xdist_group("uninterrupted")  # one worker trains the shared 2-process baseline once, for both
@pytest.mark.parametrize("targets", [[1], [1, 0]], ids=["one_process", "both_at_different_moments"])
def test_sigterm_saves_the_same_step_everywhere_and_resumes_exactly(data_dir, tmp_path, uninterrupted, targets):
    args = [*PREEMPT_ARGS, *_data_args(data_dir)]
    (tmp_path / "logs").mkdir()
    workdir = tmp_path / "preempted"
    proc = _local_sh(2, 2, tmp_path / "logs", f"--workdir={workdir}", *args)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and len(split_records(workdir, "train")) >= 3:
            break
        time.sleep(0.05)
    workers = _python_children(proc)
    assert len(workers) == 2, [p.cmdline() for p in workers]
    sent = time.time()
    for i, target in enumerate(targets):
        if i:
            time.sleep(0.7)  # the next host hears of the preemption a few steps later
        worker = next(p for p in workers if f"--process_id={target}" in p.cmdline())
        try:
            worker.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:  # it already saved and left
            pass
    code, out = _finish(proc, timeout=120)
    assert code == 75 and out.count("stopped early after saving (status 75)") == 2, out[-3000:]  # not finished
    assert time.time() - sent < 60  # both processes stopped promptly, no hang in a collective
    logs = out + (tmp_path / "logs" / "process_1.log").read_text()
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert len(saved) == 1 and 3 <= saved[0] < 12, saved
    for p in (0, 1):
        assert f"process {p} saved step {saved[0]}; exiting" in logs

    resumed = _local_sh(2, 2, tmp_path / "logs", f"--workdir={workdir}", *args)
    code, out = _finish(resumed)
    assert code == 0 and f"resumed from step {saved[0]}" in out, out[-3000:]
    full_step, full_params = uninterrupted
    step, params = _params(workdir)
    assert step == full_step == 12
    for a, b in zip(full_params, params):
        np.testing.assert_array_equal(a, b)


def test_settings_that_differ_between_processes_are_named_by_section(monkeypatch, data_dir):
    """A host given another learning rate or seed (a command line edited on one host) trained a silent mix: every
    process now stops, naming the sections that differ (one process here, the other's digests from another
    config). Host-local paths may differ: each host's copy of the same data, checked by the examples' digest."""
    from zephyr_jax import train

    cfg = tiny_config("sft", data_dir)
    other = tiny_config("sft", data_dir, **{"optim.lr": 3e-3, "seed": 7})

    def gathered(other_cfg):
        return lambda mine: np.stack([mine, train.settings_digests(other_cfg)])

    monkeypatch.setattr(train.multihost_utils, "process_allgather", gathered(other))
    with pytest.raises(train.ConfigError, match=r"config.seed differs on processes \[1\] from process 0's; "
                                                r"config.optim differs on processes \[1\]"):
        train.check_same_settings_everywhere(cfg)
    elsewhere = tiny_config("sft", data_dir, **{"data.train": "/host1/sft", "data.cache_dir": "/host1/cache"})
    monkeypatch.setattr(train.multihost_utils, "process_allgather", gathered(elsewhere))
    train.check_same_settings_everywhere(cfg)
    # An orbax init's workdir is no host-local copy: each process restores its shards from it, unchecked
    ddpo = tiny_config("dpo", data_dir, **{"model.init": "orbax", "model.path": "/shared/sft"})
    monkeypatch.setattr(train.multihost_utils, "process_allgather", gathered(
        tiny_config("dpo", data_dir, **{"model.init": "orbax", "model.path": "/shared/other_sft"})))
    with pytest.raises(train.ConfigError, match=r"^the processes were given other settings: config.model differs"):
        train.check_same_settings_everywhere(ddpo)
