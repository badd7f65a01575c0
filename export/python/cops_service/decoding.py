"""Uploaded bytes -> a fully decoded PIL image, or a 4xx refusal that names the problem.

``cops_deploy.imaging.decode.load_image`` reads paths, PIL images and arrays, not bytes, so the
service opens the bytes with Pillow here and hands the decoded image to ``Detector.predict``,
which applies EXIF orientation and the mode conversion exactly as for a file. The steps mirror
``load_image``'s for a file (PNG checksums verified, full decode so a truncated file is refused),
so an upload scores exactly as the same file does; on top of that the service keeps:

- a format allowlist (:data:`ACCEPTED_FORMATS`, the formats of ``IMAGE_EXTENSIONS``): Pillow
  would also parse EPS (through Ghostscript), PSD, ICO and dozens more, which a network service
  has no reason to accept;
- a pixel limit checked from the header, before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import io

from fastapi import HTTPException
from PIL import Image

from .http_errors import refuse

__all__ = ["ACCEPTED_FORMATS", "decode_upload"]

ACCEPTED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
_ACCEPTED = "PNG, JPEG, BMP, TIFF or WebP"
_RESEND = "re-send the complete file (check that the client sends the file's bytes unchanged)"


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """Decode an uploaded image; the caller closes the returned (fully loaded) image.

    Raises:
        fastapi.HTTPException: 400 empty_body; 415 unsupported_format (an image in a format
            outside :data:`ACCEPTED_FORMATS`); 422 not_an_image, too_many_pixels (more than
            ``max_pixels``, or a decompression bomb) or corrupt_image (truncated or damaged).
    """
    if not data:
        raise refuse(
            400,
            "empty_body",
            "the uploaded image is empty (0 bytes)",
            "send the image file's bytes (curl -F file=@part.png, or --data-binary @part.png)",
        )
    image = _open(data, max_pixels)
    try:
        width, height = image.size
        if width * height > max_pixels:
            raise _too_many_pixels(f"{width} x {height} = {width * height} pixels", max_pixels)
        if image.format == "PNG":
            image.verify()  # chunk checksums and end marker; leaves the image unusable
            image.close()
            image = _open(data, max_pixels)
        image.load()  # the full decode: raises on a truncated or damaged file
    except (HTTPException, MemoryError):
        image.close()
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, EOFError, ValueError, ...
        image.close()
        raise _corrupt(exc) from exc
    return image


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Open (read the header of) an image in an accepted format."""
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(str(exc), max_pixels) from exc
    except Image.UnidentifiedImageError as exc:
        other = _other_format(data)
        if other is not None:
            raise refuse(
                415,
                "unsupported_format",
                f"the upload is a {other} image; accepted formats: {_ACCEPTED}",
                "convert the image to PNG (lossless) or JPEG before sending it",
            ) from exc
        raise refuse(
            422,
            "not_an_image",
            f"the upload ({len(data)} bytes, starting {data[:16]!r}) is not a {_ACCEPTED} image",
            "send an image file; check that the client sends the file itself, not its path "
            "or a text encoding of it",
        ) from exc
    except Exception as exc:  # a header Pillow recognises but rejects (OSError, ValueError, ...)
        raise _corrupt(exc) from exc


def _other_format(data: bytes) -> str | None:
    """The format name when Pillow recognises the header outside the allowlist (no decoding)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format
    except Image.DecompressionBombError:
        return "very large"
    except Exception:  # any failure to identify it: not an image at all
        return None


def _too_many_pixels(what: str, max_pixels: int) -> Exception:
    return refuse(
        422,
        "too_many_pixels",
        f"the image is too large to decode: {what}; this service accepts at most "
        f"{max_pixels} pixels (width x height)",
        "downscale the image before sending it (the model sees it at its input size anyway), "
        "or raise the service's --max-pixels / COPS_MAX_PIXELS if such images are expected",
    )


def _corrupt(exc: BaseException) -> Exception:
    return refuse(
        422,
        "corrupt_image",
        f"the image is truncated or damaged ({type(exc).__name__}: {exc})",
        _RESEND,
    )
