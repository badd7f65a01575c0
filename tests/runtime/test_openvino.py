"""OpenVINO backend: the same contract and outputs as ONNX Runtime, bf16 where the CPU has it,
and one test per refusal."""

from __future__ import annotations

import builtins
import importlib.util

import numpy as np
import pytest
from cops_tiny_bundle import rng_images

from cops_deploy.errors import BundleError, ConfigError, MissingDependencyError
from cops_deploy.runtime.backends import OpenVinoBackend
from cops_deploy.runtime.bundle import Bundle, open_bundle
from cops_deploy.runtime.detector import Detector

HAS_OV = importlib.util.find_spec("openvino") is not None
needs_ov = pytest.mark.skipif(
    not HAS_OV, reason="openvino is not installed (pip install 'cops-deploy[openvino]')"
)


def _has_bf16() -> bool:
    if not HAS_OV:
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def _run(bundle: Bundle, images: np.ndarray, precision: str) -> dict[str, np.ndarray]:
    with (
        OpenVinoBackend(bundle, "vision", precision=precision, threads=2) as vision,
        OpenVinoBackend(bundle, "head") as head,
    ):
        emb = vision.infer({"image": images})
        out = {**emb, **head.infer(emb)}
        assert vision.provider == f"openvino CPU {precision}"
        # What OpenVINO compiled, read back: the proof that bf16 really runs bfloat16.
        assert vision.inference_precision == {"fp32": "f32", "bf16": "bf16"}[precision]
        assert head.inference_precision == "f32"
        again = vision.infer({"image": images[:1]})  # outputs are copies, not reused buffers
        assert not np.shares_memory(again["patch_embedding"], emb["patch_embedding"])
    return out


@needs_ov
def test_fp32_matches_onnxruntime(bundle, images, ort_outputs) -> None:
    got = _run(bundle, images, "fp32")
    for name, want in ort_outputs.items():
        np.testing.assert_allclose(got[name], want, atol=1e-5, rtol=0, err_msg=name)


@needs_ov
@pytest.mark.skipif(not _has_bf16(), reason="this CPU has no bfloat16 support in OpenVINO")
def test_bf16_is_close_and_really_bf16(bundle, images, ort_outputs) -> None:
    got = _run(bundle, images, "bf16")
    diff = np.abs(got["anomaly_map"] - ort_outputs["anomaly_map"]).max()
    assert 0 < diff < 2e-2  # nonzero: bf16 really ran (OpenVINO did not fall back to fp32)
    assert np.abs(got["pred_score"] - ort_outputs["pred_score"]).max() < 2e-2


@needs_ov
def test_detector_on_openvino(bundle, ort_outputs) -> None:
    rgbs = rng_images(3)
    with Detector.open(bundle, backend="openvino") as det:
        assert det.backend_name == "openvino"
        preds = det.predict(rgbs)
    with Detector.open(bundle, backend="onnxruntime") as det:
        want = det.predict(rgbs)
    for a, b in zip(preds, want, strict=True):
        assert abs(a.score - b.score) < 1e-5
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < 1e-5


@needs_ov
def test_open_pair_puts_precision_on_the_vision_graph_only(bundle, monkeypatch) -> None:
    """open_pair (what Detector runs): the vision graph in the precision asked, the head fp32."""
    opened: list[tuple[str, str]] = []
    real = OpenVinoBackend._activate

    def record(self) -> None:  # bf16 is not on every CPU: record the request, run fp32
        opened.append((self.name, self.precision))
        self.precision = "fp32"
        real(self)

    monkeypatch.setattr(OpenVinoBackend, "_activate", record)
    vision, head = OpenVinoBackend.open_pair(bundle, threads=1, precision="bf16")
    try:
        assert opened == [("vision", "bf16"), ("head", "fp32")]
        assert vision.is_active and head.is_active and head.threads == 1  # type: ignore[attr-defined]
    finally:
        head.deactivate()
        vision.deactivate()


def test_inference_precision_is_none_while_inactive(bundle) -> None:
    assert OpenVinoBackend(bundle, "vision", precision="bf16").inference_precision is None


def test_unavailable_without_openvino(bundle, monkeypatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert OpenVinoBackend.unavailable_reason(bundle) == (
        "openvino is not installed (pip install 'cops-deploy[openvino]')"
    )


def test_bf16_only_on_openvino(bundle) -> None:
    with pytest.raises(ConfigError, match="runs on backend='openvino' only"):
        Detector.open(bundle, backend="onnxruntime", precision="bf16")
    with pytest.raises(ConfigError, match="unknown precision 'fp8'"):
        Detector.open(bundle, backend="openvino", precision="fp8")


def test_bad_options_are_refused(bundle) -> None:
    with pytest.raises(ConfigError, match="invalid OpenVINO precision 'fp16'"):
        OpenVinoBackend(bundle, "vision", precision="fp16")
    with pytest.raises(ConfigError, match="threads"):
        OpenVinoBackend(bundle, "vision", threads=0)
    with pytest.raises(BundleError, match="no graph 'text'"):
        OpenVinoBackend(bundle, "text")


@needs_ov
def test_unknown_device_is_refused(bundle) -> None:
    with pytest.raises(ConfigError, match="device 'NPU9' is not available"):
        OpenVinoBackend(bundle, "vision", device="NPU9").activate()


@needs_ov
def test_cpu_without_bf16_is_refused(bundle, monkeypatch) -> None:
    import openvino as ov

    real = ov.Core.get_property

    def no_bf16(self, device, name):
        return ["FP32", "INT8"] if name == "OPTIMIZATION_CAPABILITIES" else real(self, device, name)

    monkeypatch.setattr(ov.Core, "get_property", no_bf16)
    with pytest.raises(ConfigError, match="no bfloat16 support"):
        OpenVinoBackend(bundle, "vision", precision="bf16").activate()


@needs_ov
def test_unreadable_graph_is_refused(bundle, tmp_path) -> None:
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(bundle.root, copy)
    broken = open_bundle(copy, verify=False)
    (copy / bundle.manifest.graphs["head"].file).write_bytes(b"not onnx")  # after the checks
    with pytest.raises(BundleError, match="OpenVINO cannot load graph 'head'"):
        OpenVinoBackend(broken, "head").activate()


def test_missing_openvino_gives_install_command(bundle, monkeypatch) -> None:
    real_import = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError("No module named 'openvino'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(MissingDependencyError, match=r"cops-deploy\[openvino\]"):
        OpenVinoBackend(bundle, "vision").activate()
