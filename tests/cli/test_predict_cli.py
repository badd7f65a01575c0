"""``cops predict`` with PyTorch weights: every kind of input, failures reported, no overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cops_deploy.cli.main import main

BASE = ["--model", "cops-tiny", "--random-weights"]


def _write_inputs(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (120, 90, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "grey.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]])).save(folder / "rgba.png")
    Image.fromarray(rgb).convert("P").save(folder / "palette.png")
    Image.fromarray((rng.integers(0, 65535, (64, 80))).astype(np.uint16)).save(
        folder / "deep16.png"
    )
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rgb[:7, :300]).save(folder / "tiny_wide.png")
    return rgb


def _read_scores(out):
    return json.loads((out / "scores.json").read_text())


def test_all_supported_inputs_predicted(tmp_path, capsys):
    rgb = _write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "in"), "--out", str(out), *BASE]) == 0
    scores = _read_scores(out)
    names = sorted(r["source"].rsplit("/", 1)[-1] for r in scores["results"])
    assert names == sorted(
        [
            "rgb.png",
            "grey.png",
            "rgba.png",
            "palette.png",
            "deep16.png",
            "rotated.jpg",
            "tiny_wide.png",
        ]
    )
    assert scores["failures"] == []
    for r in scores["results"]:
        assert 0.0 <= r["score"] <= 1.0
        assert (out / r["visual"]).is_file()
    rotated = next(r for r in scores["results"] if r["source"].endswith("rotated.jpg"))
    assert (rotated["height"], rotated["width"]) == (rgb.shape[1], rgb.shape[0])
    # from weights: no calibration, so nothing is decided, and the review page is written
    assert all(r["anomalous"] is r["regions"] is None for r in scores["results"])
    assert scores["threshold"] is scores["calibration"] is None
    page = (out / "review.html").read_text()
    assert "undecided (7)" in page and "cops-tiny" in page and "torch" in page
    assert "7 undecided" in capsys.readouterr().out

    with Image.open(out / rotated["visual"]) as im:
        assert im.format == "PNG"


def test_min_area_needs_a_calibrated_bundle(tmp_path, capsys):
    _write_inputs(tmp_path / "in")
    argv = ["predict", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *BASE]
    assert main([*argv, "--min-area", "5"]) == 2
    assert "--min-area 5" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_bad_files_reported_by_name_and_others_processed(tmp_path, capsys):
    folder = tmp_path / "in"
    _write_inputs(folder)
    good = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.png").write_text("this is not an image")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    status = main(["predict", str(folder), "--out", str(out), *BASE, "--batch-size", "3"])
    assert status == 1
    scores = _read_scores(out)
    failed = sorted(f["source"].rsplit("/", 1)[-1] for f in scores["failures"])
    assert failed == ["empty.jpg", "notes.png", "truncated.png"]
    assert len(scores["results"]) == 7
    err = capsys.readouterr().err
    for name in failed:
        assert name in err


def test_explicit_non_image_file_is_reported(tmp_path, capsys):
    doc = tmp_path / "report.txt"
    doc.write_text("hello")
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(img)
    out = tmp_path / "out"
    assert main(["predict", str(doc), str(img), "--out", str(out), *BASE]) == 1
    assert "report.txt" in capsys.readouterr().err
    assert len(_read_scores(out)["results"]) == 1


def test_missing_input_path_fails_with_its_name(tmp_path, capsys):
    status = main(["predict", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), *BASE])
    assert status == 2
    assert "nowhere" in capsys.readouterr().err


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(img)
    out = tmp_path / "out"
    assert main(["predict", str(img), "--out", str(out), *BASE]) == 0
    before = (out / "scores.json").read_bytes()
    assert main(["predict", str(img), "--out", str(out), *BASE]) == 2
    assert "--force" in capsys.readouterr().err
    assert (out / "scores.json").read_bytes() == before
    assert main(["predict", str(img), "--out", str(out), *BASE, "--force"]) == 0


def test_refuses_to_run_without_weights(tmp_path, capsys):
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(img)
    assert main(["predict", str(img), "--out", str(tmp_path / "o"), "--model", "cops-tiny"]) == 2
    assert "--random-weights" in capsys.readouterr().err


def test_reference_checkpoint_needs_clip_weights(tmp_path, capsys, golden):
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((30, 30, 3), np.uint8)).save(img)
    args = [
        "predict",
        str(img),
        "--out",
        str(tmp_path / "o"),
        "--model",
        "cops-tiny",
        "--weights",
        str(golden / "cops_tiny_reference_format.pth"),
    ]
    assert main(args) == 2
    assert "--clip-weights" in capsys.readouterr().err
    args += ["--clip-weights", str(golden / "clip_tiny_openai_layout.pt")]
    assert main(args) == 0


@pytest.mark.parametrize("batch", ["0", "-2"])
def test_bad_batch_size(tmp_path, capsys, batch):
    assert (
        main(["predict", str(tmp_path), "--out", str(tmp_path / "o"), *BASE, "--batch-size", batch])
        == 2
    )


def test_links_loops_and_gif_never_abort_the_run(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).save(folder / "ok.png")
    Image.fromarray(np.zeros((30, 20, 3), np.uint8)).convert("P").save(folder / "anim.gif")
    (folder / "notes.txt").write_text("x")
    (tmp_path / "gone.png").symlink_to("nowhere.png")
    (tmp_path / "loop.png").symlink_to("loop.png")
    out = tmp_path / "out"
    argv = ["predict", str(folder), str(tmp_path / "gone.png"), str(tmp_path / "loop.png")]
    assert main([*argv, "--out", str(out), *BASE]) == 1
    scores = _read_scores(out)
    assert sorted(r["source"].rsplit("/", 1)[-1] for r in scores["results"]) == [
        "anim.gif",
        "ok.png",
    ]
    assert {f["source"].rsplit("/", 1)[-1]: f["reason"] for f in scores["failures"]} == {
        "gone.png": "dangling_symlink",
        "loop.png": "symlink_loop",
    }
    assert [(s["source"].rsplit("/", 1)[-1], s["reason"]) for s in scores["skipped"]] == [
        ("notes.txt", "unsupported_extension")
    ]
    err = capsys.readouterr().err
    assert "notes.txt" in err and "dangling symbolic link" in err and "loop" in err


def test_resume_max_pixels_and_out_inside_input(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((30, 40, 3), i * 50, np.uint8)).save(folder / f"p{i}.png")
    out = tmp_path / "out"
    assert main(["predict", str(folder), "--out", str(folder / "res"), *BASE]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert main(["predict", str(folder), "--out", str(out), *BASE, "--max-pixels", "1199"]) == 1
    assert {f["reason"] for f in _read_scores(out)["failures"]} == {"too_many_pixels"}
    assert main(["predict", str(folder), "--out", str(out), *BASE, "--max-pixels", "0"]) == 2
    assert "--max-pixels" in capsys.readouterr().err
    (out / "mine.txt").write_text("not a result")
    assert main(["predict", str(folder), "--out", str(out), *BASE, "--force"]) == 0
    # scores.json, results.jsonl and review.html of the earlier run (its images all failed)
    assert "--force: removed 3 file(s) of an earlier run" in capsys.readouterr().err
    assert (out / "mine.txt").read_text() == "not a result"
    full = _read_scores(out)
    journal = (out / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text("".join(journal[:2]))  # as if killed after one image
    (out / "scores.json").unlink()
    capsys.readouterr()
    assert main(["predict", str(folder), "--out", str(out), *BASE, "--resume"]) == 0
    assert "1 of them from the earlier run" in capsys.readouterr().out
    assert _read_scores(out)["results"] == full["results"]
