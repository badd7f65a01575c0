"""Tests for cops_deploy.imaging decode and preprocess: reading, conversion, preprocessing, map
resizing, files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_deploy.errors import ConfigError, ImageReadError
from cops_deploy.imaging.decode import iter_image_files, load_image
from cops_deploy.imaging.preprocess import preprocess, preprocess_batch, resize_map

# OpenAI CLIP's normalisation, written out here (not imported from the code under test).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CLIP = {"mean": CLIP_MEAN, "std": CLIP_STD}

REPO = Path(__file__).resolve().parents[2]


def _rng_rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _blocks(h: int = 32, w: int = 48) -> np.ndarray:
    """Four flat colour quadrants: survives JPEG with a small tolerance."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2 :] = (0, 255, 0)
    arr[h // 2 :, : w // 2] = (0, 0, 255)
    arr[h // 2 :, w // 2 :] = (255, 255, 255)
    return arr


def _close(a: np.ndarray, b: np.ndarray, tol: int) -> bool:
    return a.shape == b.shape and int(np.abs(a.astype(int) - b.astype(int)).max()) <= tol


def _check_rgb(out: np.ndarray, hw: tuple[int, int]) -> None:
    assert out.dtype == np.uint8
    assert out.shape == (*hw, 3)
    assert out.flags.c_contiguous


# ---------------------------------------------------------------------------------------------
# Files of each mode
# ---------------------------------------------------------------------------------------------


def test_rgb_png_roundtrip(tmp_path: Path) -> None:
    rgb = _rng_rgb()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    _check_rgb(out, (24, 32))
    np.testing.assert_array_equal(out, rgb)
    np.testing.assert_array_equal(load_image(str(tmp_path / "a.png")), rgb)


def test_grey_png(tmp_path: Path) -> None:
    grey = np.random.default_rng(1).integers(0, 256, (10, 7), dtype=np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    _check_rgb(out, (10, 7))
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], grey)


def test_la_png_drops_alpha(tmp_path: Path) -> None:
    Image.new("LA", (5, 4), (77, 0)).save(tmp_path / "la.png")
    out = load_image(tmp_path / "la.png")
    _check_rgb(out, (4, 5))
    assert (out == 77).all()


def test_rgba_png_drops_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((6, 9, 4), dtype=np.uint8)
    rgba[..., :3] = _rng_rgb(6, 9)
    rgba[..., 3] = np.arange(9, dtype=np.uint8)[None, :] * 20  # includes fully transparent
    Image.fromarray(rgba).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out, rgba[..., :3])


def test_palette_png(tmp_path: Path) -> None:
    rgb = _blocks(8, 8)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert pal.mode == "P"
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(load_image(tmp_path / "p.png"), rgb)


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    rgb = _blocks(8, 8)
    pal = Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pt.png", transparency=0)
    with Image.open(tmp_path / "pt.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    out = load_image(tmp_path / "pt.png")
    np.testing.assert_array_equal(out, rgb)  # alpha dropped, colours kept


def test_16bit_png_scaled_by_full_range(tmp_path: Path) -> None:
    data = np.array([[0, 255, 256, 1000], [32768, 65280, 65535, 511]], dtype=np.uint16)
    Image.fromarray(data).save(tmp_path / "d.png")
    with Image.open(tmp_path / "d.png") as check:
        assert check.mode.startswith("I")
    out = load_image(tmp_path / "d.png")
    _check_rgb(out, (2, 4))
    expected = (data >> 8).astype(np.uint8)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], expected)


