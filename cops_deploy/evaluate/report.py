"""Evaluation reports: per-class metric tables (Markdown, CSV, JSON) and heatmap overlay grids.

``write_results`` takes ``{class: {metric: value or None}}`` with values as fractions in [0, 1]
(what :mod:`cops_deploy.evaluate.metrics` returns) and writes, each atomically (a temporary file
in the same folder, then ``os.replace``):

- ``results.md``: a Markdown table in %, one row per class and a **Mean** row; an undefined
  metric (None) shows as ``n/a`` and is left out of that metric's mean, which the note under the
  table says, with how many classes each such mean covers.
- ``results.csv``: the same table, unrounded fractions, ``n/a`` for None, last row ``mean``.
- ``results.json``: ``{"title", "meta", "unit": "fraction", "metrics", "classes", "mean",
  "mean_count"}``, None as null.

``overlay_grid`` writes a PNG with one row per image: image | ground truth | heatmap overlay,
drawn with numpy and Pillow only, with the run side's jet colormap and image reader
(:mod:`cops_deploy.imaging.visualize`, :mod:`cops_deploy.imaging`): no OpenCV, no
matplotlib.

Torch-free.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from cops_deploy.errors import ConfigError
from cops_deploy.evaluate.metrics import IMAGE_METRICS, PIXEL_METRICS
from cops_deploy.fileio import atomic_write_bytes
from cops_deploy.imaging.decode import ImageSource, load_image
from cops_deploy.imaging.preprocess import resize_map
from cops_deploy.imaging.visualize import blend, check_alpha, colour_range, heatmap

__all__ = [
    "METRIC_ORDER",
    "ResultFiles",
    "Results",
    "format_markdown",
    "mean_over_classes",
    "overlay_grid",
    "write_results",
]

METRIC_ORDER: tuple[str, ...] = IMAGE_METRICS + PIXEL_METRICS
NA = "n/a"

Results: TypeAlias = Mapping[str, Mapping[str, float | None]]
PathInput: TypeAlias = str | os.PathLike[str]


class ResultFiles(NamedTuple):
    """Paths written by :func:`write_results`."""

    markdown: Path
    csv: Path
    json: Path


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------


def _check_value(cls: str, metric: str, value: object) -> float | None:
    """A metric value as a float in [0, 1] or None, or ConfigError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(
            f"invalid result for class {cls!r}, metric {metric!r}: {value!r} "
            f"({type(value).__name__}); valid: a number in [0, 1] or None. Fix: pass the values "
            "returned by cops_deploy.evaluate.metrics."
        )
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ConfigError(
            f"invalid result for class {cls!r}, metric {metric!r}: {number!r}; valid: a fraction "
            "in [0, 1], or None for an undefined metric. Fix: divide percentages by 100 and "
            "use None, not NaN or -1, where a metric is undefined."
        )
    return number


def _normalise(
    results: Results, metrics: Sequence[str] | None
) -> tuple[list[str], dict[str, dict[str, float | None]]]:
    """Checked (metric columns, {class: {metric: value}}); a missing metric becomes None."""
    if not isinstance(results, Mapping) or not results:
        got = "no classes" if isinstance(results, Mapping) else f"a {type(results).__name__}"
        raise ConfigError(
            f"invalid results: {got}; valid: a non-empty mapping "
            "{class name: {metric name: value}}. Fix: evaluate at least one class."
        )
    for cls, row in results.items():
        if not isinstance(cls, str) or not isinstance(row, Mapping):
            raise ConfigError(
                f"invalid results entry {cls!r}: {type(row).__name__}; valid: a class name (str) "
                "mapped to {metric name: value}."
            )
    if metrics is None:
        seen = {m for row in results.values() for m in row}
        columns = [m for m in METRIC_ORDER if m in seen]
        columns += sorted(seen - set(columns))
    else:
        columns = list(metrics)
    if not columns:
        raise ConfigError("invalid results: no metric in any class; valid: at least one metric.")
    table = {
        cls: {m: _check_value(cls, m, row.get(m)) for m in columns} for cls, row in results.items()
    }
    return columns, table


def mean_over_classes(
    results: Results, metrics: Sequence[str] | None = None
) -> tuple[dict[str, float | None], dict[str, int]]:
    """Per metric, the mean over the classes that have a value, and how many classes that is.

    None entries (n/a) are left out; a metric with no value in any class has mean None.
    """
    columns, table = _normalise(results, metrics)
    means: dict[str, float | None] = {}
    counts: dict[str, int] = {}
    for m in columns:
        values = [row[m] for row in table.values() if row[m] is not None]
        counts[m] = len(values)
        means[m] = math.fsum(values) / len(values) if values else None  # type: ignore[arg-type]
    return means, counts


def _pct(value: float | None, decimals: int) -> str:
    """A fraction as a percentage string, or 'n/a'."""
    return NA if value is None else f"{100.0 * value:.{decimals}f}"


