"""Decoding: read any image (file, bytes, PIL image or array) as 8-bit RGB, and find image files.

Torch-free (numpy and Pillow only); used by the run side, the HTTP service and training alike.

Conversion rules, applied the same way to files, PIL images and arrays:

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

Guards, checked on every file and uploaded byte string before any pixel is decoded:

- The path is looked at with ``stat`` first: a missing file, a dangling symbolic link, a
  symbolic-link loop, a directory, a FIFO, socket or device (never opened: opening a FIFO for
  reading would block), an empty or an unreadable file each get their own message.
- Format allowlist: only :data:`DECODE_FORMATS` (PNG, JPEG, BMP, TIFF, WebP, GIF) are parsed
  (``Image.open(formats=...)``); any other format, whatever the file's suffix (an EPS file named
  ``.png`` would otherwise go to Pillow's EPS reader, which runs Ghostscript), is refused
  without being parsed: it is named from its signature only.
- Pixel limit: width x height above ``max_pixels`` is refused from the header (default
  :data:`DEFAULT_MAX_PIXELS`, at most Pillow's own ``PIL.Image.MAX_IMAGE_PIXELS``). It is an
  option of :func:`load_image`, :func:`decode_bytes`, ``cops predict --max-pixels`` and the
  service's ``--max-pixels``.
- Size plausibility: a file whose header claims more pixels than its bytes could encode is
  refused (a 631-byte JPEG claiming 9000 x 9000). The rule: pixels <= bytes x
  :data:`MAX_PIXELS_PER_BYTE` [format]; each bound is twice the best compression the format's
  coding can reach, so no genuine file is refused (derivations beside the table). WebP,
  arithmetic-coded JPEG and run-length BMP have no such floor (they can code a one-colour image
  in a few bytes) and are bounded by the pixel limit alone.
- Files are fully decoded, so a truncated file is detected and refused (this relies on
  ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` keeping its default, False); PNG chunk checksums and
  the end marker are verified as well.

Every refusal is an ``ImageReadError`` whose ``reason`` is one of :data:`READ_FAILURES`.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeAlias

import numpy as np
from PIL import Image, ImageOps

from cops_deploy.errors import ConfigError, ImageReadError

__all__ = [
    "DECODE_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS_PER_BYTE",
    "READ_FAILURES",
    "SKIP_REASONS",
    "ImageSource",
    "InputFile",
    "InputScan",
    "PathInput",
    "SkippedEntry",
    "array_to_rgb",
    "check_max_pixels",
    "decode_bytes",
    "iter_image_files",
    "load_image",
    "scan_inputs",
]

# Suffixes a folder is searched for (any case): the one list for prediction and datasets.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif"}
)
# The formats Pillow may parse (Image.open(formats=...)); MPO is JPEG with a multi-picture
# index, which Pillow's JPEG reader returns for many camera files.
DECODE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF")
_DECODE_NAMES = "PNG, JPEG, BMP, TIFF, WebP or GIF"
DEFAULT_MAX_PIXELS = 8192 * 8192  # 67 MP: a 200 MB RGB array; below Pillow's 89.5 MP limit

# The most pixels one byte of a file can stand for (see the module docstring): twice the best
# case of each format's coding, found from the coding itself and checked on one-colour images.
MAX_PIXELS_PER_BYTE: Mapping[str, int] = {
    # Huffman JPEG: every 8x8 block costs at least 1 bit in the first (DC) scan: 512 px/byte.
    "JPEG": 1024,
    "MPO": 1024,
    # deflate codes at most 258 bytes in 2 bits (1032:1), of 1-bit pixels: 8256 px/byte.
    "PNG": 16512,
    # LZW: one 12-bit code stands for at most 4096 pixels: 2731 px/byte.
    "GIF": 5462,
    # TIFF: LZW of 1-bit pixels (4096 bytes of 8 pixels per 12-bit code): 21846 px/byte.
    "TIFF": 43692,
    # uncompressed BMP ('raw' tiles only): at least 1 bit per pixel.
    "BMP": 16,
}

# ImageReadError.reason codes.
READ_FAILURES: Mapping[str, str] = {
    "missing": "no such file",
    "dangling_symlink": "a symbolic link whose target does not exist",
    "symlink_loop": "a symbolic link that loops",
    "directory": "a directory, not an image file",
    "special_file": "a FIFO, socket or device, not a regular file",
    "unreadable": "the file cannot be opened (permissions or an I/O error)",
    "empty": "the file is empty",
    "not_an_image": "not an image in any format",
    "unsupported_format": "an image format outside the allowlist",
    "too_many_pixels": "more pixels than the limit",
    "implausible_size": "the header claims more pixels than the file's bytes can hold",
    "corrupt": "truncated or damaged",
    "unconvertible": "decoded, but cannot be converted to 8-bit RGB",
    "invalid_source": "not a path, PIL image or numpy array",
}
# SkippedEntry.reason codes (folder entries that are not image candidates).
SKIP_REASONS: Mapping[str, str] = {
    "unsupported_extension": "the suffix is not one of IMAGE_EXTENSIONS",
    "hidden": "the name starts with '.'",
    "duplicate": "the same file was already listed",
    "already_searched": "a directory reached again through a symbolic link (a loop)",
    "excluded": "the results folder",
    "unreadable_folder": "the folder cannot be listed",
}

ImageSource: TypeAlias = str | os.PathLike[str] | Image.Image | np.ndarray
PathInput: TypeAlias = str | os.PathLike[str]

_ACCEPTED_ARRAYS = "uint8 or uint16 arrays of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4)"
_ACCEPTED_SOURCES = "a path (str or os.PathLike), a PIL.Image.Image or a numpy array"
_RECOPY = "Fix: re-copy or re-export the image."


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_image(source: ImageSource, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read ``source`` as an (H, W, 3) uint8 RGB array (see the module docstring for the rules).

    Args:
        source: an image file path, a ``PIL.Image.Image`` or a numpy array (uint8 or uint16;
            (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA).
        max_pixels: the largest width x height a file may claim (files only; an array or PIL
            image is already in memory). At most ``PIL.Image.MAX_IMAGE_PIXELS``.

    Raises:
        ImageReadError: the file is missing, a dangling or looping link, a directory, a FIFO or
            device, empty, unreadable, not an image, in a format outside the allowlist, too
            large, lying about its size, truncated or corrupt; or the array has a dtype or shape
            that is not accepted; or ``source`` has another type (``reason`` says which).
        ConfigError: ``max_pixels`` is not an integer in 1..``PIL.Image.MAX_IMAGE_PIXELS``.
    """
    if isinstance(source, np.ndarray):
        return array_to_rgb(source, what="image array")
    if isinstance(source, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(source), what="PIL image")
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source), check_max_pixels(max_pixels))
    raise ImageReadError(
        f"cannot read image: got an object of type {type(source).__name__}; "
        f"accepted: {_ACCEPTED_SOURCES}. Fix: pass one of those.",
        reason="invalid_source",
    )


