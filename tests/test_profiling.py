"""Profiles: train.profile_start traces exactly its steps, and zephyr_jax.profiling reads the trace back."""

import glob
import os

import jax
import pytest

from zephyr_jax import profiling, train
from tests.test_train import tiny_config


def test_a_profile_window_traces_exactly_its_steps_and_lists_their_operations(data_dir, tmp_path, capsys):
    # Steps 3-4 of 5, with an eval after step 3: step 2 may still be queued on the device when step 3 is dispatched
    # (the host runs ahead), and the eval runs inside the window.
    cfg = tiny_config("sft", data_dir, **{"train.max_steps": 5, "train.eval_every": 3, "train.save_every": 0,
                                          "train.profile_start": 3, "train.profile_steps": 2})
    train.run(cfg, str(tmp_path))
    traces = glob.glob(str(tmp_path / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    assert len(traces) == 1, traces
    assert f"profile of steps 3-4: {traces[0]}" in capsys.readouterr().out

    rows, facts = profiling.op_times(traces[0])
    assert facts["steps"] == [3, 4]  # the step markers of the window, not of steps 2 or 5
    # The train step's program ran twice inside the window (step 2 finished before it, step 5 was not started), on
    # each of the mesh's devices: its operations twice a device, the layer scan's once more a layer.
    devices = jax.device_count()
    assert facts["devices"] == devices
    step_module = [r for r in rows if r["module"] == "jit_train_step"]
    assert step_module, sorted({r["module"] for r in rows})
    # Self times: never below 0 (a loop's own time, less its body's, may round to 0).
    assert all(r["seconds"] >= 0 for r in rows) and sum(r["seconds"] for r in step_module) > 0
    assert {r["calls"] for r in step_module} == {2 * devices, 2 * devices * cfg.model.arch.num_hidden_layers}
    assert {r["module"] for r in rows} - {"jit_train_step"}  # the eval's programs

    text = profiling.report(profiling.newest_trace(str(tmp_path)), top=5)
    lines = text.splitlines()
    step_ms = 1e3 * sum(r["seconds"] for r in step_module) / 2 / devices  # the eval's time is not a step's
    assert f"{step_ms:.2f} ms a step a device over steps 3-4" in lines[0]
    shares = [float(part.rsplit(" ", 1)[1].strip("%")) for part in lines[1].removeprefix("kinds: ").split(", ")]
    assert abs(sum(shares) - 100) < 0.5  # every operation in exactly one kind
    assert lines[2].startswith("modules: jit_train_step ")
    table = [line for line in lines if line.startswith("| ") and "operation" not in line]
    assert len(table) == 5
    # The command line prints that table for the trace file named itself too; a --top below 1 is refused
    profiling.main([traces[0], "--top=5"])
    assert capsys.readouterr().out == text + "\n"
    with pytest.raises(SystemExit, match=r"^error: --top=0: must be at least 1$"):
        profiling.main([traces[0], "--top=0"])


def test_a_window_past_the_last_step_ends_with_the_loop(data_dir, tmp_path, capsys):
    cfg = tiny_config("sft", data_dir, **{"train.max_steps": 3, "train.eval_every": 0, "train.save_every": 0,
                                          "train.profile_start": 3, "train.profile_steps": 5})
    train.run(cfg, str(tmp_path))
    assert "profile of steps 3-3: " in capsys.readouterr().out
    rows, facts = profiling.op_times(profiling.newest_trace(str(tmp_path)))
    assert facts["steps"] == [3] and {r["module"] for r in rows} == {"jit_train_step"}  # closed before the final eval


def test_a_run_that_never_reaches_the_window_says_it_traces_nothing(data_dir, tmp_path, capsys):
    cfg = tiny_config("sft", data_dir, **{"train.max_steps": 2, "train.eval_every": 0, "train.save_every": 1,
                                          "train.profile_start": 9})
    train.run(cfg, str(tmp_path))
    assert "train.profile_start=9 is past this run's 2 steps, so no profile" in capsys.readouterr().out
    cfg = tiny_config("sft", data_dir, **{"train.max_steps": 3, "train.eval_every": 0, "train.save_every": 1,
                                          "train.profile_start": 1})
    train.run(cfg, str(tmp_path))  # resumed from step 2
    assert "train.profile_start=1: this run starts after step 2, so no profile" in capsys.readouterr().out
    assert not os.path.exists(tmp_path / "tensorboard" / "plugins")
    with pytest.raises(SystemExit, match=r"^error: no \.xplane\.pb trace under .* \(train with "
                                         r"--config\.train\.profile_start=N\)$"):
        profiling.main([str(tmp_path)])


def test_kinds_come_from_the_operation_and_kernel_names():
    assert profiling.kind_of("custom-call.3", "cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert profiling.kind_of("fusion.12", "sm90_xmma_gemm_bf16bf16_bf16f32") == "matmul"
    assert profiling.kind_of("all-reduce.1", "ncclDevKernel_AllReduce_Sum_f32") == "collective"
    assert profiling.kind_of("copy.4", "copy_4") == "copy"
    assert profiling.kind_of("loop_add_fusion", "loop_add_fusion") == "other"


def _plane(plane_id, name, lines):
    """An XSpace plane as text proto: lines of (name, [(kernel, start ps, duration ps, {stat: value})])."""
    names = sorted({k for _, events in lines for k, _, _, _ in events})
    stat_names = sorted({s for _, events in lines for _, _, _, stats in events for s in stats})
    text = f'planes {{ id: {plane_id} name: "{name}"'
    for line_id, (line, events) in enumerate(lines, 1):
        text += f' lines {{ id: {line_id} name: "{line}"'
        for kernel, start, ps, stats in events:
            text += f" events {{ metadata_id: {names.index(kernel) + 1} offset_ps: {start} duration_ps: {ps}"
            text += "".join(f' stats {{ metadata_id: {stat_names.index(s) + 1} str_value: "{v}" }}'
                            for s, v in stats.items())
            text += " }"
        text += " }"
    text += "".join(f' event_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}' for i, n in enumerate(names, 1))
    text += "".join(f' stat_metadata {{ key: {i} value {{ id: {i} name: "{n}" }} }}'
                    for i, n in enumerate(stat_names, 1))
    return text + " }"


def test_device_kernels_are_counted_once_and_empty_device_planes_and_host_thunks_left_out(tmp_path):
    """A GPU plane as the profiler writes it (kernels on stream lines, naming their operation; xprof derives an "XLA
    Ops" line later, which would repeat their time), a TPU plane (its "XLA Ops" line, where a loop spans its body,
    and its modules), libtpu's empty Megascale plane, and host thunks, which a trace with device kernels does not
    count."""
    module = {"hlo_module": "jit_train_step"}
    us = 1_000_000  # picoseconds
    gpu = _plane(1, "/device:GPU:0", [
        ("Stream #13(Kernel,Memset)", [("sm90_xmma_gemm_bf16", 0, 3 * us, {"hlo_op": "dot.1", **module}),
                                       ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 3 * us, 2 * us,
                                        {"hlo_op": "custom-call.4", **module}),
                                       ("sm90_xmma_gemm_bf16", 5 * us, 1 * us, {"hlo_op": "dot.1", **module})]),
        ("XLA Ops", [("dot.1", 0, 4 * us, {}), ("custom-call.4", 3 * us, 2 * us, {})])])
    # On a TPU's XLA Ops line a while loop spans the operations it runs: 10 us, of which 4 + 1 are its body's.
    tpu = _plane(2, "/device:TPU:0", [("XLA Modules", [("jit_train_step(1)", 0, 12 * us, {})]),
                                      ("XLA Ops", [("while.3", 0, 10 * us, {}), ("fusion.7", 1 * us, 4 * us, {}),
                                                   ("all-gather.2", 6 * us, 1 * us, {}),
                                                   ("copy.5", 10 * us, 2 * us, {})])])
    mega = _plane(3, "/device:CUSTOM:Megascale Trace", [])
    host = _plane(4, "/host:CPU", [("python", [("train", 0, 9 * us, {"step_num": "5"})]),
                                   ("thunks", [("dot.9", 0, 7 * us, {"hlo_op": "dot.9", **module})])])
    path = tmp_path / "trace.xplane.pb"
    path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(" ".join([gpu, tpu, mega, host])))

    rows, facts = profiling.op_times(str(path))
    got = {r["op"]: (r["module"], r["calls"], round(r["seconds"] * 1e6, 6), r["kind"]) for r in rows}
    assert got == {"dot.1": ("jit_train_step", 2, 4.0, "matmul"),
                   "custom-call.4": ("jit_train_step", 1, 2.0, "attention"),
                   "while.3": ("jit_train_step", 1, 5.0, "other"), "fusion.7": ("jit_train_step", 1, 4.0, "other"),
                   "copy.5": ("jit_train_step", 1, 2.0, "copy"),
                   "all-gather.2": ("jit_train_step", 1, 1.0, "collective")}
    assert facts == {"planes": ["/device:GPU:0", "/device:TPU:0"], "devices": 2, "steps": [5]}


def test_a_cpu_loop_thunk_counts_its_own_time_not_its_body(tmp_path):
    """XLA:CPU runs a while loop's body thunks inside the loop's own thunk, on the same thread: the loop counts
    the time its body's thunks do not cover (10 us less 3 + 4); a thunk on another thread is its own."""
    us, module = 1_000_000, {"hlo_module": "jit_train_step", "device_ordinal": "0"}
    host = _plane(1, "/host:CPU", [
        ("tf_XLAEigen/1", [("while.3", 0, 10 * us, {"hlo_op": "while.3", **module}),
                           ("ynn_fusion.1", 1 * us, 3 * us, {"hlo_op": "ynn_fusion.1", **module}),
                           ("add_fusion.2", 5 * us, 4 * us, {"hlo_op": "add_fusion.2", **module}),
                           ("copy.4", 10 * us, 1 * us, {"hlo_op": "copy.4", **module})]),
        ("tf_XLAEigen/2", [("ynn_fusion.1", 2 * us, 5 * us, {"hlo_op": "ynn_fusion.1", **module})])])
    path = tmp_path / "cpu.xplane.pb"
    path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(host))
    rows, facts = profiling.op_times(str(path))
    assert {r["op"]: (r["calls"], round(r["seconds"] * 1e6, 6)) for r in rows} == {
        "while.3": (1, 3.0), "ynn_fusion.1": (2, 8.0), "add_fusion.2": (1, 4.0), "copy.4": (1, 1.0)}
    assert facts["planes"] == ["/host:CPU"] and facts["devices"] == 1


