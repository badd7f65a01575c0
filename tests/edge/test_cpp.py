"""export/cpp against the Python runtime: build it, run its unit tests, compare it image by image.

Builds the CMake project in a cache folder outside the source tree (``COPS_CPP_BUILD_DIR``, else
``$XDG_CACHE_HOME/cops-deploy/export-cpp/<hash of the source path>``; rebuilds are incremental),
with ``OpenVINO_DIR`` taken from the ``openvino`` package of this Python. Then:

- ctest runs the C++ unit tests (manifest refusals, decoding, Pillow-exact resize, the detector
  on the cops-tiny bundle);
- the C++ decoding, the bicubic resize (many sizes, up and down) and the input tensor are
  compared with Pillow and the Python runtime;
- ``cops-detect`` scores images of several formats, modes and sizes with the cops-tiny bundle
  (OpenVINO) and is compared with ``cops predict`` and the Python Detector (ONNX Runtime):
  score difference <= 1e-5, anomaly map difference <= 1e-4;
- the map resize to the original size and the defect regions equal Python's (bit for bit); on
  a bundle calibrated by ``cops calibrate``, ``cops-detect`` gives Python's decisions and regions;
- the ``slow`` test does the same on a full-size bundle and prints the time per image.

Bundles come from the library exporter (``cops_deploy.export.pipeline.export_bundle``), the same
bundle for both sides. Skips only where cmake or a C++ compiler is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_deploy.cli.main import main as cops_main
from cops_deploy.errors import BundleError
from cops_deploy.imaging.decode import load_image
from cops_deploy.imaging.preprocess import preprocess, resize_map
from cops_deploy.runtime.bundle import open_bundle
from cops_deploy.runtime.detector import Detector
from cops_deploy.runtime.regions import defect_regions

SOURCE = Path(__file__).resolve().parents[2] / "export" / "cpp"
SCORE_TOL = 1e-5
MAP_TOL = 1e-4
FULL_MODEL = "cops-vit-l-14-336"
# The tiny bundle's architecture: COPS_CPP_TINY_MODEL=anomalyclip-tiny runs every test on an
# AnomalyCLIP bundle (the consumer is model-agnostic: it chains the graphs by tensor name).
TINY_MODEL = os.environ.get("COPS_CPP_TINY_MODEL", "cops-tiny")
# The fields `cops predict` writes to scores.json (cops_deploy/runtime/predict_files.py).
TOP_FIELDS = {
    "bundle", "backend", "provider", "precision", "threshold", "pixel_threshold", "min_area",
    "results", "failures",
}  # fmt: skip
RESULT_FIELDS = {"source", "score", "visual", "height", "width", "anomalous", "regions"}
# scores.json fields cops-detect does not write: the folder entries that were not scored
# (cops-detect takes files only) and the bundle's calibration record (it reads the same record
# from the bundle; its thresholds and min_area are compared as fields).
PYTHON_ONLY_FIELDS = {"skipped", "calibration"}


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cops-deploy"


def _compiler() -> str | None:
    candidates = [os.environ.get("CXX"), "c++", "g++", "clang++"]
    return next((c for c in candidates if c and shutil.which(c)), None)


def _run(cmd: list[str], timeout: float = 900, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)


def _tail(proc: subprocess.CompletedProcess, lines: int = 40) -> str:
    return "\n".join((proc.stdout + proc.stderr).splitlines()[-lines:])


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """The configured and built export/cpp (library, cops-detect, probe, unit tests)."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed (make cpp-deps installs it)")
    if _compiler() is None:
        pytest.skip("no C++ compiler (c++, g++ or clang++) on PATH (make cpp-deps installs one)")
    try:
        import openvino
    except ImportError as exc:
        pytest.fail(
            f"export/cpp is tested on OpenVINO: pip install 'cops-deploy[openvino]' ({exc})"
        )
    digest = hashlib.sha1(str(SOURCE).encode()).hexdigest()[:12]
    build = Path(os.environ.get("COPS_CPP_BUILD_DIR") or _cache_root() / "export-cpp" / digest)
    configure = [
        "cmake", "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
        f"-DOpenVINO_DIR={Path(openvino.__file__).parent / 'cmake'}",
    ]  # fmt: skip
    if shutil.which("ninja") and not (build / "CMakeCache.txt").exists():
        configure += ["-G", "Ninja"]
    proc = _run(configure)
    if proc.returncode != 0:
        pytest.fail(f"cmake could not configure export/cpp:\n{_tail(proc)}")
    proc = _run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"export/cpp does not build:\n{_tail(proc)}")
    return build