def decode_bytes(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, what: str = "the uploaded image"
) -> np.ndarray:
    """Decode an image file's bytes (an upload) as (H, W, 3) uint8 RGB, with the same guards
    and conversions as a file (``what`` names it in messages).

    Raises:
        ImageReadError: as :func:`load_image` for a file (reason ``empty`` for no bytes).
        ConfigError: ``max_pixels`` is invalid.
    """
    limit = check_max_pixels(max_pixels)
    if not data:
        raise ImageReadError(f"cannot read {what}: it is empty (0 bytes). {_RECOPY}", "empty")
    return _decode_stream(io.BytesIO(data), len(data), what, limit)


def check_max_pixels(max_pixels: int) -> int:
    """``max_pixels`` checked: an integer in 1..``PIL.Image.MAX_IMAGE_PIXELS`` (ConfigError)."""
    ceiling = int(Image.MAX_IMAGE_PIXELS or DEFAULT_MAX_PIXELS)
    ok = isinstance(max_pixels, (int, np.integer)) and not isinstance(max_pixels, bool)
    if not ok or not 1 <= int(max_pixels) <= ceiling:
        raise ConfigError(
            f"invalid max_pixels (--max-pixels) {max_pixels!r}; valid: an integer in "
            f"1..{ceiling} (Pillow's decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS). "
            f"Fix: pass e.g. {DEFAULT_MAX_PIXELS} (the default)."
        )
    return int(max_pixels)