def test_a_gpu_command_buffer_is_split_by_kernel(tmp_path):
    """XLA:GPU runs a loop body as one command buffer (a CUDA graph) whose kernels all name it as their operation:
    each kernel is its own row there, with its own kind, not the first kernel's (a decode step read as 99% copy)."""
    us, module = 1_000_000, {"hlo_module": "jit__decode"}
    buffer = {"hlo_op": "command_buffer_24", **module}
    gpu = _plane(1, "/device:GPU:0", [("Stream #13(Kernel)", [
        ("memcpy128", 0, 1 * us, buffer), ("sm90_xmma_gemm_bf16", 1 * us, 6 * us, buffer),
        ("loop_add_fusion", 7 * us, 2 * us, buffer), ("sm90_xmma_gemm_bf16", 9 * us, 6 * us, buffer),
        ("memcpy128", 15 * us, 1 * us, buffer), ("copy_3", 16 * us, 1 * us, {"hlo_op": "copy.3", **module})])])
    path = tmp_path / "gpu.xplane.pb"
    path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(gpu))
    rows, _ = profiling.op_times(str(path))
    got = {(r["op"], r["kernel"]): (r["calls"], round(r["seconds"] * 1e6, 6), r["kind"]) for r in rows}
    assert got == {("command_buffer_24", "sm90_xmma_gemm_bf16"): (2, 12.0, "matmul"),
                   ("command_buffer_24", "memcpy128"): (2, 2.0, "copy"),
                   ("command_buffer_24", "loop_add_fusion"): (1, 2.0, "other"),
                   ("copy.3", "copy_3"): (1, 1.0, "copy")}


