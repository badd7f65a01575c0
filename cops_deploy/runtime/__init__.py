"""Run side: bundle reader, preprocessing, backends and the Detector API. Never imports torch.

``from cops_deploy.runtime import Detector`` is the entry point of a service::

    with Detector.open("bundle/") as det:
        for p in det.predict(["part.png"]):
            print(p.score, p.anomaly_map.shape)
"""

from __future__ import annotations

from typing import Any

__all__ = ["Detector", "Prediction", "open_bundle"]


def __getattr__(name: str) -> Any:
    if name in ("Detector", "Prediction"):
        from cops_deploy.runtime import detector

        return getattr(detector, name)
    if name == "open_bundle":
        from cops_deploy.runtime.bundle import open_bundle

        return open_bundle
    raise AttributeError(f"module 'cops_deploy.runtime' has no attribute {name!r}")
