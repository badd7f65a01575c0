"""Defect masks and regions: the pixels of an anomaly map at or above the pixel threshold, and
their connected components with a bounding box, area, peak and mean score each.

Pure functions over numpy arrays, torch-free; the Detector applies them to
``Prediction.anomaly_map_original`` so that regions are in the original image's pixels.

Rules (the C++ consumer in export/cpp applies the same ones; tests/edge/test_cpp.py compares):
- a pixel is in the mask when ``value >= pixel_threshold`` (at the threshold: in);
- regions are 8-connected (a pixel touches its 8 neighbours, as ``scipy.ndimage.label`` with a
  3x3 structure, and as AUPRO's ground-truth regions in :mod:`cops_deploy.evaluate.metrics`);
- regions smaller than ``min_area`` pixels are dropped, and their pixels leave the mask, so the
  mask is exactly the union of the regions returned;
- regions are numbered in raster order of their first pixel (top row first, then left to
  right), as ``scipy.ndimage.label`` numbers them.

Why not ``scipy.ndimage.label``: SciPy is a build-side package here (the run side's import
contract in ``.importlinter`` forbids it, and tests/edge/test_edge_install.py keeps it out of the
edge install): it would add about 140 MB to an edge environment of about 180 MB for one
function. The labelling below is the classic run-length union-find (a few dozen lines, numpy
vectorised except the union over touching runs); tests/runtime/test_regions.py checks it equals
``scipy.ndimage.label(mask, np.ones((3, 3)))`` on random masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cops_deploy.errors import ConfigError
from cops_deploy.imaging.preprocess import check_map

__all__ = ["Region", "check_min_area", "check_pixel_threshold", "defect_regions", "label_mask"]


@dataclass(frozen=True)
class Region:
    """One defect region, in the pixels of the map it was found on.

    Attributes:
        x, y: column and row of the bounding box's top-left pixel.
        width, height: size of the bounding box in pixels (the box covers columns x..x+width-1
            and rows y..y+height-1).
        area: number of pixels in the region.
        peak: largest map value in the region.
        mean: mean map value over the region's pixels.
    """

    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float
    mean: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: {'x', 'y', 'width', 'height', 'area', 'peak', 'mean'}."""
        return {
            "x": self.x,
            "y": self.y,
            "width": self.width,
            "height": self.height,
            "area": self.area,
            "peak": self.peak,
            "mean": self.mean,
        }


def check_pixel_threshold(value: object) -> float:
    """A finite number as float, or ConfigError naming what is valid."""
    ok = isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool)
    if not ok or not math.isfinite(float(value)):  # type: ignore[arg-type]
        raise ConfigError(
            f"invalid pixel threshold {value!r}; valid: a finite number (the map value from "
            f"which a pixel is defective). Fix: run `cops calibrate` or pass e.g. 0.5."
        )
    return float(value)  # type: ignore[arg-type]


