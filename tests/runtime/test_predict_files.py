"""Scoring files as a library: predict_files with a Detector, write_predictions with any batch
predictor; scores.json and pictures written, bad files recorded, silence unless progress."""

from __future__ import annotations

import json
from pathlib import Path

import cops_tiny_bundle
import numpy as np
import pytest
from PIL import Image

from cops_deploy.errors import ConfigError, CopsError, ImageReadError
from cops_deploy.runtime.detector import Detector
from cops_deploy.runtime.predict_files import (
    SCORES_FILE,
    PredictReport,
    detector_batch,
    predict_files,
    prepare_out_dir,
    write_predictions,
)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rgbs = cops_tiny_bundle.rng_images(3, seed=2)
    Image.fromarray(rgbs[0]).save(folder / "a.png")
    Image.fromarray(rgbs[1]).save(folder / "b.png")
    Image.fromarray(rgbs[2]).save(folder / "sub" / "a.png")  # same stem as a.png
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


class FakeBatch:
    """A batch predictor that records its batch sizes: score = mean / 255, map = zeros."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        self.sizes.append(len(rgbs))
        scores = np.array([rgb.mean() / 255 for rgb in rgbs], dtype=np.float32)
        return scores, np.zeros((len(rgbs), 8, 8), dtype=np.float32)


def test_write_predictions(inputs: Path, tmp_path: Path, capsys) -> None:
    fake, out = FakeBatch(), tmp_path / "out"
    report = write_predictions(inputs, fake, out, batch_size=2, info={"model": "fake"})
    assert isinstance(report, PredictReport)
    assert fake.sizes == [2, 1]  # the broken file is not batched
    sources = [Path(r["source"]) for r in report.results]
    assert sources == [inputs / "a.png", inputs / "b.png", inputs / "sub" / "a.png"]
    assert [Path(f["source"]).name for f in report.failures] == ["broken.png"]
    assert len({r["visual"] for r in report.results}) == 3  # the two a.png do not collide
    assert all((out / r["visual"]).is_file() for r in report.results)
    with Image.open(inputs / "b.png") as im:
        want = np.asarray(im).mean() / 255
    assert report.results[1]["score"] == pytest.approx(want, abs=1e-6)
    saved = json.loads((out / SCORES_FILE).read_text())
    assert list(saved) == ["model", "results", "failures", "skipped"]
    assert saved["results"] == report.results and saved["failures"] == report.failures
    assert saved["skipped"] == report.skipped == []
    assert capsys.readouterr() == ("", "")  # silent without progress


def test_progress_names_the_skipped_file(inputs: Path, tmp_path: Path, capsys) -> None:
    write_predictions([inputs], FakeBatch(), tmp_path / "out", progress=True)
    err = capsys.readouterr().err
    assert "failed" in err and "broken.png" in err and "predict" in err


def test_missing_input_fails_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        write_predictions([tmp_path / "nowhere"], FakeBatch(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prepare_out_dir(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(CopsError, match="exists and is not a folder"):
        prepare_out_dir(tmp_path / "file", force=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.txt").write_text("keep")
    with pytest.raises(CopsError, match="already holds results.*--force"):
        prepare_out_dir(tmp_path / "full", force=False)
    prepare_out_dir(tmp_path / "full", force=True)
    prepare_out_dir(tmp_path / "new" / "deeper", force=False)
    assert (tmp_path / "new" / "deeper").is_dir()


def test_predict_files_with_a_detector(inputs: Path, tiny_bundle: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    with Detector.open(tiny_bundle, backend="onnxruntime") as detector:
        report = predict_files(detector, [inputs], out, batch_size=2)
        expected = [p.score for p in detector.predict([r["source"] for r in report.results])]
    np.testing.assert_allclose([r["score"] for r in report.results], expected, atol=1e-6)
    saved = json.loads((out / SCORES_FILE).read_text())
    assert saved["bundle"] == str(tiny_bundle) and saved["backend"] == "onnxruntime"
    assert saved["precision"] == "fp32" and saved["threshold"] is None
    assert list(saved)[:5] == ["bundle", "backend", "provider", "precision", "threshold"]
    assert len(saved["results"]) == 3 and len(saved["failures"]) == 1
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize(
    ("batch_size", "message"),
    [(0, "invalid --batch-size 0"), (True, "invalid --batch-size True"), (99, "99 exceeds")],
)
def test_batch_size_refusals(tiny_bundle: Path, tmp_path: Path, batch_size, message) -> None:
    with Detector.open(tiny_bundle, backend="onnxruntime") as detector:
        with pytest.raises(ConfigError, match=message):
            predict_files(detector, [tmp_path], tmp_path / "out", batch_size=batch_size)
        with pytest.raises(ConfigError, match=message):
            detector_batch(detector, batch_size)
    assert not (tmp_path / "out").exists()
