"""Measurement helpers of the benchmark suite: backends, timing, memory, FLOPs, GEMM rates,
labelled synthetic data, and the results files (JSON, Markdown, PNG chart).

Every backend is a callable ``(B, 3, S, S) float32 numpy -> (scores (B,), maps (B, S, S))``
over the same weights (``create_model(arch, seed=0)``, which is also what
``export_bundle(ExportCfg(..., random_weights=True, seed=0))`` exports), so their outputs and
times compare directly.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

RunFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
FULL = "cops-vit-l-14-336"
TINY = "cops-tiny"
# Everything measured in this session; conftest.py writes it out at the end.
RESULTS: dict[str, Any] = {"archs": {}, "gates": [], "not_gated": []}


def record_gate(name: str, value: float | None, limit: float) -> bool:
    """Record a gate's figure and print it; returns whether it passed."""
    passed = value is not None and value <= limit
    RESULTS["gates"].append({"name": name, "value": value, "limit": limit, "passed": passed})
    shown = "n/a" if value is None else f"{value:.4g}"
    print(f"gate {name}: {shown} (limit {limit:.4g}) {'pass' if passed else 'FAIL'}")
    return passed


def record_not_gated(name: str, value: float | None, reason: str) -> None:
    """Record a figure that is reported but cannot be gated here, and why."""
    RESULTS["not_gated"].append({"name": name, "value": value, "reason": reason})
    shown = "n/a" if value is None else f"{value:.4g}"
    print(f"not gated {name}: {shown} ({reason})")


def auroc_resolution(labels: np.ndarray) -> float:
    """The smallest step of an AUROC over these 0/1 labels: one of n_pos * n_neg pairs."""
    n_pos = int(np.count_nonzero(labels))
    n_neg = int(labels.size - n_pos)
    return 1.0 / max(1, n_pos * n_neg)


# ----------------------------------------------------------------------------- backends
@dataclass
class BenchBackend:
    """One way of running the pipeline: a name, a precision, and its batch function."""

    name: str
    precision: str
    run: RunFn
    batch1_only: bool = False
    keep: list[Any] = field(default_factory=list)  # objects to keep alive (sessions, models)
    # What the runtime says it compiled the vision graph for (OpenVINO: 'bf16' / 'f32').
    compiled_precision: str | None = None

    @property
    def key(self) -> str:
        return f"{self.name}/{self.precision}"

    def close(self) -> None:
        self.keep.clear()
        gc.collect()


def torch_backend(name: str, module: torch.nn.Module, precision: str = "fp32") -> BenchBackend:
    """A torch module returning (pred_score, anomaly_map)."""

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.inference_mode():
            out = module(torch.from_numpy(x))
        return out[0].float().numpy(), out[1].float().numpy()

    return BenchBackend(name, precision, run, keep=[module])


def reference_backend(model: torch.nn.Module) -> BenchBackend:
    """The reference-eager pipeline (one image at a time)."""
    from reference_eager import ReferenceEager

    ref = ReferenceEager(model)

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scores, maps = [], []
        for i in range(x.shape[0]):
            s, m = ref(torch.from_numpy(x[i : i + 1]))
            scores.append(s)
            maps.append(m)
        return np.asarray(scores, np.float32), np.stack(maps).astype(np.float32)

    return BenchBackend("reference-eager", "fp32", run, batch1_only=True, keep=[ref])


def onnxruntime_backend(
    bundle_dir: Path, precision: str, threads: int | None, variant: str = "auto"
) -> BenchBackend:
    """The bundle's vision and head graphs in ONNX Runtime (CPU), fed preprocessed images.
    ``variant``: as OnnxRuntimeBackend ('auto' runs the fused ONNX Runtime variant when the
    bundle has one; 'portable' the graph TensorRT builds from)."""
    from cops_deploy.runtime.backends import OnnxRuntimeBackend
    from cops_deploy.runtime.bundle import open_bundle

    bundle = open_bundle(bundle_dir, verify=False)
    vision = OnnxRuntimeBackend(bundle, "vision", threads=threads, variant=variant)
    head = OnnxRuntimeBackend(bundle, "head", threads=threads)
    name = "onnxruntime-portable" if variant == "portable" else "onnxruntime"
    return _graphs_backend(name, precision, vision, head)


