"""``cops-export``: a tiny smoke bundle end to end, the manifest it writes, and every refusal."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from cops_deploy import create_model, save_model
from cops_deploy.cli.export import build_parser, export_cfg, main
from cops_deploy.export.onnx_export import onnxruntime_session, run_onnxruntime, synthetic_images
from cops_deploy.runtime.bundle import open_bundle
from cops_deploy.runtime.manifest import EngineKey

TOL = 1e-5


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One fp32 smoke export of cops-tiny with random weights (and the Triton repository)."""
    root = tmp_path_factory.mktemp("export")
    bundle = root / "bundle"
    code, out, err = run_cli(
        "--model",
        "cops-tiny",
        "--random-weights",
        "--engine",
        "onnx",
        "--precision",
        "fp32",
        "--max-batch",
        "4",
        "--out",
        str(bundle),
        "--triton",
        "--triton-dir",
        str(root / "triton"),
        "--torch-weights",
    )
    assert code == 0, err
    return {"root": root, "bundle": bundle, "stdout": out}


def test_bundle_opens_and_verifies(smoke):
    bundle = open_bundle(smoke["bundle"], verify=True)
    roles = {e.path: e.role for e in bundle.manifest.files}
    assert roles["vision.onnx"] == "vision_onnx" and roles["head.onnx"] == "head_onnx"
    assert roles["vision.onnx.data"] == "vision_onnx_data"
    assert roles["head.onnx.data"] == "head_onnx_data"
    assert bundle.manifest.engines == {}


def test_manifest_says_random_weights(smoke):
    provenance = open_bundle(smoke["bundle"]).manifest.provenance
    assert provenance.random_weights is True
    assert provenance.checkpoint_sha256 is None and provenance.clip_sha256 is None


def test_manifest_records_parity_config_and_io(smoke):
    manifest = open_bundle(smoke["bundle"]).manifest
    parity = manifest.parity
    assert parity["anomaly_map_max_abs"] < TOL and parity["pred_score_max_abs"] < TOL
    assert parity["images"] == 2 and parity["precision"] == "fp32"
    assert manifest.model_config["name"] == "cops-tiny"
    assert manifest.preprocess.size == 98 and manifest.preprocess.interpolation == "bicubic"
    head = manifest.model_config["head"]  # what head.onnx was built with
    assert (head["alpha"], head["beta"], head["sigma"]) == (0.3, 0.9, 4.0)
    assert (head["samples"], head["neighbour_kernel"]) == (10, 5)
    vision, head_io = manifest.graphs["vision"], manifest.graphs["head"]
    assert vision.file == "vision.onnx" and head_io.file == "head.onnx"
    assert [t.name for t in vision.inputs] == ["image"]
    assert [t.name for t in vision.outputs] == ["image_embedding", "patch_embedding"]
    assert [t.name for t in head_io.inputs] == ["image_embedding", "patch_embedding"]
    assert [t.name for t in head_io.outputs] == ["pred_score", "anomaly_map"]
    assert vision.inputs[0].shape == ("batch", 3, 98, 98)
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest.tool_versions)


def test_progress_is_printed_per_stage(smoke):
    out = smoke["stdout"]
    for stage in (
        "loading model",
        "building graphs",
        "exporting vision",
        "exporting head",
        "checking",
        "fp16: skipped",
        "engine: skipped",
        "ort variant: done",
        "measuring parity",
        "writing bundle",
        "triton",
    ):
        assert stage in out, stage
    assert "random weights" in out


def test_bundle_graphs_match_pytorch(smoke):
    """The bundle's own files (not the exporter's temp copies) reproduce the model."""
    model = create_model("cops-tiny", seed=0)
    images = synthetic_images(model.cfg, n=3, seed=5)
    vision = onnxruntime_session(smoke["bundle"] / "vision.onnx")
    head = onnxruntime_session(smoke["bundle"] / "head.onnx")
    got = run_onnxruntime(head, run_onnxruntime(vision, {"image": images.numpy()}))
    with torch.no_grad():
        ref = model(images)
    np.testing.assert_allclose(got["anomaly_map"], ref.anomaly_map.numpy(), atol=TOL, rtol=0)
    np.testing.assert_allclose(got["pred_score"], ref.pred_score.numpy(), atol=TOL, rtol=0)


