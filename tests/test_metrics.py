"""Where metrics go and how MFU is computed: the data-sheet peak of each device kind, W&B across restarts."""

import os
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest

from zephyr_jax.metrics import MetricWriter, flops_per_token, padding_fraction, peak_flops, step_flops, throughput
from zephyr_jax.model import MistralConfig


@pytest.mark.parametrize("kind,peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200 NVL", 835e12), ("NVIDIA H200", 989e12), ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
    ("NVIDIA L4", 121e12), ("NVIDIA RTX A1000", None), ("TPU v4", 275e12), ("TPU v5 lite", 197e12),
    ("TPU v5", 459e12), ("TPU v6 lite", 918e12), ("cpu", None)])
def test_peak_flops_by_device_kind(kind, peak):
    """Whole words, variants before their family: an L40S is not an L4, a v5p ("TPU v5") has a peak."""
    assert peak_flops(SimpleNamespace(device_kind=kind)) == peak


def test_a_restarted_run_logs_into_the_same_wandb_run(tmp_path, monkeypatch):
    """W&B opened a new run at every restart (no run id); the workdir now keeps one. A stand-in `wandb` module
    records what wandb.init was given."""
    inits = []
    fake = SimpleNamespace(init=lambda **kw: inits.append(kw) or SimpleNamespace(finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    for _ in range(2):
        MetricWriter(str(tmp_path), tensorboard=False, wandb_project="zephyr").close()
    assert inits[0]["id"] == inits[1]["id"] and inits[0]["resume"] == "allow" and len(inits[0]["id"]) == 16


def test_wandb_that_does_not_start_is_said_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """wandb installed but not logged in raised from MetricWriter, after the data and the DPO reference pass."""
    def init(**kw):
        raise RuntimeError("No API key configured. Use `wandb login` to log in.")

    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init))
    writer = MetricWriter(str(tmp_path), tensorboard=False, wandb_project="zephyr")
    writer.write(1, {"loss": 2.0})
    writer.close()
    assert "W&B did not start (RuntimeError: No API key configured" in capsys.readouterr().out
    assert '"loss": 2.0' in (tmp_path / "metrics.jsonl").read_text()


def test_a_resumed_run_moves_the_records_of_steps_it_does_again_aside(tmp_path, capsys):
    """Resuming from a checkpoint trains the steps after it again (and a finished run evaluates its last step
    again): metrics.jsonl held both runs' records of them; now it holds one timeline, the interrupted run's
    records of those steps kept in metrics.superseded.jsonl."""
    import json

    def run(first, last, resumed_from, loss=0.0):
        writer = MetricWriter(str(tmp_path), tensorboard=False, resumed_from=resumed_from)
        for step in range(first, last + 1):
            writer.write(step, {"loss": loss + step})
            if step % 5 == 0:
                writer.write(step, {"loss": loss - step}, "eval")
        writer.close()

    read = lambda name: [json.loads(line) for line in open(tmp_path / name)]  # noqa: E731
    run(1, 8, 0)  # killed after step 8 (while writing step 9's record); its last checkpoint: step 6
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "split": "tr')
    run(7, 10, 6, loss=100.0)  # resumed from 6: steps 7-10 again, and the final eval
    records = read("metrics.jsonl")
    assert [(r["step"], r["split"]) for r in records] == \
        [(s, "train") for s in range(1, 6)] + [(5, "eval")] + [(s, "train") for s in range(6, 11)] + [(10, "eval")]
    assert [r["loss"] for r in records if r["step"] > 6] == [107.0, 108.0, 109.0, 110.0, 90.0]
    superseded = open(tmp_path / "metrics.superseded.jsonl").read().splitlines()
    assert [(r["step"], r["loss"]) for r in map(json.loads, superseded[:2])] == [(7, 7.0), (8, 8.0)]
    assert superseded[2:] == ['{"step": 9, "split": "tr']  # the cut line, kept whole, on a line of its own
    assert "3 records of steps the resumed run does again moved" in capsys.readouterr().out
    # The finished run again:
    writer = MetricWriter(str(tmp_path), tensorboard=False, resumed_from=10, evaluates_start=True)
    writer.write(10, {"loss": 190.0}, "eval")  # its final eval again, nothing else
    writer.close()
    records = read("metrics.jsonl")
    assert [(r["step"], r["split"], r["loss"]) for r in records[-2:]] == [(10, "train", 110.0), (10, "eval", 190.0)]
    assert len(records) == 12 and json.loads(open(tmp_path / "metrics.superseded.jsonl").readlines()[-1]) == \
        {"step": 10, "split": "eval", "loss": 90.0}


