"""The GPU check runs end to end before a GPU is lent: a CPU dry run of every stage on cops-tiny
(in a fresh interpreter without onnx, onnxruntime, jsonschema, TensorRT or cuda-python, as on
the PyTorch-only GPU machine), every path built on the ``meta`` device (CUDA's stand-in for
device placement), the JSON written after every stage, failures recorded, and parity gated on
the outputs of the runner that was timed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import gpu_check
import numpy as np
import pytest
import torch

HERE = Path(__file__).resolve().parent
# Absent on the GPU machine (PyTorch + CUDA only): the check must not need them.
ABSENT = ("onnx", "onnxruntime", "onnxscript", "jsonschema", "openvino", "tensorrt", "cuda")
BLOCK_AND_RUN = (
    "import runpy, sys\n"
    "for name in {absent!r}:\n"
    "    sys.modules[name] = None  # import fails, as where the package is not installed\n"
    "sys.argv = ['gpu_check.py', *{argv!r}]\n"
    "runpy.run_path({script!r}, run_name='__main__')\n"
)


def args_for(tmp_path: Path, **over: object) -> argparse.Namespace:
    base = ["--device", "cpu", "--arch", "cops-tiny", "--out", str(tmp_path)]
    args = gpu_check.parse_args([*base, "--images", "1", "--batch", "2", "--repeats", "1"])
    for key, value in over.items():
        setattr(args, key, value)
    return args


def read(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "gpu_check.json").read_text())


def test_cpu_dry_run_end_to_end_without_build_packages(tmp_path: Path) -> None:
    """Every stage runs and is parity-gated on CPU (fp16/bf16 too); only the latency gate may
    fail on a CPU. One thread: the 2-core test machine is shared."""
    argv = ["--device", "cpu", "--arch", "cops-tiny", "--out", str(tmp_path)]
    argv += ["--compare-arch", "anomalyclip-tiny"]
    argv += ["--images", "1", "--batch", "2", "--repeats", "1", "--budget-s", "1000"]
    code = BLOCK_AND_RUN.format(absent=ABSENT, argv=argv, script=str(HERE / "gpu_check.py"))
    root = str(HERE.parent)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]
    result = read(tmp_path)
    stages = result["stages"]
    assert list(stages) == [
        "fp32_reference",
        "reference_eager_fp32",
        "reference_eager_fp16",
        "deploy_fp16_sdpa",
        "deploy_bf16_sdpa",
        "exported_fp16",
        "exported_fp16_fp16_logits",
        "compare_fp32_reference",
        "compare_deploy_fp16_sdpa",
    ]
    assert {name: s["status"] for name, s in stages.items()} == dict.fromkeys(stages, "ok")
    for name in (
        "deploy_fp16_sdpa",
        "deploy_bf16_sdpa",
        "exported_fp16",
        "compare_deploy_fp16_sdpa",
    ):
        entry = stages[name]
        assert entry["runner"].startswith("eager")  # said, not hidden: no CUDA graphs on a CPU
        assert entry["batch1"]["p50_ms"] > 0 and entry["batch2"]["img_per_s"] > 0
        assert entry["parity"]["finite"] and entry["parity_batch2"]["finite"]
    gates = result["gates"]
    latency = "deploy_fp16_sdpa p50 < paper 168.0 ms"
    assert latency in gates and "deploy_fp16_sdpa p50 < 15.0 ms" in result["target"]
    assert all(ok for gate, ok in gates.items() if gate != latency), gates
    assert result["status"] == ("pass" if gates[latency] else "fail")
    assert proc.returncode == (0 if gates[latency] else 1)
    assert "fp32_logits_cost_ratio" in result
    assert "compare_deploy_fp16_sdpa parity map max diff <= 0.01" in gates  # AnomalyCLIP gated
    side = result["side_by_side"]  # CoPS and AnomalyCLIP timed in one run
    p50 = side["fp16 batch 1 p50_ms"]
    assert p50["cops-tiny"] > 0 and p50["anomalyclip-tiny"] > 0
    assert side["ratio"] == p50["cops-tiny"] / p50["anomalyclip-tiny"]


def test_meta_device_builds_every_path(tmp_path: Path) -> None:
    """The model on ``meta`` (CUDA's stand-in): every deploy path builds and runs there, so no
    constant is created on the CPU beside weights on another device (AnomalyCLIP's too)."""
    argv = ["--device", "meta", "--arch", "cops-tiny", "--out", str(tmp_path)]
    assert gpu_check.main([*argv, "--compare-arch", "anomalyclip-tiny"]) == 0
    result = read(tmp_path)
    assert len(result["stages"]) == 7
    for name, entry in result["stages"].items():
        assert entry["status"] == "ok", (name, entry.get("error"))
        assert entry["output_devices"] == entry["weight_and_constant_devices"] == ["meta"]
    assert result["status"] == "pass"


def test_a_failed_stage_is_recorded_and_gated(tmp_path: Path) -> None:
    check = gpu_check.Check(args_for(tmp_path))
    assert read(tmp_path)["status"] == "running"  # written before the first stage

    def capture_fails() -> dict:
        raise RuntimeError("CUDA graph capture failed")

    check.stage("deploy_fp16_sdpa", capture_fails)
    entry = read(tmp_path)["stages"]["deploy_fp16_sdpa"]
    assert entry["status"] == "failed"
    assert entry["error"] == "RuntimeError: CUDA graph capture failed"
    check.stage("exported_fp16", lambda: {"batch1": {"p50_ms": 1.0}})
    check.gates()
    result = read(tmp_path)
    assert result["stages"]["exported_fp16"]["status"] == "ok"  # later stages still run
    assert result["gates"]["no stage failed"] is False
    assert result["gates"]["deploy_fp16_sdpa ran"] is False
    assert result["gates"]["deploy_fp16_sdpa p50 < paper 168.0 ms"] is False  # no eager stand-in
    assert result["status"] == "fail"


def test_a_crash_keeps_the_figures_measured_before_it(tmp_path: Path) -> None:
    check = gpu_check.Check(args_for(tmp_path))
    check.stage("fp32_reference", lambda: {"eager": {"p50_ms": 12.5}})

    def killed() -> dict:
        raise KeyboardInterrupt  # not an Exception: the process dies here

    with pytest.raises(KeyboardInterrupt):
        check.stage("reference_eager_fp16", killed)
    result = read(tmp_path)
    assert result["stages"]["fp32_reference"]["eager"]["p50_ms"] == 12.5
    assert result["status"] == "running"


def test_stages_past_the_time_budget_are_skipped_and_said(tmp_path: Path) -> None:
    check = gpu_check.Check(args_for(tmp_path, budget_s=-1.0))
    check.stage("deploy_bf16_sdpa", lambda: pytest.fail("must not run"))
    entry = read(tmp_path)["stages"]["deploy_bf16_sdpa"]
    assert entry["status"] == "skipped" and "time budget" in entry["reason"]


def test_parity_is_gated_on_the_timed_runner(tmp_path: Path, monkeypatch) -> None:
    """deploy_path compares the outputs of the runner it times (the CUDA-graph replays on a
    GPU, the eager runner here): perturb that runner's outputs and the parity gate fails."""
    from cops_deploy import create_model
    from cops_deploy.export.graphs import DeployModel
    from cops_deploy.export.onnx_export import synthetic_images

    model = create_model("cops-tiny", seed=0)
    images = synthetic_images(model.cfg, 1, seed=3)
    deploy = DeployModel(model).eval()
    check = gpu_check.Check(args_for(tmp_path))
    check.stage("fp32_reference", lambda: check.reference(model, images))
    check.stage("deploy_fp16_sdpa", lambda: check.deploy_path(deploy, images))
    good = read(tmp_path)["stages"]["deploy_fp16_sdpa"]
    assert good["parity"]["map_max_diff"] < 1e-5 and good["parity_batch2"]["map_max_diff"] < 1e-5

    timed_call = gpu_check.EagerRunner.__call__

    def drifted(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        score, amap = timed_call(self, x)
        return score, amap + 0.5

    monkeypatch.setattr(gpu_check.EagerRunner, "__call__", drifted)
    check.stage("deploy_fp16_sdpa", lambda: check.deploy_path(deploy, images))
    check.gates()
    result = read(tmp_path)
    assert np.isclose(result["stages"]["deploy_fp16_sdpa"]["parity"]["map_max_diff"], 0.5)
    assert result["gates"]["deploy_fp16_sdpa parity map max diff <= 0.01"] is False
    assert result["gates"]["deploy_fp16_sdpa parity_batch2 map max diff <= 0.01"] is False


def test_stages_selects_what_runs_and_what_is_gated(tmp_path: Path) -> None:
    """--stages runs (and gates) only the stages it names; fp32_reference is required."""
    args = args_for(tmp_path, stages="fp32_reference,deploy_fp16_sdpa", compare_arch="")
    gpu_check.run(args)
    result = read(tmp_path)
    assert list(result["stages"]) == ["fp32_reference", "deploy_fp16_sdpa"]
    gates = result["gates"]
    assert "deploy_fp16_sdpa parity map max diff <= 0.01" in gates
    assert not any(g.startswith(("reference_eager", "exported", "compare")) for g in gates)
    assert gpu_check.run(args_for(tmp_path, stages="deploy_fp16_sdpa")) == 2
    assert gpu_check.run(args_for(tmp_path, stages="fp32_reference,fast")) == 2
