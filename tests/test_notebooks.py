"""The Colab notebooks: stored clean (no outputs), Colab-ready (badge, install cell, scale switch), and each runs
end to end at small scale (ZEPHYR_NOTEBOOK_SMALL=1) in a real Jupyter kernel; a failing cell fails the test."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

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
    monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, as on a Colab CPU runtime
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
