"""Which extra of cops-deploy brings which optional package: every install hint comes from here.

The base install is the torch-free run side. ``[cpu]`` or ``[gpu]`` adds ONNX Runtime (never
both: they provide the same module), ``[openvino]`` and ``[trt]`` the other backends, ``[build]``
PyTorch and everything that needs it (training, evaluation, export, the demo, prediction from
PyTorch weights, the torch backend), ``[triton]``, ``[serve]`` and ``[bench]`` the rest.
"""

from __future__ import annotations

import importlib.util

from cops_deploy.errors import ConfigError, MissingDependencyError

__all__ = [
    "BUILD_INSTALL",
    "EXTRAS",
    "ORT_INSTALL",
    "install_command",
    "missing_build_packages",
    "require_build",
]

# extra -> what it adds (the names match [project.optional-dependencies] in pyproject.toml)
EXTRAS: dict[str, str] = {
    "cpu": "ONNX Runtime for the CPU (onnxruntime)",
    "gpu": "ONNX Runtime with CUDA (onnxruntime-gpu; never together with [cpu])",
    "openvino": "the OpenVINO backend",
    "trt": "the TensorRT backend and engine builds (tensorrt, cuda-python)",
    "build": "PyTorch, open_clip, ONNX export tools, SciPy: train, eval, export, demo",
    "triton": "Triton model repositories and client (tritonclient)",
    "serve": "the HTTP edge service in export/python (FastAPI, uvicorn)",
    "bench": "the benchmark suite's charts (matplotlib)",
    "dev": "everything above but [gpu] and [trt], plus the test tools",
}
# Packages without which the build side cannot run (import names).
_BUILD_MODULES: tuple[str, ...] = (
    "torch",
    "torchvision",
    "open_clip",
    "onnx",
    "scipy",
    "safetensors",
)


def install_command(*extras: str) -> str:
    """``pip install 'cops-deploy[a,b]'`` for the given extras (each must be a known extra)."""
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown or not extras:
        raise ConfigError(
            f"unknown cops-deploy extra(s) {unknown or list(extras)}; valid: {sorted(EXTRAS)}."
        )
    return f"pip install 'cops-deploy[{','.join(extras)}]'"


BUILD_INSTALL = install_command("build", "cpu")
ORT_INSTALL = f"{install_command('cpu')} (or {install_command('gpu')} for CUDA; never both)"


def missing_build_packages() -> list[str]:
    """The build side's packages that are not installed here (found without importing them)."""
    return [m for m in _BUILD_MODULES if importlib.util.find_spec(m) is None]


def require_build(what: str) -> None:
    """Refuse ``what`` (e.g. "cops train") up front when the build side is not installed.

    Raises:
        MissingDependencyError: one line naming the missing packages and the extra to install.
    """
    missing = missing_build_packages()
    if missing:
        raise MissingDependencyError(
            f"{what} needs the build side of cops-deploy (PyTorch and the export tools), which "
            f"this installation leaves out (missing: {', '.join(missing)}). Fix: {BUILD_INSTALL}"
        )
