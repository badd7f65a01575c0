"""The input size travels through export: ``cops-export --model NAME@SIZE`` writes a bundle that
says its model and size and runs at that size (cheap, on cops-tiny); each Table S3 row exports
from its OpenAI-layout weights file with ONNX Runtime = PyTorch (full size, marked slow)."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from zoo_support import require_slow, write_openai_file

from cops_deploy import create_model
from cops_deploy.cli.export import main
from cops_deploy.configs import get_config
from cops_deploy.configs.paper import TABLE_S3
from cops_deploy.export.onnx_export import run_onnxruntime, synthetic_images
from cops_deploy.export.pipeline import ExportCfg, export_bundle
from cops_deploy.model.weights import sha256_file
from cops_deploy.runtime import Detector

TOL = 1e-5


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_size_suffix_exports_a_bundle_at_that_size(tmp_path):
    bundle = tmp_path / "bundle"
    code, _, err = run_cli(
        "--model", "cops-tiny@126", "--random-weights", "--out", str(bundle), "--no-ort-variant"
    )
    assert code == 0, err
    with Detector.open(bundle) as det:
        assert det.input_size == 126
        manifest = det.manifest
        pred = det.predict(np.full((90, 150, 3), 128, np.uint8))[0]
    assert manifest.model_config["name"] == "cops-tiny@126"
    assert manifest.model_config["vision"]["input_size"] == manifest.preprocess.size == 126
    assert pred.anomaly_map.shape == (126, 126)
    # the graphs are the model at 126 (a 9 x 9 grid from the weights' 4 x 4 table)
    model = create_model("cops-tiny@126", seed=0)
    images = synthetic_images(model.cfg, n=1, seed=5)
    got = run_onnxruntime(
        bundle / "head.onnx", run_onnxruntime(bundle / "vision.onnx", {"image": images.numpy()})
    )
    with torch.no_grad():
        ref = model(images)
    np.testing.assert_allclose(got["anomaly_map"], ref.anomaly_map.numpy(), atol=TOL, rtol=0)
    assert manifest.parity["anomaly_map_max_abs"] < TOL


def test_bad_size_refused_before_any_work(tmp_path):
    bundle = tmp_path / "bundle"
    code, out, err = run_cli("--model", "cops-tiny@100", "--random-weights", "--out", str(bundle))
    assert code == 2 and out == ""
    assert "must be a multiple of 14 (nearest: 98, 112). Fix: ask for 'cops-tiny@98'" in err
    assert not bundle.exists()


@pytest.mark.slow
@pytest.mark.parametrize("row", TABLE_S3, ids=[r.model for r in TABLE_S3])
def test_row_exports_from_its_openai_file(row, tmp_path, request):
    require_slow(request)
    cfg = get_config(row.model)
    clip = tmp_path / cfg.clip_pretrained["openai_file"]
    write_openai_file(cfg, clip, narrow=False)
    bundle = export_bundle(
        ExportCfg(
            out=tmp_path / "bundle",
            model=row.model,
            clip_weights=clip,
            random_weights=True,
            ort_variant=False,
            parity_images=1,
        )
    )
    manifest = bundle.manifest
    assert manifest.provenance.clip_sha256 == sha256_file(clip)
    clip.unlink()
    assert manifest.model_config == cfg.to_dict()
    assert manifest.parity["anomaly_map_max_abs"] < 1e-4
    assert manifest.parity["pred_score_max_abs"] < 1e-5
    with Detector.open(bundle.root, verify=False) as det:
        pred = det.predict(np.full((200, 300, 3), 90, np.uint8))[0]
    assert pred.anomaly_map.shape == (row.input_size, row.input_size)
