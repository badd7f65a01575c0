"""Result pictures for the line: defect regions outlined and the decision printed on an image.

Torch-free (numpy and Pillow's ImageDraw). Takes plain values (boxes, a decision) so that it
serves any caller: ``Prediction.regions`` (cops_deploy.runtime.regions.Region has x, y, width,
height) or boxes from elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cops_deploy.errors import ConfigError
from cops_deploy.imaging.decode import load_image

__all__ = ["ANOMALOUS_COLOUR", "NORMAL_COLOUR", "UNDECIDED_COLOUR", "Box", "annotate", "verdict"]

ANOMALOUS_COLOUR = (230, 30, 30)
NORMAL_COLOUR = (20, 170, 60)
UNDECIDED_COLOUR = (128, 128, 128)
_BANNER_TEXT = (255, 255, 255)


class Box(Protocol):
    """Anything with a bounding box in pixels (e.g. cops_deploy.runtime.regions.Region)."""

    x: int
    y: int
    width: int
    height: int


def verdict(is_anomalous: bool | None) -> str:
    """'ANOMALOUS', 'OK', or 'NO THRESHOLD' (no decision: the bundle is not calibrated)."""
    if is_anomalous is None:
        return "NO THRESHOLD"
    return "ANOMALOUS" if is_anomalous else "OK"


def annotate(
    image: np.ndarray,
    regions: Sequence[Box] = (),
    is_anomalous: bool | None = None,
    score: float | None = None,
    threshold: float | None = None,
    line_width: int | None = None,
) -> np.ndarray:
    """A copy of ``image`` with each region's bounding box outlined and a banner at the top
    with the decision (and score vs threshold, when given): (H, W, 3) uint8.

    Args:
        image: the original image (any array :func:`load_image` accepts), in the regions'
            coordinates (``Prediction.regions`` are in the original image's pixels).
        regions: boxes to outline (x, y, width, height), drawn in the decision's colour.
        is_anomalous: the decision; None prints 'NO THRESHOLD' (nothing pretends to decide).
        score, threshold: printed after the decision when given.
        line_width: outline width in pixels; None: about 0.4% of the image's longer side
            (at least 1).

    Raises:
        ImageReadError: ``image`` has an unaccepted dtype or shape.
        ConfigError: ``line_width`` is not a positive integer, or a region lies outside the
            image.
    """
    rgb = load_image(image)
    h, w = rgb.shape[:2]
    if line_width is None:
        line_width = max(1, round(max(h, w) * 0.004))
    if isinstance(line_width, bool) or not isinstance(line_width, int) or line_width < 1:
        raise ConfigError(
            f"invalid line_width {line_width!r}; valid: an integer >= 1 (pixels) or None. "
            f"Fix: pass e.g. line_width=2."
        )
    colour = {None: UNDECIDED_COLOUR, True: ANOMALOUS_COLOUR, False: NORMAL_COLOUR}[is_anomalous]
    canvas = Image.fromarray(rgb)
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(regions):
        x0, y0, x1, y1 = r.x, r.y, r.x + r.width - 1, r.y + r.height - 1
        if x0 < 0 or y0 < 0 or x1 >= w or y1 >= h or r.width < 1 or r.height < 1:
            raise ConfigError(
                f"region {i} (x={r.x}, y={r.y}, width={r.width}, height={r.height}) is outside "
                f"the {w}x{h} image; valid: boxes in the image's pixels. Fix: pass the original "
                f"image (Prediction.regions are in its coordinates), not a resized one."
            )
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=line_width)
    text = verdict(is_anomalous)
    if score is not None:
        text += f"  score {score:.4f}"
        if threshold is not None:
            text += f" {'>=' if is_anomalous else '<'} {threshold:.4f}"
    font = ImageFont.load_default(size=max(10, min(h, w) // 16))
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    pad = 3
    draw.rectangle((0, 0, right - left + 2 * pad, bottom - top + 2 * pad), fill=colour)
    draw.text((pad - left, pad - top), text, fill=_BANNER_TEXT, font=font)
    return np.asarray(canvas, dtype=np.uint8).copy()
