#!/usr/bin/env bash
# N training processes on this machine, joined through jax.distributed over localhost: the same code path as a
# multi-host GPU cluster or TPU pod, for testing and for machines with several accelerators.
#
#   launch/local.sh NUM_PROCESSES [--cpu_devices=K] -- --config=configs/sft.py:tiny --workdir=DIR [...]
#
# --cpu_devices=K gives each process K simulated CPU devices (no accelerator needed). Process 0 prints to the
# terminal; process i logs to $LOG_DIR/process_i.log (default: a temporary directory). The script fails if any
# process fails.
set -euo pipefail
num_processes=${1:?usage: launch/local.sh NUM_PROCESSES [--cpu_devices=K] -- TRAIN_ARGS}
shift
cpu_devices=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --cpu_devices=*) cpu_devices="${1#*=}" ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[[ "${1:-}" == "--" ]] && shift
port=${COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
log_dir=${LOG_DIR:-$(mktemp -d)}
if [[ -n "$cpu_devices" ]]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$cpu_devices"
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  cmd=(python -m zephyr_jax.train --coordinator_address="localhost:$port" --num_processes="$num_processes"
       --process_id="$i" "$@")
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
trap 'kill "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed (log: $log_dir/process_$i.log)" >&2
    status=1
  fi
done
exit $status
