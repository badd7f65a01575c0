"""Triton Inference Server model repository from a bundle: two ONNX models and an ensemble.

``write_triton_repository(bundle_dir, out_dir)`` writes::

    out_dir/
      cops_vision/config.pbtxt   onnxruntime_onnx, dynamic batching, instance group
      cops_vision/1/model.onnx   the bundle's vision graph, its ONNX Runtime variant when it has
                                 one (+ its external data, same name)
      cops_head/config.pbtxt     the same for the head graph
      cops_head/1/model.onnx
      cops/config.pbtxt          ensemble: image -> cops_vision -> cops_head -> score, map
      cops/1/                    (empty: Triton wants a version folder for ensembles too)

Tensor names, data types and dims come from the ONNX graphs themselves (read with ``onnx``),
with the batch dimension left out as Triton wants when ``max_batch_size > 0``; a dynamic
non-batch dim is written as -1. A tensor that is only the batch (``pred_score``, shape [B]) is
declared ``dims: [1]`` with ``reshape { shape: [] }``, since Triton refuses empty dims. The
files are protobuf text format (parsable into Triton's ``ModelConfig``); the repository is
written into a temp folder beside ``out_dir`` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cops_deploy.errors import BundleError, ConfigError, MissingDependencyError
from cops_deploy.export.bundle_writer import (
    clean_stale_temporaries,
    make_temp_dir,
    onnx_external_data_files,
    replace_dir,
)
from cops_deploy.extras import BUILD_INSTALL
from cops_deploy.runtime.bundle import Bundle, open_bundle

__all__ = [
    "ENSEMBLE_MODEL",
    "HEAD_MODEL",
    "INSTANCE_KINDS",
    "VISION_MODEL",
    "TritonTensor",
    "write_triton_repository",
]

VISION_MODEL = "cops_vision"
HEAD_MODEL = "cops_head"
ENSEMBLE_MODEL = "cops"
INSTANCE_KINDS: tuple[str, ...] = ("KIND_GPU", "KIND_CPU")
_MODEL_FILE = "model.onnx"
_PLATFORM = "onnxruntime_onnx"
# ONNX TensorProto element type -> Triton data type.
_TRITON_TYPES: dict[int, str] = {
    1: "TYPE_FP32",
    2: "TYPE_UINT8",
    3: "TYPE_INT8",
    4: "TYPE_UINT16",
    5: "TYPE_INT16",
    6: "TYPE_INT32",
    7: "TYPE_INT64",
    8: "TYPE_STRING",
    9: "TYPE_BOOL",
    10: "TYPE_FP16",
    11: "TYPE_FP64",
    12: "TYPE_UINT32",
    13: "TYPE_UINT64",
    16: "TYPE_BF16",
}


@dataclass(frozen=True)
class TritonTensor:
    """A model input or output as Triton declares it: dims exclude the batch dimension."""

    name: str
    data_type: str
    dims: tuple[int, ...]

    def to_pbtxt(self, indent: str) -> str:
        """The ``{ name ... dims ... }`` block, with a reshape for batch-only tensors."""
        dims = self.dims or (1,)
        lines = [
            f"{indent}{{",
            f"{indent}  name: {_quote(self.name)}",
            f"{indent}  data_type: {self.data_type}",
            f"{indent}  dims: [ {', '.join(str(d) for d in dims)} ]",
        ]
        if not self.dims:
            lines.append(f"{indent}  reshape: {{ shape: [ ] }}")
        lines.append(f"{indent}}}")
        return "\n".join(lines)


def _quote(text: str) -> str:
    """A protobuf text-format string literal (JSON escaping is a valid subset for ASCII)."""
    return json.dumps(text, ensure_ascii=True)


def _check_options(max_batch: int, instances: int, kind: str) -> None:
    for name, value in (("max_batch", max_batch), ("instances", instances)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"invalid {name}={value!r}; valid: an integer >= 1. Fix: pass e.g. {name}=8."
            )
    if kind not in INSTANCE_KINDS:
        raise ConfigError(
            f"invalid kind={kind!r}; valid: {', '.join(INSTANCE_KINDS)}. Fix: KIND_GPU to run "
            f"on NVIDIA GPUs, KIND_CPU otherwise."
        )


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a build-side dependency
        raise MissingDependencyError(
            f"writing a Triton repository needs the 'onnx' package ({exc}). Fix: {BUILD_INSTALL}"
        ) from exc
    return onnx


def _graph_tensors(path: Path) -> tuple[list[TritonTensor], list[TritonTensor]]:
    """Inputs and outputs of an ONNX graph, batch dimension removed."""
    onnx = _import_onnx()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others without a common base
        raise BundleError(f"cannot read ONNX graph {path}: {exc}. Fix: re-export it.") from exc
    initializers = {t.name for t in model.graph.initializer}

    def convert(value: Any) -> TritonTensor:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        if not dims or dims[0] != -1:
            raise BundleError(
                f"ONNX graph {path}: tensor {value.name!r} has shape {dims}; a batched Triton "
                f"model needs a dynamic first (batch) dimension. Fix: re-export with a "
                f"dynamic batch."
            )
        if tensor.elem_type not in _TRITON_TYPES:
            raise BundleError(
                f"ONNX graph {path}: tensor {value.name!r} has element type {tensor.elem_type}, "
                f"which Triton cannot declare; valid: {sorted(_TRITON_TYPES)}."
            )
        return TritonTensor(value.name, _TRITON_TYPES[tensor.elem_type], tuple(dims[1:]))

    inputs = [convert(v) for v in model.graph.input if v.name not in initializers]
    outputs = [convert(v) for v in model.graph.output]
    return inputs, outputs


def _model_config(
    name: str,
    inputs: Sequence[TritonTensor],
    outputs: Sequence[TritonTensor],
    max_batch: int,
    instances: int,
    kind: str,
) -> str:
    """config.pbtxt of one ONNX Runtime model."""
    return "\n".join(
        [
            f"name: {_quote(name)}",
            f"platform: {_quote(_PLATFORM)}",
            f"max_batch_size: {max_batch}",
            "input [",
            ",\n".join(t.to_pbtxt("  ") for t in inputs),
            "]",
            "output [",
            ",\n".join(t.to_pbtxt("  ") for t in outputs),
            "]",
            "dynamic_batching { }",
            "instance_group [",
            "  {",
            f"    count: {instances}",
            f"    kind: {kind}",
            "  }",
            "]",
            "",
        ]
    )


def _step(model: str, inputs: Sequence[str], outputs: Sequence[str]) -> str:
    """One ensemble step; tensors keep their names in the ensemble's scope."""
    lines = ["    {", f"      model_name: {_quote(model)}", "      model_version: -1"]
    for kind, names in (("input_map", inputs), ("output_map", outputs)):
        for n in names:
            lines.append(f"      {kind} {{ key: {_quote(n)} value: {_quote(n)} }}")
    lines.append("    }")
    return "\n".join(lines)