def test_triton_repository_written(smoke):
    repo = smoke["root"] / "triton"
    configs = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("config.pbtxt"))
    assert len(configs) == 3
    assert "max_batch_size: 4" in "".join((repo / c).read_text() for c in configs)


def test_refuses_existing_bundle_without_force(smoke):
    code, _, err = run_cli(
        "--model", "cops-tiny", "--random-weights", "--out", str(smoke["bundle"])
    )
    assert code == 2
    assert "already exists" in err and "--force" in err


def test_refuses_without_weights(tmp_path):
    code, out, err = run_cli("--model", "cops-tiny", "--out", str(tmp_path / "b"))
    assert code == 2
    assert "no weights given" in err and "--random-weights" in err
    assert not (tmp_path / "b").exists() and out == ""


def test_refuses_random_clip_with_cops_weights_only(tmp_path):
    weights = save_model(create_model("cops-tiny", seed=1), tmp_path / "cops", include_clip=False)
    code, _, err = run_cli(
        "--model", "cops-tiny", "--weights", str(weights), "--out", str(tmp_path / "b")
    )
    assert code == 2
    assert "CLIP (--clip-weights) weights would be random" in err
    assert not (tmp_path / "b").exists()


def test_engine_trt_without_tensorrt_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code, _, err = run_cli(
        "--model", "cops-tiny", "--random-weights", "--engine", "trt", "--out", str(tmp_path / "b")
    )
    assert code == 2
    assert "pip install 'cops-deploy[trt]'" in err and "Traceback" not in err
    assert not (tmp_path / "b").exists()


def test_triton_without_writer_fails_before_export(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cops_deploy.export.triton", None)
    code, out, err = run_cli(
        "--model", "cops-tiny", "--random-weights", "--triton", "--out", str(tmp_path / "b")
    )
    assert code == 2 and "write_triton_repository" in err and out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--parity-images", "0"], "--parity-images must be >= 1"),
    ],
)
def test_refuses_bad_numbers(tmp_path, args, message):
    code, _, err = run_cli(
        "--model", "cops-tiny", "--random-weights", "--out", str(tmp_path / "b"), *args
    )
    assert code == 2 and message in err


def test_refuses_missing_out():
    code, _, err = run_cli("--model", "cops-tiny", "--random-weights")
    assert code == 2 and "--out is required" in err


def test_unknown_model(tmp_path):
    code, _, err = run_cli("--model", "nope", "--random-weights", "--out", str(tmp_path / "b"))
    assert code == 2 and "unknown CoPS model 'nope'" in err


def test_usage_errors_and_help():
    assert run_cli("--engine", "tvm")[0] == 2
    code, out, _ = run_cli("--help")
    assert code == 0 and "--random-weights" in out


def test_bundle_mode_needs_engine_trt(smoke):
    code, _, err = run_cli("--bundle", str(smoke["bundle"]))
    assert code == 2 and "needs --engine trt" in err


def test_bundle_mode_excludes_out(smoke, tmp_path):
    code, _, err = run_cli(
        "--engine", "trt", "--bundle", str(smoke["bundle"]), "--out", str(tmp_path / "b")
    )
    assert code == 2 and "--bundle and --out exclude each other" in err


def test_every_flag_maps_onto_export_cfg(tmp_path):
    args = build_parser().parse_args(
        [
            "--model", "cops-tiny", "--clip-weights", "clip.pt", "--weights", "cops.pth",
            "--seed", "3", "--engine", "trt", "--precision", "fp16", "--max-batch", "4",
            "--out", str(tmp_path / "b"), "--force", "--triton", "--triton-dir", "tri",
            "--torch-weights", "--engine-cache", "cache", "--rebuild-engines",
            "--parity-images", "5", "--no-ort-variant", "--opset", "18",
            "--alpha", "0.5", "--beta", "0.7", "--kernel", "3",
        ]
    )  # fmt: skip
    cfg = export_cfg(args)
    assert (cfg.model, cfg.clip_weights, cfg.weights, cfg.seed) == (
        "cops-tiny", "clip.pt", "cops.pth", 3
    )  # fmt: skip
    assert (cfg.engine, cfg.precision, cfg.max_batch, cfg.out) == ("trt", "fp16", 4, tmp_path / "b")
    assert cfg.force and cfg.triton and cfg.torch_weights and cfg.rebuild_engines
    assert (cfg.triton_dir, cfg.engine_cache) == (Path("tri"), Path("cache"))
    assert (cfg.parity_images, cfg.ort_variant, cfg.opset, cfg.random_weights) == (
        5, False, 18, False
    )  # fmt: skip
    assert dict(cfg.head_overrides) == {
        "head.alpha": 0.5, "head.beta": 0.7, "head.neighbour_kernel": 3
    }  # fmt: skip
    defaults = export_cfg(build_parser().parse_args(["--out", "b", "--random-weights"]))
    assert dict(defaults.head_overrides) == {} and defaults.ort_variant is True


