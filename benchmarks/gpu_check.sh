#!/usr/bin/env bash
# One prepared GPU check for a machine with PyTorch only (no TensorRT, no onnxruntime-gpu):
# reference-eager fp16 vs our fastest torch path (fp16 deploy graphs, SDPA, CUDA graphs) on the
# full cops-vit-l-14-336 at 518 (random weights), parity against fp32, and the 168 ms gate.
# Needs: torch with CUDA, numpy, scipy, pillow, safetensors, tqdm (all on the lent H200 image).
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]    (a few minutes; results in OUT_DIR/gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench_out/gpu}}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
timeout 480 python3 benchmarks/gpu_check.py --out "$OUT_DIR"
