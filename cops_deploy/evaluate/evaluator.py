"""Zero-shot evaluation of a CoPS model on a dataset's test split (METHOD.md section 7).

``evaluate_model(model, root, dataset)`` runs the model over the split class by class and
computes, per class, I-AUROC, I-AP, I-F1max (image scores) and P-AUROC, P-AP, AUPRO, P-F1max
(anomaly maps against the masks, all pixels of the class at the model's input size), with
:mod:`cops_deploy.evaluate.metrics`; a metric the data cannot define is None and is reported
as n/a. ``write_eval_outputs`` writes the reports (:mod:`cops_deploy.evaluate.report`),
``scores.csv`` (one row per image) and one overlay grid per class. ``run_eval`` is what
``cops eval`` does: load the weights with a head preset, evaluate, write.

Head presets (alpha, beta, neighbour kernel):

- ``paper``: 0.3, 0.9, 5 (the paper's defaults);
- ``reference``: as the reference test script, 0.26, 0.9, 5, and 0.35, 1.0, 3 when the
  target dataset is VisA.

The model runs with its fixed ICTS samples and a per-image SAGA min-max, so each image's
results do not depend on the batch it is in. Anomalous images without a mask (the image-label
datasets) are left out of the pixel metrics rather than counted as all-normal.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from cops_deploy.data.dataset import MetaDataset
from cops_deploy.data.solvers import DATASETS, canonical_dataset
from cops_deploy.errors import ConfigError, WeightsError
from cops_deploy.evaluate.metrics import IMAGE_METRICS, PIXEL_METRICS, PixelMetricAccumulator
from cops_deploy.evaluate.metrics import image_metrics as compute_image_metrics
from cops_deploy.evaluate.report import mean_over_classes, overlay_grid, write_results
from cops_deploy.fileio import atomic_write_bytes, prepare_output_dir
from cops_deploy.model.cops import CopsModel
from cops_deploy.model.factory import create_model
from cops_deploy.model.weights import CONFIG_FILE, is_own_format

METRICS: tuple[str, ...] = IMAGE_METRICS + PIXEL_METRICS
PRESETS: tuple[str, ...] = ("paper", "reference")
SCORES_FILE = "scores.csv"
OVERLAY_DIR = "overlays"
REPORT_FILES = ("results.md", "results.csv", "results.json", SCORES_FILE)


@dataclass(frozen=True)
class HeadSettings:
    """The inference-head values a preset sets."""

    alpha: float
    beta: float
    neighbour_kernel: int

    def overrides(self) -> dict[str, Any]:
        """As ``create_model`` / ``CopsCfg.replace`` overrides."""
        return {
            "head.alpha": self.alpha,
            "head.beta": self.beta,
            "head.neighbour_kernel": self.neighbour_kernel,
        }


def preset_head(preset: str, target_dataset: str) -> HeadSettings:
    """The head values of ``preset`` ("paper" or "reference") for a target dataset."""
    if preset == "paper":
        return HeadSettings(0.3, 0.9, 5)
    if preset == "reference":
        if canonical_dataset(target_dataset) == "visa":
            return HeadSettings(0.35, 1.0, 3)
        return HeadSettings(0.26, 0.9, 5)
    raise ConfigError(
        f"unknown preset {preset!r}; valid presets are {list(PRESETS)}. Fix: pass --preset "
        "paper (alpha 0.3, beta 0.9) or --preset reference (the reference test script)."
    )


def apply_head(model: CopsModel, head: HeadSettings) -> None:
    """Set the inference head of ``model`` (its config is what the forward pass reads)."""
    model.cfg = model.cfg.replace(**head.overrides())


# ------------------------------------------------------------------------------ results


@dataclass(frozen=True)
class ImageRecord:
    """One evaluated image."""

    path: str
    cls_name: str
    label: int
    score: float
    has_mask: bool


@dataclass
class ClassOverlay:
    """The images drawn in one class's overlay grid."""

    paths: list[str] = field(default_factory=list)
    masks: list[np.ndarray | None] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


