"""The training loop: CLI, meshes, gradient accumulation, multi-process, resume, preemption, DPO reference
modes, NaN and config errors. Tiny configs (configs/*.py:tiny) on small local data in the real schemas."""

import dataclasses
import functools
import glob
import json
import linecache
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from tests import cpu_xla
from zephyr_jax import checkpoint, export, hf, train, train_checks, train_log, train_steps
from zephyr_jax.config_common import load_config
from zephyr_jax.data import pack_pairs, pad_sft, preference_example, sft_example
from zephyr_jax.data.batches import loss_positions, multiples
from zephyr_jax.loading import load_model
from zephyr_jax.model import Mistral, MistralConfig
from zephyr_jax.tokenizer import load_tokenizer
from zephyr_jax.train_checks import ConfigError, ConfigPathError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _v3_tokenizer(tmp_path):
    """Mistral-7B-v0.3's tokenizer (768 control tokens first), from the sentencepiece model mistral-common ships."""
    import mistral_common

    from zephyr_jax.tokenizer import sentencepiece_tokenizer

    folder = tmp_path / "v3_tokenizer"
    sentencepiece_tokenizer(os.path.join(os.path.dirname(mistral_common.__file__), "data",
                                         "mistral_instruct_tokenizer_240323.model.v3")).save_pretrained(str(folder))
    return load_tokenizer(str(folder))


def tiny_config(stage, data_dir, **overrides):
    folder = "sft" if stage == "sft" else "prefs"
    return load_config(os.path.join(ROOT, "configs", f"{stage}.py:tiny"), **{
        "data.train": str(data_dir / folder), "data.eval": str(data_dir / folder), "train.progress": False,
        **overrides})


def split_records(workdir, split, file="metrics.jsonl"):
    """A run's records of one split ("train", "eval"), in the order written."""
    with open(os.path.join(workdir, file)) as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def train_losses(workdir):
    return [r["loss"] for r in split_records(workdir, "train")]


def _cli(*args, env=None, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout, **kw)


# Runs each (argv, env) pair in sys.argv[1] as `python -m zephyr_jax.train *argv`, with env added, would run: in a
# fork of one process that imported the trainer once (each command line's own process had ~5 s of imports). The
# fork ends as the interpreter ends a script: an uncaught exception's traceback on stderr and status 1; SystemExit's
# code.
_FORKED_TRAIN_CLI = """
import json, os, sys, tempfile, traceback
from zephyr_jax import train
results = []
for argv, env in json.loads(sys.argv[1]):
    with tempfile.TemporaryFile("w+") as err:
        pid = os.fork()
        if pid == 0:
            os.dup2(err.fileno(), 2)
            os.environ.update(env)
            sys.argv = [train.__file__, *argv]
            code = 0
            try:
                train.cli()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, int | None):
                    print(e.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        err.seek(0)
        results.append({"returncode": status, "stderr": err.read()})
print(json.dumps(results))
"""


