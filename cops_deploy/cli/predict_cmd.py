"""``cops predict``: anomaly scores and heatmaps for images, from weights or a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cops_deploy.errors import CopsError


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="score images and write heatmaps",
        description=(
            "Score images (files or folders) with CoPS and write scores.json plus, per image, "
            "a PNG with the image, the heatmap and the overlay. Unreadable files are reported "
            "and skipped; the exit status is 1 if any failed."
        ),
    )
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite results already in --out")
    src = p.add_argument_group("model source (PyTorch weights, or --bundle)")
    src.add_argument("--bundle", type=Path, help="an exported bundle (runs without PyTorch)")
    src.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "tensorrt", "onnxruntime", "openvino", "torch"],
        help="bundle backend (default: auto)",
    )
    src.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: the vision graph in bfloat16 on a CPU that has it (--backend openvino)",
    )
    src.add_argument("--model", default="cops-vit-l-14-336", help="architecture name")
    src.add_argument(
        "--clip-weights",
        help="'openai' (download) or an OpenAI CLIP .pt / state dict / safetensors",
    )
    src.add_argument("--weights", help="CoPS checkpoint: reference .pth or a saved model folder")
    src.add_argument(
        "--random-weights",
        action="store_true",
        help="allow random weights for a smoke run (results are meaningless)",
    )
    src.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.set_defaults(func=run)
    return p


def _torch_predictor(args: argparse.Namespace):
    import torch

    from cops_deploy.imaging.preprocess import preprocess
    from cops_deploy.model.factory import create_model
    from cops_deploy.model.weights import is_own_format

    own_full = args.weights and is_own_format(args.weights)
    if not (args.weights or args.clip_weights) and not args.random_weights:
        raise CopsError(
            "no weights given: pass --weights (and --clip-weights), or --bundle, or "
            "--random-weights for a smoke run"
        )
    if args.weights and not args.clip_weights and not own_full and not args.random_weights:
        raise CopsError(
            "--weights is a reference CoPS checkpoint, which holds no CLIP weights: pass "
            "--clip-weights (a file, or 'openai' to download)"
        )
    model = create_model(args.model, clip_weights=args.clip_weights, cops_weights=args.weights)
    model = model.to(args.device)
    pre = model.cfg.preprocess

    def predict_batch(rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([preprocess(rgb, pre.size, pre.mean, pre.std) for rgb in rgbs])
        with torch.inference_mode():
            out = model(torch.from_numpy(x).to(args.device))
        return out.pred_score.float().cpu().numpy(), out.anomaly_map.float().cpu().numpy()

    info = {"model": args.model, "weights": model.provenance, "backend": "torch"}
    return predict_batch, info


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CopsError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.bundle is not None:
        from cops_deploy.cli.predict_bundle import predict_with_bundle

        return predict_with_bundle(args)
    if args.precision != "fp32":
        raise CopsError(
            f"--precision {args.precision} runs a bundle on --backend openvino; the PyTorch "
            f"path is fp32. Fix: export a bundle (cops-export) and pass --bundle."
        )
    from cops_deploy.cli.predict_common import prepare_out_dir, run_predict
    from cops_deploy.imaging.decode import iter_image_files

    files = iter_image_files(args.inputs)  # a missing path fails before the model loads
    prepare_out_dir(args.out, args.force)
    predict_batch, info = _torch_predictor(args)
    report = run_predict(files, predict_batch, args.out, args.batch_size, True, info)
    return report.exit_status
