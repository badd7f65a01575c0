"""Parity and latency of every backend available here, side by side with reference-eager.

For each architecture: one test per backend measures it (parity against PyTorch fp32 on a
labelled synthetic set, I-/P-AUROC, p50/p90 latency at batch 1 after warm-up, throughput at a
larger batch, peak memory), then the gate tests compare the figures with their limits (see
conftest.py for the options). Figures are absolute and as ratios to reference-eager measured in
the same run.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from bench_lib import (
    FULL,
    RESULTS,
    BenchBackend,
    PeakRSS,
    auroc_resolution,
    aurocs,
    best_rates,
    count_flops,
    default_backends,
    explicit_attention,
    gemm_rates,
    labelled_set,
    onnxruntime_backend,
    openvino_backend,
    percentile,
    record_gate,
    record_not_gated,
    reference_backend,
    rss_bytes,
    time_runs,
    torch_backend,
)
from bench_lib import (
    floors as floor_seconds,
)

from cops_deploy import create_model
from cops_deploy.configs import get_config
from cops_deploy.errors import ConfigError, MissingDependencyError

BACKENDS = [
    "reference-eager/fp32",
    "torch-eager/fp32",
    "torch-deploy/fp32",
    "onnxruntime-portable/fp32",
    "onnxruntime/fp32",
    "onnxruntime/fp16",
    "openvino/fp32",
    "torch-deploy/bf16",
    "openvino/bf16",
    "tensorrt/fp16",
]
# The Detector backends whose cold start (open, first predict, steady state) is measured.
COLD_START = ["onnxruntime/fp32", "openvino/fp32", "openvino/bf16"]
MIB = 2**20


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "arch" in metafunc.fixturenames:
        opts = metafunc.config
        quick = opts.getoption("--bench-quick")
        archs = opts.getoption("--bench-arch") or (["cops-tiny"] if quick else ["cops-tiny", FULL])
        metafunc.parametrize("arch", archs, scope="module")


def _plan(arch: str, quick: bool, repeats: int | None) -> dict[str, int]:
    if not arch.split("@")[0].endswith("-tiny"):  # a full-size model (CoPS or AnomalyCLIP)
        return {
            "good": 2,
            "bad": 2,
            "warmup": 1,
            "repeats": repeats or 3,
            "tp_batch": 2,
            "tp_repeats": 1,
        }
    # 64 + 64: an I-AUROC step of 1/4096 = 2.4e-4, a quarter of the fp32 gate's 1e-3.
    return {
        "good": 64,
        "bad": 64,
        "warmup": 2,
        "repeats": repeats or (8 if quick else 20),
        "tp_batch": 8,
        "tp_repeats": 2 if quick else 5,
    }


def _export(arch: str, precision: str, out: Path, reuse: bool = False) -> Path:
    from cops_deploy.errors import CopsError
    from cops_deploy.export.pipeline import ExportCfg, export_bundle

    cfg = ExportCfg(
        out=out,
        model=arch,
        random_weights=True,
        seed=0,
        engine="onnx",
        precision=precision,
        max_batch=8,
        parity_images=1,
        force=True,
    )
    if reuse and (out / "manifest.json").is_file():
        return out
    try:
        return export_bundle(cfg).root
    except CopsError as exc:
        pytest.fail(f"export of {arch} {precision} failed: {exc}")


@pytest.fixture(scope="session")
def machine_rates(bench_opts, tmp_path_factory) -> dict[str, float]:
    """Every library's GEMM rate (torch, ONNX Runtime, OpenVINO; fp32 and bf16); the best per
    precision is the floors' rate."""
    threads = bench_opts["threads"]
    if threads:
        torch.set_num_threads(threads)
    n, repeats = (2048, 4) if bench_opts["quick"] else (3072, 6)
    measured = gemm_rates(tmp_path_factory.mktemp("gemm"), threads, n=n, repeats=repeats)
    best = best_rates(measured)
    RESULTS["gemm"] = {"n": n, "rates": [dataclasses.asdict(r) for r in measured]}
    RESULTS["gemm_gflops"] = {p: r.gflops for p, r in best.items()}
    RESULTS["gemm_best"] = {p: r.library for p, r in best.items()}
    for r in measured:
        shown = f"{r.gflops:.0f} GFLOP/s" if r.gflops is not None else f"n/a ({r.note})"
        print(f"GEMM {n}^3 {r.library} {r.precision}: {shown}")
    return RESULTS["gemm_gflops"]