def check_min_area(value: object) -> int:
    """An integer >= 1 as int, or ConfigError naming what is valid."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ConfigError(
            f"invalid min_area {value!r}; valid: an integer >= 1 (pixels; 1 keeps every "
            f"region). Fix: pass e.g. min_area=1 or --min-area 50."
        )
    return int(value)


def label_mask(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a 2-D boolean mask: (labels int32 (H, W), count).

    Background is 0; regions are 1..count in raster order of their first pixel, so the result
    equals ``scipy.ndimage.label(mask, structure=np.ones((3, 3)))``.
    """
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    # Runs of True per row, as (row, start, end) with end exclusive, in raster order.
    edges = np.diff(mask.astype(np.int8), axis=1, prepend=0, append=0)  # (H, W + 1)
    rows, starts = np.nonzero(edges == 1)
    _, ends = np.nonzero(edges == -1)
    n = rows.size
    labels = np.zeros((h, w), dtype=np.int32)
    if n == 0:
        return labels, 0
    # Runs a (row r - 1) and b (row r) touch (8-connected) when a.start <= b.end and
    # b.start <= a.end. With a key row * (W + 2) + column, both starts and ends are sorted, so
    # the runs of row r - 1 touching b are one contiguous index range [lo, hi).
    stride = w + 2
    start_keys = rows * stride + starts
    end_keys = rows * stride + ends
    above = (rows - 1) * stride
    lo = np.searchsorted(end_keys, above + starts, side="left")
    hi = np.searchsorted(start_keys, above + ends, side="right")
    counts = np.maximum(hi - lo, 0)
    b_index = np.repeat(np.arange(n), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)  # where each b's group begins
    a_index = np.repeat(lo, counts) + (np.arange(counts.sum()) - first)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in zip(a_index.tolist(), b_index.tolist(), strict=True):
        ra, rb = find(a), find(b)
        if ra != rb:  # the smaller run index (earlier in raster order) stays the root
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.fromiter((find(i) for i in range(n)), dtype=np.int64, count=n)
    # Roots are the first run of each region, so numbering roots in run order is raster order.
    is_root = roots == np.arange(n)
    number = np.cumsum(is_root).astype(np.int32)  # 1-based region number of each root
    run_label = number[roots]
    labels.reshape(-1)[np.flatnonzero(mask)] = np.repeat(run_label, ends - starts)
    return labels, int(is_root.sum())


def defect_regions(
    anomaly_map: np.ndarray, pixel_threshold: float, min_area: int = 1
) -> tuple[np.ndarray, list[Region]]:
    """The defect mask and regions of one anomaly map (see the module's rules).

    Args:
        anomaly_map: (H, W) real map, e.g. ``Prediction.anomaly_map_original``.
        pixel_threshold: a pixel is defective when its value is >= this.
        min_area: regions with fewer pixels are dropped (1 keeps all).

    Returns:
        (mask, regions): mask is a (H, W) bool array, True exactly on the returned regions'
        pixels; regions in raster order of their first pixel, in the map's pixel coordinates.

    Raises:
        ImageReadError: ``anomaly_map`` is not a 2-D real array.
        ConfigError: ``pixel_threshold`` or ``min_area`` is invalid.
    """
    values = check_map(anomaly_map)
    threshold = check_pixel_threshold(pixel_threshold)
    min_area = check_min_area(min_area)
    labels, count = label_mask(values >= threshold)
    if count == 0:
        return np.zeros(values.shape, dtype=bool), []
    flat = labels.ravel()
    inside = np.flatnonzero(flat)
    ids = flat[inside]
    pixel_values = values.ravel()[inside].astype(np.float64)
    area = np.bincount(ids, minlength=count + 1)[1:]
    total = np.bincount(ids, weights=pixel_values, minlength=count + 1)[1:]
    peak = np.full(count + 1, -np.inf)
    np.maximum.at(peak, ids, pixel_values)
    ys, xs = np.divmod(inside, values.shape[1])
    bounds = np.empty((4, count + 1), dtype=np.int64)
    bounds[:2], bounds[2:] = np.iinfo(np.int64).max, -1
    np.minimum.at(bounds[0], ids, xs)
    np.minimum.at(bounds[1], ids, ys)
    np.maximum.at(bounds[2], ids, xs)
    np.maximum.at(bounds[3], ids, ys)
    keep = np.flatnonzero(area >= min_area)  # 0-based: region number keep + 1
    regions = [
        Region(
            x=int(bounds[0, k + 1]),
            y=int(bounds[1, k + 1]),
            width=int(bounds[2, k + 1] - bounds[0, k + 1] + 1),
            height=int(bounds[3, k + 1] - bounds[1, k + 1] + 1),
            area=int(area[k]),
            peak=float(peak[k + 1]),
            mean=float(total[k] / area[k]),
        )
        for k in keep
    ]
    kept = np.zeros(count + 1, dtype=bool)
    kept[keep + 1] = True
    return kept[labels], regions
