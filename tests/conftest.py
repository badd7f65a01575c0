"""Shared fixtures: the golden reference vectors and tiny seeded models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def golden_dir() -> Path:
    """../shared/golden beside the checkout (COPS_GOLDEN overrides)."""
    env = os.environ.get("COPS_GOLDEN")
    if env:
        return Path(env)
    for base in (REPO.parent / "shared", REPO / "shared"):
        if (base / "golden").is_dir():
            return base / "golden"
    return REPO.parent / "shared" / "golden"


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
