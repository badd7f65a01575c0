"""Detector: backend choice, parity with PyTorch, batch invariance, inputs, threads, refusals."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from cops_tiny_bundle import rng_images
from PIL import Image

from cops_deploy.errors import BundleError, ConfigError, CopsError, ImageReadError
from cops_deploy.imaging.decode import load_image
from cops_deploy.imaging.preprocess import preprocess, resize_map
from cops_deploy.runtime.backends import TensorRTBackend, get_backend
from cops_deploy.runtime.backends import tensorrt as trt_runtime
from cops_deploy.runtime.bundle import open_bundle
from cops_deploy.runtime.detector import DEFAULT_MAX_BATCH, Detector, Prediction

TOL = 1e-5


@pytest.fixture(scope="module")
def det(tiny_bundle: Path) -> Iterator[Detector]:
    with Detector.open(tiny_bundle) as d:
        yield d


def _max_diff(a: list[Prediction], b: list[Prediction]) -> tuple[float, float]:
    score = max(abs(x.score - y.score) for x, y in zip(a, b, strict=True))
    amap = max(
        float(np.abs(x.anomaly_map - y.anomaly_map).max()) for x, y in zip(a, b, strict=True)
    )
    return score, amap


# ----------------------------------------------------------------------------------------------
# Backend choice


def test_auto_chooses_onnxruntime_here_and_says_why(tiny_bundle: Path, capsys) -> None:
    with Detector.open(tiny_bundle, verbose=True) as d:
        assert d.backend_name == "onnxruntime"
        assert d.provider == "CPUExecutionProvider"
        assert "tensorrt" in d.skipped
        assert d.max_batch == DEFAULT_MAX_BATCH and d.input_size == 98
    err = capsys.readouterr().err
    assert err.count("backend onnxruntime (CPUExecutionProvider)") == 1
    assert "skipped: tensorrt:" in err


def test_quiet_by_default(tiny_bundle: Path, capsys) -> None:
    Detector.open(tiny_bundle).close()
    assert capsys.readouterr().err == ""


def test_auto_skips_engine_with_mismatched_key(make_bundle, monkeypatch) -> None:
    """TensorRT importable and engines present, but built for another GPU: ONNX Runtime runs."""
    root = make_bundle(torch_weights=False, engines=True)
    monkeypatch.setattr(TensorRTBackend, "unavailable_reason", classmethod(lambda cls, b: None))
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda: None)
    monkeypatch.setattr(trt_runtime, "import_cudart", lambda: None)
    here = {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA L4", "compute_capability": "8.9"}
    monkeypatch.setattr(trt_runtime, "tensorrt_machine_fields", lambda device=0: here)
    with Detector.open(root) as d:
        assert d.backend_name == "onnxruntime"
        assert "gpu_name='NVIDIA L4'" in d.skipped["tensorrt"]


def _pretend_missing(monkeypatch, *kinds: str) -> None:
    """Make auto selection believe the backends ``kinds`` are not installed."""
    for kind in kinds:
        missing = classmethod(lambda cls, bundle: "pretend it is missing")
        monkeypatch.setattr(get_backend(kind), "unavailable_reason", missing)


def test_auto_falls_back_to_torch(tiny_bundle: Path, monkeypatch) -> None:
    _pretend_missing(monkeypatch, "onnxruntime", "openvino")
    with Detector.open(tiny_bundle) as d:
        assert (d.backend_name, d.provider) == ("torch", "cpu")
        assert set(d.skipped) == {"tensorrt", "onnxruntime", "openvino"}


def test_auto_with_no_usable_backend_lists_every_reason(make_bundle, monkeypatch) -> None:
    root = make_bundle(torch_weights=False)
    _pretend_missing(monkeypatch, "onnxruntime", "openvino")
    with pytest.raises(
        BundleError, match="no backend can run.*tensorrt: .*onnxruntime: .*openvino: .*torch: "
    ):
        Detector.open(root)


def test_explicit_backends(tiny_bundle: Path) -> None:
    with Detector.open(tiny_bundle, backend="onnxruntime", threads=1) as d:
        assert d.backend_name == "onnxruntime" and d.skipped == {}
    with Detector.open(tiny_bundle, backend="torch") as d:  # the plug-in's entry point
        assert d.backend_name == "torch"
        assert type(d.vision).__module__ == "cops_deploy.export.torch_backend"


def test_unknown_backend_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(ConfigError, match="unknown backend 'tensorflow'.*'onnxruntime'"):
        Detector.open(tiny_bundle, backend="tensorflow")


def test_explicit_torch_without_weights_is_refused(make_bundle) -> None:
    with pytest.raises(BundleError, match="no PyTorch weights"):
        Detector.open(make_bundle(torch_weights=False), backend="torch")


def test_explicit_tensorrt_without_engines_is_refused(tiny_bundle: Path) -> None:
    with pytest.raises(CopsError, match="cops-deploy\\[trt\\]|no TensorRT engine"):
        Detector.open(tiny_bundle, backend="tensorrt")


def test_bundle_with_other_interpolation_is_refused(tiny_bundle: Path) -> None:
    bundle = open_bundle(tiny_bundle)
    pre = dataclasses.replace(bundle.manifest.preprocess, interpolation="bilinear")
    bundle = dataclasses.replace(
        bundle, manifest=dataclasses.replace(bundle.manifest, preprocess=pre)
    )
    with pytest.raises(BundleError, match="interpolation is 'bilinear'.*'bicubic' only"):
        Detector.open(bundle)


def test_bundle_without_head_graph_is_refused(tiny_bundle: Path) -> None:
    bundle = open_bundle(tiny_bundle)
    graphs = {"vision": bundle.manifest.graphs["vision"]}
    bundle = dataclasses.replace(
        bundle, manifest=dataclasses.replace(bundle.manifest, graphs=graphs)
    )
    with pytest.raises(BundleError, match="no graph 'head'"):
        Detector.open(bundle)


# ----------------------------------------------------------------------------------------------
# Parity and batch invariance


def test_equals_pytorch_model(det: Detector, tiny_model) -> None:
    import torch

    rgbs = rng_images(4)
    preds = det.predict(rgbs)
    pre = tiny_model.cfg.preprocess
    x = np.stack([preprocess(rgb, pre.size, pre.mean, pre.std) for rgb in rgbs])
    with torch.no_grad():
        ref = tiny_model(torch.from_numpy(x))
    for pred, score, amap in zip(preds, ref.pred_score, ref.anomaly_map, strict=True):
        assert abs(pred.score - float(score)) < TOL
        assert float(np.abs(pred.anomaly_map - amap.numpy()).max()) < TOL


def test_batch_of_four_equals_each_alone(det: Detector) -> None:
    rgbs = rng_images(4, seed=3)
    batched = det.predict(rgbs, batch_size=4)
    alone = [det.predict(rgb)[0] for rgb in rgbs]
    score, amap = _max_diff(batched, alone)
    assert score < TOL and amap < TOL, (score, amap)


def test_torch_backend_equals_onnxruntime(tiny_bundle: Path, det: Detector) -> None:
    rgbs = rng_images(3, seed=5)
    with Detector.open(tiny_bundle, backend="torch") as d:
        score, amap = _max_diff(d.predict(rgbs), det.predict(rgbs))
    assert score < TOL and amap < TOL


def test_batches_are_split(det: Detector, monkeypatch) -> None:
    calls: list[int] = []
    real = det.vision.infer
    monkeypatch.setattr(
        det.vision, "infer", lambda feed: calls.append(len(feed["image"])) or real(feed)
    )
    rgbs = rng_images(7, seed=2)
    split = det.predict(rgbs, batch_size=3)
    assert calls == [3, 3, 1]
    calls.clear()
    whole = det.predict(rgbs)
    assert calls == [7]
    assert max(_max_diff(split, whole)) < TOL


@pytest.mark.parametrize("batch_size", [0, -2, 2.0, True, "4", DEFAULT_MAX_BATCH + 1])
def test_invalid_batch_size_is_refused(det: Detector, batch_size: object) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        det.predict(rng_images(1), batch_size=batch_size)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Inputs and outputs


def test_mixed_inputs(det: Detector, tmp_path: Path) -> None:
    rgb = rng_images(1)[0]  # (120, 90, 3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    grey16 = (np.arange(40 * 60, dtype=np.uint16).reshape(40, 60) * 27).astype(np.uint16)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    items = [tmp_path / "a.png", str(tmp_path / "a.png"), Image.fromarray(rgb), rgb, grey16, rgba]
    preds = det.predict(items, original_size=True)
    assert [p.source for p in preds] == [str(tmp_path / "a.png")] * 2 + [None] * 4
    assert [p.original_hw for p in preds] == [(120, 90)] * 4 + [(40, 60), (120, 90)]
    for p in preds:
        assert p.anomaly_map.shape == (98, 98) and p.anomaly_map.dtype == np.float32
        assert p.anomaly_map_original is not None
        assert p.anomaly_map_original.shape == p.original_hw
        np.testing.assert_array_equal(
            p.anomaly_map_original, resize_map(p.anomaly_map, p.original_hw)
        )
        assert isinstance(p.score, float) and 0.0 <= p.score <= 1.0
    same = [preds[i] for i in (0, 1, 2, 3, 5)]  # one image in five forms (alpha dropped)
    assert max(_max_diff(same, [preds[0]] * 5)) < TOL
    grey = det.predict(load_image(grey16))[0]
    assert max(_max_diff([grey], [preds[4]])) < TOL


def test_single_image_and_4d_array(det: Detector) -> None:
    rgbs = np.stack([img[:64, :64] for img in rng_images(3, seed=4)])  # (3, 64, 64, 3)
    preds = det.predict(rgbs)
    assert len(preds) == 3 and preds[0].anomaly_map_original is None
    one = det.predict(rgbs[1])
    assert len(one) == 1 and max(_max_diff(one, preds[1:2])) < TOL
    assert det.predict([]) == []


def test_threshold(make_bundle, det: Detector) -> None:
    rgbs = rng_images(4, seed=6)
    plain = det.predict(rgbs)
    assert det.threshold is None and all(p.is_anomalous is None for p in plain)
    cut = float(np.median([p.score for p in plain]))
    with Detector.open(make_bundle(torch_weights=False, threshold=cut)) as d:
        assert d.threshold == cut
        flagged = d.predict(rgbs)
    assert [p.is_anomalous for p in flagged] == [p.score >= cut for p in plain]
    assert any(p.is_anomalous for p in flagged) and not all(p.is_anomalous for p in flagged)


def test_unreadable_image_is_named(det: Detector, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    with pytest.raises(ImageReadError, match="item 1 of 2: .*broken.png"):
        det.predict([rng_images(1)[0], bad])
    with pytest.raises(ImageReadError, match=r"in images 2\.\.3 of 4: batch item 1 of 2: .*broken"):
        det.predict([*rng_images(3), bad], batch_size=2)  # the index within the whole call


@pytest.mark.parametrize("value", [b"bytes", 3.5, {"a": 1}])
def test_unsupported_input_type_is_refused(det: Detector, value: object) -> None:
    with pytest.raises(ImageReadError, match="cannot predict on a|cannot read image"):
        det.predict(value)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# Threads and lifecycle


def test_concurrent_predict_equals_sequential(det: Detector) -> None:
    jobs = [rng_images(3, seed=10 + i) for i in range(4)]
    sequential = [det.predict(job) for job in jobs]
    results: dict[int, list[Prediction]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(2):
                results[i] = det.predict(jobs[i])
        except BaseException as exc:  # surfaced by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, expected in enumerate(sequential):
        assert max(_max_diff(results[i], expected)) < 1e-6


def test_close(tiny_bundle: Path) -> None:
    d = Detector.open(tiny_bundle)
    assert "open" in repr(d)
    d.close()
    d.close()  # idempotent
    assert not d.vision.is_active and not d.head.is_active and "closed" in repr(d)
    with pytest.raises(CopsError, match="is closed"):
        d.predict(rng_images(1))
    with Detector.open(tiny_bundle) as d2:
        pass
    assert not d2.vision.is_active


def test_timings_and_description(det: Detector) -> None:
    det.predict(rng_images(1))
    times = det.last_inference_time
    assert set(times) == {"vision", "head"} and all(t is not None and t > 0 for t in times.values())
    assert det.describe().startswith("backend onnxruntime (CPUExecutionProvider)")


# ----------------------------------------------------------------------------------------------
# Warm-up inside open


@pytest.fixture
def infer_calls(monkeypatch) -> list[tuple[str, tuple[int, ...]]]:
    """Every ONNX Runtime ``infer`` call as (graph name, shape of its first input)."""
    from cops_deploy.runtime.backends import OnnxRuntimeBackend

    calls: list[tuple[str, tuple[int, ...]]] = []
    real = OnnxRuntimeBackend.infer

    def counted(self, feed):
        calls.append((self.name, next(iter(feed.values())).shape))
        return real(self, feed)

    monkeypatch.setattr(OnnxRuntimeBackend, "infer", counted)
    return calls


def test_warmup_runs_one_dummy_image_inside_open(tiny_bundle: Path, infer_calls) -> None:
    with Detector.open(tiny_bundle, backend="onnxruntime") as d:
        assert infer_calls == []  # off by default: open runs no graph
    with Detector.open(tiny_bundle, backend="onnxruntime", warmup=True) as d:
        s = d.input_size
        assert infer_calls[0] == ("vision", (1, 3, s, s))
        assert [name for name, _ in infer_calls] == ["vision", "head"]
        d.predict(rng_images(1))
        assert len(infer_calls) == 4


def test_warmup_leaves_predictions_unchanged(tiny_bundle: Path, det: Detector) -> None:
    images = rng_images(2)
    with Detector.open(tiny_bundle, warmup=True) as warm:
        assert warm.warm_up() > 0
        assert max(_max_diff(warm.predict(images), det.predict(images))) == 0


def test_warmup_comes_after_the_bundle_verification(make_bundle, infer_calls) -> None:
    root = make_bundle()
    data = root / "head.onnx.data" if (root / "head.onnx.data").exists() else root / "head.onnx"
    content = bytearray(data.read_bytes())
    content[-1] ^= 0x01  # still a loadable graph: only the sha256 check can refuse it
    data.write_bytes(bytes(content))
    with pytest.raises(BundleError, match="has sha256"):
        Detector.open(root, backend="onnxruntime", warmup=True)
    assert infer_calls == []  # refused before any graph ran


def test_failed_warmup_closes_the_backends(tiny_bundle: Path, monkeypatch) -> None:
    from cops_deploy.runtime.backends import OnnxRuntimeBackend

    opened: list[OnnxRuntimeBackend] = []
    real_activate = OnnxRuntimeBackend.activate

    def activate(self) -> None:
        opened.append(self)
        real_activate(self)

    def broken(self, feed):
        raise BundleError(f"graph {self.name!r} failed on purpose")

    monkeypatch.setattr(OnnxRuntimeBackend, "activate", activate)
    monkeypatch.setattr(OnnxRuntimeBackend, "infer", broken)
    with pytest.raises(BundleError, match="failed on purpose"):
        Detector.open(tiny_bundle, backend="onnxruntime", warmup=True)
    assert [b.name for b in opened] == ["vision", "head"]
    assert not any(b.is_active for b in opened)


def test_predict_applies_its_decompression_limit_to_files(tiny_bundle: Path, tmp_path) -> None:
    """``max_pixels`` reaches the decoder: a 64x64 file is refused under a 4095-pixel limit
    and scored under the default; an in-memory array is not a file and is not limited."""
    from PIL import Image

    from cops_deploy.errors import ImageReadError

    path = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(path)
    with Detector.open(tiny_bundle) as det:
        with pytest.raises(ImageReadError, match="4096|4,096|4095|4,095"):
            det.predict(path, max_pixels=64 * 64 - 1)
        assert len(det.predict(path)) == 1
        assert len(det.predict(np.zeros((64, 64, 3), np.uint8), max_pixels=100)) == 1
