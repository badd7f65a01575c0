"""TensorRT backend: one bundle graph as a TensorRT engine (TensorRT >= 10, cuda-python buffers).

Also the one place both sides read TensorRT from: :func:`import_tensorrt` (the build side's
engine builder uses it too), the machine half of an engine key
(:func:`tensorrt_machine_fields`), the key an engine must carry to run here
(:func:`expected_engine_key`) and the refusal of a mismatched engine (:func:`check_engine_key`,
whose message names the field). Engines are tied to the ONNX graph's sha256, the TensorRT
version, the GPU name and compute capability, the precision and the optimisation profile.

Bundle files used: the engines ``vision.engine`` / ``head.engine`` with their keys in
``manifest.engines``, and the hashes of the bundle's ONNX graphs. One execution context, one
CUDA stream and reused device buffers per backend, so ``infer`` calls are serialised.
``tensorrt`` and ``cuda-python`` are imported by ``activate()`` only.

CUDA's current device is per host thread, so every call that touches device memory (activate,
infer, deactivate) selects the backend's device first: ``infer`` from another thread still runs
on device N. TensorRT keeps the first logger it is given for the whole process, so both sides
share one (:func:`tensorrt_logger`). Streams reach TensorRT as their native handle
(:func:`cuda_native_handle`; ``int(stream)`` is deprecated in cuda-bindings 13).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cops_deploy.errors import BundleError, ConfigError, CopsError, MissingDependencyError
from cops_deploy.extras import install_command
from cops_deploy.runtime.backends.base import Backend, activate_pair, check_io_names, graph_io
from cops_deploy.runtime.bundle import Bundle
from cops_deploy.runtime.manifest import EngineKey, check_engine_key

__all__ = [
    "MIN_TRT_MAJOR",
    "TRT_INSTALL",
    "TensorRTBackend",
    "check_engine_key",
    "cuda_native_handle",
    "engine_name",
    "expected_engine_key",
    "import_cudart",
    "import_tensorrt",
    "set_cuda_device",
    "tensorrt_logger",
    "tensorrt_machine_fields",
]

TRT_INSTALL = install_command("trt")
MIN_TRT_MAJOR = 10


# ----------------------------------------------------------------------------------------------
# Imports, machine fields and engine keys (shared with the build side)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module (>= 10); MissingDependencyError with the install command if not."""
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(
            f"TensorRT needs the 'tensorrt' package (>= {MIN_TRT_MAJOR}) and an NVIDIA GPU; "
            f"tensorrt is not importable here ({exc}). Fix: {TRT_INSTALL} on a machine with an "
            f"NVIDIA GPU; elsewhere run bundles with backend='onnxruntime' and export with "
            f"--engine onnx."
        ) from exc
    version = str(tensorrt.__version__)
    if int(version.split(".")[0]) < MIN_TRT_MAJOR:
        raise MissingDependencyError(
            f"tensorrt {version} is too old; valid: tensorrt >= {MIN_TRT_MAJOR} (strongly typed "
            f"networks, set_input_shape, set_tensor_address, execute_async_v3); installed: "
            f"{version}. Fix: {TRT_INSTALL}."
        )
    return tensorrt


def import_cudart() -> Any:
    """cuda-python's CUDA runtime bindings; MissingDependencyError with the install command."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart  # cuda-python < 12.6 keeps the old module name
        except ImportError as exc:
            raise MissingDependencyError(
                f"TensorRT engines need 'cuda-python' for device memory and streams; it is not "
                f"installed ({exc}). Fix: {TRT_INSTALL}."
            ) from exc
    return cudart


# TensorRT uses the first logger it is given for the whole process (later ones are ignored), so
# there is exactly one per tensorrt module; its level is set through ``min_severity``.
_LOGGER: tuple[Any, Any] | None = None  # (tensorrt module, its logger)


def tensorrt_logger(verbose: bool = False) -> Any:
    """The process's one ``tensorrt.Logger``, set to VERBOSE or WARNING level."""
    global _LOGGER
    trt = import_tensorrt()
    level = trt.Logger.VERBOSE if verbose else trt.Logger.WARNING
    if _LOGGER is None or _LOGGER[0] is not trt:
        _LOGGER = (trt, trt.Logger(level))
    logger = _LOGGER[1]
    logger.min_severity = level
    return logger


def cuda_native_handle(obj: Any) -> int:
    """The native handle (address) of a cuda-python object such as a ``cudaStream_t``.

    cuda-bindings >= 12.9 provide ``cuda.bindings.utils.get_cuda_native_handle`` (``int(obj)`` is
    deprecated from 13 on); older cuda-python, which has no accessor, documents ``int(obj)``.
    """
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(obj)
    return int(get_cuda_native_handle(obj))


