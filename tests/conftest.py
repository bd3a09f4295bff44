"""Test setup: 8 simulated CPU devices for sharding tests, float32 matmuls, and no network."""

import os

from tests import cpu_xla

os.environ.setdefault("XLA_FLAGS", cpu_xla.flags(8))  # (and compiling faster: cpu_xla)
if cpu_xla.one_thread_flags():  # an xdist worker for each core: one thread each for XLA and torch (cpu_xla)
    os.environ["XLA_FLAGS"] = " ".join(dict.fromkeys([*os.environ["XLA_FLAGS"].split(), *cpu_xla.one_thread_flags()]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Every program into the persistent compilation cache (jax keeps only those of 1 s or more), where one is on: the
# trainers, servers and notebooks the tests start compile many of the same programs.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ["HF_HUB_OFFLINE"] = "1"  # always: a test that reaches for the hub fails instead of downloading
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ZEPHYR_JAX_CACHE", "")  # no tokenized-example cache unless a test passes data.cache_dir

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import json  # noqa: E402

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "long: a test of a minute or more on 2 cores (trainings or compiles in "
                            "subprocesses); started first")


def pytest_collection_modifyitems(items):
    """The long tests first, each group in collection order: xdist hands tests out in this order, and a long test
    handed out last kept one worker busy for a minute or two after the other had finished."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    """Kills what a test started and left running (a check that failed before its run was stopped), so that
    one failure cannot leave trainers or servers holding the CPU for the tests after it. Processes of longer-lived
    fixtures (a module's server) were started before this fixture looks, and are kept."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and not _shared_helper(p)]
    for p in left:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(left, timeout=10)


def _shared_helper(process) -> bool:
    """multiprocessing's resource tracker (or fork server): started by the first spawned worker, reused after."""
    try:
        command = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return "multiprocessing.resource_tracker" in command or "multiprocessing.forkserver" in command


@pytest.fixture
def assert_refused_dtype(capsys):
    """check(run_cli, dtype): a command-line tool refuses --dtype=dtype through argparse's choices (usage error,
    exit status 2), naming the value and every dtype it takes, before any model loads."""

    def check(run_cli, dtype: str) -> None:
        with pytest.raises(SystemExit) as exit_:
            run_cli()
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --dtype: invalid choice: '{dtype}'" in err, err
        assert all(name in err for name in ("float32", "bfloat16", "float16")), err

    return check


@pytest.fixture
def fail_for_good():
    """fail(engine): the engine's next decoding call consumes its cache and raises "device lost", and no cache can
    be made again ("RESOURCE_EXHAUSTED: no room for the cache"), so its loop's thread cannot go on."""

    def fail(engine) -> None:
        def lost():
            engine.cache.k.delete()
            raise RuntimeError("device lost")

        def no_memory():
            raise MemoryError("RESOURCE_EXHAUSTED: no room for the cache")

        engine._decode, engine._new_cache = lost, no_memory

    return fail


@pytest.fixture
def serve_logger(monkeypatch):
    """serve.main sets its logger up for the whole process (a handler, no propagation): put back after the test."""
    from zephyr_jax import serve

    for name, value in (("handlers", list(serve.log.handlers)), ("propagate", serve.log.propagate),
                        ("level", serve.log.level)):
        monkeypatch.setattr(serve.log, name, value)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random tiny Mistral (real 32000-token vocabulary) saved as a HF directory with the Zephyr tokenizer."""
    from flax import nnx

    from zephyr_jax import hf
    from zephyr_jax.model import Mistral, MistralConfig
    from zephyr_jax.tokenizer import load_tokenizer

    cfg = MistralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    path = str(tmp_path_factory.mktemp("tiny_model"))
    hf.save_pretrained(Mistral(cfg, rngs=nnx.Rngs(0)), path, tokenizer=load_tokenizer())
    return path


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """UltraChat-schema (sft/) and ultrafeedback_binarized-schema (prefs/) jsonl splits of a toy task."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 16)):
        sft, prefs = [], []
        for i in range(n):
            digits = rng.integers(0, 10, size=4)
            question = f"Which is the largest: {' '.join(map(str, digits))}?"
            wrong = str(digits.min()) if digits.min() != digits.max() else "none"
            user = {"role": "user", "content": question}
            good, bad = {"role": "assistant", "content": str(digits.max())}, {"role": "assistant", "content": wrong}
            sft.append({"prompt": question, "prompt_id": str(i), "messages": [user, good]})
            prefs.append({"prompt": question, "prompt_id": str(i), "chosen": [user, good], "rejected": [user, bad],
                          "messages": [user, good], "score_chosen": 9.0, "score_rejected": 2.0})
        _write_jsonl(root / "sft" / f"{split}_sft.jsonl", sft)
        _write_jsonl(root / "prefs" / f"{split}_prefs.jsonl", prefs)
    return root
