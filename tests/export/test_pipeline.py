"""The export pipeline as a library: ExportCfg's refusals, export_bundle on cops-tiny with random
weights (the bundle it returns, the progress it reports, silence by default), and add_engines
with a faked TensorRT builder."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cops_deploy import create_model, save_model
from cops_deploy.errors import BundleError, ConfigError, MissingDependencyError
from cops_deploy.export.onnx_export import run_onnxruntime, synthetic_images
from cops_deploy.export.pipeline import (
    STAGES,
    ExportCfg,
    Stage,
    add_engines,
    default_engine_cache,
    export_bundle,
)
from cops_deploy.runtime.bundle import Bundle, open_bundle, sha256_file
from cops_deploy.runtime.manifest import EngineKey

TOL = 1e-5


class Recorder:
    """A Progress that records every call."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def begin(self, stage: Stage) -> None:
        self.events.append(("begin", stage.name, stage.step, stage.total))

    def end(self, stage: Stage, seconds: float) -> None:
        assert seconds >= 0
        self.events.append(("end", stage.name, stage.step, stage.total))

    def skip(self, stage: Stage, why: str) -> None:
        self.events.append(("skip", stage.name, why))

    def note(self, text: str) -> None:
        self.events.append(("note", text))

    def notes(self) -> list[str]:
        return [e[1] for e in self.events if e[0] == "note"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One export of cops-tiny (random weights, alpha overridden, Triton repository), reported
    to a Recorder, with stdout captured."""
    root = tmp_path_factory.mktemp("pipeline")
    cfg = ExportCfg(
        out=str(root / "bundle"),
        model="cops-tiny",
        random_weights=True,
        max_batch=4,
        triton=True,
        triton_dir=root / "triton",
        head_overrides={"head.alpha": 0.25},
    )
    recorder, stdout = Recorder(), io.StringIO()
    with contextlib.redirect_stdout(stdout):
        bundle = export_bundle(cfg, progress=recorder)
    return {"cfg": cfg, "bundle": bundle, "recorder": recorder, "stdout": stdout.getvalue()}


# ---------------------------------------------------------------------------------------------
# export_bundle


def test_returns_the_written_bundle_opened(exported):
    bundle = exported["bundle"]
    assert isinstance(bundle, Bundle) and bundle.root == exported["cfg"].out
    reopened = open_bundle(bundle.root, verify=True)
    assert reopened.manifest == bundle.manifest
    roles = {e.role for e in bundle.manifest.files}
    assert {"vision_onnx", "head_onnx", "vision_onnx_ort"} <= roles
    assert bundle.manifest.engines == {} and bundle.manifest.provenance.random_weights is True
    assert not any(p.name.startswith(".") for p in bundle.root.parent.iterdir())  # no temp left


def test_head_overrides_reach_model_and_graphs(exported):
    manifest = exported["bundle"].manifest
    assert manifest.model_config["head"]["alpha"] == 0.25
    model = create_model("cops-tiny", seed=0, **{"head.alpha": 0.25})
    images = synthetic_images(model.cfg, n=2, seed=3)
    root = exported["bundle"].root
    got = run_onnxruntime(
        root / "head.onnx", run_onnxruntime(root / "vision.onnx", {"image": images.numpy()})
    )
    with torch.no_grad():
        ref = model(images)
    np.testing.assert_allclose(got["pred_score"], ref.pred_score.numpy(), atol=TOL, rtol=0)
    parity = manifest.parity
    assert parity["anomaly_map_max_abs"] < TOL and parity["precision"] == "fp32"
    assert parity["ort_variant"]["pred_score_max_abs"] < TOL


def test_progress_reports_every_stage_in_order(exported):
    events = exported["recorder"].events
    staged = [e for e in events if e[0] != "note"]
    total = len(STAGES)  # with the Triton stage
    expected = []
    for step, name in enumerate(STAGES, start=1):
        if name == "fp16":
            expected.append(("skip", name, "precision fp32"))
        elif name == "engine":
            expected.append(("skip", name, "--engine onnx"))
        else:
            expected += [("begin", name, step, total), ("end", name, step, total)]
    assert staged == expected
    notes = exported["recorder"].notes()
    assert notes[0] == "note: random weights (smoke bundle); the manifest records it"
    assert any(n.startswith("ONNX Runtime vs PyTorch: anomaly map max diff") for n in notes)
    assert any(n.startswith("ONNX Runtime variant vs PyTorch") for n in notes)


def test_the_library_prints_nothing(exported):
    assert exported["stdout"] == ""


def test_triton_repository_at_triton_dir(exported):
    repo = exported["cfg"].triton_repo
    assert repo == exported["cfg"].triton_dir
    assert len(list(repo.rglob("config.pbtxt"))) == 3


def test_refuses_an_existing_bundle_before_any_work(exported, capsys):
    recorder = Recorder()
    cfg = exported["cfg"].replace(triton=False)
    with pytest.raises(BundleError, match="already exists.*--force"):
        export_bundle(cfg, recorder)
    assert recorder.events == [] and capsys.readouterr().out == ""


def test_refuses_random_clip_weights_and_writes_nothing(tmp_path):
    weights = save_model(create_model("cops-tiny", seed=1), tmp_path / "cops", include_clip=False)
    cfg = ExportCfg(out=tmp_path / "b", model="cops-tiny", weights=weights)
    with pytest.raises(ConfigError, match=r"CLIP \(--clip-weights\) weights would be random"):
        export_bundle(cfg)
    assert not (tmp_path / "b").exists()


def test_trt_without_tensorrt_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    recorder = Recorder()
    cfg = ExportCfg(out=tmp_path / "b", model="cops-tiny", random_weights=True, engine="trt")
    with pytest.raises(MissingDependencyError, match=r"pip install 'cops-deploy\[trt\]'"):
        export_bundle(cfg, recorder)
    assert recorder.events == [] and not (tmp_path / "b").exists()


def test_triton_without_writer_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "cops_deploy.export.triton", None)
    recorder = Recorder()
    cfg = ExportCfg(out=tmp_path / "b", model="cops-tiny", random_weights=True, triton=True)
    with pytest.raises(MissingDependencyError, match="write_triton_repository"):
        export_bundle(cfg, recorder)
    assert recorder.events == [] and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------
# add_engines (TensorRT faked: no GPU here)


@pytest.fixture
def fake_tensorrt(monkeypatch, tmp_path):
    """Replace TensorRT's import and cached build by fakes that write small engine files."""
    import cops_deploy.export.tensorrt as trt_build

    built: list[tuple[str, str, int, bool]] = []

    def fake_build(onnx_path, cache_dir, stem, precision, max_batch, force=False, **kw):
        built.append((stem, precision, max_batch, force))
        path = Path(cache_dir) / f"{stem}.engine"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"engine " + stem.encode())
        profile = trt_build.BatchProfile.from_max_batch(max_batch).describe()
        key = EngineKey(sha256_file(onnx_path), "10.13.0", "NVIDIA H200", "9.0", precision, profile)
        return path, key

    monkeypatch.setattr(trt_build, "import_tensorrt", lambda: types.SimpleNamespace())
    monkeypatch.setattr(trt_build, "build_engine_cached", fake_build)
    return built


