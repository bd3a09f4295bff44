"""Logical-axis sharding: parameters and activations carry axis names, rules map the names onto mesh axes.

A parameter declares its axes where it is created (`nnx.Param(..., logical_axes=("embed", "mlp"))`), an
activation where it is computed (`constrain(x, ("batch", "length", "embed"), rules)`). The rules (one line per
logical name: DEFAULT_RULES below; in the config `config.mesh.rules`, carried by `MistralConfig.sharding_rules`)
say which mesh axes, if any, split that dimension. One rule from the command line: `--config.mesh.rules.vocab=()`
(not split), `--config.mesh.rules.embed="('fsdp','tensor')"`.

A mesh axis splits at most one dimension of an array: the first, left to right, whose rule names it
(`logical_to_spec`). So `--config.mesh.rules.mlp=fsdp` under the default `embed=fsdp` splits down_proj
[mlp, embed] on mlp but leaves gate_proj and up_proj [embed, mlp] split on embed, and puts no MLP weight on
`tensor` (every tensor shard holds the whole MLP); the MLP's model dimension (hidden_size) is named `embed`, as
in every other weight, so taking fsdp off it moves every weight's. Where each weight lands, nothing allocated:
`train.abstract_params(cfg, train.model_config(cfg), train.mesh_for(cfg))[2]` (NamedShardings).

The mesh is JAX's own context (`with jax.set_mesh(mesh):`), which jit keys its cache on, and the rules are an
argument: nothing here is module-global, so a function traced outside a mesh is retraced inside one. Without a
mesh, `constrain` does nothing, so the same model code runs on one CPU and on a pod.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or axes, or None for replicated). FSDP shards weights on their embed dimension;
# tensor parallelism splits heads, the MLP hidden dimension and the vocabulary.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),  # the stacked decoder layers' leading axis (scanned, so never split)
)


def rules_table(rules=None) -> tuple:
    """The rules in any of their forms -> ((logical name, (mesh axes...)), ...), hashable (jit keys on it): pairs
    as in DEFAULT_RULES, a mapping (the config's `mesh.rules`: name -> a tuple of mesh axes), JSON lists (a saved
    config.json), or None (DEFAULT_RULES). A rule naming something other than a mesh axis is a ValueError."""
    if rules is None:
        rules = DEFAULT_RULES
    pairs = rules.items() if hasattr(rules, "items") else rules
    table = []
    for name, mesh_axes in pairs:
        flat = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
        bad = [a for a in flat if a not in MESH_AXES]
        if bad:
            raise ValueError(f"sharding rule {name!r}: {bad} is not a mesh axis {MESH_AXES} (config.mesh.rules."
                             f"{name}: a tuple of mesh axes, e.g. \"('fsdp','tensor')\", or () to leave it unsplit)")
        if len(set(flat)) < len(flat):  # jax's DuplicateSpecError at the first sharding, naming no rule
            raise ValueError(f"sharding rule {name!r}: {flat} names a mesh axis twice (config.mesh.rules.{name})")
        table.append((str(name), flat))
    return tuple(table)


def logical_to_spec(axes: Sequence[str | None], rules: Sequence = DEFAULT_RULES) -> PartitionSpec:
    """("batch", "length", "embed") -> PartitionSpec(("data", "fsdp"), None, None) under the default rules: each
    logical axis takes its rule's mesh axes, less those an earlier dimension already split (a mesh axis may split
    only one dimension)."""
    table = dict(rules_table(rules))
    used, spec = set(), []
    for name in axes:
        if name is not None and name not in table:
            raise ValueError(f"logical axis {name!r} has no sharding rule (config.mesh.rules); rules cover "
                             f"{sorted(table)}")
        flat = tuple(a for a in table.get(name, ()) if a not in used)  # a mesh axis may split only one dimension
        used.update(flat)
        spec.append(flat[0] if len(flat) == 1 else (flat or None))
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None], rules: Sequence = DEFAULT_RULES) -> jax.Array:
    """Sharding constraint on an activation, by logical axis names under `rules`, on the mesh of the enclosing
    `jax.set_mesh` block; a no-op outside one."""
    if jax.sharding.get_abstract_mesh().empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, rules))


def param_specs(state: nnx.State, rules: Sequence = DEFAULT_RULES):
    """PartitionSpecs for a model's state, from each parameter's `logical_axes` metadata. The result has the
    state's own structure (each Variable holding a PartitionSpec), so it can serve as jit/orbax shardings."""

    def spec(v):
        axes = v.get_metadata().get("logical_axes")
        return v.replace(value=logical_to_spec(axes, rules) if axes is not None else PartitionSpec())

    return jax.tree.map(spec, state, is_leaf=lambda v: isinstance(v, nnx.Variable))