def openvino_backend(bundle_dir: Path, precision: str, threads: int | None) -> BenchBackend:
    """The bundle's portable graphs compiled by OpenVINO (CPU): the vision graph in
    ``precision``, the head in fp32 (as Detector.open(..., backend='openvino') runs them)."""
    from cops_deploy.runtime.backends import OpenVinoBackend
    from cops_deploy.runtime.bundle import open_bundle

    bundle = open_bundle(bundle_dir, verify=False)
    vision = OpenVinoBackend(bundle, "vision", precision=precision, threads=threads)
    head = OpenVinoBackend(bundle, "head", threads=threads)
    backend = _graphs_backend("openvino", precision, vision, head)
    backend.compiled_precision = vision.inference_precision
    return backend


def default_backends(bundle_dir: Path) -> dict[str, str]:
    """Precision -> the backend ``Detector.open`` runs it on when none is named: the first in
    the registry's auto order that runs the precision and is available here (fp32: what
    ``backend='auto'`` picks; bf16: auto runs fp32 only, so the first bf16-capable one)."""
    from cops_deploy.errors import CopsError
    from cops_deploy.runtime.backends import backend_names, get_backend
    from cops_deploy.runtime.bundle import open_bundle

    bundle = open_bundle(bundle_dir, verify=False)
    found: dict[str, str] = {}
    for name in backend_names():
        try:
            cls = get_backend(name)
        except CopsError:  # a plug-in that cannot be imported is not a default
            continue
        if cls.unavailable_reason(bundle) is not None:
            continue
        for precision in cls.precisions:
            found.setdefault(precision, name)
    return found


def _graphs_backend(name: str, precision: str, vision: Any, head: Any) -> BenchBackend:
    """Activate a bundle's vision and head runtime backends and chain them, fed preprocessed
    images (the head deactivated again if it fails to start)."""
    vision.activate()
    try:
        head.activate()
    except BaseException:
        vision.deactivate()
        raise

    def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb = vision.infer({"image": np.ascontiguousarray(x, dtype=np.float32)})
        out = head.infer(emb)
        return out["pred_score"], out["anomaly_map"]

    backend = BenchBackend(name, precision, run, keep=[vision, head])
    backend.provider = vision.provider
    return backend


# ----------------------------------------------------------------------------- measuring
class PeakRSS:
    """Samples this process's resident set size every ``interval`` s while active."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = self.start = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def time_runs(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Wall times (s) of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


GEMM_N = 3072  # n x n x n products: the size the issue measured (torch 217, ORT 446 GFLOP/s)


@dataclass
class GemmRate:
    """One library's measured GEMM rate in one precision (None with ``note`` when it cannot
    run that precision here)."""

    library: str
    precision: str
    gflops: float | None
    note: str = ""


def _best_rate(fn: Callable[[], Any], n: int, repeats: int) -> float:
    """GFLOP/s of the fastest of ``repeats`` timed n x n x n products (after two warm-ups):
    the floor is what the hardware can do, so the best run counts."""
    return 2 * n**3 / min(time_runs(fn, warmup=2, repeats=repeats)) / 1e9


def _operands(n: int) -> tuple[np.ndarray, np.ndarray]:
    """A (activations) and B (weights), n x n float32, seeded."""
    rng = np.random.default_rng(0)
    return rng.standard_normal((n, n), np.float32), rng.standard_normal((n, n), np.float32)


def gemm_torch(precision: str, n: int, repeats: int) -> GemmRate:
    """torch.mm in float32 or bfloat16 (torch's own threads)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    a, b = (torch.from_numpy(m).to(dtype) for m in _operands(n))
    return GemmRate("torch", precision, _best_rate(lambda: torch.mm(a, b), n, repeats))


def matmul_onnx(path: Path, n: int, precision: str) -> Path:
    """A one-MatMul ONNX graph ``Y = A @ B`` with B an initializer (a weight, as in the
    model's linear layers), built with the onnx helper; ``precision`` 'fp32' or 'bf16'."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {"fp32": TensorProto.FLOAT, "bf16": TensorProto.BFLOAT16}[precision]
    _, b = _operands(n)
    weight = numpy_helper.from_array(b, "B")
    if precision == "bf16":  # onnx stores bfloat16 as its raw 16-bit patterns
        bits = (torch.from_numpy(b).to(torch.bfloat16).view(torch.int16).numpy()).tobytes()
        weight = helper.make_tensor("B", elem, [n, n], bits, raw=True)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["Y"])],
        "gemm",
        [helper.make_tensor_value_info("A", elem, [n, n])],
        [helper.make_tensor_value_info("Y", elem, [n, n])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def gemm_onnxruntime(
    precision: str, n: int, repeats: int, threads: int | None, tmp: Path
) -> GemmRate:
    """The one-MatMul graph in ONNX Runtime's CPU provider (bf16: ORT's CPU provider has no
    bfloat16 MatMul kernel; the refusal is reported as the note)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    path = matmul_onnx(tmp / f"matmul_{precision}.onnx", n, precision)
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        a = _operands(n)[0]
        if precision == "bf16":
            a = torch.from_numpy(a).to(torch.bfloat16).view(torch.int16).numpy()
            feed = {"A": ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a, 16)}
        else:
            feed = {"A": a}
        session.run(None, feed)
    except Exception as exc:  # ORT raises its own types: the refusal is the finding
        return GemmRate("onnxruntime", precision, None, f"{type(exc).__name__}: {exc}"[:200])
    return GemmRate(
        "onnxruntime", precision, _best_rate(lambda: session.run(None, feed), n, repeats)
    )


