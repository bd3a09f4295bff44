"""Orbax checkpoints of a workdir: params, optimizer state and step as arrays, plus a JSON item with the data
loader's position. Saves are asynchronous (the device->host copy happens before `save` returns, so the next
step may donate the buffers; on CPU devices orbax holds views of the arrays until the write ends, and XLA then
copies instead of donating for that one step); restoring takes target shardings, so a run may resume on another
mesh.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, meta (step, loader position, and for a preemption's save
whether it skipped the step's eval and the steps of the log line it cut short)}, WORKDIR/model_config.json.

Checkpoints written before the decoder layers were stacked (one subtree per layer: layers/0/..., layers/1/...)
still restore: `_restore_item` reads them in their own layout and stacks each parameter's layers.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath

from zephyr_jax.model import MistralConfig


def manager(workdir: str, keep: int = 2, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def save(mngr: ocp.CheckpointManager, state, meta: dict) -> None:
    step = int(jax.device_get(state.step))
    mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(state.params),
                                            opt_state=ocp.args.StandardSave(state.opt_state),
                                            meta=ocp.args.JsonSave({**meta, "step": step})), force=True)


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def restore(mngr: ocp.CheckpointManager, step: int, abstract_state, state_shardings):
    """(TrainState, meta) of `step`, placed on `state_shardings` (a TrainState of shardings)."""
    try:  # first, before the weights' read (missing: orbax's KeyError; cut short: a JSONDecodeError, both unnamed)
        meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:
        raise _unreadable(mngr, step, "meta", e) from e
    target = _abstract(abstract_state, state_shardings)
    params = _restore_item(mngr, step, "params", target.params)
    opt_state = _restore_item(mngr, step, "opt_state", target.opt_state)
    step_array = jax.device_put(jnp.asarray(meta["step"], jnp.int32), state_shardings.step)
    return type(abstract_state)(params, opt_state, step_array), meta


def _key(entry) -> str:
    """A key path entry (DictKey, SequenceKey, GetAttrKey) as its plain name or index."""
    return jax.tree_util.keystr((entry,), simple=True, separator="")


def _stacked_path(path: tuple) -> tuple[tuple, int | None]:
    """A legacy leaf path (..., "layers", "3", ...) -> (the stacked parameter's path, 3); others unchanged."""
    for n in range(len(path) - 1):
        if path[n] == "layers" and path[n + 1].isdigit():
            return path[:n + 1] + path[n + 2:], int(path[n + 1])
    return path, None


def _unreadable(mngr, step: int, item: str, error: Exception) -> ValueError:
    """The error for a checkpoint step whose files cannot be read: its innermost cause's first line, and the
    other steps to fall back on."""
    while (error.__cause__ or error.__context__) is not None:
        error = error.__cause__ or error.__context__
    cause = (str(error).strip().splitlines() or [""])[0][:300]
    others = [s for s in mngr.all_steps() if s != step]
    fallback = (f"restore another (steps {others}: model.step=N for an init checkpoint; for a resume, move this "
                "step's directory away)") if others else "no other step is saved to fall back on"
    return ValueError(f"checkpoint step {step} in {mngr.directory}: its {item} could not be read "
                      f"({type(error).__name__}: {cause}); if the step is damaged or partly written (or a run still "
                      f"training here rotated it away), {fallback}")


def _restore_item(mngr, step: int, item: str, target):
    """One item (params or opt_state) restored onto `target` (abstract arrays with shardings). A legacy item
    (per-layer subtrees) is read in its saved layout, each layer onto its slice's sharding, then stacked."""
    # The item's handler, not a StandardCheckpointer: that looks for the step's _CHECKPOINT_METADATA inside the
    # item's directory and warns "Metadata file does not exist" on every load.
    try:  # a step missing its files (an interrupted copy, a rotation by a run still saving here) fails here
        saved = ocp.StandardCheckpointHandler().metadata(epath.Path(mngr.directory) / str(step) / item)
    except Exception as e:
        raise _unreadable(mngr, step, item, e) from e
    saved = saved.tree if hasattr(saved, "tree") else saved
    saved_leaves = {tuple(map(_key, p)): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved)[0]}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(target)
    new = {tuple(map(_key, p)): leaf for p, leaf in leaves}
    legacy = any(_stacked_path(p)[1] is not None for p in saved_leaves)
    # A legacy item's entries by the stacked model's names, with a layer's shape (the stacked shape less its
    # first axis); the layer counts are checked after reading.
    stored = {}
    for path, leaf in saved_leaves.items():
        stacked, layer = _stacked_path(path)
        shape = getattr(leaf, "shape", None)
        stored[stacked] = (layer is not None, None if shape is None else tuple(shape))
    if set(new) != set(stored):  # e.g. a tied model's config over an untied run's checkpoint
        name = lambda paths: ", ".join(sorted("/".join(p) for p in paths)[:4]) or "none"
        raise ValueError(f"checkpoint step {step} in {mngr.directory}: its {item} do not match this model's "
                         f"(only in the checkpoint: {name(set(stored) - set(new))}; only in the model: "
                         f"{name(set(new) - set(stored))}): "
                         + ("the architecture (tie_word_embeddings, ...) differs from the run that saved it"
                            if item == "params" else "the optimizer state's structure differs from the one "
                            "saved (another optimizer, or another optax version)"))
    for path, leaf in new.items():  # orbax's own error names neither (and offers to pad or truncate)
        per_layer, shape = stored[path]
        wanted, each = (tuple(leaf.shape[1:]), " a layer") if per_layer else (tuple(leaf.shape), "")
        if shape is not None and shape != wanted:
            raise ValueError(f"checkpoint step {step} in {mngr.directory}: {item} {'/'.join(path)} has shape "
                             f"{shape}{each}, but this model's is {wanted}{each} (the architecture differs from the "
                             "run that saved it)")

    def read(restore_target):
        try:
            return mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(restore_target)}))[item]
        except Exception as e:  # orbax/TensorStore's error runs to hundreds of lines and names the step nowhere
            raise _unreadable(mngr, step, item, e) from e

    if not legacy:
        return read(target)

    def layer_target(path, _):  # a layer's slice of the stacked parameter, on that parameter's sharding less axis 0
        stacked, layer = _stacked_path(tuple(map(_key, path)))
        leaf = new[stacked]
        if layer is None:
            return leaf
        sharding = leaf.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:]))
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=sharding)  # (one device: as it is)

    old = read(jax.tree_util.tree_map_with_path(layer_target, saved))
    layers = {}
    for path, value in jax.tree_util.tree_flatten_with_path(old)[0]:
        stacked, layer = _stacked_path(tuple(map(_key, path)))
        layers.setdefault(stacked, {})[layer] = value
    out = []
    for path, leaf in leaves:
        parts = layers[tuple(map(_key, path))]
        if list(parts) == [None]:
            out.append(parts[None])
            continue
        if sorted(parts) != list(range(leaf.shape[0])):
            raise ValueError(f"checkpoint step {step} in {mngr.directory} has layers {sorted(parts)} of "
                             f"{'/'.join(map(_key, path))}; this model has {leaf.shape[0]}")
        stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=leaf.sharding)
        out.append(stack(*(parts[i] for i in range(leaf.shape[0]))))
    return jax.tree_util.tree_unflatten(treedef, out)


