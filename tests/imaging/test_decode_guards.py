"""The guards of cops_deploy.imaging.decode: stat first (links, loops, FIFOs, folders), the
format allowlist, the pixel limit, the size plausibility rule, bytes; and scan_inputs reporting
every folder entry it leaves out."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile
from timeouts_support import deadline

from cops_deploy.errors import ConfigError, ImageReadError
from cops_deploy.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    decode_bytes,
    iter_image_files,
    load_image,
    scan_inputs,
)
from cops_deploy.imaging.visualize import side_by_side

EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"


def _png(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (10, 20, 30)).save(path, format="PNG")
    return path


def lying_jpeg(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose frame header is patched to claim width x height (about 630 bytes)."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    at = data.index(b"\xff\xc0") + 5
    return data[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[at + 4 :]


def reason_of(source: object, **kwargs: object) -> str:
    with pytest.raises(ImageReadError) as info:
        load_image(source, **kwargs)  # type: ignore[arg-type]
    return info.value.reason


# ---------------------------------------------------------------------------------------------
# Paths: stat first


def test_dangling_symlink(tmp_path: Path) -> None:
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(ImageReadError, match="dangling symbolic link.*nowhere.png") as info:
        load_image(tmp_path / "gone.png")
    assert info.value.reason == "dangling_symlink"


@pytest.mark.parametrize("mutual", [False, True])
def test_symlink_loop(tmp_path: Path, mutual: bool) -> None:
    if mutual:
        (tmp_path / "a.png").symlink_to("b.png")
        (tmp_path / "b.png").symlink_to("a.png")
    else:
        (tmp_path / "a.png").symlink_to("a.png")
    with pytest.raises(ImageReadError, match="symbolic link loop") as info:
        load_image(tmp_path / "a.png")
    assert info.value.reason == "symlink_loop"
    assert "does not exist" not in str(info.value)


def test_fifo_is_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with deadline(10), pytest.raises(ImageReadError, match="FIFO") as info:
        load_image(fifo)
    assert info.value.reason == "special_file" and "empty" not in str(info.value)


def test_directory_named_png(tmp_path: Path) -> None:
    (tmp_path / "d.png").mkdir()
    assert reason_of(tmp_path / "d.png") == "directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _png(tmp_path / "locked.png")
    path.chmod(0)
    assert reason_of(path) == "unreadable"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: None, "missing"),
        (lambda p: p.write_text("hello"), "not_an_image"),
    ],
)
def test_reason_codes(tmp_path: Path, make: object, reason: str) -> None:
    path = tmp_path / "x.png"
    make(path)  # type: ignore[operator]
    assert reason_of(path) == reason


# ---------------------------------------------------------------------------------------------
# Format allowlist


def test_eps_named_png_is_refused_without_ghostscript(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[object] = []

    def ghostscript(*args: object, **kwargs: object) -> None:
        ran.append(args)
        raise OSError("Ghostscript ran")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
    (tmp_path / "chart.png").write_bytes(EPS)
    with pytest.raises(ImageReadError, match="EPS file; accepted formats") as info:
        load_image(tmp_path / "chart.png")
    assert info.value.reason == "unsupported_format"
    with pytest.raises(ImageReadError, match="EPS"):
        decode_bytes(EPS)
    assert ran == []


def test_ico_is_refused(tmp_path: Path) -> None:
    Image.new("RGB", (16, 16)).save(tmp_path / "icon.png", format="ICO")
    with pytest.raises(ImageReadError, match="ICO file") as info:
        load_image(tmp_path / "icon.png")
    assert info.value.reason == "unsupported_format"


def test_gif_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (9, 7), c).convert("P") for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    out = load_image(tmp_path / "a.gif")
    assert out.shape == (7, 9, 3) and tuple(out[0, 0]) == (255, 0, 0)
    assert ".gif" in IMAGE_EXTENSIONS


# ---------------------------------------------------------------------------------------------
# Pixel limit and size plausibility


def test_max_pixels_is_an_option(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png", (100, 50))
    assert load_image(path, max_pixels=5000).shape == (50, 100, 3)
    with pytest.raises(ImageReadError, match="100 x 50 = 5000 pixels; the limit is 4999") as info:
        load_image(path, max_pixels=4999)
    assert info.value.reason == "too_many_pixels"
    with pytest.raises(ImageReadError, match="limit is 4999"):
        decode_bytes(path.read_bytes(), max_pixels=4999)


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, 10**12])
def test_max_pixels_is_checked(tmp_path: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="max_pixels"):
        load_image(_png(tmp_path / "a.png"), max_pixels=bad)  # type: ignore[arg-type]


def test_default_limit_refuses_9000_squared_jpeg(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(lying_jpeg(9000, 9000))
    assert 9000 * 9000 > DEFAULT_MAX_PIXELS
    assert reason_of(tmp_path / "big.jpg") == "too_many_pixels"


def test_lying_jpeg_header_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = lying_jpeg(9000, 9000)
    assert len(data) < 700
    (tmp_path / "lie.jpg").write_bytes(data)

    def no_decoding(self: object) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageReadError, match=r"claims 9000 x 9000 pixels.*only \d+ bytes") as info:
        load_image(tmp_path / "lie.jpg", max_pixels=Image.MAX_IMAGE_PIXELS)
    assert info.value.reason == "implausible_size"


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "TIFF"])
def test_lying_headers_of_other_formats(tmp_path: Path, fmt: str) -> None:
    """A small file of the format, with its width field patched to a huge value."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format=fmt)
    data = bytearray(buffer.getvalue())
    if fmt == "PNG":
        data[16:20] = (60000).to_bytes(4, "big")  # IHDR width and height, and its CRC
        data[20:24] = (1000).to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    elif fmt == "GIF":
        data[6:10] = (60000).to_bytes(2, "little") + (1000).to_bytes(2, "little")
    else:
        Image.new("1", (60000, 1000)).save(tmp_path / "x.tif", compression="raw")  # real
        data = bytearray((tmp_path / "x.tif").read_bytes()[:1000])  # cut: the header stays
    path = tmp_path / f"lie.{fmt.lower()}"
    path.write_bytes(bytes(data))
    reason = reason_of(path, max_pixels=Image.MAX_IMAGE_PIXELS)
    assert reason == "implausible_size"


