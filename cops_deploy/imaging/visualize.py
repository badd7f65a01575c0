"""Heatmaps for anomaly maps: a numpy jet colormap, overlays and a three-panel PNG.

Torch-free (numpy and Pillow only). Anomaly maps are probabilities, so the colour scale is
fixed to 0..1 by default and heatmaps are comparable across images; ``normalize=True`` stretches
each map over its own min..max instead (shows structure, hides the absolute level).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cops_deploy.errors import ConfigError
from cops_deploy.fileio import atomic_write_bytes
from cops_deploy.imaging.decode import load_image
from cops_deploy.imaging.preprocess import check_map, resize_map

__all__ = [
    "JET_LUT",
    "MAX_PANEL_ASPECT",
    "blend",
    "check_alpha",
    "colorize",
    "colour_range",
    "heatmap",
    "overlay",
    "panel_size",
    "side_by_side",
]

# matplotlib's "jet" segment data: (x, y_left, y_right) per channel.
_JET_SEGMENTS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "red": ((0.0, 0, 0), (0.35, 0, 0), (0.66, 1, 1), (0.89, 1, 1), (1.0, 0.5, 0.5)),
    "green": ((0.0, 0, 0), (0.125, 0, 0), (0.375, 1, 1), (0.64, 1, 1), (0.91, 0, 0), (1.0, 0, 0)),
    "blue": ((0.0, 0.5, 0.5), (0.11, 1, 1), (0.34, 1, 1), (0.65, 0, 0), (1.0, 0, 0)),
}
_LUT_SIZE = 256
_CAPTION_H = 22  # pixels above the panels for the captions
_GAP = 4  # pixels between panels
_BACKGROUND = (255, 255, 255)
# A panel is at most this many tiles wide: a 10000 x 1 image gives a 2072 x 1 panel (padded to
# the tile's height), not a 5-gigapixel one. Aspect ratios up to 4:1 keep the full tile height.
MAX_PANEL_ASPECT = 4
_TEXT = (0, 0, 0)


def _segment_lut(segments: tuple[tuple[float, float, float], ...], n: int) -> np.ndarray:
    """Sample piecewise-linear segment data at n points, as matplotlib's lookup table does."""
    data = np.asarray(segments, dtype=np.float64)
    x, y0, y1 = data[:, 0] * (n - 1), data[:, 1], data[:, 2]
    xind = (n - 1) * np.linspace(0.0, 1.0, n)
    ind = np.searchsorted(x, xind)[1:-1]
    distance = (xind[1:-1] - x[ind - 1]) / (x[ind] - x[ind - 1])
    lut = np.concatenate([[y1[0]], distance * (y0[ind] - y1[ind - 1]) + y1[ind - 1], [y0[-1]]])
    return np.clip(lut, 0.0, 1.0)


def _build_jet_lut() -> np.ndarray:
    """(256, 3) uint8 jet table, equal to ``matplotlib.colormaps['jet'](x, bytes=True)``."""
    lut = np.stack([_segment_lut(_JET_SEGMENTS[c], _LUT_SIZE) for c in ("red", "green", "blue")])
    table = (lut.T * 255).astype(np.uint8)
    table.setflags(write=False)
    return table


JET_LUT: np.ndarray = _build_jet_lut()


def colorize(map01: np.ndarray) -> np.ndarray:
    """Colour a 2-D map of values in [0, 1] with jet: (H, W, 3) uint8 RGB.

    Values outside [0, 1] are clipped; NaN is drawn black. Equal to matplotlib's jet with 256
    colours (the map is taken as float32).

    Raises:
        ImageReadError: ``map01`` is not a 2-D real-valued array.
    """
    m = check_map(map01)
    nan = np.isnan(m)
    idx = np.clip(np.nan_to_num(m, nan=0.0), 0.0, 1.0) * _LUT_SIZE  # exact: power of two
    idx = np.minimum(idx.astype(np.int64), _LUT_SIZE - 1)
    out = JET_LUT[idx]
    out[nan] = 0
    return out


