#!/usr/bin/env bash
# Issue 13's GPU measurements as one prepared run: parity, training throughput against TRL, full-parameter 7B
# DPO on one GPU, decoding against the bandwidth bound. Each stage has its own time limit and log, so one that
# fails or runs long leaves the others' figures; the tables come last.
#
#   bash bench/gpu_issue13.sh wheels          here, before the device calls: fetch the wheels the GPU machine lacks
#   bash bench/gpu_issue13.sh [STAGE ...]     stages, most important first: env parity dpo7b decode profile remat
#                                             trl trl_none flags (default: all, in that order; profile: the train
#                                             stage's 1B steps, then their kernel time by XLA operation; remat: the
#                                             1B steps without remat, layers unrolled, and SFT's with save_dots;
#                                             trl_none: trl without remat on either side; flags: the 1B steps
#                                             under launch/slurm_gpu.sbatch's XLA flags); on request: train (the
#                                             1B steps alone), logsoftmax (bench/log_softmax.py at the 1B model's
#                                             head shapes)
#   bash bench/gpu_issue13.sh resume          the default stages this machine has not started yet, or that the
#                                             budget cut short (a part skipped, or stopped before its limit)
#   SMOKE=1 bash bench/gpu_issue13.sh ...     tiny shapes: checks the script on a CPU
#
# BUDGET_S=N: the seconds this call may take. A stage starts only when what is left covers its usual length (NEED
# below), and runs until its own limit or the budget's end; summary.md lists the stages skipped for time, and
# `resume` runs them. The device tool gives a session 15 minutes of device time, the machine's start included, and
# 10 minutes a command; the machine stays warm 30 s after a call (then a fresh start costs minutes). So, carrying
# [".whl"], one long call, then at once (inside those 30 s) a second if the first reply's lease.budget_left_s
# allows one (LEFT: that figure minus 45):
#   BUDGET_S=540 bash bench/gpu_issue13.sh              timeout_s 570
#   BUDGET_S=$LEFT bash bench/gpu_issue13.sh resume     timeout_s LEFT + 20 (at most 600: LEFT at most 570)
#
# Logs go to $OUT (the device tool's folder; default /tmp/gpu_issue13): one per stage (remat, flags and
# logsoftmax write into train.log, trl_none into trl.log) plus summary.md, 8 files at most (all that comes back).
# Wheels in .whl/ (WHEELS below) are installed into /tmp/site first when present.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)  # BUDGET_S counts from here, the wheels' install included