def _ensemble_config(
    vision: tuple[list[TritonTensor], list[TritonTensor]],
    head: tuple[list[TritonTensor], list[TritonTensor]],
    max_batch: int,
) -> str:
    """config.pbtxt of the ensemble: the vision model's inputs -> the head model's outputs."""
    (v_in, v_out), (h_in, h_out) = vision, head
    missing = sorted({t.name for t in h_in} - {t.name for t in v_out})
    if missing:
        raise BundleError(
            f"the head graph needs input(s) {missing} that the vision graph does not produce "
            f"(vision outputs: {[t.name for t in v_out]}). Fix: re-export the bundle."
        )
    return "\n".join(
        [
            f"name: {_quote(ENSEMBLE_MODEL)}",
            f"platform: {_quote('ensemble')}",
            f"max_batch_size: {max_batch}",
            "input [",
            ",\n".join(t.to_pbtxt("  ") for t in v_in),
            "]",
            "output [",
            ",\n".join(t.to_pbtxt("  ") for t in h_out),
            "]",
            "ensemble_scheduling {",
            "  step [",
            _step(VISION_MODEL, [t.name for t in v_in], [t.name for t in h_in]) + ",",
            _step(HEAD_MODEL, [t.name for t in h_in], [t.name for t in h_out]),
            "  ]",
            "}",
            "",
        ]
    )


