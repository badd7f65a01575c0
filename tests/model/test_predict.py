"""model_batch: a CoPS model as a batch predictor over RGB images of any size."""

from __future__ import annotations

import numpy as np
import torch

from cops_deploy.imaging.preprocess import preprocess
from cops_deploy.model.predict import model_batch


def test_model_batch_matches_the_model(tiny_model):
    rng = np.random.default_rng(0)
    rgbs = [
        rng.integers(0, 256, (60, 90, 3), dtype=np.uint8),
        rng.integers(0, 256, (98, 98, 3), dtype=np.uint8),
    ]
    scores, maps = model_batch(tiny_model)(rgbs)
    size = tiny_model.cfg.preprocess.size
    assert scores.shape == (2,) and maps.shape == (2, size, size)
    assert scores.dtype == np.float32 and maps.dtype == np.float32
    pre = tiny_model.cfg.preprocess
    x = torch.from_numpy(np.stack([preprocess(r, pre.size, pre.mean, pre.std) for r in rgbs]))
    with torch.no_grad():
        ref = tiny_model(x)
    np.testing.assert_allclose(scores, ref.pred_score.numpy(), atol=1e-6, rtol=0)
    np.testing.assert_allclose(maps, ref.anomaly_map.numpy(), atol=1e-6, rtol=0)
