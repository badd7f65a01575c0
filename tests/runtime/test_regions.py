"""Defect masks and regions (cops_deploy.runtime.regions) on constructed maps: the threshold
boundary, two blobs, min-area filtering, 8-connectivity, and the labelling against SciPy."""

from __future__ import annotations

import numpy as np
import pytest

from cops_deploy.errors import ConfigError, ImageReadError
from cops_deploy.runtime.regions import Region, defect_regions, label_mask


def _two_blobs() -> np.ndarray:
    """A (40, 60) map: a 5x4 blob at rows 2..5, columns 3..7 (peak 0.9) and a 10x10 one at rows
    20..29, columns 40..49 (values 0.6, one pixel 0.95); background 0.1."""
    amap = np.full((40, 60), 0.1, dtype=np.float32)
    amap[2:6, 3:8] = 0.7
    amap[3, 4] = 0.9
    amap[20:30, 40:50] = 0.6
    amap[25, 45] = 0.95
    return amap


def test_two_blobs_give_two_regions_with_boxes_areas_peaks_and_means() -> None:
    amap = _two_blobs()
    mask, regions = defect_regions(amap, 0.5)
    assert mask.dtype == bool and mask.shape == amap.shape
    assert int(mask.sum()) == 20 + 100
    first, second = regions
    assert (first.x, first.y, first.width, first.height, first.area) == (3, 2, 5, 4, 20)
    assert first.peak == pytest.approx(0.9) and first.mean == pytest.approx((19 * 0.7 + 0.9) / 20)
    assert (second.x, second.y, second.width, second.height, second.area) == (40, 20, 10, 10, 100)
    assert second.peak == pytest.approx(0.95)
    assert second.mean == pytest.approx((99 * 0.6 + 0.95) / 100)
    assert first.to_dict() == {
        "x": 3, "y": 2, "width": 5, "height": 4, "area": 20, "peak": first.peak,
        "mean": first.mean,
    }  # fmt: skip


def test_a_pixel_exactly_at_the_pixel_threshold_is_in_the_mask() -> None:
    amap = np.zeros((5, 5), dtype=np.float32)
    amap[2, 3] = 0.5  # exactly the threshold: defective (>=)
    amap[0, 0] = np.nextafter(np.float32(0.5), np.float32(0))  # just below: not
    mask, regions = defect_regions(amap, 0.5)
    assert mask[2, 3] and not mask[0, 0]
    assert regions == [Region(x=3, y=2, width=1, height=1, area=1, peak=0.5, mean=0.5)]


def test_min_area_drops_small_regions_and_their_pixels_from_the_mask() -> None:
    mask, regions = defect_regions(_two_blobs(), 0.5, min_area=21)
    assert [r.area for r in regions] == [100]
    assert int(mask.sum()) == 100 and not mask[2:6, 3:8].any()
    _, regions = defect_regions(_two_blobs(), 0.5, min_area=20)  # area == min_area: kept
    assert [r.area for r in regions] == [20, 100]


def test_regions_are_8_connected() -> None:
    amap = np.zeros((4, 4), dtype=np.float32)
    amap[0, 0] = amap[1, 1] = amap[2, 2] = 1.0  # a diagonal: one region
    amap[0, 3] = 1.0  # apart
    _, regions = defect_regions(amap, 0.5)
    assert [(r.x, r.y, r.area) for r in regions] == [(0, 0, 3), (3, 0, 1)]


def test_nothing_above_the_threshold_gives_an_empty_mask_and_no_regions() -> None:
    mask, regions = defect_regions(np.zeros((3, 7), dtype=np.float32), 0.5)
    assert regions == [] and mask.shape == (3, 7) and not mask.any()


@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_labelling_equals_scipy_on_random_masks(density: float) -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(int(density * 100))
    for shape in [(1, 1), (1, 17), (13, 1), (31, 47), (64, 64)]:
        mask = rng.random(shape) < density
        got, count = label_mask(mask)
        want, want_count = ndimage.label(mask, structure=np.ones((3, 3)))
        assert count == want_count, shape
        np.testing.assert_array_equal(got, want, err_msg=str(shape))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "0.5", None, True])
def test_an_invalid_pixel_threshold_is_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="invalid pixel threshold"):
        defect_regions(np.zeros((2, 2), dtype=np.float32), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_an_invalid_min_area_is_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="invalid min_area"):
        defect_regions(np.zeros((2, 2), dtype=np.float32), 0.5, bad)  # type: ignore[arg-type]


def test_a_map_that_is_not_2d_is_refused() -> None:
    with pytest.raises(ImageReadError, match="2-D"):
        defect_regions(np.zeros((1, 2, 2), dtype=np.float32), 0.5)