def check_params_fit_mesh(abstract: nnx.State, specs, mesh: Mesh) -> None:
    """Every parameter dimension a mesh axis splits must divide by that axis: XLA refuses the placement with an
    error that names neither the parameter nor the setting (a fine-tune's vocabulary of 32002 on tensor=4)."""
    for path, leaf, spec in zip(*zip(*jax.tree_util.tree_flatten_with_path(abstract)[0]), jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, PartitionSpec))):
        for dim, axes in zip(leaf.shape, spec):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            missing = [a for a in axes if a not in mesh.shape]
            if missing:
                raise ValueError(f"the sharding rules split a parameter over mesh axes {missing}, which the mesh "
                                 f"{dict(mesh.shape)} lacks (a zephyr_jax mesh has the axes {MESH_AXES})")
            ways = math.prod(mesh.shape[a] for a in axes)
            if dim % ways:
                keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
                name = "/".join(k for k in keys if k != "value")  # nnx Variables end their paths in "value"
                raise ValueError(f"parameter {name} {tuple(leaf.shape)}: its dimension of {dim} does not divide "
                                 f"over mesh axes {axes} ({ways} ways); change the mesh shape "
                                 f"{tuple(mesh.shape.values())} (config.mesh.shape) or the sharding rules "
                                 "(config.mesh.rules; load's `rules`), e.g. --config.mesh.rules.vocab=() to "
                                 "replicate the vocabulary")


DEVICE_ORDERS = ("auto", "interleave_processes")


def make_mesh(shape: Sequence[int], devices=None, order: str = "auto") -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one entry may be -1 to take the devices left over.

    order "auto": the physical topology's order (mesh_utils), as on a TPU pod or GPU cluster;
    "interleave_processes": process 0's first device, process 1's first device, ..., then everyone's second
    device: a pod-like order in which no process holds a contiguous block of the batch (for tests on CPUs)."""
    if order not in DEVICE_ORDERS:
        raise ValueError(f"mesh device order {order!r}: expected one of {DEVICE_ORDERS}")
    devices = jax.devices() if devices is None else devices
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh shape {tuple(shape)} must give one size per axis {MESH_AXES}")
    if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {tuple(shape)}: sizes must be positive, with at most one -1")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"mesh shape {tuple(shape)} cannot fill {len(devices)} devices")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices; "
                         f"{len(devices)} are available ({jax.process_count()} process(es))")
    if order == "interleave_processes":
        rank = {}
        for d in devices:  # each device's index among its own process's devices
            rank[d] = sum(1 for e in rank if e.process_index == d.process_index)
        grid = np.array(sorted(devices, key=lambda d: (rank[d], d.process_index)), dtype=object).reshape(shape)
    else:
        grid = mesh_utils.create_device_mesh(tuple(shape), devices=devices, allow_split_physical_axes=True)
    return Mesh(grid, MESH_AXES)


MESH_FLAG_HELP = ("shard the model over this process's devices: data,fsdp,tensor sizes, one may be -1, e.g. 1,1,8 "
                  "(tensor parallel: the least memory and work a chip for decoding) or 1,-1,1 (FSDP)")


def mesh_shape(text: str) -> tuple:
    """A command line's --mesh "D,F,T" (or "DxFxT") -> (D, F, T); as an argparse type, a bad one is a usage error."""
    parts = str(text).replace(" ", "").replace("x", ",").split(",")
    if len(parts) != 3 or not all(p.removeprefix("-").isdigit() for p in parts):
        raise ValueError(f"{text!r}: expected three sizes data,fsdp,tensor, e.g. 1,1,8")
    return tuple(int(p) for p in parts)


def local_mesh(shape) -> Mesh | None:
    """make_mesh over this process's devices for a --mesh shape; None (no --mesh): None, the default device."""
    return None if shape is None else make_mesh(shape, jax.local_devices())


def named(mesh: Mesh, specs):
    """PartitionSpecs -> NamedShardings on `mesh` (same tree)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