def test_add_engines_to_bundle_with_fake_builder(smoke, tmp_path, monkeypatch):
    """--bundle --engine trt rewrites the bundle with engines and their keys (builder faked)."""
    import cops_deploy.export.tensorrt as trt_build

    bundle = tmp_path / "bundle"
    shutil.copytree(smoke["bundle"], bundle)

    def fake_build(onnx_path, cache_dir, stem, precision, max_batch, force=False, **kw):
        from cops_deploy.runtime.bundle import sha256_file

        path = Path(cache_dir) / f"{stem}.engine"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"engine " + stem.encode())
        key = EngineKey(
            sha256_file(onnx_path),
            "10.13.0",
            "NVIDIA H200",
            "9.0",
            precision,
            trt_build.BatchProfile.from_max_batch(max_batch).describe(),
        )
        return path, key

    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: types.SimpleNamespace())
    monkeypatch.setattr(trt_build, "build_engine_cached", fake_build)
    code, out, err = run_cli(
        "--engine",
        "trt",
        "--bundle",
        str(bundle),
        "--max-batch",
        "4",
        "--engine-cache",
        str(tmp_path / "cache"),
    )
    assert code == 0, err
    reopened = open_bundle(bundle, verify=True)
    engines = reopened.manifest.engines
    assert sorted(engines) == ["head.engine", "vision.engine"]
    vision_sha = reopened.manifest.file("vision.onnx").sha256
    assert engines["vision.engine"].onnx_sha256 == vision_sha
    assert engines["vision.engine"].profile == "b1-2-4"
    assert {e.role for e in reopened.manifest.files if e.path.endswith(".engine")} == {"engine"}
    assert reopened.manifest.parity == open_bundle(smoke["bundle"]).manifest.parity
    code, _, err = run_cli("--engine", "trt", "--bundle", str(bundle))  # engines exist now
    assert code == 2 and "already has engines" in err


def test_fp16_bundle(tmp_path):
    """--precision fp16: FP16 graphs (float32 I/O) with the islands checked and parity recorded."""
    bundle = tmp_path / "fp16"
    code, out, err = run_cli(
        "--model", "cops-tiny", "--random-weights", "--precision", "fp16", "--out", str(bundle)
    )
    assert code == 0, err
    assert "fp16: done" in out and "float16 matmuls" in out
    manifest = open_bundle(bundle, verify=True).manifest
    assert manifest.parity["precision"] == "fp16"
    assert "ort variant: skipped (precision fp16)" in out
    assert not manifest.with_role("vision_onnx_ort") and "ort_variant" not in manifest.parity
    assert 0 < manifest.parity["anomaly_map_max_abs"] < 5e-3
    assert manifest.parity["pred_score_max_abs"] < 5e-3
    assert {t.dtype for g in manifest.graphs.values() for t in (*g.inputs, *g.outputs)} == {
        "float32"
    }


def test_torch_weights_let_every_backend_run_the_bundle(smoke):
    """With --torch-weights the Detector's torch backend runs; it agrees with ONNX Runtime."""
    from cops_deploy.runtime import Detector

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (60, 80, 3), dtype=np.uint8) for _ in range(2)]
    results = {}
    for backend in ("onnxruntime", "torch"):
        with Detector.open(smoke["bundle"], backend=backend) as det:
            assert det.backend_name == backend
            results[backend] = det.predict(images)
    for a, b in zip(results["onnxruntime"], results["torch"], strict=True):
        assert abs(a.score - b.score) < TOL
        assert np.abs(a.anomaly_map - b.anomaly_map).max() < TOL