@pytest.fixture(scope="module")
def ctx(arch, bench_opts, machine_rates, tmp_path_factory) -> dict[str, Any]:
    """The model, its fp32 outputs on the labelled set, the bundles, FLOPs and floors."""
    from cops_deploy.export.graphs import DeployModel

    plan = _plan(arch, bench_opts["quick"], bench_opts["repeats"])
    model = create_model(arch, seed=0)
    pre = model.cfg.preprocess
    data = labelled_set(tmp_path_factory.mktemp("synth"), pre, plan["good"], plan["bad"])
    with torch.inference_mode():
        outs = [model(torch.from_numpy(data.images[i : i + 1])) for i in range(len(data.labels))]
    ref_scores = np.concatenate([o.pred_score.numpy() for o in outs])
    ref_maps = np.concatenate([o.anomaly_map.numpy() for o in outs])
    x1 = torch.from_numpy(data.images[:1])
    # Count with explicit attention: torch's counter does not see the CPU flash-attention kernel.
    with explicit_attention(model):
        deploy = DeployModel(model, attn_impl="explicit")
        flops = {
            "deploy": count_flops(deploy, x1),
            "vision": count_flops(deploy.vision, x1),
            "eager": count_flops(model, x1),
        }
    floors = floor_seconds(flops, machine_rates)
    bundles = bench_opts["out"] / "bundles"
    record = RESULTS["archs"].setdefault(arch, {"backends": {}})
    record.update(
        flops=flops, floors=floors, plan=plan, reference_metrics=aurocs(ref_scores, ref_maps, data)
    )
    print(
        f"{arch}: {flops['deploy'] / 1e12:.3f} TFLOP per image (deploy pipeline; vision graph "
        f"{flops['vision'] / 1e12:.3f}), "
        f"{flops['eager'] / 1e12:.3f} (eager); floors "
        + ", ".join(f"{p} {f:.3f} s" for p, f in floors.items())
    )
    return {
        "model": model,
        "data": data,
        "plan": plan,
        "scores": ref_scores,
        "maps": ref_maps,
        "bundles": bundles,
        "bundle_dirs": {},
        "arch": arch,
        "record": record,
        "reuse": bench_opts["reuse"],
    }


def _bundle(ctx: dict[str, Any], precision: str) -> Path:
    """The bundle of ``precision`` for this architecture, exported on first use (outside any
    measurement)."""
    if precision not in ctx["bundle_dirs"]:
        out = ctx["bundles"] / f"{ctx['arch']}-{precision}"
        ctx["bundle_dirs"][precision] = _export(ctx["arch"], precision, out, ctx["reuse"])
    return ctx["bundle_dirs"][precision]


def _make_backend(key: str, ctx: dict[str, Any], threads: int | None) -> BenchBackend:
    from cops_deploy.export.fp16 import to_fp16
    from cops_deploy.export.graphs import DeployModel

    name, precision = key.split("/")
    model = ctx["model"]
    if name == "reference-eager":
        return reference_backend(model)
    if name == "torch-eager":
        return torch_backend(name, model)
    if name == "torch-deploy":
        deploy = DeployModel(model)
        if precision == "bf16":
            deploy.vision = to_fp16(deploy.vision, torch.bfloat16)
        return torch_backend(name, deploy, precision)
    if name in ("onnxruntime", "onnxruntime-portable"):
        variant = "portable" if name == "onnxruntime-portable" else "auto"
        return onnxruntime_backend(ctx["bundle_dirs"][precision], precision, threads, variant)
    if name == "openvino":
        try:  # not installed, or no bf16 on this CPU: the backend's own refusal says which
            return openvino_backend(ctx["bundle_dirs"]["fp32"], precision, threads)
        except (MissingDependencyError, ConfigError) as exc:
            pytest.skip(f"OpenVINO {precision} cannot run here: {exc}")
    if name == "tensorrt":
        try:
            import tensorrt  # noqa: F401
        except ImportError:
            pytest.skip("TensorRT is not installed here (needs an NVIDIA GPU): no TensorRT figures")
        pytest.skip(
            "TensorRT benchmark needs a bundle built on this GPU (cops-export --engine trt)"
        )
    raise AssertionError(key)


