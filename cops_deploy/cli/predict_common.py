"""Shared driver of ``cops predict``: read images, run a batch predictor, write results.

Torch-free: the PyTorch path and the bundle path each pass a ``predict_batch`` callable.
Unreadable files are reported by name and skipped; the others are still processed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cops_deploy.errors import CopsError, ImageReadError
from cops_deploy.fileio import atomic_write_text
from cops_deploy.imaging.decode import iter_image_files, load_image
from cops_deploy.imaging.visualize import side_by_side

# (list of RGB uint8 images) -> (scores [B], anomaly maps [B, S, S])
PredictBatch = Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]
SCORES_FILE = "scores.json"


@dataclass
class PredictReport:
    """What a run produced: one record per image, and the failures by file."""

    results: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 1 if self.failures else 0


def prepare_out_dir(out: Path, force: bool) -> None:
    """Create ``out``; refuse one that already holds results unless ``force``."""
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


def run_predict(
    inputs: Sequence[str | Path],
    predict_batch: PredictBatch,
    out: Path,
    batch_size: int = 1,
    force: bool = False,
    info: dict | None = None,
) -> PredictReport:
    """Predict every image under ``inputs`` and write ``scores.json`` and one PNG per image
    (image | heatmap | overlay) into ``out``."""
    files = iter_image_files(list(inputs))
    prepare_out_dir(out, force)
    report = PredictReport()
    used: set[str] = set()
    pending: list[tuple[Path, np.ndarray]] = []
    bar = tqdm(total=len(files), unit="img", desc="predict", file=sys.stderr)

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
            tqdm.write(f"skipped {path}: {exc}", file=sys.stderr)
            bar.update(1)
            continue
        if len(pending) >= batch_size:
            flush()
    flush()
    bar.close()
    payload = {**(info or {}), "results": report.results, "failures": report.failures}
    atomic_write_text(out / SCORES_FILE, json.dumps(payload, indent=2))
    print(
        f"wrote {len(report.results)} result(s) to {out}"
        + (f"; {len(report.failures)} file(s) failed" if report.failures else "")
    )
    return report
