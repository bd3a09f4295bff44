"""The Colab notebooks: stored clean (no outputs), Colab-ready (badge, install cell, scale switch), and each runs
end to end at small scale (ZEPHYR_NOTEBOOK_SMALL=1) in a real Jupyter kernel; a failing cell fails the test."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

from tests import cpu_xla

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(f for f in os.listdir(os.path.join(ROOT, "notebooks")) if f.endswith(".ipynb"))
# Notebooks that must draw their results (the ablations' plots).
PLOTS = {"dpo_beta_and_loss_ablation.ipynb": 2, "table3_small_scale.ipynb": 1}


def _read(name):
    return nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)


def test_the_three_notebooks_exist():
    assert set(NOTEBOOKS) == {"quickstart.ipynb", "dpo_beta_and_loss_ablation.ipynb", "table3_small_scale.ipynb"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs_and_colab_ready(name):
    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), f"{name} is stored with outputs"
    assert f"colab.research.google.com/github/zephyr-jax/zephyr_jax/blob/main/notebooks/{name}" in nb.cells[0].source
    assert "pip" in code[0].source and "install" in code[0].source  # the install cell comes first
    assert 'os.environ.get("ZEPHYR_NOTEBOOK_SMALL"' in code[1].source  # the scale switch


@pytest.mark.long
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_end_to_end_at_small_scale(name, tmp_path, monkeypatch):
    monkeypatch.setenv("ZEPHYR_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("XLA_FLAGS", cpu_xla.flags(1))  # one CPU device, as on a Colab CPU runtime
    # The checkout's package, also where it is not pip-installed (the install cell then finds it, no network).
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = _read(name)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= PLOTS.get(name, 0), f"{name} drew {len(images)} figures"
    if name == "quickstart.ipynb":
        assert (tmp_path / "exported_model" / "config.json").exists()


# --- What the training notebooks train, from what, and which run each reported number comes from. ---

TRAINING = ["table3_small_scale.ipynb", "dpo_beta_and_loss_ablation.ipynb"]


def _execute_with_stand_ins(name, tmp_path, monkeypatch, small):
    """Every code cell, in this process, with train.run, the model loader, the demo data and the held-out scores
    replaced by stand-ins (seconds, at either scale): train.run records (config, workdir) and returns eval metrics
    of its own (its index / 100); a checkpoint's held-out preference accuracy is its run's index / 100 (a workdir
    never trained raises). Returns the notebook's variables and the runs."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import zephyr_jax
    import zephyr_jax.tokenizer
    from zephyr_jax import demo, train

    monkeypatch.chdir(tmp_path)
    if small:
        monkeypatch.setenv("ZEPHYR_NOTEBOOK_SMALL", "1")
    else:
        monkeypatch.delenv("ZEPHYR_NOTEBOOK_SMALL", raising=False)
    runs = []

    def run(config, workdir):
        workdir = os.path.normpath(os.fspath(workdir))
        assert workdir not in [w for _, w in runs], f"{workdir} trained twice (the second run resumes the first)"
        runs.append((config, workdir))
        os.makedirs(workdir, exist_ok=True)
        index = len(runs) - 1  # as the held-out scores number the runs
        final = {"rewards/accuracies": index / 100, "rewards/margins": float(index)}
        with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
            for split in ("train", "eval"):
                f.write(json.dumps({"split": split, "step": 1, **final}) + "\n")
        return final

    def load(workdir, **_):
        return ("model", [w for _, w in runs].index(os.path.normpath(os.fspath(workdir)))), "tokenizer"

    monkeypatch.setattr(train, "run", run)
    monkeypatch.setattr(zephyr_jax, "load", load)
    monkeypatch.setattr(zephyr_jax.tokenizer, "load_tokenizer", lambda *a, **k: "tokenizer")
    monkeypatch.setattr(demo, "make_demo_data", lambda out, **_: {
        k: os.path.join(out, k) for k in ("sft", "prefs", "test_prompts")})
    monkeypatch.setattr(demo, "task_replies", lambda model, tok, prompts: ([{"answer": "1"}], ["1"]))
    monkeypatch.setattr(demo, "preference_accuracy", lambda model, tok, prefs: model[1] / 100)
    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    namespace = {}
    for cell in _read(name).cells:
        if cell.cell_type == "code":
            exec(compile(cell.source, name, "exec"), namespace)
    plt.close("all")
    return namespace, runs


def _is_demo_variant(config, stage, small):
    """configs/{stage}.py:demo, and at full scale as long as the demo variant trains (one epoch)."""
    from zephyr_jax.config_common import load_config

    demo = load_config(os.path.join(ROOT, f"configs/{stage}.py:demo"))
    return (config.stage == stage and config.optim == demo.optim and config.seed == demo.seed
            and (small or config.train.max_steps == demo.train.max_steps))


