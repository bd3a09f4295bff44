"""Sharding rules are part of what jit traces: the mesh comes from JAX's own context (`jax.set_mesh`), which
jit keys its cache on, and the rules are an argument, so no trace made under one mesh is reused under another."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from zephyr_jax.model import Mistral, MistralConfig
from zephyr_jax.sharding import DEFAULT_RULES, constrain, logical_to_spec, make_mesh


def test_constrain_follows_the_mesh_context_not_a_stale_trace():
    f = jax.jit(lambda x: constrain(x * 2, ("batch", "embed")))
    x = jnp.ones((8, 4))
    mesh = make_mesh((8, 1, 1))
    outside = f(x)  # traced without a mesh: no constraint
    assert len(outside.sharding.device_set) == 1
    with jax.set_mesh(mesh):
        inside = f(x)  # must be retraced with the constraint, not reuse the trace above
    assert inside.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "fsdp"))), 2)
    again = f(x)  # and back outside, the unconstrained trace again
    assert len(again.sharding.device_set) == 1
    np.testing.assert_array_equal(inside, outside)


def test_rules_travel_with_the_model_config():
    """Two models that differ only in their rules shard the same activation differently under one mesh."""
    mesh = make_mesh((1, 8, 1))
    by_fsdp = tuple((name, axes) for name, axes in DEFAULT_RULES)
    replicated_batch = tuple((name, None if name == "batch" else axes) for name, axes in DEFAULT_RULES)
    ids = jnp.zeros((8, 4), jnp.int32)
    shardings = []
    for rules in (by_fsdp, replicated_batch):
        cfg = MistralConfig(vocab_size=128, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, sharding_rules=rules)
        model = Mistral(cfg, rngs=nnx.Rngs(0))
        with jax.set_mesh(mesh):
            shardings.append(nnx.jit(lambda m, i: m(i))(model, ids).sharding)
    assert not shardings[0].is_fully_replicated  # logits rows split over the 8 fsdp devices
    assert shardings[0].shard_shape((8, 4, 128)) == (1, 4, 128)
    assert shardings[1].is_fully_replicated  # the same model with "batch" unmapped
    assert hash(MistralConfig(sharding_rules=[["batch", ["data", "fsdp"]]])) is not None  # JSON lists are accepted
    # A table without a rule for an axis: a ValueError, which the planner and the trainer print as one line (a
    # KeyError went past the planner's handler as a traceback)
    without_mlp = [(name, axes) for name, axes in DEFAULT_RULES if name != "mlp"]
    with pytest.raises(ValueError, match=r"logical axis 'mlp' has no sharding rule \(config.mesh.rules\)"):
        logical_to_spec(("embed", "mlp"), without_mlp)


def test_one_rule_changes_from_the_command_line(monkeypatch):
    """--config.mesh.rules.NAME=... changes that rule alone (the rules were one tuple of pairs, which an override
    replaced whole), reaches the parameters' shardings, and a value that is not mesh axes is named."""
    import os

    from absl import flags
    from ml_collections import config_flags

    from zephyr_jax import train, train_checks
    from zephyr_jax.sharding import rules_table

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["train", f"--config={root}/configs/sft.py:tiny", "--config.mesh.rules.vocab=()",
            "--config.mesh.rules.mlp=fsdp", "--config.mesh.rules.embed=('data', 'tensor')"]
    monkeypatch.setattr("sys.argv", argv)  # ml_collections defines the overrides' flags from sys.argv
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=flag_values)
    flag_values(argv)
    cfg = flag_values.config
    table = dict(rules_table(cfg.mesh.rules))
    assert table == {**dict(rules_table(DEFAULT_RULES)), "vocab": (), "mlp": ("fsdp",), "embed": ("data", "tensor")}
    mcfg = train.model_config(cfg)
    assert mcfg.sharding_rules == rules_table(cfg.mesh.rules) and hash(mcfg) is not None
    abstract = nnx.state(nnx.eval_shape(lambda: Mistral(mcfg, rngs=nnx.Rngs(0))))
    specs = train.param_specs(abstract, cfg.mesh.rules)
    assert specs["embed_tokens"].get_value() == PartitionSpec(None, ("data", "tensor"))  # [vocab, embed]
    assert specs["layers"]["mlp"]["up_proj"]["kernel"].get_value() == PartitionSpec(None, ("data", "tensor"), "fsdp")
    # the spelling a shell makes of "fsdp,tensor" without the parentheses: one axis name that is not a mesh axis
    cfg.mesh.rules.mlp = ("fsdp,tensor",)
    with pytest.raises(ValueError, match=r"sharding rule 'mlp': \['fsdp,tensor'\] is not a mesh axis"):
        train_checks.check_config(cfg)


