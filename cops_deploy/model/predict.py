"""A CoPS model as a batch predictor over RGB images, with the preprocessing of its config.

    predict_batch = model_batch(create_model("cops-tiny").to("cuda"))
    scores, maps = predict_batch([rgb_uint8_a, rgb_uint8_b])     # (B,), (B, S, S) float32

The callable has the shape that ``cops_deploy.runtime.predict_files.write_predictions`` takes
(as a Detector does through ``detector_batch``), so the PyTorch model and an exported bundle
write the same results.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from cops_deploy.imaging.preprocess import preprocess
from cops_deploy.model.cops import CopsModel

__all__ = ["model_batch"]


def model_batch(model: CopsModel) -> Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """``model`` (on its own device, in inference mode) as a batch predictor: a list of RGB
    uint8 images of any size -> scores (B,) and anomaly maps (B, S, S) as float32 arrays."""
    pre = model.cfg.preprocess

    def predict_batch(rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([preprocess(rgb, pre.size, pre.mean, pre.std) for rgb in rgbs])  # (B,3,S,S)
        device = next(model.parameters()).device
        with torch.inference_mode():
            out = model(torch.from_numpy(x).to(device))
        return out.pred_score.float().cpu().numpy(), out.anomaly_map.float().cpu().numpy()

    return predict_batch
