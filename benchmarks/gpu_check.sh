#!/usr/bin/env bash
# One prepared GPU check for a machine with PyTorch and CUDA only (Python 3.12; no TensorRT, no
# onnxruntime-gpu, nothing installed): reference-eager fp32/fp16, the deploy graphs in fp16 and
# bf16 (SDPA, CUDA graphs), the exported FP16 graphs' arithmetic (islands as exported), batch 1
# latency and batch 32 throughput, peak GPU memory, parity of every timed path against fp32, the
# paper's 168 ms gate and the 15 ms target; full cops-vit-l-14-336 at 518 (random weights).
# Needs: torch with CUDA, numpy, scipy (the reference-eager blur). Within 5 minutes: stages that
# would start after --budget-s are recorded as skipped, and the JSON is rewritten after every
# stage, so even a hard timeout keeps every figure measured before it.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]    (results: OUT_DIR/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench_out/gpu}}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
status=0
timeout 290 "$PY" benchmarks/gpu_check.py --out "$OUT_DIR" --budget-s 240 "${@:2}" || status=$?
echo "gpu_check exit status $status; results in $OUT_DIR/gpu_check.json"
exit "$status"
