"""Quick mode of the benchmark suite (runs in ``make test``): the baselines are faithful."""

from __future__ import annotations

import numpy as np
import torch
from reference_eager import ReferenceEager

from cops_deploy import create_model


def test_reference_eager_equals_model_on_tiny():
    model = create_model("cops-tiny", seed=4)
    ref = ReferenceEager(model)
    torch.manual_seed(0)
    images = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        out = model(images)
    for i in range(2):
        score, amap = ref(images[i : i + 1])
        assert abs(score - float(out.pred_score[i])) < 1e-5
        assert np.abs(amap - out.anomaly_map[i].numpy()).max() < 1e-5