def colour_range(
    maps: Sequence[np.ndarray],
    vmin: float | None = None,
    vmax: float | None = None,
    stretch: bool = False,
    option: str = "stretch",
) -> tuple[float, float]:
    """(low, high) of the jet colour scale of ``maps``, drawn with one scale.

    Fixed by default: ``vmin``..``vmax``, None meaning 0 and 1 (the probability range), so
    heatmaps compare across images. ``stretch=True``: the min..max of the finite values of all
    ``maps`` (shows structure, hides the absolute level; exclusive with vmin/vmax). ``option``
    is the caller's name for ``stretch`` (``normalize``, ``stretch``), used in the message.

    Raises:
        ConfigError: vmin/vmax with ``stretch``, or a range that is not finite with low < high.
    """
    if stretch:
        if vmin is not None or vmax is not None:
            raise ConfigError(
                f"{option}=True with vmin={vmin!r}, vmax={vmax!r}: the two are exclusive; "
                f"{option} stretches the colours over the maps' own min..max. Fix: pass either "
                f"{option}=True or fixed vmin/vmax, not both."
            )
        finite = [m[np.isfinite(m)] for m in maps]
        values = np.concatenate([f.ravel() for f in finite]) if finite else np.empty(0)
        if not values.size:
            return 0.0, 1.0
        return float(values.min()), float(values.max())
    lo = 0.0 if vmin is None else float(vmin)
    hi = 1.0 if vmax is None else float(vmax)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ConfigError(
            f"invalid colour range vmin={vmin!r}, vmax={vmax!r}; valid: finite values with "
            "vmin < vmax (default 0 and 1, the probability range). Fix: pass vmin < vmax, "
            f"or {option}=True for the maps' own range."
        )
    return lo, hi


def heatmap(anomaly_map: np.ndarray, low: float, high: float) -> np.ndarray:
    """The jet heatmap of ``anomaly_map`` with ``low`` drawn coldest and ``high`` hottest:
    (H, W, 3) uint8. A constant range (high <= low) is drawn at the cold end."""
    m = check_map(anomaly_map)
    if high <= low:
        return colorize(np.zeros_like(m))
    return colorize((m - np.float32(low)) / np.float32(high - low))


