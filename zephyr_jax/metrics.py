"""Where metrics go (workdir/metrics.jsonl, TensorBoard, W&B) and how throughput becomes MFU."""

from __future__ import annotations

import json
import math
import os
import re

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (no sparsity).
PEAK_FLOPS = {
    "h200": 989e12, "h200 nvl": 835e12, "h100": 989e12, "h100 pcie": 756e12, "h100 nvl": 835e12, "a100": 312e12,
    "l40s": 362e12, "l40": 181e12, "l4": 121e12, "a10": 125e12,
    "tpu v6e": 918e12, "tpu v5p": 459e12, "tpu v5e": 197e12, "tpu v4": 275e12,
}
# A device's device_kind (lower case) -> its PEAK_FLOPS name, the first pattern that matches: variants before their
# family, and whole words, so an "L40S" is not an "L4" and an "RTX A1000" not an "A100". libtpu calls v5e and v6e
# chips "TPU v5 lite" and "TPU v6 lite", and a v5p "TPU v5".
DEVICE_KINDS = (
    (r"\bh100\b.*\bpcie\b", "h100 pcie"), (r"\bh100\b.*\bnvl\b", "h100 nvl"), (r"\bh100\b", "h100"),
    (r"\bh200\b.*\bnvl\b", "h200 nvl"), (r"\bg?h200\b", "h200"), (r"\ba100\b", "a100"), (r"\bl40s\b", "l40s"),
    (r"\bl40\b", "l40"), (r"\bl4\b", "l4"), (r"\ba10\b", "a10"), (r"\btpu v6( lite|e)\b", "tpu v6e"),
    (r"\btpu v5( lite|e)\b", "tpu v5e"), (r"\btpu v5p?\b", "tpu v5p"), (r"\btpu v4\b", "tpu v4"),
)


def device_name(device=None) -> str | None:
    """The DEVICE_KINDS name of a device ("h100 pcie", "tpu v5e"); None for CPUs and chips not listed."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    return next((name for pattern, name in DEVICE_KINDS if re.search(pattern, kind)), None)


def peak_flops(device=None) -> float | None:
    """The device's data-sheet peak; None for CPUs and chips not listed (MFU is then not reported unless
    train.peak_tflops is set)."""
    name = device_name(device)
    return None if name is None else PEAK_FLOPS[name]


def flops_per_token(cfg, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token (PaLM, appendix B): 6N + 12 L H Q T for a training step (forward + backward),
    a third of that for a forward pass. N is the matmul weights: no embedding lookup, no RMSNorm scales (the LM
    head is counted). The attention term counts the whole T x T, as PaLM does; MaxText halves it for the causal
    mask, so its MFU for the same step reads lower (by 6.3% at T = 2,048 for a 1B Mistral, 3.5% for 7B)."""
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * seq_len
    per_token = 6 * cfg.matmul_params + attention
    return per_token if training else per_token / 3


def sequence_flops(cfg, lengths, training: bool = True, causal: bool = False) -> float:
    """Model FLOPs of sequences of the given real lengths: sum of flops_per_token(cfg, l) * l, so a packed row
    counts each segment's own attention and padding counts nothing. causal=True counts only the query-key pairs
    the causal (and sliding-window) mask keeps, sum over positions i of min(i, window), about l^2 / 2: what a
    flash kernel that skips masked blocks computes (MaxText's convention)."""
    lengths = np.asarray(lengths, np.float64)
    per_token = flops_per_token(cfg, 0, training)  # the 6N (or 2N) part
    attention = flops_per_token(cfg, 1, training) - per_token  # the attention part per token per unit length
    if causal:
        inside = np.minimum(lengths, cfg.sliding_window or np.inf)  # the first positions see all before them
        pairs = inside * (inside + 1) / 2 + (lengths - inside) * inside  # the later ones a full window each
    else:
        pairs = lengths ** 2
    return float(per_token * lengths.sum() + attention * pairs.sum())


def step_flops(cfg, lengths, frozen_reference: bool = False, causal: bool = False) -> float:
    """Model FLOPs of one training step over sequences of `lengths`: forward and backward of the policy, plus a
    forward pass of a frozen DPO reference when it runs inside the step."""
    return (sequence_flops(cfg, lengths, causal=causal)
            + (sequence_flops(cfg, lengths, training=False, causal=causal) if frozen_reference else 0.))


def throughput(mcfg, sequences, seconds: float, devices: int, *, frozen_reference: bool, peak) -> dict:
    """Throughput of steps that took `seconds` over sequences of real lengths `sequences` (one list per example: a
    pair's two, a packed row's segments): real tokens only, and MFU from the FLOPs of those real sequences."""
    lengths = [n for seqs in sequences for n in seqs]
    real = sum(lengths)
    flops = step_flops(mcfg, lengths, frozen_reference)
    out = {"step_time": seconds, "tokens_per_sec": real / seconds,
           "tokens_per_sec_per_device": real / seconds / devices,
           "tflops_per_device": flops / seconds / devices / 1e12}
    if peak:
        out["mfu"] = flops / seconds / (peak * devices)
    return out


def padding_fraction(sequences, positions: int) -> float:
    """The share of `positions` (rows x length, summed over steps) that held no token of `sequences` (one list of
    real lengths per example). A property of the batches, not of time: a log line counts all its steps, the one
    whose call compiled included (counting only the timed ones gave a resumed run's first line another value)."""
    return 1 - sum(n for seqs in sequences for n in seqs) / positions


