"""ONNX export of the deploy graphs (``torch.onnx.export(..., dynamo=True)``), its checks, and
parity against PyTorch with ONNX Runtime.

- :func:`export_onnx` writes one graph, with a symbolic batch dimension and external data, then
  :func:`check_onnx` runs ``onnx.checker`` (path form: works past 2 GB) and checks the I/O names,
  dtypes and that the batch dimension stayed symbolic.
- :func:`compare_with_onnxruntime` runs a torch graph and its ONNX file on the same inputs with
  Polygraphy's ``Comparator`` and reports max, mean and median errors per output.
- :func:`pipeline_parity` compares ONNX Runtime (vision then head) with ``CopsModel`` itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cops_deploy.configs import CopsCfg
from cops_deploy.errors import ConfigError, ExportError, MissingDependencyError
from cops_deploy.export.fused_ops import onnx_translation_table
from cops_deploy.extras import BUILD_INSTALL
from cops_deploy.model.cops import CopsModel
from cops_deploy.runtime.contract import BATCH_DIM

__all__ = [
    "DEFAULT_OPSET",
    "ExportError",
    "OutputParity",
    "check_onnx",
    "compare_with_onnxruntime",
    "export_onnx",
    "export_ort_variant",
    "onnxruntime_session",
    "pipeline_parity",
    "run_onnxruntime",
    "share_external_data",
    "synthetic_images",
]

DEFAULT_OPSET = 20
_ONNX_FLOAT = 1  # onnx.TensorProto.FLOAT


# ----------------------------------------------------------------------------------------------
# Export


def _graph_names(graph: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    inputs = tuple(getattr(graph, "input_names", ()))
    outputs = tuple(getattr(graph, "output_names", ()))
    if not inputs or not outputs:
        raise ConfigError(
            f"graph {type(graph).__name__} has no input_names/output_names; valid: a deploy "
            f"graph from cops_deploy.export.graphs (VisionGraph, HeadGraph) or a module that "
            f"declares both tuples."
        )
    return inputs, outputs


def _check_example(
    graph: nn.Module, example: Sequence[torch.Tensor], inputs: Sequence[str], dynamic: bool
) -> tuple[torch.Tensor, ...]:
    example = tuple(example)
    name = type(graph).__name__
    if len(example) != len(inputs) or not all(isinstance(t, torch.Tensor) for t in example):
        raise ConfigError(
            f"example for {name} must be a tuple of {len(inputs)} tensors ({', '.join(inputs)}), "
            f"got {[type(t).__name__ for t in example]}. Fix: pass "
            f"cops_deploy.export.graphs.example_inputs(...)."
        )
    batches = {int(t.shape[0]) for t in example}
    if dynamic and (len(batches) != 1 or min(batches) < 2):
        raise ConfigError(
            f"example for {name} has batch sizes {sorted(batches)}; a dynamic-batch export needs "
            f"one batch size >= 2 for every input (with batch 1 the exporter specialises the "
            f"batch dimension to 1 silently). Fix: use a batch-2 example."
        )
    return example


def export_onnx(
    graph: nn.Module,
    out_path: str | os.PathLike[str],
    example: Sequence[torch.Tensor],
    dynamic_batch: bool = True,
    opset: int = DEFAULT_OPSET,
    external_data: bool = True,
    check: bool = True,
) -> Path:
    """Export a deploy graph to ``out_path`` with the dynamo exporter and check the result.

    Args:
        graph: a module with ``input_names`` and ``output_names`` (the ONNX I/O names).
        out_path: the ``.onnx`` file; external data goes beside it as ``<name>.data``.
        example: one tensor per input; batch 2 (or more) when ``dynamic_batch``.
        dynamic_batch: make dimension 0 of every input and output symbolic ("batch").
        opset: ONNX opset (>= 17 for LayerNormalization).
        external_data: store the weights in ``<name>.data`` (needed past 2 GB).
        check: run :func:`check_onnx` on the result (skip only to run it later yourself).

    Returns the path of the checked ONNX file. Raises ExportError if the exporter fails (the
    graph code must be fixed: there is no silent fallback to another exporter).
    """
    from torch.export import Dim

    inputs, outputs = _graph_names(graph)
    example = _check_example(graph, example, inputs, dynamic_batch)
    if opset < 17:
        raise ConfigError(
            f"opset {opset} is too old; valid: >= 17 (LayerNormalization). Fix: use the "
            f"default opset {DEFAULT_OPSET}."
        )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    dynamic_shapes = None
    if dynamic_batch:
        batch = Dim("batch", min=1)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    graph = graph.eval()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _quiet_optimizer():
            # Both head inputs share the one batch Dim; the exporter says so in a warning.
            warnings.filterwarnings("ignore", message=".*shares the same shape constraints.*")
            torch.onnx.export(
                graph,
                example,
                str(out),
                input_names=list(inputs),
                output_names=list(outputs),
                opset_version=opset,
                dynamo=True,
                external_data=external_data,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=onnx_translation_table(),
                verbose=False,
            )
    except Exception as exc:  # the exporter raises many unrelated types
        raise ExportError(
            f"torch.onnx.export(dynamo=True) failed on {type(graph).__name__} -> {out}: "
            f"{type(exc).__name__}: {exc}. Fix: make the graph code exportable (no fallback)."
        ) from exc
    if check:
        check_onnx(out, inputs, outputs, dynamic_batch)
    return out


@contextlib.contextmanager
def _quiet_optimizer() -> Any:
    """Silence onnxscript's constant-folding notes ("Skipping constant folding for op Split")."""
    log = logging.getLogger("onnxscript.optimizer._constant_folding")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def check_onnx(
    path: str | os.PathLike[str],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_batch: bool = True,
) -> None:
    """``onnx.checker`` (path form) plus the I/O contract: names, float32, symbolic batch."""
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"onnx.checker rejected {path}: {exc}") from exc
    model = onnx.load(str(path), load_external_data=False)
    got_in = [v.name for v in model.graph.input]
    got_out = [v.name for v in model.graph.output]
    if got_in != list(input_names) or got_out != list(output_names):
        raise ExportError(
            f"{path} has inputs {got_in} and outputs {got_out}; expected {list(input_names)} "
            f"and {list(output_names)}. Fix: export with the graph's input_names/output_names."
        )
    for value in [*model.graph.input, *model.graph.output]:
        tensor = value.type.tensor_type
        if tensor.elem_type != _ONNX_FLOAT:
            raise ExportError(
                f"{path}: {value.name} has ONNX element type {tensor.elem_type}; every graph "
                f"input and output must be float32 (type 1). Fix: cast inside the graph."
            )
        dim0 = tensor.shape.dim[0] if tensor.shape.dim else None
        if dynamic_batch and (dim0 is None or not dim0.dim_param):
            value0 = None if dim0 is None else dim0.dim_value
            raise ExportError(
                f"{path}: dimension 0 of {value.name} is fixed ({value0}); a dynamic-batch "
                f"graph needs it symbolic. Fix: export with a batch-2 example and dynamic_shapes."
            )