@pytest.fixture
def bundle_copy(exported, tmp_path) -> Path:
    path = tmp_path / "bundle"
    shutil.copytree(exported["bundle"].root, path)
    return path


def test_add_engines_rewrites_the_bundle_with_keys(exported, bundle_copy, fake_tensorrt, capsys):
    recorder = Recorder()
    cache = bundle_copy.parent / "cache"
    bundle = add_engines(bundle_copy, engine_cache=cache, max_batch=2, progress=recorder)
    assert isinstance(bundle, Bundle) and bundle.root == bundle_copy
    reopened = open_bundle(bundle_copy, verify=True)
    engines = reopened.manifest.engines
    assert sorted(engines) == ["head.engine", "vision.engine"]
    assert engines["vision.engine"].onnx_sha256 == reopened.manifest.file("vision.onnx").sha256
    assert engines["head.engine"].profile == "b1-1-2"
    rewritten = {"files": (), "engines": {}, "created": ""}  # the fields a rewrite changes
    kept = dataclasses.replace(reopened.manifest, **rewritten)
    assert kept == dataclasses.replace(exported["bundle"].manifest, **rewritten)
    assert [(s, p, b) for s, p, b, _ in fake_tensorrt] == [
        ("vision", "fp32", 2),
        ("head", "fp32", 2),
    ]
    assert all((cache / f"{s}.engine").is_file() for s in ("vision", "head"))
    staged = [e for e in recorder.events if e[0] != "note"]
    assert staged == [
        ("begin", "engine", 1, 2),
        ("end", "engine", 1, 2),
        ("begin", "writing bundle", 2, 2),
        ("end", "writing bundle", 2, 2),
    ]
    assert recorder.notes()[0].startswith("vision: ") and "b1-1-2" in recorder.notes()[0]
    assert capsys.readouterr().out == ""


def test_add_engines_needs_force_to_replace_engines(bundle_copy, fake_tensorrt, capsys):
    add_engines(bundle_copy, engine_cache=bundle_copy.parent / "cache")
    assert capsys.readouterr().out == ""  # silent without a progress
    before = (bundle_copy / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match=r"already has engines.*--force \(force=True\)"):
        add_engines(bundle_copy, engine_cache=bundle_copy.parent / "cache")
    assert (bundle_copy / "manifest.json").read_bytes() == before
    add_engines(bundle_copy, engine_cache=bundle_copy.parent / "cache", force=True, rebuild=True)
    assert fake_tensorrt[-1] == ("head", "fp32", 8, True)