def _md_cell(text: str) -> str:
    """Escape a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def format_markdown(
    results: Results,
    metrics: Sequence[str] | None = None,
    *,
    title: str | None = None,
    meta: Mapping[str, Any] | None = None,
    decimals: int = 1,
) -> str:
    """The ``results.md`` text: a table in % with a Mean row and a note on n/a entries."""
    columns, table = _normalise(results, metrics)
    means, counts = mean_over_classes(table, columns)
    lines: list[str] = []
    if title:
        lines += [f"# {title}", ""]
    if meta:
        lines += [f"- {key}: {value}" for key, value in meta.items()] + [""]
    lines.append("| Class | " + " | ".join(_md_cell(m) for m in columns) + " |")
    lines.append("|:--|" + "--:|" * len(columns))
    for cls, row in table.items():
        cells = [_pct(row[m], decimals) for m in columns]
        lines.append(f"| {_md_cell(cls)} | " + " | ".join(cells) + " |")
    mean_cells = [f"**{_pct(means[m], decimals)}**" for m in columns]
    lines.append("| **Mean** | " + " | ".join(mean_cells) + " |")
    lines.append("")
    n_cls = len(table)
    partial = [f"{m} over {counts[m]} of {n_cls}" for m in columns if counts[m] < n_cls]
    note = f"Values in %. Mean over classes ({n_cls})"
    if partial:
        note += "; n/a entries are left out of the mean: " + ", ".join(partial) + " classes."
    else:
        note += "; no n/a entries."
    lines += [note, ""]
    return "\n".join(lines)


def _csv_text(table: dict[str, dict[str, float | None]], columns: list[str]) -> str:
    """The ``results.csv`` text: unrounded fractions, 'n/a' for None, last row 'mean'."""
    means, _ = mean_over_classes(table, columns)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["class", *columns])
    for cls, row in [*table.items(), ("mean", means)]:
        writer.writerow([cls, *(NA if row[m] is None else repr(row[m]) for m in columns)])
    return buf.getvalue()


def _make_dir(folder: Path) -> None:
    """Create ``folder`` and its parents, or ConfigError naming it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the output folder {folder}: {exc.strerror or exc}. Fix: pass a "
            "writable folder."
        ) from exc


def write_results(
    results: Results,
    out_dir: PathInput,
    *,
    metrics: Sequence[str] | None = None,
    title: str | None = None,
    meta: Mapping[str, Any] | None = None,
    decimals: int = 1,
) -> ResultFiles:
    """Write ``results.md``, ``results.csv`` and ``results.json`` into ``out_dir`` (created).

    ``results`` maps class -> metric -> fraction in [0, 1] or None; ``metrics`` fixes the
    columns (default: the metrics present, in :data:`METRIC_ORDER` first); ``meta`` (JSON
    values: dataset, model, weights...) is listed under the title and stored in the JSON.
    """
    columns, table = _normalise(results, metrics)
    means, counts = mean_over_classes(table, columns)
    payload = {
        "title": title,
        "meta": dict(meta) if meta else {},
        "unit": "fraction",
        "metrics": columns,
        "classes": table,
        "mean": means,
        "mean_count": counts,
    }
    try:
        json_text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"invalid meta {meta!r}: not JSON-serialisable ({exc}); valid: str, numbers, bool, "
            "None, lists and dicts. Fix: convert paths and other objects with str()."
        ) from exc
    out = Path(out_dir)
    _make_dir(out)
    files = ResultFiles(out / "results.md", out / "results.csv", out / "results.json")
    md_text = format_markdown(table, columns, title=title, meta=meta, decimals=decimals)
    atomic_write_bytes(files.markdown, md_text.encode("utf-8"))
    atomic_write_bytes(files.csv, _csv_text(table, columns).encode("utf-8"))
    atomic_write_bytes(files.json, json_text.encode("utf-8"))
    return files


# ----------------------------------------------------------------------------------------------
# Overlay grid
# ----------------------------------------------------------------------------------------------

_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
_GAP = 2
_HEADER = 18


def _mask_tile(mask: npt.ArrayLike | None, tile: int, index: int) -> np.ndarray:
    """A ground-truth mask (None: all normal) as a white-on-black (tile, tile, 3) uint8."""
    if mask is None:
        return np.zeros((tile, tile, 3), dtype=np.uint8)
    arr = np.asarray(mask)
    if (
        arr.ndim != 2
        or arr.size == 0
        or not (arr.dtype == np.bool_ or np.issubdtype(arr.dtype, np.number))
    ):
        raise ConfigError(
            f"invalid ground-truth mask {index}: shape {arr.shape}, dtype {arr.dtype}; valid: "
            "a numeric or bool (H, W) array, nonzero = anomalous, or None for no anomaly."
        )
    pil = Image.fromarray(np.where(arr > 0, 255, 0).astype(np.uint8))
    small = np.asarray(pil.resize((tile, tile), Image.Resampling.NEAREST))
    return np.repeat(small[..., None], 3, axis=2)


