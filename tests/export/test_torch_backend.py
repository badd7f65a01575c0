"""The PyTorch backend plug-in (cops_deploy.export.torch_backend): same outputs as ONNX Runtime,
one model shared by the pair, reached by Detector through its entry point; one test per refusal."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import cops_tiny_bundle  # noqa: E402

from cops_deploy.errors import (  # noqa: E402
    BundleError,
    ConfigError,
    MissingDependencyError,
    WeightsError,
)
from cops_deploy.export.torch_backend import (  # noqa: E402
    ROLE_TORCH_MODEL,
    TorchBackend,
    load_torch_model,
)
from cops_deploy.runtime.backends import OnnxRuntimeBackend, get_backend  # noqa: E402
from cops_deploy.runtime.bundle import Bundle, open_bundle  # noqa: E402
from cops_deploy.runtime.detector import Detector  # noqa: E402


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return cops_tiny_bundle.export_tiny_graphs(tmp_path_factory.getbasetemp() / "cops_tiny_graphs")


@pytest.fixture
def make_bundle(tmp_path: Path, graphs: Path) -> Callable[..., Path]:
    def make(**options: object) -> Path:
        return cops_tiny_bundle.write_tiny_bundle(tmp_path / "bundle", graphs, **options)

    return make


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, graphs: Path) -> Bundle:
    root = tmp_path_factory.mktemp("torch_backend") / "bundle"
    return open_bundle(cops_tiny_bundle.write_tiny_bundle(root, graphs))


@pytest.fixture(scope="module")
def images(bundle: Bundle) -> np.ndarray:
    from cops_deploy.imaging.preprocess import preprocess_batch

    pre = bundle.manifest.preprocess
    return preprocess_batch(cops_tiny_bundle.rng_images(3), pre.size, pre.mean, pre.std)[0]


@pytest.fixture(scope="module")
def ort_outputs(bundle: Bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    with OnnxRuntimeBackend(bundle, "vision") as vision, OnnxRuntimeBackend(bundle, "head") as head:
        emb = vision.infer({"image": images})
        return {**emb, **head.infer(emb)}


def test_torch_backend_matches_onnxruntime(
    bundle: Bundle, images: np.ndarray, ort_outputs: dict[str, np.ndarray]
) -> None:
    with TorchBackend(bundle, "vision") as vision:
        emb = vision.infer({"image": images})
        with TorchBackend(bundle, "head", model=vision.model) as head:
            out = {**emb, **head.infer(emb)}
            assert head.provider == "cpu" and head.model is vision.model
        assert vision.model is not None  # a shared model stays with its owner
    assert vision.model is None
    for name, ref in ort_outputs.items():
        np.testing.assert_allclose(out[name], ref, atol=1e-5, err_msg=name)


def test_open_pair_shares_one_model(bundle: Bundle) -> None:
    vision, head = TorchBackend.open_pair(bundle)
    try:
        assert vision.is_active and head.is_active
        assert head.model is vision.model is not None  # type: ignore[attr-defined]
    finally:
        head.deactivate()
        vision.deactivate()


def test_entry_point_reaches_it(bundle: Bundle) -> None:
    assert get_backend("torch") is TorchBackend
    with Detector.open(bundle, backend="torch") as det:
        assert (det.backend_name, det.provider) == ("torch", "cpu")
        assert type(det.vision) is TorchBackend and det.skipped == {}
        assert det.head.model is det.vision.model  # type: ignore[attr-defined]


def test_says_why_it_cannot_run(bundle: Bundle, make_bundle, monkeypatch) -> None:
    assert TorchBackend.unavailable_reason(bundle) is None
    no_weights = open_bundle(make_bundle(torch_weights=False))
    reason = TorchBackend.unavailable_reason(no_weights)
    assert reason == f"the bundle has no PyTorch weights (role {ROLE_TORCH_MODEL!r})"
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    want = "torch is not installed (pip install 'cops-deploy[build,cpu]')"
    assert TorchBackend.unavailable_reason(bundle) == want


def test_needs_weights_in_the_bundle(make_bundle) -> None:
    backend = TorchBackend(open_bundle(make_bundle(torch_weights=False)), "vision")
    with pytest.raises(BundleError, match="no PyTorch weights.*role 'torch_model'.*onnxruntime"):
        backend.activate()


def test_explicit_torch_without_weights_is_refused_by_detector(make_bundle) -> None:
    with pytest.raises(BundleError, match="no PyTorch weights"):
        Detector.open(make_bundle(torch_weights=False), backend="torch")


def test_refuses_unknown_graph(bundle: Bundle) -> None:
    with pytest.raises(ConfigError, match="'vision' or 'head'"):
        TorchBackend(bundle, "text")


def test_unreadable_weights_are_refused(make_bundle) -> None:
    root = make_bundle()
    weights = next((root / "torch").glob("*.safetensors"))
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same size: only verify would see it
    with pytest.raises(WeightsError, match="cannot read PyTorch weights .*model.safetensors"):
        load_torch_model(open_bundle(root, verify=False))


def test_invalid_model_config_is_refused(bundle: Bundle) -> None:
    import dataclasses

    manifest = dataclasses.replace(bundle.manifest, model_config={"name": "no-such-model"})
    broken = dataclasses.replace(bundle, manifest=manifest)
    with pytest.raises(BundleError, match="manifest.model_config is not a valid CoPS config"):
        load_torch_model(broken)


def test_missing_torch_gives_install_command(bundle: Bundle, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    with pytest.raises(
        MissingDependencyError, match="needs PyTorch.*pip install 'cops-deploy\[build,cpu\]'"
    ):
        TorchBackend(bundle, "vision").activate()
