"""``cops data prepare --dataset folder`` then ``cops train`` and ``cops eval`` on cops-tiny."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_deploy.cli.main import main
from cops_deploy.data.meta import load_meta


def _write(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture(scope="module")
def own_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """parts/ok (3 normal), parts/ng (2 anomalous) and parts/ng_masks (their masks), 40x32."""
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    for i in range(3):
        _write(root / "ok" / f"ok{i}.png", rng.integers(100, 140, (32, 40, 3), dtype=np.uint8))
    for i in range(2):
        image = rng.integers(100, 140, (32, 40, 3), dtype=np.uint8)
        image[8:16, 10:20] = 250
        _write(root / "ng" / f"ng{i}.png", image)
        mask = np.zeros((32, 40), dtype=np.uint8)
        mask[8:16, 10:20] = 255
        _write(root / "ng_masks" / f"ng{i}_mask.png", mask)
    return root


def _prepare(root: Path, *extra: str) -> list[str]:
    return ["data", "prepare", "--dataset", "folder", "--root", str(root), *extra]


def test_prepare_train_and_eval_a_folder_dataset(
    own_folders: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folders = ["--normal-dir", "ok", "--abnormal-dir", "ng", "--mask-dir", "ng_masks"]
    assert main(_prepare(own_folders, *folders, "--class-name", "part")) == 0
    out = capsys.readouterr().out
    assert str(own_folders / "meta.json") in out and "3 good, 2 anomalous" in out
    assert [e["mask_path"] for e in load_meta(own_folders)["test"]["part"]][3:] == [
        "ng_masks/ng0_mask.png",
        "ng_masks/ng1_mask.png",
    ]
    run = tmp_path / "run"
    common = ["--data", str(own_folders), "--dataset", "folder", "--random-clip", "--no-progress"]
    train = ["train", *common, "--out", str(run), "--model", "cops-tiny", "--epochs", "1"]
    assert main(train) == 0
    evaluation = tmp_path / "eval"
    assert main(["eval", *common, "--weights", str(run / "model"), "--out", str(evaluation)]) == 0
    assert "mean: I-AUROC" in capsys.readouterr().out
    results = json.loads((evaluation / "results.json").read_text())
    assert "part" in json.dumps(results)
    assert (evaluation / "overlays" / "part.png").is_file()


def test_prepare_folder_needs_its_folders(own_folders: Path, capsys) -> None:
    assert main(_prepare(own_folders, "--abnormal-dir", "ng")) == 2
    assert "--dataset folder needs --normal-dir" in capsys.readouterr().err


def test_folder_flags_with_another_dataset_are_refused(own_folders: Path, capsys) -> None:
    args = ["data", "prepare", "--dataset", "mvtec", "--root", str(own_folders)]
    assert main([*args, "--normal-dir", "ok"]) == 2
    assert "--normal-dir describe your own folders and need --dataset folder" in (
        capsys.readouterr().err
    )


def test_prepare_folder_reports_a_dataset_error(own_folders: Path, capsys) -> None:
    args = _prepare(own_folders, "--normal-dir", "ok", "--abnormal-dir", "ng", "--mask-dir", "ok")
    assert main(args) == 2
    assert "Images without a mask (2)" in capsys.readouterr().err
