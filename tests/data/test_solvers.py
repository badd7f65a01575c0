"""The 13 dataset solvers on miniature trees in each download layout, and their error paths."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fake_trees import TREES, build_tree, sorted_meta

from cops_deploy.data import meta as meta_mod
from cops_deploy.data.meta import iter_samples, load_meta
from cops_deploy.data.solvers import DATASETS, build_meta, get_dataset, prepare_dataset
from cops_deploy.errors import DatasetError

EXPECTED_COUNTS = {
    "mvtec": 15, "visa": 12, "btad": 3, "mpdd": 6, "dtd": 12, "headct": 1, "brainmri": 1,
    "br35h": 1, "isic": 1, "colondb": 1, "clinicdb": 1, "kvasir": 1, "endo": 1,
}  # fmt: skip
MASKED = [name for name, spec in DATASETS.items() if spec.pixel_labels]


def test_registry_has_the_13_datasets_with_their_class_counts() -> None:
    assert {name: spec.n_classes for name, spec in DATASETS.items()} == EXPECTED_COUNTS
    assert set(TREES) == set(DATASETS)
    for name, spec in DATASETS.items():
        assert spec.name == name and name == name.lower()
        assert spec.image_labels or spec.pixel_labels
        assert spec.layout


@pytest.mark.parametrize("name", list(DATASETS))
def test_solver_builds_the_expected_meta(name: str, tmp_path: Path) -> None:
    expected = build_tree(name, tmp_path)
    path = prepare_dataset(name, tmp_path)
    assert path == tmp_path / "meta.json"
    got = load_meta(tmp_path)
    assert sorted_meta(got) == sorted_meta(expected)
    spec = DATASETS[name]
    assert list(got["test"]) == list(spec.classes)
    for sample in iter_samples(got, "test"):
        assert not Path(sample.img_path).is_absolute()
        assert sample.image_file(tmp_path).is_file()
        if sample.anomaly and spec.pixel_labels:
            assert sample.mask_file(tmp_path).is_file()
        else:
            assert sample.mask_path == ""
    labels = {s.anomaly for s in iter_samples(got, "test")}
    assert labels == ({0, 1} if spec.image_labels else {1})


def test_solver_skips_clutter_and_sorts(tmp_path: Path) -> None:
    build_tree("br35h", tmp_path)
    meta = build_meta("br35h", tmp_path)
    paths = [e["img_path"] for e in meta["test"]["brain"]]
    assert paths == ["no/1 no.jpeg", "no/N2.JPG", "yes/Y1.jpg"]  # no 'pred', sorted


def test_btad_pairs_masks_across_extensions(tmp_path: Path) -> None:
    build_tree("btad", tmp_path)
    meta = build_meta("btad", tmp_path)
    bad = [e for e in meta["test"]["01"] if e["anomaly"]]
    assert bad[0]["img_path"] == "01/test/ko/000.bmp"
    assert bad[0]["mask_path"] == "01/ground_truth/ko/000.png"


@pytest.mark.parametrize("alias", ["MVTec-AD", "mvtec_ad", "MVTEC"])
def test_dataset_aliases(alias: str) -> None:
    assert get_dataset(alias).name == "mvtec"


def test_unknown_dataset_lists_valid_names(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        prepare_dataset("mvtec3d", tmp_path)
    message = str(info.value)
    assert "mvtec3d" in message
    for name in DATASETS:
        assert name in message


@pytest.mark.parametrize("name", list(DATASETS))
def test_wrong_root_names_the_missing_path(name: str, tmp_path: Path) -> None:
    (tmp_path / "unrelated").mkdir()
    with pytest.raises(DatasetError) as info:
        prepare_dataset(name, tmp_path)
    assert str(tmp_path) in str(info.value)
    assert "Fix" in str(info.value) or "fix" in str(info.value)
    assert not (tmp_path / "meta.json").exists()


def test_root_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError, match="not a directory") as info:
        prepare_dataset("mvtec", missing)
    assert str(missing) in str(info.value)


def test_missing_class_folder_is_named(tmp_path: Path) -> None:
    build_tree("mpdd", tmp_path)
    shutil.rmtree(tmp_path / "tubes")
    with pytest.raises(DatasetError) as info:
        prepare_dataset("mpdd", tmp_path)
    assert str(tmp_path / "tubes") in str(info.value)


def test_missing_ground_truth_folder_is_named(tmp_path: Path) -> None:
    build_tree("mvtec", tmp_path)
    shutil.rmtree(tmp_path / "bottle" / "ground_truth" / "crack")
    with pytest.raises(DatasetError) as info:
        prepare_dataset("mvtec", tmp_path)
    assert str(tmp_path / "bottle" / "ground_truth" / "crack") in str(info.value)


@pytest.mark.parametrize("name", MASKED)
def test_missing_mask_names_the_image_and_writes_nothing(name: str, tmp_path: Path) -> None:
    expected = build_tree(name, tmp_path)
    (tmp_path / "meta.json").unlink(missing_ok=True)
    entry = next(e for e in iter_samples(expected, "test") if e.mask_path)
    (tmp_path / entry.mask_path).unlink()
    with pytest.raises(DatasetError) as info:
        prepare_dataset(name, tmp_path)
    assert str(tmp_path / entry.img_path) in str(info.value)
    assert "mask" in str(info.value)
    assert not (tmp_path / "meta.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".meta")] == []


def test_failed_prepare_keeps_the_previous_meta(tmp_path: Path) -> None:
    expected = build_tree("colondb", tmp_path)
    prepare_dataset("colondb", tmp_path)
    before = (tmp_path / "meta.json").read_bytes()
    entry = next(iter_samples(expected, "test"))
    (tmp_path / entry.mask_path).unlink()
    with pytest.raises(DatasetError):
        prepare_dataset("colondb", tmp_path)
    assert (tmp_path / "meta.json").read_bytes() == before


def test_empty_image_folder_is_an_error(tmp_path: Path) -> None:
    build_tree("headct", tmp_path)
    for path in (tmp_path / "brain" / "test" / "Ungood").iterdir():
        path.unlink()
    with pytest.raises(DatasetError, match="holds no images") as info:
        prepare_dataset("headct", tmp_path)
    assert str(tmp_path / "brain" / "test" / "Ungood") in str(info.value)


def test_headct_without_anomalous_folder(tmp_path: Path) -> None:
    build_tree("headct", tmp_path)
    shutil.rmtree(tmp_path / "brain" / "test" / "Ungood")
    with pytest.raises(DatasetError, match="no folder of anomalous images"):
        prepare_dataset("headct", tmp_path)


def test_visa_missing_image_is_named(tmp_path: Path) -> None:
    build_tree("visa", tmp_path)
    (tmp_path / "pcb1" / "Data" / "Images" / "Normal" / "0002.JPG").unlink()
    with pytest.raises(DatasetError) as info:
        prepare_dataset("visa", tmp_path)
    assert str(tmp_path / "pcb1" / "Data" / "Images" / "Normal" / "0002.JPG") in str(info.value)


def test_visa_bad_label_names_the_line(tmp_path: Path) -> None:
    build_tree("visa", tmp_path)
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    csv_path.write_text(csv_path.read_text().replace("train,normal", "train,weird", 1))
    with pytest.raises(DatasetError, match="line 2") as info:
        prepare_dataset("visa", tmp_path)
    assert "weird" in str(info.value)


def test_visa_empty_mask_column_of_an_anomaly(tmp_path: Path) -> None:
    build_tree("visa", tmp_path)
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    lines = csv_path.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if ",anomaly," in line)
    lines[index] = lines[index].rsplit(",", 1)[0] + ","
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match="mask column is empty"):
        prepare_dataset("visa", tmp_path)


def test_visa_csv_with_bom_and_missing_class(tmp_path: Path) -> None:
    build_tree("visa", tmp_path)
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    lines = [line for line in csv_path.read_text().splitlines() if not line.startswith("pcb4,")]
    csv_path.write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="pcb4"):
        prepare_dataset("visa", tmp_path)


def test_visa_csv_without_header(tmp_path: Path) -> None:
    build_tree("visa", tmp_path)
    (tmp_path / "split_csv" / "1cls.csv").write_text("")
    with pytest.raises(DatasetError, match="header"):
        prepare_dataset("visa", tmp_path)


def test_prepare_meta_is_readable_by_meta_module(tmp_path: Path) -> None:
    build_tree("kvasir", tmp_path)
    prepare_dataset("kvasir", tmp_path)
    meta_mod.validate_meta(load_meta(tmp_path))
    assert load_meta(tmp_path)["train"] == {}