@pytest.mark.parametrize(
    ("mode", "fmt", "kw"),
    [
        ("1", "PNG", {"optimize": True}),
        ("L", "JPEG", {"optimize": True, "progressive": True}),
        ("P", "GIF", {}),
        ("1", "TIFF", {"compression": "tiff_lzw"}),
        ("1", "TIFF", {"compression": "tiff_adobe_deflate"}),
        ("L", "WEBP", {"lossless": True}),
    ],
)
def test_genuine_one_colour_images_pass_the_plausibility_rule(
    tmp_path: Path, mode: str, fmt: str, kw: dict
) -> None:
    """The best case of each coding (one colour, 4000 x 4000) is far within the bound."""
    path = tmp_path / f"flat.{fmt.lower()}"
    Image.new(mode, (4000, 4000)).save(path, format=fmt, **kw)
    assert load_image(path).shape == (4000, 4000, 3)


def test_decode_bytes(tmp_path: Path) -> None:
    path = _png(tmp_path / "a.png", (5, 4))
    np.testing.assert_array_equal(decode_bytes(path.read_bytes()), load_image(path))
    with pytest.raises(ImageReadError, match="empty") as info:
        decode_bytes(b"")
    assert info.value.reason == "empty"
    with pytest.raises(ImageReadError, match="truncated or corrupt") as info:
        decode_bytes(path.read_bytes()[:-20])
    assert info.value.reason == "corrupt"


# ---------------------------------------------------------------------------------------------
# Folders: every entry left out is reported


def test_scan_inputs_reports_every_entry(tmp_path: Path) -> None:
    root = tmp_path / "in"
    _png(root / "a.png")
    _png(root / "sub" / "b.png")
    Image.new("P", (4, 4)).save(root / "anim.gif")
    (root / "notes.txt").write_text("x")
    (root / "README").write_text("x")
    _png(root / ".hidden.png")
    (root / ".git").mkdir()
    (root / "gone.png").symlink_to("nowhere.png")
    (root / "loop.png").symlink_to("loop.png")
    os.mkfifo(root / "pipe.png")
    os.mkfifo(root / "pipe")
    (root / "alias.png").symlink_to("a.png")
    (root / "sub" / "up").symlink_to("..", target_is_directory=True)  # a folder loop
    (root / "results").mkdir()
    _png(root / "results" / "old.png")
    with deadline(20):
        scan = scan_inputs(root, exclude=[root / "results"])
    rel = [f.rel for f in scan.files]
    assert rel == ["a.png", "anim.gif", "gone.png", "loop.png", "pipe.png", "sub/b.png"]
    skipped = {s.path.relative_to(root).as_posix(): s.reason for s in scan.skipped}
    assert skipped == {
        "notes.txt": "unsupported_extension",
        "README": "unsupported_extension",
        "pipe": "unsupported_extension",
        ".hidden.png": "hidden",
        ".git": "hidden",
        "alias.png": "duplicate",
        "sub/up": "already_searched",
        "results": "excluded",
    }
    pipe = next(s for s in scan.skipped if s.path.name == "pipe")
    assert "special_file" in pipe.message and "suffix '(none)'" in pipe.message
    with deadline(20):
        reasons = {}
        for f in scan.files:
            try:
                load_image(f.path)
            except ImageReadError as exc:
                reasons[f.rel] = exc.reason
    assert reasons == {
        "gone.png": "dangling_symlink",
        "loop.png": "symlink_loop",
        "pipe.png": "special_file",
    }


def test_explicit_links_are_kept_not_missing(tmp_path: Path) -> None:
    (tmp_path / "gone.png").symlink_to("nowhere.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    assert iter_image_files([tmp_path / "gone.png", tmp_path / "loop.png"]) == [
        tmp_path / "gone.png",
        tmp_path / "loop.png",
    ]
    with pytest.raises(ImageReadError, match="does not exist") as info:
        scan_inputs([tmp_path / "really-missing.png"])
    assert info.value.reason == "missing"


# ---------------------------------------------------------------------------------------------
# Result pictures are bounded whatever the image's shape


@pytest.mark.parametrize("hw", [(2000, 1), (1, 2000), (1, 10000), (10000, 1), (3, 50000)])
def test_result_picture_is_bounded(tmp_path: Path, hw: tuple[int, int]) -> None:
    rgb = np.full((*hw, 3), 128, dtype=np.uint8)
    out = side_by_side(rgb, np.zeros((8, 8), np.float32), tmp_path / "r.png", tile=64)
    with Image.open(out) as img:
        width, height = img.size
    assert width <= 3 * 4 * 64 + 8 and height == 64 + 22