def _copy_graph(src: Path, version_dir: Path) -> None:
    """Copy an ONNX graph as model.onnx, with each external-data file under the name it uses."""
    version_dir.mkdir(parents=True)
    shutil.copyfile(src, version_dir / _MODEL_FILE)
    for location in onnx_external_data_files(src):
        target = version_dir / location
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src.parent / location, target)


def _check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing, non-empty output unless forced; force replaces only a repository."""
    if not out.exists() and not out.is_symlink():
        return
    if out.is_dir() and not any(out.iterdir()):
        return
    if not force:
        raise BundleError(
            f"Triton repository folder {out} already exists and is not empty; refusing to "
            f"overwrite it. Fix: pass force=True (--force), or choose another folder."
        )
    if not (out / ENSEMBLE_MODEL / "config.pbtxt").is_file():
        raise BundleError(
            f"{out} exists and is not a CoPS Triton repository (no {ENSEMBLE_MODEL}/config.pbtxt);"
            f" force replaces only such repositories. Fix: remove it yourself, or choose "
            f"another folder."
        )


def write_triton_repository(
    bundle_dir: str | os.PathLike[str] | Bundle,
    out_dir: str | os.PathLike[str],
    max_batch: int = 8,
    instances: int = 1,
    kind: str = "KIND_GPU",
    force: bool = False,
    ort_variant: bool = True,
) -> Path:
    """Write a Triton model repository for the bundle's vision and head graphs.

    Args:
        bundle_dir: the bundle (a directory, verified on opening, or an opened Bundle).
        out_dir: the repository folder to create.
        max_batch: ``max_batch_size`` of all three models.
        instances: model instances per device (``instance_group.count``).
        kind: 'KIND_GPU' or 'KIND_CPU'.
        force: replace an existing repository at ``out_dir``.
        ort_variant: serve a graph's ONNX Runtime variant (fused ``com.microsoft`` attention,
            same weights, faster) when the bundle has one; False: always the portable graph.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        ConfigError: an option is invalid.
        BundleError: the bundle is invalid, its graphs lack a dynamic batch, or ``out_dir``
            exists (without ``force``, or is not a repository).
    """
    _check_options(max_batch, instances, kind)
    bundle = bundle_dir if isinstance(bundle_dir, Bundle) else open_bundle(bundle_dir)
    out = Path(out_dir)
    _check_out_dir(out, force)
    sources = {}
    for model, graph in ((VISION_MODEL, "vision"), (HEAD_MODEL, "head")):
        if graph not in bundle.manifest.graphs:
            raise BundleError(
                f"bundle {bundle.root} has no {graph!r} graph (graphs: "
                f"{sorted(bundle.manifest.graphs)}). Fix: re-export the bundle."
            )
        path = bundle.ort_variant(graph) if ort_variant else None
        path = path or bundle.root / bundle.manifest.graphs[graph].file
        sources[model] = (path, _graph_tensors(path))
    vision_io, head_io = sources[VISION_MODEL][1], sources[HEAD_MODEL][1]
    ensemble = _ensemble_config(vision_io, head_io, max_batch)

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out)  # what a killed earlier write left beside ``out``
    tmp = make_temp_dir(out, "tmp")  # named with this pid, mode from the umask
    try:
        for model, (path, (inputs, outputs)) in sources.items():
            _copy_graph(path, tmp / model / "1")
            config = _model_config(model, inputs, outputs, max_batch, instances, kind)
            (tmp / model / "config.pbtxt").write_text(config, encoding="utf-8")
        (tmp / ENSEMBLE_MODEL / "1").mkdir(parents=True)
        (tmp / ENSEMBLE_MODEL / "config.pbtxt").write_text(ensemble, encoding="utf-8")
        replace_dir(tmp, out, what="Triton repository")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
