"""``cops predict --bundle``: score images with an exported bundle, without PyTorch.

Maps the arguments onto a :class:`~cops_deploy.runtime.detector.Detector` (``--backend``,
default auto) and :func:`~cops_deploy.runtime.predict_files.predict_files`, which reads every
image under the inputs (unreadable files are reported by name and skipped), shows a tqdm
progress bar, and writes ``scores.json`` plus one side-by-side PNG (image | heatmap | overlay)
per image. Torch-free unless ``--backend torch`` is asked for.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cops_deploy.cli.predict_common import finish
from cops_deploy.imaging.decode import iter_image_files
from cops_deploy.runtime.detector import Detector
from cops_deploy.runtime.predict_files import predict_files, prepare_out_dir

__all__ = ["predict_with_bundle"]


def predict_with_bundle(args: argparse.Namespace) -> int:
    """Run ``cops predict`` on ``args.bundle``; returns 1 if any image failed, else 0.

    Uses ``args.inputs`` (files or folders), ``args.bundle``, ``args.out``, ``args.force``,
    ``args.backend`` and, when present, ``args.batch_size`` (None or absent: the backend's
    maximum batch), ``args.precision`` and ``args.threads``.

    Raises:
        ImageReadError: an input path does not exist (before the bundle is opened).
        CopsError: ``--out`` already holds files and ``--force`` is not given, or is a file.
        BundleError: the bundle is invalid or does not fit the backend.
        ConfigError: ``--batch-size`` is not in 1..the backend's maximum batch.
    """
    files = iter_image_files(args.inputs)  # a missing input fails before the bundle loads
    out = Path(args.out)
    prepare_out_dir(out, bool(args.force))  # and an occupied --out
    backend = getattr(args, "backend", None) or "auto"
    precision = getattr(args, "precision", None) or "fp32"
    threads = getattr(args, "threads", None)
    with Detector.open(
        args.bundle,
        backend=backend,
        threads=threads,
        verbose=True,
        precision=precision,
        warmup=True,  # the first image's time (and the progress bar's rate) is the steady one
    ) as detector:
        report = predict_files(
            detector,
            files,
            out,
            batch_size=getattr(args, "batch_size", None),
            force=True,  # checked above, before the bundle was opened
            precision=precision,
            progress=True,
        )
    return finish(report, out)