# ---------------------------------------------------------------------------------------------
# The ONNX Runtime variant of the vision graph


def test_ort_variant_shares_the_portable_weights(smoke):
    """vision.ort.onnx: fused com.microsoft attention, no weights of its own (it points into
    vision.onnx.data), listed and hashed in the manifest, its parity recorded."""
    import onnx

    from cops_deploy.export.bundle_writer import onnx_external_data_files

    bundle = open_bundle(smoke["bundle"], verify=True)
    variant = bundle.ort_variant("vision")
    assert variant == smoke["bundle"] / "vision.ort.onnx"
    assert onnx_external_data_files(variant) == ["vision.onnx.data"]
    ops = [n.op_type for n in onnx.load(variant, load_external_data=False).graph.node]
    portable = [n.op_type for n in onnx.load(smoke["bundle"] / "vision.onnx").graph.node]
    heads = bundle.manifest.model_config["vision"]["layers"]
    assert ops.count("MultiHeadAttention") >= heads and "Softmax" not in ops
    assert "MultiHeadAttention" not in portable and portable.count("Softmax") >= heads
    parity = bundle.manifest.parity["ort_variant"]
    assert parity["anomaly_map_max_abs"] < TOL and parity["pred_score_max_abs"] < TOL
    assert bundle.ort_variant("head") is None


def test_ort_variant_matches_pytorch_and_the_portable_graph(smoke):
    from cops_deploy.runtime.backends import OnnxRuntimeBackend

    bundle = open_bundle(smoke["bundle"])
    model = create_model("cops-tiny", seed=0)
    images = synthetic_images(model.cfg, n=3, seed=5)
    with torch.no_grad():
        ref = model.forward_intermediates(images)
    out = {}
    for variant in ("auto", "portable", "ort"):
        with OnnxRuntimeBackend(bundle, "vision", variant=variant) as backend:
            out[variant] = backend.infer({"image": images.numpy()})
            expected = "vision.onnx" if variant == "portable" else "vision.ort.onnx"
            assert backend.path.name == expected
    for variant, got in out.items():
        for name in ("image_embedding", "patch_embedding"):
            want = getattr(ref, name).numpy()
            np.testing.assert_allclose(got[name], want, atol=TOL, rtol=0, err_msg=variant)


def test_no_ort_variant_flag_and_variant_refusals(tmp_path):
    from cops_deploy.errors import BundleError, ConfigError
    from cops_deploy.runtime.backends import OnnxRuntimeBackend

    bundle_dir = tmp_path / "plain"
    code, out, err = run_cli(
        "--model", "cops-tiny", "--random-weights", "--no-ort-variant", "--out", str(bundle_dir)
    )
    assert code == 0, err
    assert "ort variant: skipped (--no-ort-variant)" in out
    bundle = open_bundle(bundle_dir, verify=True)
    assert bundle.ort_variant("vision") is None and "ort_variant" not in bundle.manifest.parity
    assert OnnxRuntimeBackend(bundle, "vision").path.name == "vision.onnx"  # auto falls back
    with pytest.raises(BundleError, match="no ONNX Runtime variant of graph 'vision'"):
        OnnxRuntimeBackend(bundle, "vision", variant="ort")
    with pytest.raises(ConfigError, match="invalid ONNX Runtime variant 'fused'"):
        OnnxRuntimeBackend(bundle, "vision", variant="fused")


def test_triton_serves_the_ort_variant(smoke):
    """The Triton repository's vision model is the fused variant, with the shared weights file
    copied beside it under the name it refers to, and it runs like the portable graph."""
    import onnx

    version = smoke["root"] / "triton" / "cops_vision" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "vision.onnx.data"]
    ops = {
        n.op_type for n in onnx.load(version / "model.onnx", load_external_data=False).graph.node
    }
    assert "MultiHeadAttention" in ops
    images = synthetic_images(create_model("cops-tiny", seed=0).cfg, n=2, seed=6).numpy()
    got = run_onnxruntime(version / "model.onnx", {"image": images})
    want = run_onnxruntime(smoke["bundle"] / "vision.onnx", {"image": images})
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=TOL, rtol=0)
