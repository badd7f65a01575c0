"""A bundle never runs unverified: the tampered-bundle set through ``Detector.open``, a Bundle
re-checked when a Detector opens it, verification on by default, the run side's errors typed,
and the manifest's preprocessing constants (not CLIP's) reaching the model input.

The table of cases is tests/runtime/tampered_bundles.py (shared with the CLI and service tests).
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import numpy as np
import pytest
import tampered_bundles as tb
from cops_tiny_bundle import rng_images, write_tiny_bundle
from manifest_samples import default_files, make_manifest
from PIL import Image

from cops_deploy.errors import BackendError, BundleError
from cops_deploy.runtime.backends import Backend, OnnxRuntimeBackend
from cops_deploy.runtime.bundle import open_bundle, reopen_bundle
from cops_deploy.runtime.detector import Detector
from cops_deploy.runtime.manifest import MANIFEST_NAME, Manifest, TensorSpec


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, tiny_graphs: Path) -> Path:
    """The bundle the tampered cases start from (read only)."""
    return tb.make_base(tiny_graphs, tmp_path_factory.mktemp("integrity") / "base")


def test_the_base_bundle_opens_and_runs(base: Path) -> None:
    with tb.within(tb.TIMEOUT, Detector.open, base) as detector:
        assert detector.backend_name == "onnxruntime"  # fake engines: TensorRT is skipped
        assert np.isfinite(detector.predict(rng_images(1))[0].score)


@pytest.mark.parametrize("case", tb.CASES, ids=tb.CASE_IDS)
def test_tampered_bundle_is_refused_by_detector_open(
    base: Path, tmp_path: Path, case: tb.Case
) -> None:
    root = tb.tampered(base, tmp_path / "bundle", case)
    with pytest.raises(case.error, match=case.message) as info:
        tb.within(tb.TIMEOUT, Detector.open, root)
    assert "Fix" in str(info.value) or "valid:" in str(info.value)


# ----------------------------------------------------------------------------------------------
# Verification on by default; a Bundle object is checked again


def test_verification_is_on_by_default(base: Path, tmp_path: Path) -> None:
    assert inspect.signature(Detector.open).parameters["verify"].default is True
    assert inspect.signature(open_bundle).parameters["verify"].default is True
    root = tb.tampered(base, tmp_path / "b", tb.Case("flip", tb.flip("vision.onnx.data"), ""))
    with pytest.raises(BundleError, match="'vision.onnx.data' has sha256"):
        Detector.open(root)  # same size: only the hash check sees it
    with Detector.open(root, verify=False):  # the weights are read, not checked
        pass


@pytest.mark.parametrize("name", [*tb.WEIGHTS, MANIFEST_NAME])
def test_a_verified_bundle_object_is_checked_again(base: Path, tmp_path: Path, name: str) -> None:
    root = tb.tampered(base, tmp_path / "b", tb.Case("none", lambda root: None, ""))
    bundle = open_bundle(root)
    path = root / name
    before = path.stat()
    tb.flip(name)(root)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the modification time put back
    with pytest.raises(BundleError, match=f"'{name}' changed since the bundle was checked"):
        tb.within(tb.TIMEOUT, Detector.open, bundle)


def test_an_unverified_bundle_object_is_verified_when_opened(base: Path, tmp_path: Path) -> None:
    root = tb.tampered(base, tmp_path / "b", tb.Case("none", lambda root: None, ""))
    bundle = open_bundle(root, verify=False)
    tb.flip("head.onnx.data")(root)
    with pytest.raises(BundleError, match="'head.onnx.data' has sha256"):
        Detector.open(bundle)


def test_an_unchanged_bundle_object_opens_without_rehashing(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = open_bundle(base)
    import cops_deploy.runtime.bundle as bundle_module

    def no_hashing(path: object) -> str:
        raise AssertionError("a verified, unchanged bundle is not hashed again")

    monkeypatch.setattr(bundle_module, "sha256_file", no_hashing)
    with Detector.open(bundle) as detector:
        assert detector.bundle is bundle


def test_a_vanished_file_and_a_changed_manifest_are_seen(base: Path, tmp_path: Path) -> None:
    root = tb.tampered(base, tmp_path / "b", tb.Case("none", lambda root: None, ""))
    bundle = open_bundle(root)
    (root / "torch" / "config.json").unlink()
    with pytest.raises(BundleError, match="'torch/config.json' cannot be read any more"):
        reopen_bundle(bundle)
    unverified = open_bundle(base, verify=False)
    edited = tb.tampered(base, tmp_path / "c", tb.Case("none", lambda root: None, ""))
    tb.edit_manifest(tb.set_key("threshold", 0.9))(edited)
    moved = type(unverified)(edited, unverified.manifest, verified=False)
    with pytest.raises(BundleError, match="manifest.json changed since the Bundle was opened"):
        reopen_bundle(moved)


def test_external_data_is_checked_without_verify(base: Path, tmp_path: Path) -> None:
    case = next(c for c in tb.CASES if c.name == "vision.onnx reads an unlisted file")
    root = tb.tampered(base, tmp_path / "b", case)
    with pytest.raises(BundleError, match=case.message):
        Detector.open(root, verify=False)


# ----------------------------------------------------------------------------------------------
# Backend errors are the project's errors, with the cause chained


class _FailingBackend(Backend):
    kind = "failing"

    def __init__(self, when: str) -> None:
        super().__init__("vision", [TensorSpec("x", "float32", ("batch",))], [])
        self.when = when

    @classmethod
    def open_pair(cls, bundle, *, threads=None, precision="fp32"):  # noqa: ANN001, ANN206
        raise NotImplementedError

    def _activate(self) -> None:
        if self.when == "activate":
            raise RuntimeError("device lost")

    def _deactivate(self) -> None: ...

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise MemoryError("out of memory")


def test_backend_errors_are_wrapped_with_their_cause() -> None:
    with pytest.raises(BackendError, match=r"'failing' cannot load graph 'vision'.*device lost"):
        _FailingBackend("activate").activate()
    with _FailingBackend("infer") as backend:
        with pytest.raises(BackendError, match=r"failed to run graph 'vision' on x float32\[3\]"):
            backend.infer({"x": np.zeros(3, np.float32)})
        try:
            backend.infer({"x": np.zeros(3, np.float32)})
        except BackendError as exc:
            assert isinstance(exc.__cause__, MemoryError)


def test_onnxruntime_run_error_is_a_backend_error(base: Path, monkeypatch) -> None:
    with OnnxRuntimeBackend(open_bundle(base), "head") as head:

        class BrokenSession:
            def run(self, names, feed):  # noqa: ANN001, ANN202
                raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION")

        monkeypatch.setattr(head, "_session", BrokenSession())
        feed = {s.name: np.zeros([1, *s.shape[1:]], np.float32) for s in head.graph.inputs}
        with pytest.raises(BackendError, match="RUNTIME_EXCEPTION") as info:
            head.infer(feed)
        assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(
    "change",
    [
        {"model_config": {"x": 10**400}},
        {"parity": {"deep": tb.nested(40)}},
        {"model_config": tb.nested(5000)},
        {"files": [{"path": 1}]},
        {"graphs": {"vision": []}},
        {"threshold": 10**400},
    ],
)
def test_manifest_errors_of_any_shape_are_bundle_errors(change: dict) -> None:
    data = {**make_manifest(default_files()), **change}
    with pytest.raises(BundleError):
        Manifest.from_dict(data)


# ----------------------------------------------------------------------------------------------
# The manifest's mean and std reach the model input (checked without the code under test)

MEAN = (0.3, 0.6, 0.45)  # not CLIP's (0.481, 0.458, 0.408)
STD = (0.15, 0.35, 0.5)  # not CLIP's (0.269, 0.261, 0.276)


def _expected(root: Path, rgb: np.ndarray, size: int) -> tuple[float, np.ndarray]:
    """Score and map of ``rgb`` computed here: PIL bicubic resize, /255, (x - mean) / std, and
    the two ONNX graphs run directly with ONNX Runtime."""
    import onnxruntime as ort

    resized = Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC)
    x = np.asarray(resized, dtype=np.float32) / np.float32(255.0)
    x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    batch = np.ascontiguousarray(x.transpose(2, 0, 1)[None])  # (1, 3, S, S)
    vision = ort.InferenceSession(str(root / "vision.onnx"), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(root / "head.onnx"), providers=["CPUExecutionProvider"])
    embeddings = dict(
        zip([o.name for o in vision.get_outputs()], vision.run(None, {"image": batch}), strict=True)
    )
    feed = {i.name: embeddings[i.name] for i in head.get_inputs()}
    out = dict(zip([o.name for o in head.get_outputs()], head.run(None, feed), strict=True))
    return float(out["pred_score"][0]), out["anomaly_map"][0]


def test_the_manifest_mean_and_std_are_used(tmp_path: Path, tiny_graphs: Path) -> None:
    root = write_tiny_bundle(
        tmp_path / "b", tiny_graphs, torch_weights=False, preprocess={"mean": MEAN, "std": STD}
    )
    rgbs = rng_images(3, seed=5)
    with Detector.open(root, backend="onnxruntime") as detector:
        assert detector.manifest.preprocess.mean == MEAN
        got = detector.predict(rgbs)
        size = detector.input_size
    clip = write_tiny_bundle(tmp_path / "clip", tiny_graphs, torch_weights=False)
    with Detector.open(clip, backend="onnxruntime") as detector:
        clip_scores = [p.score for p in detector.predict(rgbs)]
    for rgb, prediction, clip_score in zip(rgbs, got, clip_scores, strict=True):
        score, amap = _expected(root, rgb, size)
        assert abs(prediction.score - score) <= 1e-6
        np.testing.assert_allclose(prediction.anomaly_map, amap, atol=1e-6, rtol=0)
        assert abs(clip_score - score) > 1e-4  # the constants matter: the test can see them