def gemm_openvino(precision: str, n: int, repeats: int, threads: int | None, tmp: Path) -> GemmRate:
    """The fp32 one-MatMul graph compiled by OpenVINO (CPU) with INFERENCE_PRECISION_HINT f32
    or bf16 (as the OpenVINO backend compiles the bundle); the hint read back from the compiled
    model must be the one asked for, else the rate is not reported."""
    try:
        import openvino as ov
    except ImportError as exc:
        return GemmRate("openvino", precision, None, f"not installed ({exc})")
    core = ov.Core()
    hint = {"fp32": "f32", "bf16": "bf16"}[precision]
    if precision == "bf16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        return GemmRate("openvino", precision, None, "this CPU has no bfloat16 in OpenVINO")
    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    path = matmul_onnx(tmp / "matmul_fp32.onnx", n, "fp32")
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    ran = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # an ov.Type
    if ran != hint:
        return GemmRate("openvino", precision, None, f"compiled as {ran}, not {hint}")
    request = compiled.create_infer_request()
    a = _operands(n)[0]
    return GemmRate("openvino", precision, _best_rate(lambda: request.infer({0: a}), n, repeats))


def gemm_rates(
    tmp: Path, threads: int | None = None, n: int = GEMM_N, repeats: int = 6
) -> list[GemmRate]:
    """Every library's GEMM rate here (torch, ONNX Runtime, OpenVINO), fp32 and bf16."""
    rates = []
    for precision in ("fp32", "bf16"):
        rates.append(gemm_torch(precision, n, repeats))
        rates.append(gemm_onnxruntime(precision, n, repeats, threads, tmp))
        rates.append(gemm_openvino(precision, n, repeats, threads, tmp))
    return rates


def best_rates(rates: list[GemmRate]) -> dict[str, GemmRate]:
    """Precision -> the fastest library's rate: the floors' GFLOP/s."""
    best: dict[str, GemmRate] = {}
    for r in rates:
        if r.gflops is not None and (
            r.precision not in best or r.gflops > best[r.precision].gflops
        ):
            best[r.precision] = r
    return best


def floors(flops: dict[str, int], rates: dict[str, float]) -> dict[str, float]:
    """Seconds per image at the best GEMM rate (GFLOP/s) of each precision: ``fp32`` is the
    whole deploy pipeline at the fp32 rate; ``bf16`` is the vision graph at the bf16 rate plus
    the head at the fp32 rate, since the bf16 paths run only the vision graph in bfloat16 (the
    head stays fp32). ``flops``: ``deploy`` (both graphs) and ``vision``."""
    out = {}
    if rates.get("fp32"):
        out["fp32"] = flops["deploy"] / (rates["fp32"] * 1e9)
    if rates.get("bf16") and rates.get("fp32"):
        head = flops["deploy"] - flops["vision"]
        out["bf16"] = flops["vision"] / (rates["bf16"] * 1e9) + head / (rates["fp32"] * 1e9)
    return out


@contextlib.contextmanager
def explicit_attention(model: torch.nn.Module) -> Iterator[None]:
    """Run ``model``'s attention modules as plain matmuls for a while (FLOP counting)."""
    from cops_deploy.model.layers import Attention

    mods = [m for m in model.modules() if isinstance(m, Attention)]
    saved = [m.impl for m in mods]
    for m in mods:
        m.impl = "explicit"
    try:
        yield
    finally:
        for m, impl in zip(mods, saved, strict=True):
            m.impl = impl


