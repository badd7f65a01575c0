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
"$PY" - "$OUT_DIR" <<'PYEOF' || status=1
import json, sys
from pathlib import Path
from cops_deploy.configs.paper import TABLE_S3
out = Path(sys.argv[1])
rows = []
for i, r in enumerate(TABLE_S3, 1):
    f = out / f"row{i}" / "gpu_check.json"
    res = json.loads(f.read_text()) if f.is_file() else {"status": "missing"}
    st = res.get("stages", {})
    row = {"model": r.model, "backbone": r.backbone, "input_size": r.input_size,
           "paper_image_auroc": r.image_auroc, "paper_pixel_auroc": r.pixel_auroc,
           "status": res.get("status"), "gpu": res.get("gpu"),
           "torch": res.get("torch"), "cuda": res.get("cuda")}
    for name in ("fp32_reference", "deploy_fp16_sdpa", "deploy_bf16_sdpa"):
        e = st.get(name, {})
        row[name] = {k: e.get(k) for k in ("status", "eager", "batch1", "batch32", "parity",
                                          "peak_gpu_mem_mib") if k in e}
    rows.append(row)
    b1 = row["deploy_fp16_sdpa"].get("batch1", {}).get("p50_ms")
    print(f"{r.model:26s} {r.image_auroc:5.1f}/{r.pixel_auroc:5.1f}  fp16 p50 "
          f"{b1 if b1 is None else round(b1, 2)} ms  status {row['status']}")
out.mkdir(parents=True, exist_ok=True)
(out / "gpu_zoo.json").write_text(json.dumps({"rows": rows}, indent=2))
PYEOF
echo "gpu_zoo exit status $status; results in $OUT_DIR/gpu_zoo.json"
exit "$status"
