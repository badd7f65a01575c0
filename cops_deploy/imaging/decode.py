"""Decoding: read any image (file, PIL image or array) as 8-bit RGB, and find image files.

Torch-free (numpy and Pillow only); used by the run side and by training alike. Conversion rules, applied the same way to files, PIL images
and arrays:

- EXIF orientation is applied (``PIL.ImageOps.exif_transpose``) to files and PIL images.
- Alpha ('RGBA', 'LA', 'PA', palette transparency) is dropped, as ``Image.convert('RGB')``
  does: the colour channels are kept as stored, not composited over a background.
- Grey ('L', '1', 'I;16', 'I', 'F') is repeated over the three channels; '1' maps to 0/255.
- 16-bit data ('I;16*', uint16 arrays) is scaled over the full 16-bit range: ``value >> 8``.
  'I' (32-bit integer) is first clipped to 0..65535, then scaled the same way.
- 'F' (32-bit float): if every value lies in [0, 1] it is scaled by 255, otherwise it is
  clipped to [0, 255] (as ``convert('L')`` does); both are rounded. NaN or inf is refused.
- 'CMYK', 'YCbCr', 'LAB', 'HSV' and other modes go through Pillow's ``convert('RGB')``
  (embedded ICC profiles are not applied).
- Multi-frame files (GIF, TIFF) give their first frame.
- Files are fully decoded, so a truncated file is detected and refused (this relies on
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeping its default, False); PNG chunk checksums and
  the end marker are verified as well.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image, ImageOps

from cops_deploy.errors import ImageReadError

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "PathInput",
    "array_to_rgb",
    "iter_image_files",
    "load_image",
]

# Suffixes a folder is searched for (any case): the one list for prediction and datasets.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
)

ImageSource: TypeAlias = str | os.PathLike[str] | Image.Image | np.ndarray
PathInput: TypeAlias = str | os.PathLike[str]

_ACCEPTED_ARRAYS = "uint8 or uint16 arrays of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
_ACCEPTED_SOURCES = "a path (str or os.PathLike), a PIL.Image.Image or a numpy array"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_image(source: ImageSource) -> np.ndarray:
    """Read ``source`` as an (H, W, 3) uint8 RGB array (see the module docstring for the rules).

    Args:
        source: an image file path, a ``PIL.Image.Image`` or a numpy array (uint8 or uint16;
            (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA).

    Raises:
        ImageReadError: the file is missing, empty, not an image, truncated or corrupt; or the
            array has a dtype or shape that is not accepted; or ``source`` has another type.
    """
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, what="image array")
    if isinstance(source, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(source), what="PIL image")
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source))
    raise ImageReadError(
        f"cannot read image: got an object of type {type(source).__name__}; "
        f"accepted: {_ACCEPTED_SOURCES}. Fix: pass one of those."
    )


def _load_file(path: Path) -> np.ndarray:
    """Open, fully decode and convert one image file."""
    if not path.exists():
        raise ImageReadError(
            f"cannot read image {str(path)!r}: no such file. "
            "Fix: check the path (relative paths start from the working directory)."
        )
    if path.is_dir():
        raise ImageReadError(
            f"cannot read image {str(path)!r}: it is a directory, not an image file. "
            "Fix: pass the files, or expand the directory with iter_image_files()."
        )
    if path.stat().st_size == 0:
        raise ImageReadError(
            f"cannot read image {str(path)!r}: the file is empty (0 bytes). "
            "Fix: re-copy or re-export the image."
        )
    try:
        with Image.open(path) as img:
            is_png = img.format == "PNG"
            if is_png:
                img.verify()  # chunk checksums and the IEND marker; consumes the file
        with Image.open(path) as img:
            img.load()  # full decode: raises on a truncated file
            return _pil_to_rgb(ImageOps.exif_transpose(img), what=f"image {str(path)!r}")
    except (ImageReadError, MemoryError):
        raise
    except Image.UnidentifiedImageError as exc:
        raise ImageReadError(
            f"cannot read image {str(path)!r}: not a recognised image format "
            f"(suffix {path.suffix or '(none)'!r}). Valid: a file Pillow can decode "
            f"(PNG, JPEG, BMP, TIFF, WebP, ...). Fix: pass an image file or convert it."
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"cannot read image {str(path)!r}: {exc}. "
            "Fix: downscale the image, or raise PIL.Image.MAX_IMAGE_PIXELS if it is trusted."
        ) from exc
    except PermissionError as exc:
        raise ImageReadError(
            f"cannot read image {str(path)!r}: permission denied. "
            "Fix: make the file readable by this process."
        ) from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageReadError(
            f"cannot read image {str(path)!r}: the file is truncated or corrupt "
            f"({type(exc).__name__}: {exc}). Valid: a complete image file. "
            "Fix: re-copy or re-export the image."
        ) from exc


def _pil_to_rgb(img: Image.Image, what: str) -> np.ndarray:
    """Convert a decoded PIL image of any mode to (H, W, 3) uint8 RGB."""
    mode = img.mode
    if mode == "RGB":
        return np.array(img, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        data = np.asarray(img)
        if data.ndim != 2:
            raise ImageReadError(
                f"cannot convert {what}: mode {mode!r} gave an array of shape {data.shape}; "
                "expected (H, W). Fix: convert the image to 8-bit RGB first."
            )
        grey = (np.clip(data.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)
        return _grey_to_rgb(grey)
    if mode == "F":
        return _grey_to_rgb(_float_to_uint8(np.asarray(img, dtype=np.float32), what))
    if mode == "P" or mode == "PA":
        # Through RGBA so palette transparency is handled by Pillow, then drop alpha.
        return np.array(img.convert("RGBA").convert("RGB"), dtype=np.uint8)
    try:
        return np.array(img.convert("RGB"), dtype=np.uint8)
    except (ValueError, OSError) as exc:
        raise ImageReadError(
            f"cannot convert {what}: Pillow cannot convert mode {mode!r} to RGB ({exc}). "
            "Valid: 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16, I, F and other modes "
            "convertible to RGB. Fix: convert the image to RGB before passing it."
        ) from exc


def _float_to_uint8(data: np.ndarray, what: str) -> np.ndarray:
    """Map float grey values to uint8: [0, 1] is scaled by 255, any other range is clipped."""
    finite = np.isfinite(data)
    if not finite.all():
        raise ImageReadError(
            f"cannot convert {what}: float image has {int((~finite).sum())} NaN or inf "
            "pixels; valid: finite values. Fix: replace them (e.g. numpy.nan_to_num) first."
        )
    if data.size and data.min() >= 0.0 and data.max() <= 1.0:
        data = data * 255.0
    return np.clip(np.rint(data), 0, 255).astype(np.uint8)


def _grey_to_rgb(grey: np.ndarray) -> np.ndarray:
    """(H, W) uint8 -> (H, W, 3) uint8."""
    return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))


def array_to_rgb(arr: np.ndarray, what: str = "image array") -> np.ndarray:
    """Validate and convert a uint8/uint16 array to (H, W, 3) uint8 RGB (ImageReadError if not
    accepted; ``what`` names the array in the message)."""
    if arr.dtype.kind != "u" or arr.dtype.itemsize not in (1, 2):
        raise ImageReadError(
            f"cannot convert {what}: dtype {arr.dtype} is not accepted; accepted: "
            f"{_ACCEPTED_ARRAYS}. Fix: for floats in [0, 1] pass "
            "(x * 255).round().astype(numpy.uint8)."
        )
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not shape_ok:
        raise ImageReadError(
            f"cannot convert {what}: shape {arr.shape} is not accepted; accepted: "
            f"{_ACCEPTED_ARRAYS} (channels last). Fix: for a (3, H, W) array pass "
            "arr.transpose(1, 2, 0); pass a batch as a list of images."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(
            f"cannot convert {what}: shape {arr.shape} has no pixels; valid: H >= 1 and "
            "W >= 1. Fix: check how the array was produced."
        )
    if arr.dtype.itemsize == 2:
        arr = (arr >> 8).astype(np.uint8)
    if arr.ndim == 2:
        return _grey_to_rgb(arr)
    if arr.shape[2] == 1:
        return _grey_to_rgb(arr[:, :, 0])
    return np.ascontiguousarray(arr[:, :, :3], dtype=np.uint8)  # drop alpha


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def iter_image_files(paths: PathInput | Iterable[PathInput]) -> list[Path]:
    """Expand files and directories into a list of image files.

    A directory is searched recursively for files whose suffix (any case) is in
    :data:`IMAGE_EXTENSIONS`, sorted by path; hidden files and directories (name starting with
    '.') inside it are skipped. A file named explicitly is kept whatever its suffix, so that a
    non-image file is reported when it is read, not silently dropped. Order follows ``paths``;
    a file reached twice is listed once. A directory without images contributes nothing.

    Raises:
        ImageReadError: a path does not exist.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    out: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)

    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            for f in _images_under(p):
                add(f)
        elif p.exists():
            add(p)
        else:
            raise ImageReadError(
                f"input path {str(p)!r} does not exist; valid: an existing image file or a "
                "directory of images. Fix: check the path (relative paths start from the "
                f"working directory, {os.getcwd()!r})."
            )
    return out


def _images_under(root: Path) -> list[Path]:
    """Image files under ``root``, recursive, sorted, hidden entries skipped."""
    found = []
    for f in root.rglob("*"):
        rel = f.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file():
            found.append(f)
    return sorted(found)
