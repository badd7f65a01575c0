"""FP16 deploy graphs with explicit FP32 islands, for TensorRT's strongly typed build.

TensorRT 10/11 strongly typed networks take every tensor's type from the ONNX graph, so the
precision is decided here, on the build side: :func:`to_fp16` copies a deploy graph with its
weights in float16 and ``compute_dtype = float16``. The graphs' own code keeps the islands in
float32 with explicit casts (see ``cops_deploy.export.graphs``): LayerNorm (statistics and
affine, parameters kept float32), every softmax and its mask, L2 norms and cosine distances,
neighbour averaging, SAGA, the head's reductions (mean over samples, max over patches), the
vision graph's mean over feature layers, the upsample and the Gaussian, and the attention
logits (the matmul q k^T that feeds each softmax: CLIP's outlier channels overflow float16
there). The graph inputs and outputs stay float32 (cast inside).

:func:`~cops_deploy.export.onnx_export.export_onnx` exports such a copy as any graph; :func:`precision_report` lists, per ONNX op type,
the element types it computes in, to show the islands are where they should be;
:func:`logit_matmul_report` the element types of the matmuls that produce attention logits.
"""

from __future__ import annotations

import copy
import os
from collections import Counter

import torch
from torch import nn

from cops_deploy.errors import ConfigError
from cops_deploy.export.graphs import DeployGraph

__all__ = ["ISLAND_OPS", "logit_matmul_report", "precision_report", "to_fp16"]

# ONNX ops that must compute in float32 in an FP16 graph (checked by the tests).
ISLAND_OPS: tuple[str, ...] = (
    "LayerNormalization",
    "Softmax",
    "ReduceL2",
    "ReduceMax",
    "ReduceMin",
    "ReduceMean",
    "AveragePool",
    "Div",
)

# Ops a softmax's input may pass through on its way from the logits matmul (mask, scale, casts).
_LOGIT_PATH_OPS = ("Add", "Sub", "Mul", "Div", "Cast", "Where", "Reshape", "Identity")

_ONNX_TYPES = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32", 9: "bool"}


def to_fp16(graph: nn.Module, dtype: torch.dtype = torch.float16) -> nn.Module:
    """A float16 (or ``dtype``: bfloat16 for the CPU bf16 precision) copy of a deploy graph
    (VisionGraph or HeadGraph); ``graph`` is unchanged.

    Weights and constants become ``dtype`` except LayerNorm parameters and the buffers the graph
    lists in ``fp32_buffers`` (attention masks); inputs and outputs stay float32.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ConfigError(f"to_fp16 dtype must be float16 or bfloat16, got {dtype}")
    if not isinstance(graph, DeployGraph):
        raise ConfigError(
            f"to_fp16 needs a deploy graph (VisionGraph or HeadGraph from "
            f"cops_deploy.export.graphs), got {type(graph).__name__}. Fix: wrap the model first."
        )
    half = copy.deepcopy(graph)
    keep = set(half.fp32_buffers)
    for prefix, module in half.named_modules():
        if isinstance(module, nn.LayerNorm):
            continue
        for param in module.parameters(recurse=False):
            param.data = param.data.to(dtype)
        for name, buf in list(module.named_buffers(recurse=False)):
            full = f"{prefix}.{name}" if prefix else name
            if full not in keep and buf.is_floating_point():
                module._buffers[name] = buf.to(dtype)
    half.compute_dtype = dtype
    return half.eval()


def precision_report(onnx_path: str | os.PathLike[str]) -> dict[str, dict[str, int]]:
    """Per ONNX op type, how many nodes compute in each element type (that of their first
    input, by shape inference), e.g. ``{"MatMul": {"float16": 60}, "Softmax": {"float32": 24}}``.
    """
    graph, types = _typed_graph(onnx_path)
    report: dict[str, Counter[str]] = {}
    for node in graph.node:
        if not node.input or node.op_type in ("Cast", "Shape", "Constant"):
            continue
        elem = types.get(node.input[0])
        name = _ONNX_TYPES.get(elem, "unknown") if elem is not None else "unknown"
        report.setdefault(node.op_type, Counter())[name] += 1
    return {op: dict(counts) for op, counts in sorted(report.items())}


def _typed_graph(onnx_path: str | os.PathLike[str]) -> tuple[object, dict[str, int]]:
    """The shape-inferred ONNX graph and the element type of every value in it."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    graph = onnx.shape_inference.infer_shapes(model).graph
    types: dict[str, int] = {}
    for value in [*graph.input, *graph.value_info, *graph.output]:
        types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return graph, types


def logit_matmul_report(onnx_path: str | os.PathLike[str]) -> dict[str, int]:
    """How many attention-logit matmuls compute in each element type, e.g. ``{"float32": 6}``.

    A logit matmul is a MatMul whose output reaches a Softmax through elementwise ops only (the
    mask, a scale, casts); its type is that of its first input. In an FP16 graph every one must
    be float32 (``check_fp16_islands`` refuses the graph otherwise).
    """
    graph, types = _typed_graph(onnx_path)
    producer = {out: node for node in graph.node for out in node.output}
    counts: Counter[str] = Counter()
    seen: set[str] = set()
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        stack = [node.input[0]]
        while stack:
            value = stack.pop()
            src = producer.get(value)
            if src is None or value in seen:
                continue
            seen.add(value)
            if src.op_type == "MatMul":
                counts[_ONNX_TYPES.get(types.get(src.input[0], 0), "unknown")] += 1
            elif src.op_type in _LOGIT_PATH_OPS:
                stack.extend(src.input)
    return dict(counts)
