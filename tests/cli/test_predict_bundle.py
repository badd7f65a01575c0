"""``cops predict --bundle``: scores and PNGs written, bad files named and skipped, no overwrite;
every tampered bundle of tests/runtime/tampered_bundles.py refused (exit 2, one message, no
traceback), each run under a timeout."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "runtime"))
import cops_tiny_bundle  # noqa: E402
import tampered_bundles as tb  # noqa: E402

from cops_deploy.cli.predict_bundle import predict_with_bundle  # noqa: E402
from cops_deploy.errors import BundleError, ConfigError, CopsError, ImageReadError  # noqa: E402
from cops_deploy.runtime.detector import Detector  # noqa: E402


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    graphs = cops_tiny_bundle.export_tiny_graphs(
        tmp_path_factory.getbasetemp() / "cops_tiny_graphs"
    )
    root = tmp_path_factory.mktemp("cli") / "bundle"
    return cops_tiny_bundle.write_tiny_bundle(root, graphs, torch_weights=False, threshold=0.5)


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    rgbs = cops_tiny_bundle.rng_images(3, seed=1)
    Image.fromarray(rgbs[0]).save(folder / "a.png")
    Image.fromarray(rgbs[1][..., 0]).save(folder / "b.jpg")
    Image.fromarray(rgbs[2]).save(folder / "sub" / "a.png")  # same stem as a.png
    return folder


def args(inputs: list[Path], bundle: Path, out: Path, **extra: object) -> argparse.Namespace:
    values = {"force": False, "backend": "auto", "batch_size": None, **extra}
    return argparse.Namespace(inputs=[str(p) for p in inputs], bundle=bundle, out=out, **values)


def test_scores_and_pngs(inputs: Path, bundle_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert predict_with_bundle(args([inputs], bundle_dir, out)) == 0
    report = json.loads((out / "scores.json").read_text())
    assert report["backend"] == "onnxruntime" and report["threshold"] == 0.5
    assert report["failures"] == []
    sources = [r["source"] for r in report["results"]]
    assert sources == [str(inputs / "a.png"), str(inputs / "b.jpg"), str(inputs / "sub" / "a.png")]
    pngs = [r["visual"] for r in report["results"]]
    assert len(set(pngs)) == 3  # two files named a.png do not collide
    for png in pngs:
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.height > 98
    with Detector.open(bundle_dir) as d:
        expected = [p.score for p in d.predict(sources)]
    np.testing.assert_allclose([r["score"] for r in report["results"]], expected, atol=1e-6)
    assert "backend onnxruntime" in capsys.readouterr().err


def test_unreadable_files_are_named_and_skipped(
    inputs: Path, bundle_dir: Path, tmp_path: Path, capsys
) -> None:
    (inputs / "broken.png").write_bytes((inputs / "a.png").read_bytes()[:100])
    (inputs / "empty.jpg").write_bytes(b"")
    out = tmp_path / "out"
    assert predict_with_bundle(args([inputs], bundle_dir, out, batch_size=2)) == 1
    report = json.loads((out / "scores.json").read_text())
    failed = sorted(Path(f["source"]).name for f in report["failures"])
    assert failed == ["broken.png", "empty.jpg"]
    assert len(report["results"]) == 3
    err = capsys.readouterr().err
    assert "broken.png" in err and "empty.jpg" in err


def test_non_empty_out_needs_force(inputs: Path, bundle_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(CopsError, match="already holds results.*--force"):
        predict_with_bundle(args([inputs / "a.png"], bundle_dir, out))
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert predict_with_bundle(args([inputs / "a.png"], bundle_dir, out, force=True)) == 0
    assert (out / "scores.json").is_file()


def test_missing_input_fails_before_the_bundle_loads(bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="does not exist"):
        predict_with_bundle(args([tmp_path / "nope"], tmp_path / "no-bundle", tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_bad_bundle_and_batch_size(inputs: Path, bundle_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist or is not a directory"):
        predict_with_bundle(args([inputs], tmp_path / "no-bundle", tmp_path / "o1"))
    with pytest.raises(ConfigError, match="--batch-size 99 exceeds"):
        predict_with_bundle(args([inputs], bundle_dir, tmp_path / "o2", batch_size=99))


def test_through_the_cops_command(inputs: Path, bundle_dir: Path, tmp_path: Path) -> None:
    main = pytest.importorskip("cops_deploy.cli.main").main
    out = tmp_path / "out"
    argv = ["predict", str(inputs), "--bundle", str(bundle_dir), "--out", str(out)]
    assert main([*argv, "--backend", "onnxruntime"]) == 0
    assert len(json.loads((out / "scores.json").read_text())["results"]) == 3
    assert main(argv) == 2  # --out now holds results and --force is missing


def test_openvino_bf16_through_the_cops_command(
    inputs: Path, bundle_dir: Path, tmp_path: Path
) -> None:
    """--backend openvino --precision bf16 (where OpenVINO has bf16 on this CPU); --precision
    bf16 is refused on another backend and without a bundle."""
    main = pytest.importorskip("cops_deploy.cli.main").main
    ov = pytest.importorskip("openvino")
    argv = ["predict", str(inputs), "--bundle", str(bundle_dir)]
    assert main([*argv, "--out", str(tmp_path / "o1"), "--precision", "bf16"]) == 2  # auto
    no_bundle = ["predict", str(inputs), "--model", "cops-tiny", "--random-weights"]
    assert main([*no_bundle, "--out", str(tmp_path / "o2"), "--precision", "bf16"]) == 2
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bfloat16 support in OpenVINO")
    out = tmp_path / "o3"
    assert main([*argv, "--out", str(out), "--backend", "openvino", "--precision", "bf16"]) == 0
    report = json.loads((out / "scores.json").read_text())
    assert (report["backend"], report["precision"]) == ("openvino", "bf16")
    assert len(report["results"]) == 3


# ----------------------------------------------------------------------------------------------
# The tampered-bundle set (tests/runtime/tampered_bundles.py) through the `cops` command


@pytest.fixture(scope="module")
def tamper_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    graphs = cops_tiny_bundle.export_tiny_graphs(
        tmp_path_factory.getbasetemp() / "cops_tiny_graphs"
    )
    return tb.make_base(graphs, tmp_path_factory.mktemp("tamper") / "base")


@pytest.fixture(scope="module")
def one_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tamper_in") / "a.png"
    Image.fromarray(cops_tiny_bundle.rng_images(1, seed=2)[0]).save(path)
    return path


def run_cops(*argv: str) -> subprocess.CompletedProcess[str]:
    """``cops ARGV`` in a fresh process (this checkout first on the path), under a timeout."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "cops_deploy.cli.main", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=tb.TIMEOUT)


