#!/usr/bin/env bash
# Issue 26 on one lent GPU, in ONE device call, most important first, within DEADLINE seconds (480) of steps:
#   1. the GPU halves of the tests (CUDA graphs, the step guard's deferred check, no host syncs), <= 90 s;
#   2. the step table, ViT-S/16 batch 64: plain timm eager / torch.compile reduce-overhead / default vs D2FT
#      budget 1.0 and 0.6 (per-block CUDA graphs), then one profiled step of budget 0.6 vs plain timm (best);
#   3. the same table for ViT-B/16 batch 64 (eager and the ViT-S table's fastest compile mode);
#   4. the Lightning fine-tunes on Fashion-MNIST at 224 px, batch 64: budget 1.0, 0.6, plain timm (best);
#   5. the same at batch 256, if time is left.
# Each step runs under `timeout` (its cap, or what is left of DEADLINE: a step with under 30 s left is skipped);
# every row is written as soon as it is measured. Everything printed goes to $OUT/session.log; results to
# $OUT/gpu_fit_real.json (rows + targets_met), $OUT/gpu_profile.json, $OUT/tests.log (4 files; copy what you
# keep to benchmarks/results/gpu/ by hand). The device has torch, timm, lightning, torchmetrics, no network:
# the data travel as files, prepared here first:
#     PYTHONPATH=. python benchmarks/gpu/fit_real.py prepare         # -> .gpu_data/ (ignored, ~6 MiB)
#     run(command="OUT=$OUT bash benchmarks/gpu/session.sh", carry=[".gpu_data"], timeout_s=560)  # the device tool
#     OUT=/tmp/gpu_smoke PY=.venv/bin/python bash benchmarks/gpu/session.sh --smoke   # the CPU rehearsal
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=$(mkdir -p "${OUT:-/tmp/gpu_session}" && cd "${OUT:-/tmp/gpu_session}" && pwd)
PY=${PY:-python3}
MODE=${1:-}
LOG="$OUT/session.log"
FIT=benchmarks/gpu/fit_real.py
if [ "$MODE" = "--smoke" ]; then SMOKE=--smoke; DEADLINE=${DEADLINE:-1500}; CAPX=5   # a busy 2-core CPU
else SMOKE=; DEADLINE=${DEADLINE:-480}; CAPX=1; fi
T0=$SECONDS
rm -f "$OUT/gpu_fit_real.json" "$OUT/gpu_profile.json" "$OUT/tests.log"; : > "$LOG"  # this session's files only

# step NAME CAP CMD...: run CMD under timeout min(CAP x CAPX, time left), its output (less noise) into the log
step() {
  local name=$1 cap=$(( $2 * CAPX )) left=$(( DEADLINE - (SECONDS - T0) )) start=$SECONDS rc; shift 2
  if (( left < 30 )); then echo "=== $name: SKIPPED, ${left} s left of ${DEADLINE}" | tee -a "$LOG"; return; fi
  (( cap > left )) && cap=$left
  echo "=== $name (timeout ${cap} s, at $(( SECONDS - T0 )) s): $*" | tee -a "$LOG"
  timeout -k 5 "$cap" "$@" 2>&1 | grep --line-buffered -v -E '^\s*$|^USDT:|gpuGetDeviceCount|litlogger|LeafSpec' \
    | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "=== $name: rc $rc$( (( rc == 124 || rc == 137 )) && echo ' (TIMED OUT)') after $(( SECONDS - start )) s" \
    | tee -a "$LOG"
}

step versions 30 $PY -c "import torch, timm, lightning, torchmetrics; print('torch', torch.__version__, 'timm', \
timm.__version__, 'lightning', lightning.__version__, 'torchmetrics', torchmetrics.__version__, 'cuda', \
torch.cuda.is_available())"
[ -z "$SMOKE" ] && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee -a "$LOG"
if [ ! -f .gpu_data/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ -n "$SMOKE" ]; then step prepare 60 $PY $FIT prepare
  else echo "NO DATA: .gpu_data/fashion-mnist is missing; prepare it and pass carry=[\".gpu_data\"]" | tee -a "$LOG"; fi
fi
# 1. exactness first (each skips without a GPU)
step tests 90 bash -c "set -o pipefail; $PY -m pytest -q -rs -p no:cacheprovider tests/unit/model/test_cuda_graphs.py \
tests/unit/strategy/test_step_guard.py tests/integration/test_host_syncs.py 2>&1 | tee '$OUT/tests.log'"
# 2.-3. the step tables (ViT-B compiles only the mode that won for ViT-S), the profile after ViT-S's rows
step steps-vit-s 170 $PY $FIT steps $SMOKE --model vit_small_patch16_224 --batch 64 --profile --out "$OUT"
step steps-vit-b 110 $PY $FIT steps $SMOKE --model vit_base_patch16_224 --batch 64 --modes auto --out "$OUT"
# 4.-5. the Lightning fine-tunes on real data
step fit-b64 150 $PY $FIT fit $SMOKE --batch 64 --out "$OUT"
step fit-b256 120 $PY $FIT fit $SMOKE --batch 256 --out "$OUT"
echo "=== summary" | tee -a "$LOG"   # outside DEADLINE: a reprint of the JSON, a few seconds
timeout 30 $PY $FIT show --out "$OUT" 2>&1 | tee -a "$LOG"
echo "gpu session done after $(( SECONDS - T0 )) s" | tee -a "$LOG"
