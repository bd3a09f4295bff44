"""bench/step_traffic.py's reading of an optimized HLO program: what each kernel reads and writes, and how often a
loop body runs, on a small hand-written module in XLA:GPU's form."""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("step_traffic", os.path.join(ROOT, "bench", "step_traffic.py"))
step_traffic = importlib.util.module_from_spec(spec)
spec.loader.exec_module(step_traffic)

# A 3-layer loop over stacked float32 weights [3, 8, 16]: each trip casts its layer's slice to bf16 (a fusion that
# reads only the slice), multiplies (a GEMM fusion), applies a mask that XLA hoisted out of the loop as a full
# [4, 16] array, and writes its output into a [3, 4, 16] stack in place. The entry zeroes the stack, runs the
# loop, and calls a computation whose gather reads 4 of 1,024 logits through a bitcast.
HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%fused_cast (param_0: f32[3,8,16], param_1: s32[]) -> bf16[1,8,16] {
  %param_0 = f32[3,8,16]{2,1,0} parameter(0)
  %param_1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  %ds = f32[1,8,16]{2,1,0} dynamic-slice(%param_0, %param_1, %c0, %c0), dynamic_slice_sizes={1,8,16}
  ROOT %cv = bf16[1,8,16]{2,1,0} convert(%ds)
}