def _train_cli_runs(*cases):
    """The returncode and stderr of `python -m zephyr_jax.train *argv` for each (argv, env) case, run as forks of one
    process (_FORKED_TRAIN_CLI). env: XLA_FLAGS only, which JAX reads when its backend starts, after the fork
    (JAX_* variables are read at import, before it)."""
    assert all(set(env) <= {"XLA_FLAGS"} for _, env in cases), cases
    out = subprocess.run([sys.executable, "-c", _FORKED_TRAIN_CLI, json.dumps(cases)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [types.SimpleNamespace(**r) for r in json.loads(out.stdout.splitlines()[-1])]


# --- The command line, end to end: dSFT -> dDPO from the SFT workdir -> export -> transformers. ---

@pytest.mark.long
def test_cli_sft_then_dpo_then_export(data_dir, tmp_path, monkeypatch):
    sft_dir, dpo_dir, hf_dir = tmp_path / "sft", tmp_path / "dpo", tmp_path / "hf"
    data = lambda folder: [f"--config.data.train={data_dir / folder}", f"--config.data.eval={data_dir / folder}"]
    out = _cli("zephyr_jax.train", "--config=configs/sft.py:tiny", f"--workdir={sft_dir}", *data("sft"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(train_losses(sft_dir)) == 6 and sorted(os.listdir(sft_dir / "checkpoints")) == ["3", "6"]
    assert json.load(open(sft_dir / "config.json"))["stage"] == "sft"
    out = _cli("zephyr_jax.train", "--config=configs/dpo.py:tiny", f"--workdir={dpo_dir}", *data("prefs"),
               "--config.model.init=orbax", f"--config.model.path={sft_dir}")
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in open(dpo_dir / "metrics.jsonl")]
    assert {"rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(records[-1])
    assert records[-1]["split"] == "eval"
    # The command with no JAX_PLATFORMS of the caller's: it starts the CPU backend alone (on one worker of a TPU
    # pod, starting the TPUs would wait for the other hosts), and prints the platforms JAX was left with.
    show_platforms = "; import jax; print('platforms:', jax.config.jax_platforms, *{d.platform for d in jax.devices()})"
    out = subprocess.run([sys.executable, "-c", "import sys; from zephyr_jax import export; export.cli(sys.argv[1:])"
                          + show_platforms, f"--workdir={dpo_dir}", f"--out={hf_dir}", "--dtype=float32"], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": ""}, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines()[-1] == "platforms: cpu cpu", out.stdout
    assert "rewards/accuracies" in open(hf_dir / "README.md").read()
    with open(dpo_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "split": "ev')  # a line cut short by a kill: skipped, as resuming skips it
    exported_dir = export.export(str(dpo_dir), str(tmp_path / "hf3"), step=3, dtype="float32")
    card = open(os.path.join(exported_dir, "README.md")).read()
    assert "step 3" in card and "| step | 3 |" in card and "| step | 6 |" not in card  # that step's metrics
    weights = lambda *a, **k: jax.tree.leaves(nnx.state(load_model(*a, **k)))  # and that step's weights
    exported, at_3, at_6 = (weights(str(tmp_path / "hf3"), "float32"), weights(str(dpo_dir), "float32", step=3),
                            weights(str(dpo_dir), "float32"))
    assert all(np.array_equal(a, b) for a, b in zip(exported, at_3, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(exported, at_6, strict=True))
    # The SFT checkpoint it started from; not model.arch, which configures random weights only (here the tiny
    # default, not the exported architecture).
    assert f"- init: orbax `{sft_dir}`, step 6" in card and '"arch"' not in card

    # Killed while writing the weights over an earlier export: no config.json (the sign of a complete export), and
    # the card is the new one (an export killed after its weights had none).
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    killed_dir = shutil.copytree(hf_dir, tmp_path / "hf4")
    monkeypatch.setattr(hf, "_write_safetensors", killed)
    with pytest.raises(KeyboardInterrupt):
        export.export(str(dpo_dir), str(killed_dir), step=3, dtype="float32")
    monkeypatch.undo()
    assert not os.path.exists(killed_dir / "config.json") and "| step | 3 |" in open(killed_dir / "README.md").read()
    with pytest.raises(ValueError, match="is the workdir itself"):
        export.export(str(dpo_dir), str(dpo_dir))
    with pytest.raises(ValueError, match="is a zephyr_jax training workdir .its config.json would be replaced"):
        export.export(str(dpo_dir), str(sft_dir))  # another run's: its training config.json was overwritten
    project = tmp_path / "project"  # a folder of other files: its README.md and config.json were replaced
    project.mkdir()
    (project / "README.md").write_text("# my notes\n")
    (project / "config.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match="is not empty and holds no Hugging Face model"):
        export.export(str(dpo_dir), str(project))
    assert (project / "README.md").read_text() == "# my notes\n" and sorted(os.listdir(project)) == [
        "README.md", "config.json"]
    os.remove(killed_dir / "model.safetensors")  # killed before its weights: only its card says what it is
    assert export.holds_a_model(str(killed_dir)) and not export.holds_a_model(str(project))
    os.remove(project / "README.md")  # other files, no card at all
    assert not export.holds_a_model(str(project))

    ours = load_model(str(dpo_dir), "float32")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tok("<|user|>\nWhich is the largest: 1 7 3 2?</s>\n<|assistant|>\n").input_ids
    with torch.no_grad():
        ref_logits = ref(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray([ids]))), ref_logits, atol=1e-4)


def test_config_mistakes_on_the_command_line_are_one_line_errors(tmp_path):
    sft = ["--config=configs/sft.py:tiny", f"--workdir={tmp_path}"]
    # A value out of range and a hub name the hub does not give (conftest sets HF_HUB_OFFLINE; it was two chained
    # tracebacks): the message, not a traceback that ends in it (train_checks.ConfigError).
    dpo_errors = (
        (["--config.optim.lr=-1"], "error: optim.lr=-1.0: must be positive"),
        (["--config.model.init=hf", "--config.model.path=someone/no-such-model"],
         "error: config.model.path: 'someone/no-such-model' is not a local directory and could not be fetched "
         "from the Hugging Face Hub (LocalEntryNotFoundError: "))
    no_key, seed_x, not_int, variant, sftt, sftt_no_variant, stray, no_coordinator, *dpo = _train_cli_runs(
        ([*sft, "--config.train.no_such_key=1"], {}), ([*sft, "--config.seed.x=1"], {}),
        ([*sft, "--config.train.max_steps=abc"], {}), (["--config=configs/sft.py:tiyn", f"--workdir={tmp_path}"], {}),
        *(([*config, f"--workdir={tmp_path}"], {}) for config in (["--config=configs/sftt.py:tiny", "--config.seed=1"],
                                                                 ["--config", "configs/sftt.py"])),
        ([*sft, "handbook"], {}), ([*sft, "--num_processes=2", "--process_id=1"], {}),
        *((["--config=configs/dpo.py:tiny", f"--workdir={tmp_path}", *overrides], {"XLA_FLAGS": cpu_xla.flags(8)})
          for overrides, _ in dpo_errors))
    out = no_key
    assert out.returncode != 0 and "Traceback" not in out.stderr  # one line, not ml_collections' traceback
    assert ("a --config override names a key the config does not have: 'no_such_key' (overrides given: "
            "--config.train.no_such_key)") in out.stderr
    out = seed_x
    assert out.returncode != 0 and "Traceback" not in out.stderr  # was ml_collections' KeyError and traceback
    assert "--config.seed.x: config.seed is a value, not a section with keys" in out.stderr
    out = not_int  # absl's own flag error (parse_flags' flags.Error): one line too
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "flag --config.train.max_steps=abc: invalid literal for int()" in out.stderr
    out = variant  # get_config's own error: ml_collections put its traceback into absl's message
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert ("FATAL Flags parsing error: flag --config=configs/sft.py:tiyn: ValueError: unknown variant 'tiyn': "
            "expected zephyr, handbook, demo or tiny") in out.stderr, out.stderr[-2000:]
    for out in (sftt, sftt_no_variant):  # was two chained tracebacks
        assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert "no file 'configs/sftt.py'" in out.stderr
    # A stray word (`--workdir=runs/sft handbook` meant the variant) was dropped: the default recipe trained
    out = stray
    assert out.returncode != 0 and "unexpected arguments ['handbook']: flags are --name=value" in out.stderr, \
        out.stderr[-2000:]
    # --num_processes / --process_id without a coordinator trained the whole job as process 0 of 1
    out = no_coordinator
    assert out.returncode != 0 and ("--num_processes, --process_id given: --coordinator_address, --num_processes "
                                    "and --process_id go together") in out.stderr, out.stderr[-2000:]
    for out, (_, message) in zip(dpo, dpo_errors, strict=True):
        assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert out.stderr.strip().splitlines()[-1].startswith(message), out.stderr[-2000:]


@pytest.mark.parametrize("stage, overrides, message", [
    ("sft", {"optim.lr": -1e-3}, r"optim.lr=-0.001: must be positive"),  # trained as gradient ascent
    ("sft", {"optim.warmup_ratio": 2.0}, r"optim.warmup_ratio=2.0: must lie in \[0, 1\]"),
    ("sft", {"optim.b2": 2.0}, r"optim.b2=2.0: must lie in \[0, 1\)"),
    ("sft", {"optim.weight_decay": -0.1}, r"optim.weight_decay=-0.1: must be at least 0"),
    ("sft", {"optim.clip_norm": -1.0}, r"optim.clip_norm=-1.0: must be 0 \(off\) or positive"),
    ("sft", {"optim.eps": 0.0}, r"optim.eps=0.0: must be positive"),  # NaN weights behind a finite step
    # NaN weights after a step whose loss and gradient norm were finite, saved as "the last good checkpoint"
    ("sft", {"optim.lr": float("inf")}, r"optim.lr=inf: must be positive and finite"),
    ("sft", {"optim.weight_decay": float("inf")}, r"optim.weight_decay=inf: must be at least 0 and finite"),
    ("sft", {"optim.eps": float("inf")}, r"optim.eps=inf: must be positive and finite"),  # every update 0
    ("sft", {"train.peak_tflops": -5.0}, r"train.peak_tflops=-5.0: must be 0 \(the data sheet's\) or positive"),
    ("sft", {"data.max_length": -5}, r"data.max_length=-5: must be at least 2"),  # was "a row of -5"
    ("sft", {"optim.schedule": "cosin"}, r"optim.schedule='cosin': expected one of"),  # raised after tokenizing
    ("sft", {"optim.mu_dtype": "bf16"}, r"optim.mu_dtype='bf16': expected one of float32, bfloat16, float16"),
    ("dpo", {"dpo.reference_dtype": "int8"}, r"dpo.reference_dtype='int8': expected one of"),
    ("sft", {"model.dtype": "float8_e4m3fn"}, r"model.dtype='float8_e4m3fn': expected one of"),  # learnt nothing
    ("sft", {"model.param_dtype": "float64"}, r"model.param_dtype='float64': expected one of"),  # ran as float32
    # no loss scaling: the LM head's small gradients underflowed to 0 (60% of its entries over 16k tokens)
    ("dpo", {"model.dtype": "float16"}, r"model.dtype=float16: training in float16 needs loss scaling"),
    ("sft", {"seed": -1}, r"config.seed=-1: must be a whole number >= 0"),  # numpy's error, after tokenizing
    # JAX keys take a seed's low 32 bits: 2**32 initialised as 0 did, and 2**63 was an OverflowError from jax.random
    ("sft", {"seed": 2 ** 32}, r"config.seed=4294967296: above 2\*\*32 - 1"),
    ("sft", {"model.arch.rope_theta": -1.0}, r"config.model.arch.rope_theta=-1.0: must be positive"),  # a NaN loss
    ("sft", {"model.arch.initializer_range": 0.0}, r"arch.initializer_range=0.0: must be positive"),  # no gradient
    # inf passed "positive": inf weights (NaN from the first step), or an MFU of NaN / 0 in every log line
    ("sft", {"model.arch.initializer_range": float("inf")}, r"arch.initializer_range=inf: must be positive and finite"),
    ("sft", {"model.arch.rope_theta": float("inf")}, r"arch.rope_theta=inf: must be positive and finite"),
    ("sft", {"model.arch.rope_theta": None}, r"arch.rope_theta=None: must be positive and finite"),  # (TypeError)
    ("sft", {"train.peak_tflops": float("nan")}, r"train.peak_tflops=nan: must be 0 \(the data sheet's\) or positive "
                                                 r"and finite"),
    ("sft", {"train.peak_tflops": float("inf")}, r"train.peak_tflops=inf: must be 0 \(the data sheet's\) or positive "
                                                 r"and finite"),
    ("sft", {"mesh.rules.embed": ("fsdp", "fsdp")}, r"sharding rule 'embed': \('fsdp', 'fsdp'\) names a mesh axis "
                                                   r"twice"),  # jax's DuplicateSpecError, naming no rule
    # The kernels' static needs, found by the first step after the data work:
    ("sft", {"model.attention_impl": "cudnn"}, r"attention_impl='cudnn' with model.dtype='float32'"),
    ("sft", {"model.attention_impl": "flash"}, r"model.attention_impl='flash': expected one of \('auto'"),
    ("sft", {"model.remat": "partial"}, r"model.remat='partial': expected one of \('none'"),  # (MistralConfig's)
    ("sft", {"model.attention_impl": "splash", "data.max_length": 100, "data.buckets": ()},
     r"attention_impl='splash' needs lengths that are multiples of 128; batches here can be 100 long"),
    ("dpo", {"dpo.precompute_reference": True, "dpo.reference_free": True},
     r"precompute_reference=True with dpo.reference_free=True"),  # the precompute was skipped, unsaid
    ("dpo", {"dpo.beta": 0.0}, r"config.dpo \(beta=0.0.*beta must be positive"),  # raised after the reference pass
    # every loss NaN from the first step (inf x a margin of 0), found after the data work and the compile
    ("dpo", {"dpo.beta": float("inf")}, r"config.dpo \(beta=inf.*beta must be positive and finite, got inf"),
    ("dpo", {"dpo.label_smoothing": 0.7}, r"label_smoothing must be in \[0, 0.5\]"),
    ("dpo", {"data.max_prompt_length": 0}, r"data.max_prompt_length=0 must be at least 1"),  # cut prompts to BOS
    # 0 read no row and blamed the data ("no usable examples ... skipped 0 of 0 rows"); -5 read every row
    ("sft", {"data.max_train_examples": 0}, r"data.max_train_examples=0: must be -1 \(all\) or positive"),
    ("dpo", {"data.max_eval_examples": -5}, r"data.max_eval_examples=-5: must be -1 \(all\) or positive"),
    ("sft", {"train.num_epochs": 0, "train.max_steps": -1}, r"train.num_epochs=0 .*nothing to train"),
    ("dpo", {"data.packed_rows": -8}, r"data.packed_rows=-8: must be 0 \(automatic\) or positive"),
    # unpacked, a pair is two rows whatever it says (as label_smoothing with a loss that does not smooth)
    ("dpo", {"data.packing": False, "data.packed_rows": 8}, r"data.packed_rows=8 applies only with data.packing=True"),
    # More rows than a batch has sequences (2 x 8 pairs) are padding only; 2**31 rows hung building the batches
    ("dpo", {"data.packed_rows": 24}, r"data.packed_rows=24: more rows than the 16 sequences of a global batch"),
    ("sft", {"data.pack_window": -5}, r"data.pack_window=-5: must be 0 \(automatic\) or positive"),  # no data
    ("dpo", {"data.num_proc": -1}, r"data.num_proc=-1: must be 0 \(automatic\) or positive"),  # one process, unsaid
    ("dpo", {"data.buckets": ("",)}, r"data.buckets=\(''.*expected whole numbers"),  # "--config.data.buckets="
    # An example of 100 tokens was padded to 256 positions, with max_length 128 (2.6x its compute on padding)
    ("sft", {"data.packing": False, "data.buckets": (64, 256)},
     r"data.buckets=\(64, 256\): 256 is longer than data.max_length=128"),
    ("dpo", {"data.packing": False, "data.buckets": (64, 129)},
     r"data.buckets=\(64, 129\): 129 is longer than data.max_length=128"),
    ("sft", {"data.buckets": (128, 129)}, r"data.buckets=\(128, 129\): 129 is longer than data.max_length=128"),
    ("sft", {"data.buckets": (0, 128)}, r"data.buckets=\(0, 128\): a bucket of 0 positions"),
    ("sft", {"mesh.shape": (1.0, -1, 1)}, r"mesh.shape=\(1.0, -1, 1\): expected whole numbers"),
    ("sft", {"train.profile_start": 5, "train.profile_steps": 0}, r"train.profile_steps=0 .*at least 1"),
    ("sft", {"train.profile_start": -1}, r"train.profile_start=-1: must be 0 \(off\) or positive"),
    ("sft", {"data.on_bad_row": "skipp"}, r"data.on_bad_row='skipp': expected one of"),  # raised after reading
    ("sft", {"data.eval": ""}, r"data.eval is empty"),  # no data files for split 'test_sft' in '.'
    ("dpo", {"data.eval": "/no/such/prefs"}, r"data.eval='/no/such/prefs': no such file"),  # after data.train's work
    ("sft", {"data.loss_on": "assistants"}, r"data.loss_on='assistants': expected one of"),
    ("sft", {"stage": "dpo"}, r"config.stage='dpo' in a config without a dpo section"),
    ("sft", {"stage": "ppo"}, r"config.stage='ppo': expected 'sft' or 'dpo'"),
    ("dpo", {"model.init": "hub"}, r"config.model.init='hub': expected 'hf', 'orbax' or 'random'"),
    ("dpo", {"stage": "sft"}, r"config.stage='sft' in a config with a dpo section"),
    # The checkpoint's architecture is trained; the override would be written to config.json as if it were.
    ("dpo", {"model.init": "orbax", "model.arch.num_hidden_layers": 5},
     r"config.model.arch \(num_hidden_layers\) applies only to model.init='random'"),
    # A step of a random or Hugging Face init was ignored: the run trained from other weights than the step named
    ("dpo", {"model.step": 5}, r"config.model.step=5 applies only to model.init='orbax'"),
    ("dpo", {"model.step": 0}, r"config.model.step=0 applies only to model.init='orbax'"),  # -1 alone means unset
    # Each bound where it lies (the values just past it), not only far outside:
    ("sft", {"seed": None}, r"config.seed=None: the setting takes a value"),  # was a TypeError from "<"
    # None and booleans, which ConfigDict takes for any key from Python (the command line refuses them): a
    # TypeError from the range checks that named no key, or another setting without a word
    ("sft", {"train.global_batch_size": None}, r"config.train.global_batch_size=None: the setting takes a value"),
    ("dpo", {"optim.lr": None}, r"config.optim.lr=None: the setting takes a value"),
    ("dpo", {"data.max_prompt_length": None}, r"config.data.max_prompt_length=None: the setting takes a value"),
    ("sft", {"data.packing": None}, r"config.data.packing=None: the setting takes a value"),  # trained unpacked
    ("dpo", {"dpo.beta": None}, r"config.dpo.beta=None: the setting takes a value"),  # a TypeError in the step
    ("sft", {"train.global_batch_size": True}, r"config.train.global_batch_size=True: a number, not a boolean"),
    ("dpo", {"data.max_prompt_length": False}, r"config.data.max_prompt_length=False: a number, not a boolean"),
    ("sft", {"model.arch.rms_norm_eps": 0.0}, r"config.model.arch.rms_norm_eps=0.0: must be positive"),  # 0/0 NaN
    # Ids past the embedding went to the export's config.json and generation_config.json (an EOS never emitted)
    ("sft", {"model.arch.eos_token_id": 32000}, r"config.model.arch.eos_token_id=32000: a token id in \[0, "
                                                r"vocab_size=32000\)"),
    ("dpo", {"model.arch.bos_token_id": -1}, r"config.model.arch.bos_token_id=-1: a token id in \[0, vocab_size="),
    ("sft", {"model.arch.eos_token_id": True}, r"config.model.arch.eos_token_id=True: a token id in \[0, "),  # not 1
    ("sft", {"model.arch.pad_token_id": 40000}, r"config.model.arch.pad_token_id=40000: a token id in \[0, "),
    ("sft", {"train.global_batch_size": 0}, r"train.global_batch_size=0: must be at least 1"),
    ("sft", {"train.grad_accum": 0}, r"train.grad_accum=0: must be at least 1"),
    ("sft", {"train.save_every": -1}, r"train.save_every=-1: must be 0 \(off\) or positive"),
    ("sft", {"train.eval_every": -1}, r"train.eval_every=-1: must be 0 \(off\) or positive"),
    ("sft", {"train.grad_accum": 3}, r"train.global_batch_size=8 is not divisible by train.grad_accum=3"),
    ("sft", {"train.num_epochs": 0, "train.max_steps": 0}, r"train.num_epochs=0 with train.max_steps=0: nothing"),
    # optax counts steps in int32; 2**31 steps were a 16 GiB MemoryError listing their learning rates
    ("sft", {"train.max_steps": 2 ** 31}, r"train.max_steps=2147483648: above 2\*\*31 - 1"),
    ("sft", {"data.max_length": 1}, r"data.max_length=1: must be at least 2"),  # one token predicts nothing
    # Positions are int32: the packed dDPO row lengths up to it were listed first (a MemoryError naming nothing)
    ("dpo", {"data.max_length": 2 ** 31}, r"data.max_length=2147483648: above 2\*\*31 - 1"),
    ("dpo", {"data.max_prompt_length": 128}, r"data.max_prompt_length=128 must be at least 1 and below "
                                             r"data.max_length=128"),  # no room left for a completion
    ("sft", {"optim.b1": 1.0}, r"optim.b1=1.0: must lie in \[0, 1\)"),  # Adam's bias correction divides by 0
    ("sft", {"optim.b2": 1.0}, r"optim.b2=1.0: must lie in \[0, 1\)"),
    ("sft", {"train.peak_tflops": -0.5}, r"train.peak_tflops=-0.5: must be 0 \(the data sheet's\) or positive"),
    ("sft", {"model.attention_impl": "splash", "data.max_length": 192, "data.buckets": (192,)},
     r"attention_impl='splash' needs lengths that are multiples of 128; batches here can be 192 long"),
    ("dpo", {"model.attention_impl": "splash", "data.packing": False, "data.max_length": 192},  # unpacked pairs
     r"attention_impl='splash' needs lengths that are multiples of 128; batches here can be 192 long"),
])
def test_config_values_out_of_range_are_named_before_anything_runs(data_dir, stage, overrides, message):
    cfg = tiny_config(stage, data_dir, **{k: v for k, v in overrides.items() if k != "stage"})
    cfg.stage = overrides.get("stage", stage)
    with pytest.raises(ConfigError, match=message):  # (the command line prints it as one line)
        train_checks.check_config(cfg)


@pytest.mark.parametrize("stage, overrides", [
    ("sft", {"optim.warmup_ratio": 1.0, "optim.b1": 0.0, "optim.b2": 0.0, "optim.clip_norm": 0.0, "seed": 0,
             "train.peak_tflops": 0.0, "train.eval_every": 0, "train.save_every": 0}),
    ("sft", {"model.param_dtype": "float16", "optim.mu_dtype": "float16"}),
    ("dpo", {"dpo.reference_dtype": "float16"}),
    ("sft", {"data.max_length": 2, "data.buckets": (2,)}),  # packed dSFT rows: exactly max_length
    ("sft", {"data.packing": False, "data.max_length": 64, "data.buckets": (32, 63)}),  # 64 tokens: 63 positions
    ("dpo", {"data.max_length": 64, "data.max_prompt_length": 63, "data.buckets": (63,)}),
    ("sft", {"data.packing": False, "data.buckets": (1, 128)}),  # a two-token example's one position; max_length's
    ("dpo", {"data.buckets": (64, 129, 1024)}),  # packed dDPO rows hold several sequences: past max_length
    ("sft", {"train.max_steps": 1, "train.num_epochs": 0}),  # a step count stands in for epochs
    ("sft", {"model.attention_impl": "splash", "data.max_length": 256}),  # default buckets 128, 256
    ("dpo", {"model.attention_impl": "splash", "data.max_length": 192}),  # packed pairs: rows in 128s
    ("dpo", {"dpo.label_smoothing": 0.5}),  # conservative DPO's bound is inclusive (robust DPO's is not)
    ("sft", {"data.max_train_examples": None, "data.max_eval_examples": 1}),  # None: all, as the pipeline reads it
    ("dpo", {"tokenizer": None, "data.cache_dir": None, "data.data_dir": None, "logging.wandb_project": None,
             "data.train_split": None, "train.compilation_cache_dir": None}),  # unset (a placeholder), or off
    ("dpo", {"data.eval_split": None, "data.max_eval_examples": None}),
    ("sft", {"mesh.rules.embed": None}),  # replicated, as sharding.py reads it (its rules are its to check)
    ("sft", {"model.arch.eos_token_id": 31999, "model.arch.bos_token_id": 0, "model.arch.pad_token_id": None}),
])
def test_config_values_at_the_edges_of_their_ranges_are_taken(data_dir, stage, overrides):
    """The other side of each bound: a warmup over the whole run, Adam without momentum, float16 weights and
    moments, a float16 frozen reference, two-token sequences, buckets of exactly the positions an example needs, a
    prompt one token below max_length, a step count with no epochs, splash over lengths that are multiples of 128:
    each a setting that trains, and check_config lets it through."""
    train_checks.check_config(tiny_config(stage, data_dir, **overrides))


def _setting(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


# The recipe as the Zephyr paper (arXiv 2310.16944, sections 4-5) and the alignment-handbook's 2024-01 revision
# of recipes/zephyr-7b-beta give it (../shared/RECIPE.md), written here from those sources, not from the configs.
_SFT_PAPER = {"model.init": "hf", "model.path": "mistralai/Mistral-7B-v0.1", "model.dtype": "bfloat16",
              "data.train": "HuggingFaceH4/ultrachat_200k", "data.train_split": "train_sft",
              "data.eval_split": "test_sft", "data.max_length": 2048, "data.packing": True, "data.loss_on": "all",
              "optim.lr": 2e-5, "optim.schedule": "cosine", "optim.warmup_ratio": 0.1, "optim.weight_decay": 0.0,
              "train.global_batch_size": 512, "train.num_epochs": 1}
_DPO_PAPER = {"model.init": "orbax", "model.dtype": "bfloat16", "data.train": "HuggingFaceH4/ultrafeedback_binarized",
              "data.train_split": "train_prefs", "data.eval_split": "test_prefs", "data.max_length": 1024,
              "data.max_prompt_length": 512, "dpo.beta": 0.1, "dpo.loss_type": "sigmoid", "dpo.label_smoothing": 0.0,
              "dpo.reference_free": False, "optim.lr": 5e-7, "optim.schedule": "linear", "optim.warmup_ratio": 0.1,
              "optim.weight_decay": 0.0, "train.global_batch_size": 32, "train.num_epochs": 3}


@pytest.mark.parametrize("spec, expected", [
    ("sft.py", _SFT_PAPER), ("sft.py:zephyr", _SFT_PAPER),
    ("sft.py:handbook", {**_SFT_PAPER, "train.global_batch_size": 128}),
    ("dpo.py", _DPO_PAPER), ("dpo.py:zephyr", _DPO_PAPER),
    ("dpo.py:handbook", {**_DPO_PAPER, "dpo.beta": 0.01, "optim.schedule": "cosine", "train.num_epochs": 1,
                         "train.global_batch_size": 128}),
])
def test_the_recipe_configs_carry_the_papers_and_the_handbooks_numbers(spec, expected):
    """A mistyped number in configs/*.py trains another recipe for hours, and no run says so: the zephyr variant
    (the default) holds the paper's values, handbook the handbook revision's, and both HF Trainer's AdamW,
    clipping and seed defaults (transformers.TrainingArguments', which the recipe ran with)."""
    trainer = {f.name: f.default for f in dataclasses.fields(transformers.TrainingArguments)}
    expected = {**expected, "optim.b1": trainer["adam_beta1"], "optim.b2": trainer["adam_beta2"],
                "optim.eps": trainer["adam_epsilon"], "optim.clip_norm": trainer["max_grad_norm"],
                "seed": trainer["seed"]}
    cfg = load_config(os.path.join(ROOT, "configs", spec))
    assert {k: _setting(cfg, k) for k in expected} == expected
    train_checks.check_config(cfg, check_model_source=False)


def test_token_ids_up_to_the_last_embedding_are_taken_and_one_past_is_refused():
    """An id equal to the vocabulary size has no embedding row (ids run 0 .. vocab_size - 1); every array of a
    preference pair is read, the rejected completion's too."""
    sft = lambda *ids: types.SimpleNamespace(ids=np.asarray(ids))  # noqa: E731
    pair = lambda rejected: types.SimpleNamespace(prompt=np.asarray([1, 5]), chosen=np.asarray([7, 2]),  # noqa: E731
                                                  rejected=np.asarray(rejected))
    train_checks.check_token_ids([sft(1, 999), sft()], 1000, "data.train (x)")
    train_checks.check_token_ids([pair([999, 2])], 1000, "data.train (x)")
    for examples in ([sft(1, 1000)], [pair([1000, 2])]):
        with pytest.raises(ConfigError, match=r"data.train \(x\) holds token id 1000, but the model's vocabulary has "
                                              r"1000 entries: config.tokenizer='t' has tokens the model lacks"):
            train_checks.check_token_ids(examples, 1000, "data.train (x)", "config.tokenizer='t'")
    # A random model's special ids (config.json and generation_config.json name them), a list of EOS ids too
    arch = ml_collections.ConfigDict({"vocab_size": 1000, "bos_token_id": 0, "eos_token_id": [2, 999]})
    train_checks.check_special_token_ids(arch)
    arch.eos_token_id = [2, 1000]
    with pytest.raises(ConfigError, match=r"config.model.arch.eos_token_id=\[2, 1000\]: a token id in \[0, "
                                          r"vocab_size=1000\)"):
        train_checks.check_special_token_ids(arch)


@pytest.mark.parametrize("stage, change, named", [
    ("sft", {"data.max_length": 64}, "data.max_length: 128 -> 64"),
    ("sft", {"data.loss_on": "assistant"}, "data.loss_on: 'all' -> 'assistant'"),
    ("sft", {"data.too_long": "drop"}, "data.too_long: 'truncate' -> 'drop'"),
    ("sft", {"data.packing": False}, "data.packing: True -> False"),
    ("sft", {"data.pack_window": 10}, "data.pack_window: 1000 -> 10"),
    ("sft", {"data.max_train_examples": 32}, "data.max_train_examples: 64 -> 32"),
    ("sft", {"model.arch.hidden_size": 32}, "Changed: model.arch.hidden_size: 64 -> 32. Use"),  # not both sections
    ("dpo", {"data.max_prompt_length": 32}, "data.max_prompt_length: 64 -> 32"),
    ("dpo", {"data.packed_rows": 8}, "data.packed_rows: 0 -> 8"),
])
def test_resuming_refuses_each_change_of_what_the_batches_are_made_of(data_dir, tmp_path, stage, change, named):
    """Another length limit, loss mask, truncation rule, packing or example count makes other batches: the saved
    step and loader position would point into another run. Refused, naming the change, before anything is read."""
    workdir = tmp_path / "w"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text(tiny_config(stage, data_dir).to_json_best_effort())
    assert train_checks.resume_settings(tiny_config(stage, data_dir), str(workdir))
    with pytest.raises(ConfigError, match=f"holds checkpoints of a run with other settings.*{re.escape(named)}"):
        train_checks.resume_settings(tiny_config(stage, data_dir, **change), str(workdir))


def test_resuming_names_a_tokenizer_folder_as_the_run_recorded_it_in_any_spelling(data_dir, tmp_path):
    """The recorded tokenizer folder, given with a trailing slash or through "..", is the same tokenizer (as a data
    folder is): the run resumes."""
    workdir, folder = tmp_path / "w", tmp_path / "tok"
    (workdir / "checkpoints" / "3").mkdir(parents=True)
    (workdir / "config.json").write_text(tiny_config("sft", data_dir, tokenizer=str(folder)).to_json_best_effort())
    for spelling in (str(folder) + "/", str(tmp_path / "w" / ".." / "tok")):
        assert train_checks.resume_settings(tiny_config("sft", data_dir, tokenizer=spelling), str(workdir))
    with pytest.raises(ConfigError, match=r"tokenizer: '.*tok' -> '.*other'"):
        train_checks.resume_settings(tiny_config("sft", data_dir, tokenizer=str(tmp_path / "other")), str(workdir))


def test_a_relative_glob_is_recorded_absolute_and_urls_and_hub_names_as_given(data_dir, monkeypatch):
    """A relative glob of local files (data.train="sft/*.jsonl"), which no file is named, is made absolute as a
    folder is, so a run resumed from another directory reads the same files; a URL, also one with a glob that
    fsspec expands (gs://bucket/train-*.jsonl), and a hub name are kept as given (made absolute, a URL became a
    local path under the working directory)."""
    monkeypatch.chdir(data_dir)
    recorded = train.absolute_if_local("sft/*_sft.jsonl")
    assert sorted(glob.glob(recorded)) == [str(data_dir / "sft" / f"{s}_sft.jsonl") for s in ("test", "train")]
    assert recorded == os.path.join(os.getcwd(), "sft", "*_sft.jsonl")
    for kept in ("gs://bucket/train-*.jsonl", "https://host/data/part-[0-9].jsonl", "HuggingFaceH4/ultrachat_200k"):
        assert train.absolute_if_local(kept) == kept


def test_an_hf_model_path_that_is_a_missing_directory_is_named(data_dir, tmp_path):
    """An absolute or ./ path is a directory, never a hub name: one that is not there is said before the data work
    (the hub client would ask for a valid repo id, or try the network)."""
    for path in (str(tmp_path / "no_model"), "./no_model_here"):
        with pytest.raises(FileNotFoundError, match=f"config.model.path={re.escape(repr(path))}: no such Hugging Face "
                                                    "checkpoint directory"):
            train_checks.check_config(tiny_config("dpo", data_dir, **{"model.init": "hf", "model.path": path}))
    # A hub name the hub does not give (offline here): named as the setting, which the command prints in one line
    hub = tiny_config("dpo", data_dir, **{"model.init": "hf", "model.path": "no-such-org/no-such-model"})
    with pytest.raises(ConfigPathError, match=r"^config.model.path: 'no-such-org/no-such-model' is not "):
        train.run(hub, str(tmp_path / "run"))


def test_a_wrong_or_damaged_hf_checkpoint_is_named_before_the_data_work(data_dir, tmp_path, monkeypatch):
    """model.init='hf' weights of other shapes than their config.json gives, or a file cut short, were found while
    reading them, after tokenizing both splits (minutes on UltraChat), as a traceback: now from the headers and
    file sizes (hf.check_weights), before any data is read, as a ConfigError naming the setting."""
    from tests.torch_reference import save_torch, torch_mistral

    path = save_torch(torch_mistral(vocab_size=32000), tmp_path / "hf")
    monkeypatch.setattr(train, "load_examples", lambda *a, **k: pytest.fail("data read before the weights' check"))
    cfg = lambda: tiny_config("sft", data_dir, **{"model.init": "hf", "model.path": path})  # noqa: E731
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(ConfigError, match=rf"config.model.path='{re.escape(path)}': .*model.safetensors: tensor "
                                          r"model.layers.\d.mlp.\w+_proj.weight has shape \((96, 64|64, 96)\), but the "
                                          r"config needs \((128, 64|64, 128)\)"):
        train.run(cfg(), str(tmp_path / "w"))
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    weights = tmp_path / "hf" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 100)
    with pytest.raises(ConfigError, match=r"model.safetensors is truncated inside tensor "):
        train.run(cfg(), str(tmp_path / "w"))


def test_packed_dpo_buckets_must_hold_the_fullest_row_a_batch_can_make():
    """Packed dDPO rows hold several sequences; data.buckets that hold one example of max_length (all check_config
    can ask) but not a row of them made the first batch of long pairs fail, mid-run: refused as the batcher is
    made. The default (no buckets) and buckets that reach the bound are taken."""
    cfg = load_config("configs/dpo.py:zephyr", **{"data.buckets": (256, 512, 1024)})
    train_checks.check_buckets(cfg)  # one example fits
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 1})
    with pytest.raises(ConfigError, match=r"data.buckets=\(256, 512, 1024\): 32 pairs packed into 16 rows may need "
                                          r"rows of 5120 positions"):
        train.preference_batcher(cfg, mesh, 32)
    cfg.data.buckets = (1024, 5120)
    train.preference_batcher(cfg, mesh, 32)
    cfg.data.buckets = ()
    train.preference_batcher(cfg, mesh, 32)


def test_packed_dpo_buckets_too_short_are_refused_before_the_data_is_read(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(train, "load_examples", lambda *a, **k: pytest.fail("the data was read first"))
    with pytest.raises(ConfigError, match=r"data.buckets=\(128,\): .* more than the largest bucket"):
        train.run(tiny_config("dpo", data_dir, **{"data.buckets": (128,), "model.init": "random"}),
                  str(tmp_path / "w"))
    # Buckets that hold a train batch's rows (8 pairs in 8 rows: 384) but not an eval batch's (32 pairs in 16
    # rows): refused with the train batch's, not at the first eval, after train.eval_every steps (reference-free)
    with pytest.raises(ConfigError, match=r"data.buckets=\(128, 256, 384\): 32 pairs packed into 16 rows may need "
                                          r"rows of 640 positions"):
        train.run(tiny_config("dpo", data_dir, **{"data.buckets": (128, 256, 384), "dpo.reference_free": True}),
                  str(tmp_path / "w2"))
    # An eval split smaller than an eval batch goes in fewer pairs (train.eval_size), whose rows may be fuller: 20
    # pairs in 16 rows need 512 positions, 16 pairs in 8 rows (the 8 devices' rows) 640; refused once the split is
    # read, before the model is built (it was the first eval's error, after train.eval_every steps)
    monkeypatch.undo()
    monkeypatch.setattr(train, "init_params", lambda *a, **k: pytest.fail("the model was built first"))
    with pytest.raises(ConfigError, match=r"data.buckets=\(128, 256, 384, 512\): 16 pairs packed into 8 rows may "
                                          r"need rows of 640 positions"):
        train.run(tiny_config("dpo", data_dir, **{"data.buckets": (128, 256, 384, 512), "dpo.reference_free": True,
                                                  "train.eval_batch_size": 20, "data.max_eval_examples": 16}),
                  str(tmp_path / "w3"))
    # A train split as small goes through eval batches only for precomputed reference log-probs: else its run
    # passes the checks (it was refused, by an eval batch of its pairs that never runs)
    small_train = {"data.buckets": (128, 256, 384, 512), "train.eval_batch_size": 20, "data.max_train_examples": 16,
                   "data.eval_split": "train_prefs", "data.max_eval_examples": 40}

    class Built(Exception):
        pass

    def built(*args, **kwargs):
        raise Built

    monkeypatch.setattr(train, "init_params", built)
    with pytest.raises(Built):  # every check passed
        train.run(tiny_config("dpo", data_dir, **small_train), str(tmp_path / "w4"))
    with pytest.raises(ConfigError, match=r"16 pairs packed into 8 rows may need rows of 640 positions"):
        train.run(tiny_config("dpo", data_dir, **small_train, **{"dpo.precompute_reference": True}),
                  str(tmp_path / "w5"))


def test_packed_dpo_rows_split_over_the_mesh_and_eval_batches_keep_the_train_rows_fill():
    """A packed batch's rows, not its pairs, split over the batch shards: the recipe's 32 pairs go into rows a
    multiple of 64 on 64 chips. data.packed_rows counts the rows of train.global_batch_size pairs: an eval batch
    of twice the pairs gets twice the rows (it had the train batch's rows, each twice as long)."""
    cfg = load_config("configs/dpo.py:zephyr")
    mesh = lambda fsdp: types.SimpleNamespace(shape={"data": 1, "fsdp": fsdp, "tensor": 1})  # noqa: E731
    train.check_batch_fits_mesh(cfg, mesh(64))
    assert [train.preference_rows_for(cfg, mesh(f), 32, 1) for f in (1, 8, 64)] == [16, 16, 64]
    assert train.preference_rows_for(cfg, mesh(8), 32, 4) == 32  # 4 micro-batches of 8 rows
    cfg.data.packed_rows = 8
    assert [train.preference_rows_for(cfg, mesh(8), pairs, 1) for pairs in (32, 64, 8)] == [8, 16, 8]
    assert train.preference_rows_for(cfg, mesh(1), 6, 1) == 2  # 12 sequences, at most 8 a row: rounded up
    cfg.train.grad_accum = 2  # each micro-batch's 4 rows, not only the batch's 8, must divide over the 8 shards
    with pytest.raises(ConfigError, match=r"data.packed_rows=8 must be a multiple of .* \(2 x 8\)"):
        train.check_batch_fits_mesh(cfg, mesh(8))
    cfg.train.grad_accum = 1
    cfg.data.packing = False  # a row per sequence: 2 x 32 rows
    train.check_batch_fits_mesh(cfg, mesh(64))
    with pytest.raises(ConfigError, match=r"rows of a micro-batch \(2 x global_batch_size / grad_accum pairs\)=64 "
                                          r"does not divide over the mesh's data x fsdp = 128 batch shards"):
        train.check_batch_fits_mesh(cfg, mesh(128))
    # An evaluation of the run's checkpoint (training=False) splits its eval batches only: not the micro-batches,
    # nor the packed rows of one
    cfg.train.eval_batch_size = 64
    train.check_batch_fits_mesh(cfg, mesh(128), training=False)
    cfg.data.packing, cfg.train.grad_accum = True, 2
    train.check_batch_fits_mesh(cfg, mesh(8), training=False)


@pytest.mark.parametrize("variant, overrides", [
    ("zephyr", {}), ("handbook", {}), ("demo", {}), ("tiny", {}),
    ("zephyr", {"model.dtype": "float32"}),  # float32 compute, the bf16 copy
    ("zephyr", {"model.dtype": "float32", "dpo.precompute_reference": True}),  # scored by the policy itself
    ("demo", {"dpo.reference_dtype": "bfloat16"}),
    ("zephyr", {"dpo.reference_dtype": "float16"}),  # as wide as bf16 compute, other roundings
    ("zephyr", {"dpo.reference_dtype": "float32"}),  # wider than bf16 compute: exact (cast to bf16, the policy)
    ("zephyr", {"model.dtype": "float32", "model.param_dtype": "bfloat16"}),  # the weights' own dtype: exact
])
def test_a_note_says_when_the_frozen_reference_is_not_the_initial_policy(variant, overrides):
    """The note appears exactly where the stored copy, computed at model.dtype, differs from the policy's weights
    at model.dtype (weights stored at model.param_dtype)."""
    cfg = load_config(os.path.join(ROOT, "configs", f"dpo.py:{variant}"), **overrides)
    weights = jnp.asarray(np.random.default_rng(0).standard_normal(1000), cfg.model.param_dtype)
    policy = weights.astype(cfg.model.dtype)
    copy = weights.astype(cfg.dpo.reference_dtype).astype(cfg.model.dtype)
    exact = cfg.dpo.precompute_reference or bool(jnp.all(copy == policy))
    note = train.rounded_reference_note(cfg)
    assert (note is None) == exact, (variant, overrides, note)
    if note:
        assert f"dpo.reference_dtype={cfg.dpo.reference_dtype} is not model.dtype={cfg.model.dtype}" in note


def test_the_setting_notes_and_a_rotated_away_init_step_name_their_settings(monkeypatch):
    """What train.run prints of settings that run otherwise than they read, and a resumed run's init step gone."""
    cfg = load_config(os.path.join(ROOT, "configs", "dpo.py:tiny"), **{"train.grad_accum": 2, "model.remat": "none"})
    mesh = types.SimpleNamespace(shape={"tensor": 2})
    model = types.SimpleNamespace(num_key_value_heads=3, max_position_embeddings=1 << 20)
    notes = train.setting_notes(cfg, model, mesh)
    assert len(notes) == 2 and notes[0].startswith("the 3 KV heads do not split over tensor=2")
    assert "model.remat='none' has no effect" in notes[1]
    cfg = load_config(os.path.join(ROOT, "configs", "dpo.py:tiny"))
    model.num_key_value_heads = 4
    assert train.setting_notes(cfg, model, mesh) == []
    # a frozen reference rounded to bfloat16 and positions past the model's: each function's own note, in order
    cfg = load_config(os.path.join(ROOT, "configs", "dpo.py:tiny"), **{"dpo.reference_dtype": "bfloat16"})
    model.max_position_embeddings = cfg.data.max_length - 1
    notes = [train.rounded_reference_note(cfg), train.positions_note(cfg, model)]
    assert all(notes) and train.setting_notes(cfg, model, mesh) == notes

    def gone(path, step):
        raise FileNotFoundError(f"no step {step}")

    monkeypatch.setattr(checkpoint, "resolve_step", gone)
    with cfg.unlocked():
        cfg.model.init, cfg.model.path, cfg.model.step = "orbax", "/sft", 7
    with pytest.raises(ConfigPathError, match=r"config.model.path=/sft, config.model.step=7: no step 7"):
        train.orbax_init_step(cfg, "/dpo", resumed=False)
    with pytest.raises(ConfigPathError, match=r"/dpo started from step 7 of config.model.path=/sft, which is gone"):
        train.orbax_init_step(cfg, "/dpo", resumed=True)


def test_a_note_says_when_data_max_length_passes_the_models_max_position_embeddings(data_dir):
    """Allowed (transformers and the Engine take longer inputs: RoPE has no limit), and said."""
    for positions, said in ((128, False), (127, True)):  # tiny: data.max_length=128
        cfg = tiny_config("sft", data_dir, **{"model.arch.max_position_embeddings": positions})
        mcfg = train.model_config(cfg)
        note = train.positions_note(cfg, mcfg)
        assert (note is not None) == said, (positions, note)
    assert note.startswith("data.max_length=128 is above the model's max_position_embeddings=127 "
                           "(config.model.arch): training goes on"), note
    with cfg.unlocked():  # a model read from a path is named by it
        cfg.model.init, cfg.model.path = "hf", "/models/mistral"
    assert "max_position_embeddings=127 (/models/mistral): training" in train.positions_note(cfg, mcfg)


def test_load_config_names_a_key_the_config_lacks():
    # a dDPO section / key on the dSFT config; a key below a value (seed is a number: was "int is not iterable")
    for key in ("dpo.beta", "train.max_stepz", "data.packed_rows", "seed.x", "train.max_steps.y"):
        with pytest.raises(KeyError, match=f"configs/sft.py:tiny has no key '{key}'"):
            load_config(os.path.join(ROOT, "configs", "sft.py:tiny"), **{key: 1})


def test_a_random_model_takes_every_architecture_field_from_the_command_line():
    """config.model.arch held only TINY_ARCH's sizes: rope_theta, head_dim or tied embeddings were unknown keys."""
    changes = {"rope_theta": 1e6, "head_dim": 32, "tie_word_embeddings": True, "rms_norm_eps": 1e-6}
    tiny, sft = os.path.join(ROOT, "configs", "sft.py:tiny"), os.path.join(ROOT, "configs", "sft.py")
    mcfg = train.model_config(load_config(tiny, **{f"model.arch.{k}": v for k, v in changes.items()}))
    assert {k: getattr(mcfg, k) for k in changes} == changes and mcfg.hidden_size == 64
    assert train.model_config(load_config(tiny)).head_dim == 16  # hidden_size / heads where not given
    with pytest.raises(ConfigError, match=r"config.model.arch \(rope_theta\) applies only to model.init='random'"):
        train_checks.check_config(load_config(sft, **{"model.arch.rope_theta": 1.0}))


def test_config_errors_before_compiling(data_dir, tmp_path, capsys):
    with pytest.raises(ConfigError, match="does not divide over the mesh"):
        train.run(tiny_config("sft", data_dir, **{"train.global_batch_size": 6}), str(tmp_path / "a"))
    # The rows split as the "batch" rule says (6 passed a data x fsdp check, then XLA refused it after the data)
    with pytest.raises(ConfigError, match=r"global_batch_size / grad_accum\)=6 does not divide over the mesh's "
                                          r"data x fsdp x tensor = 4 batch shards \(config.mesh.rules.batch\)"):
        train.run(tiny_config("sft", data_dir, **{
            "train.global_batch_size": 6, "train.eval_batch_size": 4, "mesh.shape": (1, 2, 2), "mesh.num_devices": 4,
            "mesh.rules.batch": ("data", "fsdp", "tensor")}), str(tmp_path / "a2"))
    with pytest.raises(ConfigError, match=r"data.train's 64 examples packed into \d+ rows of 128 tokens cannot "
                                          r"fill one global batch of 32 rows \(with data.packing, train.global_batch"):
        train.run(tiny_config("sft", data_dir, **{"train.global_batch_size": 32}), str(tmp_path / "a3"))
    # Unpacked examples or dDPO pairs too few: the Loader's ValueError named neither the split nor the setting
    for stage, unit in (("sft", "examples"), ("dpo", "pairs")):
        with pytest.raises(ConfigError, match=rf"data.train='.*': its 7 {unit} cannot fill one global batch of "
                                              r"train.global_batch_size=8"):  # (one short of it)
            train.run(tiny_config(stage, data_dir, **{"data.packing": False, "data.max_train_examples": 7}),
                      str(tmp_path / "a4"))
    # The message is all the command line prints ("error: " + it, one line; the command-line test checks that
    # printing in a subprocess). A model folder without config.json, a workdir whose model_config.json or whose
    # own config.json is not JSON: their errors came as tracebacks.
    no_config, bad_json, no_step = tmp_path / "no_config", tmp_path / "bad_json", tmp_path / "no_step"
    for folder in (no_config, bad_json / "checkpoints" / "3", no_step / "checkpoints", tmp_path / "r" / "checkpoints"
                   / "3"):
        folder.mkdir(parents=True)
    (bad_json / "model_config.json").write_text('{"vocab_size": 32000,')
    (tmp_path / "r" / "config.json").write_text('{"stage": "dpo",')
    for key, overrides, message, kind in (
            ("b", {"mesh.shape": (3, 1, 1)}, "config.mesh: mesh shape (3, 1, 1) needs 3 devices; 8 are available "
                                             "(1 process(es))", ConfigError),
            ("b2", {"mesh.shape": (1, 8)}, "config.mesh: mesh shape (1, 8) must give one size per axis ('data', "
                                           "'fsdp', 'tensor')", ConfigError),
            ("c5", {"model.init": "hf", "model.path": str(no_config)},
             f"config.model.path='{no_config}': {no_config} has no config.json", FileNotFoundError),
            ("c6", {"model.init": "orbax", "model.path": str(bad_json)},
             f"config.model.path='{bad_json}': {bad_json / 'model_config.json'}: not valid JSON", ConfigError),
            ("c7", {"model.init": "orbax", "model.path": str(no_step)},
             f"config.model.path={no_step}, config.model.step=-1: no checkpoint in {no_step / 'checkpoints'}",
             FileNotFoundError),
            ("r", {}, f"--workdir={tmp_path / 'r'}: {tmp_path / 'r' / 'config.json'}: not valid JSON", ConfigError),
            ("c", {"model.init": "orbax", "model.path": str(tmp_path / "none")},
             f"config.model.path='{tmp_path / 'none'}': no zephyr_jax workdir with checkpoints there",
             FileNotFoundError),  # (ConfigPathError: a ConfigError and a FileNotFoundError)
            ("c2", {"model.arch.num_key_value_heads": 3}, "config.model.arch: num_attention_heads=4 is not a "
                                                          "multiple of num_key_value_heads=3", ConfigError),
            # (its own error, not the out-of-range EOS id that every id is in an empty vocabulary)
            ("c4", {"model.arch.vocab_size": 0}, "config.model.arch: vocab_size=0: must be a whole number >= 1",
             ConfigError),
            ("c3", {"tokenizer": str(tmp_path / "none")}, f"config.tokenizer='{tmp_path / 'none'}': tokenizer "
                                                          f"{tmp_path / 'none'} does not exist", ConfigError)):
        with pytest.raises(ConfigError) as error:
            train.run(tiny_config("dpo", data_dir, **overrides), str(tmp_path / key))
        assert isinstance(error.value, kind) and "\n" not in str(error.value), repr(error.value)
        assert str(error.value).startswith(message), str(error.value)
    # An exported Hugging Face model as the workdir: training replaced its config.json with the run's (the
    # folder then loaded in no library), and wrote checkpoints beside its weights.
    hf_dir = tmp_path / "exported"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}))
    with pytest.raises(ConfigError) as error:
        train.run(tiny_config("sft", data_dir), str(hf_dir))
    assert str(error.value) == (
        f"--workdir={hf_dir} is a Hugging Face model directory: training would replace its config.json; use "
        "another --workdir (a model to start from goes in config.model.path)")
    assert json.loads((hf_dir / "config.json").read_text())["model_type"] == "mistral"
    assert sorted(os.listdir(hf_dir)) == ["config.json"]
    # A file as the workdir, or a folder inside one: os.makedirs' traceback once the model and tokenizer were
    # checked (a hub model fetched first)
    (tmp_path / "notes").write_text("mine")
    for workdir in (tmp_path / "notes", tmp_path / "notes" / "run"):
        with pytest.raises(ConfigError) as error:
            train.run(tiny_config("sft", data_dir), str(workdir))
        assert str(error.value) == f"--workdir={workdir}: {tmp_path / 'notes'} is a file, not a directory"
    with pytest.raises(ConfigError, match="loss_type"):
        train.run(tiny_config("dpo", data_dir, **{"dpo.loss_type": "kto"}), str(tmp_path / "d"))
    for key in ("keep_checkpoints", "log_every", "eval_batch_size"):  # 0 kept no checkpoint / divided by zero
        with pytest.raises(ConfigError, match=f"train.{key}=0: must be at least 1"):
            train.run(tiny_config("sft", data_dir, **{f"train.{key}": 0}), str(tmp_path / "e"))
    with pytest.raises(ConfigError, match=r"data.packed_rows=3 must be a multiple of train.grad_accum x the mesh's "
                                          r"batch shards \(1 x 8\)"):
        train.run(tiny_config("dpo", data_dir, **{"data.packed_rows": 3}), str(tmp_path / "f"))
    with pytest.raises(ConfigError, match=r"parameter embed.* 32000 does not divide over mesh axes \('tensor',\)"):
        train.run(tiny_config("sft", data_dir, **{"mesh.shape": (1, 1, 3), "mesh.num_devices": 3}),
                  str(tmp_path / "g"))
    with pytest.raises(ConfigError, match=r"data.max_length=64 tokens needs 63 positions, more than the largest"):
        train.run(tiny_config("dpo", data_dir, **{"data.max_length": 64, "data.buckets": (32,)}), str(tmp_path / "i"))
    with pytest.raises(ConfigError, match=r"data.buckets=\(32,\) lacks data.max_length=64, the length of every packed"):
        train.run(tiny_config("sft", data_dir, **{"data.max_length": 64, "data.buckets": (32,),
                                                 "data.packing": True}), str(tmp_path / "j"))
    with pytest.raises(ConfigError, match=r"attention_dropout=0.1 \(config.model.arch\): attention dropout is not"):
        dropout = tiny_config("sft", data_dir)
        with dropout.unlocked():  # a checkpoint's config.json may carry it (transformers reads it)
            dropout.model.arch.attention_dropout = 0.1
        train.run(dropout, str(tmp_path / "k"))
    with pytest.raises(ConfigError, match=r"data.train \(.*\) holds token id \d+, but the model's vocabulary has "
                                          r"1000 entries: config.tokenizer=None has tokens the model lacks"):
        train.run(tiny_config("sft", data_dir, **{"model.arch.vocab_size": 1000}), str(tmp_path / "vocab"))
    v3 = MistralConfig(vocab_size=32768, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)  # Mistral-7B-v0.3's vocabulary and tokenizer
    hf.save_pretrained(Mistral(v3, rngs=nnx.Rngs(0)), str(tmp_path / "v3"), tokenizer=_v3_tokenizer(tmp_path))
    with pytest.raises(ConfigError, match=r"has a vocabulary of 32768 tokens, and its own tokenizer .* numbers them "
                                          r"unlike Mistral-7B-v0.1's, which training takes while config.tokenizer is"):
        train.run(tiny_config("sft", data_dir, **{"model.init": "hf", "model.path": str(tmp_path / "v3")}),
                  str(tmp_path / "l"))
    # ... while a v0.1 model with tokens added after its 32,000 (OpenHermes-2.5's ChatML) trains as before
    added = load_tokenizer()
    added.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    hf.save_pretrained(Mistral(v3.replace(vocab_size=32002), rngs=nnx.Rngs(0)), str(tmp_path / "v1_added"),
                       tokenizer=added)
    train_checks.check_default_tokenizer(tiny_config("sft", data_dir, **{"model.init": "hf", "model.path": str(
        tmp_path / "v1_added")}), 32002, load_tokenizer())
    # ... and one of another vocabulary without a tokenizer of its own trains with v0.1's, which is said
    hf.save_pretrained(Mistral(v3, rngs=nnx.Rngs(0)), str(tmp_path / "v3_bare"))
    capsys.readouterr()
    train_checks.check_default_tokenizer(tiny_config("sft", data_dir, **{"model.init": "hf", "model.path": str(
        tmp_path / "v3_bare")}), 32768, load_tokenizer())
    assert capsys.readouterr().out == (f"model.path='{tmp_path / 'v3_bare'}' has a vocabulary of 32768 tokens and no "
                                       "tokenizer: training with Mistral-7B-v0.1's (32000 tokens; config.tokenizer "
                                       "names another)\n")
    (tmp_path / "workdir").mkdir()
    (tmp_path / "workdir" / "model_config.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a zephyr_jax training workdir: set config.model.init='orbax'"):
        train.run(tiny_config("dpo", data_dir, **{"model.init": "hf", "model.path": str(tmp_path / "workdir")}),
                  str(tmp_path / "h"))
    with pytest.raises(ConfigError, match="a URL; the workdir must be a path every process can write"):
        train.run(tiny_config("sft", data_dir), "gs://bucket/run")  # made ./gs:/bucket/run, failed at the first save
    assert not os.path.exists("gs:")
    assert not any((tmp_path / d).exists() for d in "abcdefghijkl")  # refused before the workdir was made
    # Names the hub does not give (conftest sets HF_HUB_OFFLINE), and data that cannot be read: each a
    # ConfigError naming the setting (the command line prints its message alone; they were tracebacks).
    with pytest.raises(ConfigError, match="config.tokenizer='someone/no-such-tokenizer': tokenizer "
                                          "'someone/no-such-tokenizer': OSError: "):
        train.run(tiny_config("sft", data_dir, tokenizer="someone/no-such-tokenizer"), str(tmp_path / "m"))
    with pytest.raises(ConfigPathError, match="data.train='someone/no-such-data': 'someone/no-such-data' is not a "
                                              "local path .* could not be reached"):
        train.run(tiny_config("sft", data_dir, **{"data.train": "someone/no-such-data"}), str(tmp_path / "n"))
    (tmp_path / "bad_data").mkdir()
    (tmp_path / "bad_data" / "train_sft.jsonl").write_text('{"prompt": "cut short\n')  # a line that is not JSON
    with pytest.raises(ConfigError, match=re.escape(f"data.train='{tmp_path / 'bad_data'}': "
                                                    f"{tmp_path / 'bad_data' / 'train_sft.jsonl'}:1: not valid JSON")):
        train.run(tiny_config("sft", data_dir, **{"data.train": str(tmp_path / "bad_data")}), str(tmp_path / "o"))


def test_a_workdir_config_json_that_is_not_json_is_named_by_every_reader(data_dir, tmp_path):
    """Resume, evaluate --workdir, a dDPO run's tokenizer and export read a workdir's config.json through one
    function: a file cut short is named (three of them raised a bare JSONDecodeError)."""
    from zephyr_jax import evaluate, tokenizer

    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    (tmp_path / "model_config.json").write_text("{}")
    (tmp_path / "config.json").write_text('{"stage": "sft", "tok')
    named = rf"{tmp_path / 'config.json'}: not valid JSON"
    for read in (lambda: train_checks.resume_settings(tiny_config("sft", data_dir), str(tmp_path)),
                 lambda: evaluate.train_config(str(tmp_path)), lambda: tokenizer.tokenizer_source(str(tmp_path))):
        with pytest.raises(ValueError, match=named):
            read()


def test_the_reference_cache_key_follows_the_model_and_every_token(data_dir):
    """The cached reference log-probs are found again only for the same model and the same tokens, split the same
    way into prompt / chosen / rejected (a key blind to the data would serve another split's log-probs)."""
    from zephyr_jax.data.preference import PreferenceExample

    cfg = tiny_config("dpo", data_dir)
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(3, 1000, n).astype(np.int32)  # noqa: E731
    examples = [PreferenceExample(ids(5), ids(4), ids(6), False) for _ in range(3)]
    key = train.reference_key(cfg, examples)
    assert key == train.reference_key(cfg, [PreferenceExample(*(np.copy(a) for a in ex[:3]), False)
                                            for ex in examples])
    one_token = [ex._replace(rejected=np.where(np.arange(6) == 2, ex.rejected + 1, ex.rejected)) for ex in examples]
    moved = [ex._replace(prompt=ex.prompt[:-1], chosen=np.concatenate([ex.prompt[-1:], ex.chosen]))
             for ex in examples]
    swapped = [ex._replace(chosen=ex.rejected, rejected=ex.chosen) for ex in examples]
    other_data = [examples[:2], examples[::-1], one_token, moved, swapped]
    assert len({key, *(train.reference_key(cfg, other) for other in other_data)}) == 1 + len(other_data)
    for change in ({"model.init": "hf", "model.path": "/some/sft"}, {"model.dtype": "bfloat16"}, {"seed": 1}):
        assert train.reference_key(tiny_config("dpo", data_dir, **change), examples) != key, change


def test_the_reference_cache_key_follows_the_checkpoint_not_only_its_path_and_step(data_dir, tmp_path):
    """An SFT workdir trained again in place to the same step has other weights: keyed by path and step alone, a
    dDPO workdir reused after deleting its checkpoints served the old model's reference log-probs. So has a Hugging
    Face folder written again."""
    from zephyr_jax.data.preference import PreferenceExample

    sft = str(tmp_path / "sft")
    examples = [PreferenceExample(np.arange(3, 8), np.arange(4, 9), np.arange(5, 9), False)]
    dpo = tiny_config("dpo", data_dir, **{"model.init": "orbax", "model.path": sft, "model.step": 1})
    keys = []
    for _ in range(2):
        shutil.rmtree(sft, ignore_errors=True)
        train.run(tiny_config("sft", data_dir, **{"train.max_steps": 1, "train.eval_every": 0}), sft)
        keys.append(train.reference_key(dpo, examples))
        assert keys[-1] == train.reference_key(dpo, examples)  # the same checkpoint: the same key
    assert keys[0] != keys[1]
    # A Hugging Face folder written again in place (an SFT model exported anew): keyed by its path alone, the
    # old model's reference log-probs were served
    small = MistralConfig(vocab_size=32000, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
    hf_dpo = tiny_config("dpo", data_dir, **{"model.init": "hf", "model.path": str(tmp_path / "hf_sft")})
    keys = []
    for seed in (0, 1):
        hf.save_pretrained(Mistral(small, rngs=nnx.Rngs(seed)), str(tmp_path / "hf_sft"))
        keys.append(train.reference_key(hf_dpo, examples))
        os.utime(tmp_path / "hf_sft" / hf.WEIGHTS_NAME, ns=(1, 1))  # another host's copy: the same weights, key
        assert keys[-1] == train.reference_key(hf_dpo, examples)
    assert keys[0] != keys[1]


def test_a_workdir_resumes_only_the_run_that_wrote_it_and_keeps_its_reference(data_dir, tmp_path, capsys,
                                                                             monkeypatch):
    """Another stage or batch size over a workdir's checkpoints is refused (it resumed silently and wrong, and
    rotated the other run's checkpoints away); a dDPO run keeps the SFT step it started from, also when its SFT
    workdir has gained a later checkpoint since, and the SFT run's tokenizer and chat template. Local paths are
    recorded absolute: a run given them relative resumes when given them absolute, or from another directory."""
    sft, dpo = str(tmp_path / "sft"), str(tmp_path / "dpo")
    chatml = load_tokenizer()  # the same vocabulary, another chat template
    chatml.chat_template = ("{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] + eos_token }}"
                            "{% endfor %}{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}")
    chatml.save_pretrained(tmp_path / "chatml")
    tiny_sft = lambda **kw: tiny_config("sft", data_dir, **{  # noqa: E731
        "tokenizer": str(tmp_path / "chatml"), "train.max_steps": 3, "train.eval_every": 0, **kw})
    with monkeypatch.context() as m:
        m.chdir(data_dir)
        train.run(tiny_sft(**{"data.train": "sft", "data.eval": "./sft/",
                              "tokenizer": os.path.relpath(tmp_path / "chatml", data_dir)}), sft)
    recorded = json.load(open(os.path.join(sft, "config.json")))
    assert recorded["data"]["train"] == recorded["data"]["eval"] == str(data_dir / "sft")
    assert recorded["tokenizer"] == str(tmp_path / "chatml")  # export and zephyr_jax.load read it from anywhere
    # Export ships the template the run trained on, and its model card says so (not the Zephyr template's text).
    export.export(sft, str(tmp_path / "hf"), dtype="float32")
    talk = [{"role": "user", "content": "Which is the largest: 1 2 3 4?"}]
    assert (transformers.AutoTokenizer.from_pretrained(tmp_path / "hf").apply_chat_template(talk, tokenize=False)
            == chatml.apply_chat_template(talk, tokenize=False) == "### user:\nWhich is the largest: 1 2 3 4?</s>")
    assert "The tokenizer's own chat template" in open(tmp_path / "hf" / "README.md").read()
    for change, named in (({"train.global_batch_size": 16}, "train.global_batch_size: 8 -> 16"),
                          ({"seed": 1}, "seed: 42 -> 1"), ({"tokenizer": None}, "tokenizer: '.*chatml' -> None"),
                          # orbax cast the float32 master weights to bfloat16 without a word
                          ({"model.param_dtype": "bfloat16"}, "model.param_dtype: 'float32' -> 'bfloat16'")):
        with pytest.raises(ConfigError, match=f"holds checkpoints of a run with other settings.*{named}"):
            train.run(tiny_sft(**change), sft)
    with pytest.raises(ConfigError, match="stage: 'sft' -> 'dpo'"):
        train.run(tiny_config("dpo", data_dir), sft)
    # The same data folder written another way is the same run; so is a workdir's relative path from before
    # paths were recorded absolute, from the directory it names the folder from (and only from there).
    train_checks.resume_settings(tiny_sft(**{"data.train": str(data_dir / "sft") + "/"}), sft)
    saved = json.load(open(os.path.join(sft, "config.json")))
    json.dump({**saved, "data": {**saved["data"], "train": "sft"}}, open(os.path.join(sft, "config.json"), "w"))
    with pytest.raises(ConfigError, match=r"data.train: 'sft' -> '.*sft'"):
        train_checks.resume_settings(tiny_sft(), sft)
    with monkeypatch.context() as m:
        m.chdir(data_dir)
        train_checks.resume_settings(tiny_sft(), sft)
    json.dump(saved, open(os.path.join(sft, "config.json"), "w"))
    assert sorted(checkpoint.manager(sft).all_steps()) == [3]

    dpo_cfg = lambda steps: tiny_config("dpo", data_dir, **{  # noqa: E731
        "model.init": "orbax", "model.path": sft, "train.max_steps": steps, "train.save_every": 1,
        "train.eval_every": 0, "dpo.precompute_reference": True})
    train.run(dpo_cfg(1), dpo)
    assert json.load(open(os.path.join(dpo, "config.json")))["model"]["step"] == 3  # the number, not "latest"
    config_json = os.path.join(dpo, "config.json")
    assert json.load(open(config_json))["tokenizer"] == str(tmp_path / "chatml")
    # A resumed dDPO run keeps the tokenizer it recorded, also a run from before dDPO took its SFT model's (None).
    for recorded in (None, str(tmp_path / "chatml")):  # (the run's own last: it resumes below)
        with open(config_json) as f:
            saved = json.load(f)
        with open(config_json, "w") as f:
            json.dump({**saved, "tokenizer": recorded}, f)
        resumed = dpo_cfg(1)
        assert train_checks.resume_settings(resumed, dpo) and resumed.tokenizer == recorded
    first = json.loads(open(os.path.join(dpo, "metrics.jsonl")).readline())  # policy == reference at step 1
    assert abs(first["rewards/margins"]) < 1e-6 and abs(first["loss"] - np.log(2)) < 1e-5
    train.run(tiny_sft(**{"train.max_steps": 6}), sft)  # SFT goes on
    other_beta = dpo_cfg(2)
    other_beta.dpo.beta = 0.2
    capsys.readouterr()
    train.run(other_beta, dpo)  # resumes from the SFT step it started from, with its cached reference
    assert f"resuming {dpo} with dpo.beta: 0.1 -> 0.2: the DPO loss follows" in capsys.readouterr().out  # allowed
    assert json.load(open(os.path.join(dpo, "config.json")))["model"]["step"] == 3
    reference_free = dpo_cfg(3)
    reference_free.dpo.reference_free = True  # another objective: not a continuation of the run
    reference_free.dpo.precompute_reference = False  # (it has no reference to precompute)
    with pytest.raises(ConfigError, match="dpo.reference_free: False -> True"):
        train.run(reference_free, dpo)
    assert len(os.listdir(os.path.join(dpo, "reference_logps"))) == 2  # train + eval: no reference of step 6
    # SFT's keep_checkpoints rotated step 3 away: said, naming the cause (was "no checkpoint for step 3")
    os.rename(os.path.join(sft, "checkpoints", "3"), tmp_path / "step3")
    with pytest.raises(FileNotFoundError, match=r"started from step 3 of config.model.path=.*sft, which is gone "
                                                r"there .*keep_checkpoints"):
        train.run(dpo_cfg(3), dpo)
    os.rename(tmp_path / "step3", os.path.join(sft, "checkpoints", "3"))
    # Started afresh in the same workdir, it takes the SFT workdir's latest step (6), and a reference of step 6
    # (the cache was keyed by "latest" and served step 3's log-probs: margins 0.0017 at step 1).
    shutil.rmtree(os.path.join(dpo, "checkpoints"))
    os.remove(os.path.join(dpo, "metrics.jsonl"))
    train.run(dpo_cfg(1), dpo)
    first = json.loads(open(os.path.join(dpo, "metrics.jsonl")).readline())
    assert json.load(open(os.path.join(dpo, "config.json")))["model"]["step"] == 6
    assert abs(first["rewards/margins"]) < 1e-6 and abs(first["loss"] - np.log(2)) < 1e-5
    assert len(os.listdir(os.path.join(dpo, "reference_logps"))) == 4


# --- Sharding: the same losses on every mesh; FSDP splits parameter and optimizer bytes. ---

@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_meshes_give_the_same_losses(data_dir, tmp_path, stage, monkeypatch):
    # (mesh, devices, micro-batches): the last one also sums its layer gradients in place across a sharded mesh
    # (pure data parallelism, (8, 1, 1), is tests/test_multihost.py's interleaved run, against one process)
    # dDPO: 6 pairs, which the 8 and 4 batch shards do not divide: its rows, not its pairs, split over them
    meshes = {"one_device": ((1, 1, 1), 1, 1), "fsdp8": ((1, 8, 1), -1, 1), "2x2x2": ((2, 2, 2), -1, 1),
              "2x2x2_accum2": ((2, 2, 2), -1, 2)}
    pairs = {"train.global_batch_size": 6, "train.eval_batch_size": 6} if stage == "dpo" else {}
    losses = {}
    for name, (shape, devices, accum) in meshes.items():
        cfg = tiny_config(stage, data_dir, **{"mesh.shape": shape, "mesh.num_devices": devices,
                                              "train.grad_accum": accum, "train.max_steps": 5,
                                              "train.eval_every": 0, "train.save_every": 0, **pairs})
        train.run(cfg, str(tmp_path / name))
        losses[name] = train_losses(tmp_path / name)
        assert checkpoint.resolve_step(str(tmp_path / name)) == 5  # save_every 0: the last step is saved still
    # Preempted at step 3 on fsdp8, resumed on 2x2x2 with 2 micro-batches (README: a run resumes exactly, also on
    # another mesh or grad_accum): orbax reshards the parameters, Adam's moments and the step; the loader goes on.
    real_manager = checkpoint.manager

    def preempted_at_3(*args, **kwargs):
        mngr = real_manager(*args, **kwargs)
        mngr.reached_preemption = lambda step: step == 3
        return mngr

    run = lambda shape, accum: train.run(tiny_config(stage, data_dir, **{  # noqa: E731
        "mesh.shape": shape, "train.grad_accum": accum, "train.max_steps": 5, "train.eval_every": 0,
        "train.save_every": 0, **pairs}), str(tmp_path / "resumed"))
    with monkeypatch.context() as m:
        m.setattr(train.checkpoint, "manager", preempted_at_3)
        with pytest.raises(train.Preempted, match="at step 3 of 5"):
            run((1, 8, 1), 1)
    run((2, 2, 2), 2)
    losses["fsdp8_resumed_on_2x2x2_accum2"] = train_losses(tmp_path / "resumed")
    for name, values in losses.items():
        np.testing.assert_allclose(values, losses["one_device"], rtol=1e-5, err_msg=name)


def test_weight_decay_leaves_the_norms_alone_as_transformers_trainer_does(tmp_path):
    """optim.weight_decay > 0: AdamW steps give the weights that torch.optim.AdamW gives over transformers' Trainer's
    two parameter groups (get_decay_parameter_names: every weight but norms and biases; optax.adamw had decayed
    the RMSNorm scales too). The optimizer state keeps optax.adamw's structure, so a checkpoint saved before, or
    resumed with another weight_decay, restores."""
    from ml_collections import ConfigDict

    from tests.torch_reference import save_torch, torch_mistral

    tm = torch_mistral(seed=3).train()
    named = dict(tm.named_parameters())
    decayed = set(transformers.Trainer.get_decay_parameter_names(None, tm))
    assert {n for n in named if "norm" in n} == set(named) - decayed  # what the reference leaves out: the norms
    model = load_model(save_torch(tm, tmp_path / "start"), dtype="float32")
    graphdef, params = nnx.split(model, nnx.Param)
    # b1 and b2 away from Adam's defaults (0.9, 0.999), where ignoring the config's value would change nothing
    optim = ConfigDict(dict(lr=1e-2, schedule="constant", warmup_ratio=0.0, clip_norm=0.0, b1=0.8, b2=0.99,
                            eps=1e-8, weight_decay=0.1, mu_dtype="float32"))
    tx = train_steps.make_optimizer(optim, train_steps.make_schedule(optim, 10))
    torch_opt = torch.optim.AdamW([{"params": [named[n] for n in named if n in decayed], "weight_decay": 0.1},
                                   {"params": [named[n] for n in named if n not in decayed], "weight_decay": 0.0}],
                                  lr=1e-2, betas=(0.8, 0.99), eps=1e-8)
    ids = np.random.default_rng(0).integers(3, 128, (2, 12))
    weights = np.random.default_rng(1).standard_normal((2, 12, 128)).astype(np.float32)  # the loss's gradient
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(jnp.asarray(ids)) * weights)  # noqa: E731
    opt_state = tx.init(params)
    for _ in range(3):
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state, params)
        params = optax.apply_updates(params, updates)
        torch_opt.zero_grad()
        (tm(torch.tensor(ids)).logits * torch.tensor(weights)).sum().backward()
        torch_opt.step()
    want = nnx.state(load_model(save_torch(tm, tmp_path / "after"), dtype="float32"), nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, want)
    legacy = optax.chain(optax.identity(), optax.adamw(optax.constant_schedule(1e-2), weight_decay=0.1))
    assert jax.tree.structure(opt_state) == jax.tree.structure(legacy.init(params))


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_learning_rate_schedules_equal_transformers(schedule):
    """Every optimizer step's learning rate as transformers' Trainer gives it (warmup steps: ceil(ratio x steps),
    TrainingArguments.get_warmup_steps), for step counts whose 10% is and is not a whole number."""
    from ml_collections import ConfigDict
    from transformers.optimization import get_scheduler

    for total in (10, 194, 195, 1003):
        optim = ConfigDict(dict(lr=2e-5, schedule=schedule, warmup_ratio=0.1, clip_norm=1.0, b1=0.9, b2=0.999,
                                eps=1e-8, weight_decay=0.0, mu_dtype="float32"))
        ours = train_steps.learning_rates(train_steps.make_schedule(optim, total), total)  # each step's rate
        try:
            args = transformers.TrainingArguments("unused", warmup_steps=0.1)
        except ValueError:  # transformers 4.x: the ratio has its own field (warmup_steps takes ints only)
            args = transformers.TrainingArguments("unused", warmup_ratio=0.1)
        warmup = args.get_warmup_steps(total)
        torch_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)
        name = {"constant": "constant_with_warmup"}.get(schedule, schedule)
        reference = get_scheduler(name, torch_opt, num_warmup_steps=warmup, num_training_steps=total)
        want = []
        for _ in range(total):  # the Trainer steps the scheduler after each optimizer step
            want.append(reference.get_last_lr()[0])
            torch_opt.step()
            reference.step()
        np.testing.assert_allclose(ours, want, rtol=1e-5, atol=1e-12,
                                   err_msg=f"{schedule}, {total} steps")


