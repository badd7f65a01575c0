"""One uploaded image through the Detector, as the JSON the service answers (runs in a worker).

The answer holds ``score``; ``anomalous`` (``score >= threshold``; null without a threshold:
nothing is decided) and its older name ``decision``; ``threshold``; ``pixel_threshold`` and
``regions`` (the defect regions in the image's pixels, dicts with ``x``, ``y``, ``width``,
``height``, ``area``, ``peak``, ``mean``; both null when the bundle has no calibration); the
image's ``height`` and ``width``; and the anomaly map when asked for. The names are those of
``cops predict``'s scores.json and the C++ ``cops-detect``.

The anomaly map, when asked for, travels as a base64 PNG inside the JSON:

- ``grey16``: a 16-bit greyscale PNG, pixel = round(clip(map, 0, 1) * 65535); divide by 65535
  to get the map back (to within 7.7e-6). Maps are probabilities in [0, 1].
- ``heatmap``: an 8-bit RGB PNG of the map through the jet colour scale fixed to 0..1
  (``cops_deploy.imaging.visualize.colorize``), for people rather than programs.
"""

from __future__ import annotations

import base64
import io
from typing import Any, Literal

import numpy as np
from PIL import Image

from cops_deploy.errors import ImageReadError
from cops_deploy.imaging.visualize import colorize
from cops_deploy.runtime import Detector, Prediction

from .decoding import decode_upload
from .http_errors import refuse

__all__ = ["GREY16_SCALE", "MapKind", "MapSize", "encode_map", "predict_upload", "prediction_json"]

MapKind = Literal["none", "grey16", "heatmap"]
MapSize = Literal["model", "original"]
GREY16_SCALE = 65535


def encode_map(anomaly_map: np.ndarray, kind: MapKind) -> dict[str, Any]:
    """The map as ``{"encoding", "height", "width", "png_base64"}`` (see the module docstring)."""
    if kind == "grey16":
        pixels = np.rint(np.clip(anomaly_map, 0.0, 1.0) * GREY16_SCALE).astype(np.uint16)
        image = Image.fromarray(pixels)  # mode I;16
    else:
        image = Image.fromarray(colorize(anomaly_map))  # (H, W, 3) uint8 RGB
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    height, width = anomaly_map.shape
    return {
        "encoding": kind,
        "height": int(height),
        "width": int(width),
        "png_base64": base64.b64encode(buffer.getvalue()).decode("ascii"),
    }


def prediction_json(prediction: Prediction, map_kind: MapKind, map_size: MapSize) -> dict:
    """The /predict answer for one Prediction."""
    height, width = prediction.original_hw
    regions = prediction.regions
    out: dict[str, Any] = {
        "score": prediction.score,
        "anomalous": prediction.is_anomalous,
        "decision": prediction.is_anomalous,  # the earlier name of "anomalous", kept for clients
        "threshold": prediction.threshold,
        "pixel_threshold": prediction.pixel_threshold,
        "regions": None if regions is None else [r.to_dict() for r in regions],
        "image": {"height": height, "width": width},
    }
    if map_kind != "none":
        amap = prediction.anomaly_map
        if map_size == "original" and prediction.anomaly_map_original is not None:
            amap = prediction.anomaly_map_original
        out["anomaly_map"] = encode_map(amap, map_kind)
    return out


def predict_upload(
    detector: Detector, data: bytes, max_pixels: int, map_kind: MapKind, map_size: MapSize
) -> dict:
    """Decode ``data``, predict, and build the JSON answer (blocking: call it in a worker thread).

    Raises:
        fastapi.HTTPException: a 4xx refusal of the image (see ``decode_upload``).
    """
    rgb = decode_upload(data, max_pixels)
    try:
        original = map_kind != "none" and map_size == "original"
        prediction = detector.predict([rgb], original_size=original)[0]
    except ImageReadError as exc:  # decode_upload already converted it: not expected
        raise refuse(
            422,
            "unreadable_image",
            f"the image decodes but cannot be converted for the model: {exc}",
            "convert the image to 8-bit RGB or greyscale (PNG or JPEG) before sending it",
        ) from exc
    return prediction_json(prediction, map_kind, map_size)
