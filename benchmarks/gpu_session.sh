#!/usr/bin/env bash
# Everything issue 14 measures on a lent GPU, in one command (the device machine has torch, timm and lightning,
# no ortools/hydra: the library runs from the tree with solver="dp"). Copies logs and JSON into $OUT.
#     bash benchmarks/gpu_session.sh            # on the GPU machine (OUT set by the device tool)
#     OUT=/tmp/gpu bash benchmarks/gpu_session.sh --smoke   # a tiny CPU rehearsal of the same commands
set -uo pipefail
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_session}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ "${1:-}" = "--recheck" ]; then  # after later changes: exactness again, then the fit at batch 64 and 256
  timeout 120 $PY -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graphs.py 2>&1 | tail -15 | tee "$OUT/test_cuda_graphs.log"
  timeout 150 $PY benchmarks/gpu_fit.py --executors graphs --out gpu_fit_b64_graphs.json 2>&1 | grep -v "^\s*$" | tail -8 \
    | tee "$OUT/gpu_fit_b64_graphs.log"
  timeout 200 $PY benchmarks/gpu_fit.py --executors graphs --batch 256 --samples 5120 --out gpu_fit_b256_graphs.json 2>&1 \
    | grep -v "^\s*$" | tail -8 | tee "$OUT/gpu_fit_b256_graphs.log"
  cp benchmarks/results/gpu_fit_b*_graphs.json "$OUT/" 2>/dev/null
  echo "gpu recheck done"; exit 0
fi
if [ "${1:-}" = "--smoke" ]; then
  OPS="--img-size 32 --batch 2 --steps 1"; FIT="--accelerator cpu --img-size 32 --batch 8 --samples 32 --epochs 1 --precision 32-true"
else
  OPS="--steps 20"; FIT=""
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__)"
# exactness first: CUDA-graph replay against the eager model, the deferred NaN check's CUDA path (skipped without a GPU)
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/unit/test_cuda_graphs.py tests/unit/test_guards.py 2>&1 | tail -15 \
  | tee "$OUT/test_cuda_graphs.log"
timeout 200 $PY benchmarks/ops_cost.py --device cuda --amp bf16 $OPS --profile 2>&1 | tee "$OUT/ops_cost_cuda.log"
cp benchmarks/results/ops_cost_cuda.json "$OUT/" 2>/dev/null
# the fit with CUDA graphs: the default (NaN check read a step late) with a plain-loop row per budget (what
# Lightning adds per step), then the check read at once (one host sync a step, the old behaviour)
timeout 200 $PY benchmarks/gpu_fit.py $FIT --executors graphs --bare 2>&1 | grep -v "^\s*$" | tail -8 | tee "$OUT/gpu_fit.log"
timeout 150 $PY benchmarks/gpu_fit.py $FIT --executors graphs --nonfinite-check at-once --out gpu_fit_at_once.json 2>&1 \
  | grep -v "^\s*$" | tail -8 | tee "$OUT/gpu_fit_at_once.log"
cp benchmarks/results/gpu_fit.json benchmarks/results/gpu_fit_at_once.json "$OUT/" 2>/dev/null
# a batch large enough that eager steps are bound by the GPU, not by kernel launches
if [ "${1:-}" != "--smoke" ]; then
  timeout 150 $PY benchmarks/ops_cost.py --device cuda --amp bf16 --batch 256 --steps 10 --out ops_cost_cuda_b256.json \
    2>&1 | tee "$OUT/ops_cost_cuda_b256.log"
  cp benchmarks/results/ops_cost_cuda_b256.json "$OUT/" 2>/dev/null
fi
echo "gpu session done"
