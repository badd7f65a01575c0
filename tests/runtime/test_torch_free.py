"""The run side never imports torch nor the build wing (cops_deploy.model, train, data, evaluate,
export): checked in a fresh interpreter, after importing every run-side module and after a
prediction (auto selection never loads the torch plug-in when ONNX Runtime can run)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

RUN_SIDE = (
    "cops_deploy.runtime",
    "cops_deploy.runtime.detector",
    "cops_deploy.runtime.backends",
    "cops_deploy.cli.predict_bundle",
)
BUILD_WING = ("model", "train", "data", "evaluate", "export")

# Prints {"torch": [...], "build": [...]}: the torch and build-wing modules loaded so far.
_REPORT = f"""
def _loaded():
    build = tuple("cops_deploy." + name for name in {BUILD_WING!r})
    return {{
        "torch": sorted(
            m for m in sys.modules if m == "torch" or m.startswith(("torch.", "safetensors.torch"))
        ),
        "build": sorted(m for m in sys.modules if m.startswith(build)),
    }}
"""


def _run(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _REPORT + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_run_side_leaves_torch_and_the_build_wing_out() -> None:
    result = _run(
        f"""
        import importlib, json, pkgutil, sys
        import cops_deploy.runtime
        names = list({RUN_SIDE!r})
        for pkg in ("cops_deploy.runtime", "cops_deploy.runtime.backends", "cops_deploy.imaging"):
            path = importlib.import_module(pkg).__path__
            names += [pkg + "." + m.name for m in pkgutil.iter_modules(path)]
        for name in names:
            importlib.import_module(name)
        from cops_deploy.runtime.backends import backend_names
        assert "torch" in backend_names()  # listed from its entry point, not imported
        print(json.dumps({{**_loaded(), "imported": len(names)}}))
        """
    )
    assert result["imported"] > len(RUN_SIDE) + 5  # the walk found the backend modules
    assert result["torch"] == []
    assert result["build"] == []


def test_predicting_with_onnxruntime_leaves_torch_and_the_build_wing_out(
    tiny_bundle: Path,
) -> None:
    result = _run(
        f"""
        import json, sys
        import numpy as np
        from cops_deploy.runtime.detector import Detector
        with Detector.open({str(tiny_bundle)!r}) as d:
            image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
            pred = d.predict(image, original_size=True)[0]
            backend = d.backend_name
        print(json.dumps({{**_loaded(), "backend": backend, "score": pred.score}}))
        """
    )
    assert result["backend"] == "onnxruntime"
    assert 0.0 <= result["score"] <= 1.0
    assert result["torch"] == []
    assert result["build"] == []
