"""``cops calibrate``: calibrates a cops-tiny bundle in place, prints the thresholds, and refuses
bad input with one line and exit status 2."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import cops_tiny_bundle  # noqa: E402

from cops_deploy.cli.main import main as cops_main  # noqa: E402
from cops_deploy.runtime.bundle import open_bundle  # noqa: E402
from cops_deploy.runtime.calibration import image_set_record, load_calibration  # noqa: E402


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cops_tiny_bundle.export_tiny_graphs(tmp_path_factory.getbasetemp() / "cops_tiny_graphs")


@pytest.fixture
def bundle(graphs: Path, tmp_path: Path) -> Path:
    return cops_tiny_bundle.write_tiny_bundle(tmp_path / "bundle", graphs, torch_weights=False)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("calibrate_cli")
    out = {}
    for name, count, seed in (("normal", 10, 1), ("anomalous", 3, 2)):
        out[name] = root / name
        out[name].mkdir()
        for i, rgb in enumerate(cops_tiny_bundle.rng_images(count, seed)):
            Image.fromarray(rgb).save(out[name] / f"{i:02d}.png")
    return out


def test_calibrate_writes_the_record_and_prints_the_thresholds(
    bundle: Path, folders: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["calibrate", str(bundle), "--normal", str(folders["normal"]), "--fpr", "0.1"]
    argv += ["--anomalous", str(folders["anomalous"]), "--min-area", "4"]
    assert cops_main([*argv, "--backend", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    record = load_calibration(open_bundle(bundle))
    assert record is not None
    assert record.min_area == 4 and record.image.target_fpr == 0.1
    assert record.images["normal"] == image_set_record(folders["normal"])
    assert record.images["anomalous"].count == 3 and "tpr" in record.image.achieved
    assert f"image threshold {record.image_threshold:.6g}" in out
    assert f"pixel threshold {record.pixel_threshold:.6g}" in out
    assert "10 normal, 3 anomalous images" in out


def test_calibrate_f1(bundle: Path, folders: dict[str, Path]) -> None:
    argv = ["calibrate", str(bundle), "--normal", str(folders["normal"]), "--target", "f1"]
    assert cops_main([*argv, "--anomalous", str(folders["anomalous"]), "--pixel-fpr", "0.2"]) == 0
    record = load_calibration(open_bundle(bundle))
    assert record is not None and record.image.method == "f1"
    assert record.pixel.method == "fpr" and record.pixel.target_fpr == 0.2


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--fpr", "0.01"], "got 10, need at least 100"),
        (["--target", "f1"], "target 'f1' needs anomalous images"),
        (["--target", "f1", "--fpr", "0.1"], "--fpr 0.1 is the target of --target fpr"),
        (["--fpr", "2"], "strictly between 0 and 1"),
        (["--fpr", "0.1", "--min-area", "0"], "invalid min_area 0"),
    ],
    ids=["too-few", "f1-no-anomalous", "f1-with-fpr", "bad-fpr", "bad-min-area"],
)
def test_bad_options_exit_2_with_one_line(
    bundle: Path,
    folders: dict[str, Path],
    extra: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    manifest = (bundle / "manifest.json").read_bytes()
    argv = ["calibrate", str(bundle), "--normal", str(folders["normal"]), *extra]
    assert cops_main([*argv, "--backend", "onnxruntime"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cops calibrate: error:") and message in err, err
    assert (bundle / "manifest.json").read_bytes() == manifest  # nothing written


def test_empty_folder_non_images_and_broken_bundle_exit_2(
    bundle: Path, folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty").mkdir()
    argv = ["calibrate", str(bundle), "--fpr", "0.1", "--backend", "onnxruntime"]
    assert cops_main([*argv, "--normal", str(tmp_path / "empty")]) == 2
    assert "holds no image" in capsys.readouterr().err
    mixed = tmp_path / "mixed"
    shutil.copytree(folders["normal"], mixed)
    (mixed / "labels.csv").write_text("a,b\n")
    assert cops_main([*argv, "--normal", str(mixed)]) == 2
    assert "'labels.csv'" in capsys.readouterr().err
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"] = "broken"
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert cops_main([*argv, "--normal", str(folders["normal"])]) == 2
    assert "key 'files'" in capsys.readouterr().err
