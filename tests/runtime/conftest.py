"""Fixtures of the run-side tests: tiny cops-tiny bundles (see cops_tiny_bundle.py).

Puts this folder on sys.path so tests here and in tests/export and tests/cli can import the
``cops_tiny_bundle`` helper. The ONNX export runs once per session, under the session's base
temp directory; every bundle fixture reuses it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

import cops_tiny_bundle  # noqa: E402


@pytest.fixture(scope="session")
def tiny_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with vision.onnx, head.onnx (+ external data) and torch/ (saved weights)."""
    return cops_tiny_bundle.export_tiny_graphs(tmp_path_factory.getbasetemp() / "cops_tiny_graphs")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_graphs: Path) -> Path:
    """A cops-tiny bundle with PyTorch weights, no threshold and no engines (shared: read only)."""
    out = tmp_path_factory.getbasetemp() / "cops_tiny_bundle"
    if not out.exists():
        cops_tiny_bundle.write_tiny_bundle(out, tiny_graphs)
    return out


@pytest.fixture
def make_bundle(tmp_path: Path, tiny_graphs: Path) -> Callable[..., Path]:
    """``make_bundle(name, **options)``: a fresh bundle in tmp_path (see write_tiny_bundle)."""

    def make(name: str = "bundle", **options: object) -> Path:
        return cops_tiny_bundle.write_tiny_bundle(tmp_path / name, tiny_graphs, **options)

    return make


@pytest.fixture(scope="module")
def bundle(tiny_bundle: Path):
    """The shared tiny bundle, opened (and verified)."""
    from cops_deploy.runtime.bundle import open_bundle

    return open_bundle(tiny_bundle)


@pytest.fixture(scope="module")
def images(bundle) -> np.ndarray:
    """Three preprocessed images (3, 3, S, S) for the bundle's input size."""
    from cops_deploy.imaging.preprocess import preprocess

    pre = bundle.manifest.preprocess
    rgbs = cops_tiny_bundle.rng_images(3)
    return np.stack([preprocess(rgb, pre.size, pre.mean, pre.std) for rgb in rgbs])


@pytest.fixture(scope="module")
def ort_outputs(bundle, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every graph output of ``images`` run through ONNX Runtime (vision, then head)."""
    from cops_deploy.runtime.backends import OnnxRuntimeBackend

    with OnnxRuntimeBackend(bundle, "vision") as vision, OnnxRuntimeBackend(bundle, "head") as head:
        emb = vision.infer({"image": images})
        return {**emb, **head.infer(emb)}
