#!/usr/bin/env bash
# N training processes on this machine, joined through jax.distributed over localhost: the same code path as a
# multi-host GPU cluster or TPU pod, for testing and for machines with several accelerators.
#
#   launch/local.sh NUM_PROCESSES [--cpu_devices=K] -- --config=configs/sft.py:tiny --workdir=DIR [...]
#
# --cpu_devices=K gives each process K simulated CPU devices (no accelerator needed). Otherwise, on a machine with
# NVIDIA GPUs, each process gets its own share of them (CUDA_VISIBLE_DEVICES; NUM_PROCESSES must divide the GPUs).
# Process 0 prints to the terminal; process i logs to $LOG_DIR/process_i.log (default: a temporary directory).
# SIGTERM/SIGINT is passed on to every process (each saves and exits with status 75, as train does when stopped
# early), and the script waits for all of them. It fails (1) if any process fails, else exits 75 if any stopped early.
# COORDINATOR_PORT=P: the coordinator's port (default: a free one, picked below); a port in use is refused.
set -euo pipefail
usage="usage: launch/local.sh NUM_PROCESSES [--cpu_devices=K] -- TRAIN_ARGS"
num_processes=${1:?$usage}
shift
if ! [[ $num_processes =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES=$num_processes is not a positive number; $usage" >&2; exit 2
fi
cpu_devices=""
while [[ $# -gt 0 && "$1" != "--" ]]; do
  case "$1" in
    --cpu_devices=*) cpu_devices="${1#*=}" ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
[[ "${1:-}" == "--" ]] && shift
if [[ -n "$cpu_devices" ]] && ! [[ $cpu_devices =~ ^[1-9][0-9]*$ ]]; then  # XLA crashes on 0 or text
  echo "--cpu_devices=$cpu_devices is not a positive number; $usage" >&2; exit 2
fi
# The coordinator's port. A port in use crashes process 0's coordinator (gRPC cannot bind it) while the others wait
# for it until JAX's initialization times out, minutes later. So: one nothing on this machine listens on, below
# Linux's ephemeral range (32768 up), where the kernel takes ports for outgoing connections.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [[ -n "${COORDINATOR_PORT:-}" ]]; then
  port=$COORDINATOR_PORT
  if port_in_use "$port"; then
    echo "COORDINATOR_PORT=$port is in use on this machine: name another, or unset it for a free one" >&2; exit 2
  fi
else
  for _ in {1..100}; do port=$((20000 + RANDOM % 12000)); port_in_use "$port" || break; done
fi
log_dir=${LOG_DIR:-$(mktemp -d)}
mkdir -p "$log_dir"  # else process 1 could not start, and process 0 waited for it until the coordinator timed out
gpu_ids=()  # the GPUs to split: CUDA_VISIBLE_DEVICES's when set, else every GPU nvidia-smi lists
if [[ -n "$cpu_devices" ]]; then
  # the caller's XLA_FLAGS kept (a dump, a debug flag), the device count last: XLA takes a repeated flag's last value
  export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$cpu_devices"
elif [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then  # set: these GPUs only ("", -1 or SLURM's NoDevFiles: none)
  [[ "$CUDA_VISIBLE_DEVICES" =~ ^(-1|NoDevFiles)?$ ]] || IFS=, read -ra gpu_ids <<< "$CUDA_VISIBLE_DEVICES"
elif command -v nvidia-smi >/dev/null; then
  n=$(nvidia-smi -L | grep -c '^GPU' || true)
  (( n )) && IFS=, read -ra gpu_ids <<< "$(seq -s, 0 $((n - 1)))"
fi
gpus=${#gpu_ids[@]}
if (( gpus % num_processes )); then
  echo "$num_processes processes do not split the $gpus GPUs (${gpu_ids[*]}) evenly" >&2; exit 2
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  cmd=(python -m zephyr_jax.train --coordinator_address="localhost:$port" --num_processes="$num_processes"
       --process_id="$i" "$@")
  if (( gpus )); then  # process i: the i-th k of the GPUs (without this every process would take every GPU)
    per=$((gpus / num_processes))
    mine=("${gpu_ids[@]:$((i * per)):$per}")
    # (without SLURM_LOCALID: inside a SLURM allocation, JAX would take it for one GPU a process and keep only
    # the first of these)
    cmd=(env -u SLURM_LOCALID CUDA_VISIBLE_DEVICES="$(IFS=,; echo "${mine[*]}")" "${cmd[@]}")
  fi
  if [[ $i -eq 0 ]]; then
    "${cmd[@]}" &
  else
    "${cmd[@]}" >"$log_dir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
status=0
for i in "${!pids[@]}"; do
  while :; do
    rc=0
    wait "${pids[$i]}" || rc=$?
    # A signal trapped above interrupts `wait` (status > 128) while the process still runs (saving): wait again.
    if (( rc > 128 )) && kill -0 "${pids[$i]}" 2>/dev/null; then continue; fi
    break
  done
  if (( rc == 75 )); then  # train's PREEMPTED_EXIT_CODE: saved and stopped early
    echo "process $i stopped early after saving (status 75): the same command resumes" >&2
    (( status == 1 )) || status=75
  elif (( rc )); then
    where=$([[ $i -eq 0 ]] && echo "its output is above" || echo "log: $log_dir/process_$i.log")
    echo "process $i failed with status $rc ($where)" >&2
    status=1
  fi
done
exit $status
