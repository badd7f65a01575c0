"""Reference-eager is a faithful baseline: it reproduces the reference implementation's golden
outputs and equals ``CopsModel`` to 1e-5 (cops-tiny; the full size is checked by the benchmark
parity gate on every ``pytest benchmarks/`` run)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_eager import ReferenceEager

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))  # golden_support
from golden_support import anomalyclip_golden_model, golden_dir, golden_model  # noqa: E402

from cops_deploy import create_model
from cops_deploy.export.onnx_export import synthetic_images

TOL = 1e-5


def test_reference_eager_equals_the_model() -> None:
    model = create_model("cops-tiny", seed=0)
    ref = ReferenceEager(model)
    images = synthetic_images(model.cfg, n=3, seed=11)
    with torch.no_grad():
        out = model(images)
    for i in range(images.shape[0]):
        score, amap = ref(images[i : i + 1])
        assert abs(score - float(out.pred_score[i])) <= TOL
        assert np.abs(amap - out.anomaly_map[i].numpy()).max() <= TOL


@pytest.mark.parametrize("index", [0, 1, 2])
def test_reference_eager_reproduces_the_golden_outputs(index: int) -> None:
    golden = golden_dir()
    if not (golden / "cases.npz").is_file():
        pytest.fail(f"golden vectors not found at {golden}; set COPS_GOLDEN to their folder")
    model, cases = golden_model(golden)
    image = torch.from_numpy(cases["images"][index : index + 1])
    score, amap = ReferenceEager(model)(image, z=torch.from_numpy(cases["z"][index]))
    assert abs(score - float(cases["pred_score"][index])) <= TOL
    assert np.abs(amap - cases["anomaly_map"][index]).max() <= TOL


def test_anomalyclip_reference_eager_reproduces_the_golden_outputs() -> None:
    """ReferenceEager of an AnomalyClipModel is AnomalyCLIP's test.py: the golden's score and
    map (README tolerances 1e-6 and 2e-5) for every image."""
    golden = golden_dir()
    if not (golden / "anomalyclip" / "cases.npz").is_file():
        pytest.fail(f"AnomalyCLIP golden vectors not found at {golden / 'anomalyclip'}")
    model, cases = anomalyclip_golden_model(golden)
    ref = ReferenceEager(model)
    assert type(ref).__name__ == "AnomalyClipReferenceEager"
    for index in range(cases["images"].shape[0]):
        score, amap = ref(torch.from_numpy(cases["images"][index : index + 1]))
        assert abs(score - float(cases["pred_score"][index])) <= 1e-6
        assert np.abs(amap - cases["anomaly_map"][index]).max() <= 2e-5