@dataclass
class EvalResult:
    """Per-class metrics (fractions, None = n/a), per-image records and overlay material."""

    dataset: str
    head: HeadSettings
    metrics: dict[str, dict[str, float | None]]
    records: list[ImageRecord]
    overlays: dict[str, ClassOverlay]
    pixel_skipped: int  # anomalous images without a mask, left out of the pixel metrics
    seconds: float

    @property
    def mean(self) -> dict[str, float | None]:
        """Mean over classes per metric (classes where it is n/a left out)."""
        return mean_over_classes(self.metrics, list(METRICS))[0]


class _OverlayPicker:
    """Keeps the maps of the first anomalous and good images of a class, for its grid."""

    def __init__(self, rows: int) -> None:
        self.rows = rows
        self.bad: list[tuple[str, np.ndarray | None, np.ndarray, str]] = []
        self.good: list[tuple[str, np.ndarray | None, np.ndarray, str]] = []

    def offer(self, record: ImageRecord, mask: np.ndarray, amap: np.ndarray) -> None:
        pool = self.bad if record.label else self.good
        if len(pool) < self.rows:
            where = Path(record.path)
            label = f"{where.parent.name}/{where.name} {record.score:.3f}"
            pool.append((record.path, mask if record.has_mask else None, amap.copy(), label))

    def pick(self) -> ClassOverlay:
        n_bad = min(len(self.bad), max(self.rows - len(self.good), math.ceil(self.rows * 2 / 3)))
        chosen = self.bad[:n_bad] + self.good[: self.rows - n_bad]
        out = ClassOverlay()
        for path, mask, amap, label in chosen:
            out.paths.append(path)
            out.masks.append(mask)
            out.maps.append(amap)
            out.labels.append(label)
        return out


def _pixel_labels(dataset: str) -> bool:
    name = canonical_dataset(dataset)
    return DATASETS[name].pixel_labels if name in DATASETS else True


class _ClassState:
    """Scores, labels and pixel data of the class being evaluated."""

    def __init__(self, pixel: bool, rows: int) -> None:
        self.scores: list[float] = []
        self.labels: list[int] = []
        self.pixels = PixelMetricAccumulator() if pixel else None
        self.picker = _OverlayPicker(rows)

    def add(self, record: ImageRecord, mask: np.ndarray, amap: np.ndarray) -> bool:
        """Add one image; return False when it was left out of the pixel metrics."""
        self.scores.append(record.score)
        self.labels.append(record.label)
        self.picker.offer(record, mask, amap)
        if self.pixels is None:
            return True
        if record.label and not record.has_mask:
            return False
        self.pixels.add(amap, mask)
        return True

    def metrics(self) -> dict[str, float | None]:
        out: dict[str, float | None] = dict(
            compute_image_metrics(np.asarray(self.scores), np.asarray(self.labels))
        )
        pixel = self.pixels.compute() if self.pixels is not None else {}
        out.update({m: pixel.get(m) for m in PIXEL_METRICS})
        return out