# What the GPU machine's image (Python 3.12, jax 0.11.2, torch 2.11, transformers 5.17) lacks: trl and datasets
# (with dill, multiprocess) for the TRL side, ml_collections for the configs; flax 0.12.10 because flax 0.12.8 and
# 0.12.9 fail to import under jax 0.11.2 (jax.experimental.hijax has no HiPrimitive there).
WHEELS="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ml_collections==1.1.0 flax==0.12.10"
if [ "${1:-}" = wheels ]; then
  mkdir -p .whl && rm -f .whl/*.whl  # an older wheel of one package beside the new one fails the whole install
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
  for w in $WHEELS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "$w"
  done
  ls -la .whl; exit
fi
OUT=${OUT:-/tmp/gpu_issue13}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# JAX takes 75% of a GPU's memory at start by default; the 7B run needs nearly all of it.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
# One compilation cache for every stage: a program two stages share, or a rerun on a warm machine, compiles once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/zephyr_jax_xla_cache}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .whl/*.whl; then
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  elif "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))'; then
    echo "error: the wheels in .whl/ did not install on the GPU machine's Python 3.12; every stage needs them"
    exit 3
  else  # another Python (a CPU check): its own packages must do
    echo "warning: the wheels in .whl/ did not install for $("$PY" --version); continuing without them"
  fi
fi

# Model shapes. ONE_B: a ~1.0B Mistral (16 layers, hidden 2048, GQA 16/4, head 128, 32,000 vocabulary).
# SEVEN_B: Mistral-7B-v0.1 (7.24B parameters).
arch() {  # hidden intermediate layers heads kv_heads -> --config.model.arch.* flags
  echo "--config.model.init=random --config.model.arch.vocab_size=32000 --config.model.arch.hidden_size=$1" \
       "--config.model.arch.intermediate_size=$2 --config.model.arch.num_hidden_layers=$3" \
       "--config.model.arch.num_attention_heads=$4 --config.model.arch.num_key_value_heads=$5" \
       "--config.model.arch.max_position_embeddings=4096 --config.model.arch.sliding_window=4096"
}
trl_arch() { echo "--hidden=$1 --intermediate=$2 --layers=$3 --heads=$4 --kv-heads=$5"; }
if [ "${SMOKE:-0}" = 1 ]; then
  ONE_B="256 768 2 4 2"; SEVEN_B="256 768 2 4 2"
  SFT_BATCH=2; SFT_LEN=256; DPO_BATCH=4; TRL_BATCH=2; DPO_LEN=128; STEPS=2; WARM=1
  DECODE_KV=128,256; REQUESTS=4; NEW_TOKENS=16; TORCH_DEVICE=cpu; DECODE_ARCH=small
  PARITY_LIMIT=420  # the parity model keeps its GPU size: 172 s alone on 2 CPU cores (2026-12-04)
else
  ONE_B="2048 7168 16 16 4"; SEVEN_B="4096 14336 32 32 8"
  SFT_BATCH=16; SFT_LEN=2048; DPO_BATCH=32; TRL_BATCH=8; DPO_LEN=512; STEPS=5; WARM=2
  DECODE_KV=1024; REQUESTS=64; NEW_TOKENS=256; TORCH_DEVICE=cuda; DECODE_ARCH=7b
  PARITY_LIMIT=240  # 180 ran out on 2026-12-04 (after the attention checks)
fi

SUMMARY="$OUT/summary.md"
# The stages this machine has started and the budget did not cut (resume skips); STARTED=FILE: another file (a
# test's, which must not touch the real one)
STARTED=${STARTED:-/tmp/gpu_issue13.started}
left() { echo $(( ${BUDGET_S:-86400} - ($(date +%s) - T0) )); }
CUT=0  # set by stage() when the budget's end skipped a part of the current stage or stopped it early
stage() {  # name[:variant] seconds command...: runs it under `timeout` (its seconds or what is left of the
  # budget), appends its output to $OUT/name.log
  local name=$1 log=${1%%:*} seconds=$2 start rc cmd short=0
  shift 2
  cmd="${*:1:3}" && cmd="\`${cmd:0:60} ...\`"
  (( seconds > $(left) - 5 )) && seconds=$(( $(left) - 5 )) && short=1
  if (( seconds < 10 )); then
    echo "| $name | $cmd | skipped: out of time | 0 |" >>"$SUMMARY"
    CUT=1
    return 1
  fi
  start=$(date +%s)
  echo "=== $name: $* (limit ${seconds}s)" | tee -a "$OUT/$log.log"
  timeout --kill-after=10 "$seconds" "$@" 2>&1 | tee -a "$OUT/$log.log"
  rc=${PIPESTATUS[0]}
  echo "| $name | $cmd | $rc | $(( $(date +%s) - start )) |" >>"$SUMMARY"
  (( short && (rc == 124 || rc == 137) )) && CUT=1  # stopped by the budget, not by its own limit
  return "$rc"
}

run_env() {  # the stage's exit is the imports' (then the device query's): a package missing fails it
  stage env 60 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null; $PY -c 'import sys, jax, flax, optax, torch, transformers, ml_collections, datasets, trl; \
    print(sys.version.split()[0], \"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__, \
    \"torch\", torch.__version__, \"transformers\", transformers.__version__, \"trl\", trl.__version__, \
    \"datasets\", datasets.__version__, jax.devices())' \
    && $PY -c 'import torch; p = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None; \
    print(\"device properties (zephyr_jax.compile_targets.GPUS for the planner):\", p, \
    \"L2 bytes\", getattr(p, \"L2_cache_size\", None))'"
}
run_parity() {  # JAX and PyTorch share the GPU in this one: JAX allocates as it goes instead of up front
  stage parity "$PARITY_LIMIT" env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PY" bench/gpu_parity.py --tokens=32
}
train_1b() {  # sft|dpo LABEL [FLAG ...]: bench/throughput.py on the 1B model and the recipe's length mix
  local which=$1 label=$2
  shift 2
  if [ "$which" = sft ]; then  # packed rows: every batch has one shape
    stage "$label" 150 "$PY" bench/throughput.py --config=configs/sft.py $(arch $ONE_B) \
      --config.data.max_length=$SFT_LEN --stage=sft --batch=$SFT_BATCH --batches=4 --warmup=1 "$@"
  else  # one batch of the mix timed over and over: another batch could have another shape, another compile
    stage "$label" 150 "$PY" bench/throughput.py --config=configs/dpo.py $(arch $ONE_B) \
      --stage=dpo --batch=$DPO_BATCH --batches=1 --warmup=1 --repeats=$STEPS "$@"
  fi
}
run_train() {  # zephyr_jax alone on the recipe's length mixes (real tokens/s, MFU)
  train_1b sft train
  train_1b dpo train
}
run_remat() {  # what the configs' full remat costs the 1B steps, which fit on an H200 without it: no remat with
  # the layers unrolled (under the layer scan XLA:GPU copies every saved activation into the scan's stacks: 1B
  # SFT 467 GiB outside the matmuls scanned, 195 unrolled, against full remat's 257; bench/step_traffic.py,
  # RESULTS.md 2026-12-04 (night)), then save_dots (scanned: 291 GiB)
  train_1b sft train:remat_none_unrolled --config.model.remat=none --config.model.scan_layers=False
  train_1b dpo train:remat_none_unrolled --config.model.remat=none --config.model.scan_layers=False
  train_1b sft train:remat_save_dots --config.model.remat=save_dots
}
SBATCH_XLA_FLAGS=unread
sbatch_xla_flags() {  # SBATCH_XLA_FLAGS: launch/slurm_gpu.sbatch's XLA flags (MaxText's), or none where this jax
  # refuses one of them (XLA stops at an unknown flag); read and tried once a call of this script
  if [ "$SBATCH_XLA_FLAGS" = unread ]; then
    SBATCH_XLA_FLAGS=$("$PY" -m zephyr_jax.xla_flags)
    XLA_FLAGS=$SBATCH_XLA_FLAGS timeout 120 "$PY" -c "import jax; jax.devices()" >/dev/null 2>&1 || SBATCH_XLA_FLAGS=""
  fi
  echo "XLA_FLAGS of launch/slurm_gpu.sbatch: ${SBATCH_XLA_FLAGS:-(none: this jax refused them)}"
}
run_flags() {  # the 1B steps under launch/slurm_gpu.sbatch's XLA flags, against `train`/`profile`
  sbatch_xla_flags >>"$OUT/train.log"
  [ -n "$SBATCH_XLA_FLAGS" ] || return 0  # without them the steps are the profile stage's
  XLA_FLAGS=$SBATCH_XLA_FLAGS train_1b sft train:xla_flags
  XLA_FLAGS=$SBATCH_XLA_FLAGS train_1b dpo train:xla_flags
}
run_profile() {  # the train stage's timings, then where the 1B steps' GPU time goes (kernel time by XLA operation
  # and kind), for an MFU below the goal; the traces stay on the machine (they can exceed what comes back), the
  # tables go to profile.log, whose operation rows the closing tables leave out
  train_1b sft profile --profile=/tmp/gpu_issue13_profile
  train_1b dpo profile --profile=/tmp/gpu_issue13_profile
}
run_logsoftmax() {  # optional: what keeping near-certain tokens' log-probs costs (RESULTS.md: 1.5-1.8x on a CPU)
  local shape="--batch=4 --length=$SFT_LEN --embed=${ONE_B%% *} --chunk-size=256"
  stage train:log_softmax 90 "$PY" bench/log_softmax.py $shape
}
run_dpo7b() {  # full parameters: float32 master weights and Adam, precomputed reference log-probs
  # The recipe's 32 pairs first; where that runs out of memory (and only then), the next smallest change: 2
  # micro-batches (float32 Adam kept; planned at 118.2 GiB against 124.3 for one), then Adam's first moment in
  # bf16, then also 16 pairs a step. The table's "XLA GiB" is the planner's figure for the same step
  # (`python -m zephyr_jax.plan --topology=local`), beside the allocator's measured peak.
  # Under launch/slurm_gpu.sbatch's XLA flags, as a job runs (where this jax takes them): without them XLA's own
  # rematerialisation, near the memory limit at 7B, recomputes fusions up to 8 times a layer (compiled for an
  # H200 on a CPU, the 32 pairs: 1,743 against 1,088 GiB a step outside the matmuls, bench/step_traffic.py).
  local flags="--config=configs/dpo.py $(arch $SEVEN_B) --config.dpo.precompute_reference=True" extra batch
  sbatch_xla_flags >>"$OUT/dpo7b.log"
  for variant in "none $DPO_BATCH" "--config.train.grad_accum=2 $DPO_BATCH" \
                 "--config.optim.mu_dtype=bfloat16 $DPO_BATCH" \
                 "--config.optim.mu_dtype=bfloat16 $(( DPO_BATCH / 2 ))"; do
    read -r extra batch <<<"$variant"
    [ "$extra" = none ] && extra=""
    local before
    before=$({ wc -l <"$OUT/dpo7b.log"; } 2>/dev/null || echo 0)
    XLA_FLAGS=$SBATCH_XLA_FLAGS stage dpo7b 240 "$PY" bench/throughput.py $flags $extra --stage=dpo --batch=$batch \
      --batches=1 --warmup=1 --repeats=3 && break
    # Another failure (a kernel error, a NaN, the time limit) would fail every variant the same way.
    tail -n +$(( before + 1 )) "$OUT/dpo7b.log" | grep -qiE 'RESOURCE_EXHAUSTED|out of memory' || break
  done
}
run_decode() {  # one process: batch 1 against the bound, 64 rows, in the platform's cache order at one KV length
  # (each further order or length is a 7B compile), with each layer's weights in buffers of their own (the
  # engine's GPU layout since 2026-12-04) and stacked (before: 30% of the bound); batch 1 traced (3 calls,
  # seconds: how busy the GPU is, where its time goes); then 64 concurrent requests through the engine
  stage decode 240 "$PY" bench/decode_step.py --arch=$DECODE_ARCH --dtype=bfloat16 --rows=1,$REQUESTS \
    --kv=$DECODE_KV --cache-order=platform --layer-weights=own,stacked --no-parts --requests=$REQUESTS \
    --prompt=128 --max-tokens=$NEW_TOKENS --profile=/tmp/gpu_issue13_profile/decode
}
trl_1b() {  # LABEL [FLAG ...]: the same model and batch of fixed-length rows in zephyr_jax and TRL, SFT then DPO,
  # each side in its own process (one example a row and 2,048 positions: not train's packed program, so zephyr_jax
  # compiles again, untimed)
  local label=$1
  shift
  stage "$label" 150 "$PY" bench/trl_side_by_side.py --device=$TORCH_DEVICE --precision=bf16 "$@" --stage=sft \
    --length=$SFT_LEN --batch=$SFT_BATCH --steps=$STEPS --warmup=$WARM --torch-threads=8 $(trl_arch $ONE_B)
  stage "$label" 150 "$PY" bench/trl_side_by_side.py --device=$TORCH_DEVICE --precision=bf16 "$@" --stage=dpo \
    --prompt=$DPO_LEN --completion=$DPO_LEN --batch=$TRL_BATCH --steps=$STEPS --warmup=$WARM --torch-threads=8 \
    $(trl_arch $ONE_B)
}
run_trl() { trl_1b trl; }  # the configs' remat on both sides
# Without remat on either side (zephyr_jax: layers unrolled; TRL: no gradient checkpointing): the 1B model's
# activations fit on an H200.
run_trl_none() { trl_1b trl:none --remat=none; }

# Each stage's usual seconds on an H200 with a cold compilation cache (2026-12-04's summary.md: env 16, train
# 74, trl 128, decode 50; parity and dpo7b ran out of their limits, so these are estimates): a stage starts only
# when this much of the budget is left.
declare -A NEED=([env]=20 [parity]=150 [train]=80 [dpo7b]=150 [decode]=100 [trl]=130 [remat]=150 [flags]=160
                 [trl_none]=130 [logsoftmax]=60 [profile]=110)
# (15 at least: stage() runs nothing with under 15 s left.)
if [ "${SMOKE:-0}" = 1 ]; then for name in "${!NEED[@]}"; do NEED[$name]=15; done; fi
# What 2026-12-04 left unmeasured first (parity, the 7B DPO step), then decoding with the per-layer weights, then
# the training steps again with their profile (the MFU goals were missed), without remat (predicted to meet them),
# TRL with and without remat, and the steps under the sbatch's XLA flags (12-15% less memory traffic outside the
# matmuls, bench/step_traffic.py).
DEFAULT="env parity dpo7b decode profile remat trl trl_none flags"
[ -f "$SUMMARY" ] || printf '| stage | command | exit | seconds |\n|---|---|---|---|\n' >"$SUMMARY"
if [ "${1:-}" = resume ]; then
  set -- $(for name in $DEFAULT; do grep -qx "$name" "$STARTED" 2>/dev/null || echo "$name"; done)
  if [ $# = 0 ]; then echo "resume: every stage of \"$DEFAULT\" has started on this machine"; exit 0; fi
  echo "resume: $* ($(left) s of budget)"
else
  : >"$STARTED"
fi
for s in "${@:-$DEFAULT}"; do
  for name in $s; do
    if [ -z "${NEED[$name]+set}" ]; then  # NEED has one entry per stage (run_NAME)
      echo "unknown stage $name: expected one of ${!NEED[*]}, or resume"; exit 2
    fi
    if (( $(left) < NEED[$name] )); then
      echo "| $name | (not started) | skipped: $(left) s left, it needs about ${NEED[$name]} s | 0 |" >>"$SUMMARY"
      continue
    fi
    echo "$name" >>"$STARTED"  # before it runs: a stage that hangs the machine is not started again
    CUT=0
    "run_$name"
    # A stage the budget cut short (a part skipped, or stopped before its own limit) is resume's to run again.
    (( CUT )) && sed -i "/^$name\$/d" "$STARTED"
  done
done
echo; echo "### tables"  # each stage's rows under its '=== stage: command' line (the flags, the dpo7b try)
grep -h -e '^=== ' -e '^XLA_FLAGS of' -e '^|' -e '^device:' -e '^jax ' -e 'tokens/s' -e 'checks hold' -e 'busy' \
  -e '^kinds:' \
  "$OUT"/parity.log "$OUT"/train.log "$OUT"/profile.log "$OUT"/trl.log "$OUT"/dpo7b.log "$OUT"/decode.log \
  2>/dev/null \
  | grep -v -e '^|---' -e '| jit_' -e '^| operation |' -e '^=== Source Location Trace'  # (a profile's operation
  # rows stay in its log; libtpu's trace lines, where jax[tpu] is installed, are noise)
echo; cat "$SUMMARY"