# -- paths -------------------------------------------------------------------------------------


def _path_failure(path: Path) -> ImageReadError | None:
    """Why ``path`` cannot be opened as an image file, from ``lstat``/``stat`` alone (never
    opens it); None for a non-empty regular file (or a link to one)."""
    shown = repr(str(path))
    try:
        link = os.lstat(path)
    except FileNotFoundError:
        return ImageReadError(
            f"cannot read image {shown}: no such file. Fix: check the path (relative paths "
            "start from the working directory).",
            "missing",
        )
    except OSError as exc:
        return _unreadable(path, exc)
    try:
        st = os.stat(path)
    except OSError as exc:
        if not stat.S_ISLNK(link.st_mode):
            return _unreadable(path, exc)
        target = os.readlink(path)
        if exc.errno == errno.ELOOP:
            return ImageReadError(
                f"cannot read image {shown}: it is a symbolic link loop (-> {target!r} leads "
                "back to itself). Fix: point the link at an image file, or remove it.",
                "symlink_loop",
            )
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            return ImageReadError(
                f"cannot read image {shown}: it is a dangling symbolic link (its target "
                f"{target!r} does not exist). Fix: restore the target, or remove the link.",
                "dangling_symlink",
            )
        return _unreadable(path, exc)
    return _kind_failure(path, st)


def _kind_failure(path: Path, st: os.stat_result) -> ImageReadError | None:
    """Why a file with status ``st`` is not a readable image file, or None."""
    shown = repr(str(path))
    if stat.S_ISDIR(st.st_mode):
        return ImageReadError(
            f"cannot read image {shown}: it is a directory, not an image file. "
            "Fix: pass the files, or expand the directory with iter_image_files().",
            "directory",
        )
    if not stat.S_ISREG(st.st_mode):
        return ImageReadError(
            f"cannot read image {shown}: it is {_kind(st.st_mode)}, not a regular file (it was "
            "not opened). Valid: an image file. Fix: pass the image file itself.",
            "special_file",
        )
    if st.st_size == 0:
        return ImageReadError(
            f"cannot read image {shown}: the file is empty (0 bytes). {_RECOPY}", "empty"
        )
    return None


