"""Calibration (cops_deploy.runtime.calibration): the threshold rules and their boundaries, the
record stored with a cops-tiny bundle (digest, verification, atomicity, graphs untouched), the
decision, mask and regions the Detector then returns, and each refusal."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from cops_tiny_bundle import rng_images
from PIL import Image

from cops_deploy.errors import BundleError, ConfigError, DatasetError, ImageReadError
from cops_deploy.runtime import calibration as calibration_module
from cops_deploy.runtime.bundle import open_bundle, sha256_file
from cops_deploy.runtime.calibration import (
    calibrate,
    f1_threshold,
    fpr_threshold,
    image_set_record,
    load_calibration,
    required_normal_images,
    write_calibration,
)
from cops_deploy.runtime.detector import Detector, Prediction
from cops_deploy.runtime.manifest import ROLE_CALIBRATION
from cops_deploy.runtime.regions import defect_regions

# ----------------------------------------------------------------------------------------------
# The rules


def test_fpr_threshold_is_the_smallest_normal_score_with_at_most_floor_fpr_n_at_or_above() -> None:
    scores = np.arange(20, dtype=np.float64) / 20  # 0.0 .. 0.95
    threshold, achieved = fpr_threshold(scores, 0.1)  # floor(0.1 * 20) = 2 allowed
    assert threshold == 0.9  # 0.9 and 0.95 are >= it: 2; the next lower (0.85) would give 3
    assert achieved == {"fpr": 0.1, "false_positives": 2, "count": 20}
    assert fpr_threshold(scores, 0.099)[0] == 0.95  # floor(1.98) = 1


def test_fpr_threshold_with_ties_at_the_boundary_moves_above_them() -> None:
    threshold, achieved = fpr_threshold(np.array([0.1, 0.2, 0.7, 0.7, 0.9]), 0.2)  # k = 1
    assert threshold == 0.9 and achieved["false_positives"] == 1
    threshold, achieved = fpr_threshold(np.array([0.1, 0.2, 0.3, 0.7, 0.7]), 0.2)
    assert threshold == np.nextafter(0.7, np.inf) and achieved["false_positives"] == 0


@pytest.mark.parametrize(("fpr", "need"), [(0.01, 100), (0.1, 10), (0.29, 4), (0.3, 4), (0.5, 2)])
def test_required_normal_images(fpr: float, need: int) -> None:
    assert required_normal_images(fpr) == need
    fpr_threshold(np.zeros(need), fpr)
    with pytest.raises(DatasetError, match=f"got {need - 1}, need at least {need}"):
        fpr_threshold(np.zeros(need - 1), fpr)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.01", True])
def test_an_invalid_fpr_is_refused(bad: object) -> None:
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        fpr_threshold(np.zeros(200), bad)  # type: ignore[arg-type]


def test_f1_threshold_is_the_largest_observed_value_of_the_best_f1() -> None:
    values = np.array([0.1, 0.2, 0.3, 0.6, 0.8, 0.9])
    labels = np.array([0, 0, 0, 1, 1, 1], dtype=bool)
    threshold, achieved = f1_threshold(values, labels)
    assert threshold == 0.6 and achieved["f1"] == 1.0 and achieved["fpr"] == 0.0
    # F1 ties between 0.5 and 0.4 (both: tp 1, fp 1 -> 2/4, and tp 2, fp 2 -> 4/6? no): check
    # the largest value wins when two thresholds give the same F1.
    threshold, _ = f1_threshold(np.array([0.9, 0.5, 0.4]), np.array([1, 0, 1], dtype=bool))
    assert threshold == 0.4  # F1: 0.9 -> 2/3, 0.5 -> 2/4, 0.4 -> 4/5
    threshold, _ = f1_threshold(np.array([0.9, 0.8, 0.1]), np.array([1, 0, 0], dtype=bool))
    assert threshold == 0.9


def test_f1_threshold_needs_both_labels() -> None:
    with pytest.raises(DatasetError, match="0 anomalous"):
        f1_threshold(np.array([0.1, 0.2]), np.array([0, 0], dtype=bool))


def test_a_score_exactly_at_the_threshold_is_anomalous() -> None:
    amap = np.zeros((2, 2), dtype=np.float32)
    at = Prediction(0.5, amap, None, None, (2, 2), threshold=0.5)
    below = Prediction(float(np.nextafter(0.5, 0)), amap, None, None, (2, 2), threshold=0.5)
    assert at.is_anomalous is True and below.is_anomalous is False
    assert Prediction(0.5, amap, None, None, (2, 2)).is_anomalous is None  # no threshold


def test_the_image_set_digest_is_the_sha256_of_the_sorted_path_and_hash_lines(
    tmp_path: Path,
) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.png", "sub/c.png"):
        Image.new("RGB", (4, 4), (len(name), 0, 0)).save(tmp_path / name)
    files = [tmp_path / "sub" / "c.png", tmp_path / "b.png", tmp_path / "a.png"]
    lines = [f"{n}\t{sha256_file(tmp_path / n)}\n" for n in ("a.png", "b.png", "sub/c.png")]
    want = hashlib.sha256("".join(lines).encode()).hexdigest()
    assert image_set_record(tmp_path, files).sha256 == want  # any order given: sorted
    assert image_set_record(tmp_path) == image_set_record(tmp_path, files[::-1])
    assert image_set_record(tmp_path).count == 3


# ----------------------------------------------------------------------------------------------
# Calibrating a bundle


def _folder(root: Path, count: int, seed: int, size: tuple[int, int] | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i, rgb in enumerate(rng_images(count, seed)):
        if size is not None:
            rgb = np.asarray(Image.fromarray(rgb).resize(size[::-1]))
        Image.fromarray(rgb).save(root / f"img_{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def normal_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("calib") / "normal", 20, seed=11)


def _calibrate(bundle: Path, normal: Path, **options: object) -> Path:
    with Detector.open(bundle, backend="onnxruntime") as detector:
        record = calibrate(detector, normal, **options)  # type: ignore[arg-type]
    return write_calibration(bundle, record)


def _graph_state(bundle: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (sha256_file(p), p.stat().st_mtime_ns)
        for p in bundle.iterdir()
        if p.is_file() and not p.name.startswith(("manifest", "calibration"))
    }


def test_calibrating_stores_a_verifiable_record_and_leaves_the_graphs_untouched(
    make_bundle: Callable[..., Path], normal_dir: Path
) -> None:
    bundle = make_bundle(torch_weights=False)
    before = _graph_state(bundle)
    record_path = _calibrate(bundle, normal_dir, fpr=0.1, min_area=3)
    assert _graph_state(bundle) == before  # hashes and mtimes
    opened = open_bundle(bundle)  # verifies every listed file, the record included
    (entry,) = opened.manifest.with_role(ROLE_CALIBRATION)
    assert bundle / entry.path == record_path
    assert entry.sha256 == sha256_file(record_path)
    record = load_calibration(opened)
    assert record is not None and opened.manifest.threshold == record.image_threshold
    assert (record.image.method, record.image.target_fpr, record.min_area) == ("fpr", 0.1, 3)
    assert record.pixel.method == "fpr" and record.pixel.target_fpr == 0.1
    assert record.backend == "onnxruntime" and record.precision == "fp32" and record.created
    # The digest is recomputable from the folder, by the rule the schema states.
    assert record.images["normal"] == image_set_record(normal_dir)
    lines = sorted(f"{p.name}\t{sha256_file(p)}\n" for p in normal_dir.iterdir())
    assert record.images["normal"].sha256 == hashlib.sha256("".join(lines).encode()).hexdigest()
    assert record.images["normal"].count == 20
    # The decisions on the calibration images: exactly floor(0.1 * 20) = 2 flagged, the lowest
    # flagged one scoring exactly the threshold (>=).
    with Detector.open(bundle, backend="onnxruntime") as detector:
        preds = detector.predict(sorted(normal_dir.iterdir()))
    flagged = [p for p in preds if p.is_anomalous]
    assert len(flagged) == 2
    assert min(p.score for p in flagged) == record.image_threshold


def test_the_detector_returns_mask_and_regions_at_the_original_size(
    make_bundle: Callable[..., Path], normal_dir: Path
) -> None:
    bundle = make_bundle(torch_weights=False)
    _calibrate(bundle, normal_dir, fpr=0.5, min_area=1)
    image = rng_images(4, seed=5)[3]  # 50 x 140, not square
    with Detector.open(bundle, backend="onnxruntime") as detector:
        (pred,) = detector.predict(image)
        (bigger,) = detector.predict(image, min_area=10**6)
        (raw,) = detector.predict(image, regions=False)
        with pytest.raises(ConfigError, match="invalid min_area 0"):
            detector.predict(image, min_area=0)
        cal = detector.calibration
    assert cal is not None and pred.pixel_threshold == cal.pixel_threshold
    assert pred.anomaly_map_original is not None and pred.mask is not None
    assert pred.mask.shape == pred.original_hw == (50, 140)
    mask, regions = defect_regions(pred.anomaly_map_original, cal.pixel_threshold, cal.min_area)
    np.testing.assert_array_equal(pred.mask, mask)
    assert pred.regions == tuple(regions) and regions  # half the normal pixels are above
    for r in regions:
        assert 0 <= r.x and r.x + r.width <= 140 and 0 <= r.y and r.y + r.height <= 50
    assert bigger.regions == () and not bigger.mask.any()  # type: ignore[union-attr]
    assert raw.mask is None and raw.regions is None and raw.anomaly_map_original is None


def test_an_uncalibrated_bundle_does_not_decide(tiny_bundle: Path) -> None:
    with Detector.open(tiny_bundle, backend="onnxruntime") as detector:
        (pred,) = detector.predict(rng_images(1)[0])
    assert detector.calibration is None
    assert pred.is_anomalous is None and pred.mask is None and pred.regions is None


def test_recalibrating_replaces_the_record_and_keeps_the_graphs(
    make_bundle: Callable[..., Path], normal_dir: Path
) -> None:
    bundle = make_bundle(torch_weights=False)
    first = _calibrate(bundle, normal_dir, fpr=0.1)
    before = _graph_state(bundle)
    second = _calibrate(bundle, normal_dir, fpr=0.25)
    assert _graph_state(bundle) == before
    assert first != second and not first.exists() and second.exists()
    record = load_calibration(open_bundle(bundle))
    assert record is not None and record.image.target_fpr == 0.25


def test_a_crash_while_replacing_the_manifest_keeps_the_old_calibration(
    make_bundle: Callable[..., Path], normal_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = make_bundle(torch_weights=False)
    first = _calibrate(bundle, normal_dir, fpr=0.1)
    manifest_before = (bundle / "manifest.json").read_bytes()

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(calibration_module, "atomic_write_text", crash)
    with pytest.raises(OSError, match="simulated"):
        _calibrate(bundle, normal_dir, fpr=0.25)
    assert (bundle / "manifest.json").read_bytes() == manifest_before
    assert sorted(p.name for p in bundle.glob("calibration-*.json")) == [first.name]
    record = load_calibration(open_bundle(bundle))
    assert record is not None and record.image.target_fpr == 0.1


def test_a_tampered_record_fails_verification(
    make_bundle: Callable[..., Path], normal_dir: Path
) -> None:
    bundle = make_bundle(torch_weights=False)
    path = _calibrate(bundle, normal_dir, fpr=0.1)
    text = path.read_text()
    assert '"method": "fpr"' in text
    path.write_text(text.replace('"method": "fpr"', '"method": "f1" ', 1))  # same size
    with pytest.raises(BundleError, match=f"'{path.name}' has sha256"):
        open_bundle(bundle)
    with pytest.raises(BundleError, match="changed after calibration"):
        Detector.open(bundle, backend="onnxruntime", verify=False)


def test_a_manifest_threshold_that_disagrees_with_the_record_is_refused(
    make_bundle: Callable[..., Path], normal_dir: Path
) -> None:
    bundle = make_bundle(torch_weights=False)
    _calibrate(bundle, normal_dir, fpr=0.1)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["threshold"] = manifest["threshold"] + 1.0
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="valid: equal"):
        Detector.open(bundle, backend="onnxruntime")


def test_an_invalid_record_is_refused_naming_the_key(
    make_bundle: Callable[..., Path], normal_dir: Path
) -> None:
    from cops_deploy.runtime.manifest import Calibration

    bundle = make_bundle(torch_weights=False)
    path = _calibrate(bundle, normal_dir, fpr=0.1)
    data = json.loads(path.read_text())
    data["min_area"] = 0
    with pytest.raises(BundleError, match="key 'min_area' is 0.*cops calibrate"):
        Calibration.from_dict(data)
    with pytest.raises(BundleError, match="not valid UTF-8 JSON"):
        Calibration.from_json(b"{")


def test_f1_with_anomalous_images_and_masks(
    make_bundle: Callable[..., Path], normal_dir: Path, tmp_path: Path
) -> None:
    anomalous = _folder(tmp_path / "anomalous", 6, seed=21)
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in sorted(anomalous.iterdir()):
        h, w = np.asarray(Image.open(path)).shape[:2]
        mask = np.zeros((h, w), dtype=np.uint8)
        mask[h // 4 : h // 2, w // 4 : w // 2] = 255
        Image.fromarray(mask).save(masks / f"{path.stem}_mask.png")
    bundle = make_bundle(torch_weights=False)
    _calibrate(bundle, normal_dir, anomalous=anomalous, masks=masks, target="f1")
    record = load_calibration(open_bundle(bundle))
    assert record is not None
    assert record.image.method == "f1" and record.image.target_fpr is None
    assert record.pixel.method == "f1" and 0 < record.pixel.achieved["f1"] <= 1  # type: ignore[operator]
    assert set(record.images) == {"normal", "anomalous", "masks"}
    assert record.images["masks"] == image_set_record(masks)


# ----------------------------------------------------------------------------------------------
# Refusals


def test_too_few_normal_images_are_refused_with_the_number_needed(
    tiny_bundle: Path, normal_dir: Path
) -> None:
    with Detector.open(tiny_bundle, backend="onnxruntime") as detector:
        with pytest.raises(DatasetError, match="got 20, need at least 100"):
            calibrate(detector, normal_dir, fpr=0.01)


def test_an_empty_folder_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    with Detector.open(tiny_bundle, backend="onnxruntime") as detector:
        with pytest.raises(DatasetError, match="holds no image"):
            calibrate(detector, tmp_path / "empty", fpr=0.1)
        with pytest.raises(DatasetError, match="is not a folder"):
            calibrate(detector, tmp_path / "missing", fpr=0.1)


def test_non_image_files_are_refused(tiny_bundle: Path, normal_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "normal"
    shutil.copytree(normal_dir, folder)
    (folder / "notes.txt").write_text("not an image")
    with Detector.open(tiny_bundle, backend="onnxruntime") as detector:
        with pytest.raises(DatasetError, match="1 file.* not images .*'notes.txt'"):
            calibrate(detector, folder, fpr=0.1)
        (folder / "notes.txt").unlink()
        (folder / "broken.png").write_bytes(b"not a png")
        with pytest.raises(ImageReadError, match="broken.png"):
            calibrate(detector, folder, fpr=0.1)


def test_an_unreadable_bundle_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bundle").mkdir()
    with pytest.raises(BundleError, match="no manifest.json"):
        write_calibration(tmp_path / "bundle", None)  # type: ignore[arg-type]


def test_inconsistent_options_are_refused(
    tiny_bundle: Path, normal_dir: Path, tmp_path: Path
) -> None:
    anomalous = _folder(tmp_path / "anomalous", 2, seed=3)
    with Detector.open(tiny_bundle, backend="onnxruntime") as detector:
        with pytest.raises(ConfigError, match="target 'f1' needs anomalous images"):
            calibrate(detector, normal_dir, target="f1")
        with pytest.raises(ConfigError, match="masks needs anomalous images"):
            calibrate(detector, normal_dir, masks=tmp_path, fpr=0.1)
        with pytest.raises(ConfigError, match="invalid target"):
            calibrate(detector, normal_dir, target="auroc")
        with pytest.raises(ConfigError, match="invalid min_area"):
            calibrate(detector, normal_dir, fpr=0.1, min_area=0)
        (tmp_path / "masks").mkdir()
        Image.new("L", (5, 5)).save(tmp_path / "masks" / "img_000.png")
        with pytest.raises(DatasetError, match="1 anomalous image.* no mask"):
            calibrate(detector, normal_dir, anomalous, tmp_path / "masks", fpr=0.1)
        Image.new("L", (5, 5)).save(tmp_path / "masks" / "img_001_mask.png")
        with pytest.raises(DatasetError, match="is 5x5 but its image is 90x120"):
            calibrate(detector, normal_dir, anomalous, tmp_path / "masks", fpr=0.1)
