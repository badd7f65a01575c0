"""``cops predict --bundle``: score images with an exported bundle, without PyTorch.

Maps the arguments onto a :class:`~cops_deploy.runtime.detector.Detector` (``--backend``,
default auto) and :func:`~cops_deploy.runtime.predict_files.predict_files`, which reads every
image under the inputs (files that cannot be scored are reported with the reason), shows a tqdm
progress bar, journals each result, and writes ``scores.json`` plus one side-by-side PNG
(image | heatmap | overlay, the regions outlined and the decision printed) per image, and
``review.html`` (unless ``--no-review``). A calibrated bundle decides (``anomalous``) and finds
the defect regions (``--min-area``: the smallest kept, in pixels; default the calibration's).
Torch-free unless ``--backend torch`` is asked for.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cops_deploy.cli.predict_common import finish, open_run
from cops_deploy.errors import ConfigError
from cops_deploy.imaging.decode import DEFAULT_MAX_PIXELS
from cops_deploy.runtime.detector import Detector
from cops_deploy.runtime.predict_files import predict_files
from cops_deploy.runtime.regions import check_min_area

__all__ = ["predict_with_bundle"]


def predict_with_bundle(args: argparse.Namespace) -> int:
    """Run ``cops predict`` on ``args.bundle``; returns 1 if any image failed, else 0.

    Uses ``args.inputs`` (files or folders), ``args.bundle``, ``args.out``, ``args.force``,
    ``args.backend`` and, when present, ``args.resume``, ``args.max_pixels``,
    ``args.batch_size`` (None or absent: the backend's maximum batch), ``args.precision``,
    ``args.threads``, ``args.min_area`` (None: the calibration's) and ``args.review``.

    Raises:
        ImageReadError: an input path does not exist (before the bundle is opened).
        CopsError: ``--out`` is refused: inside an input folder, a file, holding files without
            ``--force``/``--resume``, or in use by another run.
        BundleError: the bundle is invalid or does not fit the backend.
        ConfigError: ``--batch-size`` is not in 1..the backend's maximum batch,
            ``--max-pixels`` or ``--min-area`` is invalid, or ``--min-area`` is given for a
            bundle without a calibration.
    """
    min_area = getattr(args, "min_area", None)
    if min_area is not None:
        check_min_area(min_area)
    scan, folder = open_run(args)  # a missing input or a refused --out fails before the bundle
    backend = getattr(args, "backend", None) or "auto"
    precision = getattr(args, "precision", None) or "fp32"
    threads = getattr(args, "threads", None)
    with folder:
        with Detector.open(
            args.bundle, backend=backend, threads=threads, verbose=True, precision=precision
        ) as detector:
            if min_area is not None and detector.calibration is None:
                raise ConfigError(
                    f"--min-area {min_area}: bundle {args.bundle} has no calibration, so it "
                    "finds no defect regions to filter by area; valid: --min-area with a "
                    "calibrated bundle. Fix: run `cops calibrate` on the bundle first, or "
                    "leave --min-area out."
                )
            report = predict_files(
                detector,
                scan,
                folder,
                batch_size=getattr(args, "batch_size", None),
                precision=precision,
                progress=True,
                max_pixels=getattr(args, "max_pixels", DEFAULT_MAX_PIXELS),
                min_area=min_area,
                review=getattr(args, "review", True),
            )
    return finish(report, Path(args.out))
