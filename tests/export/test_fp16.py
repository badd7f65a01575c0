"""FP16 deploy graphs: explicit FP32 islands, float32 I/O, measured parity vs fp32 (tiny model)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cops_deploy import create_model
from cops_deploy.errors import ConfigError
from cops_deploy.export.fp16 import ISLAND_OPS, precision_report, to_fp16
from cops_deploy.export.graphs import HeadGraph, VisionGraph, example_inputs
from cops_deploy.export.onnx_export import export_onnx, pipeline_parity, synthetic_images

# Measured on cops-tiny (random weights, 4 synthetic images, ORT CPU): anomaly map ~5e-4,
# score ~2e-4. The bounds leave room for other CPUs' fp16 kernels.
MAP_TOL = 5e-3
SCORE_TOL = 5e-3


@pytest.fixture(scope="module")
def model():
    return create_model("cops-tiny", seed=0)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    cfg = model.cfg
    return {
        "vision": export_onnx(
            to_fp16(VisionGraph(model)), out / "vision.onnx", example_inputs("vision", cfg)
        ),
        "head": export_onnx(
            to_fp16(HeadGraph(model)), out / "head.onnx", example_inputs("head", cfg)
        ),
    }


def test_to_fp16_casts_a_copy(model):
    graph = HeadGraph(model)
    half = to_fp16(graph)
    assert half.compute_dtype == torch.float16 and graph.compute_dtype == torch.float32
    assert model.clip.text.text_projection.dtype == torch.float32  # the model is untouched
    assert half.text_projection.dtype == torch.float16
    for module in half.modules():
        if isinstance(module, nn.LayerNorm):
            assert module.weight.dtype == torch.float32
    assert half.text_mask.dtype == torch.float32 and half.eot_mask.dtype == torch.float32
    assert half.prefix_k0.dtype == torch.float16
    assert half.eot_rows.dtype == torch.int64


def test_to_fp16_refuses_other_modules():
    with pytest.raises(ConfigError, match="needs a deploy graph"):
        to_fp16(nn.Linear(2, 2))


@pytest.mark.parametrize("name", ["vision", "head"])
def test_islands_are_float32(exported, name):
    report = precision_report(exported[name])
    for op in ISLAND_OPS:
        if op in report:
            assert set(report[op]) == {"float32"}, (op, report[op])
    assert "LayerNormalization" in report and "Softmax" in report
    matmul = report["MatMul"]
    assert matmul.get("float16", 0) > matmul.get("float32", 0)


def test_head_gaussian_and_reductions_are_float32(exported):
    report = precision_report(exported["head"])
    assert report["Conv"] == {"float32": 2}  # the separable Gaussian
    for op in ("ReduceL2", "ReduceMax", "ReduceMin", "ReduceMean", "AveragePool"):
        assert report[op] == {"float32": report[op]["float32"]}


def test_vision_patch_embedding_runs_in_float16(exported):
    assert precision_report(exported["vision"])["Conv"] == {"float16": 1}


def test_fp16_parity_vs_fp32_model(model, exported):
    images = synthetic_images(model.cfg, n=4, seed=1)
    parity = pipeline_parity(model, exported["vision"], exported["head"], images)
    print(
        f"\nfp16 ONNX (ORT CPU) vs fp32 PyTorch on cops-tiny: anomaly map max diff "
        f"{parity['anomaly_map_max_abs']:.2e}, score max diff {parity['pred_score_max_abs']:.2e}"
    )
    assert 0 < parity["anomaly_map_max_abs"] < MAP_TOL
    assert parity["pred_score_max_abs"] < SCORE_TOL


def test_export_islands_check(exported, tmp_path):
    """The fp16 stage of the export pipeline accepts these graphs (counting their float16
    matmuls) and refuses an fp16 softmax."""
    import onnx
    from onnx import TensorProto, helper

    from cops_deploy.errors import ExportError
    from cops_deploy.export.pipeline import check_fp16_islands

    matmuls = check_fp16_islands(exported)
    assert sorted(matmuls) == sorted(exported) and min(matmuls.values()) > 0
    bad = tmp_path / "bad.onnx"
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["batch", 3])],
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.save(onnx_model, str(bad))
    with pytest.raises(ExportError, match="Softmax"):
        check_fp16_islands({"head": bad})