def set_cuda_device(device: int) -> None:
    """Make CUDA device ``device`` current in the calling thread (CUDA's current device is per
    thread); CopsError naming the device when CUDA refuses it."""
    cudart = import_cudart()
    _cuda(cudart, cudart.cudaSetDevice(device), f"cudaSetDevice({device})")


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

    The build side keys the engines it builds with this same function, so an engine is
    accepted only where the fields are equal.
    """
    trt, cudart = import_tensorrt(), import_cudart()
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


# ----------------------------------------------------------------------------------------------
# The backend


class TensorRTBackend(Backend):
    """One bundle graph as a TensorRT engine (TensorRT >= 10 API, cuda-python buffers).

    ``activate`` imports tensorrt and cuda-python, checks the engine's key against this machine
    (:func:`check_engine_key`: a mismatch names the field), deserialises the engine and creates
    one execution context and one CUDA stream. ``infer`` sets the input shapes, copies inputs
    into reused device buffers, runs ``execute_async_v3`` and copies outputs back.

    Args:
        bundle: the opened bundle (its manifest lists ``<graph>.engine`` with its key).
        graph: 'vision' or 'head'.
        device: CUDA device index.
    """

    kind = "tensorrt"
    thread_safe = False
    required_modules = ("tensorrt",)
    install_hint = TRT_INSTALL

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

    @classmethod
    def unavailable_reason(cls, bundle: Bundle) -> str | None:
        """tensorrt missing, or the bundle has no engine for a graph; None otherwise."""
        reason = super().unavailable_reason(bundle)
        if reason is not None:
            return reason
        missing = [engine_name(g) for g in ("vision", "head")]
        missing = [n for n in missing if n not in bundle.manifest.engines]
        if missing:
            return f"the bundle has no TensorRT engine(s) {missing}"
        return None

    @classmethod
    def open_pair(
        cls, bundle: Bundle, *, threads: int | None = None, precision: str = "fp32"
    ) -> tuple[Backend, Backend]:
        """Both engines on CUDA device 0 (their precision is the engines' own; ``threads`` is
        not used)."""
        return activate_pair(cls(bundle, "vision"), lambda _: cls(bundle, "head"))

    @property
    def provider(self) -> str:
        """The GPU the engine runs on (known once active)."""
        return self._gpu

    @property
    def max_batch(self) -> int | None:
        """The batch upper bound of the engine's optimisation profile (known once active)."""
        return self._max_batch if self._max_batch is not None else super().max_batch

    def _activate(self) -> None:
        trt, cudart = import_tensorrt(), import_cudart()
        machine = tensorrt_machine_fields(self.device)
        key = expected_engine_key(self.bundle, self.name, machine)
        path = self.bundle.check_engine_key(key, engine_name(self.name))
        set_cuda_device(self.device)
        runtime = trt.Runtime(tensorrt_logger())
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
        check_io_names("TensorRT engine", path, self.graph, inputs, outputs)
        for spec in (*self.graph.inputs, *self.graph.outputs):
            got = np.dtype(trt.nptype(engine.get_tensor_dtype(spec.name))).name
            if got != spec.dtype:
                raise BundleError(
                    f"TensorRT engine {path} has tensor {spec.name!r} as {got}; the bundle's "
                    f"{self.name} graph declares {spec.dtype}. Fix: rebuild the engine from the "
                    f"bundle's ONNX graph (`cops-export --engine trt --bundle {self.bundle.root} "
                    f"--force`), or use backend='onnxruntime'."
                )
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
            if self._buffers or self._stream is not None:
                set_cuda_device(self.device)  # free on the device they live on
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

    def _set_address(self, name: str, ptr: int) -> None:
        if not self._context.set_tensor_address(name, ptr):
            raise CopsError(
                f"TensorRT refused the device address of tensor {name!r} of engine {self.path} "
                f"(set_tensor_address returned False: misaligned or unknown name). Fix: "
                f"rebuild the engine, or use backend='onnxruntime'."
            )

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
        self._set_address(name, ptr)

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        trt, cudart = self._trt, self._cudart
        set_cuda_device(self.device)  # the current device is per thread: infer may be another
        for name, array in feed.items():
            self._set_input(name, array)
        host: dict[str, np.ndarray] = {}
        for name in self.output_names:
            shape = tuple(self._context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            host[name] = np.empty(shape, dtype=dtype)
            ptr = self._buffer(name, max(host[name].nbytes, 1))
            self._set_address(name, ptr)
        if not self._context.execute_async_v3(cuda_native_handle(self._stream)):
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
