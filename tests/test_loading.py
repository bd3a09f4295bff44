"""zephyr_jax.load: one loader for Hugging Face directories and zephyr_jax training workdirs, in the asked dtype,
straight onto the mesh. Tiny models, CPU only, no network."""

import json
import logging
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import NamedSharding

import zephyr_jax
from tests.test_checkpoint import legacy_layout
from tests.torch_reference import save_torch, torch_mistral
from zephyr_jax import checkpoint, hf
from zephyr_jax.loading import config_vocab_size, load_model
from zephyr_jax.model import Mistral, MistralConfig
from zephyr_jax.sharding import DEFAULT_RULES, logical_to_spec, make_mesh, rules_table
from zephyr_jax.train_steps import TrainState

CFG = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
STEPS = {3: 1, 6: 2}  # checkpoint step -> the seed of its random weights


def flat(model) -> dict:
    return {hf._dotted(p): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def save_checkpoint(workdir, step, params):
    """A checkpoint as training writes it (checkpoint.save: params, optimizer state, step, loader position)."""
    mngr = checkpoint.manager(str(workdir), async_save=False)
    tx = optax.sgd(0.1)
    checkpoint.save(mngr, TrainState(params, tx.init(params), jnp.asarray(step, jnp.int32)),
                    {"loader": {"epoch": 0, "step": step}})
    mngr.wait_until_finished()
    mngr.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A training workdir (model_config.json, config.json + float32 checkpoints at steps 3 and 6) and each step's
    weights."""
    path = tmp_path_factory.mktemp("workdir")
    checkpoint.save_model_config(str(path), CFG)
    # Training also writes its run config as config.json, the name of a Hugging Face directory's model config.
    (path / "config.json").write_text(json.dumps({"stage": "sft", "model": {"init": "random"}}))
    weights = {}
    for step, seed in STEPS.items():
        model = Mistral(CFG, rngs=nnx.Rngs(seed))
        save_checkpoint(path, step, nnx.state(model))
        weights[step] = {k: np.asarray(v) for k, v in flat(model).items()}
    return str(path), weights


def assert_on_mesh(model, mesh, rules=DEFAULT_RULES):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        want = NamedSharding(mesh, logical_to_spec(var.get_metadata()["logical_axes"], rules))
        assert value.sharding.is_equivalent_to(want, value.ndim), (path, value.sharding, want)


def test_zephyr_jax_load_is_the_loader_and_import_stays_cheap(tmp_path):
    """DESIGN.md's names: `model, tok = zephyr_jax.load(...)` and `hf.load_pretrained(path, dtype=...)`, both
    the one reader (load_model)."""
    from zephyr_jax.loading import load

    assert zephyr_jax.load is load
    path = save_torch(torch_mistral(seed=3), tmp_path)
    model, tok = zephyr_jax.load(path, dtype="float32")
    assert isinstance(model, Mistral) and tok.bos_token_id == 1 and tok.chat_template
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a tokenizer= of one's own
    tok.save_pretrained(str(tmp_path / "my_tokenizer"))
    assert zephyr_jax.load(path, "float32", tokenizer=str(tmp_path / "my_tokenizer"))[1].chat_template == \
        tok.chat_template
    pretrained = hf.load_pretrained(path, dtype=jnp.float32)
    assert pretrained.config == model.config
    for name, value in flat(pretrained).items():
        np.testing.assert_array_equal(value, flat(model)[name], err_msg=name)
    out = subprocess.run([sys.executable, "-c", "import sys, zephyr_jax; print('jax' in sys.modules)"],
                         capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def test_hf_directory_holds_the_transformers_weights(tmp_path):
    tm = torch_mistral(seed=3)
    model = load_model(save_torch(tm, tmp_path), "float32")
    assert model.config.dtype == model.config.param_dtype == jnp.float32
    ours = flat(model)
    for name, tensor in tm.state_dict().items():
        flax_name, layer, transposed = hf.hf_to_flax_name(name)
        value = np.asarray(ours[flax_name] if layer is None else ours[flax_name][layer])
        np.testing.assert_array_equal(value.T if transposed else value, tensor.numpy(), err_msg=name)
    # The default is bf16 weights (inference); the device is the default device.
    bf16 = flat(load_model(str(tmp_path)))
    assert {v.dtype for v in bf16.values()} == {jnp.dtype(jnp.bfloat16)}
    assert {d for v in bf16.values() for d in v.sharding.device_set} == {jax.devices()[0]}
    np.testing.assert_array_equal(bf16["embed_tokens"], ours["embed_tokens"].astype(jnp.bfloat16))
    # float16 weights in range load as they are (the range check names only a weight past float16's largest)
    f16 = flat(load_model(str(tmp_path), "float16"))
    assert {v.dtype for v in f16.values()} == {jnp.dtype(jnp.float16)}
    np.testing.assert_array_equal(f16["layers.mlp.down_proj.kernel"], ours["layers.mlp.down_proj.kernel"].astype(
        jnp.float16))
    assert config_vocab_size(str(tmp_path)) == tm.config.vocab_size  # (read from config.json, no weight)


def test_workdir_restores_in_bf16_onto_the_mesh(workdir):
    path, weights = workdir
    mesh = make_mesh((1, 4, 2), jax.devices()[:8])
    model = load_model(path, "bfloat16", mesh)  # step -1: the latest, 6
    assert model.config.dtype == model.config.param_dtype == jnp.bfloat16
    assert_on_mesh(model, mesh)
    kernel = model.layers.mlp.gate_proj.kernel.get_value()  # [layers, embed, mlp] split over fsdp x tensor
    assert kernel.addressable_shards[0].data.shape == (2, 64 // 4, 128 // 2)
    for name, value in flat(model).items():
        assert value.dtype == jnp.bfloat16, name
        np.testing.assert_array_equal(np.asarray(value), weights[6][name].astype(jnp.bfloat16), err_msg=name)


def test_custom_rules_place_the_weights_and_the_activations(workdir):
    """load_model(rules=...): the weights go where the rules say, and so do the activations (the model config's
    sharding_rules, which its forward's constraints read: "batch" names no weight), with the default rules'
    logits."""
    path, _ = workdir
    mesh = make_mesh((1, 4, 2), jax.devices()[:8])
    rules = {**dict(rules_table()), "batch": (), "vocab": ()}  # rows, the LM head and the logits unsplit
    ids = jnp.asarray(np.random.default_rng(0).integers(3, CFG.vocab_size, (4, 12)))
    forward = nnx.jit(lambda model, x: model(x))
    logits = {}
    for name, given in (("default", DEFAULT_RULES), ("custom", rules)):
        model = load_model(path, "float32", mesh, rules=given)
        assert model.config.sharding_rules == rules_table(given)
        assert_on_mesh(model, mesh, given)  # (the LM head's vocab unsplit under the custom rules)
        with jax.set_mesh(mesh):  # (where the model's activation constraints apply)
            logits[name] = forward(model, ids)
        want = NamedSharding(mesh, logical_to_spec(("batch", "length", "vocab"), given))
        assert logits[name].sharding.is_equivalent_to(want, 3), (name, logits[name].sharding)
    shapes = {name: x.sharding.shard_shape(x.shape) for name, x in logits.items()}  # rows and vocab split or not
    assert shapes == {"default": (1, 12, CFG.vocab_size // 2), "custom": (4, 12, CFG.vocab_size)}, shapes
    np.testing.assert_allclose(np.asarray(logits["custom"]), np.asarray(logits["default"]), rtol=1e-5, atol=1e-5)


def test_workdir_step_selection_and_missing_step(workdir, caplog):
    path, weights = workdir
    with caplog.at_level(logging.WARNING):
        model = load_model(path, "float32", step=3, param_dtype="float32", remat="full")
    assert "Metadata file does not exist" not in caplog.text  # read as orbax's own handler reads it
    assert model.config.remat == "full"
    for name, value in flat(model).items():
        assert value.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(value), weights[3][name], err_msg=name)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint for step 5 in .* \(have steps \[3, 6\]\)"):
        load_model(path, step=5)
    assert checkpoint.resolve_step(path) == 6 and checkpoint.resolve_step(path, 3) == 3
    # A resume reads back the step and loader position checkpoint.save wrote with the weights.
    _, abstract = nnx.split(nnx.eval_shape(lambda: Mistral(CFG, rngs=nnx.Rngs(0))))
    abstract_state = jax.eval_shape(lambda: TrainState(abstract, optax.sgd(0.1).init(abstract),
                                                       jnp.zeros((), jnp.int32)))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    mngr = checkpoint.manager(path, async_save=False)
    state, meta = checkpoint.restore(mngr, 3, abstract_state, jax.tree.map(lambda _: device, abstract_state))
    mngr.close()
    assert int(state.step) == 3 and meta == {"loader": {"epoch": 0, "step": 3}, "step": 3}
    np.testing.assert_array_equal(np.asarray(state.params["embed_tokens"].get_value()), weights[3]["embed_tokens"])
    # (evaluate's early check of the data's token ids reads a workdir's vocabulary without its weights)
    assert config_vocab_size(path) == CFG.vocab_size and config_vocab_size("no-such-org/model") is None


def test_legacy_unstacked_checkpoint_restores_in_bf16_onto_the_mesh(tmp_path):
    model = Mistral(CFG, rngs=nnx.Rngs(4))
    checkpoint.save_model_config(str(tmp_path), CFG)
    mngr = checkpoint.manager(str(tmp_path), async_save=False)
    mngr.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(legacy_layout(nnx.state(model))),
                                         meta=ocp.args.JsonSave({"step": 2})))
    mngr.wait_until_finished()
    mesh = make_mesh((1, 8, 1), jax.devices()[:8])
    again = load_model(str(tmp_path), "bfloat16", mesh)
    assert_on_mesh(again, mesh)
    want = flat(model)
    for name, value in flat(again).items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(want[name]).astype(jnp.bfloat16), err_msg=name)


def test_clear_errors(workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"/no/such/model does not exist"):
        load_model("/no/such/model")
    # One rule for models and tokenizers (zephyr_jax/hub.py): huggingface_hub's own repo-id check.
    from zephyr_jax.hub import local_dir

    (tmp_path / "file").write_text("x")
    assert local_dir(str(tmp_path), "model") == str(tmp_path) and local_dir("org/name", "model") is None
    assert local_dir("gpt2", "model") is None
    for bad in ("./missing", "~/missing-model", "a//b", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"model {bad} does not exist .neither a local directory nor"):
            local_dir(bad, "model")
    with pytest.raises(FileNotFoundError, match="tokenizer .*/file is a file: pass the directory that holds it"):
        local_dir(str(tmp_path / "file"), "tokenizer")
    with pytest.raises(FileNotFoundError, match="^tokenizer is an empty string: name a local directory or a"):
        local_dir("", "tokenizer")
    with pytest.raises(FileNotFoundError, match=r"^model is blank \(' \\t'\): name a local directory or a"):
        local_dir(" \t", "model")  # (was "model  \t does not exist")
    with pytest.raises(TypeError, match=r"mesh=\(1, 1, 8\): pass a jax Mesh, e.g. sharding.make_mesh\(\(1, 1, 8\)\)"):
        load_model(str(workdir[0]), mesh=(1, 1, 8))  # the CLIs' --mesh shape: failed deep in sharding.py
    with pytest.raises(FileNotFoundError, match=r"neither a Hugging Face model directory .* nor a zephyr_jax"):
        load_model(str(tmp_path))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    checkpoint.save_model_config(str(empty), CFG)
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in .*empty_run"):
        load_model(str(empty))
    (empty / "config.json").write_text('{"stage": "sft", "tokeni')  # the run's config cut short: named
    from zephyr_jax.tokenizer import tokenizer_for

    with pytest.raises(ValueError, match=r"/empty_run/config.json: not valid JSON \(Unterminated string"):
        tokenizer_for(str(empty))  # (zephyr_jax.load's tokenizer: the workdir's config names it)
    assert not (empty / "checkpoints").exists()  # reading never creates the directory
    hf.save_pretrained(Mistral(CFG, rngs=nnx.Rngs(0)), str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"step=3: .* is not a zephyr_jax training workdir"):
        load_model(str(tmp_path / "hf"), step=3)


def test_a_model_path_under_home_loads_its_own_tokenizer(tiny_model_dir, monkeypatch):
    """"~/model" names the directory for the tokenizer as for the weights (a dDPO run records it expanded)."""
    from zephyr_jax.tokenizer import load_tokenizer, tokenizer_for, tokenizer_source

    monkeypatch.setenv("HOME", os.path.dirname(tiny_model_dir))
    path = "~/" + os.path.basename(tiny_model_dir)
    assert tokenizer_source(path) == tiny_model_dir
    assert tokenizer_for(path).get_vocab() == load_tokenizer(tiny_model_dir).get_vocab()


def test_a_tokenizer_that_is_not_there_is_named_before_the_weights_are_read(tiny_model_dir, tmp_path, monkeypatch):
    """chat's, serve's and evaluate's --tokenizer with a typo was found after the weights' load (minutes for a 7B),
    as export's was."""
    from zephyr_jax import loading

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the weights were read first"))
    with pytest.raises(FileNotFoundError, match=f"^tokenizer {re.escape(str(tmp_path / 'none'))} does not exist"):
        loading.load(tiny_model_dir, tokenizer=str(tmp_path / "none"))


def test_a_step_asked_of_a_model_that_is_not_a_workdir_is_refused(tmp_path):
    """step selects one of a training workdir's checkpoints; a Hugging Face directory has one set of weights, so
    any step asked of it (0 included) is refused, not ignored: the weights read would not be that step's."""
    hf.save_pretrained(Mistral(CFG, rngs=nnx.Rngs(0)), str(tmp_path))
    for step in (0, 3):
        with pytest.raises(ValueError, match=f"step={step}: .* is not a zephyr_jax training workdir"):
            load_model(str(tmp_path), step=step)


def test_a_float32_checkpoint_loads_in_bfloat16_without_a_float32_copy(tmp_path, monkeypatch):
    """A bf16 load of a float32 checkpoint never holds float32 weights (7B of them are 28 GB of host memory): each
    tensor comes from the file in row blocks, cast as they land in the bf16 parameter. numpy's allocations, as
    tracemalloc counts them: the peak is the bf16 parameters and a block or two, not a float32 tensor (here a block
    is 256 KiB, as 32 MiB is beside a 7B model's 0.5 GB embedding), let alone the float32 model."""
    import glob
    import tracemalloc

    monkeypatch.setattr(hf, "_BLOCK_BYTES", 256 * 1024)
    cfg = MistralConfig(vocab_size=2048, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2)
    hf.save_pretrained(Mistral(cfg, rngs=nnx.Rngs(0)), str(tmp_path), dtype=jnp.float32)
    float32 = sum(os.path.getsize(f) for f in glob.glob(str(tmp_path / "*.safetensors")))
    # Once before measuring: a worker's first load also allocates what it keeps (modules imported on first use,
    # jax's caches): 0.9 MB of it here alone, 1.1 MB in a CI worker, against 0.46 MB for every later load.
    load_model(str(tmp_path), "bfloat16")
    tracemalloc.start()
    try:
        model = load_model(str(tmp_path), "bfloat16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    params = jax.tree.leaves(nnx.state(model))
    held = sum(x.nbytes for x in params)
    assert {x.dtype for x in params} == {jnp.dtype(jnp.bfloat16)} and held == pytest.approx(float32 / 2, rel=1e-3)
    largest = max(x.size for x in params) * 4  # the embedding's float32 bytes: 2 MiB
    assert peak - held < min(largest, 2**20), (peak - held, largest)


@pytest.mark.parametrize("command, args", [
    ("chat", ["--prompt=Hi"]),
    ("serve", ["--port=0"]),  # (any free port: serve checks it can listen before it loads)
    ("evaluate", ["mt_bench", "--question_file={tmp}/q.jsonl", "--model_id=m"]),  # (read before the model)
])
def test_the_model_commands_name_a_missing_model_or_an_unfit_mesh_in_one_line(command, args, tiny_model_dir,
                                                                               serve_logger, tmp_path):
    """chat, serve and evaluate end with the loader's or the mesh's message, not a traceback that ends in it."""
    import importlib

    (tmp_path / "q.jsonl").write_text(json.dumps({"question_id": 1, "category": "writing", "turns": ["Hi"]}) + "\n")
    args = [a.format(tmp=tmp_path) for a in args]
    main = importlib.import_module(f"zephyr_jax.{command}").main
    with pytest.raises(SystemExit, match=r"^error: model /no/such/model does not exist \(neither a local directory"):
        main(args + ["--model=/no/such/model"])
    with pytest.raises(SystemExit, match=r"^error: mesh shape \(1, 1, 3\) needs 3 devices; 8 are available"):
        main(args + [f"--model={tiny_model_dir}", "--mesh=1,1,3"])