@pytest.mark.parametrize("small", [True, False], ids=["small", "full"])
@pytest.mark.parametrize("name", TRAINING)
def test_training_notebooks_chain_the_right_runs_and_report_each_runs_own_numbers(name, small, tmp_path,
                                                                                   monkeypatch):
    ns, runs = _execute_with_stand_ins(name, tmp_path, monkeypatch, small)
    (sft, sft_dir), *dpo_runs = runs
    assert _is_demo_variant(sft, "sft", small) and sft.train.max_steps == ns["SFT_STEPS"]
    assert sft.data.train == ns["paths"]["sft"]
    for config, _ in dpo_runs:
        assert _is_demo_variant(config, "dpo", small) and config.train.max_steps == ns["DPO_STEPS"], config
        assert config.data.train == ns["paths"]["prefs"]
    if name == "table3_small_scale.ipynb":
        (chained, chained_dir), (alone, alone_dir) = dpo_runs
        assert chained.model.init == "orbax" and chained.model.path == sft_dir  # dDPO from the dSFT model
        assert alone.model.init == "random" and alone.model.arch == sft.model.arch  # the same model, untrained
        arms = ns["arms"]
        assert set(arms) == set(ns["order"]) == {"dSFT", "dSFT + dDPO", "dDPO (no dSFT)"}
        assert [arms[a]["preference_accuracy"] for a in ("dSFT", "dSFT + dDPO", "dDPO (no dSFT)")] == [0, .01, .02]
    else:
        assert len(dpo_runs) == len(ns["GRID"]) == (2 if small else 8)
        assert ns["baseline"]["preference_accuracy"] == 0
        for i, ((loss_type, beta), (config, workdir)) in enumerate(zip(ns["GRID"], dpo_runs), start=1):
            assert config.model.init == "orbax" and config.model.path == sft_dir
            assert (config.dpo.loss_type, config.dpo.beta) == (loss_type, beta)
            run = ns["runs"][f"{loss_type} beta={beta}"]
            assert os.path.normpath(run["workdir"]) == workdir
            assert run["eval"]["rewards/accuracies"] == i / 100 and run["preference_accuracy"] == i / 100


def test_quickstart_scale_follows_the_devices_memory_unless_the_switch_is_set(monkeypatch):
    """Colab's default runtime is a CPU (12 GB of RAM) and its free GPU a 16 GB T4 (11 GiB for XLA): at full scale
    they download 14.5 GB of weights and then run out of memory. Unset, the scale switch picks full scale only
    where the devices hold the 7B model in bf16; ZEPHYR_NOTEBOOK_SMALL, when set, decides."""
    import jax

    cell = [c for c in _read("quickstart.ipynb").cells if c.cell_type == "code"][1].source
    GiB = 2 ** 30

    class Device:
        def __init__(self, limit):
            self.limit = limit

        def memory_stats(self):
            return None if self.limit is None else {"bytes_limit": self.limit}

    def small(env, *limits):
        if env is None:
            monkeypatch.delenv("ZEPHYR_NOTEBOOK_SMALL", raising=False)
        else:
            monkeypatch.setenv("ZEPHYR_NOTEBOOK_SMALL", env)
        monkeypatch.setattr(jax, "devices", lambda *a: [Device(limit) for limit in limits])
        namespace = {"os": os}
        exec(compile(cell, "quickstart.ipynb", "exec"), namespace)
        return namespace["SMALL"]

    assert small(None, None)  # a CPU runtime: no device memory figure
    assert small(None, 11.3 * GiB)  # a T4: 75% of 15 GiB
    assert not small(None, 16.9 * GiB)  # an L4 (75% of 22.5 GiB)
    assert not small(None, 15.75 * GiB)  # a v5e-1 TPU
    assert not small(None, *[7.5 * GiB] * 8)  # a TPU v2-8, FSDP over its 8 cores
    assert small("1", 60 * GiB) and not small("0", None)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_keeps_the_runtimes_accelerator_plugin_in_step_with_jax(name, tmp_path, monkeypatch):
    """On Colab the install cell clones and pip-installs the repository; where it raises jax (jax>=0.10.1) above
    the runtime's, the runtime's CUDA plugin or libtpu, built for its older jaxlib, would stay behind and jax would
    run on the CPU. So a runtime with jax's CUDA 12 plugin installs the `gpu` extra, one with libtpu the `tpu`
    extra (each brings the plugin matching the new jax), a CPU runtime neither. Stand-ins for find_spec and
    subprocess record what would be run."""
    import importlib.util
    import subprocess
    import sys

    cell = [c for c in _read(name).cells if c.cell_type == "code"][0].source
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the cell puts the clone first

    def installed(*present):
        commands = []
        monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: object() if mod in present else None)
        monkeypatch.setattr(subprocess, "run", lambda argv, **kw: commands.append(argv))
        exec(compile(cell, name, "exec"), {})
        assert commands[0][:2] == ["git", "clone"], commands
        return commands[-1][-1]

    assert installed() == "zephyr_jax_repo"
    assert installed("jax_cuda12_plugin") == "zephyr_jax_repo[gpu]"
    assert installed("libtpu") == "zephyr_jax_repo[tpu]"


@pytest.mark.parametrize("name", TRAINING)
def test_training_notebooks_keep_each_scales_runs_apart(name, tmp_path, monkeypatch):
    """A researcher runs a notebook small to check it, then in full in the same Colab session: the full runs must
    neither resume the small ones' checkpoints (train.run goes on from them, and a dDPO run keeps the dSFT step it
    started from, the small dSFT's) nor write their data over the small runs' files."""
    small_ns, small = _execute_with_stand_ins(name, tmp_path, monkeypatch, small=True)
    full_ns, full = _execute_with_stand_ins(name, tmp_path, monkeypatch, small=False)
    assert not {w for _, w in small} & {w for _, w in full}
    assert not set(small_ns["paths"].values()) & set(full_ns["paths"].values())