def count_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (matmuls, convolutions, attention), by torch's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    params = list(module.parameters())
    flags = [p.requires_grad for p in params]
    module.requires_grad_(False)  # the counter's module tracker trips over trainable leaves
    try:
        with counter, torch.no_grad():
            module(x)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
    return int(counter.get_total_flops())


# ----------------------------------------------------------------------------- data
@dataclass
class LabelledSet:
    images: np.ndarray  # (B, 3, S, S) float32, normalised
    labels: np.ndarray  # (B,) 0/1
    masks: np.ndarray  # (B, S, S) bool


def labelled_set(root: Path, pre: Any, n_good: int, n_bad: int, seed: int = 0) -> LabelledSet:
    """Synthetic images with defects and pixel masks (``cops data synth``), preprocessed as
    ``pre`` (the model config's PreprocessCfg) says."""
    from cops_deploy.data.meta import iter_samples, load_meta
    from cops_deploy.data.synth import synthesize
    from cops_deploy.data.transforms import load_mask
    from cops_deploy.imaging.decode import load_image
    from cops_deploy.imaging.preprocess import preprocess

    if not (root / "meta.json").is_file():
        synthesize(
            root,
            seed=seed,
            n_train_good=1,
            n_test_good=n_good,
            n_test_bad=n_bad,
            size=192,
            classes=["disc", "weave"],
            force=True,
        )
    meta = load_meta(root)
    good, bad = [], []
    for sample in iter_samples(meta, "test"):
        (bad if sample.anomaly else good).append(sample)
    chosen = good[:n_good] + bad[:n_bad]
    images = np.stack(
        [preprocess(load_image(s.image_file(root)), pre.size, pre.mean, pre.std) for s in chosen]
    )
    masks = np.stack([load_mask(s.mask_file(root) or "", pre.size) for s in chosen])
    labels = np.asarray([s.anomaly for s in chosen], np.int64)
    return LabelledSet(images.astype(np.float32), labels, masks)


def aurocs(scores: np.ndarray, maps: np.ndarray, data: LabelledSet) -> dict[str, float | None]:
    """I-AUROC and P-AUROC of one backend's outputs on the labelled set."""
    from cops_deploy.evaluate.metrics import PixelMetricAccumulator, auroc

    acc = PixelMetricAccumulator(compute_aupro=False)
    acc.add(maps, data.masks)
    return {"I-AUROC": auroc(scores, data.labels), "P-AUROC": acc.compute()["P-AUROC"]}


# ----------------------------------------------------------------------------- results
def machine_info() -> dict[str, Any]:
    import onnxruntime

    import cops_deploy

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "versions": {
            "cops_deploy": cops_deploy.__version__,
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
    }