def _reader(workdir: str) -> ocp.CheckpointManager:
    """A manager for reading a workdir's checkpoints; unlike manager() it never creates the directory."""
    workdir = os.path.expanduser(workdir)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"no checkpoint in {workdir}: it has no checkpoints/ directory")
    return manager(workdir, async_save=False)


def _checkpoint_step(mngr: ocp.CheckpointManager, workdir: str, step: int) -> int:
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    if step == -1:
        return int(max(steps))
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir} (have steps {sorted(steps)})")
    return int(step)


def resolve_step(workdir: str, step: int = -1) -> int:
    """The checkpoint step `step` names in a workdir (-1: the latest); FileNotFoundError, listing the steps there,
    when it has no such checkpoint."""
    mngr = _reader(workdir)
    try:
        return _checkpoint_step(mngr, workdir, step)
    finally:
        mngr.close()


def committed_at(workdir: str, step: int) -> int | None:
    """When orbax committed checkpoint `step` of a workdir (ns since the epoch; None where its metadata has no
    time): it tells the checkpoint from another of the same step written later (a run trained again in place)."""
    from absl import logging

    mngr = _reader(workdir)
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)  # (reading metadata warns of every item it was not asked to restore)
    try:
        return mngr.metadata(step).commit_timestamp_nsecs
    finally:
        logging.set_verbosity(verbosity)
        mngr.close()


def restore_params(workdir: str, abstract_params, shardings, step: int = -1):
    """(params, step): only the parameters of a workdir's checkpoint, read in the dtypes of `abstract_params`
    (orbax casts each shard on the host as it reads it) onto `shardings`. step -1: latest."""
    mngr = _reader(workdir)
    try:
        step = _checkpoint_step(mngr, workdir, step)
        return _restore_item(mngr, step, "params", _abstract(abstract_params, shardings)), step
    finally:
        mngr.close()


def save_model_config(workdir: str, cfg: MistralConfig) -> None:
    """The architecture beside the checkpoints, so export and dDPO init can rebuild the model."""
    path = os.path.join(workdir, "model_config.json")
    with open(path + ".tmp", "w") as f:  # replaced whole: a dDPO run or an export may read it meanwhile
        json.dump(cfg.to_hf_dict(), f, indent=2)
    os.replace(path + ".tmp", path)


def load_model_config(workdir: str, **jax_settings) -> MistralConfig:
    path = os.path.join(workdir, "model_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {workdir} is not a zephyr_jax training workdir")
    return MistralConfig.from_json_file(path, **jax_settings)
