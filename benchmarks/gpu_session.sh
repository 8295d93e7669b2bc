#!/usr/bin/env bash
# Everything issue 14 measures on a lent GPU, in one command (the device machine has torch, timm and lightning,
# no ortools/hydra/scikit-learn: the library runs from the tree with solver="dp"). Everything goes to $OUT only
# (never over benchmarks/results/: copy what you keep by hand): session.log (every step's printout, in order),
# gpu.txt and one JSON per benchmark, 6 files (the device tool brings back at most 8).
#     bash benchmarks/gpu_session.sh            # on the GPU machine (OUT set by the device tool)
#     bash benchmarks/gpu_session.sh --recheck  # exactness again, then the fits at batch 64 and 256 (shorter)
#     OUT=/tmp/gpu PY=.venv/bin/python bash benchmarks/gpu_session.sh --smoke   # a tiny CPU rehearsal
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=$(mkdir -p "${OUT:-/tmp/gpu_session}" && cd "${OUT:-/tmp/gpu_session}" && pwd)
PY=${PY:-python3}
MODE=${1:-}
LOG="$OUT/session.log"
# step NAME LINES CMD...: run CMD, keep its last LINES non-blank lines in session.log (and print them)
step() { local name=$1 lines=$2; shift 2; echo "=== $name: $*" | tee -a "$LOG"
         "$@" 2>&1 | grep -v "^\s*$" | tail -"$lines" | tee -a "$LOG"; }

step versions 1 $PY -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)"
if [ "$MODE" = "--smoke" ]; then
  OPS="--img-size 32 --batch 2 --steps 1"; FIT="--accelerator cpu --img-size 32 --batch 8 --samples 32 --epochs 1 --precision 32-true"
else
  OPS="--steps 20"; FIT=""
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
fi
# exactness first: CUDA-graph replay against the eager model, the deferred NaN check's CUDA path, no host sync
# of ours in steady-state steps (all skipped without a GPU)
step gpu-tests 25 timeout 150 $PY -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graphs.py \
  tests/unit/test_guards.py tests/integration/test_host_syncs.py
# the fits with CUDA graphs, most important first (one device call runs at most 600 s):
# 1. the default (NaN check read a step late), with a plain-loop row per budget (what Lightning adds per step)
step gpu-fit 8 timeout 200 $PY benchmarks/gpu_fit.py $FIT --executors graphs --bare --out "$OUT/gpu_fit.json"
[ "$MODE" = "--recheck" ] && {
  step gpu-fit-b256 8 timeout 200 $PY benchmarks/gpu_fit.py --executors graphs --bare --batch 256 --samples 5120 \
    --out "$OUT/gpu_fit_b256.json"
  echo "gpu recheck done"; exit 0; }
# 2. one op pattern per micro-batch, hence one capture each, as real data give (random data give d2ft few)
step gpu-fit-random 8 timeout 150 $PY benchmarks/gpu_fit.py $FIT --executors graphs --method random \
  --out "$OUT/gpu_fit_random.json"
# 3. the NaN check read at once (one host sync a step, the old behaviour)
step gpu-fit-at-once 8 timeout 150 $PY benchmarks/gpu_fit.py $FIT --executors graphs --nonfinite-check at-once \
  --out "$OUT/gpu_fit_at_once.json"
# 4. the step benchmark of issue 14 (ratios to plain timm), with a profile of one step
step ops-cost 60 timeout 200 $PY benchmarks/speed/ops_cost.py --device cuda --amp bf16 $OPS --profile \
  --out "$OUT/ops_cost_cuda.json"
echo "gpu session done" | tee -a "$LOG"