%gemm_computation (param_0: bf16[4,8], param_1: bf16[1,8,16]) -> bf16[4,16] {
  %param_0 = bf16[4,8]{1,0} parameter(0)
  %param_1 = bf16[1,8,16]{2,1,0} parameter(1)
  %b = bf16[8,16]{1,0} bitcast(%param_1)
  ROOT %dot = bf16[4,16]{1,0} dot(%param_0, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_mask (param_0: bf16[4,16], param_1: pred[4,16], param_2: bf16[3,4,16], param_3: s32[]) -> bf16[3,4,16] {
  %param_0 = bf16[4,16]{1,0} parameter(0)
  %param_1 = pred[4,16]{1,0} parameter(1)
  %z = bf16[] constant(0)
  %zs = bf16[4,16]{1,0} broadcast(%z), dimensions={}
  %sel = bf16[4,16]{1,0} select(%param_1, %param_0, %zs)
  %up = bf16[1,4,16]{2,1,0} bitcast(%sel)
  %param_2 = bf16[3,4,16]{2,1,0} parameter(2)
  %param_3 = s32[] parameter(3)
  %c0 = s32[] constant(0)
  ROOT %dus = bf16[3,4,16]{2,1,0} dynamic-update-slice(%param_2, %up, %param_3, %c0, %c0)
}

%fused_gather (param_0: f32[4,256], param_1: s32[4,1]) -> f32[4,1] {
  %param_0 = f32[4,256]{1,0} parameter(0)
  %flat = f32[1024]{0} bitcast(%param_0)
  %param_1 = s32[4,1]{1,0} parameter(1)
  ROOT %g = f32[4,1]{1,0} gather(%flat, %param_1), GATHER_DIMS
}

%body (arg: LOOP_STATE) -> LOOP_STATE {
  %arg = LOOP_STATE parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %w = f32[3,8,16]{2,1,0} get-tuple-element(%arg), index=1
  %x = bf16[4,8]{1,0} get-tuple-element(%arg), index=2
  %m = pred[4,16]{1,0} get-tuple-element(%arg), index=3
  %ys = bf16[3,4,16]{2,1,0} get-tuple-element(%arg), index=4
  %cast_fusion = bf16[1,8,16]{2,1,0} fusion(%w, %i), kind=kLoop, calls=%fused_cast, CAST
  %gemm_fusion = bf16[4,16]{1,0} fusion(%x, %cast_fusion), kind=kCustom, calls=%gemm_computation, GEMM
  %mask_fusion = bf16[3,4,16]{2,1,0} fusion(%gemm_fusion, %m, %ys, %i), kind=kLoop, calls=%fused_mask, WHERE
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = LOOP_STATE tuple(%next, %w, %x, %m, %mask_fusion)
}

%cond (arg: LOOP_STATE) -> pred[] {
  %arg = LOOP_STATE parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%head (logits: f32[4,256], idx: s32[4,1]) -> f32[4,1] {
  %logits = f32[4,256]{1,0} parameter(0)
  %idx = s32[4,1]{1,0} parameter(1)
  ROOT %gather_fusion = f32[4,1]{1,0} fusion(%logits, %idx), kind=kLoop, calls=%fused_gather
}

ENTRY %main (w: f32[3,8,16], x: bf16[4,8], m: pred[4,16], logits: f32[4,256], idx: s32[4,1]) -> f32[4,1] {
  %w = f32[3,8,16]{2,1,0} parameter(0)
  %x = bf16[4,8]{1,0} parameter(1)
  %m = pred[4,16]{1,0} parameter(2)
  %logits = f32[4,256]{1,0} parameter(3)
  %idx = s32[4,1]{1,0} parameter(4)
  %zero = s32[] constant(0)
  %none = bf16[] constant(0)
  %ys = bf16[3,4,16]{2,1,0} broadcast(%none), dimensions={}
  %init = LOOP_STATE tuple(%zero, %w, %x, %m, %ys)
  %loop = LOOP_STATE while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %called = f32[4,1]{1,0} call(%logits, %idx), to_apply=%head
}
""".replace("LOOP_STATE", "(s32[], f32[3,8,16]{2,1,0}, bf16[4,8]{1,0}, pred[4,16]{1,0}, bf16[3,4,16]{2,1,0})").replace(
    "GATHER_DIMS", "offset_dims={1}, collapsed_slice_dims={}, start_index_map={0}, index_vector_dim=1, slice_sizes={1}"
).replace("GEMM", 'backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}').replace(
    "CAST", 'metadata={op_name="jit(step)/while/body/convert_element_type"}').replace(
    "WHERE", 'metadata={op_name="jit(step)/while/body/jit(_where)/select_n"}')


def test_kernels_read_what_they_take_and_loop_bodies_count_their_trips():
    comps, entry = step_traffic.computations(HLO)
    assert entry == "main"
    assert step_traffic.loops(comps, entry) == [("main", 1), ("body", 3), ("head", 1)]
    body = {k["name"]: k for k in step_traffic.kernels(comps, "body")}
    assert set(body) == {"cast_fusion", "gemm_fusion", "mask_fusion", "next"}
    # One layer's float32 slice read (8 x 16 x 4), its bf16 copy written (8 x 16 x 2): not the whole stack (and
    # the 4-byte loop index).
    assert body["cast_fusion"]["bytes"] == 8 * 16 * 4 + 8 * 16 * 2 + 4 and body["cast_fusion"]["kind"] == "other"
    assert body["gemm_fusion"]["kind"] == "matmul"
    assert body["gemm_fusion"]["bytes"] == 4 * 8 * 2 + 8 * 16 * 2 + 4 * 16 * 2
    # The GEMM's output and the hoisted full mask read, the update written in place (the stack neither read nor
    # copied), and the JAX operation named.
    assert body["mask_fusion"]["bytes"] == 4 * 16 * 2 + 4 * 16 * 1 + 4 * 16 * 2 + 4
    assert body["mask_fusion"]["source"] == "jit(_where)/select_n"
    entry_kernels = {k["name"]: k for k in step_traffic.kernels(comps, "main")}
    assert set(entry_kernels) == {"ys"}  # the call is followed, not counted as a kernel
    assert entry_kernels["ys"]["bytes"] == 3 * 4 * 16 * 2 + 2  # the zeroed stack written once (and its scalar)
    head = step_traffic.kernels(comps, "head")
    assert [k["bytes"] for k in head] == [3 * 4 * 4]  # 4 logits (through a bitcast), the indices, out


def test_collectives_are_counted_apart_from_the_bandwidth_bound_kernels():
    """An FSDP step's all-gathers and reduce-scatters move their bytes over the interconnect, overlapped with the
    layers: they were "other", HBM-bound time outside the matmuls (an h100-8 tiny SFT step's reduce-scatter was
    its fifth largest such kernel)."""
    line = "%all-gather-start.2 = (bf16[8,16]{1,0}, bf16[64,16]{1,0}) all-gather-start(%w), dimensions={0}"
    for op in ("all-gather-start", "reduce-scatter", "all-reduce-start", "all-to-all", "collective-permute-start"):
        assert step_traffic.kind({"op": op, "line": line.replace("all-gather-start(", f"{op}(")}, {}) == "collective"
    assert step_traffic.kind({"op": "copy-start", "line": "%c = f32[4]{0} copy-start(%x)"}, {}) == "other"
