"""Wall time and peak host memory of loading.load_model (zephyr_jax.load without the tokenizer) and
hf.save_pretrained on a ~1 GB checkpoint.

    python bench/convert_checkpoint.py [--size-gb 1.0] [--dtype bfloat16] [--out DIR] [--shard-size 300MB]
                                       [--fsdp N]   # load onto N simulated CPU devices, FSDP-sharded

Writes a synthetic Mistral-shaped checkpoint in HF layout (hidden 2048, intermediate 5632, 16 heads, 4 KV
heads, vocab 32000, as many layers as fit --size-gb), sharded, with plain numpy + safetensors (no torch), then
runs a fresh Python process that loads it with load_model in the checkpoint's dtype and saves it again
with hf.save_pretrained, measuring each step. The re-saved tensors are compared byte for byte with the source.

Memory, per step, in the measuring process:
  baseline   RSS of Python + jax (CPU backend up) + zephyr_jax before the step's work;
  peak RSS   the kernel's high-water mark (VmHWM, reset per step through /proc/self/clear_refs);
  peak anon  the highest anonymous (non-file) RSS seen by a 1 ms sampling thread. Loading reads each tensor
             into its buffer (readinto, in row blocks), so file pages stay in the page cache, out of the
             process's RSS; peak file counts any that are mapped. Anonymous memory is what the process holds.
The loaded parameters themselves are anonymous memory of exactly the checkpoint's size (same dtype, CPU
device), so the floor for "peak - baseline" is 1.0x the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

GB = 10**9
MIB = 2**20
SHAPE = dict(hidden=2048, intermediate=5632, heads=16, kv_heads=4, head_dim=128, vocab=32000)


# --- the synthetic checkpoint (separate process from the measurement) ------------------------------------

def hf_tensor_shapes(layers: int) -> dict[str, tuple]:
    """HF names and [out, in] shapes of a Mistral, written out independently of zephyr_jax.hf's table."""
    h, i, v = SHAPE["hidden"], SHAPE["intermediate"], SHAPE["vocab"]
    q, kv = SHAPE["heads"] * SHAPE["head_dim"], SHAPE["kv_heads"] * SHAPE["head_dim"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes.update({p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                       p + "post_attention_layernorm.weight": (h,)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def layers_for(size_gb: float, itemsize: int) -> int:
    fixed = sum(math.prod(s) for s in hf_tensor_shapes(0).values()) * itemsize
    per_layer = sum(math.prod(s) for s in hf_tensor_shapes(1).values()) * itemsize - fixed
    return max(1, round((size_gb * GB - fixed) / per_layer))


def write_checkpoint(out: str, size_gb: float, dtype: str, shard_size: int) -> int:
    """Writes config.json + model-0000k-of-0000N.safetensors + index; returns the tensor bytes."""
    import huggingface_hub
    import ml_dtypes
    import safetensors.numpy

    np_dtype = np.dtype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
    layers = layers_for(size_gb, np_dtype.itemsize)
    shapes = hf_tensor_shapes(layers)
    rng = np.random.default_rng(0)
    split = huggingface_hub.split_state_dict_into_shards_factory(
        {name: math.prod(shape) * np_dtype.itemsize for name, shape in shapes.items()},
        get_storage_size=lambda size: size, filename_pattern="model{suffix}.safetensors", max_shard_size=shard_size)
    os.makedirs(out, exist_ok=True)
    weight_map, total = {}, 0
    for file, names in split.filename_to_tensors.items():
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = np.ones(shapes[name], np_dtype)
            else:
                tensors[name] = (rng.standard_normal(shapes[name], np.float32) * 0.02).astype(np_dtype)
            weight_map[name] = file
            total += tensors[name].nbytes
        safetensors.numpy.save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = dict(architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=SHAPE["vocab"],
                  hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["intermediate"], num_hidden_layers=layers,
                  num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
                  head_dim=SHAPE["head_dim"], hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False,
                  bos_token_id=1, eos_token_id=2, torch_dtype=dtype)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return total


def compare_checkpoints(a: str, b: str) -> int:
    """Byte-compares every tensor of two HF checkpoint directories; returns how many tensors matched."""
    from zephyr_jax import hf

    def tensors(path):
        files = hf._weight_files(path)
        headers = {f: hf.read_safetensors_header(f) for f in set(files.values())}
        return {n: (f, *headers[f]) for n, f in files.items()}

    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        raise AssertionError(f"tensor names differ: {sorted(ta.keys() ^ tb.keys())[:5]}")
    for name in ta:
        (fa, ha, sa), (fb, hb, sb) = ta[name], tb[name]
        if ha[name]["shape"] != hb[name]["shape"] or ha[name]["dtype"] != hb[name]["dtype"]:
            raise AssertionError(f"{name}: {ha[name]} vs {hb[name]}")
        (_, _, ba), (_, _, bb) = hf.tensor_layout(fa, name, ha[name]), hf.tensor_layout(fb, name, hb[name])
        n = ha[name]["data_offsets"][1] - ha[name]["data_offsets"][0]
        xa = np.memmap(fa, np.uint8, mode="r", offset=sa + ba, shape=(n,))
        xb = np.memmap(fb, np.uint8, mode="r", offset=sb + bb, shape=(n,))
        if not np.array_equal(xa, xb):
            raise AssertionError(f"{name} differs after load + save")
    return len(ta)


# --- the measuring child --------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class Sampler:
    """Highest RssAnon / RssFile / VmRSS seen while the block runs (a 1 ms polling thread)."""

    def __enter__(self):
        self.peak, self._stop = _status(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.001):
            for k, v in _status().items():
                self.peak[k] = max(self.peak[k], v)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        for k, v in _status().items():
            self.peak[k] = max(self.peak[k], v)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def measure(step):
    """(result, seconds, {baseline..., peak...}) of step()."""
    import gc

    gc.collect()
    base = _status()
    hwm_reset = _reset_hwm()
    with Sampler() as sampler:
        t0 = time.perf_counter()
        result = step()
        seconds = time.perf_counter() - t0
    end = _status()
    mem = {"base_rss": base["VmRSS"], "base_anon": base["RssAnon"], "end_rss": end["VmRSS"],
           "end_anon": end["RssAnon"], "peak_anon": sampler.peak["RssAnon"], "peak_file": sampler.peak["RssFile"],
           "peak_rss": end["VmHWM"] if hwm_reset else sampler.peak["VmRSS"], "peak_rss_source":
           "VmHWM" if hwm_reset else "sampled"}
    return result, seconds, mem


def child(ckpt: str, resaved: str, dtype: str, shard_size: str, devices: str):
    import jax
    import jax.numpy as jnp

    from zephyr_jax import hf
    from zephyr_jax.loading import load_model
    from zephyr_jax.sharding import make_mesh

    jnp.zeros(1).block_until_ready()  # bring the CPU backend up: part of the baseline
    # FSDP over a (1, devices, 1) mesh, each parameter on its NamedSharding from the model's logical axes.
    mesh = make_mesh((1, int(devices), 1), jax.devices()[:int(devices)]) if int(devices) > 1 else None
    model, load_s, load_mem = measure(lambda: load_model(ckpt, dtype, mesh))
    _, save_s, save_mem = measure(lambda: hf.save_pretrained(model, resaved, max_shard_size=shard_size))
    print(json.dumps({"load_s": load_s, "load": load_mem, "save_s": save_s, "save": save_mem,
                      "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "jax": jax.__version__, "devices": str(jax.devices())}))


# --- the report -----------------------------------------------------------------------------------------

def report(ckpt_bytes: int, r: dict, layers: int, dtype: str, matched: int):
    mib = lambda b: f"{b / MIB:8.0f}"
    print(f"\ncheckpoint: {layers} layers, {dtype}, {ckpt_bytes / MIB:.0f} MiB of tensors ({ckpt_bytes / GB:.3f} GB); "
          f"re-saved copy matches byte for byte ({matched} tensors)")
    print(f"{'step':6} {'seconds':>8} {'base RSS':>9} {'peak RSS':>9} {'peak/ckpt':>10} {'(peak-base)/ckpt':>17} "
          f"{'peak anon':>10} {'(anon-base)/ckpt':>17} {'peak file':>10}   (MiB)")
    for step in ("load", "save"):
        m = r[step]
        print(f"{step:6} {r[step + '_s']:8.2f} {mib(m['base_rss']):>9} {mib(m['peak_rss']):>9} "
              f"{m['peak_rss'] / ckpt_bytes:9.2f}x {(m['peak_rss'] - m['base_rss']) / ckpt_bytes:16.2f}x "
              f"{mib(m['peak_anon']):>10} {(m['peak_anon'] - m['base_anon']) / ckpt_bytes:16.2f}x "
              f"{mib(m['peak_file']):>10}")
    print(f"(save's baseline already holds the loaded model; peak RSS from {r['load']['peak_rss_source']}; "
          f"child ru_maxrss {r['ru_maxrss'] / MIB:.0f} MiB; jax {r['jax']} on {r['devices']})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--out", default=None, help="the directory its temporary working directory goes in "
                        "(removed at the end; default: the system's temporary directory)")
    parser.add_argument("--shard-size", default="300MB", help="shard size of the synthetic and re-saved files")
    parser.add_argument("--fsdp", type=int, default=1, help="simulated CPU devices to shard the parameters over")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    from zephyr_jax.hf import parse_size

    with tempfile.TemporaryDirectory(dir=args.out) as work:
        ckpt, resaved = os.path.join(work, "synthetic"), os.path.join(work, "resaved")
        t0 = time.perf_counter()
        ckpt_bytes = write_checkpoint(ckpt, args.size_gb, args.dtype, parse_size(args.shard_size))
        with open(os.path.join(ckpt, "config.json")) as f:
            layers = json.load(f)["num_hidden_layers"]
        print(f"wrote {ckpt_bytes / GB:.3f} GB ({layers} layers, {args.dtype}) in {time.perf_counter() - t0:.1f}s")
        env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        if args.fsdp > 1:
            env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.fsdp}"
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", ckpt, resaved, args.dtype,
                               args.shard_size, str(args.fsdp)], env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"measuring process failed:\n{proc.stderr}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        matched = compare_checkpoints(ckpt, resaved)
        report(ckpt_bytes, result, layers, args.dtype, matched)


if __name__ == "__main__":
    main()