def _kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a socket', ... for a non-regular file's mode."""
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "a special file"


def _unreadable(path: Path, exc: OSError) -> ImageReadError:
    if isinstance(exc, PermissionError):
        detail, fix = "permission denied", "make the file readable by this process"
    else:
        detail, fix = f"{type(exc).__name__}: {exc}", "check the file and the disk"
    return ImageReadError(f"cannot read image {str(path)!r}: {detail}. Fix: {fix}.", "unreadable")


def _load_file(path: Path, max_pixels: int) -> np.ndarray:
    """Check, open (never blocking), fully decode and convert one image file."""
    failure = _path_failure(path)
    if failure is not None:
        raise failure
    try:
        # O_NONBLOCK: a file swapped for a FIFO since the stat must not block the open.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    with os.fdopen(fd, "rb") as handle:
        st = os.fstat(handle.fileno())
        failure = _kind_failure(path, st)
        if failure is not None:
            raise failure
        return _decode_stream(handle, st.st_size, f"image {str(path)!r}", max_pixels)


# -- decoding ----------------------------------------------------------------------------------


def _decode_stream(fp: IO[bytes], nbytes: int, what: str, max_pixels: int) -> np.ndarray:
    """Open ``fp`` (``nbytes`` long) in an allowed format, check its header, fully decode it and
    convert it to RGB."""
    try:
        with _open_allowed(fp, what) as img:
            _check_header(img, fp, nbytes, what, max_pixels)
            if img.format == "PNG":
                img.verify()  # chunk checksums and the IEND marker; consumes the image
            else:
                return _decoded_rgb(img, what)
        fp.seek(0)
        with _open_allowed(fp, what) as img:
            return _decoded_rgb(img, what)
    except (ImageReadError, MemoryError):
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"cannot read {what}: {exc}. Fix: downscale the image.", "too_many_pixels"
        ) from exc
    except PermissionError as exc:
        raise ImageReadError(
            f"cannot read {what}: permission denied. Fix: make the file readable.", "unreadable"
        ) from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, EOFError, ...
        raise ImageReadError(
            f"cannot read {what}: the file is truncated or corrupt "
            f"({type(exc).__name__}: {exc}). Valid: a complete image file. {_RECOPY}",
            "corrupt",
        ) from exc


def _decoded_rgb(img: Image.Image, what: str) -> np.ndarray:
    img.load()  # full decode: raises on a truncated file
    return _pil_to_rgb(ImageOps.exif_transpose(img), what=what)


def _open_allowed(fp: IO[bytes], what: str) -> Image.Image:
    """``Image.open`` limited to :data:`DECODE_FORMATS`; an image in another format is named
    from its signature (no other reader parses it)."""
    try:
        return Image.open(fp, formats=DECODE_FORMATS)
    except Image.UnidentifiedImageError as exc:
        fp.seek(0)
        other = _signature_format(fp.read(64))
        if other is not None:
            raise ImageReadError(
                f"cannot read {what}: it is a {other} file; accepted formats: {_DECODE_NAMES}. "
                "Fix: convert it to PNG (lossless) or JPEG.",
                "unsupported_format",
            ) from exc
        raise ImageReadError(
            f"cannot read {what}: not a recognised image format. Valid: a {_DECODE_NAMES} "
            "file. Fix: pass an image file or convert it.",
            "not_an_image",
        ) from exc


def _signature_format(head: bytes) -> str | None:
    """The name of the Pillow format whose signature check accepts ``head`` (Pillow's
    registered ``accept`` functions only look at the first bytes; nothing is parsed)."""
    Image.init()
    for name, (_, accept) in Image.OPEN.items():
        if name in DECODE_FORMATS or accept is None:
            continue
        try:
            if accept(head):
                return name
        except Exception:  # a signature check that cannot handle these bytes: not this format
            continue
    return None


def _check_header(img: Image.Image, fp: IO[bytes], nbytes: int, what: str, max_pixels: int) -> None:
    """Pixel limit and size plausibility, from the header (nothing decoded yet)."""
    width, height = img.size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageReadError(
            f"cannot read {what}: it has {width} x {height} = {pixels} pixels; the limit is "
            f"{max_pixels} (max_pixels / --max-pixels). Fix: downscale the image, or raise the "
            "limit if such images are expected and trusted.",
            "too_many_pixels",
        )
    ratio = _pixels_per_byte_bound(img, fp)
    if ratio is not None and pixels > nbytes * ratio:
        raise ImageReadError(
            f"cannot read {what}: its {img.format} header claims {width} x {height} pixels, "
            f"but the file has only {nbytes} bytes; a {img.format} file can hold at most "
            f"{ratio} pixels per byte, so it is damaged or crafted. Valid: a complete image "
            f"file. {_RECOPY}",
            "implausible_size",
        )


def _pixels_per_byte_bound(img: Image.Image, fp: IO[bytes]) -> int | None:
    """The plausibility bound for ``img``'s format, or None when the coding has no floor."""
    fmt = img.format or ""
    if fmt == "BMP" and any(tile[0] != "raw" for tile in img.tile):
        return None  # run-length BMP
    if fmt in ("JPEG", "MPO"):
        position = fp.tell()
        fp.seek(0)
        arithmetic = _jpeg_is_arithmetic(fp.read(1 << 16))
        fp.seek(position)
        if arithmetic:
            return None
    return MAX_PIXELS_PER_BYTE.get(fmt)


