"""Streaming generation and the terminal chat (one-shot and interactive over stdin)."""

import os
import re
import subprocess
import sys

import pytest

from zephyr_jax import train
from zephyr_jax.loading import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def test_streamed_reply_equals_batched_greedy(model_dir, capsys):
    """What the chat prints, piece by piece, is generate()'s greedy reply to the same conversation."""
    import io

    from zephyr_jax.chat import reply
    from zephyr_jax.engine import Engine
    from zephyr_jax.generate import generate
    from zephyr_jax.tokenizer import encode_text, render_chat

    model, tok = load(model_dir, "float32")
    messages = [{"role": "user", "content": "Hello, who are you?"}]
    pieces = []

    class Screen(io.StringIO):
        def write(self, text):
            pieces.append(text)
            return super().write(text)

    screen = Screen()
    text = reply(Engine(model, tok, max_slots=1, max_length=128), tok, messages, screen, max_new_tokens=12,
                 temperature=0.0)
    assert text == generate(model, tok, [messages], max_new_tokens=12)[0]
    assert screen.getvalue() == text + "\n" and len([p for p in pieces if p]) > 2  # it streamed
    # Near the context's end the reply is shorter than asked, and the chat says so.
    prompt = encode_text(tok, render_chat(tok, messages, add_generation_prompt=True))
    cut = reply(Engine(model, tok, max_slots=1, max_length=len(prompt) + 5), tok, messages, io.StringIO(),
                max_new_tokens=12, temperature=0.0, room_hint="a shorter --prompt makes room")  # (one-shot's)
    assert cut == generate(model, tok, [messages], max_new_tokens=5)[0]
    assert f"room for 5 tokens of the context's {len(prompt) + 5}: a shorter --prompt makes room)" in \
        capsys.readouterr().err


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
    # A turn that outgrows the context is refused with a message, and /reset starts over (it used to exit).
    out = _chat(model_dir, "--max_length=64", stdin="Tell me about the sea, the sky and the stars. " * 4 + "\n"
                "/reset\nHi\n/exit\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "error: the conversation has" in out.stderr and "/reset clears the history" in out.stderr
    assert out.stdout.count("zephyr> ") == 2 and "(history cleared)" in out.stdout


def test_each_interactive_turn_samples_with_its_own_seed(monkeypatch, tiny_model_dir):
    import io

    from zephyr_jax import chat

    # A one-shot prompt longer than the context: the error names the flags that make room (it said "/reset it",
    # which a one-shot run has no way to do)
    with pytest.raises(SystemExit) as exit_:
        chat.main([f"--model={tiny_model_dir}", "--dtype=float32", "--max_length=64", "--prompt=" + "sea " * 80])
    assert re.fullmatch(r"error: the conversation has \d+ tokens, the context 64: a shorter --prompt or --system, "
                        r"or a larger --max_length, makes room", exit_.value.code), exit_.value.code
    seeds = []
    monkeypatch.setattr(chat, "reply", lambda engine, tok, messages, seed, **kw: seeds.append(seed) or "ok")
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n/reset\nOnce more\n/exit\n"))
    caches = []  # the engine's programs come from JAX's persistent cache, as serve's and evaluate's do
    monkeypatch.setattr(train, "use_compilation_cache", caches.append)
    chat.main([f"--model={tiny_model_dir}", "--dtype=float32", "--seed=5", "--max_length=64"])
    assert seeds == [5, 6, 5]  # per turn; /reset starts the count over
    assert caches == ["~/.cache/zephyr_jax/xla"]
    # The last seed allowed: the next turn's wraps to 0 (2**32 was refused, and so was every later turn)
    seeds.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n/exit\n"))
    chat.main([f"--model={tiny_model_dir}", "--dtype=float32", f"--seed={2 ** 32 - 1}", "--max_length=64"])
    assert seeds == [2 ** 32 - 1, 0]
    # A top_k above the model's vocabulary, known once it is loaded: one error before the first turn (it was the
    # engine's ValueError at every turn)
    seeds.clear()
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAgain\n/exit\n"))
    with pytest.raises(SystemExit) as exit_:
        chat.main([f"--model={tiny_model_dir}", "--dtype=float32", "--top_k=32001", "--max_length=64"])
    assert exit_.value.code == "error: top_k=32001: must be in [0, 32000] (the model's vocabulary)"
    assert seeds == []


def test_bad_flags_are_one_line_errors_before_the_model_loads(monkeypatch, assert_refused_dtype):
    from zephyr_jax import chat

    def no_load(*args, **kw):
        raise AssertionError("the model was loaded before the mistake was found")

    monkeypatch.setattr(chat, "load", no_load)
    with pytest.raises(SystemExit) as exit_:
        chat.main(["--model=m", "--prompt=Hi", "--max_new_tokens=0"])
    assert exit_.value.code == "error: --max_new_tokens=0: must be at least 1"
    # Sampling values out of the engine's ranges: refused at the first reply, after the model's load
    for flag, message in (("--temperature=-1", "temperature=-1.0: must be in [0, 100]"),
                          ("--top_p=0", "top_p=0.0: must be in (0, 1]"), ("--top_k=-3", "top_k=-3: must be >= 0"),
                          ("--seed=-1", "seed=-1: must be in [0, 2**32)")):
        with pytest.raises(SystemExit) as exit_:
            chat.main(["--model=m", "--prompt=Hi", flag])
        assert exit_.value.code == f"error: {message}"
    # The engine's sizes: a ValueError traceback once the model was loaded
    for max_length in (1, 0, -5):
        with pytest.raises(SystemExit) as exit_:
            chat.main(["--model=m", "--prompt=Hi", f"--max_length={max_length}"])
        assert exit_.value.code == f"error: --max_length={max_length}: must be at least 2"
    # fp8 was a TypeError deep in numpy; int8 blamed a workdir's model_config.json
    for dtype in ("fp8", "int8"):
        assert_refused_dtype(lambda: chat.main(["--model=m", "--prompt=Hi", f"--dtype={dtype}"]), dtype)
