"""Uploaded bytes -> a decoded RGB image, or a 4xx refusal that names the problem.

Decoding is ``cops_deploy.imaging.decode.decode_bytes``: the same code, guards and conversions
as ``cops predict`` and ``load_image`` use for a file, so an upload scores exactly as the same
file does. That means the format allowlist (:data:`ACCEPTED_FORMATS`: Pillow would also parse
EPS through Ghostscript, PSD, ICO and dozens more), the pixel limit checked from the header
before any pixel is decoded (the service's ``--max-pixels``), the size plausibility check
(a header that claims more pixels than the bytes can hold), PNG checksums, a full decode (a
truncated file is refused) and the conversion to 8-bit RGB (EXIF orientation applied).

Each ``ImageReadError.reason`` maps to one HTTP answer (:data:`HTTP_REFUSALS`).
"""

from __future__ import annotations

import numpy as np

from cops_deploy.errors import ImageReadError
from cops_deploy.imaging.decode import DECODE_FORMATS, decode_bytes

from .http_errors import refuse

__all__ = ["ACCEPTED_FORMATS", "HTTP_REFUSALS", "decode_upload"]

ACCEPTED_FORMATS: tuple[str, ...] = DECODE_FORMATS
_RESEND = "re-send the complete file (check that the client sends the file's bytes unchanged)"
_CONVERT = "convert the image to PNG (lossless) or JPEG before sending it"

# ImageReadError.reason -> (HTTP status, error code, fix)
HTTP_REFUSALS: dict[str, tuple[int, str, str]] = {
    "empty": (
        400,
        "empty_body",
        "send the image file's bytes (curl -F file=@part.png, or --data-binary @part.png)",
    ),
    "unsupported_format": (415, "unsupported_format", _CONVERT),
    "not_an_image": (
        422,
        "not_an_image",
        "send an image file; check that the client sends the file itself, not its path or a "
        "text encoding of it",
    ),
    "too_many_pixels": (
        422,
        "too_many_pixels",
        "downscale the image before sending it (the model sees it at its input size anyway), "
        "or raise the service's --max-pixels / COPS_MAX_PIXELS if such images are expected",
    ),
    "implausible_size": (422, "corrupt_image", _RESEND),
    "corrupt": (422, "corrupt_image", _RESEND),
    "unconvertible": (
        422,
        "unreadable_image",
        "convert the image to 8-bit RGB or greyscale (PNG or JPEG) before sending it",
    ),
}


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode an uploaded image to (H, W, 3) uint8 RGB (EXIF orientation applied).

    Raises:
        fastapi.HTTPException: 400 empty_body; 415 unsupported_format (an image in a format
            outside :data:`ACCEPTED_FORMATS`); 422 not_an_image, too_many_pixels (more than
            ``max_pixels``, or a decompression bomb), corrupt_image (truncated, damaged, or a
            header claiming more pixels than the bytes hold) or unreadable_image (it decodes
            but cannot be converted to RGB).
    """
    try:
        return decode_bytes(data, max_pixels=max_pixels, what=f"the upload ({len(data)} bytes)")
    except ImageReadError as exc:
        status, code, fix = HTTP_REFUSALS.get(exc.reason, (422, "corrupt_image", _RESEND))
        raise refuse(status, code, str(exc), fix) from exc
