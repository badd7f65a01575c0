"""The PyTorch backend: a bundle's graphs run by the PyTorch CopsModel, as a backend plug-in.

It lives on the build side (it needs the model) and registers itself with the run side through
the entry point ``torch`` of the group ``cops_deploy.backends`` (see pyproject.toml), so
``Detector.open(bundle, backend="torch")`` and auto selection reach it while
``cops_deploy.runtime`` never imports torch or the model. Importing this module imports
neither either: torch, safetensors and the model are imported on activation, so auto selection
can ask :meth:`TorchBackend.unavailable_reason` cheaply.

Bundle file used: the file with role ``torch_model`` (a safetensors state dict of the whole
CopsModel, CLIP included), built with the architecture in ``manifest.model_config``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from cops_deploy.errors import BundleError, ConfigError, MissingDependencyError, WeightsError
from cops_deploy.extras import BUILD_INSTALL
from cops_deploy.runtime.backends import Backend, activate_pair, check_graph_names
from cops_deploy.runtime.bundle import Bundle
from cops_deploy.runtime.contract import GRAPH_IO_NAMES, IMAGE, IMAGE_EMBEDDING, PATCH_EMBEDDING

__all__ = ["ROLE_TORCH_MODEL", "TORCH_INSTALL", "TorchBackend", "load_torch_model"]

ROLE_TORCH_MODEL = "torch_model"
TORCH_INSTALL = BUILD_INSTALL


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependencyError(
            f"the torch backend needs PyTorch, which is not installed ({exc}). Fix: "
            f"{TORCH_INSTALL}, or use backend='onnxruntime' (no PyTorch needed)."
        ) from exc
    return torch


def _check_weights(bundle: Bundle) -> None:
    if not bundle.manifest.with_role(ROLE_TORCH_MODEL):
        raise BundleError(
            f"bundle {bundle.root} has no PyTorch weights (no file with role "
            f"{ROLE_TORCH_MODEL!r}); the torch backend needs them, the ONNX graphs are not "
            f"enough. Fix: re-export the bundle with its PyTorch weights included, or open it "
            f"with backend='onnxruntime' or 'tensorrt'."
        )


def load_torch_model(bundle: Bundle, device: str = "cpu") -> Any:
    """The PyTorch CopsModel of a bundle: config from the manifest, weights from the file with
    role ``torch_model`` (a safetensors state dict with every tensor, CLIP included).

    Raises:
        BundleError: the bundle has no ``torch_model`` file, or its model config is invalid.
        WeightsError: the weights cannot be read or do not fit the architecture.
        MissingDependencyError: PyTorch is not installed.
    """
    _check_weights(bundle)
    _import_torch()
    # Imported here, after the checks above: importing this module stays torch-free.
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cops_deploy.configs import config_from_dict
    from cops_deploy.model.factory import create_model
    from cops_deploy.model.weights import check_state_dict

    try:
        cfg = config_from_dict(bundle.manifest.model_config)
    except ConfigError as exc:
        raise BundleError(
            f"bundle {bundle.root}: manifest.model_config is not a valid CoPS config ({exc}). "
            f"Fix: re-export the bundle."
        ) from exc
    path = bundle.root / bundle.manifest.with_role(ROLE_TORCH_MODEL)[0].path
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise WeightsError(
            f"cannot read PyTorch weights {path}: {exc}. Fix: re-export the bundle (or open it "
            f"with backend='onnxruntime')."
        ) from exc
    model = create_model(cfg, seed=None)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_state_dict(expected, state, f"bundle weights {path}")
    model.load_state_dict(state, strict=True)
    return model.eval().to(device)


class TorchBackend(Backend):
    """One bundle graph run by the PyTorch CopsModel (weights: the bundle's ``torch_model``).

    ``activate`` imports torch and loads the model, unless ``model`` is given (``open_pair``
    loads it once and shares it between the vision and the head backend).

    Args:
        bundle: the opened bundle.
        graph: 'vision' (``model.encode_image``) or 'head' (the rest of the forward pass).
        device: torch device string.
        model: an already loaded CopsModel to use instead of loading one.
    """

    kind = "torch"
    thread_safe = False
    required_modules = ("torch",)
    install_hint = TORCH_INSTALL

    def __init__(self, bundle: Bundle, graph: str, device: str = "cpu", model: Any = None) -> None:
        if graph not in GRAPH_IO_NAMES:
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

    @classmethod
    def unavailable_reason(cls, bundle: Bundle) -> str | None:
        """The bundle has no PyTorch weights, or torch is not installed; None otherwise."""
        if not bundle.manifest.with_role(ROLE_TORCH_MODEL):
            return f"the bundle has no PyTorch weights (role {ROLE_TORCH_MODEL!r})"
        return super().unavailable_reason(bundle)

    @classmethod
    def open_pair(
        cls, bundle: Bundle, *, threads: int | None = None, precision: str = "fp32"
    ) -> tuple[Backend, Backend]:
        """Both graphs on the CPU, sharing one model (``threads`` is not used)."""
        return activate_pair(
            cls(bundle, "vision"),
            lambda vision: cls(bundle, "head", model=vision.model),  # type: ignore[attr-defined]
        )

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
                results = self.model.forward_head(x[IMAGE_EMBEDDING], x[PATCH_EMBEDDING], size)
            arrays = [r.detach().float().cpu().numpy() for r in results]
        _, names = GRAPH_IO_NAMES[self.name]
        return dict(zip(names, arrays, strict=True))
