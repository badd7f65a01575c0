"""ONNX export of the deploy graphs: checks, dynamic batch, ORT parity, refusals (tiny model)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from cops_deploy import create_model
from cops_deploy.errors import ConfigError
from cops_deploy.export.bundle_writer import onnx_external_data_files
from cops_deploy.export.graphs import HeadGraph, VisionGraph, example_inputs
from cops_deploy.export.onnx_export import (
    ExportError,
    check_onnx,
    compare_with_onnxruntime,
    export_onnx,
    onnxruntime_session,
    pipeline_parity,
    run_onnxruntime,
    synthetic_images,
)

TOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return create_model("cops-tiny", seed=0)


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    """The tiny fp32 vision and head graphs, exported once for this module."""
    out = tmp_path_factory.mktemp("onnx")
    vision, head = VisionGraph(model), HeadGraph(model)
    paths = {
        "vision": export_onnx(vision, out / "vision.onnx", example_inputs("vision", model.cfg)),
        "head": export_onnx(head, out / "head.onnx", example_inputs("head", model.cfg)),
    }
    return {"graphs": {"vision": vision, "head": head}, "paths": paths}


@pytest.fixture(scope="module")
def images(model):
    return synthetic_images(model.cfg, n=4, seed=1)


def test_io_names_and_symbolic_batch(exported):
    vision = onnx.load(str(exported["paths"]["vision"]), load_external_data=False)
    head = onnx.load(str(exported["paths"]["head"]), load_external_data=False)
    assert [v.name for v in vision.graph.input] == ["image"]
    assert [v.name for v in vision.graph.output] == ["image_embedding", "patch_embedding"]
    assert [v.name for v in head.graph.input] == ["image_embedding", "patch_embedding"]
    assert [v.name for v in head.graph.output] == ["pred_score", "anomaly_map"]
    for model in (vision, head):
        for value in [*model.graph.input, *model.graph.output]:
            dim0 = value.type.tensor_type.shape.dim[0]
            assert dim0.dim_param and not dim0.dim_value, value.name
            assert value.type.tensor_type.elem_type == TensorProto.FLOAT


def test_weights_are_external_data(exported):
    for path in exported["paths"].values():
        assert onnx_external_data_files(path) == [f"{path.name}.data"]
        onnx.checker.check_model(str(path))


def test_pipeline_parity_with_model(model, exported, images):
    parity = pipeline_parity(model, exported["paths"]["vision"], exported["paths"]["head"], images)
    assert parity["images"] == 4
    assert parity["anomaly_map_max_abs"] < TOL
    assert parity["pred_score_max_abs"] < TOL
    assert parity["image_embedding_max_abs"] < TOL
    assert parity["patch_embedding_max_abs"] < TOL


def test_polygraphy_comparison_per_output(exported, images):
    vision = exported["graphs"]["vision"]
    feeds = [{"image": images[:2].numpy()}, {"image": images[2:].numpy()}]
    result = compare_with_onnxruntime(vision, exported["paths"]["vision"], feeds, atol=TOL)
    assert set(result) == {"image_embedding", "patch_embedding"}
    for stats in result.values():
        assert stats.passed
        assert stats.median_abs <= stats.mean_abs * 10 + 1e-12
        assert stats.max_abs < TOL
    with torch.no_grad():
        g, p = vision(images)
    head_feed = [{"image_embedding": g.numpy(), "patch_embedding": p.numpy()}]
    head = compare_with_onnxruntime(
        exported["graphs"]["head"], exported["paths"]["head"], head_feed
    )
    assert head["pred_score"].max_abs < TOL and head["anomaly_map"].max_abs < TOL
    assert set(head["anomaly_map"].to_dict()) == {
        "max_abs",
        "mean_abs",
        "median_abs",
        "max_rel",
        "passed",
    }


def test_polygraphy_comparison_reports_failure(exported, images):
    feeds = [{"image": images[:1].numpy()}]
    result = compare_with_onnxruntime(
        exported["graphs"]["vision"], exported["paths"]["vision"], feeds, atol=0.0, rtol=0.0
    )
    # Bit-exact agreement between two GEMM libraries is not expected: the check must say so.
    assert not all(stats.passed for stats in result.values())


def test_batch_of_four_equals_each_alone(exported, images):
    vision = onnxruntime_session(exported["paths"]["vision"])
    head = onnxruntime_session(exported["paths"]["head"])
    batch = run_onnxruntime(head, run_onnxruntime(vision, {"image": images.numpy()}))
    for i in range(images.shape[0]):
        one = run_onnxruntime(head, run_onnxruntime(vision, {"image": images[i : i + 1].numpy()}))
        for name in ("pred_score", "anomaly_map"):
            assert one[name].shape[0] == 1
            np.testing.assert_allclose(one[name][0], batch[name][i], rtol=0, atol=1e-6)


def test_refuses_batch_one_example(model, tmp_path):
    (image,) = example_inputs("vision", model.cfg, batch=1)
    with pytest.raises(ConfigError, match="batch size >= 2"):
        export_onnx(VisionGraph(model), tmp_path / "v.onnx", (image,))


def test_refuses_wrong_example_arity(model, tmp_path):
    with pytest.raises(ConfigError, match="tuple of 2 tensors"):
        export_onnx(HeadGraph(model), tmp_path / "h.onnx", example_inputs("vision", model.cfg))


def test_refuses_module_without_io_names(tmp_path):
    with pytest.raises(ConfigError, match="input_names/output_names"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "x.onnx", (torch.zeros(2, 2),))


def test_refuses_old_opset(model, tmp_path):
    with pytest.raises(ConfigError, match="opset 13"):
        export_onnx(
            VisionGraph(model), tmp_path / "v.onnx", example_inputs("vision", model.cfg), opset=13
        )


class _DataDependent(torch.nn.Module):
    input_names = ("x",)
    output_names = ("y",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = int(x.abs().sum().item() > 0)  # data-dependent shape: not exportable
        return x[:n]


def test_exporter_failure_is_an_export_error(tmp_path):
    with pytest.raises(ExportError, match=r"(?s)_DataDependent.*no fallback"):
        export_onnx(_DataDependent(), tmp_path / "x.onnx", (torch.ones(2, 3),))


def _tiny_onnx(path: Path, batch: int | str, names: tuple[str, str] = ("x", "y")) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", [names[0]], [names[1]])],
        "g",
        [helper.make_tensor_value_info(names[0], TensorProto.FLOAT, [batch, 3])],
        [helper.make_tensor_value_info(names[1], TensorProto.FLOAT, [batch, 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


def test_check_refuses_fixed_batch(tmp_path):
    path = _tiny_onnx(tmp_path / "fixed.onnx", 1)
    with pytest.raises(ExportError, match="dimension 0 of x is fixed"):
        check_onnx(path, ["x"], ["y"])
    check_onnx(path, ["x"], ["y"], dynamic_batch=False)


def test_check_refuses_wrong_names(tmp_path):
    path = _tiny_onnx(tmp_path / "names.onnx", "batch")
    with pytest.raises(ExportError, match=r"expected \['image'\]"):
        check_onnx(path, ["image"], ["y"])


def test_check_refuses_invalid_model(tmp_path):
    path = tmp_path / "bad.onnx"
    graph = helper.make_graph(
        [helper.make_node("NoSuchOp", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    with pytest.raises(ExportError, match="onnx.checker rejected"):
        check_onnx(path, ["x"], ["y"])


def test_compare_needs_feeds(exported):
    with pytest.raises(ConfigError, match="at least one feed"):
        compare_with_onnxruntime(exported["graphs"]["vision"], exported["paths"]["vision"], [])


def test_synthetic_images_are_seeded(model):
    a, b = synthetic_images(model.cfg, 2, seed=3), synthetic_images(model.cfg, 2, seed=3)
    s = model.cfg.preprocess.size
    assert a.shape == (2, 3, s, s) and torch.equal(a, b)


@pytest.mark.slow
def test_full_size_export_parity(request, tmp_path):
    """cops-vit-l-14-336 (random weights): dynamo export (~1.2 GB external data) and ORT parity."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full-size export (minutes, ~1.2 GB on disk); run with -m slow")
    model = create_model("cops-vit-l-14-336", seed=0)
    cfg = model.cfg
    vision = export_onnx(
        VisionGraph(model), tmp_path / "vision.onnx", example_inputs("vision", cfg)
    )
    head = export_onnx(HeadGraph(model), tmp_path / "head.onnx", example_inputs("head", cfg))
    parity = pipeline_parity(model, vision, head, synthetic_images(cfg, n=1, seed=7))
    assert parity["anomaly_map_max_abs"] < TOL and parity["pred_score_max_abs"] < TOL