_JPEG_ARITHMETIC_SOF = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_is_arithmetic(head: bytes) -> bool:
    """Whether the JPEG whose first bytes are ``head`` is arithmetic-coded (its frame marker is
    SOF9..SOF15, or it defines arithmetic conditioning, DAC). Walks the marker segments."""
    at = 2  # after SOI
    while at + 4 <= len(head):
        if head[at] != 0xFF:
            return False
        marker = head[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in _JPEG_ARITHMETIC_SOF or marker == 0xCC:
            return True
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xDA, 0xD9):
            return False  # a Huffman frame, or the scan started
        if marker in _JPEG_NO_LENGTH:
            at += 2
            continue
        at += 2 + int.from_bytes(head[at + 2 : at + 4], "big")
    return False


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
                "expected (H, W). Fix: convert the image to 8-bit RGB first.",
                "unconvertible",
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
            "convertible to RGB. Fix: convert the image to RGB before passing it.",
            "unconvertible",
        ) from exc


def _float_to_uint8(data: np.ndarray, what: str) -> np.ndarray:
    """Map float grey values to uint8: [0, 1] is scaled by 255, any other range is clipped."""
    finite = np.isfinite(data)
    if not finite.all():
        raise ImageReadError(
            f"cannot convert {what}: float image has {int((~finite).sum())} NaN or inf "
            "pixels; valid: finite values. Fix: replace them (e.g. numpy.nan_to_num) first.",
            "unconvertible",
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
            "(x * 255).round().astype(numpy.uint8).",
            "unconvertible",
        )
    shape_ok = arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))
    if not shape_ok:
        raise ImageReadError(
            f"cannot convert {what}: shape {arr.shape} is not accepted; accepted: "
            f"{_ACCEPTED_ARRAYS} (channels last). Fix: for a (3, H, W) array pass "
            "arr.transpose(1, 2, 0); pass a batch as a list of images.",
            "unconvertible",
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageReadError(
            f"cannot convert {what}: shape {arr.shape} has no pixels; valid: H >= 1 and "
            "W >= 1. Fix: check how the array was produced.",
            "unconvertible",
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


@dataclass(frozen=True)
class InputFile:
    """An image candidate: ``path`` (as found), the input argument it came from (``root``,
    index ``root_index`` in the arguments) and its path relative to that root (``rel``, POSIX
    separators; the file's name when the root is the file itself)."""

    path: Path
    root: Path
    root_index: int
    rel: str


@dataclass(frozen=True)
class SkippedEntry:
    """A folder entry that is not scored: its path, a ``reason`` from :data:`SKIP_REASONS`
    and a message for people."""

    path: Path
    reason: str
    message: str


@dataclass
class InputScan:
    """What :func:`scan_inputs` found: the input arguments, the image candidates in order, and
    every folder entry it did not list, with the reason."""

    roots: list[Path] = field(default_factory=list)
    files: list[InputFile] = field(default_factory=list)
    skipped: list[SkippedEntry] = field(default_factory=list)


def scan_inputs(
    paths: PathInput | Iterable[PathInput], exclude: Iterable[PathInput] = ()
) -> InputScan:
    """Expand files and folders into image candidates, reporting every entry left out.

    A folder is searched recursively (symbolic links to folders are followed, each real folder
    once). Candidates are entries whose suffix (any case) is in :data:`IMAGE_EXTENSIONS`,
    sorted by path, whatever they are: a dangling link, a link loop or a FIFO named ``x.png``
    is listed, and :func:`load_image` then says what it is (it never opens a FIFO). Left out,
    each as a :class:`SkippedEntry`: other suffixes, hidden entries (name starting with '.',
    not searched), a second path to a file or folder already listed, folders in ``exclude``
    (the results folder) and folders that cannot be listed. A path named explicitly is kept
    whatever its suffix or kind, so that it is reported when read. Order follows ``paths``.

    Raises:
        ImageReadError: a path named in ``paths`` does not exist (not even as a link).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    scan = _Scanner({os.path.realpath(p) for p in exclude})
    for index, raw in enumerate(paths):
        root = Path(raw)
        scan.result.roots.append(root)
        try:
            os.lstat(root)
        except OSError as exc:
            raise ImageReadError(
                f"input path {str(root)!r} does not exist; valid: an existing image file or a "
                "directory of images. Fix: check the path (relative paths start from the "
                f"working directory, {os.getcwd()!r}).",
                "missing",
            ) from exc
        if root.is_dir():
            scan.folder(root, root, index)
        else:
            scan.add(InputFile(root, root, index, root.name))
    return scan.result


def iter_image_files(paths: PathInput | Iterable[PathInput]) -> list[Path]:
    """The image candidates of :func:`scan_inputs` as paths (entries it leaves out are
    dropped silently: use :func:`scan_inputs` to report them).

    Raises:
        ImageReadError: a path does not exist.
    """
    return [f.path for f in scan_inputs(paths).files]


class _Scanner:
    """The state of one :func:`scan_inputs` run."""

    def __init__(self, exclude: set[str]) -> None:
        self.exclude = exclude
        self.result = InputScan()
        self.files: dict[str, Path] = {}  # real path -> first path listed
        self.folders: dict[str, Path] = {}  # real path -> first path searched

    def skip(self, path: Path, reason: str, message: str) -> None:
        self.result.skipped.append(SkippedEntry(path, reason, f"{path}: {message}"))

    def add(self, item: InputFile) -> None:
        real = os.path.realpath(item.path)
        first = self.files.get(real)
        if first is None:
            self.files[real] = item.path
            self.result.files.append(item)
        elif first != item.path:
            self.skip(item.path, "duplicate", f"the same file as {str(first)!r}, already listed")

    def folder(self, folder: Path, root: Path, index: int) -> None:
        """List the image candidates under ``folder`` (sorted by path)."""
        found: list[InputFile] = []
        self.search(folder, root, index, found)
        found.sort(key=lambda f: f.path)
        # of two paths to one file, the file itself is listed rather than a link to it
        chosen: dict[str, Path] = {}
        for item in found:
            real = os.path.realpath(item.path)
            if real not in chosen or (chosen[real].is_symlink() and not item.path.is_symlink()):
                chosen[real] = item.path
        start = len(self.result.files)
        for item in sorted(found, key=lambda f: f.path != chosen[os.path.realpath(f.path)]):
            self.add(item)  # the chosen paths first, then the others (reported as duplicates)
        self.result.files[start:] = sorted(self.result.files[start:], key=lambda f: f.path)

    def search(self, folder: Path, root: Path, index: int, found: list[InputFile]) -> None:
        real = os.path.realpath(folder)
        if real in self.exclude:
            self.skip(folder, "excluded", "the results folder (--out) is not searched")
            return
        if real in self.folders:
            self.skip(
                folder,
                "already_searched",
                f"the same folder as {str(self.folders[real])!r} (a symbolic link loop or a "
                "second path to it), searched once",
            )
            return
        self.folders[real] = folder
        for path in self.entries(folder):
            if path.name.startswith("."):
                self.skip(path, "hidden", "hidden (name starts with '.'), not searched")
            elif path.is_dir():
                self.search(path, root, index, found)
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                found.append(InputFile(path, root, index, path.relative_to(root).as_posix()))
            else:
                self.skip(path, "unsupported_extension", _not_an_image_suffix(path))

    def entries(self, folder: Path) -> list[Path]:
        try:
            with os.scandir(folder) as it:
                return sorted(Path(entry.path) for entry in it)
        except OSError as exc:
            self.skip(
                folder,
                "unreadable_folder",
                f"cannot list the folder ({type(exc).__name__}: {exc}); fix its permissions",
            )
            return []


def _not_an_image_suffix(path: Path) -> str:
    """Why ``path`` (not an image suffix) is not scored, naming what it is when not a file."""
    failure = _path_failure(path)
    what = "" if failure is None or failure.reason == "empty" else f" ({failure.reason})"
    suffixes = " ".join(sorted(IMAGE_EXTENSIONS))
    return (
        f"suffix {path.suffix or '(none)'!r} is not an image suffix{what}; scored: {suffixes} "
        "(any case). Fix: rename it or pass it explicitly if it is an image."
    )