def test_the_engines_kv_cache_follows_the_rules():
    """The KV cache splits its heads and slots as the config's rules split the k/v projections' heads and a batch
    (it had "tensor" and data x fsdp written in: a researcher's rules moved the weights, not the cache)."""
    from types import SimpleNamespace

    from zephyr_jax.engine import Engine
    from zephyr_jax.model import kv_cache

    mesh = make_mesh((2, 2, 2))

    def spec(rules, slots=4, kv_heads=2, heads_first=True):
        cfg = MistralConfig(num_key_value_heads=kv_heads, sharding_rules=rules)
        sharding = Engine._cache_sharding(SimpleNamespace(config=cfg, max_slots=slots), mesh, heads_first)
        axes, given = kv_cache.axes(heads_first), tuple(sharding.spec)
        assert given[-1:] != (None,)  # the form the engine's calls hand the cache back in (trailing axes left out)
        return dict(zip(axes, given + (None,) * (len(axes) - len(given))))

    replace = lambda **new: tuple((name, new.get(name, axes)) for name, axes in DEFAULT_RULES)  # noqa: E731
    assert spec(None) == dict(layers=None, slots=("data", "fsdp"), kv_heads="tensor", length=None, head_dim=None)
    assert spec(None, heads_first=False)["kv_heads"] == "tensor"
    assert spec(replace(kv_heads=None))["kv_heads"] is None
    assert spec(replace(batch="data"))["slots"] == "data"
    assert spec(replace(batch="data", kv_heads=("fsdp", "tensor")), kv_heads=4) == dict(
        layers=None, slots="data", kv_heads=("fsdp", "tensor"), length=None, head_dim=None)
    assert spec(replace(kv_heads="data"))["kv_heads"] is None  # "data" already splits the slots
    # where a size does not divide, that axis stays whole
    assert spec(None, slots=2)["slots"] is None and spec(None, kv_heads=1)["kv_heads"] is None


def test_the_command_lines_mesh_flag():
    """serve, chat, evaluate's --mesh and the lm-eval adapter's mesh= model_arg: one parser, clear errors."""
    from zephyr_jax.sharding import local_mesh, mesh_shape

    assert mesh_shape("1,-1,1") == (1, -1, 1) and mesh_shape("1x1x8") == (1, 1, 8)
    assert mesh_shape(" 2, 2,2") == (2, 2, 2)
    for bad in ("1,a,2", "8", "1,2,3,4", ""):
        with pytest.raises(ValueError, match="expected three sizes data,fsdp,tensor"):
            mesh_shape(bad)
    assert local_mesh(None) is None and dict(local_mesh((1, 4, 2)).shape) == {"data": 1, "fsdp": 4, "tensor": 2}


def test_num_devices_takes_as_many_devices_from_every_process():
    """config.mesh.num_devices under several processes: the first N of the job were all process 0's (process 1
    then crashed and process 0 waited for ever at the first collective)."""
    from types import SimpleNamespace

    from zephyr_jax.train import first_devices
    from zephyr_jax.train_checks import ConfigError

    devices = [SimpleNamespace(id=i, process_index=i // 4) for i in range(8)]
    assert [d.id for d in first_devices(devices, 4)] == [0, 1, 4, 5]
    assert [d.id for d in first_devices(devices[:4], 3)] == [0, 1, 2]  # one process: its first 3
    for n in (3, 10):
        with pytest.raises(ConfigError, match=f"num_devices={n}: must be a multiple of the 2 processes"):
            first_devices(devices, n)
    for n in (0, -2):  # (0 and -2 are multiples of 2: that message gave no reason)
        with pytest.raises(ConfigError, match=rf"num_devices={n}: must be -1 \(every device\) or positive"):
            first_devices(devices, n)


def test_the_default_rules_split_every_weight_matrix_over_fsdp_and_tensor():
    """FSDP splits the weights' embed dimension and tensor parallelism the heads, the MLP's hidden dimension and
    the vocabulary (DEFAULT_RULES' comment), so on a 1x4x2 mesh a device holds an eighth of every weight matrix:
    the embeddings, the q/k/v/o and MLP projections and the LM head. (A rule left out or moved onto fsdp, which
    an earlier dimension already took, left a matrix whole on every tensor shard: no test noticed.) Only the
    RMSNorm scales stay whole."""
    from zephyr_jax.sharding import named, param_specs

    mesh = make_mesh((1, 4, 2))
    cfg = MistralConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2)
    abstract = nnx.state(nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0))))
    shardings = named(mesh, jax.tree.map(lambda v: v.get_value(), param_specs(abstract),
                                         is_leaf=lambda v: isinstance(v, nnx.Variable)))
    leaves = jax.tree_util.tree_leaves_with_path(jax.tree.map(lambda v: v.get_value(), abstract,
                                                              is_leaf=lambda v: isinstance(v, nnx.Variable)))
    matrices = 0
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
        name = jax.tree_util.keystr(path)
        held = np.prod(sharding.shard_shape(leaf.shape))
        if "norm" in name:
            assert held == np.prod(leaf.shape), name
        else:
            matrices += 1
            assert held * mesh.size == np.prod(leaf.shape), (name, sharding.spec)
    assert matrices == 9  # embed_tokens, q/k/v/o, gate/up/down, lm_head