def test_self_times_on_a_line_add_up_to_the_time_it_was_busy(tmp_path):
    """On a TPU's XLA Ops line an operation may start before the one that spans it ends and run past its end: the
    spanning one loses only the overlap. Each line's self times then add up to the wall time it was busy (0-14 us
    and 20-23 us here), the union of its events."""
    us = 1_000_000
    tpu = _plane(1, "/device:TPU:0", [("XLA Modules", [("jit_train_step(1)", 0, 30 * us, {})]),
                                      ("XLA Ops", [("while.1", 0, 10 * us, {}), ("fusion.2", 2 * us, 3 * us, {}),
                                                   ("fusion.3", 8 * us, 6 * us, {}), ("copy.4", 20 * us, 3 * us, {})])])
    path = tmp_path / "tpu.xplane.pb"
    path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(tpu))
    rows, _ = profiling.op_times(str(path))
    assert sum(r["seconds"] for r in rows) * 1e6 == pytest.approx(14 + 3)
    assert {r["op"]: round(r["seconds"] * 1e6, 6) for r in rows} == {"while.1": 5.0, "fusion.2": 3.0,
                                                                      "fusion.3": 6.0, "copy.4": 3.0}


def test_derived_lines_that_name_their_operations_are_not_counted_again(tmp_path):
    """xprof's derived lines (XLA Ops, XLA Modules, Steps, Framework Ops, ...) repeat the time of a GPU's kernels;
    where their events carry hlo_op too, only the kernels' own stream line counts: the op's time is its kernels'."""
    us, named = 1_000_000, {"hlo_op": "dot.1", "hlo_module": "jit_train_step"}
    gpu = _plane(1, "/device:GPU:0", [("Stream #13(Kernel)", [("sm90_xmma_gemm_bf16", 0, 3 * us, named)])]
                 + [(line, [("dot.1", 0, 3 * us, named)]) for line in profiling.DERIVED_LINES])
    path = tmp_path / "gpu.xplane.pb"
    path.write_bytes(jax.profiler.ProfileData.text_proto_to_serialized_xspace(gpu))
    rows, _ = profiling.op_times(str(path))
    assert [(r["op"], r["calls"], round(r["seconds"] * 1e6, 6)) for r in rows] == [("dot.1", 1, 3.0)]


def test_only_process_0_traces(monkeypatch, tmp_path):
    """Every process runs the loop's TraceWindow, and only process 0 writes a trace (the module's docstring): a
    pod's every host tracing into one shared workdir wrote N traces of the same steps."""
    calls = []
    monkeypatch.setattr(jax.profiler, "start_trace", lambda logdir: calls.append(("start", logdir)))
    monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
    monkeypatch.setattr(profiling, "newest_trace", lambda path: path)
    for process in (1, 0):
        monkeypatch.setattr(jax, "process_index", lambda: process)
        window = profiling.TraceWindow(2, 1, str(tmp_path))
        for step in (1, 2, 3):
            window.before(step)
            window.after(step, None)
        window.close()
        assert calls == ([] if process else [("start", str(tmp_path)), ("stop",)]), process


def test_a_top_below_1_is_refused(tmp_path):
    """--top=-3 listed every operation but the last 3 (rows[:-3]), and --top=0 an empty table, without a word."""
    for top in (0, -3):
        with pytest.raises(SystemExit) as exit_:
            profiling.main([str(tmp_path), f"--top={top}"])
        assert exit_.value.code == f"error: --top={top}: must be at least 1"
