"""Tests for cops_deploy.imaging.visualize: jet colormap, overlays and the three-panel PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_deploy.errors import ConfigError, ImageReadError
from cops_deploy.imaging.visualize import (
    JET_LUT,
    blend,
    colorize,
    colour_range,
    heatmap,
    overlay,
    side_by_side,
)


def _rgb(h: int = 30, w: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _map(h: int = 37, w: int = 37, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# colorize
# ---------------------------------------------------------------------------------------------


def test_colour_range_fixed_and_stretched_over_several_maps() -> None:
    a = np.array([[0.2, np.nan]], dtype=np.float32)
    b = np.array([[0.7, np.inf]], dtype=np.float32)
    assert colour_range([a, b]) == (0.0, 1.0)
    assert colour_range([a, b], vmin=0.1, vmax=0.3) == (0.1, 0.3)
    lo, hi = colour_range([a, b], stretch=True)  # finite values of both maps
    assert (lo, hi) == pytest.approx((0.2, 0.7))
    assert colour_range([np.full((2, 2), np.nan, np.float32)], stretch=True) == (0.0, 1.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stretch": True, "vmin": 0.0}, "stretch=True with vmin=0.0"),
        ({"stretch": True, "vmax": 1.0, "option": "normalize"}, "normalize=True with"),
        ({"vmin": 0.5, "vmax": 0.5}, "invalid colour range"),
        ({"vmin": float("nan")}, "invalid colour range"),
    ],
)
def test_colour_range_refusals(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        colour_range([_map()], **kwargs)


def test_heatmap_scales_and_draws_a_constant_range_cold() -> None:
    m = np.array([[0.2, 0.4]], dtype=np.float32)
    np.testing.assert_array_equal(heatmap(m, 0.2, 0.4), colorize(np.array([[0.0, 1.0]])))
    np.testing.assert_array_equal(heatmap(m, 0.3, 0.3), colorize(np.zeros((1, 2))))


def test_blend_weights_and_rounds() -> None:
    rgb = np.full((1, 2, 3), 100, np.uint8)
    heat = np.full((1, 2, 3), 201, np.uint8)
    np.testing.assert_array_equal(blend(rgb, heat, 0.0), rgb)
    np.testing.assert_array_equal(blend(rgb, heat, 1.0), heat)
    assert blend(rgb, heat, 0.5)[0, 0, 0] == 150  # 150.5 rounds half to even
    with pytest.raises(ConfigError, match="alpha"):
        blend(rgb, heat, 2.0)


def test_colorize_shape_dtype_and_endpoints() -> None:
    m = np.array([[0.0, 0.5, 1.0]], dtype=np.float32)
    out = colorize(m)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[0, 0], [0, 0, 127])  # dark blue
    np.testing.assert_array_equal(out[0, 2], [127, 0, 0])  # dark red
    assert out[0, 1, 1] == 255  # green in the middle


def test_colorize_clips_and_draws_nan_black() -> None:
    out = colorize(np.array([[-1.0, 2.0, np.nan]], dtype=np.float32))
    np.testing.assert_array_equal(out[0, 0], JET_LUT[0])
    np.testing.assert_array_equal(out[0, 1], JET_LUT[255])
    np.testing.assert_array_equal(out[0, 2], [0, 0, 0])


def test_colorize_equals_matplotlib_jet() -> None:
    matplotlib = pytest.importorskip("matplotlib")
    x = np.linspace(-0.05, 1.05, 20001, dtype=np.float32).reshape(1, -1)
    ref = matplotlib.colormaps["jet"](x, bytes=True)[..., :3]
    np.testing.assert_array_equal(colorize(x), ref)


def test_jet_lut_is_read_only() -> None:
    assert JET_LUT.shape == (256, 3) and not JET_LUT.flags.writeable


@pytest.mark.parametrize("bad", [np.zeros((2, 2, 3)), np.zeros(4), np.array([["a"]])])
def test_colorize_refuses_bad_maps(bad: np.ndarray) -> None:
    with pytest.raises(ImageReadError, match="invalid anomaly map"):
        colorize(bad)


# ---------------------------------------------------------------------------------------------
# overlay
# ---------------------------------------------------------------------------------------------


def test_overlay_alpha_extremes() -> None:
    rgb, m = _rgb(), _map(30, 40)
    np.testing.assert_array_equal(overlay(rgb, m, alpha=0.0), rgb)
    np.testing.assert_array_equal(overlay(rgb, m, alpha=1.0), colorize(m))


def test_overlay_half_blend() -> None:
    rgb, m = _rgb(), _map(30, 40)
    expected = np.rint(0.5 * rgb.astype(np.float32) + 0.5 * colorize(m).astype(np.float32))
    np.testing.assert_array_equal(overlay(rgb, m), expected.astype(np.uint8))


def test_overlay_resizes_map_to_image() -> None:
    out = overlay(_rgb(30, 40), _map(37, 37))
    assert out.shape == (30, 40, 3) and out.dtype == np.uint8


def test_overlay_accepts_grey_image() -> None:
    grey = np.full((8, 8), 100, dtype=np.uint8)
    assert overlay(grey, _map(8, 8), alpha=0.0)[0, 0].tolist() == [100, 100, 100]


def test_overlay_fixed_range_and_normalize() -> None:
    m = np.full((4, 4), 0.2, dtype=np.float32)
    m[0, 0] = 0.4
    fixed = overlay(np.zeros((4, 4, 3), np.uint8), m, alpha=1.0)
    np.testing.assert_array_equal(fixed, colorize(m))
    ranged = overlay(np.zeros((4, 4, 3), np.uint8), m, alpha=1.0, vmin=0.2, vmax=0.4)
    norm = overlay(np.zeros((4, 4, 3), np.uint8), m, alpha=1.0, normalize=True)
    np.testing.assert_array_equal(ranged, norm)
    np.testing.assert_array_equal(norm[0, 0], JET_LUT[255])
    np.testing.assert_array_equal(norm[1, 1], JET_LUT[0])


def test_overlay_normalize_constant_map() -> None:
    m = np.full((4, 4), 0.7, dtype=np.float32)
    out = overlay(np.zeros((4, 4, 3), np.uint8), m, alpha=1.0, normalize=True)
    assert (out == JET_LUT[0]).all()


def test_overlay_refuses_normalize_with_range() -> None:
    with pytest.raises(ConfigError, match="exclusive"):
        overlay(_rgb(), _map(), normalize=True, vmax=0.5)


@pytest.mark.parametrize(("vmin", "vmax"), [(0.5, 0.5), (1.0, 0.0), (0.0, float("inf"))])
def test_overlay_refuses_bad_range(vmin: float, vmax: float) -> None:
    with pytest.raises(ConfigError, match="colour range"):
        overlay(_rgb(), _map(), vmin=vmin, vmax=vmax)


@pytest.mark.parametrize("alpha", [-0.1, 1.5, "0.5", None, True])
def test_overlay_refuses_bad_alpha(alpha: object) -> None:
    with pytest.raises(ConfigError, match="alpha"):
        overlay(_rgb(), _map(), alpha=alpha)  # type: ignore[arg-type]


def test_overlay_refuses_bad_image() -> None:
    with pytest.raises(ImageReadError, match="dtype float32"):
        overlay(np.zeros((4, 4, 3), np.float32), _map(4, 4))


# ---------------------------------------------------------------------------------------------
# side_by_side
# ---------------------------------------------------------------------------------------------


def test_side_by_side_writes_png_of_expected_size(tmp_path: Path) -> None:
    out = side_by_side(_rgb(300, 400), _map(518, 518), tmp_path / "out" / "a.png", score=0.73)
    assert out == tmp_path / "out" / "a.png"
    tw = round(400 * 518 / 300)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (3 * tw + 2 * 4, 22 + 518)
        arr = np.asarray(img)
    assert (arr[:22] < 128).any()  # caption text drawn
    assert sorted(p.name for p in out.parent.iterdir()) == ["a.png"]  # no temp file left


def test_side_by_side_panels(tmp_path: Path) -> None:
    rgb, m = _rgb(20, 10), _map(20, 10)
    out = side_by_side(rgb, m, tmp_path / "p.png", tile=20, alpha=1.0)
    with Image.open(out) as img:
        arr = np.asarray(img)
    assert arr.shape == (22 + 20, 3 * 10 + 8, 3)
    np.testing.assert_array_equal(arr[22:, 0:10], rgb)
    np.testing.assert_array_equal(arr[22:, 14:24], colorize(m))
    np.testing.assert_array_equal(arr[22:, 28:38], colorize(m))  # alpha=1: overlay = heatmap
    assert (arr[22:, 10:14] == 255).all()  # white gap


def test_side_by_side_normalize_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "n.png"
    path.write_bytes(b"old")
    side_by_side(_rgb(), _map() * 0.01, path, normalize=True, tile=32)
    with Image.open(path) as img:
        assert img.size == (3 * round(40 * 32 / 30) + 8, 22 + 32)
    assert [p.name for p in tmp_path.iterdir()] == ["n.png"]


def test_side_by_side_refuses_non_png_suffix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"suffix '\.jpg'.*\.png"):
        side_by_side(_rgb(), _map(), tmp_path / "a.jpg")


@pytest.mark.parametrize("tile", [0, -1, 2.0, True])
def test_side_by_side_refuses_bad_tile(tmp_path: Path, tile: object) -> None:
    with pytest.raises(ConfigError, match="tile height"):
        side_by_side(_rgb(), _map(), tmp_path / "a.png", tile=tile)  # type: ignore[arg-type]


def test_side_by_side_refuses_bad_score(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid score"):
        side_by_side(_rgb(), _map(), tmp_path / "a.png", score="high")  # type: ignore[arg-type]


def test_side_by_side_failed_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        side_by_side(_rgb(), _map(), tmp_path / "a.png", tile=16)
    assert list(tmp_path.iterdir()) == []
