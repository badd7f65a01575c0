"""Preprocessing: an RGB image to the model's input tensor, and anomaly maps back to image size.

Torch-free (numpy and Pillow only). The size, mean and std always come from the caller (the
bundle manifest or the model config): nothing about the model is a default here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cops_deploy.errors import ConfigError, ImageReadError
from cops_deploy.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    ImageSource,
    array_to_rgb,
    load_image,
)

__all__ = ["check_map", "preprocess", "preprocess_batch", "resize_map"]


def preprocess(
    rgb: np.ndarray,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """CLIP preprocessing of one image: a (3, size, size) float32 array.

    Resizes to (size, size) with PIL bicubic (no aspect keep; equal to torchvision's
    ``Resize((size, size), BICUBIC)`` on a PIL image), scales to [0, 1] and normalises per
    channel with ``mean`` and ``std``. ``rgb`` is an (H, W, 3) uint8 array as returned by
    :func:`load_image`; any other array :func:`load_image` accepts is converted first.

    Raises:
        ImageReadError: ``rgb`` has a dtype or shape that is not accepted.
        ConfigError: ``size``, ``mean`` or ``std`` is invalid.
    """
    if not isinstance(rgb, np.ndarray):
        raise ImageReadError(
            f"cannot preprocess: expected a numpy array, got {type(rgb).__name__}. "
            "Fix: pass load_image(source) instead."
        )
    _check_size(size)
    mean32, std32 = _check_norm(mean, "mean"), _check_norm(std, "std")
    rgb = array_to_rgb(rgb, what="image array")
    resized = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) / np.float32(255.0)  # (S, S, 3)
    x = (x - mean32) / std32
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # (3, S, S)


def preprocess_batch(
    sources: Sequence[ImageSource] | ImageSource,
    size: int,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Load and preprocess several images.

    Args:
        sources: a sequence of paths, PIL images or arrays (see :func:`load_image`). A single
            path or PIL image is a batch of one; a single numpy array is one image, unless it
            is 4-D (B, H, W, C), which is a batch.
        size, mean, std: as for :func:`preprocess`.
        max_pixels: the largest width x height a file may claim (see :func:`load_image`).

    Returns:
        A (B, 3, size, size) float32 array and the original (H, W) of each image (after EXIF
        orientation), in input order. An empty ``sources`` gives a (0, 3, size, size) array.

    Raises:
        ImageReadError: an image cannot be read; the message gives its index in the batch.
        ConfigError: ``size``, ``mean`` or ``std`` is invalid.
    """
    _check_size(size)
    if isinstance(sources, (str, os.PathLike, Image.Image)):
        items: list[ImageSource] = [sources]
    elif isinstance(sources, np.ndarray):
        items = list(sources) if sources.ndim == 4 else [sources]
    else:
        items = list(sources)
    batch = np.empty((len(items), 3, size, size), dtype=np.float32)
    sizes: list[tuple[int, int]] = []
    for i, item in enumerate(items):
        try:
            rgb = load_image(item, max_pixels=max_pixels)
        except ImageReadError as exc:
            raise ImageReadError(f"batch item {i} of {len(items)}: {exc}") from exc
        sizes.append((int(rgb.shape[0]), int(rgb.shape[1])))
        batch[i] = preprocess(rgb, size, mean, std)
    return batch, sizes


def resize_map(anomaly_map: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Resize a 2-D map to ``hw`` = (H, W) with PIL bilinear in mode 'F': float32 (H, W).

    Pillow's bilinear filter widens its support when shrinking (antialiasing); enlarging, the
    usual case (518 to the original size), is plain bilinear interpolation.

    Raises:
        ImageReadError: ``anomaly_map`` is not a 2-D real-valued array.
        ConfigError: ``hw`` is not two positive integers.
    """
    m = check_map(anomaly_map)
    h, w = _check_hw(hw)
    if m.shape == (h, w):
        return m.copy()
    out = Image.fromarray(m).resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32).copy()


def check_map(anomaly_map: np.ndarray) -> np.ndarray:
    """A 2-D real array as contiguous float32, or ImageReadError naming what is valid."""
    if not isinstance(anomaly_map, np.ndarray) or anomaly_map.ndim != 2:
        shape = getattr(anomaly_map, "shape", type(anomaly_map).__name__)
        raise ImageReadError(
            f"invalid anomaly map: got shape {shape}; valid: a 2-D (H, W) numpy array. "
            "Fix: pass one map of the batch, e.g. maps[i], or squeeze a (1, H, W) array."
        )
    if not (
        np.issubdtype(anomaly_map.dtype, np.floating)
        or np.issubdtype(anomaly_map.dtype, np.integer)
    ):
        raise ImageReadError(
            f"invalid anomaly map: dtype {anomaly_map.dtype}; valid: a real (float or integer) "
            "array. Fix: pass the float32 map returned by the detector."
        )
    if anomaly_map.shape[0] == 0 or anomaly_map.shape[1] == 0:
        raise ImageReadError(
            f"invalid anomaly map: shape {anomaly_map.shape} has no pixels; valid: H, W >= 1."
        )
    return np.ascontiguousarray(anomaly_map, dtype=np.float32)


def _check_hw(hw: tuple[int, int]) -> tuple[int, int]:
    """Two positive ints (H, W), or ConfigError."""
    try:
        h, w = hw
        ok = all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in (h, w)
        )
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"invalid target size hw={hw!r}; valid: two positive integers (H, W). "
            "Fix: pass the original image's (height, width), e.g. rgb.shape[:2]."
        )
    return int(h), int(w)


def _check_size(size: int) -> None:
    """Refuse a non-positive or non-integer preprocessing size."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(
            f"invalid preprocessing size {size!r}; valid: a positive integer. "
            "Fix: pass the size recorded in the bundle manifest (model_config.preprocess.size)."
        )


def _check_norm(values: Sequence[float], name: str) -> np.ndarray:
    """Three finite floats (std also > 0) as a float32 array, or ConfigError."""
    try:
        arr = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError):
        arr = np.zeros(0, dtype=np.float32)
    ok = arr.shape == (3,) and bool(np.isfinite(arr).all())
    if ok and name == "std":
        ok = bool((arr > 0).all())
    if not ok:
        rule = "three finite values > 0" if name == "std" else "three finite values"
        raise ConfigError(
            f"invalid normalisation {name} {values!r}; valid: {rule}, one per RGB channel. "
            f"Fix: pass the preprocessing {name} recorded with the model (its config or bundle)."
        )
    return arr
