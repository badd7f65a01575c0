#!/usr/bin/env bash
# The paper's Table S3 rows on one GPU: for each row, benchmarks/gpu_check.py with the fp32
# reference and the deploy graphs in fp16 and bf16 (CUDA graphs; batch 1 latency, batch 32
# throughput, parity against the row's own fp32 outputs, the 168 ms gate), full size, random
# weights. One JSON per row: OUT_DIR/rowN/gpu_check.json (N = the row's place in TABLE_S3);
# OUT_DIR/gpu_zoo.json collects them beside the paper's accuracies.
# Needs what gpu_check.sh needs (PyTorch with CUDA, numpy, scipy). About 30 s a row on an H200.
# Usage: bash benchmarks/gpu_zoo.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-bench_out/gpu_zoo}}"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
rows=$("$PY" -c 'from cops_deploy.configs.paper import TABLE_S3; print(" ".join(r.model for r in TABLE_S3))')
status=0
i=0
for row in $rows; do
  i=$((i + 1))
  echo "== row $i: $row"
  timeout 150 "$PY" benchmarks/gpu_check.py --arch "$row" --compare-arch '' \
    --stages fp32_reference,deploy_fp16_sdpa,deploy_bf16_sdpa --budget-s 100 \
    --out "$OUT_DIR/row$i" || status=1
done
mkdir -p "$OUT_DIR"
"$PY" benchmarks/zoo.py --collect-gpu "$OUT_DIR" || status=1
echo "gpu_zoo exit status $status; results in $OUT_DIR/gpu_zoo.json"
exit "$status"
