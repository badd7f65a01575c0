"""Export the full cops-vit-l-14-336 (random weights) and measure it against PyTorch.

A script, not a test (minutes on a 2-core CPU, ~1.5 GB bundle):

    python benchmarks/export_full.py --out /tmp/cops_full [--precision fp16] [--json out.json]
    python benchmarks/export_full.py --out /tmp/cops_full --reuse     # time it again only

It runs ``export_bundle`` (the library behind ``cops-export``: graphs, dynamo export, checks,
parity, bundle, with the same progress lines), then
times per image on CPU: PyTorch eager ``CopsModel``, the torch deploy graphs, and ONNX Runtime
on the bundle's graphs, with the head's share of each; and prints the ORT-vs-torch parity
(anomaly-map max diff, score diff) and the bundle size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cops_deploy import create_model
from cops_deploy.errors import CopsError
from cops_deploy.export.graphs import DeployModel
from cops_deploy.export.onnx_export import onnxruntime_session, synthetic_images
from cops_deploy.export.pipeline import ExportCfg, PrintProgress, export_bundle
from cops_deploy.runtime.bundle import open_bundle

MODEL = "cops-vit-l-14-336"


def timed(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Median wall time of ``repeats`` calls after one warm-up call, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("/tmp/cops_full_export"))
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    p.add_argument("--parity-images", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2, help="timed runs after one warm-up")
    p.add_argument("--threads", type=int, default=None, help="torch/ORT threads (default: all)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument(
        "--reuse", action="store_true", help="time an existing bundle at --out (skip the export)"
    )
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    if not args.reuse:
        cfg = ExportCfg(
            out=args.out,
            model=MODEL,
            random_weights=True,
            precision=args.precision,
            parity_images=args.parity_images,
            force=True,
        )
        try:
            export_bundle(cfg, PrintProgress())
        except CopsError as exc:
            raise SystemExit(f"export failed: {exc}") from exc
    export_s = None if args.reuse else time.perf_counter() - start
    bundle = open_bundle(args.out, verify=False)
    size = sum(e.size for e in bundle.manifest.files)
    parity = bundle.manifest.parity

    model = create_model(MODEL, seed=0)
    deploy = DeployModel(model).eval()
    image = synthetic_images(model.cfg, n=1, seed=7)
    with torch.no_grad():
        t_eager, _ = timed(lambda: model(image), args.repeats)
        t_vision_pt, (g, p) = timed(lambda: deploy.vision(image), args.repeats)
        t_head_pt, _ = timed(lambda: deploy.head(g, p), args.repeats)
    vision = onnxruntime_session(args.out / "vision.onnx", args.threads)
    head = onnxruntime_session(args.out / "head.onnx", args.threads)
    feed = {"image": image.numpy()}
    t_vision_ort, emb = timed(
        lambda: dict(
            zip(("image_embedding", "patch_embedding"), vision.run(None, feed), strict=True)
        ),
        args.repeats,
    )
    t_head_ort, _ = timed(lambda: head.run(None, emb), args.repeats)
    ort_total = t_vision_ort + t_head_ort
    deploy_total = t_vision_pt + t_head_pt
    return {
        "model": MODEL,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
        "export_seconds": None if export_s is None else round(export_s, 1),
        "bundle_bytes": size,
        "bundle_mib": round(size / 2**20, 1),
        "parity": parity,
        "seconds_per_image": {
            "torch_eager_copsmodel": round(t_eager, 3),
            "torch_deploy_graphs": round(deploy_total, 3),
            "onnxruntime_cpu": round(ort_total, 3),
        },
        "head_seconds": {"torch_deploy": round(t_head_pt, 3), "onnxruntime": round(t_head_ort, 3)},
        "head_share": {
            "torch_deploy": round(t_head_pt / deploy_total, 4),
            "onnxruntime": round(t_head_ort / ort_total, 4),
        },
        "ort_speedup_vs_eager": round(t_eager / ort_total, 3),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    figures = run(args)
    par = figures["parity"]
    sec = figures["seconds_per_image"]
    print(f"\n== {MODEL} ({args.precision}, random weights) ==")
    print(f"export: {figures['export_seconds'] or 'reused'} s, bundle {figures['bundle_mib']} MiB")
    print(
        f"parity (ORT vs torch, {par['images']} images): anomaly map max diff "
        f"{par['anomaly_map_max_abs']:.3g}, score max diff {par['pred_score_max_abs']:.3g}"
    )
    print(
        f"per image: torch eager {sec['torch_eager_copsmodel']} s, torch deploy graphs "
        f"{sec['torch_deploy_graphs']} s, ORT CPU {sec['onnxruntime_cpu']} s "
        f"({figures['ort_speedup_vs_eager']}x eager)"
    )
    print(
        f"head share: ORT {figures['head_share']['onnxruntime']:.1%}, torch deploy "
        f"{figures['head_share']['torch_deploy']:.1%}"
    )
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