def test_fsdp_holds_an_eighth_of_parameter_and_optimizer_bytes(data_dir):
    cfg = tiny_config("sft", data_dir, **{"mesh.shape": (1, 8, 1)})
    mesh = train.make_mesh(cfg.mesh.shape)
    mcfg = train.model_config(cfg)
    _, params, shardings = train.init_params(cfg, mcfg, mesh)
    tx = train_steps.make_optimizer(cfg.optim, train_steps.make_schedule(cfg.optim, 10))
    opt_state = jax.jit(tx.init, out_shardings=train._opt_shardings(tx, jax.eval_shape(tx.init, params),
                                                                     shardings, mesh))(params)
    for tree in (params, opt_state):
        leaves = [x for x in jax.tree.leaves(tree) if x.ndim >= 1]
        sharded = [x for x in leaves if not x.sharding.is_fully_replicated]
        replicated = [x for x in leaves if x.sharding.is_fully_replicated]
        norms = {(mcfg.hidden_size,), (mcfg.num_hidden_layers, mcfg.hidden_size)}  # the final / stacked layers'
        assert all(x.shape in norms for x in replicated)  # only the RMSNorm scales
        total = sum(x.nbytes for x in sharded)
        for device in jax.devices():
            held = sum(s.data.nbytes for x in sharded for s in x.addressable_shards if s.device == device)
            assert held == total // 8


