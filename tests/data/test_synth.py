"""The synthetic defect dataset: layout, meta.json, exact masks, determinism, torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_deploy.data.meta import iter_samples, load_meta
from cops_deploy.data.synth import (
    DEFECT_KINDS,
    OBJECT_CLASSES,
    SYNTH_CLASSES,
    render_defect,
    render_good,
    synthesize,
)
from cops_deploy.errors import ConfigError, DatasetError

SMALL = {"n_train_good": 1, "n_test_good": 1, "n_test_bad": 5, "size": 48}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize(tmp_path_factory.mktemp("synth") / "out", seed=7, **SMALL)


def test_layout_and_meta(synth_root: Path) -> None:
    meta = load_meta(synth_root)
    assert list(meta["test"]) == list(SYNTH_CLASSES)
    for cls in SYNTH_CLASSES:
        assert (synth_root / cls / "train" / "good" / "000.png").is_file()
        test = meta["test"][cls]
        assert sum(e["anomaly"] == 0 for e in test) == 1
        assert sorted(e["specie_name"] for e in test if e["anomaly"]) == sorted(DEFECT_KINDS)
        assert len(meta["train"][cls]) == 1
    bad = next(e for e in meta["test"]["disc"] if e["specie_name"] == "scratch")
    assert bad["img_path"] == "disc/test/scratch/000.png"
    assert bad["mask_path"] == "disc/ground_truth/scratch/000_mask.png"


def test_masks_cover_defects_and_good_images_have_none(synth_root: Path) -> None:
    meta = load_meta(synth_root)
    for sample in iter_samples(meta, "test"):
        image = Image.open(sample.image_file(synth_root))
        assert image.size == (48, 48) and image.mode == "RGB"
        if sample.anomaly == 0:
            assert sample.mask_path == ""
            continue
        mask = np.asarray(Image.open(sample.mask_file(synth_root)))
        assert mask.shape == (48, 48) and set(np.unique(mask)) <= {0, 255}
        assert (mask > 0).sum() >= 8
    for sample in iter_samples(meta, "train"):
        assert sample.anomaly == 0 and sample.mask_path == ""


@pytest.mark.parametrize("category", SYNTH_CLASSES)
@pytest.mark.parametrize("defect", DEFECT_KINDS)
def test_mask_is_exactly_the_changed_pixels(category: str, defect: str) -> None:
    sample = render_defect(category, defect, np.random.default_rng(3), size=64)
    changed = np.any(sample.image != sample.clean, axis=-1)
    np.testing.assert_array_equal(sample.mask, changed)
    assert sample.mask.sum() >= 8
    assert sample.image.dtype == np.uint8 and sample.image.shape == (64, 64, 3)


@pytest.mark.parametrize("category", OBJECT_CLASSES[:2])
def test_object_defects_stay_on_the_object(category: str) -> None:
    for defect in ("scratch", "blob", "colour_spot", "missing_part"):
        rng = np.random.default_rng(11)
        scene = render_good(category, np.random.default_rng(11), size=64)
        sample = render_defect(category, defect, rng, size=64)
        assert scene.object_mask is not None
        assert not (sample.mask & ~scene.object_mask).any()


def test_same_seed_same_bytes(tmp_path: Path, synth_root: Path) -> None:
    again = synthesize(tmp_path / "again", seed=7, **SMALL)
    assert _files(again) == _files(synth_root)


def test_different_seed_different_images(tmp_path: Path, synth_root: Path) -> None:
    other = _files(synthesize(tmp_path / "other", seed=8, **SMALL))
    base = _files(synth_root)
    assert set(other) == set(base)
    assert other["meta.json"] == base["meta.json"]
    differing = [name for name in base if name.endswith(".png") and other[name] != base[name]]
    assert len(differing) > len(base) // 2


def test_default_arguments_are_small_and_complete(tmp_path: Path) -> None:
    root = synthesize(tmp_path / "default", seed=0)
    meta = load_meta(root)
    assert Image.open(root / "stripes" / "test" / "good" / "000.png").size == (128, 128)
    for cls in SYNTH_CLASSES:
        assert {e["specie_name"] for e in meta["test"][cls]} == {"good", *DEFECT_KINDS}


def test_subset_of_classes_and_defects(tmp_path: Path) -> None:
    root = synthesize(
        tmp_path / "subset", seed=1, n_test_bad=3, size=32, classes=["pcb"], defects=["blob"]
    )
    meta = load_meta(root)
    assert list(meta["test"]) == ["pcb"]
    bad = [e["img_path"] for e in meta["test"]["pcb"] if e["anomaly"]]
    assert bad == [f"pcb/test/blob/{i:03d}.png" for i in range(3)]


def test_refuses_non_empty_out_dir_without_force(tmp_path: Path) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty") as info:
        synthesize(out, seed=0, **SMALL)
    assert str(out) in str(info.value) and "notes.txt" in str(info.value)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_force_replaces_the_synthetic_classes(tmp_path: Path) -> None:
    out = synthesize(tmp_path / "f", seed=0, **SMALL)
    stale = out / "disc" / "test" / "stale"
    stale.mkdir()
    (stale / "x.png").write_bytes(b"")
    synthesize(out, seed=0, force=True, **SMALL)
    assert not stale.exists()
    assert load_meta(out)["test"]["disc"]


def test_out_path_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(DatasetError, match="not a directory"):
        synthesize(tmp_path / "file", seed=0, **SMALL)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, "seed"),
        ({"size": 16}, "image size"),
        ({"n_test_bad": 0}, "n_test_bad"),
        ({"classes": ["bottle"]}, "unknown category 'bottle'"),
        ({"defects": ["dent"]}, "unknown defect 'dent'"),
        ({"classes": ["disc", "disc"]}, "repeat"),
        ({"defects": []}, "must not be empty"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        synthesize(tmp_path / "x", **kwargs)  # type: ignore[arg-type]
    assert not (tmp_path / "x").exists()


def test_data_package_is_torch_free() -> None:
    code = (
        "import sys, cops_deploy.data, cops_deploy.data.synth, cops_deploy.cli.data_cmd; "
        "sys.exit('torch' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
