"""Shared fixtures: the golden reference vectors and tiny seeded models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.append(_HERE)  # for golden_support; appended: tests/ holds packages like "data"

from golden_support import golden_dir  # noqa: E402


@pytest.fixture(scope="session")
def golden() -> Path:
    path = golden_dir()
    if not (path / "cases.npz").is_file():
        pytest.fail(f"golden vectors not found at {path}; set COPS_GOLDEN to their folder")
    return path


@pytest.fixture(scope="session")
def tiny_model():
    """A random-initialised cops-tiny in eval mode (seeded)."""
    from cops_deploy import create_model

    return create_model("cops-tiny", seed=0)