# --- Gradient accumulation: 4 x B/4 is the update of one batch of B. ---

@pytest.mark.parametrize("stage,scan_layers", [("sft", True), ("dpo", True), ("sft", False)])
def test_gradient_accumulation_matches_one_batch(data_dir, stage, scan_layers):
    """(scan_layers=False: the unrolled layers' backward, behind its optimization barrier, model/accumulate.py)
    The step is plain SGD at rate 1, so the parameters after it compare the gradients themselves: AdamW's first
    step was at its warmup's rate of 0 (the parameters unchanged), and past warmup Adam's first step divides each
    gradient by its own size (a sign flip, or a layer's gradient in another's slot, moves nothing it compares)."""
    tok = load_tokenizer()
    cfg = tiny_config(stage, data_dir)
    rows = [json.loads(line) for line in open(data_dir / ("sft" if stage == "sft" else "prefs") /
                                              f"train_{stage if stage == 'sft' else 'prefs'}.jsonl")][:8]
    mcfg = MistralConfig(**cfg.model.arch.to_dict(), scan_layers=scan_layers)
    graphdef, params = nnx.split(Mistral(mcfg, rngs=nnx.Rngs(0)))
    optimizer = optax.sgd  # the step builds it at the rate it is given, 1; its state is a schedule's count
    tx = optimizer(optax.constant_schedule(1.0))
    results = []
    for accum in (1, 4):
        if stage == "sft":
            batch = pad_sft([sft_example(r, i, tok) for i, r in enumerate(rows)], 48)
            batch["loss_mask"][0, np.flatnonzero(batch["loss_mask"][0])[3:]] = 0  # micro-batches of unequal tokens:
            # Every third position's target is the full logits' argmax, so token accuracy is not 0: the share of
            # loss tokens the unchunked model guesses, over the whole batch (not a mean of micro-batch shares).
            logits = nnx.merge(graphdef, params)(batch["inputs"], positions=batch["positions"],
                                                 segment_ids=batch["segment_ids"])
            guess = np.asarray(jnp.argmax(logits, -1))
            mask = batch["loss_mask"].astype(bool)
            batch["targets"] = np.where(mask & (np.arange(48) % 3 == 0), guess, batch["targets"])
            accuracy = float(np.mean(guess[mask] == batch["targets"][mask]))
            full_logits_loss = torch.nn.functional.cross_entropy(  # every loss token, each row's first too
                torch.tensor(np.asarray(logits)[mask]), torch.tensor(batch["targets"][mask], dtype=torch.long)).item()
            batch["loss_positions"] = loss_positions(batch.pop("loss_mask"), 48)  # a mean of their means would differ
        else:  # 8 pairs packed into 8 rows, planned per micro-batch
            batch = pack_pairs([preference_example(r, i, tok) for i, r in enumerate(rows)], 8,
                               multiples(16, 512), accum)
            batch["loss_positions"] = loss_positions(batch.pop("loss_mask"), batch["inputs"].shape[1])
        step = jax.jit(train_steps.make_train_step(stage, graphdef, optimizer, accum, cfg.get("dpo"),
                                                   num_pairs=8))
        state = train_steps.TrainState(params, tx.init(params), jnp.asarray(3))
        reference = jax.tree.map(lambda x: x * 0.9, params) if stage == "dpo" else None
        results.append(step(state, {k: jnp.asarray(v) for k, v in batch.items()}, reference,
                            train_steps.step_hparams(cfg, 1.0)))
    (one, m1), (four, m4) = results
    assert abs(float(m1["loss"]) - float(m4["loss"])) <= 1e-5 * abs(float(m1["loss"]))
    if stage == "sft":
        np.testing.assert_allclose(float(m1["loss"]), full_logits_loss, rtol=1e-5)
        assert 0 < accuracy < 1
        for m in (m1, m4):
            np.testing.assert_allclose(float(m["token_accuracy"]), accuracy, rtol=1e-6)
    np.testing.assert_allclose(float(m1["grad_norm"]), float(m4["grad_norm"]), rtol=1e-5)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(params)))
    assert moved > 1e-3, moved
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(four.params)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_gradient_accumulation_holds_one_float32_gradient_tree():
    """The layers' backward adds into the running sum in place (model/accumulate.py), so 2 or 4 micro-batches
    need no more temporary memory than one: no micro-batch's layer gradients beside the sum. (With plain
    jax.grad and a sum after each micro-batch, 2 micro-batches took 8.3 MiB more here: over half the 15 MiB
    layer tree.) XLA's memory analysis of the compiled step, the figure the planner reads."""
    from zephyr_jax import plan

    cfg = load_config(os.path.join(ROOT, "configs", "sft.py:tiny"))
    mcfg = MistralConfig(vocab_size=256, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, remat="full")
    graphdef, params = nnx.split(Mistral(mcfg, rngs=nnx.Rngs(0)))
    layer_bytes = sum(x.nbytes for x in jax.tree.leaves(params["layers"]))
    optimizer = functools.partial(train_steps.make_optimizer, cfg.optim)
    tx = optimizer(train_steps.make_schedule(cfg.optim, 10))
    state = train_steps.TrainState(params, tx.init(params), jnp.asarray(0))
    batch = {k: jnp.zeros((8, 32), jnp.int32) for k in ("inputs", "targets", "positions", "segment_ids",
                                                         "loss_positions")}
    temporaries = {}
    for accum in (1, 2, 4):
        step = jax.jit(train_steps.make_train_step("sft", graphdef, optimizer, accum, max_segments=1),
                       donate_argnums=0)
        lowered = step.lower(state, batch, None, train_steps.step_hparams(cfg, 1e-5))
        temporaries[accum] = plan.compiled_bytes(lowered.compile())["temporaries"]
    assert temporaries[2] <= temporaries[1] + 0.1 * layer_bytes, (temporaries, layer_bytes)
    assert temporaries[4] <= temporaries[1] + 0.1 * layer_bytes, (temporaries, layer_bytes)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_the_layers_backward_adds_this_micro_batchs_gradient_into_the_running_sum(scan_layers):
    """jax.grad through hidden_states(grad_sum=S) hands the stacked layers S plus this micro-batch's gradient,
    each layer its own, and every other parameter its own gradient: against plain jax.grad of the same loss
    without grad_sum (model/accumulate.py). The update test above compares the loss, the gradient's norm (which
    a flipped sign keeps) and one optimizer step, not the gradient itself. Rows packed with two sequences, so
    the layers' recompute must see the segment ids; a running sum unlike in every layer, so a layer's gradient
    added into another's shows."""
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, scan_layers=scan_layers)
    graphdef, params = nnx.split(Mistral(cfg, rngs=nnx.Rngs(0)))
    ids = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
    segment_ids = jnp.asarray([[1] * 5 + [2] * 7, [1] * 9 + [2] * 3])
    weights = jax.random.normal(jax.random.key(2), (2, 12, cfg.hidden_size))

    def loss(params, grad_sum):
        h = nnx.merge(graphdef, params).hidden_states(ids, segment_ids=segment_ids, grad_sum=grad_sum)
        return jnp.mean(h.astype(jnp.float32) * weights)  # gradients about the size of one step's

    plain = jax.jit(jax.grad(loss))(params, None)
    leaves, treedef = jax.tree.flatten(params["layers"])
    keys = jax.random.split(jax.random.key(3), len(leaves))
    running = jax.tree.unflatten(treedef, [1e-3 * jax.random.normal(k, x.shape, x.dtype) for k, x in
                                                zip(keys, leaves)])
    into = jax.jit(jax.grad(loss))(params, running)
    for want, got in zip(jax.tree.leaves(jax.tree.map(jnp.add, running, plain["layers"])),
                         jax.tree.leaves(into["layers"])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for name in ("embed_tokens", "norm", "lm_head"):
        for want, got in zip(jax.tree.leaves(plain[name]), jax.tree.leaves(into[name])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# --- Two processes x two devices (launch/slurm_gpu.sbatch) equal one process with four. ---

# A stand-in for SLURM's srun on one machine: SLURM_NTASKS copies of the command, each with the variables srun
# sets (jax.distributed.initialize() reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and
# SLURM_LOCALID), so launch/slurm_gpu.sbatch runs unchanged.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i "$@" >"$LOG_DIR/task_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
exit $status
"""


@pytest.mark.long
def test_two_processes_match_one_process(data_dir, tmp_path):
    args = ["--config=configs/sft.py:tiny", f"--config.data.train={data_dir / 'sft'}",
            f"--config.data.eval={data_dir / 'sft'}", "--config.train.max_steps=4", "--config.train.progress=False",
            "--config.train.eval_every=0"]
    # launch/slurm_gpu.sbatch's srun tasks, 2 processes x 2 CPU devices (launch/local.sh's processes are
    # checked against one process in test_multihost.py).
    two_devices = {"LOG_DIR": str(tmp_path), "JAX_PLATFORMS": "cpu",
                   "XLA_FLAGS": cpu_xla.flags(2)}
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    slurm = {**two_devices, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NTASKS": "2",
             "SLURM_JOB_ID": str(np.random.randint(1, 4096)), "SLURM_STEP_NODELIST": "localhost"}
    out = subprocess.run(["bash", "launch/slurm_gpu.sbatch", f"--workdir={tmp_path / 'slurm'}", *args], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, **slurm}, timeout=300)
    logs = "".join((tmp_path / f"task_{i}.log").read_text()[-1500:] for i in range(2))
    assert out.returncode == 0, logs
    assert "process 0 of 2" in (tmp_path / "task_0.log").read_text()
    single = _cli("zephyr_jax.train", f"--workdir={tmp_path / 'sp'}", *args,
                  env={"XLA_FLAGS": cpu_xla.flags(4)})
    assert single.returncode == 0, single.stderr[-3000:]
    assert len(train_losses(tmp_path / "slurm")) == 4
    # The sbatch script runs the configs' attention_impl="auto" (einsum attention on CPU, cuDNN on GPUs).
    np.testing.assert_allclose(train_losses(tmp_path / "slurm"), train_losses(tmp_path / "sp"), rtol=1e-5)


# --- Preemption and resume. ---

def _params(workdir):
    step = checkpoint.resolve_step(str(workdir))
    model = load_model(str(workdir), "float32", step=step)
    return step, jax.tree.leaves(nnx.state(model))


@pytest.mark.long
def test_resume_after_sigkill_matches_uninterrupted_run(data_dir, tmp_path):
    """Also: the restarts compile nothing. Every program the first run compiled (any compile time: JAX's own
    setting) is in the persistent compilation cache, and the killed and the resumed run add no entry: each
    program's cache key is the same in another process (the train step's, minutes for 7B, included)."""
    cache = tmp_path / "xla"
    args = ["--config=configs/sft.py:tiny", f"--config.data.train={data_dir / 'sft'}",
            f"--config.data.eval={data_dir / 'sft'}", "--config.train.max_steps=10", "--config.train.save_every=2",
            "--config.train.eval_every=0", "--config.train.progress=False",
            f"--config.train.compilation_cache_dir={cache}"]
    env = {"XLA_FLAGS": cpu_xla.flags(1), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    full = _cli("zephyr_jax.train", f"--workdir={tmp_path / 'full'}", *args, env=env)
    assert full.returncode == 0, full.stderr[-3000:]
    compiled = sorted(os.listdir(cache))
    assert sum(name.startswith("jit_train_step-") for name in compiled) == 1, compiled

    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "zephyr_jax.train", f"--workdir={killed_dir}", *args], cwd=ROOT,
                            env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed_dir / "checkpoints" / "2").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    steps_before = sorted(int(s) for s in os.listdir(killed_dir / "checkpoints") if s.isdigit())
    assert steps_before and max(steps_before) < 10, "the run finished before it could be killed"
    resumed = _cli("zephyr_jax.train", f"--workdir={killed_dir}", *args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in resumed.stdout
    assert sorted(os.listdir(cache)) == compiled

    full_step, full_params = _params(tmp_path / "full")
    killed_step, killed_params = _params(killed_dir)
    assert full_step == killed_step == 10
    for a, b in zip(full_params, killed_params):
        np.testing.assert_array_equal(a, b)
    by_step = lambda d: {r["step"]: r["loss"] for r in split_records(d, "train")}
    full_losses, killed_losses = by_step(tmp_path / "full"), by_step(killed_dir)
    assert all(killed_losses[s] == full_losses[s] for s in killed_losses)
    steps = [r["step"] for r in split_records(killed_dir, "train")]
    assert steps == list(range(1, 11))  # one timeline: the killed run's records of replayed steps are set aside


def test_another_rate_schedule_length_or_dpo_beta_reuses_the_compiled_step(data_dir, tmp_path):
    """The learning rate, the schedule's length and DPO's beta are arguments of the train step
    (train_steps.step_hparams), not constants of its program: a second run that changes them (a sweep's next
    point, or a resume with more steps) loads the train step and the eval programs from the persistent
    compilation cache and compiles only its schedule's table. It trains on its own values: its logged rates are
    its schedule's, and its losses differ once the policy has moved (log 2 at any beta while it is the reference)."""
    cache = tmp_path / "xla"
    args = ["--config=configs/dpo.py:tiny", f"--config.data.train={data_dir / 'prefs'}",
            f"--config.data.eval={data_dir / 'prefs'}", "--config.train.progress=False", "--config.train.log_every=1",
            "--config.train.save_every=0", f"--config.train.compilation_cache_dir={cache}"]
    env = {"XLA_FLAGS": cpu_xla.flags(1), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    runs = {"first": [], "second": ["--config.train.max_steps=8", "--config.optim.lr=5e-4", "--config.dpo.beta=0.3"]}
    programs, records = {}, {}
    for name, changes in runs.items():
        out = _cli("zephyr_jax.train", f"--workdir={tmp_path / name}", *args, *changes, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
        programs[name] = {f for f in os.listdir(cache) if f.startswith(("jit_train_step-", "jit_dpo_eval-"))}
        records[name] = split_records(tmp_path / name, "train")
    assert sum(f.startswith("jit_train_step-") for f in programs["first"]) == 1, programs
    assert programs["second"] == programs["first"]
    second = load_config(os.path.join(ROOT, "configs/dpo.py:tiny"), **{"train.max_steps": 8, "optim.lr": 5e-4})
    rates = train_steps.learning_rates(train_steps.make_schedule(second.optim, 8), 8)
    assert [r["lr"] for r in records["second"]] == pytest.approx(rates.tolist())
    first, second = ([r["loss"] for r in records[name]] for name in runs)
    # the policy is the reference until step 2 (step 1's rate is the warmup's 0)
    assert first[:2] == pytest.approx([math.log(2)] * 2) and second[:2] == pytest.approx([math.log(2)] * 2)
    assert all(a != pytest.approx(b, rel=1e-2) for a, b in zip(first[2:], second[2:6]))


def test_sigterm_saves_the_current_step(data_dir, tmp_path):
    workdir = tmp_path / "w"
    args = ["--config=configs/sft.py:tiny", f"--config.data.train={data_dir / 'sft'}",
            f"--config.data.eval={data_dir / 'sft'}", "--config.train.max_steps=100000",
            "--config.train.save_every=0", "--config.train.eval_every=0", "--config.train.progress=False"]
    proc = subprocess.Popen([sys.executable, "-m", "zephyr_jax.train", f"--workdir={workdir}", *args], cwd=ROOT,
                            env={**os.environ, "XLA_FLAGS": cpu_xla.flags(1)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (workdir / "metrics.jsonl").exists() and len(train_losses(workdir)) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == train.PREEMPTED_EXIT_CODE  # not 0: `sbatch --dependency=afterok` started dDPO on it
    last_logged = train_losses(workdir)
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert saved == [len(last_logged)] and 3 <= saved[0] < 100000
    assert f"preempted (SIGTERM): process 0 saved step {saved[0]}; exiting" in stdout
    assert f"stopped by SIGTERM / a preemption notice at step {saved[0]} of 100000" in stderr


def test_steps_queued_when_an_eval_or_save_starts_count_as_step_time(monkeypatch):
    """An eval or save waits behind the (up to two) steps still queued on the device: that wait is step time, not
    paused time (it was paused time: throughput and MFU read ~1.7x high where eval_every is not a multiple of
    log_every). The stand-in block_until_ready takes 0.3 s once: the queued steps' device work."""
    queued = {"work": 0.3}

    def block_until_ready(x):
        time.sleep(queued.pop("work", 0.0))
        return x

    monkeypatch.setattr(train_log.jax, "block_until_ready", block_until_ready)
    log = train_log.StepLog(None, types.SimpleNamespace(update=lambda n: None), None, "", None)
    log.add(1, {"loss": 0.0}, None)
    with log.paused():
        block_until_ready(None)  # the eval's first fetch
    assert log.excluded < 0.1 and "work" not in queued


def test_a_batch_shape_first_met_after_the_first_step_compiles_outside_the_step_time(data_dir, tmp_path,
                                                                                      monkeypatch):
    """dDPO batches come in bucketed shapes, each compiled when first met (~13 in the recipe's run, 43 s each for
    7B on a v5e-64): those after the first step were step time, and their log lines read tokens/s and MFU several
    times low. The stand-in compile: 3 s at a shape's first call."""
    real, shapes, calls = train.jit_train_step, {}, []

    def jit_train_step(*args, **kwargs):
        step = real(*args, **kwargs)

        def first_call_slow(state, batch, reference, hparams):
            calls.append(None)
            if train.batch_shape(batch) not in shapes:
                shapes[train.batch_shape(batch)] = len(calls)  # the step that first met it
                time.sleep(3.0)
            return step(state, batch, reference, hparams)
        return first_call_slow

    monkeypatch.setattr(train, "jit_train_step", jit_train_step)
    # Rows padded to a bucket: 2 long dialogues among 32, so some batches of 8 are 64 wide and some 256
    rows = [{"prompt": q, "prompt_id": str(i), "messages": [{"role": "user", "content": q},
                                                            {"role": "assistant", "content": "Yes."}]}
            for i, q in enumerate(["word " * 150 if i in (5, 20) else f"Is {i} even?" for i in range(32)])]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.run(tiny_config("sft", data_dir, **{
        "data.train": str(tmp_path / "data"), "data.packing": False, "data.max_length": 256, "data.buckets": (64, 256),
        "train.max_steps": 8, "train.eval_every": 0, "train.save_every": 0}), str(tmp_path / "run"))
    timed = {r["step"]: r["step_time"] for r in split_records(tmp_path / "run", "train") if r["step"] > 1}
    first, later = sorted(shapes.values())
    assert first == 1 and later > 1 and sorted(timed) == list(range(2, 9)), (shapes, timed)
    # Below the stand-in's 3 s alone: the compile is not in the step's time (the other steps are not compared, so a
    # loaded machine's pause elsewhere does not count: one of 3.5 s at another step failed a max() over them all)
    assert timed[later] < 3.0, (shapes, timed)


def test_starting_and_stopping_a_profile_is_not_step_time(monkeypatch, tmp_path):
    """The trace window's start_trace and stop_trace (which writes the trace: 0.6 s for a 0.1 ms step, seconds for
    a 7B one) ran inside the timed steps. The stand-ins take 0.3 s each."""
    from zephyr_jax import profiling

    monkeypatch.setattr(profiling.jax.profiler, "start_trace", lambda logdir: time.sleep(0.3))
    monkeypatch.setattr(profiling.jax.profiler, "stop_trace", lambda: time.sleep(0.3))
    monkeypatch.setattr(profiling, "newest_trace", lambda logdir: "trace.xplane.pb")
    log = train_log.StepLog(None, types.SimpleNamespace(update=lambda n: None), None, "", None)
    trace = profiling.TraceWindow(2, 1, str(tmp_path), untimed=log.untimed)
    trace.before(1)
    assert log.excluded == 0
    trace.before(2)
    trace.after(2, None)
    assert 0.6 <= log.excluded < 1.0 and not trace.active


def test_stop_signals_end_set_up_at_once_are_noted_in_the_loop_and_the_old_handlers_return_after():
    """StopSignals lives as long as the run: a caller that goes on after train.run (the demo's feedback stage) must
    still stop on SIGTERM and Ctrl-C. Before defer() (set-up) a signal ends the run at once; after it, it is noted
    for the loop, but abandons work run through unless_stopped (an eval). A second SIGTERM is only noted (it must
    not cut a save short); a second Ctrl-C is Python's KeyboardInterrupt."""
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with train.StopSignals() as stop:
            with pytest.raises(train._StopAsked):
                os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a second one while set-up unwinds: noted, never raised
        assert stop.asked == "SIGTERM" and "SIGTERM" in stop.name()
        with train.StopSignals() as stop:
            stop.defer()
            assert stop.unless_stopped(lambda: 7) == 7
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # the first signal names the stop
            assert stop.asked == "SIGINT" and stop.name() == "SIGINT (Ctrl-C)" and seen == []
            assert stop.unless_stopped(lambda: seen.append("work")) is train.STOPPED and seen == []  # not begun
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        with train.StopSignals() as stop:
            stop.defer()
            assert stop.unless_stopped(lambda: os.kill(os.getpid(), signal.SIGTERM) or seen.append("rest")) \
                is train.STOPPED and seen == []  # cut where the signal came
            os.kill(os.getpid(), signal.SIGTERM)  # a second one: noted, never raised
        assert stop.asked == "SIGTERM"
        # A signal landing in unless_stopped itself, before the work or after it returned: STOPPED (it was noted
        # only and the work ran on, or _StopAsked escaped the run with its step unsaved). sys.settrace lands it
        # on the line, as a signal arriving there would.
        for line in ("self._raises = True", "self._raises = False"):
            def landing(frame, event, arg, line=line):
                if event == "line" and frame.f_code is train.StopSignals.unless_stopped.__code__ and \
                        linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip() == line:
                    os.kill(os.getpid(), signal.SIGTERM)
                return landing
            with train.StopSignals() as stop:
                stop.defer()
                tracer = sys.gettrace()
                sys.settrace(landing)
                try:
                    stopped = stop.unless_stopped(lambda: seen.append("work")) is train.STOPPED
                finally:
                    sys.settrace(tracer)
                assert stopped and stop.asked == "SIGTERM" and seen == ["work"] * (line == "self._raises = False")
            seen.clear()
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stop_signals_take_no_handler_where_another_owns_the_signal(monkeypatch):
    """SIGINT ignored when the run began (a launcher's background process) stays ignored; under jax.distributed
    JAX's preemption notifier owns SIGTERM (a handler here would break its notice to the other processes); off the
    main thread no handler can be set, and that is no error (a notebook worker)."""
    import threading

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
    try:
        with train.StopSignals():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) is not previous[1]
        with monkeypatch.context() as m:
            m.setattr(jax.distributed, "is_initialized", lambda: True)
            with train.StopSignals():
                assert signal.getsignal(signal.SIGTERM) is previous[1]
    finally:
        signal.signal(signal.SIGINT, previous[0])
    errors = []

    def off_main():
        try:
            with train.StopSignals():
                errors.append(signal.getsignal(signal.SIGTERM) is not previous[1])
        except BaseException as e:  # noqa: BLE001 (the test's result, read below)
            errors.append(e)
    thread = threading.Thread(target=off_main)
    thread.start()
    thread.join(timeout=30)
    assert errors == [False] and signal.getsignal(signal.SIGINT) is previous[0]


def test_an_error_in_the_loop_still_commits_the_checkpoint_being_saved(data_dir, tmp_path, monkeypatch):
    """The batch after an asynchronous save fails: the save is finished, not left as a -tmp directory."""
    import zephyr_jax.data.loader as loader_module

    real_next, calls = loader_module.Loader.__next__, []

    def failing_next(self):
        calls.append(1)
        if len(calls) == 5:  # the batch of step 5, built while step 4 runs, right after step 4's save began
            raise RuntimeError("a bad batch")
        return real_next(self)

    monkeypatch.setattr(loader_module.Loader, "__next__", failing_next)
    workdir = tmp_path / "w"
    with pytest.raises(RuntimeError, match="a bad batch"):
        train.run(tiny_config("sft", data_dir, **{"train.max_steps": 6, "train.save_every": 4,
                                                  "train.eval_every": 0, "train.log_every": 3}), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]
    # Step 4 is on record though it is no log step: a resumed run starts after it and never logs it.
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    assert [r["step"] for r in records if r["split"] == "train"] == [3, 4]


def test_a_preempted_run_saves_before_any_eval_and_commits_while_sigterm_is_caught(data_dir, tmp_path,
                                                                                  monkeypatch):
    """A preemption noticed at an eval step saves at once (a grace period spent on an eval may end in SIGKILL
    before the save), and the save is committed while the loop's SIGTERM handler is still in place (a second
    SIGTERM used to kill the commit). Preempted between log steps, it also saves the steps of its unfinished log
    line: the resumed run writes that line where an uninterrupted run does, over the same steps."""
    real_manager, handlers, preempt_at = checkpoint.manager, [], [3]

    def manager(*args, **kwargs):
        mngr = real_manager(*args, **kwargs)
        mngr.reached_preemption = lambda step: step == preempt_at[0]
        real_wait = mngr.wait_until_finished
        mngr.wait_until_finished = lambda: handlers.append(signal.getsignal(signal.SIGTERM)) or real_wait()
        return mngr

    evals = []
    monkeypatch.setattr(train.checkpoint, "manager", manager)
    monkeypatch.setattr(train, "eval_metrics", lambda *a, **kw: evals.append(a) or {})
    workdir = tmp_path / "w"
    outside = signal.getsignal(signal.SIGTERM)
    settings = {"train.max_steps": 6, "train.save_every": 0, "train.eval_every": 3, "train.log_every": 2}
    with pytest.raises(train.Preempted, match="at step 3 of 6"):  # not a return: a demo or notebook goes no further
        train.run(tiny_config("sft", data_dir, **settings), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3"] and evals == []
    assert handlers[0] is not outside and signal.getsignal(signal.SIGTERM) is outside
    # Resumed with no step left to train (train.max_steps lowered to it), the short line of step 3 stays on record.
    train.run(tiny_config("sft", data_dir, **{**settings, "train.max_steps": 3}), str(workdir))
    assert [r["step"] for r in split_records(workdir, "train")] == [2, 3]

    # The eval the preemption skipped is the resumed run's first work: no eval step goes unrecorded. A resumed
    # run that dies before its next checkpoint (a bad batch at step 5 here; a kill alike) evaluates step 3 again
    # when resumed once more: that record replaces the one before (metrics.jsonl and TensorBoard kept both).
    import zephyr_jax.data.loader as loader_module

    real_next, calls = loader_module.Loader.__next__, []
    monkeypatch.setattr(loader_module.Loader, "__next__", lambda self: calls.append(1) or (
        real_next(self) if len(calls) != 2 else (_ for _ in ()).throw(RuntimeError("a bad batch"))))
    with pytest.raises(RuntimeError, match="a bad batch"):
        train.run(tiny_config("sft", data_dir, **settings), str(workdir))
    monkeypatch.setattr(loader_module.Loader, "__next__", real_next)
    train.run(tiny_config("sft", data_dir, **settings), str(workdir))
    records = [(r["step"], r["split"]) for r in map(json.loads, open(workdir / "metrics.jsonl"))]
    assert [step for step, split in records if split == "eval"] == [3, 6] and len(evals) == 4
    superseded = [(r["step"], r["split"]) for r in map(json.loads, open(workdir / "metrics.superseded.jsonl"))]
    assert (3, "eval") in superseded and (3, "train") in superseded  # (step 3's line: a step short)
    assert records.index((3, "eval")) < records.index((4, "train"))  # before training on: step 3's parameters
    # The train lines are an uninterrupted run's: steps 3 and 4 in one line (a line of step 3 and one of step 4
    # were written), the same means of the same steps. (Not step time: its steps are not timed alike.)
    preempt_at[0] = None
    train.run(tiny_config("sft", data_dir, **settings), str(tmp_path / "whole"))
    timed = ("step_time", "tokens_per_sec", "tokens_per_sec_per_device", "tflops_per_device", "mfu")
    lines = lambda d: [{k: v for k, v in r.items() if k not in timed} for r in split_records(d, "train")]
    assert [r["step"] for r in lines(workdir)] == [2, 4, 6] and lines(workdir) == lines(tmp_path / "whole")
    # SIGTERM or Ctrl-C in set-up or an eval stops with Preempted too (the CLI's 75, a launcher's "resume me"): it
    # killed the process (-15) or was a KeyboardInterrupt's traceback. Set-up ends at once, an eval is abandoned and
    # its step saved as one whose eval was skipped; the resumed runs' records are the uninterrupted run's.
    stopped_dir, real_split, real_eval, calls, plan = tmp_path / "stopped", train.load_split, train.eval_metrics, {}, {}

    def signalling(where, real):  # sends plan[where]'s signal to this process at that call
        def call(*args, **kwargs):
            calls[where] = calls.get(where, 0) + 1
            if plan.get(where, (0,))[0] == calls[where]:
                os.kill(os.getpid(), plan[where][1])
            return real(*args, **kwargs)
        return call

    def caller_handler(signum, frame):  # where run handles no signal the test fails here (it killed pytest)
        raise AssertionError(f"signal {signum} reached the caller's handler")

    def stopped(stage: dict, message: str):
        calls.clear()
        plan.clear()
        plan.update(stage)
        with pytest.raises(train.Preempted, match=message):
            train.run(tiny_config("sft", data_dir, **settings), str(stopped_dir))
        assert signal.getsignal(signal.SIGTERM) is caller_handler

    monkeypatch.setattr(train, "load_split", signalling("load_split", real_split))
    monkeypatch.setattr(train, "eval_metrics", signalling("eval_metrics", real_eval))
    monkeypatch.setattr(train, "batch_shape", signalling("batch_shape", train.batch_shape))  # (once a step)
    monkeypatch.setattr(train.MetricWriter, "close", signalling("close", train.MetricWriter.close))
    previous = signal.signal(signal.SIGTERM, caller_handler), signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        stopped({"load_split": (1, signal.SIGTERM)}, "SIGTERM / a preemption notice during set-up")
        assert not (stopped_dir / "checkpoints").exists()
        # During step 2 (after set-up: noted, the step finished and saved), then in the eval of step 3
        stopped({"batch_shape": (2, signal.SIGTERM)}, "SIGTERM / a preemption notice at step 2 of 6")
        assert sorted(os.listdir(stopped_dir / "checkpoints")) == ["2"]
        stopped({"eval_metrics": (1, signal.SIGTERM)}, "SIGTERM / a preemption notice at step 3 of 6")
        assert sorted(os.listdir(stopped_dir / "checkpoints")) == ["2", "3"]
        assert split_records(stopped_dir, "eval") == []
        # Resumed: Ctrl-C in step 3's skipped eval, its first work, stops it there (no step trained, none saved)
        stopped({"eval_metrics": (1, signal.SIGINT)}, r"SIGINT \(Ctrl-C\) at step 3 of 6")
        assert sorted(os.listdir(stopped_dir / "checkpoints")) == ["2", "3"] and "batch_shape" not in calls
        # Resumed: step 3's skipped eval first, steps 4-6, and Ctrl-C in the final eval
        stopped({"eval_metrics": (2, signal.SIGINT)}, r"SIGINT \(Ctrl-C\) at step 6 of 6")
        assert sorted(os.listdir(stopped_dir / "checkpoints")) == ["3", "6"] and calls["eval_metrics"] == 2
        # Nothing to train: the final eval, and SIGTERM as the run closes its logs (it was swallowed, exit 0)
        stopped({"close": (1, signal.SIGTERM)}, "SIGTERM / a preemption notice after the final eval")
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    records = lambda d: [{k: v for k, v in r.items() if k not in timed}
                         for r in map(json.loads, open(d / "metrics.jsonl"))]
    assert records(stopped_dir) == records(tmp_path / "whole")
    # Preempted at its last step (whose final eval it skipped), resumed for more steps: that step is evaluated.
    preempt_at[0], more = 6, tmp_path / "more"
    with pytest.raises(train.Preempted, match="at step 6 of 6"):
        train.run(tiny_config("sft", data_dir, **{"train.max_steps": 6, "train.save_every": 0,
                                                  "train.eval_every": 4}), str(more))
    evals_at = lambda: [r["step"] for r in split_records(more, "eval")]
    assert evals_at() == [4]  # the grace period goes to the save: no final eval after it
    preempt_at[0] = None
    train.run(tiny_config("sft", data_dir, **{"train.max_steps": 8, "train.save_every": 0,
                                              "train.eval_every": 4}), str(more))
    assert evals_at() == [4, 6, 8]
    # A finished run started again trains nothing and evaluates its last step again: that record replaces the
    # one before it (one record per step and split in metrics.jsonl).
    train.run(tiny_config("sft", data_dir, **{"train.max_steps": 8, "train.save_every": 0,
                                              "train.eval_every": 4}), str(more))
    assert evals_at() == [4, 6, 8]
    assert [r["step"] for r in split_records(more, "eval", "metrics.superseded.jsonl")] == [8]


# --- DPO reference modes, NaN. ---

def test_precomputed_reference_equals_frozen_copy(data_dir, tmp_path):
    base = {"train.max_steps": 4, "train.eval_every": 0, "train.save_every": 0}
    frozen = train.run(tiny_config("dpo", data_dir, **base), str(tmp_path / "frozen"))
    cached = train.run(tiny_config("dpo", data_dir, **base, **{"dpo.precompute_reference": True}),
                       str(tmp_path / "pre"))
    np.testing.assert_allclose(train_losses(tmp_path / "pre"), train_losses(tmp_path / "frozen"), rtol=1e-5)
    assert cached.keys() == frozen.keys()
    for k in frozen:
        np.testing.assert_allclose(cached[k], frozen[k], rtol=1e-5, atol=1e-6)
    assert os.listdir(tmp_path / "pre" / "reference_logps")  # the cache was written


def test_frozen_reference_with_remat_equals_without(data_dir, tmp_path):
    # The recipe's configs remat every layer; the frozen reference then runs rematted inside value_and_grad.
    base = {"train.max_steps": 3, "train.eval_every": 0, "train.save_every": 0}
    train.run(tiny_config("dpo", data_dir, **base), str(tmp_path / "plain"))
    train.run(tiny_config("dpo", data_dir, **base, **{"model.remat": "full"}), str(tmp_path / "remat"))
    np.testing.assert_allclose(train_losses(tmp_path / "remat"), train_losses(tmp_path / "plain"), rtol=1e-5)


def test_a_reference_free_run_rewards_beta_times_the_policys_log_probs(data_dir, tmp_path):
    """dpo.reference_free=True: the reference log-probs are 0, so each record's rewards are beta times its policy
    log-probs (TRL's definition), in training and in the final eval, at the run's beta: 0.3, not the configs'
    0.1 (the train step takes beta as an argument, train_steps.step_hparams)."""
    cfg = tiny_config("dpo", data_dir, **{"dpo.reference_free": True, "dpo.beta": 0.3, "train.max_steps": 1,
                                          "train.eval_every": 0, "train.save_every": 0})
    train.run(cfg, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["split"] for r in records] == ["train", "eval"]
    for r in records:
        for side in ("chosen", "rejected"):
            assert r[f"rewards/{side}"] == pytest.approx(0.3 * r[f"logps/{side}"], rel=1e-6), (r, side)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    workdir = str(tmp_path / "w")
    cfg = tiny_config("sft", data_dir, **{"train.max_steps": 6, "train.save_every": 3, "train.eval_every": 0})
    train.run(cfg, workdir)  # steps 1-6, checkpoints 3 and 6
    good_step, good_params = _params(workdir)

    real = train_steps.losses.sft_loss_from_logps
    monkeypatch.setattr(train_steps.losses, "sft_loss_from_logps", lambda *a, **kw: real(*a, **kw) * jnp.nan)
    cfg.train.max_steps = 9
    with pytest.raises(FloatingPointError, match=r"loss is nan .* at step 7.*last good checkpoint is step 6"):
        train.run(cfg, workdir)
    step, params = _params(workdir)
    assert step == good_step == 6
    for a, b in zip(params, good_params):
        np.testing.assert_array_equal(a, b)

    # A finite loss whose gradient is not (0 * d sqrt(x)/dx at 0): the update would be NaN, and is not saved.
    monkeypatch.setattr(train_steps.losses, "sft_loss_from_logps",
                        lambda logps, *a, **kw: real(logps, *a, **kw) + 0.0 * jnp.sqrt(0.0 * logps.sum()))
    with pytest.raises(FloatingPointError, match=r"grad_norm nan at step 7.*last good checkpoint is step 6"):
        train.run(cfg, workdir)
    assert _params(workdir)[0] == 6
    # An eval step that is no log step: the bad step is caught before the eval (which put NaN metrics on record)
    cfg.train.log_every, cfg.train.eval_every = 5, 1
    with pytest.raises(FloatingPointError, match=r"at step 7.*last good checkpoint is step 6"):
        train.run(cfg, workdir)
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert not [r for r in records if r["split"] == "eval" and r["step"] > 6]


def test_a_divergence_keeps_the_steps_before_it_on_record(data_dir, tmp_path):
    """A NaN (or Inf) at step 3 with log_every 4 stopped the run before the record of steps 1-2 was written: the
    steps that led up to the divergence were lost. LR 1e30 after a 2-step warmup: step 1's rate is 0, step 2's
    loss is finite and its update is not. The record has no throughput: its wall time holds step 3's too (step 2
    is a timed step, so a line written with throughput would carry it)."""
    cfg = tiny_config("sft", data_dir, **{"train.max_steps": 4, "train.log_every": 4, "train.save_every": 0,
                                          "train.eval_every": 0, "optim.lr": 1e30, "optim.warmup_ratio": 0.5,
                                          "optim.schedule": "constant"})
    with pytest.raises(FloatingPointError, match=r"at step 3: stopping\. No checkpoint was saved"):
        train.run(cfg, str(tmp_path))
    (record,) = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    rate = float(train_steps.make_schedule(cfg.optim, 4)(1))  # step 2's, the line's last step
    assert record["step"] == 2 and math.isfinite(record["loss"]) and record["lr"] == pytest.approx(rate, rel=1e-6)
    assert "tokens_per_sec" not in record and "step_time" not in record


def test_logged_learning_rate_is_the_last_steps_and_the_console_has_the_records(data_dir, tmp_path, capsys):
    """A log line is the mean of its steps' metrics, but the learning rate logged was the mean over a warmup's
    steps: a rate no step used. The schedule runs over optimizer steps, not micro-batches (grad_accum 2). Without
    the bar (train.progress=False, a batch job's log), each log line and each eval during training is printed, and
    no bar at all is shown."""
    settings = {"train.max_steps": 7, "train.save_every": 0, "train.grad_accum": 2, "train.global_batch_size": 16,
                "optim.warmup_ratio": 0.5, "optim.schedule": "cosine"}
    cfg = tiny_config("sft", data_dir, **settings, **{"train.log_every": 3, "train.eval_every": 3})
    train.run(cfg, str(tmp_path / "every_3"))
    schedule = train_steps.make_schedule(cfg.optim, 7)
    records = [json.loads(line) for line in open(tmp_path / "every_3" / "metrics.jsonl")]
    lines = [r for r in records if r["split"] == "train"]
    # the last step, no multiple of log_every, has its line (of step 7 alone)
    assert {r["step"]: r["lr"] for r in lines} == {3: pytest.approx(float(schedule(2))),
                                                   6: pytest.approx(float(schedule(5))),
                                                   7: pytest.approx(float(schedule(6)))}
    assert float(schedule(2)) != pytest.approx(np.mean([float(schedule(i)) for i in range(3)]))
    out, err = capsys.readouterr()
    assert "step 3: loss=" in out and "step 6: loss=" in out
    assert "it/s]" not in err and "examples/s]" not in err, err[-2000:]  # the data's bars were in the job's log
    assert "eval at step 3: {" in out and "eval at step 6: {" in out
    # The same run logged every step: each line (of 3 steps, the last of 1) is the mean of its steps' lines.
    train.run(tiny_config("sft", data_dir, **settings, **{"train.log_every": 1, "train.eval_every": 0}),
              str(tmp_path / "every_1"))
    steps = split_records(tmp_path / "every_1", "train")
    assert [r["lr"] for r in steps] == pytest.approx([float(schedule(i)) for i in range(7)])
    for line, part in zip(lines, (steps[:3], steps[3:6], steps[6:]), strict=True):
        for key in ("loss", "grad_norm", "num_tokens"):
            assert line[key] == pytest.approx(np.mean([r[key] for r in part]), rel=1e-6), key


def test_an_epoch_sized_run_counts_its_steps_reshuffles_and_resizes_on_resume(data_dir, tmp_path, monkeypatch,
                                                                              capsys):
    """The recipe's runs are sized in epochs (max_steps -1), every other test in steps. 20 unpacked examples in
    batches of 8: 2 full batches an epoch (4 examples left out, said), 2 epochs = 4 steps, and the schedule runs
    over those 4; the second epoch is another order. Resumed with more epochs and half the lr, the schedule follows
    the new values (README); only the last train.keep_checkpoints remain; a position saved over another example
    list is refused through train.run, not only by the Loader (an edited row). The resumed run's initial weights
    are gone by its first batch: the checkpoint's replace them (a resumed run held both on the devices)."""
    import weakref

    import zephyr_jax.data.loader as loader_module

    data = tmp_path / "data"
    shutil.copytree(data_dir / "sft", data / "sft")
    drawn, real_next = [], loader_module.Loader.__next__
    initial, initial_alive, real_init = [], [], train.init_params

    def draw(self):
        initial_alive.append(sum(ref() is not None for ref in initial))
        return (lambda out: drawn.append(out[1].indices) or out)(real_next(self))

    def init_params(*args):
        graphdef, params, shardings = real_init(*args)
        initial[:] = [weakref.ref(x) for x in jax.tree.leaves(params)]
        return graphdef, params, shardings

    monkeypatch.setattr(loader_module.Loader, "__next__", draw)
    monkeypatch.setattr(train, "init_params", init_params)
    cfg = lambda epochs, lr, max_steps=-1: tiny_config("sft", data, **{  # noqa: E731
        "data.packing": False, "data.max_train_examples": 20,
        "train.max_steps": max_steps, "train.num_epochs": epochs, "optim.lr": lr, "train.save_every": 1,
        "train.keep_checkpoints": 2, "train.eval_every": 0, "train.log_every": 1})
    workdir = tmp_path / "w"
    train.run(cfg(2, 1e-3), str(workdir))
    assert "each epoch trains 2 full batches: 4 of its 20 examples are left out" in capsys.readouterr().out
    lines = split_records(workdir, "train")
    schedule = train_steps.make_schedule(cfg(2, 1e-3).optim, 4)
    assert {r["step"]: r["lr"] for r in lines} == {s: pytest.approx(float(schedule(s - 1))) for s in (1, 2, 3, 4)}
    assert [r["epoch"] for r in lines] == [(r["step"] - 1) // 2 for r in lines]  # each record: its batch's epoch
    epochs = [np.concatenate(drawn[:2]), np.concatenate(drawn[2:4])]
    assert len(drawn) == 4 and all(len(set(e)) == 16 and set(e) <= set(range(20)) for e in epochs)
    assert list(epochs[0]) != list(epochs[1])
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "4"]

    # 2 more steps, on a schedule of 6 steps with the new lr (max_steps 0, as -1: a run sized in epochs)
    train.run(cfg(3, 5e-4, max_steps=0), str(workdir))
    said = capsys.readouterr().out  # each changed value, not the optim section twice
    assert f"resuming {workdir} with optim.lr: 0.001 -> 0.0005: the optimizer follows the new values from here on, " \
        "its learning-rate schedule too" in said
    assert f"resuming {workdir} with train.num_epochs: 2 -> 3: the learning-rate schedule follows" in said
    lines = split_records(workdir, "train")
    lrs = {r["step"]: r["lr"] for r in lines}
    resized = train_steps.make_schedule(cfg(3, 5e-4).optim, 6)
    assert {s: lrs[s] for s in (5, 6)} == {s: pytest.approx(float(resized(s - 1))) for s in (5, 6)}
    assert [r["epoch"] for r in lines if r["step"] > 4] == [2, 2]  # the third epoch's two batches
    assert sorted(os.listdir(workdir / "checkpoints")) == ["5", "6"]
    assert initial_alive[-2:] == [0, 0]  # the resumed run's two batches: no initial parameter left

    rows = open(data / "sft" / "train_sft.jsonl").readlines()
    edited = json.loads(rows[0])
    edited["messages"][1]["content"] += "0"
    open(data / "sft" / "train_sft.jsonl", "w").writelines([json.dumps(edited) + "\n", *rows[1:]])
    with pytest.raises(ValueError, match="the checkpoint's data position indexes another example list"):
        train.run(cfg(4, 5e-4), str(workdir))


def test_wandb_asked_for_but_not_installed_is_refused_before_any_work(data_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="wandb_project='zephyr', but wandb is not installed"):
        train_checks.check_config(tiny_config("sft", data_dir, **{"logging.wandb_project": "zephyr"}))
    train_checks.check_config(tiny_config("sft", data_dir, **{"logging.wandb_project": "zephyr"}),
                              check_model_source=False)


# --- Honest throughput: real tokens only, the padding share, MFU from the sequences actually processed. ---

def test_logged_throughput_counts_real_tokens_and_their_flops(data_dir, tmp_path):
    from zephyr_jax.data import Loader
    from zephyr_jax.data.pipeline import load_examples

    cfg = tiny_config("dpo", data_dir, **{"train.max_steps": 3, "train.eval_every": 0, "train.save_every": 0,
                                          "train.peak_tflops": 0.5})
    train.run(cfg, str(tmp_path))
    logged = split_records(tmp_path, "train")

    # The same global batches, rebuilt; real tokens counted from their segment ids.
    examples, _ = load_examples(cfg.data, "dpo", load_tokenizer(), "train", log=lambda *_: None)
    mesh = train.mesh_for(cfg)
    loader = Loader(examples, cfg.train.global_batch_size,
                    train.preference_batcher(cfg, mesh, cfg.train.global_batch_size), seed=cfg.seed)
    mcfg = train.model_config(cfg)
    n = mcfg.num_params - mcfg.vocab_size * mcfg.hidden_size - (2 * mcfg.num_hidden_layers + 1) * mcfg.hidden_size
    # PaLM's N: the matmul weights (no embedding lookup, no norm scales)
    per_layer = mcfg.num_hidden_layers * mcfg.num_attention_heads * mcfg.head_dim
    for record in logged:
        batch, _ = next(loader)
        seg = batch["segment_ids"]
        lengths = np.array([(row == s).sum() for row in seg for s in range(1, row.max() + 1)])  # packed sequences
        assert len(lengths) == 2 * cfg.train.global_batch_size and seg.shape[0] < len(lengths)
        real = lengths.sum()
        # The batch's, for every step: the compiling one too (a resumed run's first line left out its first step)
        assert record["padding_fraction"] == pytest.approx(1 - real / seg.size, rel=1e-9)
        assert 0 < record["padding_fraction"] < 1
        if record["step"] == 1:  # the call that compiled the step: no throughput (its seconds were compiling)
            assert not {"tokens_per_sec", "mfu", "step_time"} & record.keys()
            continue
        train_flops = (6 * n * lengths + 12 * per_layer * lengths ** 2).sum()
        flops = train_flops * 4 / 3  # + the frozen reference's forward pass
        assert record["tokens_per_sec"] * record["step_time"] == pytest.approx(real, rel=1e-9)
        assert record["mfu"] == pytest.approx(flops / record["step_time"] / (0.5e12 * jax.device_count()), rel=1e-9)


def test_a_log_line_fetches_its_steps_metrics_in_one_round_trip(monkeypatch):
    """A log line's metrics come to the host in one round trip: every value's copy is started before the host waits
    on any (a fetch per value waited 120 times, one after the other, for a line of 10 steps of 12 metrics; the
    device stays idle meanwhile, as the line waits on the step just queued). The line is still the exact mean of
    each step's own values."""
    from jax._src import array

    events, value = [], array.ArrayImpl._value
    start_copy = array.ArrayImpl.copy_to_host_async
    monkeypatch.setattr(array.ArrayImpl, "copy_to_host_async", lambda x: (events.append("start"), start_copy(x))[1])
    monkeypatch.setattr(array.ArrayImpl, "_value", property(lambda x: (events.append("wait"), value.fget(x))[1]))
    records = []
    writer = types.SimpleNamespace(write=lambda step, line: records.append(line))
    bar = types.SimpleNamespace(update=lambda n: None, set_postfix=lambda d: None, disable=False)
    log = train_log.StepLog(writer, bar, None, "", lambda infos, seconds: {})
    step_metrics = jax.jit(lambda x: {"loss": x / 3, "grad_norm": x * x / 7, "lr": x / 11, "other": jnp.sin(x)})
    steps = [step_metrics(jnp.float32(s)) for s in range(1, 11)]
    for s, metrics in enumerate(steps, start=1):
        log.add(s, metrics, None)
    jax.block_until_ready(steps)
    events.clear()
    log.write()
    assert events.index("wait") == events.count("start") == 40, events
    expected = [{k: float(np.asarray(v)) for k, v in m.items()} for m in steps]
    for k in ("loss", "grad_norm", "other"):
        assert records[0][k] == float(np.mean([m[k] for m in expected]))
    assert records[0]["lr"] == expected[-1]["lr"]
    # A line's padding fraction counts every step's batch, the untimed (a compiling call, a preempted run's steps
    # carried over through the checkpoint's JSON) with the timed; throughput the timed steps alone.
    from zephyr_jax.data.loader import BatchInfo

    timed, padded = [], []
    infos = [BatchInfo(np.arange(2 * s, 2 * s + 2), 8 * s, 2) for s in range(1, 5)]
    as_tuples = lambda infos: [(list(map(int, i.indices)), i.length, i.rows) for i in infos]  # noqa: E731
    make_log = lambda: train_log.StepLog(writer, bar, None, "", lambda infos, seconds: timed.append(infos) or {},
                                         padding_of=lambda infos: padded.append(infos) or 0.25)  # noqa: E731
    preempted, resumed = make_log(), make_log()
    for log, first, last in ((preempted, 1, 2), (resumed, 3, 4)):
        if log is resumed:
            resumed.carry_over(json.loads(json.dumps(preempted.unwritten())))
        for s in range(first, last + 1):
            log.add(s, steps[s - 1], infos[s - 1], epoch=0)
            if not log.timed_from:
                log.time_from(s, steps[s - 1])
    resumed.write()
    assert as_tuples(padded[0]) == as_tuples(infos) and [as_tuples(t) for t in timed] == [as_tuples(infos[3:])]
    assert records[-1]["padding_fraction"] == 0.25 and records[-1]["epoch"] == 0
    assert records[-1]["loss"] == float(np.mean([m["loss"] for m in expected[:4]]))


def test_to_host_gathers_only_the_arrays_split_over_processes(monkeypatch):
    """Under several processes an array split over them is all-gathered (device_get cannot read another host's
    shards) and one every process holds whole comes in the one device_get; each is the array's value."""
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = jax.make_mesh((jax.device_count(),), ("x",))
    split = jax.device_put(jnp.arange(16.0), NamedSharding(mesh, PartitionSpec("x")))
    whole = jax.device_put(jnp.arange(3.0), NamedSharding(mesh, PartitionSpec()))
    gathered = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda x, tiled: (gathered.append(x), jax.device_get(x))[1])
    out = train_steps.to_host({"split": split, "whole": whole})
    assert len(gathered) == 1 and gathered[0] is split
    np.testing.assert_array_equal(out["split"], np.arange(16.0))
    np.testing.assert_array_equal(out["whole"], np.arange(3.0))


def test_eval_batches_are_queued_one_ahead_of_the_fetch_of_their_outputs(monkeypatch):
    """An eval (or reference) pass builds, places and queues the next batch before it waits on this one's outputs,
    so the device does not sit idle while the host works (it waited on each batch before building the next: an
    eval's 63 batches of 32 pairs, a reference pass's 1,900). The outputs are those of one batch at a time, in
    order, each cut to its real rows."""
    events, to_host = [], train_steps.to_host
    monkeypatch.setattr(train_steps, "to_host", lambda tree: (events.append("fetch"), to_host(tree))[1])
    eval_fn = jax.jit(lambda params, batch: {"nll": batch["x"] * params, "tokens": batch["x"].sum(-1)})

    def place(batch):
        events.append("queue")
        return jax.device_put(batch)

    batches = [({"x": np.arange(8, dtype=np.float32).reshape(4, 2) + 10 * k}, real) for k, real in
               enumerate((4, 4, 3))]
    out = train_steps.run_eval_batches(eval_fn, jnp.float32(2.0), iter(batches), place)
    assert events == ["queue", "queue", "fetch", "queue", "fetch", "fetch"], events
    expected = [jax.device_get(eval_fn(jnp.float32(2.0), b)) for b, _ in batches]
    for k in ("nll", "tokens"):
        np.testing.assert_array_equal(out[k], np.concatenate([e[k][:real] for e, (_, real) in zip(expected, batches)]))


def test_a_log_line_of_several_steps_gives_the_time_of_one_and_forgets_the_last_lines_pauses(monkeypatch):
    """A line's step_time is the wall time of its timed steps per step (with log_every > 1 it read the line's whole
    time), and time paused before one line (an eval) is taken off that line only, not off the next too. Bounds from
    the wall clock around stand-in steps of 0.2 s and an eval of 0.3 s."""
    monkeypatch.setattr(train_log.jax, "block_until_ready", lambda x: x)
    records = []
    writer = types.SimpleNamespace(write=lambda step, line: records.append(line))
    bar = types.SimpleNamespace(update=lambda n: None, set_postfix=lambda d: None, disable=False)
    log = train_log.StepLog(writer, bar, None, "", lambda infos, seconds: {"tokens_per_sec": sum(infos) / seconds})
    metrics = {"loss": 1.0, "grad_norm": 1.0, "lr": 0.1}
    log.add(1, metrics, 100)
    log.time_from(1, metrics)  # the step that compiled: no throughput
    log.write()
    start = time.perf_counter()
    with log.paused():
        time.sleep(0.3)
    for step in (2, 3):
        time.sleep(0.2)
        log.add(step, metrics, 100)
    log.write()
    two = time.perf_counter() - start
    start = time.perf_counter()
    time.sleep(0.2)
    log.add(4, metrics, 100)
    log.write()
    one = time.perf_counter() - start
    assert "step_time" not in records[0]
    assert 0.2 <= records[1]["step_time"] <= (two - 0.3) / 2
    assert records[1]["tokens_per_sec"] * records[1]["step_time"] == pytest.approx(100, rel=1e-9)
    assert 0.2 <= records[2]["step_time"] <= one
