"""Peak host memory and time of every step that moves a whole model's weights, at Mistral-7B's width.

    python bench/width_memory.py --layers 2 --dir /tmp/w      # then --layers 4 to see how it grows with depth

A Mistral with 7B's width (hidden 4096, intermediate 14336, 32 heads / 8 KV heads, vocab 32000) and --layers
layers is made once by transformers (MistralForCausalLM(config).save_pretrained, bf16, 500 MB shards). Each step
then runs in a fresh process on 8 simulated CPU devices (XLA_FLAGS set for that process only), whose setup is
not measured:
  load_f32      zephyr_jax.load_model onto an FSDP mesh (1, 8, 1) in float32, as training loads its init
  orbax_save    checkpoint.save of those parameters (a TrainState with an empty optimizer state), waited for
  orbax_restore load_model of that workdir onto the same mesh in float32 (a dDPO init from a dSFT workdir)
  export        export.export of that workdir to a bf16 Hugging Face directory (the CPU device, one device)
  load_bf16     load_model of the HF directory in bf16 onto the mesh, then an Engine on it (the serve load)

Per step: seconds; extra = the highest anonymous RSS above the step's start (a 2 ms sampler); end = what is
still held after it; the kernel's VmHWM (reset per step). All are host memory: on CPU devices the parameters
themselves are host memory too, so a step's floor is the bytes it leaves on the devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

MIB = 2**20
STEPS = ("load_f32", "orbax_save", "orbax_restore", "export", "load_bf16")
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def make_weights(folder: str, layers: int) -> None:
    import torch
    import transformers

    config = transformers.MistralConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                        num_key_value_heads=8, vocab_size=32000, num_hidden_layers=layers,
                                        sliding_window=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # (made in bf16: a float32 model first would need 2x the memory)
    transformers.MistralForCausalLM(config).save_pretrained(folder, max_shard_size="500MB")


def memory() -> dict:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f
                if line.startswith(("VmRSS", "VmHWM", "RssAnon"))}


class Measured:
    """Seconds and host memory of the block it wraps."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        self.start, self.stopping = memory(), False
        self.peak = self.start["RssAnon"]
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self):
        while not self.stopping:
            self.peak = max(self.peak, memory()["RssAnon"])
            time.sleep(0.002)

    def __exit__(self, *exc):
        seconds = time.perf_counter() - self.t0
        self.stopping = True
        self.thread.join()
        end = memory()
        self.row = dict(seconds=round(seconds, 1), extra_mib=(self.peak - self.start["RssAnon"]) // MIB,
                        end_mib=(end["RssAnon"] - self.start["RssAnon"]) // MIB, hwm_mib=end["VmHWM"] // MIB)


def run_step(step: str, weights: str, workdir: str) -> dict:
    """One step, in this process (the child's side)."""
    sys.path.insert(0, ROOT)
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from zephyr_jax import checkpoint, export
    from zephyr_jax.engine import Engine
    from zephyr_jax.loading import load_model
    from zephyr_jax.sharding import make_mesh
    from zephyr_jax.train_steps import TrainState

    mesh = make_mesh((1, 8, 1))
    param_mib = lambda model: sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param))) // MIB
    if step in ("load_f32", "orbax_restore", "load_bf16"):
        source, dtype = {"load_f32": (weights, "float32"), "orbax_restore": (workdir, "float32"),
                         "load_bf16": (weights, "bfloat16")}[step]
        with Measured() as m:
            model = load_model(source, "bfloat16", mesh, param_dtype=dtype)
        row = {**m.row, "param_mib": param_mib(model)}
        if step == "load_bf16":
            with Measured() as m:
                Engine(model, None, max_slots=4, max_length=256, mesh=mesh)
            row["engine"] = m.row
        return row
    if step == "orbax_save":
        model = load_model(weights, "bfloat16", mesh, param_dtype="float32")
        state = TrainState(nnx.state(model, nnx.Param), {"count": jnp.zeros((), jnp.int32)}, jnp.asarray(1))
        mngr = checkpoint.manager(workdir)
        with Measured() as m:
            checkpoint.save(mngr, state, {"loader": {}})
            mngr.wait_until_finished()
        mngr.close()
        checkpoint.save_model_config(workdir, model.config)
        return {**m.row, "param_mib": param_mib(model)}
    with Measured() as m:
        export.export(workdir, workdir + "_hf", dtype="bfloat16", max_shard_size="500MB")
    return m.row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dir", required=True, help="where the weights, the workdir and the export go")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    weights, workdir = (os.path.join(args.dir, f"{name}_l{args.layers}") for name in ("hf", "workdir"))
    if args.child:
        print(json.dumps(run_step(args.child, weights, workdir)))
        return
    if not os.path.exists(os.path.join(weights, "config.json")):
        make_weights(weights, args.layers)
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    for step in args.steps.split(","):
        out = subprocess.run([sys.executable, __file__, f"--layers={args.layers}", f"--dir={args.dir}",
                              f"--child={step}"], env=env, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{step} failed:\n{out.stderr[-3000:]}")
        print(f"layers {args.layers} {step}: {out.stdout.strip().splitlines()[-1]}", flush=True)


if __name__ == "__main__":
    main()
