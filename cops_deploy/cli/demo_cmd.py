"""``cops demo``: the whole deployment path on built-in synthetic data, in minutes on a CPU.

    cops demo --out demo_out [--force] [--epochs 10] [--seed 0] [--no-progress]

1. synthesise: a procedural defect dataset (``cops_deploy.data.synth``) in ``OUT/data``; the
   HELD-OUT classes' test images are split into ``OUT/heldout/calibration/normal`` (the first
   :data:`CALIBRATION_NORMAL` normal images of each class: calibration only) and
   ``OUT/heldout/test`` (every other image: scored only, never calibrated on);
2. train: ``cops-tiny`` on the TRAIN classes (``OUT/run``);
3. export: two bundles of the trained model, ``OUT/bundle-fp32`` (with its PyTorch weights, so
   that the same bundle runs PyTorch eager as the reference) and ``OUT/bundle-fp16``; each export
   measures its own parity against PyTorch and refuses to write a bundle beyond tolerance;
4. calibrate: each bundle on the held-out normal images with ONNX Runtime, at a false-positive
   rate the number of images supports (:func:`demo_fpr`), stored with the bundle;
5. score: the held-out test images on every path: PyTorch eager (the reference), ONNX Runtime
   fp32 and fp16, OpenVINO fp32 and bf16 where installed and supported (torch-free runtime:
   ``Detector.open(bundle, backend=...)``); per path the parity with PyTorch (max abs
   difference of scores and maps) and the latency (p50 of single-image ``predict`` calls);
6. report: the decisions and regions of ONNX Runtime fp32 (the line's path): result pictures
   (``OUT/pictures``), the review page ``OUT/review.html``, and the summary, printed and written
   to ``OUT/summary.md`` (and ``OUT/summary.json``), with the commands that do the same with the
   official weights.

CLIP is randomly initialised (seeded): no weights can be downloaded here, and the tiny
architecture has none. So the decisions are near chance; the parity, latency and the path itself
(export, calibration, decisions, regions, report) are real.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

TRAIN_CLASSES: tuple[str, ...] = ("stripes", "noise", "disc", "pcb")
HELD_OUT_CLASSES: tuple[str, ...] = ("weave", "screw")
DEMO_MODEL = "cops-tiny"
SYNTH = {"size": 128, "n_train_good": 1, "n_test_good": 20, "n_test_bad": 20}
# Normal test images of each held-out class kept for calibration (never scored); the others are
# scored. With 2 held-out classes: 20 calibration images, enough for a 5% false-positive rate.
CALIBRATION_NORMAL = 10
DEMO_FPR = 0.05  # the image false-positive rate asked for, when enough normal images allow it
PIXEL_FPR = 0.01  # false-positive rate on normal pixels: the defect-mask threshold
MIN_AREA = 4  # smallest defect region kept, in pixels of the 128 x 128 images
LATENCY_WARMUP = 3  # untimed single-image calls per path
LATENCY_RUNS = 20  # timed single-image calls per path (p50 reported)
PICTURE_TILE = 256  # panel height of the result pictures
REGION_EXAMPLES = 5  # regions listed in the summary
OFFICIAL_MODEL = "cops-vit-l-14-336"
OFFICIAL_CLIP = "ViT-L-14-336px.pt"  # OpenAI's CLIP ViT-L/14@336px release
# What the demo writes under OUT; --force replaces exactly these.
DEMO_OUTPUTS: tuple[str, ...] = (
    "data",
    "heldout",
    "run",
    "bundle-fp32",
    "bundle-fp16",
    "pictures",
    "review.html",
    "summary.md",
    "summary.json",
)
REFERENCE_PATH = "PyTorch eager"

NEEDS_BUILD = True  # runs PyTorch: cli.main refuses it with the install hint without [build]


@dataclass(frozen=True)
class DemoPath:
    """One way of running a bundle: its label, bundle ('fp32' or 'fp16'), backend, precision."""

    label: str
    bundle: str
    backend: str
    precision: str = "fp32"
    optional: bool = False  # skipped (with the reason) when the machine cannot run it


PATHS: tuple[DemoPath, ...] = (
    DemoPath(REFERENCE_PATH, "fp32", "torch"),
    DemoPath("ONNX Runtime fp32", "fp32", "onnxruntime"),
    DemoPath("ONNX Runtime fp16", "fp16", "onnxruntime"),
    DemoPath("OpenVINO fp32", "fp32", "openvino", optional=True),
    DemoPath("OpenVINO bf16", "fp32", "openvino", "bf16", optional=True),
)
LINE_PATH = "ONNX Runtime fp32"  # the path whose decisions, regions and pictures are reported


@dataclass
class PathRun:
    """What one path gave on the scored images."""

    path: DemoPath
    scores: np.ndarray
    maps: np.ndarray  # (n, S, S)
    decisions: list[bool | None]
    predictions: list[Any] = field(repr=False)
    latency_ms: list[float]
    provider: str


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command to the ``cops`` sub-parsers."""
    p = subparsers.add_parser(
        "demo",
        help="the deployment path on synthetic data: train, export, calibrate, score, report",
        description=(
            "The whole deployment path on a synthetic defect dataset, CLIP random: train "
            f"cops-tiny on {', '.join(TRAIN_CLASSES)}; export it to fp32 and fp16 bundles; "
            f"calibrate them on held-out normal images of {', '.join(HELD_OUT_CLASSES)}; score "
            "the other held-out images with PyTorch, ONNX Runtime and OpenVINO (parity and "
            "latency side by side); decisions, regions, result pictures, review.html and "
            "summary.md."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--force", action="store_true", help="replace a previous demo in --out")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


# ----------------------------------------------------------------------------------------------
# Small pieces


class _Steps:
    """Wall time and CPU time (all threads of this process) of each step. On a shared machine
    the wall time grows with the load; the CPU time much less."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        start, cpu = time.perf_counter(), time.process_time()
        yield
        self.seconds[name] = time.perf_counter() - start
        self.cpu_seconds[name] = time.process_time() - cpu

    def drop(self, name: str) -> None:
        """Forget step ``name`` (it did not run)."""
        self.seconds.pop(name, None)
        self.cpu_seconds.pop(name, None)


def demo_fpr(n_normal: int, wanted: float = DEMO_FPR) -> float:
    """The image false-positive rate to calibrate at with ``n_normal`` normal images: ``wanted``
    when they suffice (:func:`~cops_deploy.runtime.calibration.required_normal_images`), else
    the smallest rate they can measure, ``1 / n_normal``."""
    from cops_deploy.runtime.calibration import required_normal_images

    if n_normal >= required_normal_images(wanted):
        return wanted
    return 1.0 / n_normal


def official_commands(out: Path) -> list[list[str]]:
    """The same path with the official CLIP weights, as argv lists (``cops ...``,
    ``cops-export ...``): train, export, calibrate, predict, on the demo's data in ``out``."""
    n_normal = CALIBRATION_NORMAL * len(HELD_OUT_CLASSES)
    official = out / "official"
    return [
        ["cops", "train", "--data", str(out / "data"), "--dataset", "synth",
         "--classes", *TRAIN_CLASSES, "--model", OFFICIAL_MODEL,
         "--clip-weights", OFFICIAL_CLIP, "--out", str(official / "run")],
        ["cops-export", "--model", OFFICIAL_MODEL, "--weights", str(official / "run" / "model"),
         "--clip-weights", OFFICIAL_CLIP, "--out", str(official / "bundle")],
        ["cops", "calibrate", str(official / "bundle"),
         "--normal", str(out / "heldout" / "calibration" / "normal"),
         "--fpr", f"{demo_fpr(n_normal):g}", "--pixel-fpr", f"{PIXEL_FPR:g}",
         "--min-area", str(MIN_AREA)],
        ["cops", "predict", str(out / "heldout" / "test"), "--bundle", str(official / "bundle"),
         "--out", str(official / "results")],
    ]  # fmt: skip


def _shell(commands: list[list[str]]) -> str:
    return " && \\\n".join(shlex.join(c) for c in commands)


def _split_held_out(data: Path, heldout: Path) -> tuple[Path, Path, list[Path], list[bool]]:
    """Copy the held-out classes' test images into a calibration set (the first
    CALIBRATION_NORMAL normal images per class) and a scored set (all others).

    Returns:
        (calibration normal folder, scored folder, scored images, their truth: True = defect).
    """
    from cops_deploy.errors import ConfigError

    normal, test = heldout / "calibration" / "normal", heldout / "test"
    scored, truth = [], []
    for cls in HELD_OUT_CLASSES:
        goods = sorted((data / cls / "test" / "good").glob("*.png"))
        if len(goods) <= CALIBRATION_NORMAL:
            raise ConfigError(
                f"held-out class {cls!r} has {len(goods)} normal test images; the demo needs "
                f"more than CALIBRATION_NORMAL={CALIBRATION_NORMAL} (calibration) to score some "
                f"too. Fix: raise SYNTH['n_test_good'] above {CALIBRATION_NORMAL}."
            )
        for image in goods[:CALIBRATION_NORMAL]:
            target = normal / cls / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, target)
        rest = goods[CALIBRATION_NORMAL:]
        defects = [
            p for p in sorted((data / cls / "test").glob("*/*.png")) if p.parent.name != "good"
        ]
        for image in rest + defects:
            target = test / cls / image.parent.name / image.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(image, target)
            scored.append(target)
            truth.append(image.parent.name != "good")
    return normal, test, scored, truth


def _bar(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="image", disable=not enabled, leave=False)


# ----------------------------------------------------------------------------------------------
# The steps


def _export(model_dir: Path, out: Path, precision: str, seed: int) -> Any:
    """Export the trained model to ``out``; returns the opened bundle."""
    from cops_deploy.export.pipeline import ExportCfg, export_bundle

    cfg = ExportCfg(
        out=out,
        model=DEMO_MODEL,
        weights=model_dir,
        random_weights=True,  # CLIP: random (seeded as in training); the manifest records it
        seed=seed,
        precision=precision,
        torch_weights=precision == "fp32",  # the PyTorch reference runs from this bundle
    )
    return export_bundle(cfg)


def _calibrate(bundle: Path, normal: Path, fpr: float, progress: bool) -> Any:
    """Calibrate ``bundle`` with ONNX Runtime on the normal images; returns the record."""
    from cops_deploy.runtime.calibration import calibrate, write_calibration
    from cops_deploy.runtime.detector import Detector

    with Detector.open(bundle, backend="onnxruntime") as detector:
        with _bar(0, f"calibrating {bundle.name}", progress) as bar:

            def report(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            record = calibrate(
                detector,
                normal,
                fpr=fpr,
                pixel_fpr=PIXEL_FPR,
                min_area=MIN_AREA,
                progress=report,
            )
    write_calibration(bundle, record)
    return record


def _score(path: DemoPath, bundle: Path, images: list[Path], progress: bool) -> PathRun:
    """Score ``images`` on ``path``, then time single-image calls on the first of them."""
    from cops_deploy.imaging.decode import load_image
    from cops_deploy.runtime.detector import Detector

    with Detector.open(bundle, backend=path.backend, precision=path.precision) as detector:
        predictions = []
        with _bar(len(images), f"scoring {path.label}", progress) as bar:
            for start in range(0, len(images), detector.max_batch):
                chunk = images[start : start + detector.max_batch]
                predictions.extend(detector.predict(chunk))
                bar.update(len(chunk))
        arrays = [load_image(p) for p in images[:LATENCY_RUNS]]
        for array in arrays[:LATENCY_WARMUP]:
            detector.predict([array])
        latency = []
        for i in range(LATENCY_RUNS):
            array = arrays[i % len(arrays)]
            start = time.perf_counter()
            detector.predict([array])  # decoded image in, decision and regions out
            latency.append(1000.0 * (time.perf_counter() - start))
        provider = detector.provider
    return PathRun(
        path=path,
        scores=np.array([p.score for p in predictions], dtype=np.float64),
        maps=np.stack([p.anomaly_map for p in predictions]),
        decisions=[p.is_anomalous for p in predictions],
        predictions=predictions,
        latency_ms=latency,
        provider=provider,
    )


def _pictures_and_review(
    out: Path, line: PathRun, images: list[Path], truth: list[bool], bundle: Path, cal: Any
) -> tuple[Path, list[dict[str, Any]]]:
    """Result pictures of the line's path (regions outlined, decision printed) and the review
    page; returns the page and the result records."""
    from cops_deploy.imaging.annotate import annotate
    from cops_deploy.imaging.decode import load_image
    from cops_deploy.imaging.visualize import colour_range, side_by_side
    from cops_deploy.runtime.review import ReviewSummary, write_review

    pictures = out / "pictures"
    maps = [p.anomaly_map for p in line.predictions]
    low, high = colour_range(maps, stretch=True)  # one scale for all: comparable pictures
    if high <= low:
        high = low + 1e-6
    results = []
    for image, pred, defect in zip(images, line.predictions, truth, strict=True):
        rel = image.relative_to(out / "heldout" / "test")
        picture = rel.with_suffix(".png")
        rgb = load_image(image)
        marked = annotate(rgb, pred.regions or (), pred.is_anomalous, pred.score, pred.threshold)
        side_by_side(
            marked,
            pred.anomaly_map_original,
            pictures / picture,
            score=pred.score,
            vmin=low,
            vmax=high,
            tile=PICTURE_TILE,
        )
        results.append(
            {
                "source": image.relative_to(out).as_posix(),
                "truth": "defect" if defect else "good",
                "score": pred.score,
                "visual": picture.as_posix(),
                "is_anomalous": pred.is_anomalous,
                "threshold": pred.threshold,
                "regions": [r.to_dict() for r in pred.regions or ()],
            }
        )
    summary = ReviewSummary(
        model=str(bundle),
        backend=line.path.backend,
        precision=line.path.precision,
        title="cops demo: held-out images (RANDOM CLIP: decisions near chance)",
        details={
            "CLIP": "random (seeded): decisions are near chance; the path is real",
            "held-out classes": ", ".join(HELD_OUT_CLASSES),
            "calibration": (
                f"{cal.images['normal'].count} held-out normal images (not scored), image "
                f"fpr {cal.image.target_fpr:g}, pixel fpr {cal.pixel.target_fpr:g}, "
                f"min area {cal.min_area} px"
            ),
            "truth": f"{sum(truth)} defect, {len(truth) - sum(truth)} good",
        },
    )
    page = write_review(
        out / "review.html", results, [], summary, pictures_dir=pictures, thumb_size=384
    )
    return page, results


# ----------------------------------------------------------------------------------------------
# Figures and the summary


def parity_rows(runs: list[PathRun]) -> list[dict[str, Any]]:
    """Per runtime path: max abs difference from PyTorch eager of the scores and the maps, and
    the export tolerance of its bundle's precision (None for bf16: no export tolerance)."""
    from cops_deploy.export.pipeline import PARITY_TOLERANCES

    ref = next(r for r in runs if r.path.label == REFERENCE_PATH)
    rows = []
    for r in runs:
        if r is ref:
            continue
        score = float(np.max(np.abs(r.scores - ref.scores)))
        amap = float(np.max(np.abs(r.maps.astype(np.float64) - ref.maps)))
        tol = None if r.path.precision == "bf16" else dict(PARITY_TOLERANCES[r.path.bundle])
        within = None
        if tol is not None:
            within = score <= tol["pred_score_max_abs"] and amap <= tol["anomaly_map_max_abs"]
        rows.append(
            {
                "path": r.path.label,
                "bundle": f"bundle-{r.path.bundle}",
                "score_max_abs": score,
                "map_max_abs": amap,
                "tolerance": tol,
                "within": within,
            }
        )
    return rows


def latency_rows(runs: list[PathRun]) -> list[dict[str, Any]]:
    """Per path: p50 and p90 of the single-image predict calls, in ms, and the speed-up over
    PyTorch eager."""
    ref = float(np.median(next(r for r in runs if r.path.label == REFERENCE_PATH).latency_ms))
    rows = []
    for r in runs:
        p50 = float(np.median(r.latency_ms))
        rows.append(
            {
                "path": r.path.label,
                "provider": r.provider,
                "p50_ms": p50,
                "p90_ms": float(np.percentile(r.latency_ms, 90)),
                "runs": len(r.latency_ms),
                "speedup": ref / p50 if p50 > 0 else None,
            }
        )
    return rows


def decision_figures(
    line: PathRun, images: list[Path], truth: list[bool], out: Path
) -> dict[str, Any]:
    """Decision counts per held-out class and truth, the confusion against the truth, the image
    AUROC of the scores, and the regions (count, examples)."""
    from cops_deploy.evaluate.metrics import auroc

    per_class = []
    for cls in HELD_OUT_CLASSES:
        for defect in (False, True):
            idx = [
                i
                for i, (p, t) in enumerate(zip(images, truth, strict=True))
                if t == defect and p.relative_to(out / "heldout" / "test").parts[0] == cls
            ]
            flagged = sum(1 for i in idx if line.decisions[i])
            per_class.append(
                {
                    "class": cls,
                    "truth": "defect" if defect else "good",
                    "images": len(idx),
                    "ok": len(idx) - flagged,
                    "not_ok": flagged,
                }
            )
    pairs = list(zip(truth, line.decisions, strict=True))
    confusion = {
        "good": {"ok": sum(1 for t, d in pairs if not t and not d),
                 "not_ok": sum(1 for t, d in pairs if not t and d)},
        "defect": {"ok": sum(1 for t, d in pairs if t and not d),
                   "not_ok": sum(1 for t, d in pairs if t and d)},
    }  # fmt: skip
    examples, count, on_flagged = [], 0, 0
    for image, pred in zip(images, line.predictions, strict=True):
        found = pred.regions or ()
        count += len(found)
        on_flagged += len(found) if pred.is_anomalous else 0
        for region in found:
            if len(examples) < REGION_EXAMPLES and pred.is_anomalous:
                examples.append({"source": image.relative_to(out).as_posix(), **region.to_dict()})
    value = auroc(line.scores, np.asarray(truth))
    return {
        "path": line.path.label,
        "per_class": per_class,
        "confusion": confusion,
        "image_auroc": value,
        "regions": {"count": count, "on_not_ok": on_flagged, "examples": examples},
    }


def _agreement(runs: list[PathRun], line: PathRun) -> dict[str, int]:
    """Per path: on how many scored images its decision equals the line path's."""
    return {
        r.path.label: sum(1 for a, b in zip(r.decisions, line.decisions, strict=True) if a == b)
        for r in runs
        if r is not line
    }


def _fmt(value: float | None, spec: str = ".3g") -> str:
    return "n/a" if value is None or not math.isfinite(value) else format(value, spec)


def render_summary(s: dict[str, Any]) -> str:
    """The summary as Markdown, from the figures :func:`run` collects (summary.json)."""
    held, n_scored = ", ".join(HELD_OUT_CLASSES), s["scored_images"]
    cal = s["calibration"]
    lines = [
        "# cops demo: the deployment path on synthetic data",
        "",
        "**CLIP is RANDOM here** (seeded; no weights can be downloaded, and cops-tiny has none).",
        "So the decisions are near chance (the held-out image AUROC is "
        f"{_fmt(s['decisions']['image_auroc'], '.2f')}; 0.5 is chance) and the thresholds mean "
        "nothing for a real line. What is real: the path itself (training, export, "
        "calibration, the torch-free runtime, decisions, regions, the review page), the parity "
        "of every runtime path with PyTorch, and the latencies (of cops-tiny: a full-size "
        "ViT-L/14-336 is far slower).",
        "",
        f"cops-tiny trained on {', '.join(TRAIN_CLASSES)} ({s['train']['epochs']} epochs, loss "
        f"{s['train']['loss_first']:.3f} -> {s['train']['loss_last']:.3f}); held-out classes "
        f"{held}: {cal['normal_images']} normal images calibrate, {n_scored} other images are "
        "scored (never calibrated on).",
        "",
        f"## Parity with PyTorch eager ({n_scored} held-out images)",
        "",
        "| path | bundle | max abs score diff | max abs map diff | export tolerance "
        "(score / map) | within |",
        "|:--|:--|--:|--:|--:|:--|",
    ]
    for r in s["parity"]:
        tol = r["tolerance"]
        tol_text = (
            "none (bf16)"
            if tol is None
            else f"{tol['pred_score_max_abs']:g} / {tol['anomaly_map_max_abs']:g}"
        )
        within = {True: "yes", False: "NO", None: "-"}[r["within"]]
        lines.append(
            f"| {r['path']} | {r['bundle']} | {_fmt(r['score_max_abs'], '.2e')} | "
            f"{_fmt(r['map_max_abs'], '.2e')} | {tol_text} | {within} |"
        )
    lines += [
        "",
        f"## Latency (single image, decoded; preprocessing, both graphs, decision and regions; "
        f"{LATENCY_RUNS} calls after {LATENCY_WARMUP} warm-up)",
        "",
        "| path | provider | p50 ms/image | p90 ms/image | vs PyTorch eager |",
        "|:--|:--|--:|--:|--:|",
    ]
    for r in s["latency"]:
        lines.append(
            f"| {r['path']} | {r['provider']} | {_fmt(r['p50_ms'], '.2f')} | "
            f"{_fmt(r['p90_ms'], '.2f')} | {_fmt(r['speedup'], '.2f')}x |"
        )
    if s["skipped"]:
        lines += ["", "Skipped paths: " + "; ".join(f"{k}: {v}" for k, v in s["skipped"].items())]
    d = s["decisions"]
    lines += [
        "",
        f"## Decisions ({d['path']}; image threshold {cal['image_threshold']:.6g} at fpr "
        f"{cal['image_fpr']:g} on {cal['normal_images']} normal images, pixel threshold "
        f"{cal['pixel_threshold']:.6g} at fpr {cal['pixel_fpr']:g}, min area {MIN_AREA} px)",
        "",
        "| class | truth | images | OK | NOT OK |",
        "|:--|:--|--:|--:|--:|",
    ]
    for r in d["per_class"]:
        lines.append(f"| {r['class']} | {r['truth']} | {r['images']} | {r['ok']} | {r['not_ok']} |")
    c = d["confusion"]
    lines += [
        "",
        "| truth \\ decision | OK | NOT OK |",
        "|:--|--:|--:|",
        f"| good | {c['good']['ok']} | {c['good']['not_ok']} |",
        f"| defect | {c['defect']['ok']} | {c['defect']['not_ok']} |",
        "",
        "Decisions equal to ONNX Runtime fp32's: "
        + ", ".join(f"{k} {v}/{n_scored}" for k, v in s["agreement"].items())
        + " (the fp16 bundle has its own calibration).",
        "",
        f"## Regions: {d['regions']['count']} on {n_scored} images "
        f"({d['regions']['on_not_ok']} on NOT OK images)",
        "",
    ]
    if d["regions"]["examples"]:
        lines += [
            "| image | x, y | width x height | area px | peak | mean |",
            "|:--|--:|--:|--:|--:|--:|",
        ]
        for e in d["regions"]["examples"]:
            lines.append(
                f"| {e['source']} | {e['x']}, {e['y']} | {e['width']} x {e['height']} | "
                f"{e['area']} | {e['peak']:.4f} | {e['mean']:.4f} |"
            )
    else:
        lines.append("No region on a NOT OK image.")
    lines += [
        "",
        "## Files",
        "",
        f"- review page: {s['files']['review']} (self-contained; filter by decision)",
        f"- result pictures: {s['files']['pictures']}",
        f"- bundles: {s['files']['bundle_fp32']}, {s['files']['bundle_fp16']}",
        "",
        "## Time (wall, this machine)",
        "",
        "| step | wall s | CPU s (all threads) |",
        "|:--|--:|--:|",
        *(f"| {k} | {v:.1f} | {s['cpu_seconds'][k]:.1f} |" for k, v in s["seconds"].items()),
        f"| **total** | {s['wall_s']:.1f} | {s['cpu_s']:.1f} |",
        "",
        "## The same with the official weights",
        "",
        f"With OpenAI's CLIP ViT-L/14@336px ({OFFICIAL_CLIP}) and the full-size model "
        f"({OFFICIAL_MODEL}; a GPU is advised for training):",
        "",
        "```sh",
        s["official_commands"],
        "```",
        "",
        "With a released CoPS checkpoint, skip `cops train` and pass `--weights CKPT.pth` to "
        "cops-export.",
        "",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The command


def _open_optional(
    path: DemoPath, bundle: Path, images: list[Path], progress: bool
) -> tuple[PathRun | None, str | None]:
    """Score on an optional path; (None, reason) when this machine cannot run it."""
    from cops_deploy.errors import ConfigError, MissingDependencyError

    try:
        return _score(path, bundle, images, progress), None
    except (MissingDependencyError, ConfigError) as exc:
        return None, str(exc).split(". Fix:")[0]


def run(args: argparse.Namespace) -> int:
    """Run ``cops demo``; returns the exit status."""
    from cops_deploy.data.synth import synthesize
    from cops_deploy.fileio import atomic_write_bytes, prepare_output_dir
    from cops_deploy.train.trainer import TrainCfg, train

    start, cpu_start = time.perf_counter(), time.process_time()
    out: Path = args.out
    progress = not args.no_progress
    prepare_output_dir(out, args.force, DEMO_OUTPUTS, "replace the previous demo in it")
    steps = _Steps()
    print("note: CLIP is RANDOM here (no weights can be downloaded): decisions are near chance;")
    print("      the path, the parity with PyTorch and the latencies are real.")

    with steps.step("synthesise"):
        data = synthesize(
            out / "data", seed=args.seed, classes=TRAIN_CLASSES + HELD_OUT_CLASSES, **SYNTH
        )
        normal, test, images, truth = _split_held_out(data, out / "heldout")
    n_normal = CALIBRATION_NORMAL * len(HELD_OUT_CLASSES)
    print(
        f"data:      {data}; held-out {', '.join(HELD_OUT_CLASSES)}: {n_normal} normal images "
        f"to calibrate ({normal}), {len(images)} to score ({test})"
    )

    with steps.step("train"):
        cfg = TrainCfg(
            data=data,
            dataset="synth",
            out=out / "run",
            model=DEMO_MODEL,
            random_clip=True,
            epochs=args.epochs,
            seed=args.seed,
            classes=TRAIN_CLASSES,
            progress=progress,
        )
        result = train(cfg)
    losses = result.epoch_losses
    print(
        f"train:     {result.run_dir} ({result.steps} steps; loss {losses[0]['total']:.3f} -> "
        f"{losses[-1]['total']:.3f})"
    )

    bundles: dict[str, Path] = {}
    for precision in ("fp32", "fp16"):
        with steps.step(f"export {precision}"):
            bundle = _export(result.model_dir, out / f"bundle-{precision}", precision, args.seed)
        bundles[precision] = bundle.root
        par = bundle.manifest.parity
        print(
            f"export:    {bundle.root} ({precision}; export check vs PyTorch: score "
            f"{par['pred_score_max_abs']:.2e}, map {par['anomaly_map_max_abs']:.2e})"
        )

    fpr = demo_fpr(n_normal)
    records = {}
    with steps.step("calibrate"):
        for precision, root in bundles.items():
            records[precision] = _calibrate(root, normal, fpr, progress)
    cal = records["fp32"]
    print(
        f"calibrate: {n_normal} normal images, fpr {fpr:g}: image threshold "
        f"{cal.image_threshold:.6g} (fp32), {records['fp16'].image_threshold:.6g} (fp16); "
        f"pixel threshold {cal.pixel_threshold:.6g} (fpr {PIXEL_FPR:g}), min area {MIN_AREA} px"
    )

    runs, skipped = [], {}
    for path in PATHS:
        with steps.step(f"score {path.label}"):
            if path.optional:
                done, why = _open_optional(path, bundles[path.bundle], images, progress)
            else:
                done, why = _score(path, bundles[path.bundle], images, progress), None
        if done is None:
            skipped[path.label] = why
            steps.drop(f"score {path.label}")
            print(f"score:     {path.label}: skipped ({why})")
            continue
        runs.append(done)
        print(
            f"score:     {path.label} ({done.provider}): {len(images)} images, p50 "
            f"{np.median(done.latency_ms):.2f} ms/image"
        )
    line = next(r for r in runs if r.path.label == LINE_PATH)

    with steps.step("pictures + review"):
        page, _ = _pictures_and_review(out, line, images, truth, bundles["fp32"], cal)

    summary: dict[str, Any] = {
        "clip": f"random (seed {args.seed})",
        "scored_images": len(images),
        "train": {
            "epochs": args.epochs,
            "loss_first": losses[0]["total"],
            "loss_last": losses[-1]["total"],
        },
        "calibration": {
            "normal_images": cal.images["normal"].count,
            "image_fpr": cal.image.target_fpr,
            "image_threshold": cal.image_threshold,
            "image_threshold_fp16": records["fp16"].image_threshold,
            "pixel_fpr": cal.pixel.target_fpr,
            "pixel_threshold": cal.pixel_threshold,
            "min_area": cal.min_area,
        },
        "parity": parity_rows(runs),
        "latency": latency_rows(runs),
        "skipped": skipped,
        "decisions": decision_figures(line, images, truth, out),
        "agreement": _agreement(runs, line),
        "files": {
            "review": str(page),
            "pictures": str(out / "pictures"),
            "bundle_fp32": str(bundles["fp32"]),
            "bundle_fp16": str(bundles["fp16"]),
        },
        "official_commands": _shell(official_commands(out)),
        "seconds": dict(steps.seconds),
        "cpu_seconds": dict(steps.cpu_seconds),
    }
    summary["wall_s"] = time.perf_counter() - start
    summary["cpu_s"] = time.process_time() - cpu_start
    text = render_summary(summary)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2).encode())
    atomic_write_bytes(out / "summary.md", text.encode())
    sys.stdout.write("\n" + text)
    print(f"summary:   {out / 'summary.md'}\nwall time: {summary['wall_s']:.0f} s")
    return 0
