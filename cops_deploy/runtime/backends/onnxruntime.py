"""ONNX Runtime backend: one bundle graph in an ``InferenceSession`` (CUDA, then CPU).

Bundle files used: the graph's ONNX file (``manifest.graphs[...].file``), or its ONNX Runtime
variant (fused ``com.microsoft`` attention, same weights) when the bundle has one. Concurrent
``infer`` calls run in parallel: ONNX Runtime documents ``InferenceSession.run`` as
thread-safe. ``onnxruntime`` is imported by ``activate()`` only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cops_deploy.errors import BundleError, ConfigError, MissingDependencyError
from cops_deploy.extras import ORT_INSTALL, install_command
from cops_deploy.runtime.backends.base import (
    Backend,
    activate_pair,
    check_io_names,
    check_threads,
    graph_io,
)
from cops_deploy.runtime.bundle import Bundle
from cops_deploy.runtime.manifest import GraphIO, ort_variant_role

__all__ = ["ORT_INSTALL", "ORT_VARIANTS", "OnnxRuntimeBackend", "default_ort_providers"]

ORT_VARIANTS = ("auto", "portable", "ort")
_CUDA_PROVIDER = "CUDAExecutionProvider"
_CPU_PROVIDER = "CPUExecutionProvider"


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependencyError(
            f"the ONNX Runtime backend needs the 'onnxruntime' package, which is not "
            f"installed ({exc}). Fix: {ORT_INSTALL}"
        ) from exc
    return onnxruntime


def default_ort_providers(available: Sequence[str]) -> list[str]:
    """CUDA then CPU when onnxruntime-gpu offers CUDA, else CPU only."""
    if _CUDA_PROVIDER in available:
        return [_CUDA_PROVIDER, _CPU_PROVIDER]
    return [_CPU_PROVIDER]


def _ort_graph_path(bundle: Bundle, graph: str, io: GraphIO, variant: str) -> Path:
    """The ONNX file an ONNX Runtime session of ``graph`` loads (see OnnxRuntimeBackend)."""
    if variant not in ORT_VARIANTS:
        raise ConfigError(
            f"invalid ONNX Runtime variant {variant!r}; valid: {list(ORT_VARIANTS)} ('auto' "
            f"runs the fused variant when the bundle has one)."
        )
    fused = None if variant == "portable" else bundle.ort_variant(graph)
    if variant == "ort" and fused is None:
        raise BundleError(
            f"bundle {bundle.root} has no ONNX Runtime variant of graph {graph!r} (role "
            f"{ort_variant_role(graph)!r}). Fix: re-export it with cops-export (fp32 bundles "
            f"carry one unless --no-ort-variant), or pass variant='auto'."
        )
    return fused if fused is not None else bundle.root / io.file


class OnnxRuntimeBackend(Backend):
    """One bundle graph in an ONNX Runtime ``InferenceSession``.

    Args:
        bundle: the opened bundle.
        graph: 'vision' or 'head' (a key of ``manifest.graphs``).
        providers: execution providers in order of preference; None: CUDA then CPU when
            onnxruntime-gpu offers CUDA, else CPU. ``provider`` says which one the session got
            (ONNX Runtime falls back to CPU when CUDA cannot start).
        threads: intra-op threads; None lets ONNX Runtime use one per core.
        variant: which ONNX file runs. "auto" (default): the bundle's ONNX Runtime variant of
            the graph when it has one (fused ``com.microsoft`` attention, same weights; about 6%
            faster end to end on CPU), else the portable graph. "portable": always the portable
            graph (the one TensorRT builds from). "ort": the variant, BundleError without one.
    """

    kind = "onnxruntime"
    thread_safe = True
    required_modules = ("onnxruntime",)
    install_hint = ORT_INSTALL

    def __init__(
        self,
        bundle: Bundle,
        graph: str,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        variant: str = "auto",
    ) -> None:
        self.graph = graph_io(bundle, graph)
        super().__init__(graph, self.graph.inputs, self.graph.outputs)
        self.path = _ort_graph_path(bundle, graph, self.graph, variant)
        self._providers = list(providers) if providers is not None else None
        self.threads = check_threads(threads)
        self._session: Any = None
        self._provider: str | None = None

    @classmethod
    def open_pair(
        cls, bundle: Bundle, *, threads: int | None = None, precision: str = "fp32"
    ) -> tuple[Backend, Backend]:
        """Both graphs in ONNX Runtime sessions with ``threads`` intra-op threads (fp32)."""
        return activate_pair(
            cls(bundle, "vision", threads=threads), lambda _: cls(bundle, "head", threads=threads)
        )

    @property
    def provider(self) -> str:
        """The execution provider the session runs on (known once active)."""
        return self._provider or "(inactive)"

    def _activate(self) -> None:
        ort = _import_onnxruntime()
        available = list(ort.get_available_providers())
        providers = self._providers or default_ort_providers(available)
        unknown = [p for p in providers if p not in available]
        if unknown:
            raise ConfigError(
                f"ONNX Runtime provider(s) {unknown} are not available here; available: "
                f"{available}. Fix: pass providers from that list (CUDA needs onnxruntime-gpu, "
                f"not onnxruntime: {install_command('gpu')} in an environment without [cpu])."
            )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        try:
            session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # ORT raises its own pybind11 types (Fail, InvalidGraph, ...)
            raise BundleError(
                f"ONNX Runtime cannot load graph {self.name!r} from {self.path} "
                f"({type(exc).__name__}: {exc}). Fix: re-export the bundle; check the "
                f"onnxruntime version ({ort.__version__}) supports the graph's opset."
            ) from exc
        check_io_names(
            "ONNX graph",
            self.path,
            self.graph,
            [i.name for i in session.get_inputs()],
            [o.name for o in session.get_outputs()],
        )
        self._session = session
        self._provider = session.get_providers()[0]

    def _deactivate(self) -> None:
        self._session = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(self.output_names)
        return dict(zip(names, self._session.run(names, feed), strict=True))
