"""Inference backends for the two bundle graphs, behind one contract and a registry.

- :mod:`.base`: the contract every backend follows (:class:`Backend`: context-managed,
  ``input_metadata``, feed checked once, ``{name: array}`` outputs, timing).
- :mod:`.onnxruntime`, :mod:`.openvino`, :mod:`.tensorrt`: the built-in backends, one module
  each (TensorRT's module also holds the CUDA helpers and the engine keys).
- :mod:`.registry`: the built-ins in auto order (TensorRT, ONNX Runtime, OpenVINO), then the
  plug-ins of the entry-point group ``cops_deploy.backends`` (the PyTorch backend registers
  itself there from the build side); :func:`open_backends` opens a bundle on one of them.

To add a backend: subclass :class:`Backend` (``_activate``, ``_deactivate``, ``_infer``,
``open_pair``; ``unavailable_reason`` when it needs more than its packages) and declare it as
an entry point of that group. Every backend package is imported on activation only, so this
package imports neither torch nor any backend's runtime.
"""

from __future__ import annotations

from cops_deploy.runtime.backends.base import (
    Backend,
    activate_pair,
    check_graph_names,
    check_io_names,
    check_threads,
    graph_io,
)
from cops_deploy.runtime.backends.onnxruntime import (
    ORT_INSTALL,
    ORT_VARIANTS,
    OnnxRuntimeBackend,
    default_ort_providers,
)
from cops_deploy.runtime.backends.openvino import (
    OPENVINO_INSTALL,
    OPENVINO_PRECISIONS,
    OpenVinoBackend,
)
from cops_deploy.runtime.backends.registry import (
    AUTO,
    ENTRY_POINT_GROUP,
    REGISTRY,
    BackendRegistry,
    backend_names,
    check_backend_choice,
    get_backend,
    open_backends,
    register_backend,
)
from cops_deploy.runtime.backends.tensorrt import (
    TRT_INSTALL,
    TensorRTBackend,
    check_engine_key,
    engine_name,
    expected_engine_key,
    import_cudart,
    import_tensorrt,
    tensorrt_machine_fields,
)

__all__ = [
    "AUTO",
    "ENTRY_POINT_GROUP",
    "OPENVINO_INSTALL",
    "OPENVINO_PRECISIONS",
    "ORT_INSTALL",
    "ORT_VARIANTS",
    "REGISTRY",
    "TRT_INSTALL",
    "Backend",
    "BackendRegistry",
    "OnnxRuntimeBackend",
    "OpenVinoBackend",
    "TensorRTBackend",
    "activate_pair",
    "backend_names",
    "check_backend_choice",
    "check_engine_key",
    "check_graph_names",
    "check_io_names",
    "check_threads",
    "default_ort_providers",
    "engine_name",
    "expected_engine_key",
    "get_backend",
    "graph_io",
    "import_cudart",
    "import_tensorrt",
    "open_backends",
    "register_backend",
    "tensorrt_machine_fields",
]