def test_exif_orientation_6_is_applied(tmp_path: Path) -> None:
    rgb = _blocks(32, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "r.jpg", quality=95, exif=exif)
    with Image.open(tmp_path / "r.jpg") as check:
        assert check.getexif().get(0x0112) == 6
        assert check.size == (48, 32)
    out = load_image(tmp_path / "r.jpg")
    _check_rgb(out, (48, 32))
    expected = np.rot90(rgb, k=-1)  # (48, 32): clockwise quarter turn
    # compare at the quadrant centres (JPEG rings at the colour edges)
    for y, x in ((12, 8), (12, 24), (36, 8), (36, 24)):
        assert _close(out[y, x], expected[y, x], tol=12), (y, x, out[y, x], expected[y, x])
    # the top-left of the displayed image is the stored bottom-left (blue)
    assert _close(out[2, 2], np.array([0, 0, 255]), tol=12)


def test_exif_orientation_applied_to_pil_image(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(_blocks(32, 48)).save(tmp_path / "r.jpg", exif=exif)
    with Image.open(tmp_path / "r.jpg") as img:
        assert load_image(img).shape == (48, 32, 3)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    Image.new("CMYK", (8, 6), (0, 255, 255, 0)).save(tmp_path / "c.jpg", quality=95)
    with Image.open(tmp_path / "c.jpg") as check:
        assert check.mode == "CMYK"
    out = load_image(tmp_path / "c.jpg")
    _check_rgb(out, (6, 8))
    assert _close(out, np.broadcast_to(np.array([255, 0, 0], np.uint8), out.shape), tol=8)


def test_1bit_png(tmp_path: Path) -> None:
    bits = np.zeros((5, 6), dtype=bool)
    bits[::2, 1::2] = True
    Image.fromarray(bits).save(tmp_path / "b.png")
    with Image.open(tmp_path / "b.png") as check:
        assert check.mode == "1"
    out = load_image(tmp_path / "b.png")
    _check_rgb(out, (5, 6))
    np.testing.assert_array_equal(out[:, :, 0], np.where(bits, 255, 0))


def test_bmp_tiff_webp(tmp_path: Path) -> None:
    rgb = _rng_rgb(9, 11)
    for name in ("a.bmp", "a.tif", "a.webp"):
        kwargs = {"lossless": True} if name.endswith("webp") else {}
        Image.fromarray(rgb).save(tmp_path / name, **kwargs)
        np.testing.assert_array_equal(load_image(tmp_path / name), rgb)


# ---------------------------------------------------------------------------------------------
# PIL images of modes without a file
# ---------------------------------------------------------------------------------------------


def test_pil_mode_I_is_clipped_then_scaled() -> None:
    data = np.array([[-5, 0, 255, 256], [65535, 70000, 32768, 1 << 20]], dtype=np.int32)
    img = Image.fromarray(data)
    assert img.mode == "I"
    out = load_image(img)
    expected = (np.clip(data, 0, 65535) >> 8).astype(np.uint8)
    np.testing.assert_array_equal(out[:, :, 1], expected)


def test_pil_mode_F_unit_range_is_scaled() -> None:
    data = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = load_image(Image.fromarray(data))
    np.testing.assert_array_equal(out[0, :, 0], [0, 128, 255])


def test_pil_mode_F_other_range_is_clipped() -> None:
    data = np.array([[-3.0, 2.0, 100.4, 300.0]], dtype=np.float32)
    out = load_image(Image.fromarray(data))
    np.testing.assert_array_equal(out[0, :, 2], [0, 2, 100, 255])


def test_pil_mode_F_nan_is_refused() -> None:
    data = np.array([[0.0, np.nan]], dtype=np.float32)
    with pytest.raises(ImageReadError, match="NaN or inf"):
        load_image(Image.fromarray(data))


def test_pil_mode_ycbcr() -> None:
    img = Image.fromarray(_blocks(8, 8)).convert("YCbCr")
    assert _close(load_image(img), _blocks(8, 8), tol=3)


# ---------------------------------------------------------------------------------------------
# Files that must be refused
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cut", ["half", "iend", "last20"])
def test_truncated_png_is_refused(tmp_path: Path, cut: str) -> None:
    Image.fromarray(_rng_rgb(64, 64)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    n = {"half": len(data) // 2, "iend": len(data) - 12, "last20": len(data) - 20}[cut]
    bad = tmp_path / "cut.png"
    bad.write_bytes(data[:n])
    with pytest.raises(ImageReadError, match="truncated or corrupt") as info:
        load_image(bad)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_jpeg_is_refused(tmp_path: Path, keep: float) -> None:
    Image.fromarray(_rng_rgb(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    bad = tmp_path / "cut.jpg"
    bad.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageReadError, match="truncated") as info:
        load_image(bad)
    assert "cut.jpg" in str(info.value)


def test_jpeg_without_end_marker_is_refused(tmp_path: Path) -> None:
    Image.fromarray(_rng_rgb(64, 64)).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[:-2])
    with pytest.raises(ImageReadError, match="truncated"):
        load_image(tmp_path / "cut.jpg")


def test_text_file_named_png_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("not an image\n")
    with pytest.raises(ImageReadError, match="not a recognised image format") as info:
        load_image(bad)
    assert "notes.png" in str(info.value)


def test_empty_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty \(0 bytes\)"):
        load_image(tmp_path / "e.jpg")


def test_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="no such file") as info:
        load_image(tmp_path / "nope.png")
    assert "nope.png" in str(info.value)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="iter_image_files"):
        load_image(tmp_path)


def test_unsupported_source_type_is_refused() -> None:
    with pytest.raises(ImageReadError, match="type list"):
        load_image([1, 2, 3])  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Arrays
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.dtype(">u2")])
@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 1), (5, 7, 3), (5, 7, 4)])
def test_accepted_arrays(shape: tuple[int, ...], dtype: np.dtype) -> None:
    rng = np.random.default_rng(3)
    top = 256 if np.dtype(dtype).itemsize == 1 else 65536
    arr = rng.integers(0, top, shape).astype(dtype)
    out = load_image(arr)
    _check_rgb(out, (5, 7))
    scaled = arr if np.dtype(dtype).itemsize == 1 else (arr >> 8)
    scaled = scaled.astype(np.uint8)
    if len(shape) == 2:
        expected = np.repeat(scaled[:, :, None], 3, axis=2)
    elif shape[2] == 1:
        expected = np.repeat(scaled, 3, axis=2)
    else:
        expected = scaled[:, :, :3]
    np.testing.assert_array_equal(out, expected)