def _export(model: str, out: Path) -> Path:
    """A random-weight bundle of ``model`` written by the library exporter."""
    from cops_deploy.export.pipeline import ExportCfg, export_bundle

    cfg = ExportCfg(out=out, model=model, random_weights=True, force=True)
    return export_bundle(cfg).root


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny bundle (``TINY_MODEL``) as the exporter writes it (read by Python and C++)."""
    return _export(TINY_MODEL, tmp_path_factory.mktemp("cpp_bundles") / "tiny")


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Images of every format, mode and size the C++ library reads (and Python agrees on)."""
    out = tmp_path_factory.mktemp("cpp_images")
    rng = np.random.default_rng(0)

    def rgb(h: int, w: int) -> Image.Image:
        # Smooth content plus noise: like a photo, so JPEG and resampling see real gradients.
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y) % 256], -1)
        noise = rng.integers(-40, 40, (h, w, 3))
        return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))

    made = {
        "rgb.jpg": (rgb(120, 160), {"quality": 90}),
        "progressive.jpg": (rgb(99, 98), {"quality": 85, "progressive": True}),
        "grey.jpg": (rgb(131, 97).convert("L"), {"quality": 92}),
        "cmyk.jpg": (rgb(48, 64).convert("CMYK"), {"quality": 95}),
        "exif6.jpg": (rgb(100, 200), {"quality": 90, "exif": _exif(6)}),
        "exif3.jpg": (rgb(61, 75), {"quality": 90, "exif": _exif(3)}),
        "large.jpg": (rgb(1200, 1600), {"quality": 88}),
        "tiny.jpg": (rgb(2, 3), {"quality": 95}),
        "tall.png": (rgb(300, 77), {}),
        "rgba.png": (Image.fromarray(rng.integers(0, 256, (150, 150, 4), dtype=np.uint8)), {}),
        "grey.png": (rgb(40, 50).convert("L"), {}),
        "grey_alpha.png": (rgb(65, 33).convert("LA"), {}),
        "palette.png": (rgb(80, 120).quantize(17), {"transparency": 3}),
        "bilevel.png": (rgb(23, 41).convert("1"), {}),
        "grey16.png": (Image.fromarray(rng.integers(0, 65536, (70, 90), dtype=np.uint16)), {}),
        "exif8.png": (rgb(45, 30), {"exif": _exif(8)}),
        "pixel.png": (rgb(1, 1), {}),
        "wide.png": (rgb(98, 700), {}),
    }
    paths = []
    for name, (img, options) in made.items():
        img.save(out / name, **options)
        paths.append(out / name)
    return paths


# ---------------------------------------------------------------------------------------------
# The C++ unit tests


def test_ctest_passes_with_the_bundle_tests_run(cpp_build: Path, tiny_bundle) -> None:
    env = {**os.environ, "COPS_TEST_BUNDLE": str(tiny_bundle)}
    proc = _run(["ctest", "--output-on-failure", "-j", "2"], cwd=cpp_build, env=env)
    assert proc.returncode == 0, _tail(proc, 80)
    assert "100% tests passed" in proc.stdout, _tail(proc)
    assert "Skipped" not in proc.stdout, f"some C++ tests skipped:\n{_tail(proc)}"


# ---------------------------------------------------------------------------------------------
# Decoding and preprocessing against Pillow and the Python runtime


def test_decoding_equals_python(cpp_build: Path, images: list[Path], tmp_path: Path) -> None:
    probe = cpp_build / "cops-imaging-probe"
    for path in images:
        proc = _run([str(probe), "decode", str(path), str(tmp_path / "rgb")])
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
        w, h = map(int, proc.stdout.split())
        got = np.fromfile(tmp_path / "rgb", dtype=np.uint8).reshape(h, w, 3)
        want = load_image(path)
        assert got.shape == want.shape, path.name
        np.testing.assert_array_equal(got, want, err_msg=path.name)


def _resize_cases() -> list[tuple[int, int, int, int]]:
    """(in_w, in_h, out_w, out_h): shrink, enlarge, one axis, and the vertical-first shapes."""
    sides = [1, 2, 7, 97, 98, 99, 333, 1021]
    cases = [(w, h, 98, 98) for w in sides for h in sides]
    cases += [(640, 480, 336, 336), (480, 640, 518, 518), (13, 7, 40, 2), (50, 500, 40, 30)]
    cases += [(300, 77, 300, 98), (77, 300, 98, 300), (5, 5, 700, 3), (1000, 10, 7, 9)]
    return cases


