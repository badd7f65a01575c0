"""OpenVINO backend: one bundle graph compiled by OpenVINO for the CPU, fp32 or bfloat16.

Bundle files used: the portable ONNX graphs (``manifest.graphs[...].file``), read as they are.
One infer request per backend, so ``infer`` calls are serialised. ``openvino`` is imported by
``activate()`` only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cops_deploy.errors import BundleError, ConfigError, MissingDependencyError
from cops_deploy.extras import install_command
from cops_deploy.runtime.backends.base import (
    Backend,
    activate_pair,
    check_io_names,
    check_threads,
    graph_io,
)
from cops_deploy.runtime.bundle import Bundle

__all__ = ["OPENVINO_INSTALL", "OPENVINO_PRECISIONS", "OpenVinoBackend"]

OPENVINO_INSTALL = install_command("openvino")
OPENVINO_PRECISIONS = ("fp32", "bf16")


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
    precisions = OPENVINO_PRECISIONS
    required_modules = ("openvino",)
    install_hint = OPENVINO_INSTALL

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
        self.threads = check_threads(threads)
        self.device = device
        self._compiled: Any = None
        self._request: Any = None

    @classmethod
    def open_pair(
        cls, bundle: Bundle, *, threads: int | None = None, precision: str = "fp32"
    ) -> tuple[Backend, Backend]:
        """The vision graph in ``precision`` and the head in fp32, on the CPU."""
        return activate_pair(
            cls(bundle, "vision", precision=precision, threads=threads),
            lambda _: cls(bundle, "head", threads=threads),
        )

    @property
    def provider(self) -> str:
        """'openvino <device> <precision>'."""
        return f"openvino {self.device} {self.precision}"

    @property
    def inference_precision(self) -> str | None:
        """The precision OpenVINO compiled the graph's matmuls for, read back from the compiled
        model's INFERENCE_PRECISION_HINT ('bf16', 'f32'); None while inactive. The proof that
        precision='bf16' really runs bfloat16 (the benchmark suite checks it)."""
        if self._compiled is None:
            return None
        return self._compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # an ov.Type

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
        check_io_names(
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