def _tensorboard_events(folder) -> list:
    """Every event of the TFRecord files in `folder` (length, its CRC, the Event proto, its CRC; CRCs unread)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for name in sorted(os.listdir(folder)):
        data, at = open(os.path.join(folder, name), "rb").read(), 0
        while at < len(data):
            (size,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[at + 12:at + 12 + size])
            events.append(event)
            at += 12 + size + 4
    return events


def test_tensorboard_records_reach_the_disk_within_seconds_without_a_close(tmp_path):
    """tensorboardX held records up to 120 s: a run killed after a checkpoint lost those up to it for good."""
    writer = MetricWriter(str(tmp_path))
    for step in (1, 2, 3):
        writer.write(step, {"loss": float(step)})
    deadline, steps = time.monotonic() + 10, []
    while time.monotonic() < deadline and steps != [1, 2, 3]:
        time.sleep(0.2)
        steps = [e.step for e in _tensorboard_events(tmp_path / "tensorboard") for v in e.summary.value
                 if v.tag == "train/loss"]
    writer.close()
    assert steps == [1, 2, 3]


def _tensorboard_shows(events, tag) -> list:
    """(step, value) of `tag` as TensorBoard shows them: a SessionLog START at step s (a purge) drops the events
    before it of steps s and on (its purge_orphaned_data rule)."""
    from tensorboardX.proto import event_pb2

    shown = []
    for e in events:
        if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START:
            shown = [(step, value) for step, value in shown if step < e.step]
        shown += [(e.step, v.simple_value) for v in e.summary.value if v.tag == tag]
    return shown


def test_tensorboard_purges_the_interrupted_runs_events_from_the_first_replayed_step(tmp_path, monkeypatch):
    """A run resumed from step 6 writes steps 7 on again: its event file starts with a purge at step 7, so
    TensorBoard drops the interrupted run's events of steps 7 on and keeps step 6's. A run that evaluates the step
    it resumes from again purges from that step, and its train records come back from metrics.jsonl."""
    from tensorboardX import event_file_writer
    from tensorboardX.proto import event_pb2

    # An event file is named by the second and the host: each writer here gets a file of its own, as restarts do.
    hosts = (f"host{i}" for i in range(10))
    monkeypatch.setattr(event_file_writer.socket, "gethostname", lambda: next(hosts))

    for first, last, resumed_from in ((1, 8, None), (7, 9, 6)):
        writer = MetricWriter(str(tmp_path), resumed_from=resumed_from)
        for step in range(first, last + 1):
            writer.write(step, {"loss": float(step)})
        writer.write(last, {"loss": 1.5}, "eval")  # the run's final eval
        writer.close()
    purges = [e.step for e in _tensorboard_events(tmp_path / "tensorboard")
              if e.HasField("session_log") and e.session_log.status == event_pb2.SessionLog.START]
    assert purges == [7]
    for _ in range(2):  # the finished run started twice more: its final eval again, not again in TensorBoard
        writer = MetricWriter(str(tmp_path), resumed_from=9, evaluates_start=True)
        writer.write(9, {"loss": 1.5}, "eval")
        writer.close()
    shows = lambda tag: _tensorboard_shows(_tensorboard_events(tmp_path / "tensorboard"), tag)  # noqa: E731
    assert shows("eval/loss") == [(9, 1.5)]
    # A run stopped after saving its last step but before its final eval (preempted, killed): started again, its
    # final eval is written to TensorBoard too.
    writer = MetricWriter(str(tmp_path), resumed_from=9)
    writer.write(12, {"loss": 12.0})
    writer.close()
    writer = MetricWriter(str(tmp_path), resumed_from=12, evaluates_start=True)
    writer.write(12, {"loss": 2.5}, "eval")
    writer.close()
    assert shows("eval/loss") == [(9, 1.5), (12, 2.5)]
    # Preempted at its eval step 15 (no eval written), resumed: it evaluates step 15 and is killed (kill -9) within
    # the second before its TensorBoard events reach the disk (a writer without TensorBoard leaves what that kill
    # leaves: the record in metrics.jsonl only). Started once more, it evaluates step 15 again: TensorBoard shows
    # that eval once (it was left out, an earlier run's record of it taken for one written there).
    writer = MetricWriter(str(tmp_path), resumed_from=12)
    for step in (13, 14, 15):
        writer.write(step, {"loss": float(step)})
    writer.close()
    killed = MetricWriter(str(tmp_path), tensorboard=False, resumed_from=15, evaluates_start=True)
    killed.write(15, {"loss": 3.5}, "eval")
    writer = MetricWriter(str(tmp_path), resumed_from=15, evaluates_start=True)
    writer.write(15, {"loss": 3.5}, "eval")
    writer.close()
    killed.close()
    assert shows("eval/loss") == [(9, 1.5), (12, 2.5), (15, 3.5)]
    assert shows("train/loss") == [(s, float(s)) for s in (*range(1, 10), 12, 13, 14, 15)]
    # Preempted at 17 between log steps: its short line (16-17) is written again at 18 by the resumed run, which
    # carries those steps over; TensorBoard shows the line of 16-18 alone, not the short one's point at 17 too.
    writer = MetricWriter(str(tmp_path), resumed_from=15)
    writer.write(17, {"loss": 16.5})
    writer.close()
    writer = MetricWriter(str(tmp_path), resumed_from=17, rewrites_start=True)
    writer.write(18, {"loss": 17.0})
    writer.close()
    assert shows("train/loss")[-2:] == [(15, 15.0), (18, 17.0)]


@pytest.mark.parametrize("window", [None, 5])
def test_causal_flops_count_the_pairs_the_mask_keeps(window):
    """step_flops(causal=True) against the query-key pairs of a brute-force Mistral mask (key j visible to query i
    when j <= i and i - j < window), segment by segment; the default counts each segment's whole l x l."""
    cfg = MistralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window)
    lengths = [1, 3, 5, 6, 11]
    i, j = np.arange(11)[:, None], np.arange(11)[None, :]
    mask = (j <= i) & ((i - j < window) if window else True)
    pairs = sum(int(mask[:n, :n].sum()) for n in lengths)
    dense, per_pair = flops_per_token(cfg, 0), flops_per_token(cfg, 1) - flops_per_token(cfg, 0)
    assert step_flops(cfg, lengths, causal=True) == pytest.approx(dense * sum(lengths) + per_pair * pairs, rel=1e-12)
    assert step_flops(cfg, lengths) == pytest.approx(dense * sum(lengths) + per_pair * sum(n * n for n in lengths),
                                                     rel=1e-12)
    # a frozen reference adds one forward pass, a third of the step's FLOPs, under either count
    assert step_flops(cfg, lengths, True, causal=True) == pytest.approx(step_flops(cfg, lengths, causal=True) * 4 / 3)


