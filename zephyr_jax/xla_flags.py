"""XLA flags for training on NVIDIA GPUs, in one place: launch/slurm_gpu.sbatch exports them, and the planner
compiles for GPU topologies under them, so what it plans is the program the job runs (they change its memory:
with them XLA keeps collectives in flight beside the layers' compute).

    python -m zephyr_jax.xla_flags        # prints them, space-separated, for XLA_FLAGS

MaxText's set for GPUs (shared PERFORMANCE.md): overlap the FSDP all-gathers and reduce-scatters with the layers'
compute (latency-hiding scheduler, pipelined and combined collectives), cuBLAS rather than Triton GEMMs, no CUDA
graphs, and no XLA rematerialization beside the config's own remat.
"""

GPU = (
    "--xla_gpu_enable_latency_hiding_scheduler=true",
    "--xla_gpu_enable_triton_gemm=false",
    "--xla_gpu_enable_command_buffer=",
    "--xla_gpu_enable_highest_priority_async_stream=true",
    "--xla_gpu_all_reduce_combine_threshold_bytes=134217728",
    "--xla_gpu_all_gather_combine_threshold_bytes=134217728",
    "--xla_gpu_reduce_scatter_combine_threshold_bytes=67108864",
    "--xla_gpu_enable_pipelined_all_gather=true",
    "--xla_gpu_enable_pipelined_reduce_scatter=true",
    "--xla_gpu_enable_pipelined_all_reduce=true",
    "--xla_gpu_enable_while_loop_double_buffering=true",
    "--xla_disable_hlo_passes=rematerialization",
)

if __name__ == "__main__":
    print(" ".join(GPU))