def test_array_input_is_not_aliased() -> None:
    arr = _rng_rgb(4, 4)
    out = load_image(arr)
    out[0, 0] = 0
    assert out is not arr


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int32, np.bool_])
def test_refused_array_dtypes(dtype: type) -> None:
    arr = np.zeros((4, 4, 3), dtype=dtype)
    with pytest.raises(ImageReadError, match=f"dtype {np.dtype(dtype)}.*accepted: uint8"):
        load_image(arr)


@pytest.mark.parametrize("shape", [(12,), (4, 4, 2), (3, 8, 8), (2, 4, 4, 3), (4, 4, 5)])
def test_refused_array_shapes(shape: tuple[int, ...]) -> None:
    arr = np.zeros(shape, dtype=np.uint8)
    with pytest.raises(ImageReadError, match=rf"shape \({shape[0]},.*accepted"):
        load_image(arr)


@pytest.mark.parametrize("shape", [(0, 5, 3), (5, 0)])
def test_refused_empty_arrays(shape: tuple[int, ...]) -> None:
    with pytest.raises(ImageReadError, match="no pixels"):
        load_image(np.zeros(shape, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------
# Preprocessing
# ---------------------------------------------------------------------------------------------


def test_preprocess_equals_direct_computation() -> None:
    rgb = _rng_rgb(30, 45)
    out = preprocess(rgb, size=40, **CLIP)
    assert out.shape == (3, 40, 40) and out.dtype == np.float32
    resized = np.asarray(Image.fromarray(rgb).resize((40, 40), Image.Resampling.BICUBIC))
    direct = (resized / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out, direct.transpose(2, 0, 1), atol=1e-6)


def test_preprocess_equals_torchvision() -> None:
    pytest.importorskip("torch")
    transforms = pytest.importorskip("torchvision.transforms")
    rgb = _rng_rgb(61, 97, seed=7)
    tv = transforms.Compose(
        [
            transforms.Resize((518, 518), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    ref = tv(Image.fromarray(rgb)).numpy()
    out = preprocess(rgb, 518, CLIP_MEAN, CLIP_STD)
    assert out.shape == ref.shape == (3, 518, 518)
    assert float(np.abs(out - ref).max()) < 1e-6


def test_preprocess_custom_mean_std_and_grey_array() -> None:
    grey = np.full((5, 5), 51, dtype=np.uint8)
    out = preprocess(grey, size=4, mean=(0.0, 0.1, 0.2), std=(1.0, 0.5, 0.25))
    np.testing.assert_allclose(out[:, 0, 0], [0.2, 0.2, 0.0], atol=1e-6)


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "518"])
def test_preprocess_refuses_bad_size(size: object) -> None:
    with pytest.raises(ConfigError, match="preprocessing size"):
        preprocess(_rng_rgb(4, 4), size=size, **CLIP)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mean": (0.5, 0.5)}, "mean"),
        ({"std": (0.2, 0.0, 0.2)}, "std"),
        ({"std": (0.2, float("nan"), 0.2)}, "std"),
        ({"mean": "abc"}, "mean"),
    ],
)
def test_preprocess_refuses_bad_norm(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=f"normalisation {match}"):
        preprocess(_rng_rgb(4, 4), size=4, **{**CLIP, **kw})


def test_preprocess_refuses_non_array() -> None:
    with pytest.raises(ImageReadError, match="load_image"):
        preprocess(Image.new("RGB", (4, 4)), size=4, **CLIP)  # type: ignore[arg-type]


def test_preprocess_batch_mixed_sources(tmp_path: Path) -> None:
    a, b = _rng_rgb(10, 20, seed=1), _rng_rgb(30, 15, seed=2)
    Image.fromarray(a).save(tmp_path / "a.png")
    batch, sizes = preprocess_batch([tmp_path / "a.png", Image.fromarray(b), b], size=16, **CLIP)
    assert batch.shape == (3, 3, 16, 16) and batch.dtype == np.float32
    assert sizes == [(10, 20), (30, 15), (30, 15)]
    np.testing.assert_array_equal(batch[0], preprocess(a, 16, **CLIP))
    np.testing.assert_array_equal(batch[1], preprocess(b, 16, **CLIP))
    np.testing.assert_array_equal(batch[2], batch[1])


def test_preprocess_batch_single_sources(tmp_path: Path) -> None:
    a = _rng_rgb(10, 20)
    Image.fromarray(a).save(tmp_path / "a.png")
    assert preprocess_batch(str(tmp_path / "a.png"), size=8, **CLIP)[0].shape == (1, 3, 8, 8)
    assert preprocess_batch(a, size=8, **CLIP)[1] == [(10, 20)]
    four_d = np.stack([a, a])
    batch, sizes = preprocess_batch(four_d, size=8, **CLIP)
    assert batch.shape == (2, 3, 8, 8) and sizes == [(10, 20), (10, 20)]


def test_preprocess_batch_empty() -> None:
    batch, sizes = preprocess_batch([], size=8, **CLIP)
    assert batch.shape == (0, 3, 8, 8) and sizes == []


def test_preprocess_batch_error_names_item(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("x")
    with pytest.raises(ImageReadError, match=r"batch item 1 of 2: .*bad\.png"):
        preprocess_batch([_rng_rgb(4, 4), tmp_path / "bad.png"], size=8, **CLIP)


# ---------------------------------------------------------------------------------------------
# resize_map
# ---------------------------------------------------------------------------------------------


def test_resize_map_shape_dtype_and_values() -> None:
    m = np.random.default_rng(0).random((37, 37)).astype(np.float32)
    out = resize_map(m, (100, 60))
    assert out.shape == (100, 60) and out.dtype == np.float32
    ref = np.asarray(Image.fromarray(m).resize((60, 100), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(out, ref)
    assert m.min() - 1e-6 <= out.min() and out.max() <= m.max() + 1e-6


def test_resize_map_constant_and_identity() -> None:
    m = np.full((8, 8), 0.25, dtype=np.float64)
    np.testing.assert_allclose(resize_map(m, (13, 5)), 0.25, atol=1e-7)
    same = resize_map(m, (8, 8))
    assert same.dtype == np.float32 and same.shape == (8, 8)


def test_resize_map_bilinear_is_smooth() -> None:
    m = np.array([[0.0, 1.0]], dtype=np.float32)
    out = resize_map(m, (1, 4))
    np.testing.assert_allclose(out[0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)


@pytest.mark.parametrize("bad", [np.zeros((1, 8, 8)), np.zeros(8), np.zeros((2, 2), dtype=bool)])
def test_resize_map_refuses_bad_map(bad: np.ndarray) -> None:
    with pytest.raises(ImageReadError, match="invalid anomaly map"):
        resize_map(bad, (4, 4))


@pytest.mark.parametrize("hw", [(0, 4), (4,), (4.0, 4), "44", (True, 4)])
def test_resize_map_refuses_bad_hw(hw: object) -> None:
    with pytest.raises(ConfigError, match="target size"):
        resize_map(np.zeros((4, 4), np.float32), hw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# iter_image_files
# ---------------------------------------------------------------------------------------------


def _touch_image(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (2, 2)).save(path, format="PNG")
    return path


def test_iter_image_files_directory(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for name in ("b.png", "A.JPG", "sub/c.tiff", "sub/deeper/d.WebP", "e.bmp", "f.jpeg", "g.tif"):
        _touch_image(root / name)
    (root / "notes.txt").write_text("x")
    (root / "sub" / "mask.npy").write_bytes(b"x")
    _touch_image(root / ".hidden.png")
    _touch_image(root / ".git" / "h.png")
    (root / "emptydir.png").mkdir()  # a directory with an image suffix is not a file
    found = iter_image_files(root)
    rel = [p.relative_to(root).as_posix() for p in found]
    assert rel == sorted(rel)
    assert set(rel) == {
        "b.png",
        "A.JPG",
        "sub/c.tiff",
        "sub/deeper/d.WebP",
        "e.bmp",
        "f.jpeg",
        "g.tif",
    }


def test_iter_image_files_keeps_explicit_files_and_order(tmp_path: Path) -> None:
    txt = tmp_path / "notes.txt"
    txt.write_text("x")
    img = _touch_image(tmp_path / "d" / "a.png")
    out = iter_image_files([str(txt), tmp_path / "d", img])
    assert out == [txt, img]  # explicit odd file kept; a.png listed once
    with pytest.raises(ImageReadError, match="not a recognised image format"):
        load_image(out[0])


def test_iter_image_files_single_path_and_empty_dir(tmp_path: Path) -> None:
    img = _touch_image(tmp_path / "a.png")
    assert iter_image_files(str(img)) == [img]
    (tmp_path / "empty").mkdir()
    assert iter_image_files(tmp_path / "empty") == []


def test_iter_image_files_missing_path(tmp_path: Path) -> None:
    _touch_image(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="missing.png.*does not exist"):
        iter_image_files([tmp_path / "a.png", tmp_path / "missing.png"])


# ---------------------------------------------------------------------------------------------
# Run side stays torch-free
# ---------------------------------------------------------------------------------------------


def test_runtime_image_modules_do_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import cops_deploy.imaging.decode, cops_deploy.imaging.preprocess\n"
        "import cops_deploy.imaging.visualize\n"
        "bad = sorted(m for m in ('torch', 'torchvision') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