def test_the_untampered_base_runs(tamper_base: Path, one_image: Path, tmp_path: Path) -> None:
    done = run_cops(
        "predict", str(one_image), "--bundle", str(tamper_base), "--out", str(tmp_path / "o")
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "o" / "scores.json").is_file()


@pytest.mark.parametrize("case", tb.CASES, ids=tb.CASE_IDS)
def test_tampered_bundle_is_refused_by_cops_predict(
    tamper_base: Path, one_image: Path, tmp_path: Path, case: tb.Case
) -> None:
    root = tb.tampered(tamper_base, tmp_path / "bundle", case)
    out = tmp_path / "out"
    done = run_cops("predict", str(one_image), "--bundle", str(root), "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert re.search(r"^cops predict: error: ", done.stderr, re.MULTILINE), done.stderr
    assert re.search(case.message, done.stderr), done.stderr
    assert not (out / "scores.json").exists()


# ----------------------------------------------------------------------------------------------
# Decisions, regions and the review page of a calibrated bundle


@pytest.fixture
def fresh_bundle(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """An uncalibrated cops-tiny bundle of this test's own (calibrating changes it)."""
    graphs = cops_tiny_bundle.export_tiny_graphs(
        tmp_path_factory.getbasetemp() / "cops_tiny_graphs"
    )
    return cops_tiny_bundle.write_tiny_bundle(tmp_path / "bundle", graphs, torch_weights=False)


def test_the_decision_boundary_through_cops_predict(
    inputs: Path, fresh_bundle: Path, tmp_path: Path, capsys
) -> None:
    """A calibration whose threshold is one image's exact score: that image is anomalous
    (``score >= threshold``), in scores.json, the picture and the review page."""
    import dataclasses

    from cops_deploy.cli.main import main
    from cops_deploy.imaging.annotate import ANOMALOUS_COLOUR
    from cops_deploy.runtime.calibration import calibrate, write_calibration

    out = tmp_path / "out"
    argv = ["predict", str(inputs), "--bundle", str(fresh_bundle), "--backend", "onnxruntime"]
    assert main([*argv, "--out", str(out)]) == 0
    before = json.loads((out / "scores.json").read_text())
    assert before["threshold"] is before["pixel_threshold"] is before["calibration"] is None
    assert all(r["anomalous"] is r["regions"] is None for r in before["results"])
    assert "undecided (3)" in (out / "review.html").read_text()
    assert "3 undecided" in capsys.readouterr().out
    # --min-area needs a calibration
    with pytest.raises(ConfigError, match="--min-area 2: bundle .* has no calibration"):
        predict_with_bundle(args([inputs], fresh_bundle, tmp_path / "o0", min_area=2))

    ranked = sorted(before["results"], key=lambda r: r["score"])
    middle = ranked[1]
    with Detector.open(fresh_bundle, backend="onnxruntime") as detector:
        record = calibrate(detector, inputs, fpr=0.5, min_area=1)
    image = dataclasses.replace(record.image, threshold=middle["score"])
    write_calibration(fresh_bundle, dataclasses.replace(record, image=image))

    assert main([*argv, "--out", str(out), "--force", "--min-area", "2"]) == 0
    saved = json.loads((out / "scores.json").read_text())
    assert "2 anomalous, 1 OK" in capsys.readouterr().out
    by_source = {r["source"]: r for r in saved["results"]}
    assert by_source[middle["source"]]["score"] == middle["score"]  # the same run, exactly
    assert by_source[middle["source"]]["anomalous"] is True  # at the threshold: anomalous
    assert by_source[ranked[0]["source"]]["anomalous"] is False
    assert by_source[ranked[2]["source"]]["anomalous"] is True
    assert saved["threshold"] == middle["score"]
    assert saved["pixel_threshold"] == record.pixel_threshold and saved["min_area"] == 2
    cal = saved["calibration"]
    assert (cal["image"]["method"], cal["image"]["target_fpr"]) == ("fpr", 0.5)
    assert cal["created"] == record.created
    with Detector.open(fresh_bundle, backend="onnxruntime") as detector:
        refs = detector.predict(list(by_source), min_area=2)
    for ref in refs:
        assert by_source[ref.source]["regions"] == [r.to_dict() for r in ref.regions]
        assert all(r.area >= 2 for r in ref.regions)
    assert any(by_source[ref.source]["regions"] for ref in refs)
    picture = out / by_source[middle["source"]]["visual"]
    with Image.open(picture) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert (np.abs(rgb - np.array(ANOMALOUS_COLOUR)).max(axis=-1) <= 2).sum() > 20
    page = (out / "review.html").read_text()
    assert "NOT OK (2)" in page and "OK (1)" in page and "undecided (0)" in page
    assert "fpr 0.5" in page and str(fresh_bundle) in page


def test_no_review_and_min_area_refusals(inputs: Path, bundle_dir: Path, tmp_path: Path) -> None:
    from cops_deploy.cli.main import main

    out = tmp_path / "out"
    argv = ["predict", str(inputs), "--bundle", str(bundle_dir), "--out", str(out)]
    assert main([*argv, "--no-review", "--backend", "onnxruntime"]) == 0
    assert (out / "scores.json").is_file() and not (out / "review.html").exists()
    with pytest.raises(ConfigError, match="invalid min_area 0"):
        predict_with_bundle(args([inputs], bundle_dir, tmp_path / "o1", min_area=0))
    assert not (tmp_path / "o1").exists()  # refused before the folder is made
