"""Triton model repository: every config.pbtxt parsed into Triton's own ModelConfig protobuf and
checked against the ONNX graphs; copied graphs load and compute the bundle's outputs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))
import cops_tiny_bundle  # noqa: E402

from cops_deploy.errors import BundleError, ConfigError  # noqa: E402
from cops_deploy.export.triton import (  # noqa: E402
    ENSEMBLE_MODEL,
    HEAD_MODEL,
    VISION_MODEL,
    write_triton_repository,
)

onnx = pytest.importorskip("onnx")
text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2",
    reason="tritonclient is not installed (pip install 'cops-deploy[triton]')",
)
FP32 = model_config_pb2.DataType.Value("TYPE_FP32")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.getbasetemp()
    graphs = cops_tiny_bundle.export_tiny_graphs(base / "cops_tiny_graphs")
    return cops_tiny_bundle.write_tiny_bundle(
        tmp_path_factory.mktemp("triton") / "bundle", graphs, torch_weights=False
    )


@pytest.fixture(scope="module")
def repo(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_triton_repository(bundle_dir, tmp_path_factory.mktemp("repo") / "models")


def parse(path: Path) -> Any:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def onnx_io(path: Path) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """name -> dims without the batch (dynamic dims as -1), for inputs and outputs; all FP32."""
    model = onnx.load(str(path), load_external_data=False)

    def dims(value: Any) -> list[int]:
        t = value.type.tensor_type
        assert t.elem_type == onnx.TensorProto.FLOAT
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        assert shape[0] == -1, f"{value.name}: batch must be dynamic"
        return shape[1:]

    return (
        {v.name: dims(v) for v in model.graph.input},
        {v.name: dims(v) for v in model.graph.output},
    )


def check_tensors(declared: Any, expected: dict[str, list[int]]) -> None:
    """Triton tensors equal ONNX tensors; a batch-only tensor is dims [1] reshaped to []."""
    assert [t.name for t in declared] == list(expected)
    for t in declared:
        assert t.data_type == FP32, t.name
        want = expected[t.name]
        if want:
            assert list(t.dims) == want and not t.HasField("reshape"), t.name
        else:
            assert list(t.dims) == [1] and list(t.reshape.shape) == [], t.name


@pytest.mark.parametrize("model, graph", [(VISION_MODEL, "vision"), (HEAD_MODEL, "head")])
def test_model_configs_match_onnx(repo: Path, bundle_dir: Path, model: str, graph: str) -> None:
    cfg = parse(repo / model / "config.pbtxt")
    assert cfg.name == model and cfg.platform == "onnxruntime_onnx"
    assert cfg.max_batch_size == 8
    assert cfg.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in cfg.instance_group] == [
        (1, model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_GPU"))
    ]
    inputs, outputs = onnx_io(bundle_dir / f"{graph}.onnx")
    check_tensors(cfg.input, inputs)
    check_tensors(cfg.output, outputs)
    # the copy is the same graph
    assert onnx_io(repo / model / "1" / "model.onnx") == (inputs, outputs)


def test_ensemble_config(repo: Path, bundle_dir: Path) -> None:
    cfg = parse(repo / ENSEMBLE_MODEL / "config.pbtxt")
    assert cfg.name == ENSEMBLE_MODEL and cfg.platform == "ensemble" and cfg.max_batch_size == 8
    assert (repo / ENSEMBLE_MODEL / "1").is_dir()
    v_in, v_out = onnx_io(bundle_dir / "vision.onnx")
    h_in, h_out = onnx_io(bundle_dir / "head.onnx")
    check_tensors(cfg.input, v_in)
    check_tensors(cfg.output, h_out)
    steps = cfg.ensemble_scheduling.step
    assert [s.model_name for s in steps] == [VISION_MODEL, HEAD_MODEL]
    assert all(s.model_version == -1 for s in steps)
    vision, head = steps
    assert dict(vision.input_map) == {"image": "image"}
    assert set(vision.output_map) <= set(v_out)
    assert set(head.input_map) == set(h_in)
    produced = set(vision.output_map.values())
    assert set(head.input_map.values()) <= produced  # every head input comes from vision
    assert set(head.output_map) == set(h_out)
    assert set(head.output_map.values()) == {t.name for t in cfg.output}


def test_options_reach_the_configs(bundle_dir: Path, tmp_path: Path) -> None:
    out = write_triton_repository(
        bundle_dir, tmp_path / "cpu", max_batch=4, instances=2, kind="KIND_CPU"
    )
    kind_cpu = model_config_pb2.ModelInstanceGroup.Kind.Value("KIND_CPU")
    for model in (VISION_MODEL, HEAD_MODEL):
        cfg = parse(out / model / "config.pbtxt")
        assert cfg.max_batch_size == 4
        assert [(g.count, g.kind) for g in cfg.instance_group] == [(2, kind_cpu)]
    assert parse(out / ENSEMBLE_MODEL / "config.pbtxt").max_batch_size == 4


def test_copied_graphs_run_with_their_external_data(repo: Path, bundle_dir: Path) -> None:
    import onnxruntime as ort

    from cops_deploy.runtime.detector import Detector

    files = sorted(p.name for p in (repo / VISION_MODEL / "1").iterdir())
    assert files == ["model.onnx", "vision.onnx.data"]
    image = np.random.default_rng(0).standard_normal((2, 3, 98, 98)).astype(np.float32)
    vision = ort.InferenceSession(str(repo / VISION_MODEL / "1" / "model.onnx"))
    head = ort.InferenceSession(str(repo / HEAD_MODEL / "1" / "model.onnx"))
    g, patches = vision.run(None, {"image": image})
    score, amap = head.run(None, {"image_embedding": g, "patch_embedding": patches})
    with Detector.open(bundle_dir, backend="onnxruntime") as d:
        emb = d.vision.infer({"image": image})
        ref = d.head.infer(emb)
    np.testing.assert_array_equal(score, ref["pred_score"])
    np.testing.assert_array_equal(amap, ref["anomaly_map"])


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_batch": 0}, "max_batch=0"),
        ({"instances": -1}, "instances=-1"),
        ({"max_batch": True}, "max_batch=True"),
        ({"kind": "KIND_TPU"}, "kind='KIND_TPU'.*KIND_GPU, KIND_CPU"),
    ],
)
def test_invalid_options_are_refused(
    bundle_dir: Path, tmp_path: Path, options: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        write_triton_repository(bundle_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(bundle_dir: Path, tmp_path: Path) -> None:
    out = write_triton_repository(bundle_dir, tmp_path / "models", max_batch=2)
    with pytest.raises(BundleError, match="not empty; refusing to overwrite.*force"):
        write_triton_repository(bundle_dir, out)
    write_triton_repository(bundle_dir, out, max_batch=3, force=True)
    assert parse(out / VISION_MODEL / "config.pbtxt").max_batch_size == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no temp folders left


def test_force_replaces_only_a_repository(bundle_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="is not a CoPS Triton repository"):
        write_triton_repository(bundle_dir, other, force=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_empty_output_folder_is_used(bundle_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = write_triton_repository(bundle_dir, tmp_path / "empty")
    assert (out / ENSEMBLE_MODEL / "config.pbtxt").is_file()


def test_static_batch_graph_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    """A graph exported without a dynamic batch cannot be a batched Triton model."""
    import shutil

    from onnx import TensorProto, helper

    from cops_deploy.runtime.bundle import open_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(bundle_dir, copy)
    bundle = open_bundle(copy)  # opened before the graph is swapped (sizes are checked on open)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["image_embedding"])],
        "static",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, 98, 98])],
        [helper.make_tensor_value_info("image_embedding", TensorProto.FLOAT, [1, 3, 98, 98])],
    )
    onnx.save(helper.make_model(graph), str(copy / "vision.onnx"))
    with pytest.raises(BundleError, match="'image' has shape \\[1, 3, 98, 98\\].*dynamic"):
        write_triton_repository(bundle, tmp_path / "out")


def test_a_killed_write_is_cleaned_and_modes_follow_the_umask(
    bundle_dir: Path, tmp_path: Path
) -> None:
    """A temporary left by a dead process is removed by the next write; one of a live process
    is kept; the repository's folders take 0777 less the umask (not mkdtemp's 0700)."""
    import os
    import subprocess

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".models.tmp-{dead.pid}-00aa11bb22cc"
    (stale / "vision" / "1").mkdir(parents=True)
    live = tmp_path / f".models.tmp-{os.getpid()}-00aa11bb22cd"
    live.mkdir()
    old = os.umask(0o022)
    try:
        out = write_triton_repository(bundle_dir, tmp_path / "models")
    finally:
        os.umask(old)
    assert not stale.exists()
    assert live.is_dir()
    assert (out.stat().st_mode & 0o777) == 0o755
    assert ((out / VISION_MODEL).stat().st_mode & 0o777) == 0o755