def evaluate_model(
    model: CopsModel,
    root: str | os.PathLike[str],
    dataset: str,
    classes: Sequence[str] | None = None,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
    progress: bool = True,
    overlay_rows: int = 12,
    num_workers: int = 0,
) -> EvalResult:
    """Evaluate ``model`` (its head as configured) on the test split of ``root``."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}. Fix: pass e.g. 4.")
    if overlay_rows < 1:
        raise ConfigError(f"overlay_rows must be >= 1, got {overlay_rows}.")
    start = time.perf_counter()
    name = canonical_dataset(dataset)
    data = MetaDataset(root, model.cfg.preprocess, "test", classes)
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    pixel = _pixel_labels(name)
    model = model.eval().to(device)
    metrics: dict[str, dict[str, float | None]] = {}
    overlays: dict[str, ClassOverlay] = {}
    records: list[ImageRecord] = []
    skipped = 0
    current: tuple[str, _ClassState] | None = None

    def finish(cls_name: str, state: _ClassState) -> None:
        metrics[cls_name] = state.metrics()
        overlays[cls_name] = state.picker.pick()

    bar = tqdm(
        total=len(data), desc=f"eval {name}", unit="img", disable=not progress, file=sys.stderr
    )
    for batch in loader:
        with torch.inference_mode():
            out = model(batch.image.to(device))
        scores = out.pred_score.float().cpu().numpy()
        maps = out.anomaly_map.float().cpu().numpy()  # (B, S, S)
        masks = batch.mask.numpy() > 0.5  # (B, S, S)
        for i, cls_name in enumerate(batch.cls_name):
            if current is None or current[0] != cls_name:
                if current is not None:
                    finish(*current)
                current = (cls_name, _ClassState(pixel, overlay_rows))
            record = ImageRecord(
                path=batch.path[i],
                cls_name=cls_name,
                label=int(batch.label[i]),
                score=float(scores[i]),
                has_mask=bool(batch.has_mask[i]),
            )
            records.append(record)
            skipped += 0 if current[1].add(record, masks[i], maps[i]) else 1
        bar.update(len(batch.cls_name))
    bar.close()
    if current is not None:
        finish(*current)
    head = HeadSettings(model.cfg.head.alpha, model.cfg.head.beta, model.cfg.head.neighbour_kernel)
    return EvalResult(name, head, metrics, records, overlays, skipped, time.perf_counter() - start)


# ------------------------------------------------------------------------------ writing


def prepare_out_dir(out: Path, force: bool) -> None:
    """Create ``out``; refuse a non-empty one unless ``force`` (which clears our outputs)."""
    prepare_output_dir(
        out, force, (*REPORT_FILES, OVERLAY_DIR), "replace the evaluation results in it"
    )


def _scores_csv(records: Sequence[ImageRecord]) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "class", "label", "score", "has_mask"])
    for r in records:
        writer.writerow([r.path, r.cls_name, r.label, repr(r.score), int(r.has_mask)])
    return buf.getvalue().encode()


def _safe_name(cls_name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in cls_name) or "class"


def write_eval_outputs(
    result: EvalResult,
    out: str | os.PathLike[str],
    meta: dict[str, Any] | None = None,
    title: str | None = None,
) -> dict[str, Path]:
    """Write results.{md,csv,json}, scores.csv and overlays/<class>.png into ``out``."""
    out = Path(out)
    info = {
        "dataset": result.dataset,
        "alpha": result.head.alpha,
        "beta": result.head.beta,
        "neighbour_kernel": result.head.neighbour_kernel,
        "images": len(result.records),
        "pixel_metrics_skipped_images": result.pixel_skipped,
        "seconds": round(result.seconds, 2),
        **(meta or {}),
    }
    files = write_results(
        result.metrics,
        out,
        metrics=list(METRICS),
        title=title or f"CoPS zero-shot evaluation: {result.dataset}",
        meta=info,
    )
    atomic_write_bytes(out / SCORES_FILE, _scores_csv(result.records))
    paths = {"markdown": files.markdown, "csv": files.csv, "json": files.json}
    paths["scores"] = out / SCORES_FILE
    for cls_name, ov in result.overlays.items():
        if not ov.paths:
            continue
        png = out / OVERLAY_DIR / f"{_safe_name(cls_name)}.png"
        overlay_grid(
            ov.paths,
            ov.masks,
            ov.maps,
            png,
            max_rows=len(ov.paths),
            stretch=True,
            row_labels=ov.labels,
        )
        paths[f"overlay:{cls_name}"] = png
    return paths


def format_mean_row(label: str, mean: dict[str, float | None]) -> str:
    """One line: label and each mean metric in % (n/a when undefined)."""
    cells = [f"{m} {'n/a' if mean.get(m) is None else f'{100 * mean[m]:.1f}'}" for m in METRICS]
    return f"{label}: " + ", ".join(cells)


# ------------------------------------------------------------------------------ cops eval


@dataclass(frozen=True)
class EvalCfg:
    """What ``cops eval`` does."""

    data: Path
    dataset: str
    out: Path
    weights: Path
    clip_weights: str | None = None
    model: str | None = None
    preset: str = "paper"
    # None: the preset's value (--alpha, --beta, --kernel)
    alpha: float | None = None
    beta: float | None = None
    neighbour_kernel: int | None = None
    classes: tuple[str, ...] | None = None
    batch_size: int = 4
    device: str = "cpu"
    random_clip: bool = False
    seed: int = 0
    force: bool = False
    overlay_rows: int = 12
    progress: bool = True


def _own_format_info(weights: Path) -> dict[str, Any] | None:
    """config.json of a model saved by save_model (None for a reference checkpoint)."""
    if not is_own_format(weights):
        return None
    folder = weights if weights.is_dir() else weights.parent
    try:
        return json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{folder / CONFIG_FILE} cannot be read: {exc}") from exc


def load_eval_model(
    cfg: EvalCfg, head: HeadSettings, warn: Callable[[str], None] | None = None
) -> CopsModel:
    """The model ``cops eval`` evaluates: weights, CLIP, architecture and head preset."""
    weights = Path(cfg.weights)
    if not weights.exists():
        raise WeightsError(
            f"--weights {weights} does not exist. Fix: pass a reference CoPS .pth or the "
            "model folder a `cops train` run wrote (RUN/model)."
        )
    info = _own_format_info(weights)
    name = cfg.model or (info["model"]["name"] if info else "cops-vit-l-14-336")
    has_clip = bool(info and info.get("includes_clip"))
    if cfg.clip_weights is not None and cfg.random_clip:
        raise ConfigError("--clip-weights and --random-clip exclude each other. Fix: pass one.")
    if not has_clip and cfg.clip_weights is None and not cfg.random_clip:
        raise ConfigError(
            f"--weights {weights} holds no CLIP weights. Fix: pass --clip-weights (a "
            "ViT-L-14-336px file, or 'openai' to download it), or --random-clip when the "
            "model was trained on a random CLIP (`cops train --random-clip`, same --seed)."
        )
    model = create_model(
        name,
        clip_weights=cfg.clip_weights,
        cops_weights=weights,
        seed=cfg.seed,
        **head.overrides(),
    )
    trained_on = (info or {}).get("provenance", {}).get("clip")
    mismatch = trained_on and trained_on != model.provenance["clip"]
    if mismatch and not has_clip and warn is not None:
        warn(
            f"warning: {weights} was trained on CLIP {trained_on!r} but is evaluated with "
            f"{model.provenance['clip']!r}; the results will not be those of the trained model"
        )
    return model.to(cfg.device)


def run_eval(
    cfg: EvalCfg, warn: Callable[[str], None] | None = None
) -> tuple[EvalResult, dict[str, Path]]:
    """``cops eval``: check the output folder, load, evaluate, write; return result and files."""
    canonical_dataset(cfg.dataset)  # refuse an unknown name before any work
    head = preset_head(cfg.preset, cfg.dataset)
    given = {k: getattr(cfg, k) for k in ("alpha", "beta", "neighbour_kernel")}
    head = dataclasses.replace(head, **{k: v for k, v in given.items() if v is not None})
    prepare_out_dir(Path(cfg.out), cfg.force)
    model = load_eval_model(cfg, head, warn)
    result = evaluate_model(
        model,
        cfg.data,
        cfg.dataset,
        cfg.classes,
        cfg.batch_size,
        cfg.device,
        cfg.progress,
        cfg.overlay_rows,
    )
    meta = {
        "data": str(Path(cfg.data).resolve()),
        "model": model.cfg.name,
        "weights": str(cfg.weights),
        "clip": model.provenance["clip"],
        "preset": cfg.preset,
    }
    return result, write_eval_outputs(result, cfg.out, meta)
