"""One loader for every model zephyr_jax reads: `zephyr_jax.load` (the model and its tokenizer) and
`load_model` (the model alone), the same reader.

    model, tok = zephyr_jax.load("HuggingFaceH4/zephyr-7b-beta")             # hub name, bf16 weights, one device
    model, tok = zephyr_jax.load("path/to/hf_dir", dtype="float32")          # a Hugging Face directory
    model, tok = zephyr_jax.load("workdirs/dpo", step=300)                   # a zephyr_jax training workdir
    model, tok = zephyr_jax.load(name, mesh=make_mesh((1, -1, 1)))           # FSDP over every device
    model = load_model("workdirs/sft", "float32")                            # no tokenizer read

Each parameter goes straight to its place (the mesh's NamedSharding, or the default device) in its storage
dtype: safetensors are read tensor by tensor into a host buffer of that dtype (hf.read_weights), orbax
checkpoints are read shard by shard and cast on the host (checkpoint.restore_params). No float32 copy of the
model is ever made when bf16 is asked for. The tokenizer is tokenizer.tokenizer_for's: the directory's own, a
workdir's training tokenizer, else Mistral-7B-v0.1's.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from zephyr_jax import checkpoint, hf
from zephyr_jax.hub import local_dir
from zephyr_jax.model import Mistral
from zephyr_jax.sharding import DEFAULT_RULES, check_params_fit_mesh, named, param_specs, rules_table

if TYPE_CHECKING:
    import transformers

WORKDIR_CONFIG = "model_config.json"  # what marks a zephyr_jax training workdir (checkpoint.save_model_config)


def is_workdir(path: str) -> bool:
    """A zephyr_jax training workdir: it has model_config.json (written beside checkpoints/ by training)."""
    return os.path.isfile(os.path.join(os.path.expanduser(path), WORKDIR_CONFIG))


def run_config(workdir: str) -> dict | None:
    """The resolved config a training run saved in workdir/config.json (None without one); the file is named when
    it is not JSON (a copy cut short, an edit gone wrong)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e


def _default_device() -> jax.Device:
    """JAX's default device: this process's first (jax.devices()[0] is process 0's in a multi-process job)."""
    device = jax.config.jax_default_device
    if isinstance(device, jax.Device):
        return device
    return jax.local_devices(backend=device if isinstance(device, str) else None)[0]


def load(path_or_name: str, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None, *, tokenizer: str | None = None,
         **options) -> tuple[Mistral, transformers.PreTrainedTokenizerBase]:
    """(model, tokenizer): load_model(path_or_name, dtype, mesh, **options) and the tokenizer that goes with it
    (`tokenizer`, a directory or hub name, if given; else tokenizer.tokenizer_for's)."""
    from zephyr_jax.tokenizer import load_tokenizer, tokenizer_for

    given = None if tokenizer is None else load_tokenizer(tokenizer)  # not there: now, not after the weights' load
    model = load_model(path_or_name, dtype, mesh, **options)
    return model, given if given is not None else tokenizer_for(path_or_name)


def load_model(path_or_name: str, dtype="bfloat16", mesh: jax.sharding.Mesh | None = None, *, step: int = -1,
               param_dtype=None, rules: Sequence = DEFAULT_RULES, **config_overrides) -> Mistral:
    """A Mistral from a Hugging Face directory / hub name or a zephyr_jax training workdir.

    path_or_name: a directory with config.json + safetensors, a hub name (downloaded once, see hf.resolve), or a
      training workdir (model_config.json + checkpoints/), whose checkpoint `step` is read (-1: the latest).
    dtype: compute dtype (str or jnp dtype). param_dtype: storage dtype of the parameters (default: dtype, so
      inference holds bf16 weights by default; training passes float32).
    mesh: a jax Mesh: every parameter is placed straight onto NamedSharding(mesh, spec), the spec from its
      logical axes under `rules` (FSDP / tensor parallel as the rules say); None: the default device.
    config_overrides: MistralConfig fields, e.g. attention_impl="xla", remat="full", scan_layers=False,
      sharding_rules=... (the activations' rules; default: `rules`).
    """
    dtype = jnp.dtype(dtype)
    settings = dict(dtype=dtype, param_dtype=jnp.dtype(param_dtype if param_dtype is not None else dtype))
    if "sharding_rules" not in config_overrides and rules_table(rules) != rules_table(DEFAULT_RULES):
        config_overrides["sharding_rules"] = rules
    local = local_dir(path_or_name, "model")
    workdir = local is not None and is_workdir(local)
    if step != -1 and not workdir:
        raise ValueError(f"step={step}: {path_or_name} is not a zephyr_jax training workdir; steps select one of "
                         "a workdir's checkpoints")
    if workdir:
        cfg = checkpoint.load_model_config(local, **settings)
    else:
        if local is not None and not os.path.exists(os.path.join(local, hf.CONFIG_NAME)):
            raise FileNotFoundError(f"{local} is neither a Hugging Face model directory (no {hf.CONFIG_NAME}) nor "
                                    f"a zephyr_jax training workdir (no {WORKDIR_CONFIG})")
        local = local if local is not None else hf.resolve(path_or_name)
        cfg = hf.load_config(local, **settings)
    if config_overrides:
        cfg = cfg.replace(**config_overrides)

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0))))
    if mesh is None:
        device = jax.sharding.SingleDeviceSharding(_default_device())
        shardings = jax.tree.map(lambda _: device, abstract)
    else:
        if not isinstance(mesh, jax.sharding.Mesh):  # e.g. the CLIs' (1, 1, 8): failed deep in sharding.py
            shape = tuple(mesh) if isinstance(mesh, (tuple, list)) else (1, -1, 1)
            raise TypeError(f"mesh={mesh!r}: pass a jax Mesh, e.g. sharding.make_mesh({shape})")
        specs = param_specs(abstract, rules)
        check_params_fit_mesh(abstract, specs, mesh)  # before any weight is read
        shardings = named(mesh, specs)
    if not workdir:
        model = hf.read_weights(local, cfg, shardings)
    else:
        params, step = checkpoint.restore_params(local, abstract, shardings, step)
        model = nnx.merge(graphdef, params)
    if cfg.param_dtype == jnp.float16:
        _check_float16_range(model, f"{path_or_name} step {step}" if workdir else path_or_name)
    return model


def config_vocab_size(path_or_name: str) -> int | None:
    """The vocabulary size a local model's config file gives (no weight is read); None for a hub name (nothing is
    downloaded here) or where there is no config file (load_model names what is missing)."""
    local = local_dir(path_or_name, "model")
    if local is not None and is_workdir(local):
        return checkpoint.load_model_config(local).vocab_size
    if local is None or not os.path.exists(os.path.join(local, hf.CONFIG_NAME)):
        return None
    return hf.load_config(local).vocab_size


def _check_float16_range(model: Mistral, where: str) -> None:
    """Weights are cast to float16 as they are read (numpy's cast, orbax's), which turns one past float16's largest
    (65504) into inf with at most a warning: every output would be NaN. Named here, by its HF name."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, value = hf._dotted(path), var.get_value()
        layered = name.startswith("layers.")  # (stacked: finite per layer, to name that layer's tensor)
        finite = np.asarray(jnp.isfinite(value).all(axis=tuple(range(1 if layered else 0, value.ndim))))
        if not finite.all():
            hf_name = hf.flax_to_hf_name(name, int(np.argmin(finite)) if layered else None)[0]
            raise ValueError(f"{where}: {hf_name} has a value past float16's largest (65504), or not finite: "
                             "use bfloat16 or float32")
