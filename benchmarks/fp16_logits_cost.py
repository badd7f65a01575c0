"""The cost of the FP16 graphs' float32 attention logits, on ONNX Runtime CPU.

Exports the FP16 vision graph twice: as shipped (logits an FP32 island, ``fp32_logits=True``)
and in the form before the fix (float16 logits), and times both with ONNX Runtime on the CPU
(median of ``--repeats`` runs after a warm-up). ``--size tiny`` is cops-tiny; ``--size
representative`` is cops-vit-l-14-336's vision tower (width 1024, 16 heads, 518 px: 1370 tokens)
cut to ``--layers`` blocks, so the per-block cost is measured without the full model's memory.
A script, not a test:

    python benchmarks/fp16_logits_cost.py --size tiny
    python benchmarks/fp16_logits_cost.py --size representative --layers 2 --repeats 5

Note: ONNX Runtime's CPU provider has no float16 MatMul kernel here: it runs float16 matmuls
through float32 with casts, so on the CPU the figures measure the casts the island adds, not the
float32-vs-float16 matmul rate of a GPU (``benchmarks/gpu_check.py`` times both forms on CUDA).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from cops_deploy import create_model
from cops_deploy.export.fp16 import logit_matmul_report, to_fp16
from cops_deploy.export.graphs import VisionGraph, example_inputs
from cops_deploy.export.onnx_export import export_onnx, onnxruntime_session

SIZES: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny": ("cops-tiny", {}),
    "representative": ("cops-vit-l-14-336", {}),
}


def measure(size: str, layers: int, repeats: int, threads: int | None) -> dict[str, Any]:
    """Latency (ms, median) of the FP16 vision graph before and after the fix, on ORT CPU."""
    arch, overrides = SIZES[size]
    if size == "representative":
        overrides = {
            "vision.layers": layers,
            "vision.v_vv_layers": layers,
            "vision.feature_layers": [layers],
        }
    model = create_model(arch, seed=0, **overrides)
    (image,) = example_inputs("vision", model.cfg, batch=1)
    result: dict[str, Any] = {
        "arch": arch,
        "vision_layers": model.cfg.vision.layers,
        "tokens": model.cfg.vision.grid**2 + 1,
        "repeats": repeats,
    }
    with tempfile.TemporaryDirectory() as tmp:
        for label, fp32_logits in (
            ("fp16_logits_before_ms", False),
            ("fp32_logits_after_ms", True),
        ):
            graph = to_fp16(VisionGraph(model))
            graph.fp32_logits = fp32_logits
            path = export_onnx(
                graph, Path(tmp) / f"{label}.onnx", example_inputs("vision", model.cfg)
            )
            result[label.replace("_ms", "_logit_matmuls")] = logit_matmul_report(path)
            session = onnxruntime_session(path, threads=threads)
            feed = {"image": image.numpy()}
            session.run(None, feed)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                session.run(None, feed)
                times.append((time.perf_counter() - start) * 1e3)
            result[label] = statistics.median(times)
            result[label.replace("_ms", "_out")] = session.run(None, feed)[1]
    before, after = result.pop("fp16_logits_before_out"), result.pop("fp32_logits_after_out")
    result["outputs_max_diff"] = float(np.abs(before - after).max())
    result["cost_ratio"] = result["fp32_logits_after_ms"] / result["fp16_logits_before_ms"]
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=sorted(SIZES), default="tiny")
    p.add_argument("--layers", type=int, default=2, help="vision blocks (representative size)")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    print(json.dumps(measure(args.size, args.layers, args.repeats, args.threads), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
