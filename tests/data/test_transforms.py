"""load_mask: binarise, BILINEAR resize, /255, > 0.5, as the reference target transform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_deploy.data.transforms import load_mask, resize_mask
from cops_deploy.errors import ConfigError, DatasetError


def _random_mask(path: Path, seed: int = 0, shape: tuple[int, int] = (37, 53)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    array = np.zeros(shape, dtype=np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, shape[0] - 8), rng.integers(0, shape[1] - 8)
        h, w = rng.integers(2, 9, 2)
        array[y : y + h, x : x + w] = 255
    array[0, 0] = 1  # a faint non-zero value: foreground after binarisation
    array[-3:, -3:] = 3
    Image.fromarray(array).save(path)
    return array


def _direct(array: np.ndarray, size: int) -> np.ndarray:
    binary = Image.fromarray(np.where(array > 0, 255, 0).astype(np.uint8))
    resized = np.asarray(binary.resize((size, size), Image.BILINEAR), dtype=np.float32)
    return resized / np.float32(255) > 0.5


@pytest.mark.parametrize("size", [518, 64, 21])
def test_load_mask_matches_direct_computation(tmp_path: Path, size: int) -> None:
    array = _random_mask(tmp_path / "m.png")
    got = load_mask(tmp_path / "m.png", size=size)
    assert got.dtype == np.bool_ and got.shape == (size, size)
    np.testing.assert_array_equal(got, _direct(array, size))
    assert got.any() and not got.all()


def test_load_mask_accepts_str_path_and_rgb(tmp_path: Path) -> None:
    array = _random_mask(tmp_path / "m.png", seed=1)
    rgb = np.repeat(array[..., None], 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    np.testing.assert_array_equal(load_mask(str(tmp_path / "rgb.png"), 40), _direct(array, 40))


def test_threshold_is_strictly_above_half() -> None:
    # a bilinear average of exactly 127 or 128 out of 255 sits on either side of 0.5
    low = Image.fromarray(np.full((4, 4), 127, dtype=np.uint8))
    high = Image.fromarray(np.full((4, 4), 128, dtype=np.uint8))
    assert not resize_mask(low, 4).any()
    assert resize_mask(high, 4).all()


def test_missing_mask_path_gives_all_false() -> None:
    assert load_mask("").shape == (518, 518)
    assert not load_mask("").any()
    assert not load_mask(None, size=7).any()


def test_matches_the_torchvision_reference(tmp_path: Path) -> None:
    transforms = pytest.importorskip("torchvision.transforms")
    _random_mask(tmp_path / "m.png", seed=2, shape=(61, 45))
    reference = transforms.Compose(
        [transforms.Resize((518, 518)), transforms.CenterCrop(518), transforms.ToTensor()]
    )
    binary = Image.fromarray(
        (np.asarray(Image.open(tmp_path / "m.png").convert("L")) > 0).astype(np.uint8) * 255,
        mode="L",
    )
    expected = (reference(binary) > 0.5).numpy()[0]
    np.testing.assert_array_equal(load_mask(tmp_path / "m.png"), expected)


def test_absent_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist") as info:
        load_mask(tmp_path / "gone.png")
    assert str(tmp_path / "gone.png") in str(info.value)


def test_unreadable_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot be read") as info:
        load_mask(tmp_path / "bad.png")
    assert str(tmp_path / "bad.png") in str(info.value)


@pytest.mark.parametrize("size", [0, -5, 2.5, True, "518"])
def test_bad_size(size: object) -> None:
    with pytest.raises(ConfigError, match="mask size"):
        load_mask("", size=size)  # type: ignore[arg-type]