def test_a_mesh_axis_splits_the_first_dimension_whose_rule_names_it():
    """What sharding.py's docstring tells a researcher who moves the MLP onto fsdp: under the default embed=fsdp,
    --config.mesh.rules.mlp=fsdp splits down_proj [mlp, embed] on mlp, leaves gate/up [embed, mlp] on embed,
    and leaves no MLP weight on tensor (the docstring offered it as a plain one-rule example)."""
    moved = {**dict(DEFAULT_RULES), "mlp": "fsdp"}
    assert logical_to_spec(("embed", "mlp"), DEFAULT_RULES) == PartitionSpec("fsdp", "tensor")
    assert logical_to_spec(("mlp", "embed"), DEFAULT_RULES) == PartitionSpec("tensor", "fsdp")
    assert logical_to_spec(("embed", "mlp"), moved) == PartitionSpec("fsdp", None)  # gate_proj, up_proj
    assert logical_to_spec(("mlp", "embed"), moved) == PartitionSpec("fsdp", None)  # down_proj


def test_bad_rules_and_meshes_are_named():
    """A rule naming a mesh axis twice, a parameter that does not divide over the product of its mesh axes, a
    mesh without an axis a rule names, and mesh shapes that cannot be made: each a ValueError that says which,
    as the messages promise (the alternatives: jax's DuplicateSpecError naming no rule, XLA refusing the
    placement, a KeyError, a mesh of the wrong devices or a ZeroDivisionError). Whether a parameter divides is
    checked against jax.device_put of that very placement."""
    from jax.sharding import Mesh

    from zephyr_jax.sharding import check_params_fit_mesh, rules_table

    with pytest.raises(ValueError, match=r"sharding rule 'mlp': \('fsdp', 'fsdp'\) names a mesh axis twice"):
        rules_table({"mlp": ("fsdp", "fsdp")})
    mesh = make_mesh((1, 2, 4))
    for size in (8, 16, 4, 2, 12):  # over fsdp x tensor = 8 ways: 4 divides by either axis, not by both
        spec = PartitionSpec(("fsdp", "tensor"))
        try:
            jax.device_put(np.zeros(size), NamedSharding(mesh, spec))
            placed = True
        except ValueError:
            placed = False
        abstract = {"w": jax.ShapeDtypeStruct((size,), jnp.float32)}
        if placed:
            check_params_fit_mesh(abstract, {"w": spec}, mesh)
        else:
            with pytest.raises(ValueError, match=rf"parameter w \({size},\): its dimension of {size} does not "
                                                 r"divide over mesh axes \('fsdp', 'tensor'\) \(8 ways\)"):
                check_params_fit_mesh(abstract, {"w": spec}, mesh)
    two_axes = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"over mesh axes \['tensor'\], which the mesh .* lacks"):
        check_params_fit_mesh({"w": jax.ShapeDtypeStruct((8,), jnp.float32)}, {"w": PartitionSpec("tensor")},
                              two_axes)
    for shape, message in (((-1, -1, 1), "at most one -1"), ((0, -1, 1), "sizes must be positive"),
                           ((0, 8, 1), "sizes must be positive"), ((3, -1, 1), "cannot fill 8 devices"),
                           ((1, 8), "must give one size per axis")):
        with pytest.raises(ValueError, match=re.escape(f"mesh shape {shape}") + ".*" + message):
            make_mesh(shape)
    with pytest.raises(ValueError, match="mesh device order 'interleave'"):
        make_mesh((1, 8, 1), order="interleave")
    assert dict(make_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}  # -1: the devices left over


def test_the_interleaved_device_order_deals_each_processes_devices_in_turn(monkeypatch):
    """config.mesh.device_order="interleave_processes" (the multi-process tests' pod-like order): process 0's
    first device, process 1's first, ..., then everyone's second, so no two neighbours along the mesh belong to
    one process, and each process's devices keep their own order. Within one process (this test run) the order
    is the devices' own whatever the sort does, so it is dealt here from stand-in devices of two processes (the
    grid make_mesh builds, before jax's Mesh, which takes only real devices)."""
    from zephyr_jax import sharding

    class Device:  # hashable by identity, as jax's devices are
        def __init__(self, i, process_index):
            self.id, self.process_index = i, process_index

    devices = [Device(i, i // 4) for i in range(8)]
    monkeypatch.setattr(sharding, "Mesh", lambda grid, names: grid)
    flat = list(sharding.make_mesh((8, 1, 1), devices, order="interleave_processes").flat)
    assert sorted(d.id for d in flat) == list(range(8))
    assert all(a.process_index != b.process_index for a, b in zip(flat, flat[1:])), [d.id for d in flat]
    for p in (0, 1):
        assert [d for d in flat if d.process_index == p] == [d for d in devices if d.process_index == p]