def test_add_engines_refuses_bad_max_batch(bundle_copy, fake_tensorrt):
    with pytest.raises(ConfigError, match="--max-batch must be >= 1, got 0"):
        add_engines(bundle_copy, max_batch=0)
    assert fake_tensorrt == []


def test_add_engines_without_tensorrt(bundle_copy, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(MissingDependencyError, match="tensorrt"):
        add_engines(bundle_copy)


def test_add_engines_refuses_a_non_bundle(tmp_path, fake_tensorrt):
    with pytest.raises(BundleError, match="does not exist"):
        add_engines(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------
# ExportCfg


def good(**changes: Any) -> dict[str, Any]:
    return {"out": "b", "model": "cops-tiny", "random_weights": True, **changes}


def test_cfg_normalises_paths_and_defaults():
    cfg = ExportCfg(**good(engine_cache="cache"))
    assert cfg.out == Path("b") and cfg.engine_cache == Path("cache")
    assert cfg.triton_repo == Path("b-triton")
    assert cfg.replace(triton_dir="t").triton_repo == Path("t")
    assert (cfg.engine, cfg.precision, cfg.max_batch, cfg.opset) == ("onnx", "fp32", 8, 20)
    assert cfg.ort_variant is True and dict(cfg.head_overrides) == {}


def test_cfg_is_frozen_and_its_overrides_read_only():
    overrides = {"head.beta": 0.5}
    cfg = ExportCfg(**good(head_overrides=overrides))
    overrides["head.beta"] = 0.1  # the caller's dict is copied
    assert cfg.head_overrides["head.beta"] == 0.5
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.precision = "fp16"  # type: ignore[misc]
    with pytest.raises(TypeError):
        cfg.head_overrides["head.beta"] = 0.2  # type: ignore[index]


def test_weights_alone_need_no_random_flag():
    ExportCfg(out="b", model="cops-tiny", weights="w.pth")
    ExportCfg(out="b", model="cops-tiny", clip_weights="openai")


def test_default_engine_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_engine_cache() == tmp_path / "cops-deploy" / "engines"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"out": None}, "--out is required"),
        ({"out": 3}, r"invalid ExportCfg.out 3 \(int\); valid: a path"),
        ({"triton_dir": 3.5}, "invalid ExportCfg.triton_dir 3.5"),
        ({"engine_cache": ["c"]}, "invalid ExportCfg.engine_cache"),
        ({"max_batch": 0}, "--max-batch must be >= 1, got 0"),
        ({"max_batch": True}, "--max-batch must be >= 1, got True"),
        ({"max_batch": "8"}, "--max-batch must be >= 1, got '8'"),
        ({"parity_images": 0}, "--parity-images must be >= 1, got 0"),
        ({"opset": 16}, "--opset must be >= 17, got 16"),
        ({"seed": "0"}, r"invalid ExportCfg.seed '0' \(str\); valid: an integer"),
        ({"engine": "tvm"}, r"invalid ExportCfg.engine 'tvm' \(--engine\); valid: 'onnx', 'trt'"),
        ({"precision": "bf16"}, r"invalid ExportCfg.precision 'bf16'.*valid: 'fp32', 'fp16'"),
        ({"random_weights": False}, "no weights given.*--random-weights"),
        ({"model": "nope"}, r"ExportCfg.model 'nope' \(--model\): unknown CoPS model 'nope'"),
        ({"model": None}, r"invalid ExportCfg.model None \(NoneType\)"),
        ({"head_overrides": [("head.alpha", 1)]}, "invalid ExportCfg.head_overrides"),
        ({"head_overrides": {"vision.width": 64}}, "key 'vision.width'; valid: .*head.alpha"),
        ({"head_overrides": {"head.nope": 1}}, "key 'head.nope'"),
        ({"head_overrides": {"head.alpha": "x"}}, r"head_overrides\['head.alpha'\] 'x'"),
        ({"head_overrides": {"head.neighbour_kernel": 3.0}}, "valid: an integer"),
        ({"head_overrides": {"head.neighbour_kernel": 4}}, "neighbour_kernel must be odd"),
    ],
)
def test_cfg_refusals(changes, message):
    with pytest.raises(ConfigError, match=message) as info:
        ExportCfg(**good(**changes))
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    "name", ["random_weights", "force", "triton", "torch_weights", "rebuild_engines", "ort_variant"]
)
def test_cfg_refuses_non_bool_flags(name):
    with pytest.raises(ConfigError, match=f"invalid ExportCfg.{name} 'yes'.*True or False"):
        ExportCfg(**good(**{name: "yes"}))


def test_replace_validates_again():
    with pytest.raises(ConfigError, match="--max-batch must be >= 1"):
        ExportCfg(**good()).replace(max_batch=-1)
