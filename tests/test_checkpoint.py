"""Orbax checkpoints written before the decoder layers were stacked (layers/0/..., layers/1/...) still restore."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from zephyr_jax import checkpoint
from zephyr_jax.loading import load_model
from zephyr_jax.model import Mistral, MistralConfig
from zephyr_jax.sharding import make_mesh, named, param_specs
from zephyr_jax.train import train_state_shardings
from zephyr_jax.train_steps import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2)


def legacy_layout(tree):
    """A state pytree as the unstacked model saved it: each Variable a {"value": array} node, and the layers one
    subtree per layer keyed "0", "1", ... (the on-disk layout of checkpoints from before the scan)."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            if k == "layers":
                n = jax.tree.leaves(v)[0].shape[0]
                out[k] = {str(i): legacy_layout(jax.tree.map(lambda x: x[i], v)) for i in range(n)}
            else:
                out[k] = legacy_layout(v)
        return out
    return {"value": np.asarray(tree)}


def test_a_checkpoint_with_unstacked_layers_restores_into_the_scanned_model(tmp_path):
    model = Mistral(CFG, rngs=nnx.Rngs(3))
    params = nnx.state(model)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    # Non-trivial moments and count, so a mix-up would show.
    opt_state = jax.tree.map(lambda x: x + (3 if x.dtype == jnp.int32 else jax.random.uniform(jax.random.key(1),
                                                                                              x.shape)), opt_state)
    adam = opt_state[0]
    legacy_opt = [{"count": np.asarray(adam.count), "mu": legacy_layout(adam.mu), "nu": legacy_layout(adam.nu)},
                  None, None]
    mngr = checkpoint.manager(str(tmp_path), async_save=False)
    mngr.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(legacy_layout(params)),
                                         opt_state=ocp.args.StandardSave(legacy_opt),
                                         meta=ocp.args.JsonSave({"step": 7, "loader": {"epoch": 0, "step": 7}})))
    mngr.wait_until_finished()
    saved = ocp.StandardCheckpointer().metadata(str(tmp_path / "checkpoints" / "7" / "params"))
    saved = getattr(saved, "item_metadata", saved)  # orbax < 0.11.2x returns the tree metadata itself
    assert "0" in (saved.tree if hasattr(saved, "tree") else saved)["layers"]  # really the old layout

    mesh = make_mesh((1, 4, 2), jax.devices()[:8])
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Mistral(CFG, rngs=nnx.Rngs(0))))
    shardings = named(mesh, param_specs(abstract))
    restored, step = checkpoint.restore_params(str(tmp_path), abstract, shardings)
    assert step == 7
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, params)
    kernel = restored["layers"]["mlp"]["gate_proj"]["kernel"].get_value()
    assert kernel.sharding.is_equivalent_to(shardings["layers"]["mlp"]["gate_proj"]["kernel"].get_value(), 3)
    ids = jnp.arange(12).reshape(2, 6)
    # Same weights, sharded over 8 devices: equal up to the order of float32 sums.
    np.testing.assert_allclose(nnx.merge(graphdef, restored)(ids), model(ids), rtol=0, atol=1e-6)

    # Resuming: the optimizer moments are stacked the same way, and the step and loader position come back.
    state_shardings = train_state_shardings(tx, abstract, shardings, mesh)
    abstract_state = jax.eval_shape(lambda: TrainState(abstract, tx.init(abstract), jnp.zeros((), jnp.int32)))
    state, meta = checkpoint.restore(checkpoint.manager(str(tmp_path)), 7, abstract_state, state_shardings)
    assert int(state.step) == 7 and meta["loader"] == {"epoch": 0, "step": 7}
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), state.opt_state,
                 opt_state)
    # A step whose meta is cut short or missing (an interrupted copy): named as its params or opt_state would be,
    # not as orbax's KeyError or a bare JSONDecodeError, which named neither the step nor the directory.
    meta_dir = tmp_path / "checkpoints" / "7" / "meta"
    for damage in (lambda: (meta_dir / "metadata").write_text('{"step": 7, "loa'), lambda: shutil.rmtree(meta_dir)):
        damage()
        with pytest.raises(ValueError, match=r"checkpoint step 7 in .*checkpoints: its meta could not be read \(.*"
                                             r"\); if the step is damaged or partly written"):
            checkpoint.restore(checkpoint.manager(str(tmp_path)), 7, abstract_state, state_shardings)

    # Without a mesh, as zephyr_jax.load(workdir) and export read it (a layer's sharding was taken from a mesh
    # spec that one device's sharding does not have: AttributeError).
    checkpoint.save_model_config(str(tmp_path), CFG)
    np.testing.assert_array_equal(load_model(str(tmp_path), "float32")(ids), model(ids))
    # Another architecture over it: the error names the step and the parameter (orbax's named neither, offered
    # to pad or truncate, and an absent parameter was a bare KeyError), as for a checkpoint in today's layout.
    for change, message in (({"intermediate_size": 96}, r"params layers/mlp/down_proj/kernel/value has shape "
                              r"\(64, 32\) a layer, but this model's is \(96, 32\) a layer"),
                            ({"hidden_size": 64}, r"params embed_tokens/value has shape \(128, 32\), but this "
                             r"model's is \(128, 64\)"),
                            ({"tie_word_embeddings": True}, "only in the checkpoint: lm_head/kernel/value")):
        other = dataclasses.replace(CFG, **change)
        _, other_abstract = nnx.split(nnx.eval_shape(lambda: Mistral(other, rngs=nnx.Rngs(0))))
        with pytest.raises(ValueError, match="checkpoint step 7 in .*" + message):
            checkpoint.restore_params(str(tmp_path), other_abstract, named(mesh, param_specs(other_abstract)))
    fewer = dataclasses.replace(CFG, num_hidden_layers=2)
    _, fewer_abstract = nnx.split(nnx.eval_shape(lambda: Mistral(fewer, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"has layers \[0, 1, 2\] of layers/.*; this model has 2"):
        checkpoint.restore_params(str(tmp_path), fewer_abstract, named(mesh, param_specs(fewer_abstract)))


def test_a_seed_draws_the_weights_the_unstacked_model_drew():
    """Random init consumes the key stream as separate layer modules did (embedding, then each layer in turn), so
    seeded runs and demos keep their weights across the change to stacked layers. Both under jit, as training
    draws them (the layers' draws are a compiled scan; op by op, the normal draw's last bit may differ). The
    program is one layer's draws at any depth: a loop of 32 took XLA:GPU 113 s to compile at 7B."""
    from zephyr_jax.model.mistral import DecoderLayer

    def separate_modules():
        rngs = nnx.Rngs(5)
        rngs.params()  # the embedding's key
        return [nnx.to_pure_dict(nnx.state(DecoderLayer(CFG, rngs))) for _ in range(CFG.num_hidden_layers)]

    stacked = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Mistral(CFG, rngs=nnx.Rngs(5)))))()
    for i, layer in enumerate(jax.jit(separate_modules)()):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a)[i], np.asarray(b)),
                     stacked["layers"], layer)

    def program_lines(layers):
        cfg = dataclasses.replace(CFG, num_hidden_layers=layers)
        return len(jax.jit(lambda: nnx.state(Mistral(cfg, rngs=nnx.Rngs(5)))).lower().as_text().splitlines())

    assert program_lines(2) == program_lines(12)


