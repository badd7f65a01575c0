"""Score image files and write the results: ``scores.json`` and one picture per image.

    with Detector.open("bundle/") as detector:
        report = predict_files(detector, ["parts/"], "results/")
    print(report.results[0]["score"], report.failures)

:func:`predict_files` runs a :class:`~cops_deploy.runtime.detector.Detector`;
:func:`write_predictions` runs any batch predictor (``cops predict`` passes a PyTorch model's
through it). Every image under the inputs is read (folders recursively); unreadable files are
recorded by name in the report and skipped, the others are still scored. Each picture is
image | heatmap | overlay side by side. Silent unless ``progress`` (a tqdm bar and the skipped
files on stderr). Torch-free.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cops_deploy.errors import ConfigError, CopsError, ImageReadError
from cops_deploy.fileio import atomic_write_text
from cops_deploy.imaging.decode import iter_image_files, load_image
from cops_deploy.imaging.visualize import side_by_side
from cops_deploy.runtime.detector import Detector

__all__ = [
    "SCORES_FILE",
    "Inputs",
    "PredictBatch",
    "PredictReport",
    "detector_batch",
    "predict_files",
    "prepare_out_dir",
    "write_predictions",
]

# (list of RGB uint8 images) -> (scores [B], anomaly maps [B, S, S])
PredictBatch = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]
SCORES_FILE = "scores.json"
# image files or folders (searched recursively): one path, or several
Inputs = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


@dataclass
class PredictReport:
    """What a run produced: one record per scored image (source, score, picture file name,
    height, width) and one per failed file (source, error)."""

    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)


def prepare_out_dir(out: str | os.PathLike[str], force: bool) -> None:
    """Create ``out``; refuse one that already holds results unless ``force``."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CopsError(f"--out {out} exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CopsError(
            f"--out {out} already holds results; pass --force to overwrite them or choose "
            "an empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)


def _png_name(index: int, path: Path, used: set[str]) -> str:
    name = f"{path.stem}.png"
    if name in used:
        name = f"{path.stem}_{index:05d}.png"
    used.add(name)
    return name


def write_predictions(
    inputs: Inputs,
    predict_batch: PredictBatch,
    out: str | os.PathLike[str],
    *,
    batch_size: int = 1,
    force: bool = False,
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> PredictReport:
    """Predict every image under ``inputs`` with ``predict_batch`` (``batch_size`` images per
    call) and write ``scores.json`` (``info``, then the results and failures) and one PNG per
    image into ``out``.

    Raises:
        ImageReadError: an input path does not exist.
        CopsError: ``out`` holds files and ``force`` is not set, or is a file.
    """
    files = iter_image_files(inputs)
    out = Path(out)
    prepare_out_dir(out, force)
    report = PredictReport()
    used: set[str] = set()
    pending: list[tuple[Path, np.ndarray]] = []
    bar = tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr, disable=not progress)

    def flush() -> None:
        if not pending:
            return
        scores, maps = predict_batch([rgb for _, rgb in pending])
        for (path, rgb), score, amap in zip(pending, scores, maps, strict=True):
            png = _png_name(len(report.results), path, used)
            side_by_side(rgb, amap, out / png, score=float(score))
            report.results.append(
                {
                    "source": str(path),
                    "score": float(score),
                    "visual": png,
                    "height": int(rgb.shape[0]),
                    "width": int(rgb.shape[1]),
                }
            )
        bar.update(len(pending))
        pending.clear()

    for path in files:
        try:
            pending.append((path, load_image(path)))
        except ImageReadError as exc:
            report.failures.append({"source": str(path), "error": str(exc)})
            if progress:
                tqdm.write(f"skipped {path}: {exc}", file=sys.stderr)
            bar.update(1)
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    payload = {**(info or {}), "results": report.results, "failures": report.failures}
    atomic_write_text(out / SCORES_FILE, json.dumps(payload, indent=2))
    return report


def detector_batch(detector: Detector, batch_size: int | None = None) -> PredictBatch:
    """``detector`` as a batch predictor (``batch_size`` images per graph call; None: the
    detector's maximum batch)."""
    size = _batch_size(batch_size, detector.max_batch)

    def predict_batch(rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        preds = detector.predict(rgbs, batch_size=size)
        scores = np.array([p.score for p in preds], dtype=np.float32)
        return scores, np.stack([p.anomaly_map for p in preds])

    return predict_batch


def predict_files(
    detector: Detector,
    inputs: Inputs,
    out: str | os.PathLike[str],
    *,
    batch_size: int | None = None,
    force: bool = False,
    precision: str = "fp32",
    progress: bool = False,
) -> PredictReport:
    """Score every image under ``inputs`` with ``detector`` and write ``scores.json`` and one
    PNG per image into ``out`` (see :func:`write_predictions`).

    ``scores.json`` also records the bundle, the backend, its provider, ``precision`` (the one
    the detector was opened with) and the bundle's threshold.

    Raises:
        ConfigError: ``batch_size`` is not an integer in 1..``detector.max_batch``.
        ImageReadError: an input path does not exist.
        CopsError: ``out`` holds files and ``force`` is not set, or is a file.
    """
    size = _batch_size(batch_size, detector.max_batch)
    info = {
        "bundle": str(detector.bundle.root),
        "backend": detector.backend_name,
        "provider": detector.provider,
        "precision": precision,
        "threshold": detector.threshold,
    }
    return write_predictions(
        inputs,
        detector_batch(detector, size),
        out,
        batch_size=size,
        force=force,
        info=info,
        progress=progress,
    )


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
