"""meta.json: atomic writes, validation errors that name the file and the problem, samples."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from cops_deploy.data import meta as meta_mod
from cops_deploy.data.meta import Sample, iter_samples, load_meta, make_entry, write_meta
from cops_deploy.errors import DatasetError


def _meta() -> dict[str, Any]:
    return {
        "train": {"bottle": [make_entry("bottle/train/good/000.png", "", "bottle", "good", 0)]},
        "test": {
            "bottle": [
                make_entry("bottle/test/good/000.png", "", "bottle", "good", 0),
                make_entry(
                    "bottle/test/crack/000.png",
                    "bottle/ground_truth/crack/000_mask.png",
                    "bottle",
                    "crack",
                    1,
                ),
            ],
            "cable": [make_entry("cable/test/good/000.png", "", "cable", "good", 0)],
        },
    }


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    path = write_meta(tmp_path, _meta())
    assert path == tmp_path / "meta.json"
    assert load_meta(tmp_path) == _meta()
    assert load_meta(path) == _meta()  # the file itself is accepted too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]
    text = path.read_text()
    assert text.endswith("\n") and json.loads(text) == _meta()


def test_entry_keys_in_reference_order() -> None:
    assert list(make_entry("a.png", "", "c", "", 0)) == list(meta_mod.ENTRY_KEYS)


def test_write_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_meta(tmp_path, _meta())
    before = (tmp_path / "meta.json").read_bytes()

    def broken_replace(src: str, dst: str) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(meta_mod.os, "replace", broken_replace)
    changed = _meta()
    changed["test"].pop("cable")
    with pytest.raises(OSError, match="disk full"):
        write_meta(tmp_path, changed)
    assert (tmp_path / "meta.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]


def test_write_failure_midway_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_fsync(fd: int) -> None:
        raise OSError("io error")

    monkeypatch.setattr(meta_mod.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="io error"):
        write_meta(tmp_path, _meta())
    assert list(tmp_path.iterdir()) == []


def test_write_invalid_meta_writes_nothing(tmp_path: Path) -> None:
    bad = _meta()
    bad["test"]["bottle"][0]["anomaly"] = 3
    with pytest.raises(DatasetError, match="anomaly"):
        write_meta(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_write_to_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a directory"):
        write_meta(tmp_path / "missing", _meta())


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        load_meta(tmp_path)
    assert str(tmp_path / "meta.json") in str(info.value)
    assert "cops data prepare" in str(info.value)


def test_load_invalid_json_names_file_and_position(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text('{"train": {}, "test": ')
    with pytest.raises(DatasetError, match="not valid JSON") as info:
        load_meta(tmp_path)
    assert str(tmp_path / "meta.json") in str(info.value)
    assert "line 1" in str(info.value)


def _corrupt(path: Path, edit: Any) -> None:
    meta = _meta()
    edit(meta)
    path.write_text(json.dumps(meta))


def _set_entry(key: str, value: Any) -> Any:
    def edit(meta: dict[str, Any]) -> None:
        meta["test"]["bottle"][1][key] = value

    return edit


def _drop_entry_key(meta: dict[str, Any]) -> None:
    del meta["test"]["bottle"][1]["mask_path"]


@pytest.mark.parametrize(
    ("edit", "where", "problem"),
    [
        (lambda m: m.pop("train"), "top level", "missing ['train']"),
        (lambda m: m.update(val={}), "top level", "unknown ['val']"),
        (lambda m: m.update(test=[]), "test", "expected an object"),
        (lambda m: m["test"].update(bottle={}), "test.bottle", "expected a list"),
        (lambda m: m["test"]["bottle"].append("x.png"), "test.bottle[2]", "expected an object"),
        (_drop_entry_key, "test.bottle[1]", "missing keys ['mask_path']"),
        (_set_entry("anomaly", 2), "test.bottle[1].anomaly", "valid values are 0 and 1"),
        (_set_entry("anomaly", True), "test.bottle[1].anomaly", "valid values are 0 and 1"),
        (_set_entry("anomaly", "1"), "test.bottle[1].anomaly", "valid values are 0 and 1"),
        (_set_entry("img_path", ""), "test.bottle[1].img_path", "is empty"),
        (_set_entry("mask_path", None), "test.bottle[1].mask_path", "expected a string"),
        (_set_entry("cls_name", "cable"), "test.bottle[1].cls_name", "must be equal"),
    ],
)
def test_load_rejects_bad_structure(tmp_path: Path, edit: Any, where: str, problem: str) -> None:
    _corrupt(tmp_path / "meta.json", edit)
    with pytest.raises(DatasetError) as info:
        load_meta(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "meta.json") in message
    assert where in message
    assert problem in message


def test_load_accepts_empty_train_split(tmp_path: Path) -> None:
    meta = _meta()
    meta["train"] = {}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert load_meta(tmp_path)["train"] == {}


def test_iter_samples_in_meta_order() -> None:
    samples = list(iter_samples(_meta(), "test"))
    assert [s.img_path for s in samples] == [
        "bottle/test/good/000.png",
        "bottle/test/crack/000.png",
        "cable/test/good/000.png",
    ]
    assert samples[1] == Sample(
        "bottle/test/crack/000.png", "bottle/ground_truth/crack/000_mask.png", "bottle", "crack", 1
    )
    assert [s.has_mask for s in samples] == [False, True, False]


def test_iter_samples_class_filter_and_order() -> None:
    samples = list(iter_samples(_meta(), "test", classes=["cable", "bottle"]))
    assert [s.cls_name for s in samples] == ["cable", "bottle", "bottle"]
    assert [s.cls_name for s in iter_samples(_meta(), "test", classes="cable")] == ["cable"]


def test_iter_samples_unknown_split_and_class() -> None:
    with pytest.raises(DatasetError, match=r"valid splits are \['train', 'test'\]"):
        iter_samples(_meta(), "val")
    with pytest.raises(DatasetError, match="valid classes are") as info:
        iter_samples(_meta(), "train", classes=["cable"])
    assert "cable" in str(info.value) and "bottle" in str(info.value)


def test_sample_files(tmp_path: Path) -> None:
    good, bad = list(iter_samples(_meta(), "test", classes=["bottle"]))
    assert good.image_file(tmp_path) == tmp_path / "bottle/test/good/000.png"
    assert good.mask_file(tmp_path) is None
    assert bad.mask_file(tmp_path) == tmp_path / "bottle/ground_truth/crack/000_mask.png"
    absolute = Sample(os.fspath(tmp_path / "x.png"), "", "c", "", 0)
    assert absolute.image_file("/elsewhere") == tmp_path / "x.png"
