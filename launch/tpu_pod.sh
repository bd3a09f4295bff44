#!/usr/bin/env bash
# Zephyr on a Cloud TPU pod slice: create the VM, install zephyr_jax on every worker, run the same command on all.
#
#   TPU_NAME=zephyr ZONE=us-central2-b ACCELERATOR=v4-64 launch/tpu_pod.sh create
#   TPU_NAME=zephyr ZONE=us-central2-b launch/tpu_pod.sh install
#   HF_TOKEN=hf_... TPU_NAME=zephyr ZONE=us-central2-b launch/tpu_pod.sh login   (Mistral-7B-v0.1 is gated)
#   TPU_NAME=zephyr ZONE=us-central2-b launch/tpu_pod.sh run -- --config=configs/sft.py --workdir=/mnt/shared/sft
#   TPU_NAME=zephyr ZONE=us-central2-b launch/tpu_pod.sh logs [WORKER] | wait | stop
#   TPU_NAME=zephyr ZONE=us-central2-b launch/tpu_pod.sh export -- --workdir=/mnt/shared/dpo --out=/mnt/shared/hf
#   TPU_NAME=zephyr ZONE=us-central2-b launch/tpu_pod.sh delete
#
# `run` shows every worker's output and returns with the job's exit status, but the job does not depend on the ssh
# sessions: each worker's trainer runs in its own session (setsid, nohup; output in ~/zephyr_train.log), so a
# dropped connection or a closed laptop leaves it training. Then `logs` follows worker 0's log again (`logs 3`:
# worker 3's; an error found on one worker is printed there, and the others may end in an abort dump), `wait`
# returns when every worker's trainer has exited (before starting dDPO on dSFT's workdir), and `stop` sends them
# SIGTERM: the run saves a checkpoint at the same step everywhere and exits with status 75 (not finished).
# `export` runs `python -m zephyr_jax.export` on worker 0 alone: it reads the weights into host memory, and starts
# no TPU (a lone process would wait for the slice's other hosts).
# Every worker runs `python -m zephyr_jax.train --distributed ...`; jax.distributed.initialize() finds the other
# workers through the TPU metadata. The workdir must be visible to every worker (Filestore/NFS, or GCSFuse).
# The TPU VM images run Python 3.10 and current JAX needs 3.11: `install` makes a Python 3.11 environment with uv
# (~/zephyr_venv, VENV overrides) and `run` uses it.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
ACCELERATOR=${ACCELERATOR:-v4-64}
case "$ACCELERATOR" in  # Cloud TPU's software version for JAX on each generation (its "TPU software versions" page)
  v6e-*) default_version=v2-alpha-tpuv6e ;;
  v5p-*) default_version=v2-alpha-tpuv5 ;;
  v5litepod-*|v5e-*) default_version=v2-alpha-tpuv5-lite ;;
  *) default_version=tpu-ubuntu2204-base ;;  # v4 and older
esac
VERSION=${VERSION:-$default_version}
REPO=${REPO:-https://github.com/zephyr-jax/zephyr_jax.git}  # or your fork
VENV=${VENV:-\$HOME/zephyr_venv}  # expanded on the workers
LOG='$HOME/zephyr_train.log'  # each worker's trainer output (expanded on the workers)
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$1"; }
# The trainers, by their command line's start: not `run`'s remote shell, whose command line holds theirs (`stop`
# killed it, so an attached `run` lost the job's exit status), nor `wait`'s or `stop`'s own.
TRAINER='^[^ ]*python[0-9.]* -m zephyr_jax[.]train --distributed'

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" --accelerator-type "$ACCELERATOR" --version "$VERSION" ;;
  install)
    steps=("set -e" "export PATH=\$HOME/.local/bin:\$PATH"
           "command -v uv >/dev/null || curl -LsSf https://astral.sh/uv/install.sh | sh"
           "[ -d zephyr_jax ] || git clone $REPO zephyr_jax" "cd zephyr_jax" "git pull"
           "[ -x $VENV/bin/python ] || uv venv -p 3.11 $VENV" "uv pip install -p $VENV/bin/python -e '.[tpu]'")
    ssh_all "$(IFS=';'; echo "${steps[*]}")" ;;
  login)  # the Hugging Face token into each worker's token file (huggingface_hub reads it; mode 600): not into
    # `run`'s command line, where every worker's process list would show it for the whole run
    : "${HF_TOKEN:?set HF_TOKEN (a Hugging Face token with access to the gated mistralai/Mistral-7B-v0.1)}"
    token=$(printf %q "$HF_TOKEN")
    # (removed first: a file there before, written by hand or by an older huggingface-cli login, keeps its mode)
    file='$HOME/.cache/huggingface/token'
    ssh_all "umask 077 && mkdir -p \$HOME/.cache/huggingface && rm -f $file && printf %s $token >$file" ;;
  run)
    shift; [[ "${1:-}" == "--" ]] && shift
    args=""; (( $# == 0 )) || args=$(printf ' %q' "$@")  # (no arguments: nothing, not printf's lone '')
    train="$VENV/bin/python -m zephyr_jax.train --distributed$args"
    follow="pid=\$! && tail -n +1 -f --pid=\$pid $LOG && wait \$pid"  # its output, then its exit status
    # The log is emptied before the trainer starts: tail must neither find it missing (and end, losing the exit
    # status) nor show the previous run's lines. Not while a trainer runs (a `run` again after a dropped
    # connection, for `wait`): its log would be emptied and a second trainer would find the TPUs taken.
    busy="a trainer is running on \$(hostname): launch/tpu_pod.sh wait (or stop) first"
    idle="if pgrep -f '$TRAINER' >/dev/null; then echo \"$busy\" >&2; exit 1; fi"
    ssh_all "cd zephyr_jax && $idle && : >$LOG && { setsid -w nohup $train >>$LOG 2>&1 </dev/null & } && $follow" ;;
  logs)
    worker=${2:-0}
    [[ "$worker" =~ ^[0-9]+$ ]] || { echo "logs takes a worker number (0, 1, ...), not '$worker'" >&2; exit 2; }
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker="$worker" --command "tail -n 100 -f $LOG" ;;
  wait)
    ssh_all "while pgrep -f '$TRAINER' >/dev/null; do sleep 30; done" ;;
  stop)
    ssh_all "pkill -TERM -f '$TRAINER' || true" ;;
  export)
    shift; [[ "${1:-}" == "--" ]] && shift
    args=""; (( $# == 0 )) || args=$(printf ' %q' "$@")
    gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=0 \
      --command "cd zephyr_jax && $VENV/bin/python -m zephyr_jax.export$args" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone "$ZONE" --quiet ;;
  *)
    echo "usage: launch/tpu_pod.sh create|install|login|run -- TRAIN_ARGS|logs [WORKER]|wait|stop|export -- EXPORT_ARGS|delete" >&2; exit 2 ;;
esac
