"""Numerical parity on the accelerator JAX finds (issue 13, part 1), against references nobody here wrote.

    python bench/gpu_parity.py [--tokens=32] [--json=FILE]

1. Attention: attention.attend's platform kernel (cuDNN on NVIDIA GPUs; einsum attention elsewhere, where this
   part only checks the script) and its einsum path, both in bf16, against the einsum path in float32 (highest
   matmul precision) on the same bf16 inputs: outputs and the gradients dq, dk, dv of a random cotangent, at
   real query positions. Cases: GQA causal, sliding window, right padding (max_segments=1), packed segments
   with padding and window (max_segments=4). Shapes: 2 rows x 1024 tokens x 32 query / 8 KV heads x 128.
2. Logits: a 2-layer Mistral (hidden 1024, GQA 8/2, head 128, window 256, 32,000 vocabulary, random weights
   perturbed as tests/torch_reference.py does) in transformers' PyTorch on the same device, saved with
   save_pretrained and read by zephyr_jax.load. float32 against float32 (TF32 off on both sides); then
   zephyr_jax in bf16 (the platform kernel: the whole row, a right-padded row, two packed sequences) and
   transformers in bf16 (sdpa), each against transformers' float32 logits.
3. Greedy generation: `--tokens` new tokens for prompts of 5 to 200 tokens, zephyr_jax's engine (float32)
   against transformers' generate (float32, one prompt at a time, do_sample=False), token for token; the same
   in bf16 is reported (bf16 rounding may flip a near-tie, so it is not a pass/fail criterion).

Tolerance (stated before measuring): relative error ||x - ref|| / ||ref|| at most 1e-2 for bf16 attention
outputs and gradients (bf16 keeps 8 mantissa bits: one rounding is 2^-9 = 0.2% relative); zephyr_jax's bf16
logits at most 2x transformers' own bf16 logits' error (through two layers and the LM head the roundings add up
to about 1-2% on this CPU for both); float32 logits within 1e-4 max |diff| (tests/test_model_parity.py's
bound). A NaN fails. Prints one table, each row as its check ends (a run stopped at its limit keeps those);
--json also writes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from zephyr_jax.loading import load_model  # noqa: E402
from zephyr_jax.generate import generate_ids  # noqa: E402
from zephyr_jax.model import attention  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from torch_reference import torch_logits, torch_mistral  # noqa: E402  (tests/: transformers' PyTorch Mistral)

BF16_TOL, FP32_MAX_DIFF = 1e-2, 1e-4
rows = []  # (check, figure, bound, ok)


def record(check: str, figure: float, bound: float | None, ok: bool | None = None, note: str = "") -> None:
    if ok is None:
        ok = bool(np.isfinite(figure)) and (bound is None or figure <= bound)
    rows.append({"check": check, "figure": float(figure), "bound": bound, "ok": bool(ok), "note": note})
    # Printed as it comes: a run stopped at its time limit keeps the rows it reached.
    shown = "" if bound is None else f"{bound:.1e}"
    print(f"| {check} | {float(figure):.3g} | {shown} | {'yes' if ok else '**NO**'} | {note} |", flush=True)


def rel(x, ref, where=None) -> float:
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if where is not None:
        x, ref = x[where], ref[where]
    return float(np.linalg.norm(x - ref) / np.linalg.norm(ref))


# --- 1. attention -------------------------------------------------------------------------------------------

def segment_cases(b: int, t: int) -> dict:
    """name -> (segment_ids or None, max_segments, sliding_window)."""
    padded = np.zeros((b, t), np.int32)
    for r, n in enumerate([t, t * 5 // 8][:b]):
        padded[r, :n] = 1
    packed = np.zeros((b, t), np.int32)
    for r in range(b):
        cuts = np.sort(np.random.default_rng(r).choice(np.arange(16, t - 64), 3, replace=False))
        bounds = [0, *cuts, t - 40 * r]  # the second row ends in padding
        for s in range(4):
            packed[r, bounds[s]:bounds[s + 1]] = s + 1
    return {"GQA causal": (None, None, None), "sliding window 256": (None, None, 256),
            "right padding (max_segments=1)": (padded, 1, None),
            "4 packed segments + padding, window 256": (packed, 4, 256)}


def check_attention(impl: str, b=2, t=1024, n=32, k=8, d=128) -> None:
    rng = np.random.default_rng(0)
    q, key, v, cot = (jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in
                      [(b, t, n, d), (b, t, k, d), (b, t, k, d), (b, t, n, d)])
    for name, (seg, max_segments, window) in segment_cases(b, t).items():
        seg_j = None if seg is None else jnp.asarray(seg)
        real = np.ones((b, t), bool) if seg is None else seg > 0
        cot_real = cot * jnp.asarray(real)[:, :, None, None]  # padding queries' outputs carry no meaning

        def loss_and_grads(kind, dtype, precision=None):
            def f(q_, k_, v_):
                with jax.default_matmul_precision(precision or "default"):
                    out = attention.attend(q_, k_, v_, seg_j, sliding_window=window, impl=kind,
                                           max_segments=max_segments if kind == "cudnn" else None)
                return jnp.sum(out.astype(jnp.float32) * cot_real.astype(jnp.float32)), out
            args = (q.astype(dtype), key.astype(dtype), v.astype(dtype))
            compiled = jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True)).lower(*args).compile()
            grads, out = compiled(*args)
            return out, grads, compiled.as_text()

        ref_out, ref_grads, _ = loss_and_grads("xla", jnp.float32, "highest")
        for kind in dict.fromkeys([impl, "xla"]):
            label = f"attention {kind} bf16, {name}"
            try:
                out, grads, hlo = loss_and_grads(kind, jnp.bfloat16)
            except Exception as e:  # an unsupported case on this jax/cuDNN is a finding, not a crash of the run
                record(label, float("nan"), BF16_TOL, False, f"{type(e).__name__}: {str(e)[:200]}")
                continue
            if kind == "cudnn":  # the kernel that ran, from the compiled program: forward and backward custom calls
                calls = re.findall(r"__cudnn\$fmha\w*", hlo)
                n_bwd = sum(c.endswith("Backward") for c in calls)
                layout = ""
                if max_segments is not None and max_segments > 1:  # packed: which K/V went in (jax's offsets fix)
                    repeated = attention.PACKED_KV_STRIDED_BY_QUERY_HEADS
                    layout = f"; K/V {'repeated to' if repeated else 'grouped, not repeated to'} q's {n} heads"
                record(label + ": cuDNN fmha custom calls in compiled HLO", len(calls), None,
                       n_bwd >= 1 and len(calls) > n_bwd, f"{sorted(set(calls))}{layout}")
            pad = ~real
            record(label + ": max |dq, dk, dv| at padding slots (exactly 0 in the reference)",
                   max(float(np.abs(np.asarray(g, np.float32)[pad]).max(initial=0)) for g in grads), 0.0)
            record(label + ": output", rel(out, ref_out, real), BF16_TOL)
            for g_name, g, g_ref in zip(("dq", "dk", "dv"), grads, ref_grads):
                record(f"{label}: {g_name}", rel(g, g_ref), BF16_TOL)


# --- 2. logits and 3. greedy generation ---------------------------------------------------------------------

def torch_reference(device: str):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    tm = torch_mistral(vocab_size=32000, hidden_size=1024, intermediate_size=3584, num_hidden_layers=2,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096,
                       sliding_window=256, initializer_range=0.02)
    return tm.to(device)


def check_logits_and_generation(device: str, new_tokens: int) -> None:
    import torch

    tm = torch_reference(device)
    path = tempfile.mkdtemp()
    tm.save_pretrained(path, safe_serialization=True)
    rng = np.random.default_rng(1)
    t = 512
    ids = rng.integers(3, 32000, (2, t)).astype(np.int64)
    mask = np.ones((2, t), np.int64)
    mask[1, 300:] = 0
    ref = torch_logits(tm, ids)
    ref_padded = torch_logits(tm, ids, attention_mask=mask)
    assert ref.std() > 0.3, "reference logits nearly constant: the comparison would say little"

    with jax.default_matmul_precision("highest"):
        ours32 = load_model(path, "float32", attention_impl="xla")
        logits32 = np.asarray(jax.jit(lambda i: ours32(i))(jnp.asarray(ids, jnp.int32)))
    record("logits float32 vs transformers float32: max |diff|", np.abs(logits32 - ref).max(), FP32_MAX_DIFF)

    ours16 = load_model(path, "bfloat16", param_dtype="float32")  # training's layout: float32 weights, bf16 compute
    graphdef, state = nnx.split(ours16)

    @jax.jit
    def bf16_logits(state, ids, segment_ids):
        model = nnx.merge(graphdef, state)
        whole = model.logits(model.hidden_states(ids))
        padded = model.logits(model.hidden_states(ids, segment_ids=segment_ids, max_segments=1))
        half = ids.shape[1] // 2  # row 0 as two packed sequences of 256 tokens, positions restarting
        packed_seg = jnp.concatenate([jnp.ones((1, half), jnp.int32), 2 * jnp.ones((1, half), jnp.int32)], 1)
        packed = model.logits(model.hidden_states(ids[:1], segment_ids=packed_seg, max_segments=2))
        return whole, padded, packed

    whole, padded, packed = (np.asarray(x) for x in bf16_logits(state, jnp.asarray(ids, jnp.int32),
                                                                 jnp.asarray(mask, jnp.int32)))
    ref_first = torch_logits(tm, ids[:1, :t // 2])
    ref_second = torch_logits(tm, ids[:1, t // 2:])
    tm16 = torch_reference(device).to(torch.bfloat16)
    tm16.config._attn_implementation = "sdpa"
    theirs16 = torch_logits(tm16, ids)
    theirs_err = rel(theirs16, ref)
    bound = 2 * theirs_err
    record("(info) logits bf16: transformers bf16 (sdpa) vs its float32", theirs_err, None)
    record("logits bf16: zephyr_jax (platform kernel) vs transformers float32", rel(whole, ref), bound)
    record("logits bf16: right-padded row (max_segments=1)", rel(padded, ref_padded, mask.astype(bool)), bound)
    record("logits bf16: two packed sequences (max_segments=2)",
           rel(packed[0], np.concatenate([ref_first[0], ref_second[0]])), bound)
    del tm16

    prompts = [rng.integers(3, 32000, n).tolist() for n in (5, 37, 64, 200)]
    tm.generation_config.eos_token_id = None  # never stop (as generate_ids without eos_id); no EOS suppression
    theirs = []
    for p in prompts:
        with torch.no_grad():
            out = tm.generate(torch.as_tensor([p], device=device), attention_mask=torch.ones((1, len(p)),
                              dtype=torch.long, device=device), do_sample=False, max_new_tokens=new_tokens,
                              pad_token_id=0)
        theirs.append(out[0, len(p):].tolist())
        assert len(theirs[-1]) == new_tokens, f"transformers generated {len(theirs[-1])} tokens"
    with jax.default_matmul_precision("highest"):
        ours = generate_ids(ours32, prompts, max_new_tokens=new_tokens)
    same = sum(a == b for a, b in zip(ours, theirs))
    record(f"greedy {new_tokens} tokens float32, prompts equal to transformers'", same, None, same == len(prompts),
           f"{same}/{len(prompts)} prompts")
    ours_bf16 = generate_ids(load_model(path, "bfloat16"), prompts, max_new_tokens=new_tokens)
    agree = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), new_tokens) for x, y in zip(ours_bf16, theirs)]
    record("(info) greedy bf16: tokens equal before the first difference", min(agree), None, True,
           f"per prompt {agree} of {new_tokens}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    gpu = jax.default_backend() == "gpu"
    device = jax.devices()[0]
    import torch
    import transformers
    print(f"{device.device_kind} ({jax.default_backend()}), jax {jax.__version__}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}")
    print("| check | figure | bound | ok | note |")
    print("|---|---|---|---|---|")
    for part, run in (("attention", lambda: check_attention("cudnn" if gpu else "xla")),
                      ("logits and generation", lambda: check_logits_and_generation("cuda" if gpu else "cpu",
                                                                                   args.tokens))):
        start = time.perf_counter()
        run()
        print(f"({part}: {time.perf_counter() - start:.0f} s, compiles included)", flush=True)
    failed = [r["check"] for r in rows if not r["ok"]]
    print(f"{len(rows) - len(failed)}/{len(rows)} checks hold" + (f"; failed: {failed}" if failed else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "jax": jax.__version__, "rows": rows}, f, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