@pytest.mark.parametrize("seq_len", [16, 37])
def test_flops_per_token_is_what_torch_counts_for_transformers_mistral(seq_len):
    """The MFU numerator against torch.utils.flop_counter over transformers' eager Mistral (every matmul, the
    T x T attention products included): forward + backward, and a forward pass alone. The rotary embedding's
    table of position x frequency is left out: no model FLOP, and transformers up to 5.17 at least computes it as
    a [head_dim / 2, 1] x [1, T] matmul (head_dim FLOPs a token, which torch counts), later releases as a
    broadcast product (none counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from tests.torch_reference import torch_mistral

    def model_flops(counter):
        rotary = [sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(".rotary_emb")]
        return counter.get_total_flops() - sum(rotary)

    model = torch_mistral(seed=0)
    cfg = MistralConfig(**{k: getattr(model.config, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "tie_word_embeddings")})
    ids = torch.randint(3, cfg.vocab_size, (2, seq_len))
    with FlopCounterMode(display=False) as forward:
        with torch.no_grad():
            model(ids)
    with FlopCounterMode(display=False) as step:
        model(ids).logits.sum().backward()
    tokens = ids.numel()
    assert model_flops(forward) == pytest.approx(flops_per_token(cfg, seq_len, training=False) * tokens, rel=1e-12)
    assert model_flops(step) == pytest.approx(flops_per_token(cfg, seq_len) * tokens, rel=1e-12)


def test_throughput_per_device_figures_divide_by_the_devices():
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    one = throughput(cfg, [[100, 50]], 2.0, 1, frozen_reference=False, peak=1e12)
    eight = throughput(cfg, [[100, 50]], 2.0, 8, frozen_reference=False, peak=1e12)
    assert eight["tflops_per_device"] == pytest.approx(one["tflops_per_device"] / 8)
    assert eight["tflops_per_device"] == pytest.approx(step_flops(cfg, [100, 50]) / 2.0 / 8 / 1e12)
    assert eight["mfu"] == pytest.approx(eight["tflops_per_device"] * 1e12 / 1e12)
    assert eight["tokens_per_sec"] == 75.0 and eight["tokens_per_sec_per_device"] == 75.0 / 8
    assert padding_fraction([[100, 50]], 256) == pytest.approx(1 - 150 / 256)  # 150 real tokens in 256 positions
    # a frozen DPO reference inside the step adds its forward pass: a third of the policy's step
    with_reference = throughput(cfg, [[100, 50]], 2.0, 8, frozen_reference=True, peak=1e12)
    assert with_reference["mfu"] == pytest.approx(eight["mfu"] * 4 / 3)
