"""Where metrics go and how MFU is computed: the data-sheet peak of each device kind, W&B across restarts."""

import sys
from types import SimpleNamespace

import pytest

from zephyr_jax.metrics import MetricWriter, peak_flops


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