def write_results(results: dict[str, Any], out: Path) -> list[Path]:
    """results.json, results.md and latency.png in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "results.json", out / "results.md", out / "latency.png"]
    paths[0].write_text(json.dumps(results, indent=2, default=float))
    paths[1].write_text(markdown(results))
    chart(results, paths[2])
    return paths


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(results: dict[str, Any]) -> str:
    lines = ["# cops-deploy benchmarks", ""]
    m = results.get("machine", {})
    lines += [
        f"Machine: {m.get('processor')} ({m.get('cpu_count')} CPUs, torch threads "
        f"{m.get('torch_threads')}), CUDA: {m.get('cuda')}; versions: "
        f"{m.get('versions')}",
        "",
    ]
    gemm = results.get("gemm")
    if gemm:
        best = results.get("gemm_best", {})
        lines += [
            f"GEMM rate, {gemm['n']}^3 (GFLOP/s; the best per precision sets the floors):",
            "",
            "| library | fp32 | bf16 |",
            "|---|---:|---:|",
        ]
        by_lib: dict[str, dict[str, str]] = {}
        for r in gemm["rates"]:
            shown = f"{r['gflops']:.0f}" if r["gflops"] is not None else f"n/a ({r['note']})"
            if best.get(r["precision"]) == r["library"] and r["gflops"] is not None:
                shown = f"**{shown}**"
            by_lib.setdefault(r["library"], {})[r["precision"]] = shown
        for lib, row in by_lib.items():
            lines.append(f"| {lib} | {row.get('fp32', 'n/a')} | {row.get('bf16', 'n/a')} |")
        lines.append("")
    for arch, a in results.get("archs", {}).items():
        lines += [f"## {arch}", ""]
        if a.get("flops"):
            lines += [
                f"FLOPs per image: deploy pipeline {a['flops']['deploy'] / 1e12:.3f} T, "
                f"eager model {a['flops']['eager'] / 1e12:.3f} T; floors: fp32 "
                f"{_fmt(a['floors'].get('fp32'))} s, bf16 {_fmt(a['floors'].get('bf16'))} s",
                "",
            ]
        if a.get("default_backends"):
            lines += [f"Default backends (registry auto order): {a['default_backends']}", ""]
        lines += [
            "| backend | p50 s | p90 s | p50 / floor | vs ref-eager | throughput img/s (batch) | "
            "peak RSS MiB (+backend) | map max diff | map median diff | score diff | "
            "I-AUROC | P-AUROC |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for key, b in a.get("backends", {}).items():
            lines.append(
                f"| {key} | {_fmt(b.get('p50'))} | {_fmt(b.get('p90'))} | "
                f"{_fmt(b.get('floor_ratio'), '.2f')} | "
                f"{_fmt(b.get('speedup_vs_reference'), '.2f')}x | "
                f"{_fmt(b.get('throughput'))} ({b.get('throughput_batch')}) | "
                f"{_fmt(b.get('peak_rss_mib'), '.0f')} (+{_fmt(b.get('backend_rss_mib'), '.0f')}) | "
                f"{_fmt(b.get('map_max_diff'))} | {_fmt(b.get('map_median_diff'))} | "
                f"{_fmt(b.get('score_max_diff'))} | {_fmt(b.get('I-AUROC'))} | "
                f"{_fmt(b.get('P-AUROC'))} |"
            )
        lines.append("")
        cold = a.get("cold_start", {})
        if cold:
            lines += [
                "Cold start (fresh process; one 640x480 frame per predict; seconds):",
                "",
                "| backend | warm-up in open | open | first predict | steady predict | "
                "first / steady |",
                "|---|---|---:|---:|---:|---:|",
            ]
            for key, figures in cold.items():
                for f in figures.values():
                    lines.append(
                        f"| {key} | {'yes' if f['warmup'] else 'no'} | {_fmt(f['open_s'])} | "
                        f"{_fmt(f['first_s'])} | {_fmt(f['steady_s'])} | "
                        f"{_fmt(f['first_over_steady'], '.2f')} |"
                    )
            lines.append("")
    gates = results.get("gates", [])
    if gates:
        lines += ["## Gates", "", "| gate | figure | limit | result |", "|---|---:|---:|---|"]
        for g in gates:
            lines.append(
                f"| {g['name']} | {_fmt(g['value'])} | {_fmt(g['limit'])} | "
                f"{'pass' if g['passed'] else 'FAIL'} |"
            )
    notes = results.get("not_gated", [])
    if notes:
        lines += ["", "## Reported, not gated", "", "| figure | value | why |", "|---|---:|---|"]
        lines += [f"| {n['name']} | {_fmt(n['value'])} | {n['reason']} |" for n in notes]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = results.get("archs", {})
    fig, axes = plt.subplots(
        1, max(1, len(archs)), figsize=(6 * max(1, len(archs)), 4), squeeze=False
    )
    for ax, (arch, a) in zip(axes[0], archs.items(), strict=False):
        names = [k for k, b in a.get("backends", {}).items() if b.get("p50")]
        p50 = [a["backends"][k]["p50"] for k in names]
        colors = ["#888888" if k.startswith("reference") else "#1f77b4" for k in names]
        ax.barh(names, p50, color=colors)
        for y, v in enumerate(p50):
            ax.text(v, y, f" {v * 1e3:.0f} ms" if v < 1 else f" {v:.2f} s", va="center")
        for label, floor in a.get("floors", {}).items():
            if floor:
                ax.axvline(
                    floor,
                    ls="--",
                    color="red" if label == "fp32" else "orange",
                    label=f"{label} floor {floor:.2f} s",
                )
        ax.set_xlim(0, max(p50, default=1) * 1.25)
        ax.set_xlabel("p50 latency per image, batch 1 (s)")
        ax.set_title(arch)
        if a.get("floors"):
            ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
