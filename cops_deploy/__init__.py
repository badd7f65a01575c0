"""cops-deploy: CoPS zero-shot anomaly detection, from a faithful PyTorch model to deployment.

The package root stays torch-free so that ``import cops_deploy.runtime`` works on an edge
machine without PyTorch: the model-building entry points are resolved lazily.
"""

from __future__ import annotations

from typing import Any

from cops_deploy.version import __version__

__all__ = ["__version__", "create_model", "list_models", "load_model", "save_model"]


def list_models() -> list[str]:
    """Names of the registered CoPS architectures (JSON files in ``cops_deploy/configs``)."""
    from cops_deploy.configs import list_configs

    return list_configs()


def __getattr__(name: str) -> Any:
    if name in ("create_model", "load_model", "save_model"):
        from cops_deploy.model import factory

        return getattr(factory, name)
    raise AttributeError(f"module 'cops_deploy' has no attribute {name!r}")
