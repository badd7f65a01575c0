"""Inference backends for the two bundle graphs: ONNX Runtime, OpenVINO, TensorRT and PyTorch.

Every backend follows one contract, as Polygraphy's runners do: it is context-managed
(``with backend:`` activates and deactivates it), it publishes ``input_metadata`` (name ->
:class:`~cops_deploy.runtime.bundle.TensorSpec`, from the bundle manifest), and
``infer(feed)`` takes and returns ``{name: numpy array}``. The feed is checked once, here in the
base class (names, dtype, rank, fixed dims, agreement of named dims such as the batch), so the
subclasses only run the graph; ``last_inference_time`` holds the seconds the latest call spent
in the graph. The vision graph and the head graph each get their own backend and run in
sequence (see :mod:`cops_deploy.runtime.detector`).

Thread safety: ``OnnxRuntimeBackend`` runs concurrent ``infer`` calls in parallel (ONNX Runtime
documents ``InferenceSession.run`` as thread-safe); ``TensorRTBackend`` (one execution context,
one stream, reused device buffers), ``OpenVinoBackend`` (one infer request) and ``TorchBackend``
serialise them with a lock.

Torch-free at import: ``onnxruntime``, ``openvino``, ``tensorrt``, ``cuda-python`` and ``torch``
are imported inside ``activate()`` only; a missing one raises :class:`MissingDependencyError`
with the install command.

Bundle files used: the ONNX graphs (``manifest.graphs[...].file``, or a graph's ONNX Runtime
variant) for ONNX Runtime; the portable ONNX graphs for OpenVINO; the engines ``vision.engine``
/ ``head.engine`` with their keys in ``manifest.engines`` for TensorRT;
for PyTorch, the file with role ``torch_model`` (a safetensors state dict of the whole
CopsModel, CLIP included; a ``config.json`` companion may sit beside it), built with the
architecture in ``manifest.model_config``.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, ClassVar

import numpy as np

from cops_deploy.errors import BundleError, ConfigError, CopsError, MissingDependencyError
from cops_deploy.runtime.bundle import Bundle, EngineKey, GraphIO, TensorSpec, ort_variant_role
from cops_deploy.runtime.contract import (
    ANOMALY_MAP,
    GRAPH_IO_NAMES,
    IMAGE,
    IMAGE_EMBEDDING,
    PATCH_EMBEDDING,
    PRED_SCORE,
)

__all__ = [
    "ANOMALY_MAP",
    "GRAPH_IO_NAMES",
    "IMAGE",
    "IMAGE_EMBEDDING",
    "OPENVINO_INSTALL",
    "OPENVINO_PRECISIONS",
    "ORT_INSTALL",
    "PATCH_EMBEDDING",
    "PRED_SCORE",
    "ROLE_TORCH_MODEL",
    "TORCH_INSTALL",
    "TRT_INSTALL",
    "Backend",
    "ORT_VARIANTS",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "TensorRTBackend",
    "TorchBackend",
    "check_graph_names",
    "default_ort_providers",
    "engine_name",
    "expected_engine_key",
    "graph_io",
    "load_torch_model",
    "tensorrt_machine_fields",
]

ROLE_TORCH_MODEL = "torch_model"
TRT_INSTALL = "pip install 'cops-deploy[trt]'"
ORT_INSTALL = "pip install onnxruntime (or 'cops-deploy[gpu]' for onnxruntime-gpu)"
TORCH_INSTALL = "pip install torch"
OPENVINO_INSTALL = "pip install 'cops-deploy[openvino]'"
OPENVINO_PRECISIONS = ("fp32", "bf16")
_CUDA_PROVIDER = "CUDAExecutionProvider"
_CPU_PROVIDER = "CPUExecutionProvider"


def _spec_text(spec: TensorSpec) -> str:
    """'image float32[batch, 3, 518, 518]'."""
    return f"{spec.name} {spec.dtype}[{', '.join(str(d) for d in spec.shape)}]"


def graph_io(bundle: Bundle, graph: str) -> GraphIO:
    """The manifest entry of ``graph`` ('vision' or 'head'); BundleError naming those present."""
    graphs = bundle.manifest.graphs
    if graph not in graphs:
        raise BundleError(
            f"bundle {bundle.root} has no graph {graph!r} in manifest.graphs; graphs present: "
            f"{sorted(graphs)}. Valid: a bundle written by cops-export (graphs 'vision' and "
            f"'head'). Fix: re-export the bundle."
        )
    return graphs[graph]


def check_graph_names(bundle: Bundle, graph: str) -> GraphIO:
    """``graph_io`` plus the contract's tensor names (:data:`GRAPH_IO_NAMES`) for ``graph``."""
    io = graph_io(bundle, graph)
    want_in, want_out = GRAPH_IO_NAMES[graph]
    got_in = tuple(s.name for s in io.inputs)
    got_out = tuple(s.name for s in io.outputs)
    if sorted(got_in) != sorted(want_in) or not set(want_out) <= set(got_out):
        raise BundleError(
            f"bundle {bundle.root}: graph {graph!r} has inputs {list(got_in)} and outputs "
            f"{list(got_out)}; valid: inputs {list(want_in)} and outputs including "
            f"{list(want_out)}. Fix: re-export the bundle with this version's cops-export."
        )
    return io


