"""``cops data list|prepare|synth`` through the ``cops`` entry point."""

from __future__ import annotations

from pathlib import Path

import pytest
from fake_trees import build_tree

from cops_deploy.cli.main import main
from cops_deploy.data.meta import load_meta
from cops_deploy.data.solvers import DATASETS


def test_list_prints_the_13_datasets(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert list(rows) == list(DATASETS)
    for name, spec in DATASETS.items():
        assert rows[name][1] == spec.display_name
        assert int(rows[name][2]) == spec.n_classes
    assert rows["mvtec"][2] == "15" and rows["visa"][2] == "12"


def test_data_without_action_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data"]) == 2
    assert "prepare" in capsys.readouterr().out


def test_prepare_writes_meta_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build_tree("btad", tmp_path)
    assert main(["data", "prepare", "--dataset", "btad", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert str(tmp_path / "meta.json") in out
    assert "3 classes" in out
    assert list(load_meta(tmp_path)["test"]) == ["01", "02", "03"]


def test_prepare_unknown_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "prepare", "--dataset", "nope", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown dataset 'nope'" in err
    assert "mvtec" in err and "endo" in err


def test_prepare_wrong_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "prepare", "--dataset", "kvasir", "--root", str(tmp_path)]) == 2
    assert str(tmp_path / "images") in capsys.readouterr().err
    assert not (tmp_path / "meta.json").exists()


def test_synth_then_refuse_then_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "synth"
    args = ["data", "synth", "--out", str(out), "--seed", "3", "--size", "32"]
    args += ["--n-train-good", "1", "--n-test-good", "1", "--n-test-bad", "2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and str(out / "meta.json") in printed
    assert "6 classes" in printed and "12 anomalous" in printed
    before = (out / "meta.json").read_bytes()

    assert main(args) == 2
    assert "--force" in capsys.readouterr().err

    assert main([*args, "--force"]) == 0
    assert (out / "meta.json").read_bytes() == before


def test_synth_bad_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--size", "8"]) == 2
    assert "image size 8" in capsys.readouterr().err
