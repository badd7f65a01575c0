"""The run side never imports torch: checked in a fresh interpreter, imports and a prediction."""

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


def _run(code: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_importing_the_run_side_leaves_torch_out() -> None:
    result = _run(
        f"""
        import importlib, json, sys
        for name in {RUN_SIDE!r}:
            importlib.import_module(name)
        print(json.dumps({{"torch": sorted(m for m in sys.modules if m.split(".")[0] == "torch")}}))
        """
    )
    assert result["torch"] == []


def test_predicting_with_onnxruntime_leaves_torch_out(tiny_bundle: Path) -> None:
    result = _run(
        f"""
        import json, sys
        import numpy as np
        from cops_deploy.runtime.detector import Detector
        with Detector.open({str(tiny_bundle)!r}) as d:
            image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
            pred = d.predict(image, original_size=True)[0]
            backend = d.backend_name
        print(json.dumps({{"backend": backend, "score": pred.score, "torch": "torch" in sys.modules}}))
        """
    )
    assert result["backend"] == "onnxruntime"
    assert 0.0 <= result["score"] <= 1.0
    assert result["torch"] is False