def wandb_run_id(workdir: str) -> str:
    """The workdir's W&B run id (made once, kept in WORKDIR/wandb_run_id): a restarted run goes on logging into the
    same W&B run instead of starting a new one at every restart."""
    path = os.path.join(workdir, "wandb_run_id")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(os.urandom(8).hex())
    with open(path) as f:
        return f.read().strip()


def set_aside_replayed(workdir: str, step: int, evaluates_start: bool = False,
                       rewrites_start: bool = False) -> list[str]:
    """A run resumed from `step` trains the steps after it again, evaluates `step` again when it is the last or
    was preempted before its eval (`evaluates_start`), and writes the train line that `step` cut short again when a
    preemption saved that line's steps (`rewrites_start`): the interrupted run's records of them move from
    metrics.jsonl to metrics.superseded.jsonl, so metrics.jsonl holds one record per step and split. Returns the
    lines that moved."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:  # a kill mid-write may have left the last line cut short: it moves too, whole
        lines = [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]

    def replayed(line: str) -> bool:
        try:
            r = json.loads(line)
            again = {"eval": evaluates_start, "train": rewrites_start}.get(r["split"], False)
            return r["step"] > step or (again and r["step"] == step)
        except (ValueError, TypeError, KeyError):  # not a record of this writer's
            return True

    moved, kept = [], []
    for line in lines:
        (moved if replayed(line) else kept).append(line)
    if moved:
        with open(os.path.join(workdir, "metrics.superseded.jsonl"), "a") as f:
            f.writelines(moved)
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)
    return moved


def _records_of(path: str, step: int) -> list[dict]:
    """The records of `step` in a metrics.jsonl."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, filter(str.strip, f)) if r["step"] == step]


class MetricWriter:
    """Writes on process 0 only: one JSON line per record, TensorBoard scalars, W&B if configured.

    resumed_from: the step a resumed run starts from; evaluates_start: whether it evaluates that step (the last
    step, or one a preemption saved before its eval); rewrites_start: whether it writes that step's train line
    again (a preemption between log steps saved the line's steps). The records of what it does again
    (set_aside_replayed) move to metrics.superseded.jsonl, and TensorBoard hides the interrupted run's events after
    it (purge_step; from it, when it evaluates that step or writes its line again).
    W&B drops a resumed run's steps up to the last one it has (its own rule)."""

    def __init__(self, workdir: str, tensorboard: bool = True, wandb_project: str | None = None, config=None,
                 resumed_from: int | None = None, evaluates_start: bool = False, rewrites_start: bool = False):
        self.active = jax.process_index() == 0
        self.tb = self.wandb = None
        if not self.active:
            return
        if resumed_from is not None:
            moved = set_aside_replayed(workdir, resumed_from, evaluates_start, rewrites_start)
            if moved:
                print(f"metrics.jsonl: {len(moved)} records of steps the resumed run does again moved to "
                      "metrics.superseded.jsonl")
        self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                # A run that evaluates its start step again (a finished run started again, a run preempted at an
                # eval step) purges from that step, not after it: an earlier run's eval of it is not shown twice,
                # and one lost with that run's last second of events (a kill -9) is not left out. The train
                # records of that step come back from metrics.jsonl. So does a run that writes the train line its
                # start step cut short again (at a later step: the short line's point goes).
                again = evaluates_start or rewrites_start
                purge = None if resumed_from is None else resumed_from + (0 if again else 1)
                # flush_secs: tensorboardX's 120 s lost up to two minutes of records at a kill -9, those before
                # the checkpoint the resumed run starts after included (which it does not write again).
                self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge, flush_secs=1)
            except ImportError:
                print("tensorboardX is not installed: no TensorBoard event files (pip install tensorboardX)")
        if self.tb is not None and evaluates_start:
            for record in _records_of(os.path.join(workdir, "metrics.jsonl"), resumed_from):
                self._to_tensorboard(record["step"], record["split"], record)
        if wandb_project:
            import wandb  # installed: train_checks.check_config refuses wandb_project without it, before any work

            try:
                self.wandb = wandb.init(project=wandb_project, dir=workdir, config=config, resume="allow",
                                        id=wandb_run_id(workdir))
            except Exception as e:  # not logged in, offline, a wrong entity: after hours of data and reference work
                print(f"W&B did not start ({type(e).__name__}: {e}): not logging to W&B (`wandb login`, or "
                      "WANDB_MODE=offline to sync later); metrics.jsonl has every record")

    def write(self, step: int, metrics: dict, prefix: str = "train") -> None:
        if not self.active:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "dtype") else v)
                 for k, v in metrics.items()}
        clean = {k: v for k, v in clean.items() if not (isinstance(v, float) and math.isnan(v) and k == "mfu")}
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **clean}) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            self._to_tensorboard(step, prefix, clean)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in clean.items()}, step=step)

    def _to_tensorboard(self, step: int, prefix: str, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, float):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def flush(self) -> None:
        """metrics.jsonl and what TensorBoard's writer thread has taken so far on disk (after each checkpoint save:
        the resumed run does not write the records up to it again)."""
        if self.active:
            self.jsonl.flush()
            if self.tb is not None:
                self.tb.flush()

    def close(self) -> None:
        if self.active:
            self.jsonl.close()
            if self.tb is not None:
                self.tb.close()
            if self.wandb is not None:
                self.wandb.finish()
