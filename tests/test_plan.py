"""The planner (python -m zephyr_jax.plan): its verdict on a TPU slice both ways, its bytes against a real run's
measured peak, and its token and FLOP counts against hand counts and XLA's own count."""

import json
import os
import re
import subprocess
import sys
import types

import jax
import pytest

from zephyr_jax import compile_targets, plan, train, xla_flags
from zephyr_jax.config_common import load_config
from zephyr_jax.model import MistralConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 2 ** 30


def _plan(*args, env=None) -> dict:
    """The planner's command line, its --json report."""
    out = subprocess.run([sys.executable, "-m", "zephyr_jax.plan", *args, "--json"], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "plan: compiling the " in out.stderr  # minutes of compiling at 7B are not silent
    return json.loads(out.stdout[out.stdout.index("{"):])


def _plan_here(config: str, topology: str, length_mix=None, suggest=False, **overrides) -> dict:
    """The same report planned in this process (each command line pays ~8 s of imports and libtpu's start on 2
    cores), read back through JSON as the command line prints it. overrides: {"dpo.beta": 0.05}."""
    cfg = load_config(os.path.join(ROOT, config), **overrides)
    mix = None if length_mix is None else str(length_mix)
    with jax.default_matmul_precision(None):  # the command line's program (conftest makes float32 matmuls exact)
        report = plan.plan(cfg, topology, mix)
        if suggest:
            report["suggestions"] = plan.suggest(cfg, report, topology, mix)
    return json.loads(json.dumps(report, default=str))


# Eight pairs (prompt, chosen, rejected token counts) within the tiny config's limits: one global batch.
PAIRS = [(10, 5, 7), (20, 30, 2), (40, 20, 50), (3, 3, 3), (64, 60, 1), (12, 40, 41), (7, 9, 11), (30, 30, 30)]


@pytest.fixture
def pairs_file(tmp_path):
    mix = tmp_path / "pairs.txt"
    mix.write_text("".join(f"{p} {c} {r}\n" for p, c, r in PAIRS))
    return mix


def test_tiny_dpo_fits_a_v5e_slice_with_exact_input_bytes_and_flops(pairs_file):
    pairs = PAIRS
    r = _plan("--config=configs/dpo.py:tiny", "--topology=v5e-4", f"--length_mix={pairs_file}")

    assert r["verdict"].startswith("fits with"), r["verdict"]
    assert r["target"] == {"name": "v5e-4", "chips": 4, "hbm_bytes": int(15.75 * GiB), "peak_flops": 197e12}
    assert r["config"]["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
    c, m = r["config"], r["memory"]
    # Data parallelism replicates the float32 parameters: every chip holds all of them, Adam's two moments and the
    # float32 frozen reference; the batch is split over 4 chips: the 16 sequences packed into 4 rows (one per
    # chip) of 4 int32 fields (inputs, targets, positions, segment ids), plus each row's loss positions and segment
    # slots: no loss mask (the positions list the same tokens).
    params = r["model"]["params"]
    assert m["parameters"] == 4 * params and m["reference"] == 4 * params
    assert m["optimizer_state"] == 8 * params + 2 * 4  # mu, nu, and the int32 step counts of Adam and the schedule
    assert c["rows"] == 4
    assert m["batch"] == 4 * (4 * c["length"] + c["loss_positions"] + c["segment_slots"]) * 4 // 4
    assert m["total"] >= m["parameters"] + m["optimizer_state"] + m["reference"] + m["batch"] + m["temporaries"]
    assert r["attention"] == "Pallas splash attention" and r["compile_seconds"] > 0  # auto on a TPU

    t = r["tokens"]
    real = sum((p + c - 1) + (p + rj - 1) for p, c, rj in pairs)
    assert t["real_tokens_per_step"] == real and t["loss_tokens_per_step"] == sum(c + rj for _, c, rj in pairs)
    assert t["padded_positions_per_step"] == t["positions_per_step"] == 4 * c["length"]
    assert c["length"] % 128 == 0 and c["length"] < 128 + real / 4  # best-fit rows: at most one bucket above even
    assert 1 <= t["overhead_vs_ideal"] < 4 * c["length"] / real * 1.5
    # The FLOPs per real token, padding and step time of this one batch against counts from the pairs' own lengths:
    # splash skips the masked blocks, so attention is each sequence's l x l (no padding segment); the LM head at the
    # rows' loss positions; model FLOPs as PaLM counts them (6N per token, 12 L H D l^2 per sequence), and a third
    # more for the frozen reference's forward pass.
    lengths = [n for p, c_, rj in pairs for n in (p + c_ - 1, p + rj - 1)]
    mcfg, _ = plan.planned_model_config(load_config(os.path.join(ROOT, "configs/dpo.py:tiny")))
    spent = plan.step_flops_spent(mcfg, positions=4 * c["length"], attention_pairs=sum(n * n for n in lengths),
                                  head_positions=4 * c["loss_positions"], frozen_reference=True, remat="none",
                                  kernel_attention=True)
    assert t["flops_per_real_token"] * real == pytest.approx(spent, rel=1e-9)
    assert t["padding_fraction"] == pytest.approx(1 - real / (4 * c["length"]), rel=1e-9)
    assert r["ideal_step_seconds"] == pytest.approx(spent / (197e12 * 4), rel=1e-9)
    n = mcfg.num_params - mcfg.vocab_size * mcfg.hidden_size - (2 * mcfg.num_hidden_layers + 1) * mcfg.hidden_size
    layers = mcfg.num_hidden_layers * mcfg.num_attention_heads * mcfg.head_dim
    model = sum(6 * n * ln + 12 * layers * ln ** 2 for ln in lengths) * 4 / 3
    assert t["model_flops_per_real_token"] * real == pytest.approx(model, rel=1e-9)


def test_precomputed_reference_log_probs_replace_the_frozen_copy(pairs_file):
    """With dpo.precompute_reference the step holds no reference parameters and runs no reference forward; each
    batch carries one float32 reference log-prob per sequence slot instead. (The frozen copy's step is
    test_tiny_dpo_fits_a_v5e_slice_with_exact_input_bytes_and_flops': planned here too, it compiled that program
    a second time.)"""
    r = _plan_here("configs/dpo.py:tiny", "v5e-4", pairs_file, **{"dpo.precompute_reference": True})
    c, m = r["config"], r["memory"]
    assert r["verdict"].startswith("fits with") and c["reference"] == "precomputed log-probs"
    assert m["reference"] == 0 and m["parameters"] == 4 * r["model"]["params"]  # the frozen copy's bytes, kept
    assert m["batch"] == 4 * (4 * c["length"] + c["loss_positions"] + 2 * c["segment_slots"]) * 4 // 4
    # The step's FLOPs at its compiled shape, without the reference's forward pass (splash; tiny's remat "none").
    mcfg, _ = plan.planned_model_config(load_config(os.path.join(ROOT, "configs/dpo.py:tiny")))
    counted = lambda frozen: plan.step_flops_spent(  # noqa: E731
        mcfg, positions=4 * c["length"], attention_pairs=4 * c["length"] ** 2, head_positions=4 * c["loss_positions"],
        frozen_reference=frozen, remat="none", kernel_attention=True)
    assert r["tokens"]["flops_per_step"] == pytest.approx(counted(False), rel=1e-9)
    assert counted(False) < counted(True)


def test_bf16_first_moment_takes_a_quarter_off_the_optimizer_state(pairs_file):
    """optim.mu_dtype=bfloat16 (optax.adamw's mu_dtype): Adam's first moment in 2 bytes a parameter, the second
    moment still float32."""
    r = _plan_here("configs/dpo.py:tiny", "v5e-4", pairs_file, **{"optim.mu_dtype": "bfloat16"})
    assert r["memory"]["optimizer_state"] == 6 * r["model"]["params"] + 2 * 4


def test_counted_flops_agree_with_xlas_own_count(pairs_file):
    # XLA's FLOP count (independent of ours) of a step without remat, with the layers unrolled (XLA counts a loop
    # body once: these rows have under 256 loss positions, one chunk of the fused head) and einsum attention (it
    # does not count a Pallas kernel's FLOPs). A 512-token vocabulary keeps the LM head a small part: with a single
    # chunk, XLA merges the head's backward recompute with its forward (a real 7B step has many chunks), and with
    # the 32000-token vocabulary on a 64-wide model the head is 90% of the step. On 2 of the slice's 4 chips
    # (mesh.num_devices): the step's FLOPs are shared by the mesh's chips, not the slice's (were 4: XLA's count
    # read as twice ours, and the step time at peak as half).
    r = _plan_here("configs/dpo.py:tiny", "v5e-4", pairs_file, **{
        "model.attention_impl": "xla", "model.scan_layers": False, "model.arch.vocab_size": 512,
        "mesh.num_devices": 2})
    assert r["config"]["mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
    assert r["config"]["loss_positions"] <= 256
    assert r["attention"].startswith("XLA einsum attention")
    assert 0.9 < r["xla_estimate"]["share_of_counted"] < 1.15, r["xla_estimate"]
    t = r["tokens"]
    spent = t["flops_per_real_token"] * t["real_tokens_per_step"]
    assert r["ideal_step_seconds"] == pytest.approx(spent / (2 * 197e12))


@pytest.mark.long
def test_a_config_that_does_not_fit_says_by_how_much_what_is_largest_and_which_change_fits():
    # Logits dominate the temporaries: a 256k vocabulary (Gemma's) at batch 512 does not fit as the 32k one did at
    # batch 4096, and XLA:TPU compiles the half-size micro-batches that fit in a third of the time (29 s, not 88 s).
    r = _plan_here("configs/sft.py:tiny", "v5e-4", suggest=True,
                   **{"train.global_batch_size": 512, "model.arch.vocab_size": 256000})
    m = r["memory"]
    assert r["verdict"].startswith("does not fit by"), r["verdict"]
    assert m["total"] > m["hbm"] == int(15.75 * GiB)
    assert "RESOURCE_EXHAUSTED" in m["xla_error"]
    assert "the largest buffers are temporaries" in r["verdict"]
    text = plan.format_report(r)
    assert "does not fit by" in text and "XLA:TPU refused the program" in text
    # --suggest: each single change the tiny SFT config can take (its mesh is all data-parallel, its remat
    # "none"), planned on its own.
    changes = {x["change"]: x for x in r["suggestions"]}
    assert list(changes) == ["--config.mesh.shape='(1,4,1)'", "--config.model.remat=full",
                             "--config.optim.mu_dtype=bfloat16", "--config.train.grad_accum=2"]
    # Micro-batches shrink the activations by gigabytes here, remat by 0.3 GiB (most of them are the logits, not
    # the layers'). FSDP and bf16 moments shrink this small model's state by about 0.2 GiB, near what libtpu
    # releases move its temporaries (0.0.48 compiled FSDP with 0.05 GiB more at the 32k vocabulary): the planner
    # reports each as compiled.
    lowered = {change for change, x in changes.items() if x["total"] < m["total"]}
    assert {"--config.model.remat=full", "--config.train.grad_accum=2"} <= lowered, changes
    assert all(x["total"] > 0 and x["verdict"] for x in changes.values())
    halved = changes["--config.train.grad_accum=2"]
    assert halved["fits"] and halved["verdict"].startswith("fits with") and halved["total"] < m["hbm"]
    assert "one change at a time (--suggest):" in text and "--config.train.grad_accum=2" in text


def test_unknown_topology_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown TPU topology 'v5e-3'.*v4-8.*v5e-64.*v5p-32.*v6e-256"):
        compile_targets.tpu_target("v5e-3")
    with pytest.raises(ValueError, match="unknown TPU topology 'v4-9'"):
        compile_targets.tpu_target("v4-9")
    # Cloud TPU's name for v5e, as tpu_pod.sh takes it; v5e-8 and v6e-8 are one host of 8 chips (were two of 4),
    # the larger slices hosts of 4
    hosts = lambda name: len({d.process_index for d in compile_targets.tpu_target(name).devices})  # noqa: E731
    assert len(compile_targets.tpu_target("v5litepod-8").devices) == 8
    assert [hosts(n) for n in ("v5litepod-8", "v6e-8", "v4-8", "v5e-16", "v5e-64")] == [1, 1, 1, 4, 16]


def test_every_listed_topology_is_one_tpu_target_compiles_for_with_hosts_of_four_chips():
    """The names an unknown topology's error lists are names tpu_target accepts (v4 and v5p names count
    TensorCores, two a chip), with as many devices as the name's chips, in hosts of 4 chips past 8 chips (v5e-8
    and v6e-8 are one host of 8; a v4-16's 8 chips, a 2x2x2 cube, are two hosts of 4 like any 3D slice)."""
    for name in compile_targets.known_topologies():
        gen, _, count = name.partition("-")
        chips = int(count) // compile_targets.CHIPS[gen].cores_in_name
        if chips > 16:  # the small slices of each generation: a second each to describe
            continue
        devices = compile_targets.tpu_target(name).devices
        assert len(devices) == chips, name
        if chips > 8 or (chips == 8 and compile_targets.CHIPS[gen].shapes is compile_targets._THREE_D):
            assert len({d.process_index for d in devices}) == chips // 4, name


def test_unknown_gpu_topology_lists_the_known_ones(monkeypatch):
    with pytest.raises(ValueError, match="unknown GPU topology 'h100-3'.*a100-1.*h100-8.*h200-256"):
        compile_targets.target_for("h100-3")
    with pytest.raises(ValueError, match="unknown TPU topology 'v5x-8'.*GPUs: a100-1"):
        compile_targets.target_for("v5x-8")
    # A known one whose compiler is not installed (jax's words where its CUDA plugin is absent): what to install
    from jax.experimental import topologies

    def absent(**kwargs):
        raise RuntimeError(f"topology not implemented for {kwargs['platform']}")

    monkeypatch.setattr(topologies, "get_topology_desc", absent)
    with pytest.raises(RuntimeError, match=r"^compiling for h100-8 needs JAX's CUDA plugin \(pip install -e "
                                           r"\.\[gpu\]\): topology not implemented for cuda$"):
        compile_targets.target_for("h100-8")
    with pytest.raises(RuntimeError, match=r"^compiling for v5e-8 needs libtpu \(pip install -e \.\[tpu\]\): "
                                           r"topology not implemented for tpu$"):
        compile_targets.target_for("v5e-8")


# JAX's CUDA plugin (.ci/run installs it there; about 1.7 GB) compiles for GPUs on this CPU-only machine.
CUDA_PLUGIN = os.environ.get("ZEPHYR_JAX_CUDA_PLUGIN", os.path.join(ROOT, ".ci", "cuda"))
needs_cuda_plugin = pytest.mark.skipif(not os.path.isdir(os.path.join(CUDA_PLUGIN, "jax_plugins")),
                                       reason=f"JAX's CUDA plugin is not installed in {CUDA_PLUGIN}")


def _gpu_env(fraction: str) -> dict:
    path = os.pathsep.join(p for p in (CUDA_PLUGIN, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "XLA_PYTHON_CLIENT_MEM_FRACTION": fraction}


@needs_cuda_plugin
def test_compiles_for_an_h200_without_one(pairs_file):
    """XLA:GPU compiles the tiny DPO step in bf16 for an H200 from a device description: packed rows take cuDNN
    flash attention (Hopper), and the inputs' bytes are what their shapes say, as on a TPU slice."""
    r = _plan("--config=configs/dpo.py:tiny", "--topology=h200-1", f"--length_mix={pairs_file}",
              "--config.model.dtype=bfloat16", env={k: v for k, v in _gpu_env("0.9").items() if k != "XLA_FLAGS"})
    # Without XLA_FLAGS of its own, the planner compiles under the flags launch/slurm_gpu.sbatch runs with.
    assert r["target"] == {"name": "h200-1", "chips": 1, "hbm_bytes": int(0.9 * 143771 * 2 ** 20),
                           "peak_flops": 989e12, "xla_flags": " ".join(xla_flags.GPU)}
    assert r["attention"] == "cuDNN flash attention" and r["verdict"].startswith("fits with")
    params, m = r["model"]["params"], r["memory"]
    assert m["parameters"] == m["reference"] == 4 * params and m["optimizer_state"] == 8 * params + 2 * 4
    assert m["temporaries"] > 0 and m["total"] >= sum(m[k] for k in ("parameters", "optimizer_state", "reference"))


@needs_cuda_plugin
def test_compiles_for_two_hosts_of_a100s_without_one():
    """a100-16: two hosts of 8, the mesh over all 16; before Hopper cuDNN has no packed layout, so packed DPO
    rows take einsum attention."""
    r = _plan("--config=configs/dpo.py:tiny", "--topology=a100-16", "--config.model.dtype=bfloat16",
              "--config.mesh.shape=(1,16,1)", "--config.train.global_batch_size=16", env=_gpu_env("0.75"))
    assert r["target"]["chips"] == 16 and r["config"]["mesh"] == {"data": 1, "fsdp": 16, "tensor": 1}
    assert r["attention"].startswith("XLA einsum attention") and r["verdict"].startswith("fits with")


def _plans_in_one_process(overrides: list[dict], env: dict) -> list[dict]:
    """The reports of configs/sft.py with each of `overrides` planned for an H200, one after another in one
    subprocess (the CUDA plugin loads only at a process's start; each command line paid ~6 s of imports again)."""
    script = ("import json, sys\nfrom zephyr_jax import plan\nfrom zephyr_jax.config_common import load_config\n"
              "for o in json.loads(sys.argv[1]):\n"
              "    print(json.dumps(plan.plan(load_config('configs/sft.py', **o), 'h200-1'), default=str), flush=True)")
    out = subprocess.run([sys.executable, "-c", script, json.dumps(overrides)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@needs_cuda_plugin
@pytest.mark.long
def test_unrolled_layers_keep_their_remat_on_a_gpu():
    """scan_layers=False makes the layers straight-line code, where XLA's CSE merged each layer's recompute back
    into its forward: remat="full" (jax.checkpoint(prevent_cse=False), right under a scan only) and gradient
    accumulation's own recompute (model/accumulate.py) held about what no remat holds (XLA:GPU for an H200, 4
    layers 1024 wide, micro-batches of 8 x 2,048: 2,857 and 3,146 MiB of temporaries unrolled, against 2,939
    without remat). Unrolled, they now hold about what the layer scan holds. Under XLA's defaults.
    jax 0.11.2's XLA:GPU (the H200 machine's) also started a layer's recompute in accumulation's backward before the
    layer above had added its weight gradients, two layers' MLP activations live: 2,898 MiB unrolled against 1,111
    scanned (grad_accum 2), 1,211 since the recompute waits on the running sum too. jax 0.10.2 kept that order
    anyway (1,343 and 1,313 MiB), so only a run at 0.11.2 catches its loss. grad_accum 1 and 2, scanned and
    unrolled: four plans in one process, as the planner's command line makes each (load_config, then plan)."""
    shape = {"model.init": "random", "model.remat": "full", "model.dtype": "bfloat16", "data.max_length": 2048,
             "model.arch.num_hidden_layers": 4, "model.arch.hidden_size": 1024, "model.arch.intermediate_size": 4096,
             "model.arch.num_attention_heads": 8, "model.arch.num_key_value_heads": 2, "model.arch.vocab_size": 1024}
    cases = [(grad_accum, scan) for grad_accum in (1, 2) for scan in (True, False)]
    env = {**_gpu_env("0.9"), "XLA_FLAGS": "--xla_dump_hlo_as_text=false"}  # a default: no sbatch flags added
    reports = _plans_in_one_process([{**shape, "train.global_batch_size": 8 * grad_accum,
                                      "train.grad_accum": grad_accum, "model.scan_layers": scan}
                                     for grad_accum, scan in cases], env)
    temporaries = {case: r["memory"]["temporaries"] for case, r in zip(cases, reports, strict=True)}
    for grad_accum in (1, 2):
        assert temporaries[grad_accum, False] < 1.3 * temporaries[grad_accum, True], temporaries


def test_bad_length_mix_is_named(tmp_path):
    with pytest.raises(ValueError, match="PROMPT,COMPLETION,SIGMA for DPO"):
        plan.length_mix("lognormal:100,0.5", "dpo")
    with pytest.raises(ValueError, match="medians must be positive"):
        plan.length_mix("lognormal:0,0.5", "sft")
    with pytest.raises(ValueError, match=r"'lognormal:a,b': expected lognormal:MEDIAN,SIGMA for SFT"):  # not numbers
        plan.length_mix("lognormal:a,b", "sft")
    (tmp_path / "pairs_for_sft.txt").write_text("100 50 60\n")
    with pytest.raises(ValueError, match=r"pairs_for_sft.txt: expected 1 integer\(s\) per line for sft"):
        plan.length_mix(str(tmp_path / "pairs_for_sft.txt"), "sft")
    (tmp_path / "two.txt").write_text("100\n200\n")  # two examples cannot fill a batch of 8 rows
    cfg = load_config(os.path.join(ROOT, "configs/sft.py:tiny"), **{"data.packing": False})
    with pytest.raises(ValueError, match=r"the length mix .*two.txt holds fewer than one global batch of 8"):
        plan.batches_of_mix(cfg, train.mesh_for(cfg), str(tmp_path / "two.txt"))
    with pytest.raises(ValueError, match="neither lognormal:... nor a file"):
        plan.length_mix(str(tmp_path / "nope.txt"), "sft")
    (tmp_path / "bad.txt").write_text("12\nabc\n")
    with pytest.raises(ValueError, match=r"length mix .*bad.txt: could not convert"):
        plan.length_mix(str(tmp_path / "bad.txt"), "sft")
    for spec in ("lognormal:100,nan", "lognormal:inf,0.5"):  # was numpy's broadcast error
        with pytest.raises(ValueError, match="medians must be positive"):
            plan.length_mix(spec, "sft")
    # A negative length sliced from the end (-30 tokens were 70), a 0 had -1 sequence length.
    (tmp_path / "short.txt").write_text("100\n-30\n")
    with pytest.raises(ValueError, match=r"short.txt: example 1 \(\[-30\]\) is shorter than 2 tokens"):
        plan.length_mix(str(tmp_path / "short.txt"), "sft")
    (tmp_path / "pairs.txt").write_text("10 5 7\n3 0 2\n")
    with pytest.raises(ValueError, match=r"example 1 \(\[3, 0, 2\]\) is shorter than 1 token a part"):
        plan.length_mix(str(tmp_path / "pairs.txt"), "dpo")
    out = subprocess.run([sys.executable, "-m", "zephyr_jax.plan", "--config=configs/sft.py:tiny", "v5e-64"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "unexpected arguments ['v5e-64']" in out.stderr  # was a local plan


def _matmul_flops(jaxpr) -> float:
    """FLOPs of the dot_generals a jaxpr runs, a scan's body times its length (an independent count of what
    the traced step computes: JAX has already dropped what remat need not recompute)."""
    import numpy as np
    from jax.extend import core

    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contracting])
            continue
        subs = [j.jaxpr if isinstance(j, core.ClosedJaxpr) else j for v in eqn.params.values()
                for j in (v if isinstance(v, (tuple, list)) else [v]) if isinstance(j, (core.ClosedJaxpr, core.Jaxpr))]
        if eqn.primitive.name == "cond":
            total += max(map(_matmul_flops, subs))
        elif eqn.primitive.name.startswith("custom_vjp_call"):
            total += _matmul_flops(subs[0])  # its forward (the backward's ops are traced inline)
        else:
            total += eqn.params.get("length", 1) * sum(map(_matmul_flops, subs))
    return total


@pytest.mark.parametrize("config,remat", [("configs/sft.py:tiny", "none"), ("configs/sft.py:tiny", "full"),
                                          ("configs/sft.py:tiny", "save_dots"),
                                          ("configs/sft.py:tiny", "save_all_but_mlp"), ("configs/dpo.py:tiny", "full")])
def test_counted_flops_are_the_matmuls_of_the_traced_step(config, remat):
    """step_flops_spent against the matmul FLOPs in the train step's jaxpr, for each remat policy (einsum
    attention, so attention is matmuls too). Full remat recomputed no down_proj: it was counted, 5-6% at 7B."""
    from zephyr_jax import train
    cfg = load_config(os.path.join(ROOT, config), **{"model.remat": remat, "model.attention_impl": "xla",
                                                      "model.arch.vocab_size": 512,
                                                      "model.arch.intermediate_size": 256})  # e I != T N D
    mesh = train.mesh_for(cfg, jax.devices()[:1])
    mcfg, _ = plan.planned_model_config(cfg)
    batches = plan.batches_of_mix(cfg, mesh, plan.DEFAULT_MIX[cfg.stage])
    step, inputs = plan.train_step_and_inputs(cfg, mcfg, mesh, batches)
    with jax.set_mesh(mesh):
        traced = jax.make_jaxpr(step)(inputs.state, inputs.batch, inputs.reference, inputs.hparams)
    batch = inputs.batch
    rows, length = batch["inputs"].shape
    counted = plan.step_flops_spent(mcfg, positions=rows * length, attention_pairs=rows * length ** 2,
                                    head_positions=rows * batch["loss_positions"].shape[1],
                                    frozen_reference=cfg.stage == "dpo", remat=remat)
    assert _matmul_flops(traced.jaxpr) == pytest.approx(counted, rel=1e-9)


@pytest.mark.parametrize("remat", ["none", "full", "save_dots", "save_all_but_mlp", "offload"])
def test_counted_attention_recompute_follows_the_kernels_residuals(remat):
    """With splash or cuDNN, attention's forward is recomputed under full remat only (the kernel's residuals are
    kept otherwise: tests/test_attention.py::test_remat_policies_but_full_keep_the_attention_kernels_residuals);
    einsum attention's under save_dots and offload too (its matmuls have batch dimensions), and its scores under
    save_all_but_mlp (the names keep its output, not its probabilities). The einsum counts are the traced step's:
    test_counted_flops_are_the_matmuls_of_the_traced_step."""
    mcfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    count = lambda remat, kernel, pairs=1e6: plan.step_flops_spent(  # noqa: E731
        mcfg, positions=2048, attention_pairs=pairs, head_positions=2048, frozen_reference=False, remat=remat,
        kernel_attention=kernel)
    attention_fwd = count("none", True, 2e6) - count("none", True)  # what another 1e6 pairs cost, 3 passes' worth
    recomputed = lambda kernel: (count(remat, kernel) - count("none", kernel)) - (  # noqa: E731
        count(remat, kernel, 0.0) - count("none", kernel, 0.0))  # the recompute's attention part
    assert recomputed(True) == pytest.approx(attention_fwd / 3 if remat == "full" else 0.0)
    einsum = {"full": attention_fwd / 3, "save_dots": attention_fwd / 3, "offload": attention_fwd / 3,
              "save_all_but_mlp": attention_fwd / 6}.get(remat, 0.0)  # (the scores again, not the output)
    assert recomputed(False) == pytest.approx(einsum)


def test_more_micro_batches_count_the_recompute_of_every_layer():
    """grad_accum > 1 recomputes each layer (model/accumulate.py) whatever model.remat says: so do the FLOPs."""
    cfg = lambda accum, remat="none": load_config(os.path.join(ROOT, "configs/sft.py:tiny"), **{  # noqa: E731
        "model.remat": remat, "train.grad_accum": accum, "train.global_batch_size": 16})
    one, two = plan.plan(cfg(1)), plan.plan(cfg(2))  # (remat="full" at grad_accum 2 is the same program)
    assert one["config"]["remat"] == "none" and two["config"]["remat"].startswith("full (grad_accum")
    mcfg, _ = plan.planned_model_config(cfg(2))
    c = two["config"]  # einsum attention on the CPU: whole rows
    full = plan.step_flops_spent(mcfg, positions=c["rows"] * c["length"], attention_pairs=c["rows"] * c["length"] ** 2,
                                 head_positions=c["rows"] * c["loss_positions"], frozen_reference=False, remat="full")
    assert two["tokens"]["flops_per_step"] == pytest.approx(full, rel=1e-9)
    assert two["tokens"]["flops_per_step"] > one["tokens"]["flops_per_step"]


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's resident-set high-water mark")
@pytest.mark.parametrize("config,devices,overrides", [
    ("configs/sft.py:tiny", 1, ["--config.train.global_batch_size=16", "--config.train.grad_accum=2"]),
    ("configs/dpo.py:tiny", 8, ["--config.train.global_batch_size=64", "--config.mesh.shape=(1,8,1)"]),
], ids=["sft_1_device_grad_accum", "dpo_8_devices_fsdp"])
def test_planned_bytes_match_the_measured_peak_of_a_real_step(config, devices, overrides):
    """The planner's total per device against a real step's peak resident memory on the local CPU devices
    (bench/plan_memory.py), within 10%."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the script sets the device count
    out = subprocess.run([sys.executable, "bench/plan_memory.py", f"--config={config}", f"--devices={devices}",
                          *overrides], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["devices"] == devices
    assert result["planned_bytes"] > 300 * 2 ** 20  # big enough that the step's own memory dominates the peak
    assert 0.9 < result["ratio"] < 1.1, result


def test_the_planned_model_is_read_without_weights(tiny_model_dir, monkeypatch):
    local, source = plan.planned_model_config(load_config("configs/sft.py", **{"model.path": tiny_model_dir}))
    assert (local.hidden_size, local.num_hidden_layers, source) == (32, 2, tiny_model_dir)
    base, source = plan.planned_model_config(load_config("configs/dpo.py"))  # before dSFT has run
    assert base.num_params == 7_241_732_096 and "recipe's base" in source
    with pytest.raises(ValueError, match="'someone/elses-model': not a local directory"):  # the hub is offline here
        plan.planned_model_config(load_config("configs/sft.py", **{"model.path": "someone/elses-model"}))
    import huggingface_hub

    def not_found(*args, **kwargs):  # the hub client's messages span lines; the CLI prints one
        raise OSError("404 Client Error.\n\nRepository Not Found for url: https://huggingface.co/someone/elses-model")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", not_found)
    with pytest.raises(ValueError, match=r"\(OSError: 404 Client Error\. Repository Not Found for url: https") as e:
        plan.planned_model_config(load_config("configs/sft.py", **{"model.path": "someone/elses-model"}))
    assert "\n" not in str(e.value)
    # Found: its config.json alone is fetched (here the tiny model's, as the hub client would hand it back)
    asked = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo, name: asked.append((repo, name)) or os.path.join(tiny_model_dir, name))
    hub, source = plan.planned_model_config(load_config("configs/sft.py", **{"model.path": "someone/elses-model"}))
    assert asked == [("someone/elses-model", "config.json")] and hub == local
    assert source == "someone/elses-model (config.json from the hub)"


def test_both_of_xla_tpus_out_of_memory_messages_are_read():
    before = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
              "(15.91G) exceeds available HBM (15.75G).")
    assert plan.out_of_memory(RuntimeError(before)) == {"total": 15.91 * GiB, "hbm": 15.75 * GiB, "largest": []}
    # The shape of XLA:TPU's message when the scheduled program overflows (abridged from a v4-64 DPO compile).
    after = """RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out of memory in
memory space hbm. Used 30.75G of 30.75G hbm. Exceeded hbm capacity by 1.60M.

Total hbm usage >= 32.00G:
    reserved          1.25G
  Largest program allocations in hbm:

  1. Size: 1.00G
     Operator: op_name="jit(train_step)/while/body/checkpoint/rematted_computation/btkgd,bskd->bkgts/dot_general"
     Shape: f32[8,8,1024,1024,4]{3,2,4,1,0:T(8,128)}
     Allocation type: HLO temp
     ==========================

  2. Size: 512.00M
     Shape: bf16[8,1024,14336]{2,1,0:T(8,128)(2,1)}
     ==========================

  Largest program arguments and outputs in hbm:

  1. Size: 15.62M
     Shape: f32[32000,128]{1,0:T(8,128)}
"""
    oom = plan.out_of_memory(RuntimeError(after))
    assert oom["hbm"] == 30.75 * GiB and oom["total"] == 30.75 * GiB + 1.6 * 2 ** 20
    assert oom["largest"] == [("f32[8,8,1024,1024,4] (btkgd,bskd->bkgts/dot_general)", GiB),
                              ("bf16[8,1024,14336] (?)", 512 * 2 ** 20)]
    assert plan.out_of_memory(RuntimeError("INTERNAL: something else")) is None


def test_the_total_is_xla_tpus_own_peak_on_a_tpu_and_the_parts_sum_elsewhere():
    """XLA:TPU checks its buffer assignment's peak against HBM, and that peak is not the parts' sum: for this
    8-layer tiny dDPO step it is below (temporaries and arguments share space; at 7B on v5e-8 the step compiles at
    a 15.58 GiB peak whose parts sum to 17.83 GiB), for a small step above. A CPU has one buffer of temporaries
    beside the arguments, so there the total is the sum."""
    import jax.numpy as jnp

    r = _plan_here("configs/dpo.py:tiny", "v5e-4", **{"model.arch.num_hidden_layers": 8,
                                                       "train.global_batch_size": 64})
    m = r["memory"]
    assert m["sum_of_parts"] == sum(m[k] for k in ("parameters", "optimizer_state", "reference", "batch",
                                                   "temporaries", "outputs_not_donated", "code"))
    assert m["total"] < 0.8 * m["sum_of_parts"]
    assert r["verdict"].startswith(f"fits with {(m['hbm'] - m['total']) / GiB:.2f}")
    text = plan.format_report(r)
    assert "total (XLA:TPU's peak)" in text and f"sum to {m['sum_of_parts'] / GiB:.2f} GiB" in text

    step = jax.jit(lambda x: jnp.tanh(x @ x) @ x)
    x = jnp.ones((256, 256), jnp.float32)
    tpu = jax.sharding.SingleDeviceSharding(compile_targets.tpu_target("v5e-4").devices[0])
    compiled = step.lower(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=tpu)).compile()
    assert plan.compiled_bytes(compiled)["total"] == compiled.memory_analysis().peak_memory_in_bytes
    cpu = plan.compiled_bytes(step.lower(x).compile())
    assert cpu["total"] == cpu["sum"] == cpu["arguments"] + cpu["temporaries"] + cpu["outputs_not_donated"] + \
        cpu["code"]


def test_suggest_combines_the_changes_that_lower_the_bytes_when_none_fits_alone(monkeypatch):
    """suggest()'s choices over a stand-in for plan() (the compiles are the other tests'): each change alone, the
    error of one the config cannot take, then the lowering ones together, most effective first, until one fits."""
    cfg = load_config("configs/dpo.py:tiny", **{"mesh.shape": (2, 1, 1)})
    saved = {"dpo.precompute_reference": 3, "optim.mu_dtype": 2, "model.remat": 1, "train.grad_accum": -4}
    planned = _fake_plans(monkeypatch, cfg, lambda key, value: saved[key], hbm=14.5)
    report = {"config": {"mesh": {"data": 2, "fsdp": 1, "tensor": 1}}, "memory": {"total": 20 * GiB, "hbm": 14.5 * GiB}}
    rows = plan.suggest(cfg, report, "v5e-4")
    alone = {x["change"]: x for x in rows if not x.get("together")}
    assert "micro-batch does not divide" in alone["--config.mesh.shape='(1,2,1)'"]["error"]
    assert not any(x.get("fits") for x in alone.values())
    assert alone["--config.train.grad_accum=2"]["total"] == 24 * GiB
    together = [x for x in rows if x.get("together")]
    assert [x["change"] for x in together] == [
        "--config.dpo.precompute_reference=True --config.optim.mu_dtype=bfloat16",
        "--config.dpo.precompute_reference=True --config.optim.mu_dtype=bfloat16 --config.model.remat=full"]
    assert [x["fits"] for x in together] == [False, True] and together[1]["total"] == 14 * GiB
    # each change once, grad_accum 4 once more (it did not lower the bytes), then two combinations
    assert len(planned) == 5 + 1 + 2
    text = plan.format_report(_stand_in_report("dpo", "v5e-4", rows, total=20, hbm=15))
    assert "error: micro-batch does not divide" in text and "no single change fits" in text
    assert text.rstrip().endswith("14.00 GiB  fits with 0.50 GiB free")
    # With 13 GiB, not even all three together fit: each combination is listed, the last of all three
    _fake_plans(monkeypatch, cfg, lambda key, value: saved[key], hbm=13)
    together = [x for x in plan.suggest(cfg, {**report, "memory": {"total": 20 * GiB, "hbm": 13 * GiB}}, "v5e-4")
                if x.get("together")]
    assert [(x["total"], x["fits"]) for x in together] == [(15 * GiB, False), (14 * GiB, False)]


def test_suggest_lists_the_remat_policies_that_recompute_less_when_the_run_fits(monkeypatch):
    """A run that fits is also planned with each remat policy that recomputes less than its own: the bytes,
    whether it still fits, the FLOPs per real token (stand-in plans: each lighter policy 6 GiB more and 10% fewer
    FLOPs). Not for a run that does not fit, nor with more micro-batches (they recompute every layer)."""
    cfg = load_config("configs/sft.py:tiny", **{"model.remat": "full", "mesh.shape": (1, 1, 1)})

    def fake_plan(changed, topology, mix, hbm=25):
        lighter = plan.REMAT_BY_RECOMPUTE.index(changed.model.remat)
        memory = {"total": (10 + 6 * lighter) * GiB, "hbm": hbm * GiB, "largest_inputs": []}
        return {"config": {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}}, "memory": memory,
                "verdict": plan.verdict(memory), "tokens": {"flops_per_real_token": 100.0 - 10 * lighter}}

    monkeypatch.setattr(plan, "plan", fake_plan)
    rows = plan.suggest(cfg, fake_plan(cfg, "h200-1", None), "h200-1")
    assert [(x["change"], x["fits"], x["flops_per_real_token"]) for x in rows if x.get("faster")] == [
        ("--config.model.remat=save_all_but_mlp", True, 90), ("--config.model.remat=save_dots", True, 80),
        ("--config.model.remat=none", False, 70)]
    assert not [x for x in rows if x.get("faster") and "cost" not in x]
    assert not [x for x in plan.suggest(cfg, fake_plan(cfg, "h200-1", None, hbm=8), "h200-1") if x.get("faster")]
    accumulating = load_config("configs/sft.py:tiny", **{"model.remat": "save_dots", "train.grad_accum": 2,
                                                          "train.global_batch_size": 16})
    full_accumulating = load_config("configs/sft.py:tiny", **{"model.remat": "full", "train.grad_accum": 2,
                                                               "train.global_batch_size": 16})
    assert plan.speed_changes(accumulating) == plan.speed_changes(full_accumulating) == []
    assert plan.speed_changes(cfg)[-1][:2] == ("model.remat", "none")
    text = plan.format_report(_stand_in_report("sft", "h200-1", rows, total=10, hbm=25, flops_per_real_token=100.0))
    faster = text.split("less recomputed")[1].splitlines()
    assert "--config.model.remat=save_dots" in faster[2] and "fits with" in faster[2] and "80 (0.80x)" in faster[2]
    assert "--config.model.remat=save_dots" not in text.split("less recomputed")[0]


def _stand_in_report(stage: str, target: str, suggestions: list, total: float, hbm: float,
                     flops_per_real_token: float = 1.0) -> dict:
    """A plan() report for format_report with placeholder figures but the total and usable GiB, the FLOPs per real
    token and the suggestions."""
    tokens = {k: 1 for k in ("real_tokens_per_step", "padded_positions_per_step", "padding_fraction",
                             "head_positions_per_step", "loss_tokens_per_step", "ideal_flops_per_real_token",
                             "overhead_vs_ideal", "model_flops_per_real_token", "length_mix", "batches",
                             "attention_flops_counted")}
    return {"config": {"stage": stage, "mesh": {}, "global_batch_size": 8, "rows": 1, "length": 1,
                       "loss_positions": 1, "grad_accum": 1, "packing": True, "reference": None, "param_dtype": "f",
                       "dtype": "b", "remat": "none"},
            "target": {"name": target, "chips": 1}, "model": {"params": 10 ** 6, "source": "s"},
            "memory": {"total": total * GiB, "hbm": hbm * GiB, "parameters": 1}, "verdict": "v",
            "tokens": {**tokens, "flops_per_real_token": flops_per_real_token}, "compile_seconds": 1.0,
            "suggestions": suggestions}


def _fake_plans(monkeypatch, cfg, saving, hbm: float) -> list:
    """plan() replaced by 20 GiB less saving(key, value) GiB for each key changed from cfg (GiB of usable `hbm`);
    a changed mesh, or more than 8 micro-batches, cannot split the batch. Returns the list of what was planned."""
    planned = []

    def fake_plan(changed, topology, mix):
        keys = ("mesh.shape", "dpo.precompute_reference", "optim.mu_dtype", "model.remat", "train.grad_accum")
        diff = {k: changed[k.split(".")[0]][k.split(".")[1]] for k in keys}
        diff = {k: v for k, v in diff.items() if v != cfg[k.split(".")[0]][k.split(".")[1]]}
        planned.append(diff)
        if "mesh.shape" in diff or diff.get("train.grad_accum", 0) > 8:
            raise ValueError("micro-batch does not divide over the mesh")
        memory = {"total": (20 - sum(saving(k, v) for k, v in diff.items())) * GiB, "hbm": hbm and hbm * GiB,
                  "largest_inputs": []}
        return {"memory": memory, "verdict": plan.verdict(memory)}

    monkeypatch.setattr(plan, "plan", fake_plan)
    return planned


@pytest.mark.parametrize("hbm, fewest, tried", [(14.5, 8, [2, 4, 8]), (16.5, 4, [2, 4]), (13, 8, [2, 4, 8, 16])])
def test_suggest_doubles_the_micro_batches_until_the_run_fits_or_they_no_longer_split(monkeypatch, hbm, fewest,
                                                                                      tried):
    """Each doubling of train.grad_accum saves 2 GiB here: suggest() stops at the first that fits, or at the last
    the batch splits into (8 micro-batches)."""
    cfg = load_config("configs/dpo.py:tiny", **{"dpo.precompute_reference": True, "model.remat": "full",
                                                 "optim.mu_dtype": "bfloat16"})  # leaves grad_accum alone
    planned = _fake_plans(monkeypatch, cfg, lambda key, value: 2 * value.bit_length() - 2, hbm)
    report = {"config": {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}}, "memory": {"total": 20 * GiB, "hbm": hbm * GiB}}
    (row,) = plan.suggest(cfg, report, "v5e-4")
    assert row["change"] == f"--config.train.grad_accum={fewest}"
    assert row["total"] == (20 - 2 * fewest.bit_length() + 2) * GiB and row["fits"] == (hbm != 13)
    assert [p["train.grad_accum"] for p in planned] == tried


def test_suggest_combines_more_micro_batches_without_remat_and_nothing_when_the_capacity_is_unknown(monkeypatch):
    """More micro-batches recompute every layer (model/accumulate.py), so a combination with them leaves
    model.remat out, and a config that already has them is not offered remat at all. Without the device's
    capacity (--topology=local on CPUs) nothing is combined: nothing can be said to fit."""
    cfg = load_config("configs/dpo.py:tiny")  # remat "none", frozen reference, float32 Adam
    saved = {"dpo.precompute_reference": 3, "optim.mu_dtype": 2, "model.remat": 1}
    saving = lambda key, value: 2 * value.bit_length() - 2 if key == "train.grad_accum" else saved[key]
    for hbm in (12, None):
        _fake_plans(monkeypatch, cfg, saving, hbm)
        report = {"config": {"mesh": {"data": 1, "fsdp": 1, "tensor": 1}},
                  "memory": {"total": 20 * GiB, "hbm": hbm and hbm * GiB}}
        rows = plan.suggest(cfg, report, "v5e-4")
        assert "--config.model.remat=full" in [x["change"] for x in rows]
        together = [x for x in rows if x.get("together")]
        if hbm is None:
            assert not together and all(x["fits"] is None for x in rows)
        else:
            assert [(x["change"], x["fits"]) for x in together] == [
                ("--config.train.grad_accum=8 --config.dpo.precompute_reference=True", True)]
    accumulating = load_config("configs/dpo.py:tiny", **{"train.grad_accum": 2})
    assert "model.remat" not in [key for key, _, _ in plan.memory_changes(accumulating, report["config"]["mesh"])]


def _abstract_engine_inputs(mesh, cfg, slots: int, length: int, rows: int):
    """A bf16 model's abstract parameters laid out over `mesh` by the sharding rules, its KV cache as Engine lays
    it out on a TPU (one chip's buffer: the third value), and `rows` rows of sampling settings. Nothing is
    allocated."""
    import jax.numpy as jnp
    from flax import nnx

    from zephyr_jax import engine
    from zephyr_jax.model import Mistral, kv_cache
    from zephyr_jax.sharding import DEFAULT_RULES, named, param_specs

    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                         named(mesh, param_specs(abstract, DEFAULT_RULES)))
    heads_first = kv_cache.heads_first_on("tpu")
    sharding = engine.Engine._cache_sharding(types.SimpleNamespace(config=cfg, max_slots=slots), mesh, heads_first)
    sizes = dict(layers=cfg.num_hidden_layers, slots=slots, length=length, kv_heads=cfg.num_key_value_heads,
                 head_dim=cfg.head_dim)
    buffer = jax.ShapeDtypeStruct(tuple(sizes[a] for a in kv_cache.axes(heads_first)), jnp.bfloat16,
                                  sharding=sharding)
    of = lambda dtype: jax.ShapeDtypeStruct((rows,), dtype)  # noqa: E731
    sampling = (of(jnp.float32), of(jnp.int32), of(jnp.float32), of(jnp.uint32), of(jnp.uint32))
    return graphdef, state, kv_cache.KVCache(k=buffer, v=buffer, heads_first=heads_first), buffer, sampling


def test_a_prefill_of_several_rows_copies_no_kv_cache_on_a_tpu():
    """The engine's prefill compiled for TPU v4-8 (tensor=4, so a chip holds 2 of 8 KV heads): written as one
    scatter, two prompts of 512 tokens made XLA:TPU lay the whole cache out anew and back (temporaries the size of
    the cache: 8 GiB for a 7B's 64 slots x 4,096, which then did not fit a v5e chip); row by row it copies nothing."""
    import jax.numpy as jnp
    import numpy as np

    from zephyr_jax import engine
    from zephyr_jax.model import MistralConfig
    from zephyr_jax.sharding import make_mesh

    mesh = make_mesh((1, 1, 4), compile_targets.tpu_target("v4-8").devices)
    cfg = MistralConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                        num_attention_heads=8, num_key_value_heads=8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    rows, length = 2, 512
    graphdef, state, cache, buffer, sampling = _abstract_engine_inputs(mesh, cfg, 64, 4096, rows)
    ints = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)  # noqa: E731
    compiled = engine._prefill.lower(graphdef, state, cache, ints(rows, length), ints(rows, length), ints(rows),
                                     ints(rows), ints(rows, length), sampling, kv_length=512, top_n=-1,
                                     prompt_top_n=-1).compile()
    cache_bytes = 2 * int(np.prod(buffer.sharding.shard_shape(buffer.shape))) * 2  # k and v, bf16, one chip's
    assert compiled.memory_analysis().temp_size_in_bytes < cache_bytes / 16  # 516.9 MiB of 512 before; 2.2 now


@pytest.mark.parametrize("topology, mesh_shape, rows", [("v4-8", (1, 1, 1), 8), ("v5e-8", (1, 8, 1), 1),
                                                        ("v5e-8", (1, 1, 8), 1)])
def test_decoding_on_a_tpu_copies_neither_weights_nor_the_kv_cache(topology, mesh_shape, rows):
    """The engine's decoding call compiled for a TPU slice reads the weights and the cache where they lie. Before:
    several rows made XLA:TPU copy the stacked q/k/v kernels into another layout every call (a 7B on one v4 chip:
    1.5 GiB); one row (a lone request) all-gathered the whole cache in every layer over fsdp (a 7B's 64 x 4,096
    cache then needed 25.7 GiB of a v5e chip), or laid it out anew and back with one KV head a chip."""
    import jax.numpy as jnp
    import numpy as np

    from zephyr_jax import engine
    from zephyr_jax.model import MistralConfig
    from zephyr_jax.sharding import make_mesh

    mesh = make_mesh(mesh_shape, compile_targets.tpu_target(topology).devices[:int(np.prod(mesh_shape))])
    cfg = MistralConfig(vocab_size=1024, hidden_size=4096, intermediate_size=1024, num_hidden_layers=2,  # 7B-wide
                        num_attention_heads=32, num_key_value_heads=8, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state, cache, buffer, sampling = _abstract_engine_inputs(mesh, cfg, 64, 1024, rows)
    of = lambda dtype, *s: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    with jax.set_mesh(mesh):
        compiled = engine._decode.lower(
            graphdef, state, cache, of(jnp.int32, rows), of(jnp.int32, rows), of(jnp.int32, rows),
            of(jnp.bool_, rows), of(jnp.int32, rows), of(jnp.int32, rows, engine.MAX_STOP_TOKENS), sampling,
            steps=8, kv_length=1024, top_n=-1).compile()
    shard = lambda x: tuple(x.sharding.shard_shape(x.shape))  # noqa: E731
    kernels = {shard(x) for x in jax.tree.leaves(state) if x.ndim == 3}  # the stacked layers' kernels, a chip's
    big = []  # copies of a stacked kernel; copies or gathers of a cache buffer (a chip's part or more)
    for dims, op in re.findall(r"= bf16\[([\d,]+)\]\{[^}]*\} (copy|transpose|all-gather)\(", compiled.as_text()):
        dims = tuple(int(d) for d in dims.split(","))
        if dims in kernels or np.prod(dims) >= np.prod(shard(buffer)):
            big.append((op, dims))
    assert not big, big


def test_planned_input_bytes_are_xlas_argument_bytes():
    """input_buffers (each array's shard shape and dtype) against XLA's own memory analysis of the compiled step:
    the argument bytes one device holds, with weights and the optimizer state sharded over fsdp, the batch over
    data and fsdp, Adam's first moment in bf16. The frozen reference is stored in dpo.reference_dtype (bf16: half
    the float32 parameters' bytes), not in the parameters' dtype."""
    import jax.numpy as jnp

    from zephyr_jax import train
    cfg = load_config(os.path.join(ROOT, "configs/dpo.py:tiny"), **{
        "mesh.shape": (2, 4, 1), "dpo.reference_dtype": "bfloat16", "optim.mu_dtype": "bfloat16"})
    mesh = train.mesh_for(cfg, jax.devices()[:8])
    mcfg, _ = plan.planned_model_config(cfg)
    step, inputs = plan.train_step_and_inputs(cfg, mcfg, mesh, plan.batches_of_mix(cfg, mesh, plan.DEFAULT_MIX["dpo"]))
    with jax.set_mesh(mesh):
        compiled = step.lower(inputs.state, inputs.batch, inputs.reference, inputs.hparams).compile()
    buffers = plan.input_buffers(inputs)
    # every array placed is one the step reads: a loss mask would be an argument XLA drops (loss_positions list
    # the same tokens), bytes on the devices that the compiled step does not count
    assert "batch.loss_mask" not in dict(buffers)
    assert sum(b for _, b in buffers) == compiled.memory_analysis().argument_size_in_bytes
    parts = plan.input_bytes(buffers)
    assert 2 * parts["reference"] == parts["parameters"]  # float32 parameters
    assert {x.dtype for x in jax.tree.leaves(inputs.reference)} == {jnp.dtype(jnp.bfloat16)}


def test_outputs_that_reuse_a_donated_argument_are_not_counted_again():
    """compiled_bytes' outputs_not_donated: a step that donates its input writes its output there (the train
    step's state): nothing more; one that does not holds its output beside the input, the array's bytes."""
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((512, 256), jnp.float32)
    double = lambda a: a * 2  # noqa: E731
    donated = plan.compiled_bytes(jax.jit(double, donate_argnums=0).lower(x).compile())
    kept = plan.compiled_bytes(jax.jit(double).lower(x).compile())
    assert donated["outputs_not_donated"] == 0 and kept["outputs_not_donated"] == 512 * 256 * 4
    assert kept["total"] - donated["total"] == 512 * 256 * 4


def test_memory_changes_keep_the_devices_and_offer_only_what_the_config_can_change():
    """--suggest's single changes: folding the data axis into fsdp keeps the mesh's devices (the mesh code builds
    it over the same 8), more micro-batches means more than the config has now, and a reference-free DPO run has no
    reference log-probs to precompute."""
    from zephyr_jax import train
    cfg = load_config(os.path.join(ROOT, "configs/dpo.py:tiny"), **{
        "mesh.shape": (2, 2, 2), "train.grad_accum": 2, "train.global_batch_size": 32})
    mesh = train.mesh_for(cfg, jax.devices()[:8])
    changes = {key: value for key, value, _ in plan.memory_changes(cfg, dict(mesh.shape))}
    folded = load_config(os.path.join(ROOT, "configs/dpo.py:tiny"), **{
        "mesh.shape": changes["mesh.shape"], "train.grad_accum": 2, "train.global_batch_size": 32})
    assert dict(train.mesh_for(folded, jax.devices()[:8]).shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    assert changes["train.grad_accum"] > cfg.train.grad_accum
    assert "dpo.precompute_reference" in changes
    free = load_config(os.path.join(ROOT, "configs/dpo.py:tiny"), **{"dpo.reference_free": True})
    assert "dpo.precompute_reference" not in [key for key, _, _ in plan.memory_changes(free, dict(mesh.shape))]
    assert plan._reference_kind(free) == "none (reference-free)"  # (the report's config.reference)


def test_a_lognormal_length_mix_has_the_medians_it_names_and_no_example_too_short():
    """lognormal:PROMPT,COMPLETION,SIGMA draws chosen and rejected around COMPLETION (both completions, not the
    prompt's median again), and every SFT example has the 2 tokens a file of lengths must give it."""
    import numpy as np

    pairs = plan.length_mix("lognormal:117,276,0.7", "dpo")
    lengths = np.array([[len(e.prompt), len(e.chosen), len(e.rejected)] for e in pairs])
    assert np.median(lengths, 0) == pytest.approx([117, 276, 276], rel=0.05)
    sft = plan.length_mix("lognormal:1400,0.5", "sft")
    assert np.median([len(e.ids) for e in sft]) == pytest.approx(1400, rel=0.05)
    assert min(len(e.ids) for e in plan.length_mix("lognormal:1,0.5", "sft")) == 2
    # Packed, short examples fill fewer rows than they are: more are drawn until the 8 steps' batches are full
    cfg = load_config(os.path.join(ROOT, "configs/sft.py:tiny"))  # (packed rows of 128 tokens, 8 a batch)
    batches = plan.batches_of_mix(cfg, train.mesh_for(cfg, jax.devices()[:1]), "lognormal:12,1.0")
    assert [b.batch["inputs"].shape for b in batches] == [(8, 128)] * 8
    assert all(sum(b.sequences) > 6 * 128 for b in batches)  # rows of several examples each, mostly full


@pytest.mark.parametrize("config", ["configs/sft.py:tiny", "configs/dpo.py:tiny"])
def test_the_planned_batch_holds_the_largest_of_the_mixs_batches(config):
    """The step is compiled for one batch shape: each dimension the largest any of the mix's batches has (the
    memory's worst case), so every batch the batching code made fits in it, and none is smaller than needed."""
    from zephyr_jax import train
    cfg = load_config(os.path.join(ROOT, config))
    if cfg.stage == "sft":  # a row per example, padded to its batch's bucket
        cfg = load_config(os.path.join(ROOT, config), **{"data.packing": False, "data.buckets": (16, 32, 64, 128)})
    mix = "lognormal:12,1.0" if cfg.stage == "sft" else "lognormal:6,8,1.0"  # short: batches of several shapes
    batches = plan.batches_of_mix(cfg, train.mesh_for(cfg, jax.devices()[:1]), mix)
    shapes = {k: {b.batch[k].shape for b in batches} for k in batches[0].batch}
    assert any(len(s) > 1 for s in shapes.values()), shapes  # the batches differ in some dimension
    for k, x in plan.abstract_batch(batches).items():
        assert x.dtype == batches[0].batch[k].dtype
        assert x.shape == tuple(max(s[i] for s in shapes[k]) for i in range(len(x.shape))), k


def test_xlas_flop_count_is_shown_within_4x_of_the_count_over_all_chips():
    """xla_estimate compares XLA's FLOPs per chip, times the chips, with the counted FLOPs of the whole step: on 4
    chips a per-chip count of 0.2 of the step's is 80% of it (shown), 1.25 of it is 500% (left out)."""
    compiled = lambda flops: types.SimpleNamespace(cost_analysis=lambda: {"flops": flops})  # noqa: E731
    shown = plan.xla_estimate(compiled(20.0), 100.0, 4, None)
    assert shown["flops_per_chip"] == 20.0 and shown["share_of_counted"] == pytest.approx(0.8)
    assert "flops_per_chip" not in plan.xla_estimate(compiled(125.0), 100.0, 4, None)

    def no_analysis():
        raise NotImplementedError("no cost analysis on this backend")

    assert plan.xla_estimate(types.SimpleNamespace(cost_analysis=no_analysis), 100.0, 4, 1.0) == {}


@pytest.mark.parametrize("stage, packing, tried", [("dpo", True, [1, 2, 4]), ("dpo", False, [1, 2]),
                                                   ("sft", True, [1])])
def test_plan_table_doubles_the_micro_batches_the_mesh_can_split(monkeypatch, stage, packing, tried):
    """bench/plan_table.py's search over stand-in plans of 32 examples on a mesh of 32 batch shards that fit at 4
    micro-batches: dDPO's packed rows are rounded up to the shards (train.preference_rows_for), so any number of
    pairs splits; its unpacked rows are two a pair, so 16 pairs a micro-batch split (8 do not); SFT's 16 rows do
    not. (The search counted pairs as rows: the recipe's 32 pairs on 32 chips stopped at one micro-batch.)"""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_table", os.path.join(ROOT, "bench", "plan_table.py"))
    plan_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_table)
    planned = []

    def plan_once(config, topology, mesh, grad_accum):
        planned.append(grad_accum)
        return {"verdict": "fits with" if grad_accum >= 4 else "does not fit",
                "config": {"stage": stage, "packing": packing, "global_batch_size": 32}}

    monkeypatch.setattr(plan_table, "plan_once", plan_once)
    report = plan_table.search((f"configs/{stage}.py:zephyr", "v5e-64", "(1,32,1)", 1), log=lambda r: None)
    assert planned == tried and report["config"]["global_batch_size"] == 32
