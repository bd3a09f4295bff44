"""Orbax checkpoints of a workdir: params, optimizer state and step as arrays, plus a JSON item with the data
loader's position. Saves are asynchronous (the device->host copy happens before `save` returns, so the next
step may donate the buffers); restoring takes target shardings, so a run may resume on another mesh.

Layout: WORKDIR/checkpoints/<step>/{params, opt_state, meta (step, loader position)}, WORKDIR/model_config.json.
"""

from __future__ import annotations

import json
import os

import jax
import orbax.checkpoint as ocp

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
    target = _abstract(abstract_state, state_shardings)
    out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target.params),
                                                     opt_state=ocp.args.StandardRestore(target.opt_state),
                                                     meta=ocp.args.JsonRestore()))
    step_array = jax.device_put(jax.numpy.asarray(out.meta["step"], jax.numpy.int32), state_shardings.step)
    return type(abstract_state)(out.params, out.opt_state, step_array), out.meta


def restore_params(workdir: str, abstract_params, shardings, step: int = -1):
    """Only the parameters of a workdir's checkpoint (init of dDPO from a dSFT run, export). step -1: latest."""
    mngr = manager(workdir, async_save=False)
    steps = mngr.all_steps()
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {os.path.join(workdir, 'checkpoints')}")
    step = max(steps) if step == -1 else step
    if step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {workdir} (have {sorted(steps)})")
    target = _abstract(abstract_params, shardings)
    params = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target))).params
    mngr.close()
    return params, step


def save_model_config(workdir: str, cfg: MistralConfig) -> None:
    """The architecture beside the checkpoints, so export and dDPO init can rebuild the model."""
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
        json.dump(cfg.to_hf_dict(), f, indent=2)


def load_model_config(workdir: str, **jax_settings) -> MistralConfig:
    path = os.path.join(workdir, "model_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {workdir} is not a zephyr_jax training workdir")
    with open(path) as f:
        return MistralConfig.from_hf_dict(json.load(f), **jax_settings)
