"""The reference implementation's golden outputs (../shared/golden): where they are, and the
cops-tiny model built from their weights through the real loaders. Used by tests/ and by
benchmarks/test_reference_eager.py."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

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


def golden_model(golden: Path) -> tuple[Any, Any]:
    """(cops-tiny with the golden CLIP and CoPS weights and head settings, cases.npz)."""
    from cops_deploy import create_model

    head = json.loads((golden / "case.json").read_text())["head"]
    model = create_model(
        "cops-tiny",
        clip_weights=golden / "clip_tiny_openai_layout.pt",
        cops_weights=golden / "cops_tiny_reference_format.pth",
        alpha=head["alpha"],
        beta=head["beta"],
        tau=head["tau"],
        sigma=float(head["sigma"]),
        neighbour_kernel=head["neighbour_kernel"],
        samples=head["R"],
    )
    return model, np.load(golden / "cases.npz")


def anomalyclip_golden_model(golden: Path, **overrides: Any) -> tuple[Any, Any]:
    """(anomalyclip-tiny with the AnomalyCLIP golden's CLIP file and reference checkpoint,
    loaded through the real loaders, and its cases.npz); ``golden`` is the golden root."""
    from cops_deploy import create_model

    folder = golden / "anomalyclip"
    model = create_model(
        "anomalyclip-tiny",
        clip_weights=folder / "clip_tiny_openai_layout.pt",
        cops_weights=folder / "anomalyclip_tiny_reference_format.pth",
        **overrides,
    )
    return model, np.load(folder / "cases.npz")
