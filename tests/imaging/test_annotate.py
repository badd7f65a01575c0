"""Result pictures (cops_deploy.imaging.annotate): region outlines where the regions are, the
decision's banner, and the refusals."""

from __future__ import annotations

import numpy as np
import pytest

from cops_deploy.errors import ConfigError
from cops_deploy.imaging.annotate import (
    ANOMALOUS_COLOUR,
    NORMAL_COLOUR,
    UNDECIDED_COLOUR,
    annotate,
    verdict,
)
from cops_deploy.runtime.regions import Region


def _region(x: int, y: int, width: int, height: int) -> Region:
    return Region(x=x, y=y, width=width, height=height, area=width * height, peak=1.0, mean=1.0)


def test_regions_are_outlined_in_the_decision_colour_on_a_copy() -> None:
    image = np.zeros((120, 200, 3), dtype=np.uint8)
    box = _region(100, 60, 30, 20)
    out = annotate(image, [box], is_anomalous=True, score=0.9, threshold=0.5, line_width=1)
    assert out.shape == image.shape and out.dtype == np.uint8 and not image.any()
    red = np.all(out == ANOMALOUS_COLOUR, axis=2)
    assert red[60, 100:130].all() and red[79, 100:130].all()  # top and bottom edges
    assert red[60:80, 100].all() and red[60:80, 129].all()  # left and right edges
    assert not red[61:79, 101:129].any()  # inside untouched
    assert not red[81:, :].any() and not red[30:, 131:].any()  # outside (below the banner)
    assert red[:10, :20].any()  # the banner


@pytest.mark.parametrize(
    ("decision", "colour", "word"),
    [(True, ANOMALOUS_COLOUR, "ANOMALOUS"), (False, NORMAL_COLOUR, "OK"),
     (None, UNDECIDED_COLOUR, "NO THRESHOLD")],
)  # fmt: skip
def test_the_banner_shows_the_decision(decision: bool | None, colour: tuple, word: str) -> None:
    out = annotate(np.zeros((64, 64, 3), dtype=np.uint8), is_anomalous=decision)
    assert np.all(out[1, 1] == colour)
    assert verdict(decision) == word


def test_a_region_outside_the_image_is_refused() -> None:
    with pytest.raises(ConfigError, match="outside the 64x32 image"):
        annotate(np.zeros((32, 64, 3), dtype=np.uint8), [_region(60, 0, 10, 10)])


def test_an_invalid_line_width_is_refused() -> None:
    with pytest.raises(ConfigError, match="invalid line_width"):
        annotate(np.zeros((8, 8, 3), dtype=np.uint8), line_width=0)