def test_a_checkpoint_of_another_shape_names_the_parameter_and_both_shapes(tmp_path):
    """Orbax's own error gives two shapes (and suggests padding); this one names the parameter and the step."""
    import dataclasses

    import pytest

    params = nnx.state(Mistral(CFG, rngs=nnx.Rngs(3)))
    mngr = checkpoint.manager(str(tmp_path), async_save=False)
    mngr.save(2, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    mngr.wait_until_finished()
    wider = dataclasses.replace(CFG, hidden_size=64)
    _, abstract = nnx.split(nnx.eval_shape(lambda: Mistral(wider, rngs=nnx.Rngs(0))))
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    with pytest.raises(ValueError, match=r"checkpoint step 2 in .*: params embed_tokens.* has shape \(128, 32\), "
                                         r"but this model's is \(128, 64\)"):
        checkpoint.restore_params(str(tmp_path), abstract, named(mesh, param_specs(abstract)))
    # Fewer layers: the stacked layers' leading axis differs (not the last), and the message says so rather than
    # taking the step for damaged.
    fewer = dataclasses.replace(CFG, num_hidden_layers=CFG.num_hidden_layers - 1)
    _, abstract = nnx.split(nnx.eval_shape(lambda: Mistral(fewer, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=rf"params layers.* has shape \({CFG.num_hidden_layers}, 32\), but this "
                                         rf"model's is \({CFG.num_hidden_layers - 1}, 32\)"):
        checkpoint.restore_params(str(tmp_path), abstract, named(mesh, param_specs(abstract)))
    # A parameter more or less (a tied model's config over an untied run's checkpoint): named, with the step.
    tied = dataclasses.replace(CFG, tie_word_embeddings=not CFG.tie_word_embeddings)
    _, abstract = nnx.split(nnx.eval_shape(lambda: Mistral(tied, rngs=nnx.Rngs(0))))
    with pytest.raises(ValueError, match=r"checkpoint step 2 in .*: its params do not match this model's \(only in "
                                         r"the (checkpoint|model): lm_head"):
        checkpoint.restore_params(str(tmp_path), abstract, named(mesh, param_specs(abstract)))
    # A data file cut short (a partly written or damaged step): named with its cause and the steps to fall back on,
    # not orbax's and TensorStore's hundreds of lines. In a process of its own: orbax leaves the other reads'
    # coroutines unawaited, and they print their tracebacks when the process ends.
    mngr.save(4, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    mngr.wait_until_finished()
    for f in (tmp_path / "checkpoints" / "4" / "params").glob("ocdbt.process_0/d/*"):
        os.truncate(f, 100)
    # And a step without its item's metadata (an interrupted copy; a rotation by a run still saving here): orbax
    # raised FileNotFoundError naming neither the step's item nor the steps to fall back on.
    mngr.save(6, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
    mngr.wait_until_finished()
    os.remove(tmp_path / "checkpoints" / "6" / "params" / "_METADATA")
    restore = (f"from tests.test_checkpoint import *; _, a = nnx.split(nnx.eval_shape(lambda: Mistral(CFG, "
               f"rngs=nnx.Rngs(0))))\nfor step in (4, 6):\n try:\n  checkpoint.restore_params({str(tmp_path)!r}, a, "
               "named(make_mesh((1, 1, 1), jax.devices()[:1]), param_specs(a)), step)\n except ValueError as e:\n"
               "  print('error:', e)")
    out = subprocess.run([sys.executable, "-c", restore], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    for step, others in ((4, "6"), (6, "4")):  # (the manager keeps two steps)
        assert re.search(rf"error: checkpoint step {step} in .*: its params could not be read \(.*\); if the step is "
                         rf"damaged or partly written \(or a run still training here rotated it away\), restore "
                         rf"another \(steps \[{others}\]", out.stdout), out.stdout + out.stderr[-3000:]
