"""zephyr_jax.hf: HF checkpoints load into the JAX Mistral and export back, bit for bit, in layouts transformers
reads; bad checkpoints fail with errors that name the culprit. Tiny configs, CPU only, no network."""

import copy
import glob
import json
import os
import re
import shutil
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch
import transformers
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from zephyr_jax import hf
from zephyr_jax.loading import load_model
from zephyr_jax.model import Mistral, MistralConfig
from zephyr_jax.sharding import logical_to_spec

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, sliding_window=4096)
IDS = np.random.default_rng(0).integers(0, TINY["vocab_size"], size=(2, 12)).astype(np.int32)


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(IDS).long()).logits.float().numpy()


def jax_logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(IDS)))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def flat_params(model) -> dict:
    return {hf._dotted(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def load_hf(path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def tensors_of(file) -> dict:
    with safetensors.safe_open(file, "numpy") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A random transformers MistralForCausalLM saved as safetensors, and its logits."""
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, attn_implementation="eager"))
    path = str(tmp_path_factory.mktemp("hf_tiny"))
    model.eval().save_pretrained(path, safe_serialization=True)
    return path, torch_logits(model)


@pytest.fixture(scope="module")
def loaded(hf_dir):
    return load_model(hf_dir[0], jnp.float32)


def copy_ckpt(src, dst, edit=None):
    """A copy of a single-file checkpoint, its tensors passed through edit(dict) first."""
    shutil.copytree(src, dst)
    tensors = tensors_of(os.path.join(src, hf.WEIGHTS_NAME))
    if edit:
        edit(tensors)
    safetensors.numpy.save_file(tensors, os.path.join(dst, hf.WEIGHTS_NAME), metadata={"format": "pt"})
    return str(dst)


# --- names ------------------------------------------------------------------------------------------------

def test_name_mapping_round_trips():
    cfg = MistralConfig(**TINY)
    names = hf.hf_names(cfg)
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "lm_head.weight"
    assert len(names) == 2 * 9 + 3
    for name in names:
        flax_name, layer, transposed = hf.hf_to_flax_name(name)
        assert hf.flax_to_hf_name(flax_name, layer) == (name, transposed)
    # The decoder layers are stacked: HF's layer 1 is slice 1 of one parameter.
    assert hf.hf_to_flax_name("model.layers.1.mlp.up_proj.weight") == ("layers.mlp.up_proj.kernel", 1, True)
    assert hf.hf_to_flax_name("model.layers.0.self_attn.rotary_emb.inv_freq") is None
    assert "lm_head.weight" not in hf.hf_names(cfg.replace(tie_word_embeddings=True))
    assert hf.parse_size("5GB") == 5 * 10**9 and hf.parse_size("200MB") == 200 * 10**6
    assert hf.parse_size("1GiB") == 2**30 and hf.parse_size(1234) == 1234 and hf.parse_size(1e9) == 10**9


# --- import -----------------------------------------------------------------------------------------------

def test_load_matches_transformers(hf_dir, loaded):
    expected = hf_dir[1]
    assert isinstance(loaded, Mistral)
    cfg = loaded.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.vocab_size) == (64, 2, 2, 128)
    assert cfg.rms_norm_eps == 1e-5 and cfg.param_dtype == jnp.float32
    assert max_diff(jax_logits(loaded), expected) <= 2e-5


def test_load_casts_and_overrides(hf_dir):
    model = load_model(hf_dir[0], jnp.bfloat16, param_dtype=jnp.float32, remat=True)
    assert model.config.dtype == jnp.bfloat16 and model.config.remat
    assert all(v.dtype == jnp.float32 for v in flat_params(model).values())
    model = load_model(hf_dir[0], jnp.bfloat16)
    assert all(v.dtype == jnp.bfloat16 for v in flat_params(model).values())


# --- export -----------------------------------------------------------------------------------------------

def test_export_loads_in_transformers(loaded, tmp_path):
    hf.save_pretrained(loaded, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), "numpy") as f:
        assert f.metadata() == {"format": "pt"}
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["dtype"] == "float32"
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 2)
    assert max_diff(torch_logits(load_hf(str(tmp_path))), jax_logits(loaded)) <= 2e-5


def test_a_list_of_eos_ids_and_null_kv_heads_read_as_transformers_reads_them(tmp_path):
    """config.json's eos_token_id may list several ids (generate stops at each): kept through load and export,
    not cut to the first. A null num_key_value_heads means one KV head per attention head."""
    model = Mistral(MistralConfig(**TINY, eos_token_id=(2, 5)), rngs=nnx.Rngs(0))
    hf.save_pretrained(model, str(tmp_path))
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == [2, 5]
    generation = transformers.GenerationConfig.from_pretrained(str(tmp_path))
    assert (generation.eos_token_id, generation.pad_token_id) == ([2, 5], 2)
    again = load_model(str(tmp_path), jnp.float32)
    assert again.config.eos_token_id == (2, 5) and again.config == model.config
    null_kv = {**json.loads((tmp_path / "config.json").read_text()), "num_key_value_heads": None}
    assert MistralConfig.from_hf_dict(null_kv).num_key_value_heads == TINY["num_attention_heads"]


@pytest.mark.parametrize("fields", [dict(rope_theta=1e6), dict(sliding_window=None), dict(sliding_window=5),
                                    dict(head_dim=24)], ids=["rope_theta", "no_window", "window_5", "head_dim_24"])
def test_export_keeps_rope_theta_window_and_head_dim(fields, tmp_path):
    """Values away from transformers' defaults reach config.json: transformers reads them back, and its logits
    (12 tokens: past a window of 5) equal ours."""
    model = Mistral(MistralConfig(**{**TINY, "initializer_range": 0.2, **fields}), rngs=nnx.Rngs(0))
    hf.save_pretrained(model, str(tmp_path))
    theirs = load_hf(str(tmp_path))
    for key, value in fields.items():
        rope = getattr(theirs.config, "rope_parameters", None) or {"rope_theta": theirs.config.rope_theta}
        assert (rope["rope_theta"] if key == "rope_theta" else getattr(theirs.config, key)) == value, key
    assert max_diff(torch_logits(theirs), jax_logits(model)) <= 5e-5  # logits up to ~6: ~1e-5 measured


@pytest.mark.parametrize("tied", [False, True])
def test_save_load_is_bitwise(tmp_path, tied, monkeypatch):
    model = Mistral(MistralConfig(**TINY, tie_word_embeddings=tied), rngs=nnx.Rngs(7))
    with pytest.raises(ValueError, match="save_pretrained dtype=int8: a floating-point dtype"):  # wrote zeros
        hf.save_pretrained(model, str(tmp_path), dtype=jnp.int8)
    with pytest.raises(TypeError, match="tokenizer='some/path': pass a tokenizer object"):  # failed after the weights
        hf.save_pretrained(model, str(tmp_path), tokenizer="some/path")
    assert not os.listdir(tmp_path)
    hf.save_pretrained(model, str(tmp_path))
    again = load_model(str(tmp_path), jnp.float32)
    before, after = flat_params(model), flat_params(again)
    assert before.keys() == after.keys() and ("lm_head.kernel" in before) != tied
    for name in before:
        assert after[name].dtype == before[name].dtype and np.array_equal(after[name], before[name]), name
    assert again.config == model.config
    if tied:  # transformers ties lm_head to the embedding from the config alone
        assert max_diff(torch_logits(load_hf(str(tmp_path))), jax_logits(model)) <= 2e-5
        # ... and so does a checkpoint whose saver also wrote the head (transformers loads it the same way), compared
        # in blocks of 1,000 bytes (32,768 in all: a partial last block)
        monkeypatch.setattr(hf, "_BLOCK_BYTES", 1000)
        with_head = copy_ckpt(tmp_path, tmp_path / "with_head",
                              lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].copy()}))
        assert all(np.array_equal(a, b) for a, b in zip(flat_params(load_model(with_head, jnp.float32)).values(),
                                                          before.values()))

        # A head of its own under a tied config: transformers unties them and keeps it; dropping it loaded another
        # model, so it is refused, naming the fix (here the difference is in the last, partial block)
        def own(tensors):
            tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()
            tensors["lm_head.weight"][-1, -1] += 1e-3
        own_head = copy_ckpt(tmp_path, tmp_path / "own_head", own)
        with pytest.raises(ValueError, match=r"tie_word_embeddings=true, but the checkpoint's lm_head.weight "
                                             r"\(F32 \[128, 64\]\) differs from model.embed_tokens.weight: set"):
            load_model(own_head, jnp.float32)
        with pytest.raises(ValueError, match=r"differs from model.embed_tokens.weight"):  # training's early check
            hf.check_weights(own_head, again.config)
        hf.check_weights(with_head, again.config)


def test_row_block_streaming_is_exact(hf_dir, monkeypatch, tmp_path):
    """Tensors move in row blocks, and to or from a kernel's transposed layout in strips of rows or columns;
    blocks of a few rows and strips of 5 (both with a partial last one) change nothing, in float32 and cast to
    bfloat16 on the way in or out."""
    monkeypatch.setattr(hf, "_BLOCK_BYTES", 1000)
    monkeypatch.setattr(hf, "_STRIP", 5)
    original = tensors_of(os.path.join(hf_dir[0], hf.WEIGHTS_NAME))
    for dtype in (jnp.float32, jnp.bfloat16):
        model = load_model(hf_dir[0], dtype)
        params = flat_params(model)
        for name, value in original.items():  # each parameter is the tensor (transposed), cast as numpy casts
            flax_name, layer, transposed = hf.hf_to_flax_name(name)
            loaded = params[flax_name] if layer is None else params[flax_name][layer]
            assert np.array_equal(loaded, (value.T if transposed else value).astype(dtype)), (name, dtype)
    model = load_model(hf_dir[0], jnp.float32)
    assert max_diff(jax_logits(model), hf_dir[1]) <= 2e-5
    hf.save_pretrained(model, str(tmp_path), dtype=jnp.bfloat16)
    with safetensors.safe_open(str(tmp_path / hf.WEIGHTS_NAME), "pt") as f:
        for name, value in original.items():
            assert torch.equal(f.get_tensor(name), torch.from_numpy(value).bfloat16()), name


def test_sharded_save_writes_a_correct_index(loaded, tmp_path):
    out = str(tmp_path)
    hf.save_pretrained(loaded, out)  # a single file first: the sharded save must replace it
    hf.save_pretrained(loaded, out, max_shard_size="40KB")
    files = sorted(glob.glob(os.path.join(out, "*.safetensors")))
    assert len(files) > 2 and not os.path.exists(os.path.join(out, hf.WEIGHTS_NAME))
    n = len(files)
    assert [os.path.basename(f) for f in files] == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    index = json.loads((tmp_path / hf.INDEX_NAME).read_text())
    weight_map = index["weight_map"]
    assert sorted(weight_map) == sorted(hf.hf_names(loaded.config))  # every tensor listed, once (dict keys)
    total = parameters = 0
    for file in files:
        tensors = tensors_of(file)
        listed = {name for name, f in weight_map.items() if f == os.path.basename(file)}
        assert set(tensors) == listed, file
        assert sum(t.nbytes for t in tensors.values()) <= 40_000 or len(tensors) == 1
        total += sum(t.nbytes for t in tensors.values())
        parameters += sum(t.size for t in tensors.values())
    assert index["metadata"]["total_size"] == total
    assert index["metadata"]["total_parameters"] == parameters
    expected = jax_logits(loaded)
    assert max_diff(torch_logits(load_hf(out)), expected) <= 2e-5
    assert max_diff(jax_logits(load_model(out, jnp.float32)), expected) <= 2e-5
    hf.save_pretrained(loaded, out)  # one file again: no shard and no index is left of the sharded save
    assert sorted(os.listdir(out)) == ["config.json", "generation_config.json", "model.safetensors"]


def test_a_save_killed_over_an_earlier_one_leaves_no_model_that_loads(loaded, tmp_path, monkeypatch):
    """Old shards beside new ones under the old config.json loaded without a word in both loaders (a kill -9
    after the first shard of a re-export): config.json is removed first and written last."""
    hf.save_pretrained(loaded, str(tmp_path), max_shard_size="100KB")
    write, calls = hf._write_safetensors, []

    def killed_after_one_shard(*args, **kwargs):
        if calls:
            raise KeyboardInterrupt  # stands in for the kill
        calls.append(write(*args, **kwargs))

    monkeypatch.setattr(hf, "_write_safetensors", killed_after_one_shard)
    with pytest.raises(KeyboardInterrupt):
        hf.save_pretrained(loaded, str(tmp_path), max_shard_size="100KB")
    assert calls and not os.path.exists(tmp_path / hf.CONFIG_NAME)
    with pytest.raises(Exception, match="config.json"):
        load_model(str(tmp_path), jnp.float32)
    with pytest.raises((OSError, ValueError), match="config.json"):  # transformers: no model_type
        load_hf(str(tmp_path))
    # Saved again, as one file: the earlier shards go, and so does a shard a kill left half-written.
    (tmp_path / "model-00002-of-00009.safetensors.tmp").write_bytes(b"half a shard")
    monkeypatch.setattr(hf, "_write_safetensors", write)
    hf.save_pretrained(loaded, str(tmp_path))
    assert not [f for f in os.listdir(tmp_path) if f.startswith("model-")]
    assert max_diff(jax_logits(load_model(str(tmp_path), jnp.float32)), jax_logits(loaded)) == 0


def test_a_weight_past_float16s_range_is_refused_not_saved_as_inf(tmp_path):
    model = Mistral(MistralConfig(**{**TINY, "vocab_size": 32000}), rngs=nnx.Rngs(0))  # (the export's tokenizer's)
    model.norm.scale.set_value(model.norm.scale.get_value().at[0].set(1e5))
    with pytest.raises(ValueError, match=r"model.norm.weight has a value of magnitude 1e\+05, past float16's"):
        hf.save_pretrained(model, str(tmp_path), dtype=jnp.float16)
    hf.save_pretrained(model, str(tmp_path), dtype=jnp.bfloat16)  # bfloat16 has float32's range
    # Nor is it read into float16 as inf (chat, serve, evaluate --dtype=float16): numpy's cast only warns.
    with pytest.raises(ValueError, match=r"test_a_weight.*: model.norm.weight has a value past float16's largest "):
        load_model(str(tmp_path), "float16")
    # An export reads the checkpoint straight into float16 (orbax casts on the host): the weight arrives as inf.
    from tests.test_loading import save_checkpoint
    from zephyr_jax import checkpoint, export

    workdir = tmp_path / "run"
    workdir.mkdir()
    checkpoint.save_model_config(str(workdir), model.config)
    save_checkpoint(workdir, 1, nnx.state(model))
    with pytest.raises(ValueError, match=r"run step 1: model.norm.weight has a value past float16's largest "):
        export.export(str(workdir), str(tmp_path / "f16"), dtype="float16")
    assert not (tmp_path / "f16").exists()
    # A stacked layer weight is named by the layer that holds the value.
    model.norm.scale.set_value(model.norm.scale.get_value().at[0].set(1.0))
    norms = model.layers.post_attention_layernorm.scale
    norms.set_value(norms.get_value().at[1, 0].set(1e5))
    hf.save_pretrained(model, str(tmp_path / "layer"), dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match=r"model.layers.1.post_attention_layernorm.weight has a value past float16"):
        load_model(str(tmp_path / "layer"), "float16")


def test_bf16_save_reloads(loaded, hf_dir, tmp_path):
    want = {k: v.astype(jnp.bfloat16) for k, v in flat_params(loaded).items()}
    # dtype=bfloat16, and a model holding bf16 weights saved in its own dtype (no dtype given)
    for out, model, dtype in ((str(tmp_path), loaded, jnp.bfloat16),
                              (str(tmp_path / "own"), load_model(hf_dir[0], jnp.bfloat16), None)):
        hf.save_pretrained(model, out, dtype=dtype)
        with safetensors.safe_open(os.path.join(out, hf.WEIGHTS_NAME), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert json.loads(open(os.path.join(out, "config.json")).read())["dtype"] == "bfloat16"
    out = str(tmp_path / "own")
    again = flat_params(load_model(out, jnp.bfloat16))
    for name, value in want.items():
        assert again[name].dtype == jnp.bfloat16 and np.array_equal(again[name], value), name
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    q = torch_model.model.layers[1].self_attn.q_proj.weight.detach()
    assert q.dtype == torch.bfloat16
    assert np.array_equal(q.float().numpy().T, want["layers.self_attn.q_proj.kernel"][1].astype(np.float32))


def test_tokenizer_and_chat_template_are_exported(loaded, tmp_path):
    from zephyr_jax.tokenizer import load_tokenizer

    tok = load_tokenizer()
    with pytest.raises(ValueError, match="the tokenizer has 32000 tokens and the model a vocabulary of 128"):
        hf.save_pretrained(loaded, str(tmp_path / "small"), tokenizer=tok)  # ids past 127 have no embedding
    model = Mistral(MistralConfig(**{**TINY, "vocab_size": len(tok)}), rngs=nnx.Rngs(0))
    # An earlier save's tokenizer files that this one does not write would override it on loading.
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<unk>", "pad_token": "<unk>"}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<|im_start|>": 32000}))
    hf.save_pretrained(model, str(tmp_path), tokenizer=tok)
    reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (reloaded.bos_token, len(reloaded)) == ("<s>", 32000)
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "How are you?"}]
    for prompt in (False, True):
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        assert reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt) == text
        assert reloaded(text).input_ids == tok(text).input_ids
    # A class transformers 4 has too (5 writes TokenizersBackend, which 4 cannot load), reading the same file.
    with open(tmp_path / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "PreTrainedTokenizerFast"


_SMALL = dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=128, hidden_size=64,
              intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("extra", [
    {},  # rms_norm_eps and max_position_embeddings left out: transformers' class defaults, not Mistral-7B's
    {"rope_theta": 1e6},  # transformers 4.x
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},  # transformers 5
    {"rope_scaling": {"rope_type": "default", "rope_theta": 1e6}},
    {"rope_theta": 1e6, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},  # the nested one wins
    {"_attn_implementation_autoset": True, "rms_norm_eps": 1e-5},  # configs saved by transformers 4.48-4.50
    # a rope_scaling replaces rope_parameters, with or without a theta of its own
    {"rope_scaling": {"rope_type": "default", "rope_theta": 5e5}, "rope_parameters": {"rope_theta": 1e6}},
    {"rope_scaling": {"rope_type": "default"}, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
], ids=["defaults", "rope_theta", "rope_parameters", "rope_scaling", "both_thetas", "private_key", "scaling_wins",
        "scaling_without_theta"])
def test_config_json_reads_as_transformers_reads_it(extra):
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("reads config.json as transformers 5 does (rope_parameters)")
    ours = MistralConfig.from_hf_dict(copy.deepcopy({**_SMALL, **extra}))
    theirs = transformers.MistralConfig.from_dict(copy.deepcopy({**_SMALL, **extra}))  # it edits what it is given
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    for key in ("rms_norm_eps", "max_position_embeddings", "sliding_window", "head_dim", "tie_word_embeddings"):
        assert getattr(ours, key) == getattr(theirs, key), key


# --- clear errors -----------------------------------------------------------------------------------------

def test_other_architecture_is_refused(hf_dir, tmp_path):
    path = shutil.copytree(hf_dir[0], tmp_path / "llama")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"config\.json.*llama.*only Mistral"):
        load_model(str(path), jnp.float32)
    quantized = {**config, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
                 "quantization_config": {"quant_method": "gptq", "bits": 4}}  # not "tensors ... does not use"
    (path / "config.json").write_text(json.dumps(quantized))
    with pytest.raises(ValueError, match=r"llama/config\.json: quantization_config \(quant_method='gptq'\): "
                                         "quantized checkpoints are not supported"):
        load_model(str(path), jnp.float32)
    mistral = {k: v for k, v in quantized.items() if k != "quantization_config"}
    for extra, message in (({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope scaling .* is not "
                            "supported"),
                           ({"sliding_windw": 4096}, r"config.json has fields zephyr_jax does not know: "
                                                     r"\['sliding_windw'")):
        (path / "config.json").write_text(json.dumps({**mistral, **extra}))
        with pytest.raises(ValueError, match=rf"llama/config\.json: {message}"):
            load_model(str(path), jnp.float32)
    (path / "config.json").write_text(json.dumps(config)[:-20])  # cut short: named, not a bare JSONDecodeError
    with pytest.raises(ValueError, match=r"llama/config\.json: not valid JSON"):
        load_model(str(path), jnp.float32)
    (path / "config.json").write_text(json.dumps([config]))  # valid JSON, not an object: an AttributeError named none
    with pytest.raises(ValueError, match=r"llama/config\.json: a JSON object of config fields, not a list"):
        load_model(str(path), jnp.float32)


def test_wrong_shape_names_the_tensor(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.1.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    path = copy_ckpt(hf_dir[0], tmp_path / "ckpt", edit)
    with pytest.raises(ValueError, match=r"model\.safetensors: tensor model\.layers\.1\.self_attn\.k_proj\.weight "
                                         r"has shape \(16, 64\), but the config needs \(32, 64\)"):
        load_model(path, jnp.float32)


def test_missing_tensor_is_named(hf_dir, tmp_path):
    path = copy_ckpt(hf_dir[0], tmp_path / "ckpt", lambda t: t.pop("model.layers.0.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"missing 1 tensor\(s\): model\.layers\.0\.mlp\.down_proj\.weight"):
        load_model(path, jnp.float32)


def test_unexpected_tensor_is_named(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.q_proj.bias"] = np.zeros((64,), np.float32)

    path = copy_ckpt(hf_dir[0], tmp_path / "ckpt", edit)
    with pytest.raises(ValueError, match=r"does not use: model\.layers\.0\.self_attn\.q_proj\.bias"):
        load_model(path, jnp.float32)


def test_rotary_inv_freq_buffers_are_ignored(hf_dir, tmp_path):
    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones((8,), np.float32)

    model = load_model(copy_ckpt(hf_dir[0], tmp_path / "ckpt", edit), jnp.float32)
    assert max_diff(jax_logits(model), hf_dir[1]) <= 2e-5


def test_truncated_file_is_named(hf_dir, tmp_path):
    path = shutil.copytree(hf_dir[0], tmp_path / "ckpt")
    file = path / hf.WEIGHTS_NAME
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors is truncated inside tensor"):
        load_model(str(path), jnp.float32)
    # A file that is not safetensors (a download that saved an HTML error page), a damaged header, a header entry
    # zephyr_jax cannot read (float8) or whose byte range does not match its shape: each named with the file.
    whole = open(os.path.join(hf_dir[0], hf.WEIGHTS_NAME), "rb").read()
    header, start = hf.read_safetensors_header(os.path.join(hf_dir[0], hf.WEIGHTS_NAME))

    def with_header(name, **entry):
        edited = json.dumps({**header, name: {**header[name], **entry}}).encode()
        return struct.pack("<Q", len(edited)) + edited + whole[start:]

    embed = header["model.embed_tokens.weight"]
    for data, message in ((b"<!DOCTYPE html><html>Not Found</html>", r"is not a safetensors file \(bad header "
                                                                        r"length\)"),
                          (whole[:9] + b"{" + whole[10:], "has a corrupt safetensors header"),
                          (with_header("model.norm.weight", dtype="F8_E4M3"), "tensor model.norm.weight has dtype "
                           "F8_E4M3, which zephyr_jax cannot load"),
                          (with_header("model.embed_tokens.weight", data_offsets=[embed["data_offsets"][0],
                                                                                  embed["data_offsets"][1] - 4]),
                           r"tensor model.embed_tokens.weight has \d+ bytes for shape")):
        file.write_bytes(data)
        with pytest.raises(ValueError, match=rf"model\.safetensors:? {message}"):
            load_model(str(path), jnp.float32)


def test_missing_shard_file_is_named(loaded, tmp_path):
    hf.save_pretrained(loaded, str(tmp_path), max_shard_size="100KB")
    shards = sorted(glob.glob(str(tmp_path / "model-*.safetensors")))
    os.remove(shards[1])
    with pytest.raises(FileNotFoundError, match=rf"lists shard {os.path.basename(shards[1])}, which is missing"):
        load_model(str(tmp_path), jnp.float32)
    index = tmp_path / hf.INDEX_NAME
    shutil.copy(shards[0], shards[1])  # back, with the first shard's tensors: the index places others in it
    placed = {n for n, f in json.loads(index.read_text())["weight_map"].items() if f == os.path.basename(shards[1])}
    with pytest.raises(ValueError, match=rf"{os.path.basename(shards[1])} lacks tensor (\S+), which the index places "
                                         "in it") as error:
        load_model(str(tmp_path), jnp.float32)
    assert re.search(r"lacks tensor (\S+),", str(error.value)).group(1) in placed
    index.write_text(index.read_text()[:-20])  # cut short: named, not a bare JSONDecodeError
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        load_model(str(tmp_path), jnp.float32)
    index.write_text("[]")  # valid JSON, not an object: an AttributeError named none
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json has no weight_map"):
        load_model(str(tmp_path), jnp.float32)


def test_pytorch_bin_checkpoint_says_safetensors_only(hf_dir, tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(os.path.join(hf_dir[0], "config.json"), path)
    with pytest.raises(FileNotFoundError, match=r"bin has neither model\.safetensors nor model\.safetensors\.index"):
        load_model(str(path), jnp.float32)  # (no weights at all)
    torch.save({"model.norm.weight": torch.ones(64)}, path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin.*safetensors only.*safe_serialization=True"):
        load_model(str(path), jnp.float32)


def test_unreachable_hub_name_is_named(monkeypatch):
    import huggingface_hub

    def offline(*args, allow_patterns=(), **kwargs):
        import fnmatch

        repo = ["config.json", "model-00001-of-00003.safetensors", "model.safetensors.index.json",
                "tokenizer.model", "tokenizer_config.json", "consolidated.safetensors", "pytorch_model.bin"]
        fetched = [f for f in repo if any(fnmatch.fnmatch(f, p) for p in allow_patterns)]
        assert fetched == repo[:5]  # not mistral-inference's copy of the weights, nor pickles
        raise ConnectionError("no network\n\nCheck your connection")  # the hub client's messages span lines

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match=r"'someone/no-such-model' is not a local.*no network Check") as e:
        load_model("someone/no-such-model", jnp.float32)
    assert "\n" not in str(e.value)  # the CLIs print it as their one-line error
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("/nonexistent/dir", jnp.float32)


# --- sharded loading --------------------------------------------------------------------------------------

def test_a_parameter_that_does_not_divide_over_the_mesh_is_named_before_reading(hf_dir, monkeypatch):
    if jax.device_count() < 3:
        pytest.skip("needs 3 devices (tests/conftest.py simulates them on CPU)")
    monkeypatch.setattr(hf, "read_weights", lambda *a: pytest.fail("weights read before the mesh was checked"))
    mesh = Mesh(np.array(jax.devices()[:3]).reshape(1, 1, 3), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match=r"parameter embed_tokens \(128, 64\): its dimension of 128 does not divide "
                                         r"over mesh axes \('tensor',\) \(3 ways\); change the mesh shape \(1, 1, 3\)"):
        load_model(hf_dir[0], jnp.float32, mesh)
    with pytest.raises(ValueError, match=r"mesh axes \['tensor'\], which the mesh \{'data': 1, 'fsdp': 3\} lacks"):
        load_model(hf_dir[0], jnp.float32, Mesh(np.array(jax.devices()[:3]).reshape(1, 3), ("data", "fsdp")))


@pytest.mark.parametrize("mesh_shape", [(1, 8, 1), (1, 4, 2)])
def test_load_onto_mesh_shardings_and_save_back(hf_dir, loaded, mesh_shape, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/conftest.py simulates them on CPU)")
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(mesh_shape), ("data", "fsdp", "tensor"))
    model = load_model(hf_dir[0], jnp.float32, mesh)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value = var.get_value()
        want = NamedSharding(mesh, logical_to_spec(var.get_metadata()["logical_axes"]))
        assert value.sharding.is_equivalent_to(want, value.ndim), (path, value.sharding, want)
    kernel = model.layers.mlp.gate_proj.kernel.get_value()  # [layers, embed, mlp]: split over fsdp x tensor
    assert len(kernel.addressable_shards) == 8
    assert kernel.addressable_shards[0].data.shape == (2, 64 // mesh_shape[1], 128 // mesh_shape[2])
    assert max_diff(jax_logits(model), jax_logits(loaded)) <= 1e-5
    assert max_diff(jax_logits(model), hf_dir[1]) <= 2e-5

    hf.save_pretrained(model, str(tmp_path), max_shard_size="100KB")  # gathers each sharded param in turn
    params = [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    assert all(getattr(p, "_npy_value", None) is None for p in params), "a host copy stayed cached on a param"
    want, again = flat_params(loaded), flat_params(load_model(str(tmp_path), jnp.float32))
    assert all(np.array_equal(again[name], want[name]) for name in want)


def test_the_model_card_shows_the_last_records_up_to_the_exported_step(tmp_path):
    from zephyr_jax.export import final_metrics

    records = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 7)]
    records += [{"step": s, "split": "eval", "loss": 2.0 / s} for s in (3, 6)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    got = final_metrics(str(tmp_path), 3)
    assert got["train"]["step"] == 3 and got["eval"]["step"] == 3
    assert final_metrics(str(tmp_path))["train"]["step"] == 6
    assert final_metrics(str(tmp_path / "no_metrics_yet")) == {}  # (a run that logged nothing: the card has none)


def test_the_model_card_names_the_hub_model_and_datasets_the_runs_before_it_started_from(tmp_path):
    """dDPO from a dSFT workdir that started from a Hub model: the card's metadata, read back by huggingface_hub's
    own parser, names that model and both runs' Hub datasets; local paths name nothing."""
    from huggingface_hub import ModelCard

    from zephyr_jax.export import model_card

    sft, local_data = tmp_path / "sft", str(tmp_path / "my_prefs")
    sft.mkdir()
    sft_config = {"stage": "sft", "model": {"init": "hf", "path": "mistralai/Mistral-7B-v0.1"},
                  "data": {"train": "HuggingFaceH4/ultrachat_200k"}}
    (sft / "config.json").write_text(json.dumps(sft_config))
    dpo = {"stage": "dpo", "model": {"init": "orbax", "path": str(sft)},
           "data": {"train": "HuggingFaceH4/ultrafeedback_binarized"}}
    card = ModelCard(model_card(str(tmp_path / "dpo"), 6, dpo, {})).data
    assert card.base_model == "mistralai/Mistral-7B-v0.1"
    assert card.datasets == ["HuggingFaceH4/ultrachat_200k", "HuggingFaceH4/ultrafeedback_binarized"]
    assert card.library_name == "transformers" and card.tags == ["zephyr_jax", "mistral", "dpo"]
    # Local data, a local model directory, an init workdir gone since or unreadable: no lineage, and the card still
    # reads.
    gone = {"stage": "dpo", "model": {"init": "orbax", "path": str(tmp_path / "gone")}, "data": {"train": local_data}}
    local = {"stage": "sft", "model": {"init": "hf", "path": str(tmp_path / "mistral")}, "data": {"train": local_data}}
    (tmp_path / "odd" / "config.json").mkdir(parents=True)  # (open() raises IsADirectoryError)
    unreadable = {**gone, "model": {"init": "orbax", "path": str(tmp_path / "odd")}}
    for config in (gone, local, unreadable):
        card = ModelCard(model_card(str(tmp_path / "run"), 6, config, {})).data
        assert card.base_model is None and card.datasets is None and card.library_name == "transformers"
    # A run initialised from itself (a workdir's config edited by hand): the walk stops, each dataset named once
    (tmp_path / "loop").mkdir()
    looped = {"stage": "dpo", "model": {"init": "orbax", "path": str(tmp_path / "loop")},
              "data": {"train": "HuggingFaceH4/ultrafeedback_binarized"}}
    (tmp_path / "loop" / "config.json").write_text(json.dumps(looped))
    card = ModelCard(model_card(str(tmp_path / "loop"), 6, looped, {})).data
    assert card.base_model is None and card.datasets == ["HuggingFaceH4/ultrafeedback_binarized"]
    # model.arch is a random model's architecture, shown only for one (otherwise config.json's is the model's)
    arch = {"hidden_size": 64, "num_hidden_layers": 2}
    for init, shown in (("random", True), ("hf", False)):
        text = model_card(str(tmp_path / "run"), 6, {"stage": "sft", "model": {"init": init, "arch": arch}}, {})
        assert ('"hidden_size": 64' in text) == shown and ("random weights" in text) == shown, init


def test_the_export_command_names_a_missing_checkpoint_in_one_line(tmp_path, tiny_model_dir):
    """A workdir without checkpoints (a typo, or a Hugging Face directory where a training workdir goes): the
    command exits with the message, not a traceback that ends in it."""
    from zephyr_jax import export

    for workdir in (tmp_path / "no_such_run", tiny_model_dir):
        with pytest.raises(SystemExit, match=f"^error: no checkpoint in {re.escape(str(workdir))}: it has no "
                                             "checkpoints/ directory"):
            export.cli([f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"])
    assert not (tmp_path / "hf").exists()
    # An --out that is a file, or inside one: refused before the model is read (a FileExistsError or
    # NotADirectoryError traceback once the weights were loaded, minutes for a 7B)
    (tmp_path / "notes.txt").write_text("mine")
    for out in (tmp_path / "notes.txt", tmp_path / "notes.txt" / "hf"):
        with pytest.raises(SystemExit, match=f"^error: --out={re.escape(str(out))}: "
                                             f"{re.escape(str(tmp_path / 'notes.txt'))} is a file, not a folder"):
            export.cli([f"--workdir={tmp_path / 'no_such_run'}", f"--out={out}"])
    assert (tmp_path / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit, match=r"^error: max_shard_size='5G': use an int \(bytes\) or a string such as "):
        export.cli([f"--workdir={tmp_path / 'no_such_run'}", f"--out={tmp_path / 'hf'}", "--max_shard_size=5G"])


def test_the_export_command_names_a_missing_tokenizer_before_reading_the_weights(tmp_path, monkeypatch):
    """--tokenizer with a typo was found after the weights' load (minutes for a 7B)."""
    from tests.test_loading import save_checkpoint
    from zephyr_jax import checkpoint, export

    model = Mistral(MistralConfig(**TINY), rngs=nnx.Rngs(0))
    workdir = tmp_path / "run"
    workdir.mkdir()
    checkpoint.save_model_config(str(workdir), model.config)
    save_checkpoint(workdir, 1, nnx.state(model))

    def no_load(*args, **kw):
        raise AssertionError("the weights were read before the tokenizer was found missing")

    monkeypatch.setattr(export, "load_model", no_load)
    with pytest.raises(SystemExit, match=f"^error: tokenizer {re.escape(str(tmp_path / 'no_tokenizer'))} does not "
                                         "exist"):
        export.cli([f"--workdir={workdir}", f"--out={tmp_path / 'hf'}", f"--tokenizer={tmp_path / 'no_tokenizer'}"])
    assert not (tmp_path / "hf").exists()
