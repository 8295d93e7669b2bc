#!/usr/bin/env bash
# Everything issue 14 measures on a lent GPU, in one command (the device machine has torch, timm and lightning,
# no ortools/hydra/scikit-learn: the library runs from the tree with solver="dp"). Logs and JSON go to $OUT
# only (never over benchmarks/results/: copy what you keep by hand).
#     bash benchmarks/gpu_session.sh            # on the GPU machine (OUT set by the device tool)
#     bash benchmarks/gpu_session.sh --recheck  # exactness again, then the fits at batch 64 and 256 (shorter)
#     OUT=/tmp/gpu PY=.venv/bin/python bash benchmarks/gpu_session.sh --smoke   # a tiny CPU rehearsal
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=$(mkdir -p "${OUT:-/tmp/gpu_session}" && cd "${OUT:-/tmp/gpu_session}" && pwd)
PY=${PY:-python3}
MODE=${1:-}
log() { grep -v "^\s*$" | tail -"$1" | tee "$OUT/$2"; }

$PY -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)"
if [ "$MODE" = "--smoke" ]; then
  OPS="--img-size 32 --batch 2 --steps 1"; FIT="--accelerator cpu --img-size 32 --batch 8 --samples 32 --epochs 1 --precision 32-true"
else
  OPS="--steps 20"; FIT=""
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
fi
# exactness first: CUDA-graph replay against the eager model, the deferred NaN check's CUDA path, no host sync
# of ours in steady-state steps (all skipped without a GPU)
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graphs.py tests/unit/test_guards.py \
  tests/integration/test_host_syncs.py 2>&1 | log 25 test_gpu.log
# the fit with CUDA graphs: the default (NaN check read a step late) with a plain-loop row per budget (what
# Lightning adds per step), then the check read at once (one host sync a step, the old behaviour)
timeout 200 $PY benchmarks/gpu_fit.py $FIT --executors graphs --bare --out "$OUT/gpu_fit.json" 2>&1 | log 8 gpu_fit.log
[ "$MODE" = "--recheck" ] && {
  timeout 200 $PY benchmarks/gpu_fit.py --executors graphs --bare --batch 256 --samples 5120 \
    --out "$OUT/gpu_fit_b256.json" 2>&1 | log 8 gpu_fit_b256.log
  echo "gpu recheck done"; exit 0; }
timeout 150 $PY benchmarks/gpu_fit.py $FIT --executors graphs --nonfinite-check at-once --out "$OUT/gpu_fit_at_once.json" \
  2>&1 | log 8 gpu_fit_at_once.log
timeout 200 $PY benchmarks/ops_cost.py --device cuda --amp bf16 $OPS --profile --out "$OUT/ops_cost_cuda.json" 2>&1 \
  | tee "$OUT/ops_cost_cuda.log"
# a batch large enough that eager steps are bound by the GPU, not by kernel launches
[ "$MODE" != "--smoke" ] && timeout 150 $PY benchmarks/ops_cost.py --device cuda --amp bf16 --batch 256 --steps 10 \
  --out "$OUT/ops_cost_cuda_b256.json" 2>&1 | tee "$OUT/ops_cost_cuda_b256.log"
echo "gpu session done"
