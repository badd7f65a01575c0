"""Tests for cops_deploy.evaluate.report: result tables and the overlay grid PNG."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_deploy.errors import ConfigError, ImageReadError
from cops_deploy.evaluate.report import (
    ResultFiles,
    format_markdown,
    mean_over_classes,
    overlay_grid,
    write_results,
)

RESULTS = {
    "bottle": {"I-AUROC": 0.95, "I-AP": 0.978, "P-AUROC": 0.934, "P-AP": 0.419},
    "cable": {"I-AUROC": 0.85, "I-AP": None, "P-AUROC": 0.9, "P-AP": 0.3},
    "grid, wood|x": {"I-AUROC": 0.7, "I-AP": 0.8, "P-AUROC": None, "P-AP": 0.2},
}
METRICS = ["I-AUROC", "I-AP", "P-AUROC", "P-AP"]


def _mean(metric: str) -> float:
    values = [row[metric] for row in RESULTS.values() if row[metric] is not None]
    return math.fsum(values) / len(values)


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def test_mean_over_classes_ignores_none() -> None:
    means, counts = mean_over_classes(RESULTS)
    assert counts == {"I-AUROC": 3, "I-AP": 2, "P-AUROC": 2, "P-AP": 3}
    for m in METRICS:
        assert means[m] == pytest.approx(_mean(m))


def test_mean_is_none_when_no_class_has_a_value() -> None:
    means, counts = mean_over_classes({"a": {"I-AUROC": None}, "b": {"I-AUROC": None}})
    assert means == {"I-AUROC": None} and counts == {"I-AUROC": 0}


def test_write_results_files_parse_back(tmp_path: Path) -> None:
    files = write_results(RESULTS, tmp_path / "out", title="MVTec-AD", meta={"model": "cops"})
    assert isinstance(files, ResultFiles)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "results.csv",
        "results.json",
        "results.md",
    ]  # no temporary files left

    rows = list(csv.DictReader(files.csv.open(encoding="utf-8")))
    assert [r["class"] for r in rows] == [*RESULTS, "mean"]
    for row in rows[:-1]:
        for m in METRICS:
            want = RESULTS[row["class"]][m]
            assert row[m] == "n/a" if want is None else float(row[m]) == want
    for m in METRICS:
        assert float(rows[-1][m]) == pytest.approx(_mean(m), rel=1e-15)

    data = json.loads(files.json.read_text(encoding="utf-8"))
    assert data["title"] == "MVTec-AD" and data["meta"] == {"model": "cops"}
    assert data["unit"] == "fraction" and data["metrics"] == METRICS
    assert data["classes"] == RESULTS  # None <-> null round trip
    assert data["mean_count"] == {"I-AUROC": 3, "I-AP": 2, "P-AUROC": 2, "P-AP": 3}
    assert data["mean"]["P-AP"] == pytest.approx(_mean("P-AP"))

    md = files.markdown.read_text(encoding="utf-8")
    assert md.startswith("# MVTec-AD\n")
    assert "| bottle | 95.0 | 97.8 | 93.4 | 41.9 |" in md
    assert "| cable | 85.0 | n/a | 90.0 | 30.0 |" in md
    assert "grid, wood\\|x" in md  # pipe escaped
    mean_row = next(line for line in md.splitlines() if line.startswith("| **Mean**"))
    assert f"**{100 * _mean('I-AP'):.1f}**" in mean_row
    assert "n/a entries are left out of the mean: I-AP over 2 of 3, P-AUROC over 2 of 3" in md


def test_write_results_overwrites_and_keeps_metric_order(tmp_path: Path) -> None:
    write_results(RESULTS, tmp_path)
    files = write_results({"a": {"P-AP": 0.5, "I-AUROC": 1.0, "custom": 0.25}}, tmp_path)
    header = files.csv.read_text(encoding="utf-8").splitlines()[0]
    assert header == "class,I-AUROC,P-AP,custom"
    assert "no n/a entries" in files.markdown.read_text(encoding="utf-8")
    chosen = write_results(RESULTS, tmp_path, metrics=["P-AP", "I-AUROC"])
    assert json.loads(chosen.json.read_text())["metrics"] == ["P-AP", "I-AUROC"]


def test_format_markdown_all_na_column() -> None:
    md = format_markdown({"a": {"I-AUROC": None}, "b": {"I-AUROC": None}}, decimals=2)
    assert "| **Mean** | **n/a** |" in md and "I-AUROC over 0 of 2" in md


@pytest.mark.parametrize(
    ("results", "match"),
    [
        ({}, "no classes"),
        ({"a": {"I-AUROC": 95.0}}, "divide percentages by 100"),
        ({"a": {"I-AUROC": -1.0}}, "not NaN or -1"),
        ({"a": {"I-AUROC": float("nan")}}, "not NaN or -1"),
        ({"a": {"I-AUROC": True}}, "a number in"),
        ({"a": {"I-AUROC": "0.9"}}, "a number in"),
        ({"a": [0.9]}, "class name"),
        ({"a": {}}, "no metric"),
        ([("a", {"I-AUROC": 0.5})], "a list"),
    ],
    ids=["empty", "percent", "minus-one", "nan", "bool", "str", "not-mapping", "no-metric", "list"],
)
def test_write_results_refuses_bad_results(tmp_path: Path, results: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        write_results(results, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_write_results_refuses_unserialisable_meta(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        write_results(RESULTS, tmp_path, meta={"root": tmp_path})
    assert list(tmp_path.iterdir()) == []


def test_write_results_refuses_file_as_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="cannot create the output folder"):
        write_results(RESULTS, blocker / "sub")


# ---------------------------------------------------------------------------------------------
# Overlay grid
# ---------------------------------------------------------------------------------------------


def _grid_inputs(n: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for _ in range(n)]
    masks: list = [rng.random((40, 30)) > 0.8 for _ in range(n)]
    masks[0] = None
    maps = [rng.random((20, 20)).astype(np.float32) for _ in range(n)]
    return images, masks, maps


def test_overlay_grid_size_mode_and_panels(tmp_path: Path) -> None:
    images, masks, maps = _grid_inputs()
    maps[1] = np.ones((20, 20), dtype=np.float32)
    out = overlay_grid(
        images, masks, maps, tmp_path / "sub" / "grid.png", tile=32, row_labels=["a", "b", "c"]
    )
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (3 * 32 + 4 * 2, 18 + 3 * (32 + 2) + 2)
        arr = np.asarray(img)
    top0, top1 = 18, 18 + 34
    assert (arr[top0 : top0 + 32, 36 : 36 + 32] == 0).all()  # None mask: black panel
    assert set(np.unique(arr[top1 : top1 + 32, 36 : 36 + 32])) <= {0, 255}  # binary mask
    red = arr[top1 + 16, 70 + 16].astype(int)  # map == vmax: blend towards dark red
    assert red[0] > red[2] + 20
    assert [p.name for p in out.parent.iterdir()] == ["grid.png"]


def test_overlay_grid_caps_rows_and_accepts_no_masks(tmp_path: Path) -> None:
    images, _, maps = _grid_inputs(n=5)
    out = overlay_grid(images, None, maps, tmp_path / "g.png", max_rows=2, tile=16, stretch=True)
    with Image.open(out) as img:
        assert img.size == (3 * 16 + 8, 18 + 2 * 18 + 2)


def test_overlay_grid_accepts_grey_and_pil_images(tmp_path: Path) -> None:
    images, masks, maps = _grid_inputs(n=2)
    grey = images[0][..., 0]
    pil = Image.fromarray(images[1])
    out = overlay_grid([grey, pil], masks, maps, tmp_path / "g.png", tile=16, vmin=0, vmax=2)
    assert out.is_file()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tile": 8}, "tile"),
        ({"max_rows": 0}, "max_rows"),
        ({"alpha": 1.5}, "alpha"),
        ({"vmin": 1.0, "vmax": 0.5}, "vmin < vmax"),
        ({"stretch": True, "vmin": 0.0}, "exclusive"),
        ({"row_labels": ["only one"]}, "row labels"),
    ],
    ids=["tile", "max-rows", "alpha", "range", "stretch-and-range", "labels"],
)
def test_overlay_grid_refuses_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    images, masks, maps = _grid_inputs(n=2)
    with pytest.raises(ConfigError, match=match):
        overlay_grid(images, masks, maps, tmp_path / "g.png", **kwargs)
    assert not (tmp_path / "g.png").exists()


@pytest.mark.parametrize("what", ["count", "map-3d", "map-nan", "mask-3d", "image"])
def test_overlay_grid_refuses_bad_inputs(tmp_path: Path, what: str) -> None:
    images, masks, maps = _grid_inputs(n=2)
    error: type[Exception] = ConfigError
    if what == "count":
        maps = maps[:1]
    elif what == "map-3d":
        maps[1] = maps[1][None]
    elif what == "map-nan":
        maps[1][0, 0] = np.nan
    elif what == "mask-3d":
        masks[1] = masks[1][None]
    else:
        images[1] = np.zeros((4, 4, 3), dtype=np.complex64)
        error = ImageReadError
    with pytest.raises(error):
        overlay_grid(images, masks, maps, tmp_path / "g.png", tile=16)
    assert not (tmp_path / "g.png").exists()
