"""Zoo benchmark: every row of the paper's backbone table (Table S3) on every CPU backend.

    pytest benchmarks/test_zoo.py --bench-zoo                      # all six rows
    pytest benchmarks/test_zoo.py --bench-zoo --bench-zoo-row cops-vit-b-16-224@336

Each row is exported once at random weights (cached under ``~/.cache/cops-deploy/zoo/``, or
``$COPS_ZOO_CACHE``; keyed by the model config and the cops-deploy version), opened with
``Detector.open`` on each CPU backend present (ONNX Runtime fp32, OpenVINO fp32 and bf16) and
timed on one image at a time. The results (``zoo.json``, ``zoo.md``) set the measured latency
beside the paper's accuracy for that row (MVTec-AD I-AUROC / P-AUROC, quoted from the paper,
not measured here), and ``zoo.png`` draws accuracy against latency with the Pareto front
marked, so a user can pick the most accurate row that fits a latency budget.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cops_deploy.configs import get_config
from cops_deploy.configs.paper import TABLE_S3, PaperRow

# (backend, precision) pairs measured on the CPU, in this order; the first is the reference of
# the cross-backend parity figures.
CPU_BACKENDS: tuple[tuple[str, str], ...] = (
    ("onnxruntime", "fp32"),
    ("openvino", "fp32"),
    ("openvino", "bf16"),
)
# The python package each backend needs.
BACKEND_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
METRICS = {"image_auroc": "I-AUROC", "pixel_auroc": "P-AUROC"}
ACCURACY_SOURCE = "paper Table S3 (zero-shot MVTec-AD, trained on VisA); not measured here"


def default_cache() -> Path:
    """Where exported zoo bundles are kept: ``$COPS_ZOO_CACHE`` or ``~/.cache/cops-deploy/zoo``."""
    env = os.environ.get("COPS_ZOO_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cops-deploy" / "zoo"


def rows(names: Sequence[str] | None = None) -> list[PaperRow]:
    """The Table S3 rows, or those whose model name is in ``names`` (in table order).

    Raises:
        ValueError: a name is not a row of the table (the message lists the rows).
    """
    if not names:
        return list(TABLE_S3)
    known = {r.model: r for r in TABLE_S3}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(
            f"--bench-zoo-row {unknown} is not a Table S3 row; valid: {sorted(known)}. Fix: "
            "pass one of them, or leave the option out for all six."
        )
    return [r for r in TABLE_S3 if r.model in names]


def available_backends() -> list[tuple[str, str]]:
    """The CPU (backend, precision) pairs whose package is installed."""
    return [
        (b, p) for b, p in CPU_BACKENDS if importlib.util.find_spec(BACKEND_PACKAGES[b]) is not None
    ]


def bundle_key(model: str) -> str:
    """Cache folder name of ``model``'s bundle: its resolved name and a hash of its config and
    of the cops-deploy version (a changed config or exporter gives a new folder)."""
    import cops_deploy

    cfg = get_config(model)
    blob = json.dumps({"config": cfg.to_dict(), "version": cops_deploy.__version__}, sort_keys=True)
    return f"{cfg.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def cached_bundle(model: str, cache: Path) -> tuple[Path, bool, float]:
    """``model``'s random-weight bundle (seed 0) in ``cache``, exported when absent.

    Returns the bundle folder, whether it was exported now, and the export time in seconds.
    """
    from cops_deploy.export.pipeline import ExportCfg, export_bundle

    out = cache / bundle_key(model)
    if (out / "manifest.json").is_file():
        return out, False, 0.0
    cache.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    export_bundle(ExportCfg(out=out, model=model, random_weights=True, seed=0, force=True))
    gc.collect()
    return out, True, time.perf_counter() - start


def test_image(size: int, seed: int = 0) -> np.ndarray:
    """A seeded (size, size, 3) uint8 photo stand-in: a smooth colour field with a bright square
    (already at the input size, so the resize costs nothing)."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((4, 4, 3))
    idx = np.linspace(0, 3, size)
    img = coarse[np.round(idx).astype(int)][:, np.round(idx).astype(int)]
    y, x = rng.integers(0, size - size // 4, 2)
    img[y : y + size // 6, x : x + size // 6] = 1.0
    return (img * 255).astype(np.uint8)


def measure(
    bundle_dir: Path,
    backend: str,
    precision: str,
    image: np.ndarray,
    warmup: int = 1,
    repeats: int = 3,
    threads: int | None = None,
) -> dict[str, Any]:
    """Open ``bundle_dir`` on ``backend`` / ``precision`` and time ``Detector.predict`` on
    ``image`` (batch 1): open time, first predict, then ``repeats`` timed predicts after
    ``warmup`` more. Returns the wall and CPU times (s), their p50, and the score and map of the
    last predict."""
    from cops_deploy.runtime import Detector

    start = time.perf_counter()
    detector = Detector.open(
        bundle_dir, backend=backend, precision=precision, verify=False, threads=threads
    )
    opened = time.perf_counter() - start
    try:
        start = time.perf_counter()
        detector.predict(image)
        first = time.perf_counter() - start
        for _ in range(warmup):
            detector.predict(image)
        times, cpu = [], []
        for _ in range(repeats):
            start, cpu_start = time.perf_counter(), time.process_time()
            pred = detector.predict(image)[0]
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - cpu_start)
    finally:
        detector.close()
        gc.collect()
    return {
        "open_s": opened,
        "first_s": first,
        "times_s": times,
        "p50_s": float(np.median(times)),
        # CPU seconds of this process per predict (all its threads): what the image costs
        # when other processes compete for the cores and inflate the wall time
        "cpu_s": cpu,
        "cpu_p50_s": float(np.median(cpu)),
        "score": float(pred.score),
        "anomaly_map": np.asarray(pred.anomaly_map, dtype=np.float32),
    }


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (latency, accuracy) no other point beats: none is at least as fast
    and at least as accurate while better in one. Sorted by latency; ties keep the first."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1], i))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


# What a chart's x axis can be: the wall time, or the CPU seconds (all threads) per image.
LATENCIES = {
    "p50_s": "measured p50 latency per image, batch 1 (s, log scale)",
    "p50_ms": "measured p50 latency per image, batch 1 (ms, log scale)",
    "cpu_p50_s": "measured CPU seconds per image, all threads, batch 1 (s, log scale)",
}


def points(results: dict[str, Any], metric: str, key: str = "p50_s") -> list[dict[str, Any]]:
    """One point per measured (row, backend): model, backend key, latency ``key``, paper figure."""
    out = []
    for model, row in results["rows"].items():
        for name, b in row["backends"].items():
            if b.get(key) is not None:
                out.append({"model": model, "backend": name, "latency": b[key], "acc": row[metric]})
    return out


def fronts(results: dict[str, Any], key: str = "p50_s") -> dict[str, list[dict[str, Any]]]:
    """The Pareto front of each metric over every measured (row, backend), by latency ``key``."""
    out = {}
    for metric in METRICS:
        pts = points(results, metric, key)
        out[metric] = [pts[i] for i in pareto_front([(p["latency"], p["acc"]) for p in pts])]
    return out


def markdown(results: dict[str, Any]) -> str:
    """The zoo table: one line per row, p50 per backend, the paper's accuracy, front marks."""
    keys = [f"{b}/{p}" for b, p in results.get("backends", [])]
    on_front = {(p["model"], p["backend"]) for f in fronts(results).values() for p in f}
    head = ["model", "backbone", "input", "I-AUROC", "P-AUROC", *(f"{k} p50" for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, row in results["rows"].items():
        cells = [f"`{model}`", row["backbone"], str(row["input_size"])]
        cells += [f"{row['image_auroc']:.1f}", f"{row['pixel_auroc']:.1f}"]
        for k in keys:
            b = row["backends"].get(k, {})
            if b.get("p50_s") is None:
                cells.append(b.get("skipped", "n/a"))
            else:
                mark = " *" if (model, k) in on_front else ""
                cpu = f" (cpu {b['cpu_p50_s']:.2f} s)" if b.get("cpu_p50_s") is not None else ""
                cells.append(f"{b['p50_s']:.2f} s{cpu}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    m = results.get("machine", {})
    lines += [
        "",
        f"Accuracy: {ACCURACY_SOURCE}. Latency: measured, p50 of `Detector.predict` on one "
        f"image (batch 1, random weights), {m.get('processor', '?')}, {m.get('cpu_count', '?')} "
        "cores; (cpu ...): the process's CPU seconds per image, all threads. `*`: on the Pareto "
        "front (no faster point is as accurate) of I-AUROC or P-AUROC.",
    ]
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path, key: str = "p50_s") -> None:
    """Accuracy (paper) against measured latency ``key`` (a LATENCIES key), one panel per
    metric, one marker per backend, the Pareto front drawn as a step line through its points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    markers = ["o", "s", "^", "D", "v", "P"]
    backends = [f"{b}/{p}" for b, p in results.get("backends", [])]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(13, 5), squeeze=False)
    for ax, (metric, label) in zip(axes[0], METRICS.items(), strict=True):
        pts = points(results, metric, key)
        for j, name in enumerate(backends):
            mine = [p for p in pts if p["backend"] == name]
            ax.scatter(
                [p["latency"] for p in mine],
                [p["acc"] for p in mine],
                marker=markers[j % len(markers)],
                label=name,
                zorder=3,
            )
        front = fronts(results, key)[metric]
        if front:
            ax.step(
                [p["latency"] for p in front],
                [p["acc"] for p in front],
                where="post",
                color="red",
                lw=1.2,
                label="Pareto front",
                zorder=2,
            )
            ax.scatter(
                [p["latency"] for p in front],
                [p["acc"] for p in front],
                s=160,
                facecolors="none",
                edgecolors="red",
                zorder=4,
            )
        for model in results["rows"]:
            mine = [p for p in pts if p["model"] == model]
            if mine:
                fastest = min(mine, key=lambda p: p["latency"])
                ax.annotate(
                    model.removeprefix("cops-"),
                    (fastest["latency"], fastest["acc"]),
                    textcoords="offset points",
                    xytext=(6, 4),
                    fontsize=7,
                )
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel(LATENCIES[key])
        ax.set_ylabel(f"{label} on MVTec-AD (%, paper Table S3)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    m = results.get("machine", {})
    where = m.get("title") or f"{m.get('processor', '?')} ({m.get('cpu_count', '?')} cores)"
    fig.suptitle(f"CoPS backbones: paper accuracy vs latency measured on {where}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """The machine and library versions the latencies were measured with."""
    versions = {}
    for name in ("onnxruntime", "openvino"):
        if importlib.util.find_spec(name) is not None:
            versions[name] = __import__(name).__version__
    return {
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "versions": versions,
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # not Linux: fall back to what platform knows
        pass
    return platform.processor() or platform.machine()


def merge(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """``current`` plus the rows of an earlier run (``zoo.json``) that it did not measure, when
    that run was on the same processor; each row keeps its own time and load average."""
    if not previous or previous.get("machine", {}).get("processor") != current.get(
        "machine", {}
    ).get("processor"):
        return current
    rows = {r.model: None for r in TABLE_S3}  # table order
    for source in (previous["rows"], current["rows"]):
        rows.update(source)
    seen = {tuple(b) for b in previous.get("backends", [])} | {
        tuple(b) for b in current.get("backends", [])
    }
    backends = [list(b) for b in CPU_BACKENDS if b in seen]
    return dict(current, rows={k: v for k, v in rows.items() if v is not None}, backends=backends)


def read_previous(out: Path) -> dict[str, Any] | None:
    """The ``zoo.json`` of an earlier run in ``out``, if any."""
    path = out / "zoo.json"
    return json.loads(path.read_text()) if path.is_file() else None


def write_zoo(results: dict[str, Any], out: Path) -> list[Path]:
    """zoo.json, zoo.md, zoo.png (wall time) and, when every point has it, zoo-cpu.png (CPU
    seconds per image) in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "zoo.json", out / "zoo.md", out / "zoo.png"]
    if points(results, "image_auroc") and len(points(results, "image_auroc", "cpu_p50_s")) == len(
        points(results, "image_auroc")
    ):
        paths.append(out / "zoo-cpu.png")
        chart(results, paths[-1], "cpu_p50_s")
    data = {k: v for k, v in results.items() if k not in ("fronts", "accuracy_source")}
    data = dict(data, fronts=fronts(results), accuracy_source=ACCURACY_SOURCE)
    if len(paths) == 4:
        data["fronts_cpu"] = fronts(results, "cpu_p50_s")
    paths[0].write_text(json.dumps(data, indent=2, default=float))
    paths[1].write_text(markdown(results))
    chart(results, paths[2])
    return paths


# GPU rows: benchmarks/gpu_zoo.sh runs on a machine with PyTorch and CUDA only (no ONNX Runtime
# or OpenVINO there) and writes gpu_zoo.json; these turn it into the same chart.
GPU_PATHS = {("torch-cuda", "fp16"): "deploy_fp16_sdpa", ("torch-cuda", "bf16"): "deploy_bf16_sdpa"}


def collect_gpu_rows(out: Path) -> dict[str, Any]:
    """``gpu_zoo.json``'s content from ``out/rowN/gpu_check.json`` (N: the row's place in
    TABLE_S3, from 1): per row the paper's figures, the check's status (``missing`` where the
    row wrote nothing), the GPU and versions, and the three stages' figures."""
    rows = []
    for i, r in enumerate(TABLE_S3, 1):
        f = out / f"row{i}" / "gpu_check.json"
        res = json.loads(f.read_text()) if f.is_file() else {"status": "missing"}
        row: dict[str, Any] = {
            "model": r.model,
            "backbone": r.backbone,
            "input_size": r.input_size,
            "paper_image_auroc": r.image_auroc,
            "paper_pixel_auroc": r.pixel_auroc,
            **{k: res.get(k) for k in ("status", "gpu", "torch", "cuda")},
        }
        for name in ("fp32_reference", *GPU_PATHS.values()):
            stage = res.get("stages", {}).get(name, {})
            keep = ("status", "eager", "batch1", "batch32", "parity", "peak_gpu_mem_mib")
            row[name] = {k: stage[k] for k in keep if k in stage}
        rows.append(row)
    return {"rows": rows}


def from_gpu_zoo(data: dict[str, Any]) -> dict[str, Any]:
    """Zoo results (latency key ``p50_ms``) from ``gpu_zoo.json``: the deploy graphs in fp16 and
    bf16 under CUDA graphs, one point per row and precision that ran and passed its gates."""
    rows: dict[str, Any] = {}
    gpu = None
    for r in data["rows"]:
        backends = {}
        for (name, precision), stage in GPU_PATHS.items():
            p50 = r.get(stage, {}).get("batch1", {}).get("p50_ms")
            if r.get("status") == "pass" and p50 is not None:
                backends[f"{name}/{precision}"] = {"p50_ms": p50}
        rows[r["model"]] = {
            "backbone": r["backbone"],
            "input_size": r["input_size"],
            "image_auroc": r["paper_image_auroc"],
            "pixel_auroc": r["paper_pixel_auroc"],
            "backends": backends,
        }
        gpu = gpu or r.get("gpu")
    title = f"{gpu or 'a GPU'} (PyTorch deploy graphs, CUDA graphs)"
    return {
        "rows": rows,
        "backends": [list(k) for k in GPU_PATHS],
        "machine": {"processor": gpu, "title": title},
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python benchmarks/zoo.py --collect-gpu OUT_DIR`` (gpu_zoo.sh: OUT_DIR/gpu_zoo.json from
    the rows' checks), ``python benchmarks/zoo.py --gpu-zoo gpu_zoo.json --out zoo-gpu.png``
    (the GPU chart)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--collect-gpu", type=Path, help="gpu_zoo.sh's output folder")
    what.add_argument("--gpu-zoo", type=Path, help="gpu_zoo.json (gpu_zoo.sh)")
    p.add_argument("--out", type=Path, help="the chart (.png), with --gpu-zoo")
    args = p.parse_args(argv)
    if args.collect_gpu:
        data = collect_gpu_rows(args.collect_gpu)
        (args.collect_gpu / "gpu_zoo.json").write_text(json.dumps(data, indent=2))
        for r in data["rows"]:
            p50 = r["deploy_fp16_sdpa"].get("batch1", {}).get("p50_ms")
            shown = "n/a" if p50 is None else f"{p50:.2f} ms"
            print(
                f"{r['model']:26s} {r['paper_image_auroc']:5.1f}/{r['paper_pixel_auroc']:5.1f}"
                f"  fp16 p50 {shown}  status {r['status']}"
            )
        return 0 if all(r["status"] == "pass" for r in data["rows"]) else 1
    if args.out is None:
        p.error("--gpu-zoo needs --out")
    chart(from_gpu_zoo(json.loads(args.gpu_zoo.read_text())), args.out, "p50_ms")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
