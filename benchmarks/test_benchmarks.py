"""Parity and latency of every backend available here, side by side with reference-eager.

For each architecture: one test per backend measures it (parity against PyTorch fp32 on a
labelled synthetic set, I-/P-AUROC, p50/p90 latency at batch 1 after warm-up, throughput at a
larger batch, peak memory), then the gate tests compare the figures with their limits (see
conftest.py for the options). Figures are absolute and as ratios to reference-eager measured in
the same run.
"""

from __future__ import annotations

import gc
import statistics
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
    aurocs,
    count_flops,
    explicit_attention,
    gemm_gflops,
    labelled_set,
    onnxruntime_backend,
    openvino_backend,
    percentile,
    record_gate,
    reference_backend,
    rss_bytes,
    time_runs,
    torch_backend,
)

from cops_deploy import create_model
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
MIB = 2**20


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "arch" in metafunc.fixturenames:
        opts = metafunc.config
        quick = opts.getoption("--bench-quick")
        archs = opts.getoption("--bench-arch") or (["cops-tiny"] if quick else ["cops-tiny", FULL])
        metafunc.parametrize("arch", archs, scope="module")


def _plan(arch: str, quick: bool, repeats: int | None) -> dict[str, int]:
    if arch == FULL:
        return {
            "good": 2,
            "bad": 2,
            "warmup": 1,
            "repeats": repeats or 3,
            "tp_batch": 2,
            "tp_repeats": 1,
        }
    return {
        "good": 16,
        "bad": 16,
        "warmup": 2,
        "repeats": repeats or (8 if quick else 20),
        "tp_batch": 8,
        "tp_repeats": 2 if quick else 5,
    }


def _export(arch: str, precision: str, out: Path) -> Path:
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
    try:
        return export_bundle(cfg).root
    except CopsError as exc:
        pytest.fail(f"export of {arch} {precision} failed: {exc}")


@pytest.fixture(scope="session")
def machine_rates(bench_opts) -> dict[str, float]:
    if bench_opts["threads"]:
        torch.set_num_threads(bench_opts["threads"])
    rates = {"fp32": gemm_gflops(torch.float32), "bf16": gemm_gflops(torch.bfloat16)}
    RESULTS["gemm_gflops"] = rates
    print(f"GEMM rate here: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    return rates


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
        flops = {
            "deploy": count_flops(DeployModel(model, attn_impl="explicit"), x1),
            "eager": count_flops(model, x1),
        }
    floors = {p: flops["deploy"] / (machine_rates[p] * 1e9) for p in ("fp32", "bf16")}
    bundles = bench_opts["out"] / "bundles"
    record = RESULTS["archs"].setdefault(arch, {"backends": {}})
    record.update(
        flops=flops, floors=floors, plan=plan, reference_metrics=aurocs(ref_scores, ref_maps, data)
    )
    print(
        f"{arch}: {flops['deploy'] / 1e12:.3f} TFLOP per image (deploy pipeline), "
        f"{flops['eager'] / 1e12:.3f} (eager); floors fp32 {floors['fp32']:.3f} s, "
        f"bf16 {floors['bf16']:.3f} s"
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
    }


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
    bundle = "fp32" if name == "openvino" else precision  # OpenVINO runs the fp32 bundle
    if name.startswith(("onnxruntime", "openvino")) and bundle not in ctx["bundle_dirs"]:
        out = ctx["bundles"] / f"{ctx['arch']}-{bundle}"  # export outside the measurement
        ctx["bundle_dirs"][bundle] = _export(ctx["arch"], bundle, out)
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
        **aurocs(scores, maps, data),
    }
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


@pytest.mark.bench
def test_gate_parity(ctx, bench_opts):
    """Each precision against PyTorch fp32: map max diff, score diff, I-/P-AUROC difference."""
    g = bench_opts["gates"]
    ref_metrics = ctx["record"]["reference_metrics"]
    ok = True
    for key, b in _backends(ctx).items():
        lowp = not key.endswith("fp32")
        kind = "lowp" if lowp else "fp32"
        ok &= record_gate(f"{ctx['arch']} {key} map max diff", b["map_max_diff"], g[f"map-{kind}"])
        ok &= record_gate(
            f"{ctx['arch']} {key} score diff", b["score_max_diff"], g[f"score-{kind}"]
        )
        for metric in ("I-AUROC", "P-AUROC"):
            if b.get(metric) is not None and ref_metrics.get(metric) is not None:
                delta = abs(b[metric] - ref_metrics[metric])
                ok &= record_gate(
                    f"{ctx['arch']} {key} {metric} difference", delta, g[f"auroc-{kind}"]
                )
    assert ok, "a parity gate failed (see the printed gates)"


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
    """CPU targets on the full architecture: fp32 <= 1.1x and bf16 <= 1.3x their FLOP floors."""
    if ctx["arch"] != FULL:
        pytest.skip(f"the FLOP-floor targets are set for {FULL}; overheads dominate tiny models")
    if torch.cuda.is_available():
        pytest.skip("CPU targets; this run has a GPU")
    found = _backends(ctx)
    floors = ctx["record"]["floors"]
    g = bench_opts["gates"]
    fp32 = {k: b["p50"] for k, b in found.items() if k.endswith("fp32") and "reference" not in k}
    best = min(fp32, key=fp32.get)
    ok = record_gate(
        f"{FULL} CPU fp32 {best} p50 / fp32 floor", fp32[best] / floors["fp32"], g["floor-fp32"]
    )
    bf16 = {k: b["p50"] for k, b in found.items() if k.endswith("bf16")}
    if bf16:
        best = min(bf16, key=bf16.get)
        ok &= record_gate(
            f"{FULL} CPU bf16 {best} p50 / bf16 floor", bf16[best] / floors["bf16"], g["floor-bf16"]
        )
    assert ok, "a CPU latency target was missed (see the printed gates)"


@pytest.mark.bench
def test_gate_gpu_latency(bench_opts):
    """On a GPU: p50 per frame against the paper's 168 ms (benchmarks/gpu_check.sh runs the
    GPU path on a machine with PyTorch only)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here: GPU latency gates run in benchmarks/gpu_check.sh")
    pytest.skip("GPU backends are measured by benchmarks/gpu_check.sh")