# ----------------------------------------------------------------------------------------------
# The contract


class Backend(abc.ABC):
    """One graph behind the shared runner contract (see the module docstring).

    Subclasses implement ``_activate``, ``_deactivate`` and ``_infer`` (which receives a feed
    already checked against ``input_metadata`` and returns at least every output name).
    """

    kind: ClassVar[str] = "backend"
    thread_safe: ClassVar[bool] = False  # True: concurrent _infer calls need no lock

    def __init__(
        self, name: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
    ) -> None:
        self.name = name
        self._inputs = {spec.name: spec for spec in inputs}
        self._outputs = tuple(spec.name for spec in outputs)
        self._output_specs = tuple(outputs)
        self._lock = threading.Lock()
        self.is_active = False
        self.last_inference_time: float | None = None

    # -- metadata ------------------------------------------------------------------------------

    @property
    def input_metadata(self) -> Mapping[str, TensorSpec]:
        """Input name -> spec (dtype name; shape with ints for fixed dims, names for dynamic)."""
        return MappingProxyType(self._inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of the outputs ``infer`` returns, in manifest order."""
        return self._outputs

    @property
    def provider(self) -> str:
        """What actually runs the graph (e.g. 'CPUExecutionProvider', a GPU name, 'cpu')."""
        return self.kind

    @property
    def max_batch(self) -> int | None:
        """Largest batch this backend accepts; None when the batch dimension is unbounded."""
        first = next(iter(self._inputs.values()), None)
        if first is not None and first.shape and isinstance(first.shape[0], int):
            return first.shape[0]
        return None

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"{type(self).__name__}(name={self.name!r}, {state})"

    # -- lifecycle -----------------------------------------------------------------------------

    def activate(self) -> None:
        """Load the graph (sessions, engines, device buffers); CopsError if already active."""
        if self.is_active:
            raise CopsError(
                f"backend {self.name!r} ({self.kind}) is already active. Fix: activate it once "
                f"(`with backend:` does it for you), or deactivate() it first."
            )
        self._activate()
        self.is_active = True

    def deactivate(self) -> None:
        """Release everything ``activate`` acquired; a no-op when not active."""
        if not self.is_active:
            return
        try:
            self._deactivate()
        finally:
            self.is_active = False

    def __enter__(self) -> Backend:
        self.activate()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.deactivate()

    # -- inference -----------------------------------------------------------------------------

    def infer(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the graph on ``feed`` (input name -> array); returns output name -> array.

        Raises:
            CopsError: the backend is not active.
            ConfigError: ``feed`` does not match ``input_metadata`` (the message names the
                input, what was given and what is valid).
        """
        if not self.is_active:
            raise CopsError(
                f"backend {self.name!r} ({self.kind}) is not active. Fix: use it as "
                f"`with backend: backend.infer(feed)`, or call activate() first."
            )
        arrays = self.check_feed(feed)
        if self.thread_safe:
            outputs, seconds = self._timed_infer(arrays)
        else:
            with self._lock:
                outputs, seconds = self._timed_infer(arrays)
        self.last_inference_time = seconds
        missing = [n for n in self._outputs if n not in outputs]
        if missing:
            raise BundleError(
                f"backend {self.name!r} ({self.kind}) did not return output(s) {missing} that "
                f"the manifest lists; it returned {sorted(outputs)}. Fix: re-export the bundle."
            )
        return {n: outputs[n] for n in self._outputs}

    def _timed_infer(self, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        start = time.perf_counter()
        outputs = self._infer(feed)
        return outputs, time.perf_counter() - start

    def check_feed(self, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feed`` against ``input_metadata``; returns C-contiguous arrays in order."""
        expected = ", ".join(_spec_text(s) for s in self._inputs.values())
        if not isinstance(feed, Mapping):
            raise ConfigError(
                f"feed for backend {self.name!r} is a {type(feed).__name__}; valid: a dict of "
                f"input name -> numpy array ({expected}). Fix: pass {{name: array}}."
            )
        missing = [n for n in self._inputs if n not in feed]
        unexpected = sorted(str(n) for n in feed if n not in self._inputs)
        if missing or unexpected:
            raise ConfigError(
                f"feed for backend {self.name!r} has missing input(s) {missing} and unexpected "
                f"input(s) {unexpected}; valid inputs: {expected}. Fix: feed exactly those names."
            )
        bound: dict[str, tuple[str, int]] = {}  # dim name -> (input that set it, size)
        out: dict[str, np.ndarray] = {}
        for name, spec in self._inputs.items():
            out[name] = self._check_array(feed[name], spec, bound)
        return out

    def _check_array(
        self, value: Any, spec: TensorSpec, bound: dict[str, tuple[str, int]]
    ) -> np.ndarray:
        what = f"input {spec.name!r} of backend {self.name!r}"
        valid = _spec_text(spec)
        if not isinstance(value, np.ndarray):
            raise ConfigError(
                f"{what} is a {type(value).__name__}; valid: a numpy array {valid}. "
                f"Fix: numpy.asarray(x, dtype=numpy.{spec.dtype})."
            )
        if value.dtype.name != spec.dtype:
            raise ConfigError(
                f"{what} has dtype {value.dtype.name}; valid: {valid}. "
                f"Fix: x.astype(numpy.{spec.dtype})."
            )
        if value.ndim != len(spec.shape):
            raise ConfigError(
                f"{what} has shape {value.shape} (rank {value.ndim}); valid: rank "
                f"{len(spec.shape)}, {valid}. Fix: add or remove the batch axis."
            )
        for axis, (dim, size) in enumerate(zip(spec.shape, value.shape, strict=True)):
            if isinstance(dim, int):
                if size != dim:
                    raise ConfigError(
                        f"{what} has shape {value.shape}: axis {axis} is {size}, valid: {dim} "
                        f"({valid}). Fix: preprocess to the bundle's size."
                    )
                continue
            if size < 1:
                raise ConfigError(
                    f"{what} has shape {value.shape}: axis {axis} ({dim!r}) is {size}; valid: "
                    f">= 1. Fix: feed at least one item."
                )
            other = bound.setdefault(dim, (spec.name, size))
            if other[1] != size:
                raise ConfigError(
                    f"{what} has {dim!r} = {size} (axis {axis}) but input {other[0]!r} has "
                    f"{dim!r} = {other[1]}; valid: equal sizes. Fix: feed arrays of one batch."
                )
        return np.ascontiguousarray(value)

    # -- what subclasses implement -------------------------------------------------------------

    @abc.abstractmethod
    def _activate(self) -> None: ...

    @abc.abstractmethod
    def _deactivate(self) -> None: ...

    @abc.abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def _check_threads(threads: int | None) -> int | None:
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(
            f"invalid threads={threads!r}; valid: None (ONNX Runtime's default: one per core) "
            f"or an integer >= 1. Fix: pass e.g. threads=2."
        )
    return threads


def _check_io_names(
    what: str, path: Path, graph: GraphIO, inputs: Sequence[str], outputs: Sequence[str]
) -> None:
    """The loaded graph must have the manifest's input names and produce its output names."""
    want_in = sorted(s.name for s in graph.inputs)
    want_out = sorted(s.name for s in graph.outputs)
    if sorted(inputs) != want_in or not set(want_out) <= set(outputs):
        raise BundleError(
            f"{what} {path} has inputs {sorted(inputs)} and outputs {sorted(outputs)}, but the "
            f"manifest lists inputs {want_in} and outputs {want_out} (file and manifest "
            f"disagree). Fix: re-export the bundle with cops-export."
        )


# ----------------------------------------------------------------------------------------------
# ONNX Runtime


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


ORT_VARIANTS = ("auto", "portable", "ort")


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
        self.threads = _check_threads(threads)
        self._session: Any = None
        self._provider: str | None = None

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
                f"{available}. Fix: pass providers from that list (CUDA needs onnxruntime-gpu: "
                f"pip install 'cops-deploy[gpu]')."
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
        _check_io_names(
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


# ----------------------------------------------------------------------------------------------
# OpenVINO


def _import_openvino() -> Any:
    try:
        import openvino
    except ImportError as exc:
        raise MissingDependencyError(
            f"the OpenVINO backend needs the 'openvino' package, which is not installed "
            f"({exc}). Fix: {OPENVINO_INSTALL}"
        ) from exc
    return openvino


class OpenVinoBackend(Backend):
    """One bundle graph compiled by OpenVINO for the CPU (the portable ONNX graph, read as is).

    Args:
        bundle: the opened bundle.
        graph: 'vision' or 'head'.
        precision: 'fp32', or 'bf16': OpenVINO's ``INFERENCE_PRECISION_HINT`` runs the matmuls
            and convolutions in bfloat16 on CPUs that have it (AVX512_BF16 or AMX); refused on a
            CPU without (OpenVINO would silently run fp32).
        threads: inference threads; None lets OpenVINO use one per core.
        device: the OpenVINO device (default 'CPU').
    """

    kind = "openvino"
    thread_safe = False  # one InferRequest, reused

    def __init__(
        self,
        bundle: Bundle,
        graph: str,
        precision: str = "fp32",
        threads: int | None = None,
        device: str = "CPU",
    ) -> None:
        self.graph = graph_io(bundle, graph)
        super().__init__(graph, self.graph.inputs, self.graph.outputs)
        if precision not in OPENVINO_PRECISIONS:
            raise ConfigError(
                f"invalid OpenVINO precision {precision!r}; valid: {list(OPENVINO_PRECISIONS)}."
            )
        self.path = bundle.root / self.graph.file
        self.precision = precision
        self.threads = _check_threads(threads)
        self.device = device
        self._compiled: Any = None
        self._request: Any = None

    @property
    def provider(self) -> str:
        return f"openvino {self.device} {self.precision}"

    def _activate(self) -> None:
        ov = _import_openvino()
        core = ov.Core()
        if self.device not in core.available_devices:
            raise ConfigError(
                f"OpenVINO device {self.device!r} is not available here; available: "
                f"{core.available_devices}. Fix: pass device= one of them."
            )
        if self.precision == "bf16":
            caps = core.get_property(self.device, "OPTIMIZATION_CAPABILITIES")
            if "BF16" not in caps:
                raise ConfigError(
                    f"OpenVINO {self.device} has no bfloat16 support on this machine "
                    f"(capabilities {list(caps)}; needs AVX512_BF16 or AMX). Fix: use "
                    f"precision='fp32'."
                )
        config: dict[str, Any] = {
            "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        if self.threads is not None:
            config["INFERENCE_NUM_THREADS"] = self.threads
        try:
            compiled = core.compile_model(core.read_model(str(self.path)), self.device, config)
        except Exception as exc:  # OpenVINO raises RuntimeError and its own types
            raise BundleError(
                f"OpenVINO cannot load graph {self.name!r} from {self.path} "
                f"({type(exc).__name__}: {exc}). Fix: re-export the bundle; check the "
                f"openvino version ({ov.__version__}) reads the graph's opset."
            ) from exc
        _check_io_names(
            "ONNX graph",
            self.path,
            self.graph,
            [i.any_name for i in compiled.inputs],
            [o.any_name for o in compiled.outputs],
        )
        self._compiled = compiled
        self._request = compiled.create_infer_request()

    def _deactivate(self) -> None:
        self._request = None
        self._compiled = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self._request.infer(feed)
        # The request reuses its output buffers: copy before the next call overwrites them.
        return {
            name: np.array(results[self._compiled.output(name)], copy=True)
            for name in self.output_names
        }


# ----------------------------------------------------------------------------------------------
# TensorRT


def _import_tensorrt() -> tuple[Any, Any]:
    """(tensorrt, cuda runtime bindings); MissingDependencyError with the install command."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(
            f"the TensorRT backend needs the 'tensorrt' package (>= 10) and an NVIDIA GPU; "
            f"tensorrt is not installed ({exc}). Fix: {TRT_INSTALL}, or use "
            f"backend='onnxruntime'."
        ) from exc
    major = int(str(tensorrt.__version__).split(".")[0])
    if major < 10:
        raise MissingDependencyError(
            f"the TensorRT backend needs tensorrt >= 10 (set_input_shape, set_tensor_address, "
            f"execute_async_v3); installed: {tensorrt.__version__}. Fix: {TRT_INSTALL}."
        )
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError as exc:
            raise MissingDependencyError(
                f"the TensorRT backend needs 'cuda-python' for device memory and streams; it "
                f"is not installed ({exc}). Fix: {TRT_INSTALL}."
            ) from exc
    return tensorrt, cudart


def _cuda(cudart: Any, result: Any, what: str) -> Any:
    """Unpack a cuda-python ``(err, *values)`` result; CopsError naming the call on failure."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != cudart.cudaError_t.cudaSuccess:
        _, text = cudart.cudaGetErrorString(err)
        raise CopsError(
            f"CUDA call {what} failed: {err!r} ({text.decode(errors='replace')}). Fix: check "
            f"the GPU and driver (nvidia-smi), or use backend='onnxruntime'."
        )
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def tensorrt_machine_fields(device: int = 0) -> dict[str, str]:
    """The machine half of an EngineKey here: TensorRT version, GPU name, compute capability.

    The build side records the same fields the same way (``tensorrt.__version__``, the CUDA
    device name, ``"major.minor"``), so an engine is accepted only where they are equal.
    """
    trt, cudart = _import_tensorrt()
    props = _cuda(
        cudart, cudart.cudaGetDeviceProperties(device), f"cudaGetDeviceProperties({device})"
    )
    name = props.name
    if isinstance(name, bytes | bytearray):
        name = bytes(name).split(b"\x00", 1)[0].decode(errors="replace")
    return {
        "tensorrt_version": str(trt.__version__),
        "gpu_name": str(name).strip(),
        "compute_capability": f"{props.major}.{props.minor}",
    }


def engine_name(graph: str) -> str:
    """Bundle file name of the TensorRT engine of ``graph`` (the exporter's contract)."""
    return f"{graph}.engine"


def expected_engine_key(bundle: Bundle, graph: str, machine: Mapping[str, str]) -> EngineKey:
    """The key the engine of ``graph`` must carry to run here.

    The machine fields come from ``machine`` (see :func:`tensorrt_machine_fields`); precision
    and profile are the engine's own; ``onnx_sha256`` must be the hash of an ONNX graph of this
    bundle for ``graph`` (role ``<graph>_onnx`` or a variant such as ``<graph>_onnx_fp16``), so an
    engine left over from another export is refused.
    """
    name = engine_name(graph)
    if name not in bundle.manifest.engines:
        raise BundleError(
            f"bundle {bundle.root} has no TensorRT engine for graph {graph!r} (expected "
            f"{name!r} in manifest.engines; engines: {sorted(bundle.manifest.engines)}). Fix: "
            f"build engines with `cops-export --engine trt --bundle {bundle.root}`, or use "
            f"backend='onnxruntime'."
        )
    _, stored = bundle.engine_key(name)
    prefix = f"{graph}_onnx"
    shas = {
        e.sha256
        for e in bundle.manifest.files
        if e.role.startswith(prefix) and not e.role.endswith("_data")
    }
    graph_sha = bundle.manifest.file(graph_io(bundle, graph).file).sha256
    onnx_sha = stored.onnx_sha256 if stored.onnx_sha256 in shas else graph_sha
    return EngineKey(
        onnx_sha256=onnx_sha,
        tensorrt_version=machine["tensorrt_version"],
        gpu_name=machine["gpu_name"],
        compute_capability=machine["compute_capability"],
        precision=stored.precision,
        profile=stored.profile,
    )


class TensorRTBackend(Backend):
    """One bundle graph as a TensorRT engine (TensorRT >= 10 API, cuda-python buffers).

    ``activate`` imports tensorrt and cuda-python, checks the engine's key against this machine
    (:meth:`Bundle.check_engine_key`: a mismatch names the field), deserialises the engine and
    creates one execution context and one CUDA stream. ``infer`` sets the input shapes, copies
    inputs into reused device buffers, runs ``execute_async_v3`` and copies outputs back.

    Args:
        bundle: the opened bundle (its manifest lists ``<graph>.engine`` with its key).
        graph: 'vision' or 'head'.
        device: CUDA device index.
    """

    kind = "tensorrt"
    thread_safe = False

    def __init__(self, bundle: Bundle, graph: str, device: int = 0) -> None:
        self.graph = graph_io(bundle, graph)
        super().__init__(graph, self.graph.inputs, self.graph.outputs)
        self.bundle = bundle
        self.device = device
        self.path: Path | None = None
        self._trt: Any = None
        self._cudart: Any = None
        self._engine: Any = None
        self._context: Any = None
        self._runtime: Any = None
        self._stream: Any = None
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        self._gpu = "(inactive)"
        self._max_batch: int | None = None

    @property
    def provider(self) -> str:
        """The GPU the engine runs on (known once active)."""
        return self._gpu

    @property
    def max_batch(self) -> int | None:
        """The batch upper bound of the engine's optimisation profile (known once active)."""
        return self._max_batch if self._max_batch is not None else super().max_batch

    def _activate(self) -> None:
        trt, cudart = _import_tensorrt()
        machine = tensorrt_machine_fields(self.device)
        key = expected_engine_key(self.bundle, self.name, machine)
        path = self.bundle.check_engine_key(key, engine_name(self.name))
        _cuda(cudart, cudart.cudaSetDevice(self.device), f"cudaSetDevice({self.device})")
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BundleError(
                f"TensorRT {trt.__version__} cannot deserialise engine {path} (corrupt, or "
                f"built by another TensorRT). Fix: rebuild it with `cops-export --engine trt "
                f"--bundle {self.bundle.root} --force`, or use backend='onnxruntime'."
            )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        _check_io_names("TensorRT engine", path, self.graph, inputs, outputs)
        context = engine.create_execution_context()
        if context is None:
            raise CopsError(
                f"TensorRT could not create an execution context for {path} (out of GPU "
                f"memory?). Fix: free GPU memory, or use backend='onnxruntime'."
            )
        first = self.graph.inputs[0].name
        self._max_batch = int(engine.get_tensor_profile_shape(first, 0)[2][0])
        self._stream = _cuda(cudart, cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._trt, self._cudart, self._engine, self._context = trt, cudart, engine, context
        self._runtime = runtime
        self.path = path
        self._gpu = machine["gpu_name"]

    def _deactivate(self) -> None:
        cudart = self._cudart
        try:
            for ptr, _ in self._buffers.values():
                _cuda(cudart, cudart.cudaFree(ptr), "cudaFree")
            if self._stream is not None:
                _cuda(cudart, cudart.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
        finally:
            self._buffers.clear()
            self._stream = self._context = self._engine = self._runtime = None

    def _buffer(self, name: str, nbytes: int) -> int:
        """A device buffer of at least ``nbytes`` for ``name`` (grown, never shrunk)."""
        cudart = self._cudart
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                _cuda(cudart, cudart.cudaFree(ptr), "cudaFree")
                del self._buffers[name]
            ptr = int(_cuda(cudart, cudart.cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _set_input(self, name: str, array: np.ndarray) -> None:
        lo, _, hi = (tuple(s) for s in self._engine.get_tensor_profile_shape(name, 0))
        if not all(a <= s <= b for a, s, b in zip(lo, array.shape, hi, strict=True)):
            raise ConfigError(
                f"input {name!r} of TensorRT engine {self.path} has shape {array.shape}; the "
                f"engine's profile accepts {lo} .. {hi}. Fix: split the batch (batch_size<="
                f"{hi[0]}), or rebuild the engine with a larger profile."
            )
        if not self._context.set_input_shape(name, array.shape):
            raise ConfigError(f"TensorRT refused shape {array.shape} for input {name!r}.")
        ptr = self._buffer(name, max(array.nbytes, 1))
        h2d = self._cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        result = self._cudart.cudaMemcpyAsync(
            ptr, array.ctypes.data, array.nbytes, h2d, self._stream
        )
        _cuda(self._cudart, result, f"cudaMemcpyAsync({name} to device)")
        self._context.set_tensor_address(name, ptr)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self._trt, self._cudart
        for name, array in feed.items():
            self._set_input(name, array)
        host: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            host[name] = np.empty(shape, dtype=dtype)
            ptr = self._buffer(name, max(host[name].nbytes, 1))
            self._context.set_tensor_address(name, ptr)
        if not self._context.execute_async_v3(int(self._stream)):
            raise CopsError(
                f"TensorRT execute_async_v3 failed for graph {self.name!r} ({self.path}); see "
                f"the TensorRT log above. Fix: rebuild the engine, or use backend='onnxruntime'."
            )
        d2h = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, array in host.items():
            ptr = self._buffers[name][0]
            result = cudart.cudaMemcpyAsync(array.ctypes.data, ptr, array.nbytes, d2h, self._stream)
            _cuda(cudart, result, f"cudaMemcpyAsync({name} to host)")
        _cuda(cudart, cudart.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        return host


# ----------------------------------------------------------------------------------------------
# PyTorch


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(
            f"the torch backend needs PyTorch, which is not installed ({exc}). Fix: "
            f"{TORCH_INSTALL}, or use backend='onnxruntime' (no PyTorch needed)."
        ) from exc
    return torch


def load_torch_model(bundle: Bundle, device: str = "cpu") -> Any:
    """The PyTorch CopsModel of a bundle: config from the manifest, weights from the file with
    role ``torch_model`` (a safetensors state dict with every tensor, CLIP included).

    Raises:
        BundleError: the bundle has no ``torch_model`` file, or its model config is invalid.
        WeightsError: the weights do not fit the architecture.
        MissingDependencyError: PyTorch is not installed.
    """
    entries = bundle.manifest.with_role(ROLE_TORCH_MODEL)
    if not entries:
        raise BundleError(
            f"bundle {bundle.root} has no PyTorch weights (no file with role "
            f"{ROLE_TORCH_MODEL!r}); the torch backend needs them, the ONNX graphs are not "
            f"enough. Fix: re-export the bundle with its PyTorch weights included, or open it "
            f"with backend='onnxruntime' or 'tensorrt'."
        )
    _import_torch()
    from safetensors.torch import load_file

    from cops_deploy.configs import config_from_dict
    from cops_deploy.errors import WeightsError
    from cops_deploy.model.factory import create_model
    from cops_deploy.model.weights import check_state_dict

    try:
        cfg = config_from_dict(bundle.manifest.model_config)
    except ConfigError as exc:
        raise BundleError(
            f"bundle {bundle.root}: manifest.model_config is not a valid CoPS config ({exc}). "
            f"Fix: re-export the bundle."
        ) from exc
    path = bundle.root / entries[0].path
    try:
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises SafetensorError / OSError
        raise WeightsError(f"cannot read PyTorch weights {path}: {exc}") from exc
    model = create_model(cfg, seed=None)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, f"bundle weights {path}")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


def _torch_head(model: Any, image_embedding: Any, patch_embedding: Any, size: int) -> Any:
    """CopsModel after ``encode_image``: (pred_score, anomaly_map)."""
    return tuple(model.forward_head(image_embedding, patch_embedding, size))


class TorchBackend(Backend):
    """One bundle graph run by the PyTorch CopsModel (weights: the bundle's ``torch_model``).

    ``activate`` imports torch and loads the model, unless ``model`` is given (the detector
    loads it once and shares it between the vision and the head backend).

    Args:
        bundle: the opened bundle.
        graph: 'vision' (``model.encode_image``) or 'head' (the rest of the forward pass).
        device: torch device string.
        model: an already loaded CopsModel to use instead of loading one.
    """

    kind = "torch"
    thread_safe = False

    def __init__(self, bundle: Bundle, graph: str, device: str = "cpu", model: Any = None) -> None:
        if graph not in ("vision", "head"):
            raise ConfigError(
                f"TorchBackend graph {graph!r} is unknown; valid: 'vision' or 'head'. "
                f"Fix: pass one of those."
            )
        self.graph = check_graph_names(bundle, graph)
        super().__init__(graph, self.graph.inputs, self.graph.outputs)
        self.bundle = bundle
        self.device = device
        self.model = model
        self._owns_model = model is None
        self._torch: Any = None

    @property
    def provider(self) -> str:
        """The torch device."""
        return self.device

    def _activate(self) -> None:
        self._torch = _import_torch()
        if self.model is None:
            self.model = load_torch_model(self.bundle, self.device)

    def _deactivate(self) -> None:
        if self._owns_model:
            self.model = None
        self._torch = None

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            x = {k: torch.from_numpy(v).to(self.device) for k, v in feed.items()}
            if self.name == "vision":
                results = self.model.encode_image(x[IMAGE])
            else:
                size = self.bundle.manifest.preprocess.size
                results = _torch_head(self.model, x[IMAGE_EMBEDDING], x[PATCH_EMBEDDING], size)
            arrays = [r.detach().float().cpu().numpy() for r in results]
        _, names = GRAPH_IO_NAMES[self.name]
        return dict(zip(names, arrays, strict=True))
