"""AnomalyCLIP deployed like CoPS: deploy graphs, the exported bundle (manifest names the model,
the head graph holds the text features as constants and no text tower), ONNX Runtime /
OpenVINO / torch backends against the golden and the PyTorch model, FP16 export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from golden_support import anomalyclip_golden_model

from cops_deploy.export.fp16 import to_fp16
from cops_deploy.export.graphs import (
    AnomalyClipHeadGraph,
    DeployModel,
    VisionGraph,
    example_inputs,
    head_graph,
    map_projection,
)
from cops_deploy.export.onnx_export import export_onnx, run_onnxruntime, synthetic_images
from cops_deploy.model.head import gaussian_blur
from cops_deploy.model.predict import model_batch
from cops_deploy.model.weights import sha256_file
from cops_deploy.runtime.bundle import open_bundle
from cops_deploy.runtime.detector import Detector

SCORE_TOL = 1e-6  # the golden README's tolerances
MAP_TOL = 2e-5
FP16_TOL = 5e-3  # as tests/export/test_fp16.py


@pytest.fixture(scope="module")
def loaded(golden):
    return anomalyclip_golden_model(golden)


@pytest.fixture(scope="module")
def bundle(loaded, golden, tmp_path_factory):
    from cops_deploy.export.pipeline import ExportCfg, export_bundle

    folder = golden / "anomalyclip"
    cfg = ExportCfg(
        out=tmp_path_factory.mktemp("aclip") / "bundle",
        model="anomalyclip-tiny",
        clip_weights=folder / "clip_tiny_openai_layout.pt",
        weights=folder / "anomalyclip_tiny_reference_format.pth",
        torch_weights=True,
        ort_variant=False,
    )
    return export_bundle(cfg).root


def _max(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def test_map_projection_is_upsample_then_blur():
    grid_map = torch.rand(3, 7, 7, dtype=torch.float64)
    k = torch.from_numpy(map_projection(7, 98, 4.0, 4.0))
    up = F.interpolate(grid_map[:, None], size=(98, 98), mode="bilinear", align_corners=False)
    want = gaussian_blur(up[:, 0], 4.0, 4.0)
    assert float((k @ grid_map @ k.T - want).abs().max()) < 1e-12


@pytest.mark.parametrize("impl", ["explicit", "sdpa"])
def test_deploy_graphs_reproduce_the_golden(loaded, impl):
    model, cases = loaded
    with torch.no_grad():
        out = DeployModel(model, attn_impl=impl)(torch.from_numpy(cases["images"]))
    assert _max(out.anomaly_map, cases["anomaly_map"]) <= MAP_TOL
    assert _max(out.pred_score, cases["pred_score"]) <= SCORE_TOL


def test_deploy_graphs_single_layer_variant(golden):
    model, cases = anomalyclip_golden_model(golden, feature_layers=[4])
    with torch.no_grad():
        out = DeployModel(model)(torch.from_numpy(cases["images"]))
    assert _max(out.anomaly_map, cases["anomaly_map_last_layer_only"]) <= MAP_TOL


def test_vision_graph_stacks_the_feature_layers(loaded):
    model, cases = loaded
    images = torch.from_numpy(cases["images"][:2])
    with torch.no_grad():
        g, patches = VisionGraph(model)(images)
        ref = model.encode_image(images)
    assert patches.shape == (2, 4 * 49, 96)
    assert float((patches - ref.patch_embedding).abs().max()) <= 1e-5
    assert float((g - ref.image_embedding).abs().max()) <= 1e-5


def test_head_graph_text_features_are_the_model_constants(loaded):
    model, _ = loaded
    head = head_graph(model)
    assert isinstance(head, AnomalyClipHeadGraph)
    with torch.no_grad():
        assert torch.equal(head.text_t, model.text_features().t())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in head.modules())


def test_manifest_names_the_model(bundle, golden):
    manifest = open_bundle(bundle).manifest
    assert manifest.model_config["kind"] == "anomalyclip"
    assert manifest.model_config["name"] == "anomalyclip-tiny"
    head_in = {t.name: t.shape for t in manifest.graphs["head"].inputs}
    assert head_in == {"image_embedding": ("batch", 96), "patch_embedding": ("batch", 196, 96)}
    folder = golden / "anomalyclip"
    assert manifest.provenance.clip_sha256 == sha256_file(folder / "clip_tiny_openai_layout.pt")
    weights = folder / "anomalyclip_tiny_reference_format.pth"
    assert manifest.provenance.checkpoint_sha256 == sha256_file(weights)


def test_head_onnx_holds_no_text_tower(bundle):
    """The head graph has only the embeddings as inputs, no LayerNorm, two softmaxes (image and
    patches) and constants no larger than the text features, the map projection and scalars."""
    head = onnx.load(str(bundle / "head.onnx"))
    assert [i.name for i in head.graph.input] == ["image_embedding", "patch_embedding"]
    ops = [n.op_type for n in head.graph.node]
    assert "LayerNormalization" not in ops
    assert ops.count("Softmax") == 2
    sizes = [int(np.prod(t.dims)) for t in head.graph.initializer]
    text_width = 96
    assert max(sizes) <= 98 * 7  # the (S, g) projection; a text block weight is 3 * 96 * 96
    assert sum(sizes) <= 2 * text_width + 2 * 98 * 7 + 64  # the projection and its transpose


def test_onnx_bundle_reproduces_the_golden(bundle, loaded):
    _, cases = loaded
    vision = run_onnxruntime(bundle / "vision.onnx", {"image": cases["images"]})
    head = run_onnxruntime(bundle / "head.onnx", vision)
    assert _max(head["anomaly_map"], cases["anomaly_map"]) <= MAP_TOL
    assert _max(head["pred_score"], cases["pred_score"]) <= SCORE_TOL


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torch"])
def test_detector_matches_the_pytorch_model(bundle, loaded, backend):
    model, _ = loaded
    rng = np.random.default_rng(1)
    rgbs = [rng.integers(0, 256, (90 + 7 * i, 120, 3), dtype=np.uint8) for i in range(3)]
    scores, maps = model_batch(model)(rgbs)
    with Detector.open(bundle, backend=backend) as detector:
        preds = detector.predict(rgbs)
    assert _max([p.score for p in preds], scores) <= 1e-5
    assert _max(np.stack([p.anomaly_map for p in preds]), maps) <= MAP_TOL


def test_fp16_export_parity(loaded, tmp_path):
    model, _ = loaded
    cfg = model.cfg
    with torch.no_grad():
        for name, graph in (("vision", VisionGraph(model)), ("head", head_graph(model))):
            export_onnx(to_fp16(graph), tmp_path / f"{name}.onnx", example_inputs(name, cfg))
    images = synthetic_images(cfg, n=2, seed=3)
    with torch.no_grad():
        ref = model(images)
    vision = run_onnxruntime(tmp_path / "vision.onnx", {"image": images.numpy()})
    head = run_onnxruntime(tmp_path / "head.onnx", vision)
    map_err = _max(head["anomaly_map"], ref.anomaly_map)
    print(f"\nfp16 ONNX vs fp32 PyTorch (anomalyclip-tiny): map {map_err:.2e}")
    assert 0 < map_err < FP16_TOL
    assert _max(head["pred_score"], ref.pred_score) < FP16_TOL
