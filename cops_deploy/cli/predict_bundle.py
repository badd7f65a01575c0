"""``cops predict --bundle``: score images with an exported bundle, without PyTorch.

Maps the arguments onto a :class:`~cops_deploy.runtime.detector.Detector` (``--backend``,
default auto) and :func:`~cops_deploy.runtime.predict_files.predict_files`, which reads every
image under the inputs (files that cannot be scored are reported with the reason), shows a tqdm
progress bar, journals each result, and writes ``scores.json`` plus one side-by-side PNG
(image | heatmap | overlay) per image. Torch-free unless ``--backend torch`` is asked for.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cops_deploy.cli.predict_common import finish, open_run
from cops_deploy.imaging.decode import DEFAULT_MAX_PIXELS
from cops_deploy.runtime.detector import Detector
from cops_deploy.runtime.predict_files import predict_files

__all__ = ["predict_with_bundle"]


def predict_with_bundle(args: argparse.Namespace) -> int:
    """Run ``cops predict`` on ``args.bundle``; returns 1 if any image failed, else 0.

    Uses ``args.inputs`` (files or folders), ``args.bundle``, ``args.out``, ``args.force``,
    ``args.backend`` and, when present, ``args.resume``, ``args.max_pixels``,
    ``args.batch_size`` (None or absent: the backend's maximum batch), ``args.precision`` and
    ``args.threads``.

    Raises:
        ImageReadError: an input path does not exist (before the bundle is opened).
        CopsError: ``--out`` is refused: inside an input folder, a file, holding files without
            ``--force``/``--resume``, or in use by another run.
        BundleError: the bundle is invalid or does not fit the backend.
        ConfigError: ``--batch-size`` is not in 1..the backend's maximum batch, or
            ``--max-pixels`` is invalid.
    """
    scan, folder = open_run(args)  # a missing input or a refused --out fails before the bundle
    backend = getattr(args, "backend", None) or "auto"
    precision = getattr(args, "precision", None) or "fp32"
    threads = getattr(args, "threads", None)
    with folder:
        with Detector.open(
            args.bundle, backend=backend, threads=threads, verbose=True, precision=precision
        ) as detector:
            report = predict_files(
                detector,
                scan,
                folder,
                batch_size=getattr(args, "batch_size", None),
                precision=precision,
                progress=True,
                max_pixels=getattr(args, "max_pixels", DEFAULT_MAX_PIXELS),
            )
    return finish(report, Path(args.out))
