"""``cops predict``: anomaly scores and heatmaps for images, from weights or a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from cops_deploy.cli.head_args import add_head_arguments, given_head_flags, head_overrides
from cops_deploy.cli.predict_common import add_output_args
from cops_deploy.errors import CopsError
from cops_deploy.extras import require_build
from cops_deploy.runtime.backends import backend_names


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "predict",
        help="score images and write heatmaps",
        description=(
            "Score images (files or folders) with CoPS and write scores.json plus, per image, "
            "a PNG with the image, the heatmap and the overlay. Every file that cannot be "
            "scored is reported with the reason and the others are scored; the exit status is "
            "1 if any failed. Results are journalled as they are made (--resume continues a "
            "stopped run). A calibrated bundle (cops calibrate) also decides (anomalous or OK) "
            "and outlines the defect regions; without a threshold nothing is decided. "
            "review.html, a self-contained page of the run, is written at the end."
        ),
    )
    p.add_argument("inputs", nargs="+", help="image files or folders (searched recursively)")
    add_output_args(p)
    src = p.add_argument_group("model source (PyTorch weights, or --bundle)")
    src.add_argument("--bundle", type=Path, help="an exported bundle (runs without PyTorch)")
    src.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *backend_names()],  # built-ins and installed plug-ins
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
    add_head_arguments(  # as cops eval and cops-export; a bundle's head is fixed at export
        src, preset_default=None, default_note="default: the model's config; not with --bundle"
    )
    p.add_argument("--batch-size", type=int, default=1, help="images per forward pass")
    p.add_argument(
        "--min-area",
        type=int,
        default=None,
        help="smallest defect region kept, in pixels of the original image (a calibrated "
        "--bundle only; default: the calibration's min_area)",
    )
    p.set_defaults(func=run)
    return p


def _check_weights(args: argparse.Namespace) -> None:
    """The weight arguments make a model that is not silently random."""
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


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CopsError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.bundle is not None and given_head_flags(args):
        head = " ".join(given_head_flags(args))
        raise CopsError(
            f"{head}: these set the head of a model built from weights, but a bundle's head "
            f"was fixed when it was exported. Fix: leave them out, or export again with "
            f"`cops-export ... {head}`."
        )
    if args.bundle is not None:
        from cops_deploy.cli.predict_bundle import predict_with_bundle

        return predict_with_bundle(args)
    if args.min_area is not None:
        raise CopsError(
            f"--min-area {args.min_area} filters the defect regions of a calibrated bundle; "
            "from PyTorch weights there is no calibration, hence no threshold and no regions "
            "(the results are undecided). Fix: export a bundle (cops-export), calibrate it "
            "(cops calibrate) and pass --bundle, or leave --min-area out."
        )
    if args.precision != "fp32":
        raise CopsError(
            f"--precision {args.precision} runs a bundle on --backend openvino; the PyTorch "
            f"path is fp32. Fix: export a bundle (cops-export) and pass --bundle."
        )
    require_build("cops predict from PyTorch weights (without --bundle)")
    from cops_deploy.cli.predict_common import finish, open_run
    from cops_deploy.model.factory import create_model
    from cops_deploy.model.predict import model_batch
    from cops_deploy.runtime.predict_files import write_predictions

    _check_weights(args)
    scan, folder = open_run(args)  # a missing input or a refused --out fails before the model
    with folder:
        model = create_model(
            args.model,
            clip_weights=args.clip_weights,
            cops_weights=args.weights,
            **head_overrides(args),  # --preset, --alpha, --beta, --kernel
        ).to(args.device)
        # No calibration from weights: undecided (anomalous null), no regions; the keys are
        # there so that scores.json has one shape whatever scored it.
        info = {
            "model": args.model,
            "weights": model.provenance,
            "backend": "torch",
            "precision": "fp32",
            "threshold": None,
            "pixel_threshold": None,
            "min_area": None,
            "calibration": None,
        }
        report = write_predictions(
            scan,
            model_batch(model),
            folder,
            batch_size=args.batch_size,
            info=info,
            progress=True,
            max_pixels=args.max_pixels,
            review=args.review,
        )
    return finish(report, args.out)
