"""The export pipeline as a library: ExportCfg's refusals, export_bundle on cops-tiny with random
weights (the bundle it returns, the progress it reports, silence by default), and add_engines
with a faked TensorRT builder."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cops_deploy import create_model, save_model
from cops_deploy.configs import get_config
from cops_deploy.errors import BundleError, ConfigError, MissingDependencyError
from cops_deploy.export.bundle_writer import BundleWriter
from cops_deploy.export.onnx_export import run_onnxruntime, synthetic_images
from cops_deploy.export.pipeline import (
    PARITY_TOLERANCES,
    STAGES,
    ExportCfg,
    Stage,
    add_engines,
    check_parity,
    default_engine_cache,
    export_bundle,
)
from cops_deploy.runtime.bundle import Bundle, open_bundle, sha256_file
from cops_deploy.runtime.manifest import EngineKey, Provenance

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
    "name",
    [
        "random_weights",
        "force",
        "triton",
        "torch_weights",
        "rebuild_engines",
        "ort_variant",
        "allow_parity_drift",
    ],
)
def test_cfg_refuses_non_bool_flags(name):
    with pytest.raises(ConfigError, match=f"invalid ExportCfg.{name} 'yes'.*True or False"):
        ExportCfg(**good(**{name: "yes"}))


def test_replace_validates_again():
    with pytest.raises(ConfigError, match="--max-batch must be >= 1"):
        ExportCfg(**good()).replace(max_batch=-1)


# ---------------------------------------------------------------------------------------------
# Parity gate: a bundle that drifts from PyTorch is not written unless allowed


def test_parity_is_recorded_with_its_tolerance(exported):
    parity = exported["bundle"].manifest.parity
    assert parity["tolerance"] == dict(PARITY_TOLERANCES["fp32"])
    assert "drift_allowed" not in parity
    assert check_parity(parity, "fp32") == []


def test_check_parity_names_each_drifting_output():
    good = {"anomaly_map_max_abs": 1e-6, "pred_score_max_abs": 1e-7}
    assert check_parity(good, "fp32") == []
    assert check_parity({**good, "anomaly_map_max_abs": 2e-3}, "fp16") == []
    drifted = {
        **good,
        "pred_score_max_abs": 0.25,
        "ort_variant": {**good, "anomaly_map_max_abs": 3e-4},
    }
    assert check_parity(drifted, "fp32") == [
        "pred_score_max_abs 0.25 > 1e-05",
        "ort_variant.anomaly_map_max_abs 0.0003 > 0.0001",
    ]
    assert check_parity({**good, "anomaly_map_max_abs": float("nan")}, "fp32") == [
        "anomaly_map_max_abs nan > 0.0001"
    ]
    assert check_parity({"pred_score_max_abs": 0.0}, "fp32") == [
        "anomaly_map_max_abs None (no finite figure)"
    ]


@pytest.fixture
def drifting_graphs(monkeypatch):
    """The parity measurement sees an anomaly map 0.01 off (as if a graph computed another
    function): ONNX Runtime's head output is corrupted where export measures it."""
    from cops_deploy.export import onnx_export

    real = onnx_export.run_onnxruntime

    def corrupted(path, feed):
        outputs = real(path, feed)
        if "anomaly_map" in outputs:
            outputs["anomaly_map"] = outputs["anomaly_map"] + np.float32(0.01)
        return outputs

    monkeypatch.setattr(onnx_export, "run_onnxruntime", corrupted)


def test_drifting_export_is_refused_by_cops_export(tmp_path, drifting_graphs, capsys):
    from cops_deploy.cli.export import main

    out = tmp_path / "b"
    argv = ["--model", "cops-tiny", "--random-weights", "--no-ort-variant", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "parity check failed, no bundle written" in err
    assert re.search(r"anomaly_map_max_abs 0\.01\d* > 0\.0001", err), err
    assert "--allow-parity-drift" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporaries


def test_drifting_export_allowed_is_written_and_recorded(tmp_path, drifting_graphs):
    recorder = Recorder()
    cfg = ExportCfg(
        out=tmp_path / "b",
        model="cops-tiny",
        random_weights=True,
        ort_variant=False,
        allow_parity_drift=True,
    )
    bundle = export_bundle(cfg, recorder)
    drift = bundle.manifest.parity["drift_allowed"]
    assert len(drift) == 1 and drift[0].startswith("anomaly_map_max_abs 0.01")
    assert any(n.startswith("warning: parity exceeds the fp32 tolerance") for n in recorder.notes())


def test_cli_flag_reaches_the_cfg():
    from cops_deploy.cli.export import build_parser, export_cfg

    base = ["--model", "cops-tiny", "--random-weights", "--out", "b"]
    assert export_cfg(build_parser().parse_args(base)).allow_parity_drift is False
    args = build_parser().parse_args([*base, "--allow-parity-drift"])
    assert export_cfg(args).allow_parity_drift is True


# ---------------------------------------------------------------------------------------------
# An interrupted export leaves nothing behind


def _start_export(out: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "cops_deploy.cli.export", "--model", "cops-tiny"]
    command += ["--random-weights", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for_work_dir(proc: subprocess.Popen, out: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(f".{out.name}.work-") for p in out.parent.iterdir()):
            return
        if proc.poll() is not None:
            pytest.fail(f"the export ended before it began: {proc.communicate()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail("the export made no work folder in time")


def test_sigterm_stops_an_export_and_removes_its_temporaries(tmp_path):
    out = tmp_path / "b"
    proc = _start_export(out)
    _wait_for_work_dir(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert b"stopped by SIGTERM; temporary folders removed" in err
    assert b"Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_killed_export_is_cleaned_by_the_next_writer(tmp_path):
    out = tmp_path / "b"
    proc = _start_export(out)
    _wait_for_work_dir(proc, out)
    proc.kill()  # SIGKILL: nothing can clean up
    proc.communicate(timeout=120)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert any(".work-" in name for name in left) and any(".tmp-" in name for name in left)
    with BundleWriter(out) as writer:  # the next writer of this bundle removes them
        assert sorted(p.name for p in tmp_path.iterdir() if p != writer.staging_dir) == []
        writer.add_bytes(b"", "vision.onnx", "vision_onnx")  # an empty file is a valid ONNX
        writer.add_bytes(b"", "head.onnx", "head_onnx")  # protobuf (no graph)
        writer.set_metadata(
            model_config=get_config("cops-tiny").to_dict(),
            graphs={},
            provenance=Provenance(random_weights=True),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