def blend(rgb: np.ndarray, heat: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * rgb + alpha * heat``, rounded to uint8; both (H, W, 3) of one size."""
    a = check_alpha(alpha)
    out = (1.0 - a) * rgb.astype(np.float32) + a * heat.astype(np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def check_alpha(alpha: float) -> float:
    """Blend weight of a heatmap overlay in [0, 1], or ConfigError."""
    if isinstance(alpha, bool) or not (
        isinstance(alpha, (int, float, np.floating)) and 0.0 <= float(alpha) <= 1.0
    ):
        raise ConfigError(
            f"invalid overlay alpha {alpha!r}; valid: a number in [0, 1] (weight of the "
            "heatmap). Fix: pass e.g. alpha=0.5."
        )
    return float(alpha)


def overlay(
    rgb: np.ndarray,
    anomaly_map: np.ndarray,
    alpha: float = 0.5,
    vmin: float | None = None,
    vmax: float | None = None,
    normalize: bool = False,
) -> np.ndarray:
    """Blend the jet heatmap of ``anomaly_map`` over ``rgb``: (H, W, 3) uint8 at rgb's size.

    Args:
        rgb: the image, (H, W, 3) uint8 (any array :func:`load_image` accepts).
        anomaly_map: (h, w) map; resized bilinearly to (H, W) if its size differs.
        alpha: weight of the heatmap; 0 gives the image, 1 the heatmap.
        vmin, vmax: values drawn as the coldest and hottest colour; None means 0 and 1.
        normalize: use the map's own min and max instead (exclusive with vmin/vmax).

    Raises:
        ImageReadError: ``rgb`` or ``anomaly_map`` has an unaccepted dtype or shape.
        ConfigError: ``alpha``, ``vmin``/``vmax`` or ``normalize`` is invalid.
    """
    check_alpha(alpha)
    image = load_image(rgb)
    m = resize_map(check_map(anomaly_map), image.shape[:2])
    lo, hi = colour_range([m], vmin, vmax, normalize, option="normalize")
    return blend(image, heatmap(m, lo, hi), alpha)


def side_by_side(
    rgb: np.ndarray,
    anomaly_map: np.ndarray,
    out_path: str | os.PathLike[str],
    score: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    normalize: bool = False,
    alpha: float = 0.5,
    tile: int = 518,
) -> Path:
    """Write a PNG with three panels: the image, the heatmap and the overlay.

    Each panel keeps the image's aspect ratio and fits in ``tile`` pixels of height and
    ``MAX_PANEL_ASPECT * tile`` of width: ``tile`` high and ``max(1, round(W * tile / H))`` wide
    up to a 4:1 aspect, wider images are scaled to that width (height at least 1) and padded
    with white below. So the picture is at most ``3 * 4 * tile + 8`` by ``tile + 22`` pixels
    whatever the image's shape (a 1 x 10000 or 10000 x 1 image included). Panels are separated
    by 4 white pixels and a 22-pixel caption strip above them names each panel, the colour range
    and, if given, the score. The PNG is written to a temporary file beside ``out_path`` and
    renamed over it (atomic); missing parent directories are created.

    Args:
        rgb, anomaly_map, alpha, vmin, vmax, normalize: as for :func:`overlay` (default colour
            range 0..1, fixed so heatmaps are comparable across images).
        out_path: destination, with suffix '.png'.
        score: the image score, shown in the caption when given.
        tile: panel height in pixels.

    Returns:
        ``out_path`` as a Path.

    Raises:
        ImageReadError: ``rgb`` or ``anomaly_map`` has an unaccepted dtype or shape.
        ConfigError: ``out_path`` does not end in '.png', or another argument is invalid.
        OSError: the file cannot be written (no temporary file is left behind).
    """
    out = Path(out_path)
    if out.suffix.lower() != ".png":
        raise ConfigError(
            f"invalid output path {str(out)!r}: suffix {out.suffix or '(none)'!r}; valid: '.png' "
            f"(the panels are written as PNG). Fix: use {str(out.with_suffix('.png'))!r}."
        )
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ConfigError(
            f"invalid tile height {tile!r}; valid: a positive integer. Fix: pass e.g. tile=518."
        )
    if score is not None and not isinstance(score, (int, float, np.floating, np.integer)):
        raise ConfigError(
            f"invalid score {score!r} of type {type(score).__name__}; valid: a number or None. "
            "Fix: pass float(score)."
        )
    check_alpha(alpha)
    image = load_image(rgb)
    h, w = image.shape[:2]
    th, tw = panel_size(h, w, tile)

    img_tile = np.asarray(
        Image.fromarray(image).resize((tw, th), Image.Resampling.BICUBIC), dtype=np.uint8
    )
    map_tile = resize_map(check_map(anomaly_map), (th, tw))
    lo, hi = colour_range([map_tile], vmin, vmax, normalize, option="normalize")
    heat = heatmap(map_tile, lo, hi)
    over = blend(img_tile, heat, alpha)

    canvas = Image.new("RGB", (3 * tw + 2 * _GAP, _CAPTION_H + tile), _BACKGROUND)
    range_name = "min-max" if normalize else "range"
    captions = [
        f"image {w}x{h}",
        f"anomaly map ({range_name} {lo:.3g}..{hi:.3g})",
        "overlay" if score is None else f"overlay  score {float(score):.4f}",
    ]
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (panel, caption) in enumerate(zip((img_tile, heat, over), captions, strict=True)):
        x = i * (tw + _GAP)
        canvas.paste(Image.fromarray(panel), (x, _CAPTION_H))
        draw.text((x + 4, 4), caption, fill=_TEXT, font=font)

    _save_png_atomic(canvas, out)
    return out


def panel_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """(height, width) of a :func:`side_by_side` panel for an image of ``height`` x ``width``:
    the aspect ratio kept, within ``tile`` x ``MAX_PANEL_ASPECT * tile``, each side >= 1."""
    scale = min(tile / height, MAX_PANEL_ASPECT * tile / width)
    th = min(tile, max(1, round(height * scale)))
    tw = min(MAX_PANEL_ASPECT * tile, max(1, round(width * scale)))
    return th, tw


def _save_png_atomic(img: Image.Image, out: Path) -> None:
    """Encode ``img`` as PNG and write it to ``out`` atomically."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    atomic_write_bytes(out, buffer.getvalue(), mode=0o644)
