"""The bench scripts' bookkeeping, nothing computed: the prepared GPU run (bench/gpu_issue13.sh), with a stand-in
Python (a shell script) in place of the real one, and what the scripts accept on their command lines."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_stages(tmp_path, python_body: str, *stages: str) -> str:
    """bench/gpu_issue13.sh STAGES in SMOKE mode with PYTHON a script running `python_body` (bash; "$*" holds
    its arguments); its output, the closing tables and summary included. The wheels of a checkout's .whl/ (a
    GPU session's) "install"."""
    python = tmp_path / "python"
    python.write_text(f'#!/usr/bin/env bash\n[ "$1 $2" = "-m pip" ] && exit 0\n{python_body}\n')
    python.chmod(0o755)
    env = dict(os.environ, SMOKE="1", PYTHON=str(python), OUT=str(tmp_path / "out"),
               STARTED=str(tmp_path / "started"), BUDGET_S="600")
    out = subprocess.run(["bash", "bench/gpu_issue13.sh", *stages], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    return out.stdout + out.stderr


def summary_row(output: str, stage: str) -> list[str]:
    return next(line.split(" | ") for line in output.splitlines() if line.startswith(f"| {stage} | "))


def test_an_env_stage_whose_imports_fail_shows_as_failed(tmp_path):
    """The env stage ran the import check and then the device query in one `bash -c`: its exit was the query's,
    so a Python lacking trl (or a flax that does not import under the image's jax) read as exit 0."""
    output = run_stages(tmp_path, 'case "$*" in *trl*) echo "No module named trl" >&2; exit 1;; esac', "env")
    assert "No module named trl" in output
    assert summary_row(output, "env")[2] == "1", output


def test_the_closing_tables_say_which_stage_and_command_each_figure_came_from(tmp_path):
    """The tables kept only the scripts' rows: the flags stage's steps (under the sbatch's XLA flags) read like the
    default ones, and a dpo7b figure did not say which fallback (2 micro-batches, a bf16 Adam moment, 16 pairs)
    gave it. Here the first dpo7b try runs out of memory and the second gives a row."""
    python = """case "$*" in
  *zephyr_jax.xla_flags*) echo "--xla_gpu_enable_latency_hiding_scheduler=true";;
  *grad_accum=2*) echo "| dpo | 4 | row of the 2 micro-batches |";;
  *dpo.py*precompute_reference*) echo "RESOURCE_EXHAUSTED: out of memory" >&2; exit 1;;
  *throughput.py*) echo "| sft or dpo | row under the sbatch's flags |";;
esac"""
    output = run_stages(tmp_path, python, "dpo7b", "flags")
    tables = output.split("### tables")[1].splitlines()

    def label(row: str) -> str:  # the nearest '=== ' line above the row
        return next((line for line in reversed(tables[:tables.index(row)]) if line.startswith("=== ")), "(none)")

    assert "grad_accum=2" in label("| dpo | 4 | row of the 2 micro-batches |")
    assert label("| sft or dpo | row under the sbatch's flags |").startswith("=== train:xla_flags: ")


def test_serve_throughput_refuses_client_counts_without_request_counts():
    """--clients=1,8,32,64 beside the default --requests=8,32,64 zipped the lists: the 64-client load was dropped
    without a word."""
    out = subprocess.run([sys.executable, "bench/serve_throughput.py", "--clients=1,8,32,64", "--systems=",
                          "--model=unused"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--clients=1,8,32,64 names 4 loads but --requests=8,32,64 3" in out.stderr


def test_plan_table_refuses_an_only_that_names_no_row(tmp_path):
    """--only with a slice or config the table has no row for (v5e-8, a typo) printed an empty table."""
    out = subprocess.run([sys.executable, "bench/plan_table.py", "--only=dpo.py:zephyr@v5e-8",
                          f"--out={tmp_path / 'plans.jsonl'}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "--only=dpo.py:zephyr@v5e-8: no row; rows: sft.py:zephyr@v4-64, " in out.stderr