# ----------------------------------------------------------------------------------------------
# ONNX Runtime


def onnxruntime_session(path: str | os.PathLike[str], threads: int | None = None) -> Any:
    """A CPU ONNX Runtime session for ``path`` (external data resolved beside it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnxruntime(path_or_session: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run one ONNX graph on CPU; returns output name -> array."""
    session = path_or_session
    if isinstance(path_or_session, str | os.PathLike):
        session = onnxruntime_session(path_or_session)
    names = [o.name for o in session.get_outputs()]
    values = session.run(names, {k: np.ascontiguousarray(v) for k, v in feeds.items()})
    return dict(zip(names, values, strict=True))


def synthetic_images(cfg: CopsCfg, n: int = 2, seed: int = 0) -> torch.Tensor:
    """``n`` seeded, normalised synthetic images (B, 3, S, S): smooth colour fields with a
    bright square, passed through the model's mean/std."""
    gen = torch.Generator().manual_seed(seed)
    s = cfg.preprocess.size
    coarse = torch.rand(n, 3, 4, 4, generator=gen)
    img = torch.nn.functional.interpolate(coarse, size=(s, s), mode="bilinear")
    for i in range(n):
        y, x = (torch.randint(0, s - s // 4, (2,), generator=gen)).tolist()
        img[i, :, y : y + s // 6, x : x + s // 6] = 1.0
    mean = torch.tensor(cfg.preprocess.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.preprocess.std).view(1, 3, 1, 1)
    return (img - mean) / std


@dataclass(frozen=True)
class OutputParity:
    """Error statistics of one output between two runners (Polygraphy's figures)."""

    max_abs: float
    mean_abs: float
    median_abs: float
    max_rel: float
    passed: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "max_abs": self.max_abs,
            "mean_abs": self.mean_abs,
            "median_abs": self.median_abs,
            "max_rel": self.max_rel,
            "passed": self.passed,
        }


def _torch_runner(
    graph: nn.Module, feed: Mapping[str, np.ndarray], output_names: Sequence[str]
) -> Any:
    """A Polygraphy runner for a torch module on CPU (Polygraphy's PytRunner needs CUDA);
    ``feed`` gives the input names, in order, and their shapes (batch dynamic)."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchCpuRunner(BaseRunner):
        def __init__(self) -> None:
            super().__init__(name="pytorch", prefix="pytorch-runner")

        def get_input_metadata_impl(self) -> Any:
            meta = TensorMetadata()
            for name, value in feed.items():
                meta.add(name, np.float32, (BATCH_DIM, *np.shape(value)[1:]))
            return meta

        def infer_impl(self, feed_dict: Mapping[str, np.ndarray]) -> OrderedDict:
            start = time.perf_counter()
            with torch.no_grad():
                args = [torch.from_numpy(np.asarray(feed_dict[n])) for n in feed]
                outputs = graph(*args)
            self.inference_time = time.perf_counter() - start
            return OrderedDict(
                (n, o.detach().float().numpy()) for n, o in zip(output_names, outputs, strict=True)
            )

    return TorchCpuRunner()


def _simple_compare(compare_func: Any) -> Any:
    """Polygraphy's simple comparison (``SimpleCompareFunc`` from 0.5x, ``CompareFunc.simple``
    before)."""
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:
        return compare_func.simple
    return SimpleCompareFunc


def compare_with_onnxruntime(
    graph: nn.Module,
    onnx_path: str | os.PathLike[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    atol: float | Mapping[str, float] = 1e-5,
    rtol: float | Mapping[str, float] = 0.0,
) -> dict[str, OutputParity]:
    """Run ``graph`` (PyTorch, CPU) and ``onnx_path`` (ONNX Runtime, CPU) with Polygraphy's
    Comparator on every feed dict; per output, the worst statistics over the feeds.

    ``atol``/``rtol`` may be per output name (Polygraphy's per-output tolerances).
    """
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.comparator import Comparator, CompareFunc
        from polygraphy.logger import G_LOGGER
    except ImportError as exc:
        raise MissingDependencyError(
            f"comparing with Polygraphy needs the 'polygraphy' package ({exc}). "
            f"Fix: {BUILD_INSTALL}."
        ) from exc
    inputs, outputs = _graph_names(graph)
    feeds = [{name: np.asarray(f[name], dtype=np.float32) for name in inputs} for f in feeds]
    if not feeds:
        raise ConfigError("compare_with_onnxruntime needs at least one feed dict; got none.")
    runners = [
        _torch_runner(graph.eval(), feeds[0], outputs),
        OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["cpu"]), name="onnxruntime"),
    ]
    with G_LOGGER.verbosity(G_LOGGER.ERROR):
        results = Comparator.run(runners, data_loader=feeds)
        compare = _simple_compare(CompareFunc)(atol=atol, rtol=rtol, check_shapes=True)
        accuracy = Comparator.compare_accuracy(results, compare_func=compare)
    per_output: dict[str, list[Any]] = {name: [] for name in outputs}
    for iterations in accuracy[0].values():
        for iteration in iterations:
            for name, res in iteration.items():
                per_output[name].append(res)
    return {
        name: OutputParity(
            max_abs=float(max(r.max_absdiff for r in res)),
            mean_abs=float(max(r.mean_absdiff for r in res)),
            median_abs=float(max(r.median_absdiff for r in res)),
            max_rel=float(max(r.max_reldiff for r in res)),
            passed=all(bool(r) for r in res),
        )
        for name, res in per_output.items()
    }


def pipeline_parity(
    model: CopsModel,
    vision_onnx: str | os.PathLike[str],
    head_onnx: str | os.PathLike[str],
    images: torch.Tensor,
) -> dict[str, Any]:
    """ONNX Runtime (vision then head, CPU) against ``CopsModel`` (float32 PyTorch) on ``images``.

    Returns JSON-ready figures: anomaly-map and score max abs differences (and embeddings').
    """
    with torch.no_grad():
        ref = model.forward_intermediates(images)
    vision = run_onnxruntime(vision_onnx, {"image": images.numpy()})
    head = run_onnxruntime(head_onnx, vision)

    def diff(a: np.ndarray, b: torch.Tensor) -> float:
        return float(np.abs(a.astype(np.float64) - b.double().numpy()).max())

    return {
        "reference": "pytorch CopsModel float32 (eager, CPU)",
        "backend": "onnxruntime CPUExecutionProvider",
        "images": int(images.shape[0]),
        "anomaly_map_max_abs": diff(head["anomaly_map"], ref.anomaly_map),
        "pred_score_max_abs": diff(head["pred_score"], ref.pred_score),
        "image_embedding_max_abs": diff(vision["image_embedding"], ref.image_embedding),
        "patch_embedding_max_abs": diff(vision["patch_embedding"], ref.patch_embedding),
    }


# ----------------------------------------------------------------------------------------------
# ONNX Runtime variant sharing the portable graph's weights


def share_external_data(
    variant: str | os.PathLike[str],
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
) -> Path:
    """Write ``variant``'s graph to ``out`` with its external tensors pointing into ``base``'s
    external-data file(s), so that two graphs of one model share one copy of the weights.

    ``out`` must sit in ``base``'s directory. Every external tensor of ``variant`` must have a
    byte-identical tensor (same type and shape) in ``base``; tensors are matched by content, so
    names given by constant folding do not matter. Raises ExportError naming the first tensor
    without a twin. ``variant``'s own external-data file is left alone (delete it yourself).
    """
    import hashlib

    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from cops_deploy.export.bundle_writer import onnx_tensors

    variant, base, out = Path(variant), Path(base), Path(out)
    if out.parent.resolve() != base.parent.resolve():
        raise ConfigError(f"{out} must sit beside {base}: external data is found relative to it.")

    def external(model: Any, where: Path) -> list[tuple[Any, ExternalDataInfo, str]]:
        tensors = []
        for tensor in onnx_tensors(model.graph):
            if not uses_external_data(tensor):
                continue
            info = ExternalDataInfo(tensor)
            with open(where.parent / info.location, "rb") as fh:
                fh.seek(info.offset or 0)
                data = fh.read(info.length) if info.length else fh.read()
            key = f"{tensor.data_type}:{list(tensor.dims)}:{hashlib.sha256(data).hexdigest()}"
            tensors.append((tensor, info, key))
        return tensors

    base_model = onnx.load(str(base), load_external_data=False)
    model = onnx.load(str(variant), load_external_data=False)
    twins = {key: info for _, info, key in external(base_model, base)}
    for tensor, _, key in external(model, variant):
        twin = twins.get(key)
        if twin is None:
            raise ExportError(
                f"{variant}: tensor {tensor.name!r} (type {tensor.data_type}, shape "
                f"{list(tensor.dims)}) has no byte-identical twin in {base}; the two graphs do "
                f"not hold the same weights. Fix: export both from the same model."
            )
        del tensor.external_data[:]
        for field in ("location", "offset", "length"):
            value = getattr(twin, field)
            if value is not None:
                tensor.external_data.add(key=field, value=str(value))
    onnx.save(model, str(out))
    return out


def export_ort_variant(
    vision: nn.Module,
    base: str | os.PathLike[str],
    out: str | os.PathLike[str],
    example: Sequence[torch.Tensor],
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Export ``vision`` (a VisionGraph with ``attn_impl="ort_mha"``) as ``out``: the ONNX
    Runtime variant of the portable graph ``base``, sharing ``base``'s external data."""
    import tempfile

    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".ort-variant-", dir=out.parent) as tmp:
        exported = export_onnx(vision, Path(tmp) / out.name, example, opset=opset, check=False)
        share_external_data(exported, base, out)
    check_onnx(out, vision.input_names, vision.output_names)
    return out
