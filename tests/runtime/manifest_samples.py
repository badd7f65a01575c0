"""Test helper: hand-written manifests and bundles (no build side), for the reader's tests.

``make_manifest(files)`` is a valid schema-2 manifest dict for ``files`` (name -> (content,
role)), with the paper's model config (preprocess size 518, as its graph specs say);
``write_bundle`` writes the files and the manifest into a folder. The ``.onnx`` files are
minimal ONNX models (``onnx_bytes``: inputs and outputs, no nodes) whose inputs and outputs are
those of the manifest's graphs: the reader parses them.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from cops_deploy.configs import get_config
from cops_deploy.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION

MODEL_CFG = get_config("cops-vit-l-14-336")  # preprocess size 518, as the graphs below
SHA_A = "a" * 64
SHA_B = "b" * 64


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def engine_key_dict(**changes: str) -> dict[str, str]:
    key = {
        "onnx_sha256": SHA_A,
        "tensorrt_version": "10.13.0",
        "gpu_name": "NVIDIA H200",
        "compute_capability": "9.0",
        "precision": "fp16",
        "profile": "b1-4-8",
    }
    key.update(changes)
    return key


def make_manifest(files: dict[str, tuple[bytes, str]]) -> dict[str, Any]:
    """A valid manifest dict for ``files`` (name -> (content, role))."""
    model_config = MODEL_CFG.to_dict()
    return {
        "schema_version": SCHEMA_VERSION,
        "package_version": "0.1.0",
        "model_config": model_config,
        "preprocess": dict(model_config["preprocess"]),
        "graphs": {
            "vision": {
                "file": "vision.onnx",
                "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 518, 518]}],
                "outputs": [
                    {"name": "image_embedding", "dtype": "float32", "shape": ["batch", 768]},
                    {"name": "patch_embeddings", "dtype": "float32", "shape": ["batch", 1369, 768]},
                ],
            },
        },
        "files": [
            {
                "path": name,
                "sha256": hashlib.sha256(content).hexdigest(),
                "size": len(content),
                "role": role,
            }
            for name, (content, role) in files.items()
        ],
        "provenance": {"random_weights": True, "checkpoint_sha256": None, "clip_sha256": None},
        "engines": {"vision.engine": engine_key_dict()},
        "parity": {"vision": {"max_abs": 1.2e-6}, "score_max_abs": 3e-7},
        "threshold": 0.42,
        "created": "2026-01-01T00:00:00+00:00",
        "tool_versions": {"python": "3.11.7", "onnx": "1.16.0"},
    }


DOC = "a hand-written sample graph"  # its bytes can change without breaking the protobuf


def onnx_bytes(
    inputs: list[tuple[str, list[int | str]]] = (),
    outputs: list[tuple[str, list[int | str]]] = (),
    external: dict[str, str] | None = None,
) -> bytes:
    """A minimal ONNX model (no nodes): ``inputs``/``outputs`` as (name, shape) float tensors;
    ``external`` maps initializer names to external-data locations."""
    import onnx
    from onnx import TensorProto, helper

    def value(name: str, shape: list[int | str]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)

    initializers = []
    for name, location in (external or {}).items():
        tensor = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
        tensor.ClearField("float_data")
        tensor.data_location = TensorProto.EXTERNAL
        entry = tensor.external_data.add()
        entry.key, entry.value = "location", location
        initializers.append(tensor)
    graph = helper.make_graph(
        [], "g", [value(*i) for i in inputs], [value(*o) for o in outputs], initializers
    )
    model = helper.make_model(graph, doc_string=DOC)
    return model.SerializeToString()


VISION_IO = {
    "inputs": [("image", ["batch", 3, 518, 518])],
    "outputs": [("image_embedding", ["batch", 768]), ("patch_embeddings", ["batch", 1369, 768])],
}


def default_files() -> dict[str, tuple[bytes, str]]:
    return {
        "vision.onnx": (onnx_bytes(**VISION_IO), "vision_onnx"),
        "head.onnx": (onnx_bytes(), "head_onnx"),
        "vision.engine": (b"fake engine", "engine"),
        "tables/bias.npy": (npy_bytes(np.arange(6, dtype=np.float32).reshape(2, 3)), "table"),
    }


def write_bundle(
    root: Path,
    files: dict[str, tuple[bytes, str]] | None = None,
    manifest: dict[str, Any] | None = None,
) -> Path:
    files = default_files() if files is None else files
    root.mkdir(parents=True, exist_ok=True)
    for name, (content, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    manifest = make_manifest(files) if manifest is None else manifest
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, sort_keys=True, indent=2))
    return root


def rewrite_manifest(root: Path, data: dict[str, Any]) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def read_manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST_NAME).read_text())
