"""Cold start of a deployed Detector, measured in this fresh process (an edge service restart).

    python benchmarks/cold_start.py BUNDLE --backend onnxruntime [--precision bf16]
        [--warmup] [--repeats 5] [--threads N]

Prints one JSON object: ``open_s`` (``Detector.open``, bundle verification included), ``first_s``
(the first ``predict`` of one camera-sized image), ``steady_s`` (the median of ``repeats``
further predicts) and their ratio. Torch-free, as a deployed service is: the benchmark suite
runs it in a subprocess so neither torch nor an earlier session of the same graph warms
anything up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

FRAME_HW = (480, 640)  # a camera frame: preprocessing resizes it to the bundle's size


def cold_start(
    bundle: Path,
    backend: str,
    precision: str = "fp32",
    warmup: bool = False,
    repeats: int = 5,
    threads: int | None = None,
) -> dict[str, Any]:
    """Open ``bundle`` and predict one frame ``repeats + 1`` times; the figures in seconds."""
    from cops_deploy.runtime import Detector

    frame = np.random.default_rng(0).integers(0, 256, (*FRAME_HW, 3), dtype=np.uint8)
    start = time.perf_counter()
    detector = Detector.open(
        bundle, backend=backend, precision=precision, threads=threads, warmup=warmup
    )
    open_s = time.perf_counter() - start
    with detector:
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            detector.predict(frame)
            times.append(time.perf_counter() - start)
    steady = statistics.median(times[1:])
    return {
        "backend": detector.backend_name,
        "provider": detector.provider,
        "warmup": warmup,
        "open_s": open_s,
        "first_s": times[0],
        "steady_s": steady,
        "first_over_steady": times[0] / steady,
        "times": times,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("bundle", type=Path)
    p.add_argument("--backend", default="auto")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--warmup", action="store_true", help="Detector.open(..., warmup=True)")
    p.add_argument("--repeats", type=int, default=5, help="steady-state predicts")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args()
    print(json.dumps(cold_start(a.bundle, a.backend, a.precision, a.warmup, a.repeats, a.threads)))


if __name__ == "__main__":
    main()
