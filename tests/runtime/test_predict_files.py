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
from cops_deploy.imaging.annotate import ANOMALOUS_COLOUR, NORMAL_COLOUR, UNDECIDED_COLOUR
from cops_deploy.runtime.detector import Detector
from cops_deploy.runtime.predict_files import (
    JOURNAL_FILE,
    REVIEW_FILE,
    SCORES_FILE,
    Decision,
    PredictReport,
    detector_batch,
    predict_files,
    prepare_out_dir,
    write_predictions,
)
from cops_deploy.runtime.regions import Region


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


# ----------------------------------------------------------------------------------------------
# No image takes the run down; results recorded as they are produced; strict JSON


def strict_load(path: Path) -> dict:
    """Parse JSON refusing NaN and infinity (Python's json accepts them by default)."""

    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


class Faulty(FakeBatch):
    """FakeBatch, but an image whose top-left red value is listed misbehaves."""

    def __init__(self, faults: dict[int, str]) -> None:
        super().__init__()
        self.faults = faults

    def __call__(self, rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = super().__call__(rgbs)
        for i, rgb in enumerate(rgbs):
            fault = self.faults.get(int(rgb[0, 0, 0]))
            if fault == "memory":
                raise MemoryError("cannot allocate 22 GB")
            if fault == "backend":
                raise RuntimeError("ORT: Non-zero status code")
            if fault == "nan_score":
                scores[i] = np.nan
            if fault == "inf_map":
                maps[i, 0, 0] = np.inf
        return scores, maps


def _flat_images(folder: Path, values: list[int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in values:
        path = folder / f"img{v:03d}.png"
        Image.fromarray(np.full((12, 10, 3), v, np.uint8)).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("batch_size", [1, 3])
def test_per_image_failures_do_not_end_the_run(tmp_path: Path, batch_size: int) -> None:
    _flat_images(tmp_path / "in", [1, 2, 3, 4, 5, 6])
    faults = {2: "memory", 3: "nan_score", 4: "backend", 6: "inf_map"}
    out = tmp_path / "out"
    report = write_predictions(tmp_path / "in", Faulty(faults), out, batch_size=batch_size)
    assert [Path(r["source"]).name for r in report.results] == ["img001.png", "img005.png"]
    reasons = {Path(f["source"]).name: f["reason"] for f in report.failures}
    assert reasons == {
        "img002.png": "out_of_memory",
        "img003.png": "non_finite_output",
        "img004.png": "backend_error",
        "img006.png": "non_finite_output",
    }
    assert all("img00" in f["error"] for f in report.failures)  # each names its image
    saved = strict_load(out / SCORES_FILE)  # no bare NaN anywhere
    assert saved["results"] == report.results and saved["failures"] == report.failures
    assert sorted(p.name for p in out.iterdir()) == [
        "img001.png.png",
        "img005.png.png",
        JOURNAL_FILE,
        REVIEW_FILE,
        SCORES_FILE,
    ]


def test_results_are_journalled_as_they_are_produced(tmp_path: Path) -> None:
    _flat_images(tmp_path / "in", [1, 2, 3, 4])
    out = tmp_path / "out"
    seen: list[int] = []

    def predictor(rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        lines = (out / JOURNAL_FILE).read_text().splitlines()
        seen.append(len(lines) - 1)  # records before this call (line 1 is the header)
        assert not (out / SCORES_FILE).exists()
        return FakeBatch()(rgbs)

    write_predictions(tmp_path / "in", predictor, out, info={"model": "fake"})
    assert seen == [0, 1, 2, 3]
    lines = [json.loads(line) for line in (out / JOURNAL_FILE).read_text().splitlines()]
    assert lines[0] == {"journal": "cops-predict", "version": 1, "info": {"model": "fake"}}
    assert [next(iter(line)) for line in lines[1:]] == ["result"] * 4


def test_resume_from_a_partial_journal(tmp_path: Path) -> None:
    _flat_images(tmp_path / "in", [1, 2, 3, 4, 5])
    out = tmp_path / "out"
    first = write_predictions(tmp_path / "in", FakeBatch(), out, info={"model": "fake"})
    # as if killed after two results, in the middle of writing the third line
    lines = (out / JOURNAL_FILE).read_text().splitlines(keepends=True)
    (out / JOURNAL_FILE).write_text("".join(lines[:3]) + lines[3][:20])
    (out / SCORES_FILE).unlink()
    with pytest.raises(CopsError, match="--resume"):
        write_predictions(tmp_path / "in", FakeBatch(), out, info={"model": "fake"})
    fake = FakeBatch()
    again = write_predictions(
        tmp_path / "in", fake, out, resume=True, info={"model": "fake"}, batch_size=2
    )
    assert fake.sizes == [2, 1]  # only the three missing images
    assert again.resumed == 2 and again.results == first.results
    assert strict_load(out / SCORES_FILE)["results"] == first.results
    journal = (out / JOURNAL_FILE).read_text()
    assert journal.endswith("\n") and len(journal.splitlines()) == 1 + 5  # torn line cut
    with pytest.raises(CopsError, match="other settings.*model"):
        write_predictions(tmp_path / "in", FakeBatch(), out, resume=True, info={"model": "b"})


def test_resume_refuses_a_damaged_journal(tmp_path: Path) -> None:
    _flat_images(tmp_path / "in", [1, 2])
    out = tmp_path / "out"
    write_predictions(tmp_path / "in", FakeBatch(), out)
    lines = (out / JOURNAL_FILE).read_text().splitlines(keepends=True)
    (out / JOURNAL_FILE).write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    with pytest.raises(CopsError, match="line 2 is not a cops predict journal line"):
        write_predictions(tmp_path / "in", FakeBatch(), out, resume=True)


KILLED_RUN = """
import sys, time
import numpy as np
from cops_deploy.runtime.predict_files import write_predictions

def slow(rgbs):
    time.sleep(0.4)
    return np.array([r.mean() / 255 for r in rgbs], np.float32), np.zeros((len(rgbs), 8, 8), np.float32)

write_predictions(sys.argv[1], slow, sys.argv[2], info={"model": "fake"})
"""


def test_a_killed_run_is_resumed(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    _flat_images(tmp_path / "in", list(range(1, 9)))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUN, str(tmp_path / "in"), str(out)], env=env
    )
    try:
        for _ in range(300):
            journal = out / JOURNAL_FILE
            if journal.is_file() and len(journal.read_text().splitlines()) >= 1 + 3:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the run journalled nothing in 30 s")
        with pytest.raises(CopsError, match="in use by another cops predict run"):
            write_predictions(tmp_path / "in", FakeBatch(), out, resume=True)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not (out / SCORES_FILE).exists()
    done = len((out / JOURNAL_FILE).read_text().splitlines()) - 1
    assert 3 <= done < 8
    fake = FakeBatch()
    report = write_predictions(tmp_path / "in", fake, out, resume=True, info={"model": "fake"})
    assert sum(fake.sizes) == 8 - done and report.resumed == done
    assert [Path(r["source"]).name for r in report.results] == [
        f"img{v:03d}.png" for v in range(1, 9)
    ]
    assert len(strict_load(out / SCORES_FILE)["results"]) == 8


# ----------------------------------------------------------------------------------------------
# The results folder: never an input folder, --force clears only its own files, a lock


def test_out_inside_an_input_folder_is_refused(tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    _flat_images(inputs, [1])
    (tmp_path / "link").symlink_to(inputs, target_is_directory=True)
    for out in (inputs, inputs / "results", tmp_path / "link" / "r", tmp_path / "link"):
        with pytest.raises(CopsError, match="input folder.*resolved") as info:
            write_predictions([inputs], FakeBatch(), out, force=True)
        assert str(inputs.resolve()) in str(info.value)
    with pytest.raises(CopsError, match="is the input file"):
        write_predictions([inputs / "img001.png"], FakeBatch(), inputs / "img001.png")
    assert sorted(p.name for p in inputs.iterdir()) == ["img001.png"]  # nothing written


def test_force_clears_only_the_earlier_results(tmp_path: Path) -> None:
    _flat_images(tmp_path / "in", [1, 2])
    (tmp_path / "in" / "sub").mkdir()
    Image.fromarray(np.zeros((9, 9, 3), np.uint8)).save(tmp_path / "in" / "sub" / "c.png")
    out = tmp_path / "out"
    write_predictions(tmp_path / "in", FakeBatch(), out)
    assert (out / "sub" / "c.png.png").is_file()
    (out / "notes.txt").write_text("mine")
    (tmp_path / "victim.png").write_text("outside")
    saved = json.loads((out / SCORES_FILE).read_text())
    saved["results"].append({"source": "x", "score": 0.1, "visual": "../victim.png"})
    (out / SCORES_FILE).write_text(json.dumps(saved))
    with pytest.raises(CopsError, match="already holds results.*--force"):
        write_predictions(tmp_path / "in" / "img001.png", FakeBatch(), out)
    write_predictions(tmp_path / "in" / "img001.png", FakeBatch(), out, force=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "img001.png.png",
        "notes.txt",
        JOURNAL_FILE,
        REVIEW_FILE,
        SCORES_FILE,
    ]  # img002 and sub/c pictures (and the emptied sub/) removed
    assert (tmp_path / "victim.png").read_text() == "outside"


def test_force_never_overwrites_a_foreign_file(tmp_path: Path) -> None:
    _flat_images(tmp_path / "in", [1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "img001.png.png").write_text("someone else's")
    report = write_predictions(tmp_path / "in", FakeBatch(), out, force=True)
    assert [f["reason"] for f in report.failures] == ["write_error"]
    assert (out / "img001.png.png").read_text() == "someone else's"


def test_a_busy_folder_is_refused(tmp_path: Path) -> None:
    from cops_deploy.runtime.results_folder import ResultsFolder

    _flat_images(tmp_path / "in", [1])
    out = tmp_path / "out"
    with ResultsFolder.open(out):
        with pytest.raises(CopsError, match="in use by another cops predict run"):
            write_predictions(tmp_path / "in", FakeBatch(), out)
    write_predictions(tmp_path / "in", FakeBatch(), out)  # released on close
    assert (out / SCORES_FILE).is_file()


def test_result_names_are_unique_and_stable(tmp_path: Path) -> None:
    root = tmp_path / "in"
    names = ["a.jpg", "a.png", "a_00002.png", "sub/a.png", "sub__a.png", "x.png", "x.png.png/y.png"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(root / name, format="PNG")
    first = write_predictions(root, FakeBatch(), tmp_path / "o1").results
    again = write_predictions(root, FakeBatch(), tmp_path / "o2").results
    visuals = [r["visual"] for r in first]
    assert visuals == [r["visual"] for r in again]
    assert len(set(visuals)) == len(names) == len(list((tmp_path / "o1").rglob("*.png")))
    assert {"a.jpg.png", "a.png.png", "a_00002.png.png", "sub/a.png.png", "sub__a.png.png"} <= set(
        visuals
    )
    # several inputs of one name
    other = tmp_path / "other" / "in"
    other.mkdir(parents=True)
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(other / "a.png")
    report = write_predictions([root / "a.png", root, other], FakeBatch(), tmp_path / "o3")
    by_source = {
        Path(r["source"]).relative_to(tmp_path).as_posix(): r["visual"] for r in report.results
    }
    assert by_source["in/a.png"] == "a.png.png"
    assert by_source["other/in/a.png"] == "in~2/a.png.png"
    assert by_source["in/sub/a.png"] == "in/sub/a.png.png"
    assert len(report.results) == len(names) + 1  # in/a.png once, as named first
    assert report.skipped == []


# ----------------------------------------------------------------------------------------------
# Decisions, regions, the annotated picture and the review page


class DecidingBatch(FakeBatch):
    """FakeBatch that decides ``score >= threshold`` (None: undecided) and, when deciding,
    reports one region, the image's top-left 3x2 pixels."""

    def __init__(self, threshold: float | None) -> None:
        super().__init__()
        self.threshold = threshold

    def __call__(self, rgbs: list[np.ndarray]) -> tuple:
        scores, maps = super().__call__(rgbs)
        region = Region(x=0, y=0, width=3, height=2, area=6, peak=0.9, mean=0.7)
        decisions = [
            Decision(
                None if self.threshold is None else bool(s >= self.threshold),
                self.threshold,
                None if self.threshold is None else (region,),
            )
            for s in scores
        ]
        return scores, maps, decisions


def _uniform_images(folder: Path, values: list[int]) -> list[Path]:
    """Flat blue-ish images (no decision colour in them) of mean value/255, 40x60."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, v in enumerate(values):
        rgb = np.zeros((40, 60, 3), np.uint8)
        rgb[..., 2] = v
        rgb[..., 1] = v // 2
        paths.append(folder / f"img{i + 1:03d}.png")
        Image.fromarray(rgb).save(paths[-1])
    return paths


def _colour_pixels(picture: Path, colour: tuple[int, int, int]) -> int:
    with Image.open(picture) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(rgb - np.array(colour)).max(axis=-1) <= 2).sum())


def test_decisions_and_regions_reach_records_pictures_and_review(tmp_path: Path) -> None:
    paths = _uniform_images(tmp_path / "in", [60, 120, 180])  # increasing scores
    out = tmp_path / "out"
    # the scores as FakeBatch gives them (float32); the threshold is exactly the second one
    scores = [float(np.float32(np.asarray(Image.open(p)).mean() / 255)) for p in paths]
    threshold = scores[1]
    report = write_predictions(
        tmp_path / "in", DecidingBatch(threshold), out, info={"threshold": threshold}
    )
    by_name = {Path(r["source"]).name: r for r in report.results}
    for path, score in zip(paths, scores, strict=True):
        record = by_name[path.name]
        assert record["score"] == score
        assert record["anomalous"] is (score >= threshold)
        assert record["regions"] == [
            {"x": 0, "y": 0, "width": 3, "height": 2, "area": 6, "peak": 0.9, "mean": 0.7}
        ]
    assert by_name["img002.png"]["anomalous"] is True  # at the threshold
    assert strict_load(out / SCORES_FILE)["results"] == report.results
    for record in report.results:
        picture = out / record["visual"]
        want = ANOMALOUS_COLOUR if record["anomalous"] else NORMAL_COLOUR
        other = NORMAL_COLOUR if record["anomalous"] else ANOMALOUS_COLOUR
        assert _colour_pixels(picture, want) > 50, record  # the banner (and the outline)
        assert _colour_pixels(picture, other) == 0, record
    page = (out / REVIEW_FILE).read_text()
    assert report.review == out / REVIEW_FILE
    n_bad = sum(r["anomalous"] for r in report.results)
    assert f"NOT OK ({n_bad})" in page and f"OK ({3 - n_bad})" in page
    assert "undecided (0)" in page and all(str(p) in page for p in paths)


def test_without_a_threshold_nothing_is_decided(tmp_path: Path) -> None:
    _uniform_images(tmp_path / "in", [200, 100])
    out = tmp_path / "out"
    report = write_predictions(tmp_path / "in", FakeBatch(), out, info={"model": "fake"})
    assert [(r["anomalous"], r["regions"]) for r in report.results] == [(None, None)] * 2
    for record in report.results:  # the grey NO THRESHOLD banner, no decision colour
        picture = out / record["visual"]
        assert _colour_pixels(picture, UNDECIDED_COLOUR) > 50
        assert (
            _colour_pixels(picture, ANOMALOUS_COLOUR) == _colour_pixels(picture, NORMAL_COLOUR) == 0
        )
    assert "undecided (2)" in (out / REVIEW_FILE).read_text()
    again = write_predictions(tmp_path / "in", FakeBatch(), tmp_path / "o2", review=False)
    assert again.review is None and not (tmp_path / "o2" / REVIEW_FILE).exists()


def test_resume_keeps_the_decisions_and_rebuilds_the_review(tmp_path: Path) -> None:
    _flat_images(tmp_path / "in", [1, 2, 3, 4, 5])
    out, info = tmp_path / "out", {"threshold": 0.5}
    first = write_predictions(tmp_path / "in", DecidingBatch(0.5), out, info=info)
    lines = (out / JOURNAL_FILE).read_text().splitlines(keepends=True)
    (out / JOURNAL_FILE).write_text("".join(lines[:3]))  # killed after two results
    (out / SCORES_FILE).unlink()
    (out / REVIEW_FILE).unlink()
    again = write_predictions(tmp_path / "in", DecidingBatch(0.5), out, resume=True, info=info)
    assert again.resumed == 2 and again.results == first.results
    assert all(r["regions"] and r["anomalous"] is not None for r in again.results)
    page = (out / REVIEW_FILE).read_text()
    assert all(r["source"] in page for r in first.results)  # all five, not the three new


def test_predict_files_decides_as_the_detector(
    tiny_bundle: Path, tmp_path: Path, make_bundle
) -> None:
    """A calibrated bundle: records and info equal Detector.predict and its calibration; the
    min_area given replaces the calibration's (one that drops regions the calibration keeps)."""
    from cops_deploy.runtime.calibration import calibrate, write_calibration

    paths = _uniform_images(tmp_path / "normal", [30, 90, 150, 210])
    (tmp_path / "noisy").mkdir()
    for i, rgb in enumerate(cops_tiny_bundle.rng_images(2, seed=5)):
        paths.append(tmp_path / "noisy" / f"{i}.png")
        Image.fromarray(rgb).save(paths[-1])
    bundle = make_bundle("calibrated")
    with Detector.open(bundle) as d:
        write_calibration(bundle, calibrate(d, tmp_path / "normal", fpr=0.5, min_area=1))
    with Detector.open(bundle) as detector:
        every = detector.predict(paths, batch_size=1)  # the calibration's min_area, 1
        areas = sorted({r.area for p in every for r in p.regions})
        assert areas, "no defect regions: the test needs some"
        min_area = areas[0] + 1  # drops the smallest regions
        report = predict_files(detector, paths, tmp_path / "out", batch_size=1, min_area=min_area)
        refs = detector.predict(paths, batch_size=1, min_area=min_area)
        cal = detector.calibration
    assert sum(map(len, (p.regions for p in refs))) < sum(map(len, (p.regions for p in every)))
    saved = strict_load(tmp_path / "out" / SCORES_FILE)
    assert saved["threshold"] == cal.image_threshold
    assert saved["pixel_threshold"] == cal.pixel_threshold and saved["min_area"] == min_area
    assert saved["calibration"] == cal.to_dict()
    for got, ref in zip(report.results, refs, strict=True):
        assert got["score"] == ref.score and got["anomalous"] is ref.is_anomalous
        assert got["regions"] == [r.to_dict() for r in ref.regions]
    with pytest.raises(ConfigError, match="min_area"):
        with Detector.open(bundle) as detector:
            predict_files(detector, paths, tmp_path / "o2", min_area=0)