def _check_maps(maps: Sequence[npt.ArrayLike], n_rows: int) -> list[np.ndarray]:
    """The first ``n_rows`` maps as finite 2-D float32 arrays, or ConfigError naming the bad one."""
    out: list[np.ndarray] = []
    for i in range(n_rows):
        arr = np.asarray(maps[i])
        if (
            arr.ndim != 2
            or arr.size == 0
            or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating))
        ):
            raise ConfigError(
                f"invalid anomaly map {i}: shape {arr.shape}, dtype {arr.dtype}; valid: a "
                "numeric (H, W) array. Fix: squeeze the batch and channel axes, e.g. maps[i, 0]."
            )
        if not np.isfinite(arr).all():
            raise ConfigError(
                f"invalid anomaly map {i}: it holds NaN or inf; valid: finite values. Fix: "
                "check the model output for this image."
            )
        out.append(arr.astype(np.float32))
    return out


def _check_grid_args(
    n: int, n_masks: int, n_maps: int, n_labels: int | None, max_rows: int, tile: int
) -> None:
    """Refuse mismatched lengths and out-of-range layout arguments."""
    if n == 0 or n_masks != n or n_maps != n or n_labels not in (None, n):
        raise ConfigError(
            f"overlay_grid got {n} images, {n_masks} masks, {n_maps} maps and "
            f"{'no' if n_labels is None else n_labels} row labels; valid: the same non-zero "
            "number of each (a mask may be None; row labels are optional). Fix: pass one of "
            "each per image, in the same order."
        )
    for name, value, low in (("max_rows", max_rows, 1), ("tile", tile, 16)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ConfigError(
                f"invalid {name} {value!r}; valid: an integer >= {low}. Fix: pass e.g. "
                f"{name}={16 if name == 'max_rows' else 256}."
            )


def overlay_grid(
    images: Sequence[ImageSource],
    gt_masks: Sequence[npt.ArrayLike | None] | None,
    maps: Sequence[npt.ArrayLike],
    out_png: PathInput,
    *,
    max_rows: int = 16,
    tile: int = 256,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    stretch: bool = False,
    row_labels: Sequence[str] | None = None,
) -> Path:
    """Write a PNG grid, one row per image: image | ground truth | heatmap overlay.

    ``images``: anything :func:`cops_deploy.imaging.load_image` reads (paths, PIL
    images, uint8 arrays); ``gt_masks``: (H, W) arrays, nonzero = anomalous, None for no mask
    (drawn black), or None for no masks at all; ``maps``: (H, W) anomaly maps. Each panel is
    resized to a ``tile`` x ``tile`` square; only the first ``max_rows`` images are drawn.

    The jet colour scale (:func:`cops_deploy.imaging.visualize.colour_range`) runs from ``vmin``
    to ``vmax``, 0 and 1 by default as for ``side_by_side``; ``stretch=True`` uses the min and
    max over all drawn maps instead (one scale for the grid, so rows still compare).
    ``row_labels`` (e.g. file name and score) are written on the image panels. The PNG is
    written atomically; missing folders are created. Returns its path.
    """
    masks = [None] * len(images) if gt_masks is None else list(gt_masks)
    n_labels = None if row_labels is None else len(row_labels)
    _check_grid_args(len(images), len(masks), len(maps), n_labels, max_rows, tile)
    check_alpha(alpha)
    n_rows = min(len(images), int(max_rows))
    map_arrays = _check_maps(maps, n_rows)
    lo, hi = colour_range(map_arrays, vmin, vmax, stretch, option="stretch")

    width = 3 * tile + 4 * _GAP
    canvas = Image.new("RGB", (width, _HEADER + n_rows * (tile + _GAP) + _GAP), _BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    captions = ("image", "ground truth", f"overlay (range {lo:.3g}..{hi:.3g})")
    for col, caption in enumerate(captions):
        draw.text((_GAP + col * (tile + _GAP) + 4, 3), caption, fill=_TEXT)
    for i in range(n_rows):
        top = _HEADER + i * (tile + _GAP)
        rgb = Image.fromarray(load_image(images[i])).resize((tile, tile), Image.Resampling.BICUBIC)
        heat = heatmap(resize_map(map_arrays[i], (tile, tile)), lo, hi)
        panels = (rgb, _mask_tile(masks[i], tile, i), blend(np.asarray(rgb), heat, alpha))
        for col, panel in enumerate(panels):
            image = panel if isinstance(panel, Image.Image) else Image.fromarray(panel)
            canvas.paste(image, (_GAP + col * (tile + _GAP), top))
        if row_labels is not None:
            xy = (_GAP + 4, top + 4)
            box = draw.textbbox(xy, str(row_labels[i]))
            draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
            draw.text(xy, str(row_labels[i]), fill=(255, 255, 255))
    path = Path(out_png)
    _make_dir(path.parent)
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path