def _run_all(backend: BenchBackend, images: np.ndarray, batch: int) -> tuple[np.ndarray, ...]:
    step = 1 if backend.batch1_only else batch
    parts = [backend.run(images[i : i + step]) for i in range(0, len(images), step)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@pytest.mark.bench
@pytest.mark.parametrize("key", BACKENDS)
def test_backend(key, ctx, bench_opts):
    """Measure one backend: parity, AUROC, latency, throughput, memory."""
    plan, data = ctx["plan"], ctx["data"]
    name, precision = key.split("/")
    if name.startswith(("onnxruntime", "openvino")):  # OpenVINO runs the fp32 bundle
        _bundle(ctx, "fp32" if name == "openvino" else precision)
    gc.collect()
    before = rss_bytes()
    with PeakRSS() as mem:
        backend = _make_backend(key, ctx, bench_opts["threads"])
        scores, maps = _run_all(backend, data.images, plan["tp_batch"])
        x1 = data.images[:1]
        times = time_runs(lambda: backend.run(x1), plan["warmup"], plan["repeats"])
        tp_batch = 1 if backend.batch1_only else plan["tp_batch"]
        xb = np.concatenate([data.images] * (tp_batch // len(data.images) + 1))[:tp_batch]
        tp_times = time_runs(lambda: backend.run(xb), 0, plan["tp_repeats"])
    diff = np.abs(maps - ctx["maps"])
    entry = {
        "p50": percentile(times, 50),
        "p90": percentile(times, 90),
        "times": times,
        "throughput": tp_batch / statistics.median(tp_times),
        "throughput_batch": tp_batch,
        "peak_rss_mib": mem.peak / MIB,
        "backend_rss_mib": (mem.peak - before) / MIB,
        "map_max_diff": float(diff.max()),
        "map_median_diff": float(np.median(diff)),
        "score_max_diff": float(np.abs(scores - ctx["scores"]).max()),
        "provider": getattr(backend, "provider", "torch"),
        "compiled_precision": backend.compiled_precision,
        **aurocs(scores, maps, data),
    }
    floor = ctx["record"]["floors"].get(precision)
    if floor:  # every backend's distance from the floor of its precision, reported
        entry["floor_ratio"] = entry["p50"] / floor
    backend.close()
    ctx["record"]["backends"][key] = entry
    ref = ctx["record"]["backends"].get("reference-eager/fp32")
    if ref:
        entry["speedup_vs_reference"] = ref["p50"] / entry["p50"]
        entry["throughput_vs_reference"] = entry["throughput"] / ref["throughput"]
    print(
        f"{ctx['arch']} {key}: p50 {entry['p50']:.4f} s, p90 {entry['p90']:.4f} s, "
        f"{entry['throughput']:.3g} img/s at batch {tp_batch}, map max diff "
        f"{entry['map_max_diff']:.3g}, score diff {entry['score_max_diff']:.3g}, peak RSS "
        f"{entry['peak_rss_mib']:.0f} MiB"
    )


def _backends(ctx: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = ctx["record"]["backends"]
    if not found:
        pytest.skip("no backend was measured")
    return found


def _auroc_steps(data: Any) -> dict[str, float]:
    """The AUROC step (one pair of n_pos * n_neg) of each metric on the labelled set: images
    for I-AUROC, pixels for P-AUROC."""
    return {"I-AUROC": auroc_resolution(data.labels), "P-AUROC": auroc_resolution(data.masks)}


@pytest.mark.bench
def test_gate_parity(ctx, bench_opts):
    """Each precision against PyTorch fp32: map max diff, score diff, and the I-/P-AUROC
    difference where the labelled set resolves the limit (one flipped pair of n_pos * n_neg
    at most a quarter of it); a coarser difference is reported, not gated."""
    g = bench_opts["gates"]
    ref_metrics = ctx["record"]["reference_metrics"]
    steps = _auroc_steps(ctx["data"])
    ctx["record"]["auroc_steps"] = steps
    ok = True
    # An AnomalyCLIP map is the sum of one [0, 1] map per feature layer (range [0, L]): the map
    # limit scales with L so that it is the same relative limit as CoPS's [0, 1] map.
    map_range = get_config(ctx["arch"]).patch_sets
    for key, b in _backends(ctx).items():
        lowp = not key.endswith("fp32")
        kind = "lowp" if lowp else "fp32"
        ok &= record_gate(
            f"{ctx['arch']} {key} map max diff", b["map_max_diff"], g[f"map-{kind}"] * map_range
        )
        ok &= record_gate(
            f"{ctx['arch']} {key} score diff", b["score_max_diff"], g[f"score-{kind}"]
        )
        for metric in ("I-AUROC", "P-AUROC"):
            if b.get(metric) is None or ref_metrics.get(metric) is None:
                continue
            delta = abs(b[metric] - ref_metrics[metric])
            name = f"{ctx['arch']} {key} {metric} difference"
            limit = g[f"auroc-{kind}"]
            if steps[metric] <= limit / 4:
                ok &= record_gate(name, delta, limit)
            else:
                record_not_gated(
                    name,
                    delta,
                    f"step {steps[metric]:.3g} of this labelled set is coarser than a quarter of "
                    f"the {limit:g} limit (64+64 images at this size cost too much time)",
                )
    assert ok, "a parity gate failed (see the printed gates)"


@pytest.mark.bench
def test_gate_bf16_really_runs_bf16(ctx, bench_opts):
    """Each bf16 backend runs bfloat16: the runtime's compiled precision read back says bf16
    (OpenVINO's INFERENCE_PRECISION_HINT), and its maps are as far from fp32 as the independent
    bf16 reference's (torch-deploy/bf16, the vision tower cast to bfloat16 by torch): an fp32
    run is ~1e4 times closer and fails the ratio."""
    found = _backends(ctx)
    reference = found.get("torch-deploy/bf16")
    others = {k: b for k, b in found.items() if k.endswith("/bf16") and k != "torch-deploy/bf16"}
    if not others:
        pytest.skip("no bf16 backend besides the torch reference was measured")
    ok = True
    for key, b in others.items():
        if b.get("compiled_precision") is not None:
            ok &= record_gate(
                f"{ctx['arch']} {key} compiled precision is bf16 (1 = no)",
                float(b["compiled_precision"] != "bf16"),
                0.0,
            )
        if reference is not None:
            ratio = reference["map_median_diff"] / max(b["map_median_diff"], 1e-12)
            ok &= record_gate(
                f"{ctx['arch']} torch-deploy/bf16 map median diff / {key}'s",
                ratio,
                bench_opts["gates"]["bf16-evidence"],
            )
    assert ok, "a bf16 path does not run bfloat16 (see the printed gates)"


@pytest.mark.bench
def test_gate_latency_vs_reference(ctx, bench_opts):
    """The fastest deployed fp32 backend against reference-eager, measured in the same run."""
    found = _backends(ctx)
    ref = found.get("reference-eager/fp32")
    deployed = {
        k: b
        for k, b in found.items()
        if k.endswith("fp32") and "reference" not in k and "eager" not in k
    }
    if not ref or not deployed:
        pytest.skip("reference-eager or no deployed fp32 backend was measured")
    best_key = min(deployed, key=lambda k: deployed[k]["p50"])
    ratio = deployed[best_key]["p50"] / ref["p50"]
    print(
        f"{ctx['arch']}: fastest fp32 deploy backend {best_key}, "
        f"{1 / ratio:.2f}x faster than reference-eager"
    )
    assert record_gate(
        f"{ctx['arch']} {best_key} p50 / reference-eager p50",
        ratio,
        bench_opts["gates"]["ref-ratio"],
    )


@pytest.mark.bench
def test_gate_cpu_floors(ctx, bench_opts):
    """CPU targets on the full architecture: the DEFAULT backend of each precision (what
    Detector.open runs when none is named: the registry's auto order) at most 1.1x (fp32) /
    1.3x (bf16) the FLOP floor set by the best GEMM rate of any library in this run. Every
    backend's ratio is reported beside it."""
    found = _backends(ctx)
    record = ctx["record"]
    defaults = default_backends(_bundle(ctx, "fp32"))
    record["default_backends"] = defaults
    for key, b in found.items():
        if b.get("floor_ratio") is not None:
            record_not_gated(f"{ctx['arch']} {key} p50 / floor", b["floor_ratio"], "reported")
    if ctx["arch"] not in bench_opts["floor_archs"]:
        pytest.skip(f"the FLOP-floor targets are set for {FULL}; overheads dominate tiny models")
    if torch.cuda.is_available():
        pytest.skip("CPU targets; this run has a GPU")
    ok = True
    for precision, limit in (("fp32", "floor-fp32"), ("bf16", "floor-bf16")):
        key = f"{defaults.get(precision)}/{precision}"
        ratio = found[key]["floor_ratio"] if key in found else None
        ok &= record_gate(
            f"{ctx['arch']} CPU {precision} default {key} p50 / {precision} floor",
            ratio,
            bench_opts["gates"][limit],
        )
    assert ok, "a CPU latency target was missed (see the printed gates)"


@pytest.mark.bench
@pytest.mark.parametrize("key", COLD_START)
def test_cold_start(key, ctx, bench_opts):
    """Detector.open time, first-predict time and steady-state predict time, each in a fresh
    torch-free process (benchmarks/cold_start.py), with and without open's warm-up."""
    name, precision = key.split("/")
    bundle = _bundle(ctx, "fp32")
    figures = {}
    for warmup in (False, True):
        command = [sys.executable, str(Path(__file__).with_name("cold_start.py")), str(bundle)]
        command += ["--backend", name, "--precision", precision, "--repeats", "5"]
        command += ["--warmup"] if warmup else []
        command += ["--threads", str(bench_opts["threads"])] if bench_opts["threads"] else []
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0 and ("openvino" in done.stderr or "bfloat16" in done.stderr):
            pytest.skip(f"{key} cannot run here: {done.stderr.strip().splitlines()[-1]}")
        assert done.returncode == 0, done.stderr
        figures["warmup" if warmup else "no_warmup"] = json.loads(done.stdout.splitlines()[-1])
    ctx["record"].setdefault("cold_start", {})[key] = figures
    for mode, f in figures.items():
        print(
            f"{ctx['arch']} {key} cold start ({mode}): open {f['open_s']:.3f} s, first predict "
            f"{f['first_s']:.3f} s, steady {f['steady_s']:.3f} s ({f['first_over_steady']:.2f}x)"
        )


@pytest.mark.bench
def test_gate_cold_start(ctx, bench_opts):
    """With Detector.open(..., warmup=True), the first predict after a restart at most 1.5x
    the steady state, on every backend measured (the figures without warm-up are reported)."""
    measured = ctx["record"].get("cold_start")
    if not measured:
        pytest.skip("no cold start was measured")
    ok = True
    for key, figures in measured.items():
        record_not_gated(
            f"{ctx['arch']} {key} first / steady predict without warm-up",
            figures["no_warmup"]["first_over_steady"],
            "reported",
        )
        ok &= record_gate(
            f"{ctx['arch']} {key} first / steady predict with warm-up",
            figures["warmup"]["first_over_steady"],
            bench_opts["gates"]["first-ratio"],
        )
    assert ok, "the first predict after open is too slow (see the printed gates)"


@pytest.mark.bench
def test_gate_gpu_latency(bench_opts):
    """On a GPU: p50 per frame against the paper's 168 ms (benchmarks/gpu_check.sh runs the
    GPU path on a machine with PyTorch only)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: GPU latency gates run in benchmarks/gpu_check.sh")
    pytest.skip("GPU backends are measured by benchmarks/gpu_check.sh")
