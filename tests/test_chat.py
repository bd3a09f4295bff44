"""Streaming generation and the terminal chat (one-shot and interactive over stdin)."""

import os
import subprocess
import sys

import numpy as np
import pytest

from zephyr_jax import hf
from zephyr_jax.generate import generate_ids, stream_ids

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_stream_equals_batched_greedy(model_dir):
    model = hf.load_pretrained(model_dir)
    prompt = [1, 523, 28766, 1838, 28766, 28767, 13, 23809]
    streamed = list(stream_ids(model, prompt, max_new_tokens=12, eos_id=None))
    batched = generate_ids(model, np.asarray([prompt]), max_new_tokens=12)[0]
    assert streamed == list(batched)


def _chat(model_dir, *args, stdin=None):
    return subprocess.run([sys.executable, "-m", "zephyr_jax.chat", f"--model={model_dir}", "--max_new_tokens=6",
                           "--temperature=0", *args], cwd=ROOT, input=stdin, capture_output=True, text=True,
                          timeout=300)


def test_one_shot_prompt_prints_a_reply(model_dir):
    out = _chat(model_dir, "--prompt=Hello there")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip(), "no reply printed"


def test_interactive_multi_turn_over_stdin(model_dir):
    out = _chat(model_dir, stdin="Hi\nAnd again\n/reset\nOnce more\n/exit\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.count("zephyr> ") == 3 and "(history cleared)" in out.stdout
