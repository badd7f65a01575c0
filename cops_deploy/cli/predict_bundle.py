"""``cops predict --bundle``: score images with an exported bundle, without PyTorch.

Opens a :class:`~cops_deploy.runtime.detector.Detector` on the bundle (``--backend``, default
auto) and hands it to the shared driver in :mod:`cops_deploy.cli.predict_common`, which reads
every image under the inputs (unreadable files are reported by name and skipped), shows a tqdm
progress bar, and writes ``scores.json`` plus one side-by-side PNG (image | heatmap | overlay)
per image. Torch-free unless ``--backend torch`` is asked for.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from cops_deploy.cli.predict_common import prepare_out_dir, run_predict
from cops_deploy.errors import ConfigError
from cops_deploy.imaging.decode import iter_image_files
from cops_deploy.runtime.detector import Detector

__all__ = ["predict_with_bundle"]


def predict_with_bundle(args: argparse.Namespace) -> int:
    """Run ``cops predict`` on ``args.bundle``; returns 1 if any image failed, else 0.

    Uses ``args.inputs`` (files or folders), ``args.bundle``, ``args.out``, ``args.force``,
    ``args.backend`` and, when present, ``args.batch_size`` (None or absent: the backend's
    maximum batch) and ``args.threads``.

    Raises:
        ImageReadError: an input path does not exist (before the bundle is opened).
        CopsError: ``--out`` already holds files and ``--force`` is not given, or is a file.
        BundleError: the bundle is invalid or does not fit the backend.
    """
    files = iter_image_files(args.inputs)  # a missing input fails before the bundle loads
    out = Path(args.out)
    prepare_out_dir(out, bool(args.force))
    batch_size = getattr(args, "batch_size", None)
    threads = getattr(args, "threads", None)
    backend = getattr(args, "backend", None) or "auto"
    precision = getattr(args, "precision", None) or "fp32"
    with Detector.open(
        args.bundle, backend=backend, threads=threads, verbose=True, precision=precision
    ) as detector:
        size = _batch_size(batch_size, detector.max_batch)

        def predict_batch(rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
            preds = detector.predict(rgbs, batch_size=size)
            scores = np.array([p.score for p in preds], dtype=np.float32)
            return scores, np.stack([p.anomaly_map for p in preds])

        info = {
            "bundle": str(Path(args.bundle)),
            "backend": detector.backend_name,
            "provider": detector.provider,
            "precision": precision,
            "threshold": detector.threshold,
        }
        report = run_predict(files, predict_batch, out, size, True, info)
    return report.exit_status


def _batch_size(requested: int | None, limit: int) -> int:
    """``--batch-size`` checked against the backend's maximum; None gives the maximum."""
    if requested is None:
        return limit
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ConfigError(
            f"invalid --batch-size {requested!r}; valid: an integer >= 1. Fix: pass e.g. 4."
        )
    if requested > limit:
        raise ConfigError(
            f"--batch-size {requested} exceeds the backend's maximum batch {limit}; valid: "
            f"1..{limit}. Fix: pass --batch-size {limit} or less."
        )
    return requested
