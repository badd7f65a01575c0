"""``cops calibrate``: set a bundle's image and pixel thresholds from images (torch-free).

Arguments -> :func:`cops_deploy.runtime.calibration.calibrate` on an open Detector ->
:func:`cops_deploy.runtime.calibration.write_calibration`; the rules are in that module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cops_deploy.errors import ConfigError
from cops_deploy.runtime.backends import backend_names
from cops_deploy.runtime.calibration import DEFAULT_FPR, METHODS

NEEDS_BUILD = False


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``cops calibrate``."""
    p = sub.add_parser(
        "calibrate",
        help="set a bundle's decision thresholds from normal (and anomalous) images",
        description=(
            "Score images with the bundle and store, with the bundle, an image threshold (at a "
            "target false-positive rate on normal images, or F1-optimal with --anomalous) and a "
            "pixel threshold for defect masks (at --pixel-fpr on normal pixels, or F1-optimal "
            "with --masks). The graphs are not touched; the previous calibration is replaced "
            "atomically. Then Detector.predict and cops predict return decisions and regions."
        ),
    )
    p.add_argument("bundle", type=Path, help="the bundle folder to calibrate")
    p.add_argument("--normal", required=True, type=Path, help="folder of normal images")
    p.add_argument("--anomalous", type=Path, help="folder of anomalous images")
    p.add_argument(
        "--masks", type=Path, help="folder of the anomalous images' masks (same names, or _mask)"
    )
    p.add_argument(
        "--target",
        default="fpr",
        choices=list(METHODS),
        help="image threshold: 'fpr' (default; --fpr on normal images) or 'f1' (F1-optimal, "
        "needs --anomalous)",
    )
    p.add_argument(
        "--fpr",
        type=float,
        help=f"target false-positive rate on normal images (default {DEFAULT_FPR}; at least "
        f"1/fpr normal images are needed)",
    )
    p.add_argument(
        "--pixel-fpr",
        type=float,
        help="target false-positive rate on normal pixels, without --masks (default: --fpr)",
    )
    p.add_argument(
        "--min-area", type=int, default=1, help="smallest defect region kept, in pixels (default 1)"
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=["auto", *backend_names()],
        help="backend that scores the images (default: auto; use the one the line will run)",
    )
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"], help="as cops predict")
    p.add_argument("--threads", type=int, help="inference threads (default: one per core)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Calibrate ``args.bundle``; prints the thresholds and the record's path."""
    from tqdm import tqdm

    from cops_deploy.runtime.calibration import calibrate, write_calibration
    from cops_deploy.runtime.detector import Detector

    if args.target == "f1" and args.fpr is not None:
        raise ConfigError(
            f"--fpr {args.fpr} is the target of --target fpr, not of --target f1 (F1-optimal). "
            f"Fix: pass one of --fpr F or --target f1 (set the pixel rate with --pixel-fpr)."
        )
    fpr = DEFAULT_FPR if args.fpr is None else args.fpr
    with Detector.open(
        args.bundle, backend=args.backend, threads=args.threads, precision=args.precision
    ) as detector:
        with tqdm(desc="scoring", unit="image", disable=not sys.stderr.isatty()) as bar:

            def progress(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            record = calibrate(
                detector,
                args.normal,
                anomalous=args.anomalous,
                masks=args.masks,
                target=args.target,
                fpr=fpr,
                pixel_fpr=args.pixel_fpr,
                min_area=args.min_area,
                precision=args.precision,
                progress=progress,
            )
    path = write_calibration(args.bundle, record)
    counts = ", ".join(f"{v.count} {k}" for k, v in record.images.items())
    print(f"calibrated {args.bundle} on {counts} images ({record.backend}, {record.precision})")
    for name, part in (("image", record.image), ("pixel", record.pixel)):
        target = f"target fpr {part.target_fpr:g}" if part.method == "fpr" else "F1-optimal"
        achieved = ", ".join(
            f"{k} {v:.4g}" for k, v in part.achieved.items() if isinstance(v, float)
        )
        print(f"  {name} threshold {part.threshold:.6g} ({target}; achieved {achieved})")
    print(f"  min area {record.min_area} px; record {path}")
    return 0