def test_resize_equals_pillow_bicubic_on_many_sizes(cpp_build: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    lines, expected = [], []
    for i, (w, h, ow, oh) in enumerate(_resize_cases()):
        src = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        src.tofile(tmp_path / f"in{i}")
        lines.append(f"{tmp_path / f'in{i}'} {w} {h} {ow} {oh} {tmp_path / f'out{i}'}")
        expected.append(np.asarray(Image.fromarray(src).resize((ow, oh), Image.Resampling.BICUBIC)))
    (tmp_path / "list").write_text("\n".join(lines) + "\n")
    proc = _run([str(cpp_build / "cops-imaging-probe"), "resize", str(tmp_path / "list")])
    assert proc.returncode == 0, proc.stderr
    for i, ((w, h, ow, oh), want) in enumerate(zip(_resize_cases(), expected, strict=True)):
        got = np.fromfile(tmp_path / f"out{i}", dtype=np.uint8).reshape(oh, ow, 3)
        np.testing.assert_array_equal(got, want, err_msg=f"{w}x{h} -> {ow}x{oh}")


def test_input_tensor_equals_python_within_one_grey_level(
    cpp_build: Path, images: list[Path], tiny_bundle, tmp_path: Path
) -> None:
    pre = open_bundle(tiny_bundle, verify=False).manifest.preprocess
    std = np.asarray(pre.std, np.float32)
    args = [str(pre.size), *map(repr, pre.mean), *map(repr, pre.std)]
    worst = 0.0
    for path in images:
        out = tmp_path / "tensor"
        proc = _run([str(cpp_build / "cops-imaging-probe"), "tensor", str(path), *args, str(out)])
        assert proc.returncode == 0, f"{path.name}: {proc.stderr}"
        got = np.fromfile(out, dtype=np.float32).reshape(3, pre.size, pre.size)
        want = preprocess(load_image(path), pre.size, pre.mean, pre.std)
        # Back to grey levels (before normalisation): x * std + mean, times 255.
        levels = np.abs(got - want) * std[:, None, None] * 255.0
        worst = max(worst, float(levels.max()))
        assert levels.max() <= 1.0 + 1e-3, f"{path.name}: {levels.max():.3f} grey levels apart"
    print(f"largest input difference: {worst:.4f} grey levels")


# ---------------------------------------------------------------------------------------------
# cops-detect against `cops predict` and the Python Detector


def _detect(cpp_build: Path, bundle: Path, inputs: list[Path], out: Path, *extra: str):
    cmd = [str(cpp_build / "cops-detect"), str(bundle), *map(str, inputs)]
    return _run([*cmd, "--json", str(out / "cpp.json"), "--maps", str(out / "maps"), *extra])


def _compare(report: dict, maps: Path, preds: list) -> tuple[float, float]:
    """Largest score and map differences between cops-detect's report and Python predictions."""
    score_diff = map_diff = 0.0
    for record, pred in zip(report["results"], preds, strict=True):
        assert record["source"] == pred.source
        assert (record["height"], record["width"]) == pred.original_hw, record["source"]
        amap = np.load(maps / record["map"])
        assert amap.shape == pred.anomaly_map.shape, record["source"]
        score_diff = max(score_diff, abs(record["score"] - pred.score))
        map_diff = max(map_diff, float(np.abs(amap - pred.anomaly_map).max()))
    return score_diff, map_diff


def test_cops_detect_matches_cops_predict_and_the_python_detector(
    cpp_build: Path, tiny_bundle, images: list[Path], tmp_path: Path
) -> None:
    python_bundle = cpp_bundle = tiny_bundle
    broken = tmp_path / "broken.png"
    broken.write_bytes(images[-1].read_bytes()[:60])  # truncated: both sides must refuse it
    inputs = [*images, broken]
    proc = _detect(cpp_build, cpp_bundle, inputs, tmp_path)
    assert proc.returncode == 1, _tail(proc)  # 1: an image failed, the others were scored
    report = json.loads((tmp_path / "cpp.json").read_text())

    # `cops predict` (it also draws a picture per image: a few images are enough for the fields)
    py_out, few = tmp_path / "py", [*images[:3], broken]
    args = ["--bundle", str(python_bundle), "--out", str(py_out), "--backend", "onnxruntime"]
    status = cops_main(["predict", *map(str, few), *args])
    assert status == 1
    scores = json.loads((py_out / "scores.json").read_text())
    assert TOP_FIELDS <= set(scores) <= set(report) | PYTHON_ONLY_FIELDS
    for record, reference in zip(report["results"][:3], scores["results"], strict=True):
        assert RESULT_FIELDS <= set(reference) <= set(record)
        assert record["source"] == reference["source"]
        assert abs(record["score"] - reference["score"]) <= SCORE_TOL, record["source"]
    assert [f["source"] for f in report["failures"]] == [str(broken)]
    assert [f["source"] for f in scores["failures"]] == [str(broken)]
    assert report["backend"] == "openvino" and report["threshold"] is None

    with Detector.open(python_bundle, backend="onnxruntime") as detector:
        preds = detector.predict(images)
    score_diff, map_diff = _compare(report, tmp_path / "maps", preds)
    print(f"cops-tiny, {len(images)} images: score diff {score_diff:.2e}, map diff {map_diff:.2e}")
    assert score_diff <= SCORE_TOL
    assert map_diff <= MAP_TOL


def test_cops_detect_refuses_a_tampered_or_schema_1_bundle(
    cpp_build: Path, tiny_bundle, images: list[Path], tmp_path: Path
) -> None:
    cpp_bundle = tiny_bundle
    tampered = tmp_path / "tampered"
    shutil.copytree(cpp_bundle, tampered)
    data = bytearray((tampered / "head.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (tampered / "head.onnx.data").write_bytes(bytes(data))
    proc = _detect(cpp_build, tampered, images[:1], tmp_path)
    assert proc.returncode == 2
    assert "'head.onnx.data' has sha256" in proc.stderr and "Fix:" in proc.stderr, proc.stderr
    old = tmp_path / "schema1"
    shutil.copytree(cpp_bundle, old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["schema_version"] = 1
    (old / "manifest.json").write_text(json.dumps(manifest))
    proc = _detect(cpp_build, old, images[:1], tmp_path)
    assert proc.returncode == 2
    assert "schema_version 1" in proc.stderr and "schema_version 2" in proc.stderr


def test_cops_detect_usage_errors_exit_2(cpp_build: Path, tiny_bundle, tmp_path: Path) -> None:
    detect = str(cpp_build / "cops-detect")
    proc = _run([detect, str(tiny_bundle), str(tmp_path)])  # no --json
    assert proc.returncode == 2 and "--json" in proc.stderr
    missing = tmp_path / "missing.jpg"
    proc = _run([detect, str(tiny_bundle), str(missing), "--json", str(tmp_path / "o.json")])
    assert proc.returncode == 2 and str(missing) in proc.stderr


# ---------------------------------------------------------------------------------------------
# Calibration: the map at the original size, the regions, and the decisions


def test_map_resize_and_regions_equal_python(cpp_build: Path, tmp_path: Path) -> None:
    probe = str(cpp_build / "cops-imaging-probe")
    rng = np.random.default_rng(5)
    for w, h, ow, oh in [(98, 98, 140, 50), (98, 98, 50, 140), (98, 98, 1600, 1200), (7, 9, 2, 3)]:
        amap = rng.random((h, w)).astype(np.float32)
        amap.tofile(tmp_path / "map")
        args = [str(tmp_path / "map"), str(w), str(h), str(ow), str(oh), str(tmp_path / "out")]
        proc = _run([probe, "resize-map", *args])
        assert proc.returncode == 0, proc.stderr
        got = np.fromfile(tmp_path / "out", dtype=np.float32).reshape(oh, ow)
        np.testing.assert_array_equal(got, resize_map(amap, (oh, ow)), err_msg=f"{w}x{h}")
    y, x = np.mgrid[0:200, 0:300]
    amap = (np.sin(x / 7) * np.cos(y / 9) + rng.random((200, 300)) * 0.3).astype(np.float32)
    amap[50, 60] = 0.5  # exactly at the threshold: defective on both sides
    amap.tofile(tmp_path / "map")
    for threshold, min_area in [(0.5, 1), (0.5, 5), (0.9, 30)]:
        args = [str(tmp_path / "map"), "300", "200", repr(threshold), str(min_area)]
        proc = _run([probe, "regions", *args, str(tmp_path / "mask")])
        assert proc.returncode == 0, proc.stderr
        mask, regions = defect_regions(amap, threshold, min_area)
        got = np.fromfile(tmp_path / "mask", dtype=np.uint8).reshape(200, 300)
        np.testing.assert_array_equal(got.astype(bool), mask)
        lines = [line.split() for line in proc.stdout.splitlines()]
        assert len(lines) == len(regions) > 0
        for fields, r in zip(lines, regions, strict=True):
            assert list(map(int, fields[:5])) == [r.x, r.y, r.width, r.height, r.area]
            assert float(fields[5]) == r.peak and float(fields[6]) == pytest.approx(r.mean, 1e-12)


@pytest.fixture(scope="module")
def calibrated_bundle(tiny_bundle: Path, images: list[Path], tmp_path_factory) -> Path:
    """A copy of the tiny bundle calibrated by `cops calibrate` (OpenVINO, as cops-detect) on
    eight of the images (target rate 0.25: two flagged), min area 3."""
    root = tmp_path_factory.mktemp("cpp_calibrated")
    bundle, normal = root / "bundle", root / "normal"
    shutil.copytree(tiny_bundle, bundle)
    normal.mkdir()
    for path in images[:8]:
        shutil.copy2(path, normal / path.name)
    argv = ["calibrate", str(bundle), "--normal", str(normal), "--fpr", "0.25"]
    assert cops_main([*argv, "--min-area", "3", "--backend", "openvino"]) == 0
    return bundle


def test_cops_detect_decides_and_finds_the_regions_of_python(
    cpp_build: Path, calibrated_bundle: Path, images: list[Path], tmp_path: Path
) -> None:
    proc = _detect(cpp_build, calibrated_bundle, images, tmp_path)
    assert proc.returncode == 0, _tail(proc)
    report = json.loads((tmp_path / "cpp.json").read_text())
    with Detector.open(calibrated_bundle, backend="openvino") as detector:
        preds = detector.predict(images)
        cal = detector.calibration
    assert cal is not None
    assert report["threshold"] == cal.image_threshold
    assert report["pixel_threshold"] == cal.pixel_threshold and report["min_area"] == 3
    flagged = 0
    for record, pred in zip(report["results"], preds, strict=True):
        assert record["source"] == pred.source
        assert abs(record["score"] - pred.score) <= SCORE_TOL
        if abs(pred.score - cal.image_threshold) > SCORE_TOL:  # else either side may decide
            assert record["anomalous"] == pred.is_anomalous, record["source"]
        flagged += bool(record["anomalous"])
        # Same OpenVINO graphs on both sides: the maps are equal, and so are the regions.
        want = [r.to_dict() for r in pred.regions or ()]
        got = record["regions"]
        assert [{k: r[k] for k in ("x", "y", "width", "height", "area")} for r in got] == [
            {k: r[k] for k in ("x", "y", "width", "height", "area")} for r in want
        ], record["source"]
        for g, w in zip(got, want, strict=True):
            assert g["peak"] == pytest.approx(w["peak"], abs=MAP_TOL)
            assert g["mean"] == pytest.approx(w["mean"], abs=MAP_TOL)
    assert flagged >= 2  # the calibration set's two, at least
    assert f"; {flagged} anomalous at threshold" in proc.stdout, proc.stdout
    assert any(record["regions"] for record in report["results"])


# ---------------------------------------------------------------------------------------------
# Full size


@pytest.fixture(scope="module")
def full_bundle(request: pytest.FixtureRequest) -> Path:
    """A random-weight full-size bundle (cached: the export takes minutes and ~1.5 GB)."""
    expr = request.config.getoption("markexpr") or ""
    if "slow" not in expr or "not slow" in expr:
        pytest.skip("full-size export (minutes, ~1.5 GB, cached) and inference: run with -m slow")
    cached = _cache_root() / "bundles" / f"{FULL_MODEL}-random"
    try:
        open_bundle(cached, verify=False)
    except BundleError:  # absent, interrupted, or from an older exporter: export it again
        cached.parent.mkdir(parents=True, exist_ok=True)
        _export(FULL_MODEL, cached)
    return cached


@pytest.mark.slow
def test_full_size_bundle_matches_python_and_times_it(
    cpp_build: Path, full_bundle: Path, images: list[Path], tmp_path: Path
) -> None:
    python_bundle = cpp_bundle = full_bundle
    subset = images[:10]
    proc = _detect(cpp_build, cpp_bundle, subset, tmp_path, "--warmup")
    assert proc.returncode == 0, _tail(proc)
    report = json.loads((tmp_path / "cpp.json").read_text())
    with Detector.open(python_bundle, backend="onnxruntime") as detector:
        detector.predict(subset[:1])  # warm-up, as cops-detect --warmup
        start = time.perf_counter()
        preds = detector.predict(subset)
        python_s = (time.perf_counter() - start) / len(subset)
    score_diff, map_diff = _compare(report, tmp_path / "maps", preds)
    cpp_s = report["timing"]["per_image_s"]
    print(
        f"\n{FULL_MODEL}, {len(subset)} images: C++ (OpenVINO) {cpp_s:.3f} s/image, Python "
        f"(ONNX Runtime) {python_s:.3f} s/image; score diff {score_diff:.2e}, map diff "
        f"{map_diff:.2e}"
    )
    assert score_diff <= SCORE_TOL
    assert map_diff <= MAP_TOL
