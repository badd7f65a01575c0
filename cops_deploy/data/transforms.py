"""Ground-truth masks at the model resolution, as the reference evaluation prepares them.

``load_mask`` reproduces the reference target pipeline (METHOD.md section 6): the mask file is
read as greyscale and binarised to 0/255 (any non-zero value is foreground), resized to
``size x size`` with PIL's BILINEAR filter (what torchvision's ``Resize`` does to a PIL image),
scaled to [0, 1] as float32 (``ToTensor``) and thresholded at > 0.5. An image without a mask
(``mask_path == ""``, a good image) gets an all-False mask. Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from cops_deploy.errors import ConfigError, DatasetError

DEFAULT_MASK_SIZE = 518


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ConfigError(f"mask size {size!r} is not valid; pass a positive int such as 518")
    return int(size)


def binarize_mask(mask: Image.Image) -> Image.Image:
    """A mask image as 'L' with values 0 and 255 (any non-zero pixel becomes 255)."""
    grey = np.asarray(mask.convert("L"))
    return Image.fromarray((grey > 0).astype(np.uint8) * 255)


def resize_mask(mask: Image.Image, size: int = DEFAULT_MASK_SIZE) -> np.ndarray:
    """A 0/255 'L' mask as a bool array (size, size): BILINEAR resize, /255, > 0.5."""
    size = _check_size(size)
    resized = mask.convert("L").resize((size, size), Image.Resampling.BILINEAR)
    scaled = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    return scaled > 0.5


def load_mask(path: str | os.PathLike[str] | None, size: int = DEFAULT_MASK_SIZE) -> np.ndarray:
    """The mask at ``path`` as a bool array (size, size); ``""`` or None gives all False.

    ``path`` is the full path of the mask file (join a meta.json ``mask_path`` with the dataset
    root first, or use :meth:`cops_deploy.data.meta.Sample.mask_file`).
    """
    size = _check_size(size)
    if path is None or (isinstance(path, str) and path == ""):
        return np.zeros((size, size), dtype=bool)
    try:
        with Image.open(path) as image:
            binary = binarize_mask(image)
    except FileNotFoundError as exc:
        raise DatasetError(
            f"mask file {os.fspath(path)} does not exist; restore it from the dataset download, "
            "or rebuild meta.json with `cops data prepare`"
        ) from exc
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(
            f"mask file {os.fspath(path)} cannot be read as an image ({exc}); masks are PNG, BMP "
            "or JPEG files; replace it with the one from the dataset download"
        ) from exc
    return resize_mask(binary, size)
