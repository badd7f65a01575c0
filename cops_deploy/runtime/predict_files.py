"""Score image files and write the results: one picture per image, a journal, ``scores.json``.

    with Detector.open("bundle/") as detector:
        report = predict_files(detector, ["parts/"], "results/")
    print(report.results[0]["score"], report.failures, report.skipped)

:func:`predict_files` runs a :class:`~cops_deploy.runtime.detector.Detector`;
:func:`write_predictions` runs any batch predictor (``cops predict`` passes a PyTorch model's
through it). No single image ends the run: every per-image failure (decoding, the pixel limit,
memory, the backend, a score or map that is not finite) is recorded for that image with a
``reason`` code and its message, and the others are still scored. Folder entries that are not
image candidates are reported as ``skipped``, with the reason.

The records: one dict per image, the same in the journal, in :class:`PredictReport` and in
``scores.json`` (add keys to extend them; see :mod:`~cops_deploy.runtime.results_folder` for the
journal ``results.jsonl`` and ``scores.json``):

- result: ``source`` (the input path as given), ``score`` (finite float), ``visual`` (the
  picture's path inside ``out``), ``height``, ``width`` (of the image after EXIF orientation),
  ``anomalous`` (``score >= threshold``: true or false; null when there is no threshold, so
  nothing pretends to decide) and ``regions`` (the defect regions, dicts as
  :meth:`~cops_deploy.runtime.regions.Region.to_dict`: ``x``, ``y``, ``width``, ``height``,
  ``area``, ``peak``, ``mean`` in the image's pixels; null when there is no pixel threshold, i.e.
  no calibration). The names are those of the C++ consumer's ``cops-detect``;
- failure: ``source``, ``reason`` (a code: :data:`~cops_deploy.imaging.decode.READ_FAILURES`
  or ``out_of_memory``, ``backend_error``, ``non_finite_output``, ``write_error``), ``error``;
- skipped: ``source``, ``reason`` (:data:`~cops_deploy.imaging.decode.SKIP_REASONS`),
  ``error``.

Result pictures (image | heatmap | overlay, bounded in size: see
:func:`~cops_deploy.imaging.visualize.side_by_side`; the image, and so the overlay, carries
:func:`~cops_deploy.imaging.annotate.annotate`'s outlines of the regions and a banner with the
decision, or ``NO THRESHOLD``) are named from the input's path relative
to its input argument plus ``.png``, mirroring the folders: ``photos/sub/a.jpg`` scored as
``cops predict photos`` gives ``sub/a.jpg.png``. With several input arguments (or one file),
each argument gets a top-level entry named after it (``photos/``, ``b.png.png``; a second
argument of the same name ``photos~2/``). Names are therefore unique and stable from run to
run (a.jpg, a.png and a_00002.png give a.jpg.png, a.png.png and a_00002.png.png).

Each result is journalled as soon as it is written, so a killed run is continued with
``resume=True`` (``--resume``): images with a result are not scored again, failed ones are
retried. At the end of every run (a resumed one too, from all its records) the review page
``review.html`` (:mod:`~cops_deploy.runtime.review`) is written beside ``scores.json`` unless
``review=False``. Silent unless ``progress`` (a tqdm bar and each failure on stderr). Torch-free.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from cops_deploy.errors import ConfigError, CopsError, ImageReadError
from cops_deploy.fileio import atomic_write_bytes
from cops_deploy.imaging.annotate import annotate
from cops_deploy.imaging.decode import (
    DEFAULT_MAX_PIXELS,
    InputFile,
    InputScan,
    check_max_pixels,
    load_image,
    scan_inputs,
)
from cops_deploy.imaging.visualize import side_by_side
from cops_deploy.runtime.detector import Detector
from cops_deploy.runtime.regions import Region, check_min_area
from cops_deploy.runtime.results_folder import (
    JOURNAL_FILE,
    SCORES_FILE,
    ResultsFolder,
    check_out_outside_inputs,
)
from cops_deploy.runtime.review import REVIEW_FILE, ReviewSummary, render_review

__all__ = [
    "JOURNAL_FILE",
    "REVIEW_FILE",
    "SCORES_FILE",
    "Decision",
    "Inputs",
    "PredictBatch",
    "PredictReport",
    "detector_batch",
    "detector_info",
    "predict_files",
    "prepare_out_dir",
    "result_names",
    "review_summary",
    "write_predictions",
]


@dataclass(frozen=True)
class Decision:
    """What a predictor decided for one image: ``anomalous`` (None: no threshold, undecided),
    the ``threshold`` it used, and the defect ``regions`` (None: no pixel threshold)."""

    anomalous: bool | None = None
    threshold: float | None = None
    regions: tuple[Region, ...] | None = None


# (list of RGB uint8 images) -> (scores [B], anomaly maps [B, S, S]), optionally followed by one
# Decision per image (without them every image is undecided)
PredictBatch = Callable[
    [list[np.ndarray]],
    tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, Sequence[Decision]],
]
# image files or folders (searched recursively): one path, or several; or a finished scan
Inputs = str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | InputScan
Out = str | os.PathLike[str] | ResultsFolder


@dataclass
class PredictReport:
    """What a run produced (see the module docstring for the records): ``results`` and
    ``failures`` in input order (those of an earlier, resumed run included), ``skipped``
    folder entries, and ``resumed``, how many results came from the earlier run."""

    results: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0
    review: Path | None = None  # the review page written, None with review=False


def prepare_out_dir(out: str | os.PathLike[str], force: bool) -> None:
    """Create ``out``; refuse one that already holds files unless ``force`` (which removes the
    earlier run's results only). Prefer :meth:`ResultsFolder.open`, which also locks it.

    Raises:
        CopsError: ``out`` is a file, or holds files and ``force`` is not set.
    """
    ResultsFolder.open(out, force=force).close()


# ----------------------------------------------------------------------------------------------
# Result names


def result_names(files: Sequence[InputFile]) -> list[str]:
    """The picture name (a relative POSIX path ending in ``.png``) of each of ``files``, in
    order (rules in the module docstring); unique, also against one another's folders."""
    roots = {f.root_index: f for f in files}
    single_folder = len({f.root_index for f in files}) == 1 and files and files[0].root.is_dir()
    tops: dict[int, str] = {}
    if not single_folder:
        used_tops: set[str] = set()
        for index in sorted(roots):
            item = roots[index]
            is_dir = item.root.is_dir()
            base = item.root.name or Path(os.path.realpath(item.root)).name or "input"
            top, n = base, 1
            while (top if is_dir else f"{top}.png") in used_tops:
                n += 1
                top = f"{base}~{n}"
            used_tops.add(top if is_dir else f"{top}.png")
            tops[index] = top
    claims = _Claims()
    names = []
    for f in files:
        if single_folder:
            wanted = f"{f.rel}.png"
        elif f.root.is_dir():
            wanted = f"{tops[f.root_index]}/{f.rel}.png"
        else:
            wanted = f"{tops[f.root_index]}.png"
        names.append(claims.claim(wanted))
    return names


class _Claims:
    """Result paths handed out so far, as files and as the folders above them."""

    def __init__(self) -> None:
        self.files: set[str] = set()
        self.dirs: set[str] = set()

    def free(self, name: str) -> bool:
        parts = name.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts))]
        return (
            name not in self.files
            and name not in self.dirs
            and not any(p in self.files for p in prefixes)
        )

    def claim(self, wanted: str) -> str:
        name, n = wanted, 1
        while not self.free(name):  # a folder named like a result picture: never in practice
            n += 1
            name = f"{wanted.replace('/', '__')[: -len('.png')]}~{n}.png"
        parts = name.split("/")
        self.files.add(name)
        self.dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
        return name


# ----------------------------------------------------------------------------------------------
# The run


def write_predictions(
    inputs: Inputs,
    predict_batch: PredictBatch,
    out: Out,
    *,
    batch_size: int = 1,
    force: bool = False,
    resume: bool = False,
    info: Mapping[str, Any] | None = None,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    review: bool = True,
) -> PredictReport:
    """Predict every image under ``inputs`` with ``predict_batch`` (``batch_size`` images per
    call) into ``out``: one picture per image, the journal as it goes, ``scores.json`` (``info``,
    then results, failures and skipped entries) and, unless ``review`` is False, ``review.html``
    (its summary from ``info``: see :func:`review_summary`) at the end.

    Args:
        inputs: files and folders, or the :class:`InputScan` of them.
        out: the results folder, or an open :class:`ResultsFolder` (then ``force`` and
            ``resume`` were given to it, and it stays open).
        max_pixels: the largest image decoded (width x height); larger ones are failures.

    Raises:
        ImageReadError: an input path does not exist.
        CopsError: ``out`` is or is inside an input folder, is a file, holds files and neither
            ``force`` nor ``resume`` is set, is in use by another run, or its journal is from
            other settings.
        ConfigError: ``max_pixels`` is invalid.
        OSError: ``review.html`` cannot be written (``scores.json`` is already written).
    """
    limit = check_max_pixels(max_pixels)
    out_path = out.path if isinstance(out, ResultsFolder) else Path(out)
    scan = inputs if isinstance(inputs, InputScan) else scan_inputs(inputs, exclude=[out_path])
    check_out_outside_inputs(out_path, scan.roots)
    folder = (
        out
        if isinstance(out, ResultsFolder)
        else ResultsFolder.open(out_path, inputs=scan.roots, force=force, resume=resume)
    )
    try:
        folder.start(info)
        report = _Run(scan, predict_batch, folder, batch_size, limit, progress).run()
        if review:
            text = render_review(
                [_review_record(r, info or {}) for r in report.results],
                report.failures,
                review_summary(info or {}, report),
                pictures_dir=folder.path,
            )
            # A file name that is not UTF-8 (bytes kept as lone surrogates, as os.listdir gives
            # them) is shown escaped (\udcff) rather than refusing the page.
            data = text.encode("utf-8", errors="backslashreplace")
            report.review = atomic_write_bytes(folder.path / REVIEW_FILE, data, mode=0o644)
        return report
    finally:
        if folder is not out:
            folder.close()


def _review_record(record: Mapping[str, Any], info: Mapping[str, Any]) -> dict[str, Any]:
    """A scores.json result as runtime.review reads it (its decision key is ``is_anomalous``)."""
    return {**record, "is_anomalous": record.get("anomalous"), "threshold": info.get("threshold")}


def review_summary(info: Mapping[str, Any], report: PredictReport) -> ReviewSummary:
    """The review page's summary of a run: what scored (``info``'s ``bundle``, else ``model``
    and ``weights``), backend, precision, and the thresholds and calibration when given."""
    model = info.get("bundle") or info.get("model") or ""
    details: dict[str, Any] = {}
    if info.get("weights") and not info.get("bundle"):
        details["weights"] = info["weights"]
    if info.get("provider"):
        details["provider"] = info["provider"]
    threshold = info.get("threshold")
    details["threshold"] = "none: no decisions (cops calibrate)" if threshold is None else threshold
    if info.get("pixel_threshold") is not None:
        details["pixel threshold"] = info["pixel_threshold"]
    if info.get("min_area") is not None:
        details["min area (pixels)"] = info["min_area"]
    cal = info.get("calibration")
    if isinstance(cal, Mapping):
        image = cal.get("image") if isinstance(cal.get("image"), Mapping) else {}
        target = image.get("target_fpr")
        how = f"{image.get('method')}" + (f" {target}" if target is not None else "")
        normal = (cal.get("images") or {}).get("normal") or {}
        count = f", {normal['count']} normal images" if "count" in normal else ""
        details["calibration"] = f"{how}, {cal.get('created')}{count}"
    if report.resumed:
        details["resumed"] = f"{report.resumed} result(s) from the earlier run"
    if report.skipped:
        details["skipped"] = f"{len(report.skipped)} folder entr(ies) (listed in {SCORES_FILE})"
    return ReviewSummary(
        model=str(model),
        backend=str(info.get("backend") or ""),
        precision=str(info.get("precision") or "fp32"),
        details=details,
    )


class _Run:
    """One :func:`write_predictions` run."""

    def __init__(
        self,
        scan: InputScan,
        predict_batch: PredictBatch,
        folder: ResultsFolder,
        batch_size: int,
        max_pixels: int,
        progress: bool,
    ) -> None:
        self.scan, self.predict_batch, self.folder = scan, predict_batch, folder
        self.batch_size, self.max_pixels, self.progress = max(1, batch_size), max_pixels, progress
        # a picture already there is foreign, except when continuing a killed run (which may
        # have written it without journalling it)
        self.fresh = not folder.continued
        self.pending: list[tuple[InputFile, str, np.ndarray]] = []

    def run(self) -> PredictReport:
        skipped = [
            {"source": str(s.path), "reason": s.reason, "error": s.message}
            for s in self.scan.skipped
        ]
        if self.progress:
            for entry in skipped:
                tqdm.write(f"skipped {entry['error']}", file=sys.stderr)
        names = result_names(self.scan.files)
        done = self.folder.finished
        todo = [
            (f, n) for f, n in zip(self.scan.files, names, strict=True) if str(f.path) not in done
        ]
        resumed = len(self.scan.files) - len(todo)
        self.bar = tqdm(
            total=len(self.scan.files),
            initial=resumed,
            unit="img",
            desc="predict",
            file=sys.stderr,
            disable=not self.progress,
        )
        for item, name in todo:
            try:
                rgb = load_image(item.path, max_pixels=self.max_pixels)
            except ImageReadError as exc:
                self.fail(item, exc.reason, str(exc))
                continue
            except MemoryError as exc:
                self.fail(item, "out_of_memory", f"out of memory decoding {item.path}: {exc}")
                continue
            self.pending.append((item, name, rgb))
            if len(self.pending) >= self.batch_size:
                self.flush()
        self.flush()
        self.bar.close()
        order = [str(f.path) for f in self.scan.files]
        results, failures = self.folder.finish(order, skipped)
        return PredictReport(results, failures, skipped, resumed)

    def fail(self, item: InputFile, reason: str, error: str) -> None:
        self.folder.add_failure({"source": str(item.path), "reason": reason, "error": error})
        if self.progress:
            tqdm.write(f"failed {item.path}: {error}", file=sys.stderr)
        self.bar.update(1)

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        if not batch:
            return
        outputs = self.predict(batch)
        if outputs is None:  # the batch failed as a whole: find the image(s) at fault
            if len(batch) == 1:
                return
            for one in batch:
                self.pending = [one]
                self.flush()
            return
        for (item, name, rgb), score, amap, decision in zip(batch, *outputs, strict=True):
            self.finish_one(item, name, rgb, score, amap, decision)

    def predict(self, batch: list[tuple[InputFile, str, np.ndarray]]) -> tuple | None:
        """(scores, maps, decisions) for ``batch``, or None when it raised (recorded for one
        image)."""
        try:
            scores, maps, *rest = self.predict_batch([rgb for _, _, rgb in batch])
            scores, maps = np.asarray(scores), np.asarray(maps)
            decisions = list(rest[0]) if rest else [Decision()] * len(batch)
            if (
                scores.shape[:1] != (len(batch),)
                or maps.shape[:1] != (len(batch),)
                or len(decisions) != len(batch)
            ):
                raise CopsError(
                    f"the predictor returned {scores.shape[:1]} scores, {maps.shape[:1]} maps "
                    f"and {len(decisions)} decisions for {len(batch)} images"
                )
            return scores, maps, decisions
        except MemoryError as exc:
            reason, error = "out_of_memory", f"out of memory while predicting: {exc}"
        except Exception as exc:  # any backend's error: recorded per image, the run goes on
            reason, error = "backend_error", f"prediction failed ({type(exc).__name__}: {exc})"
        if len(batch) == 1:
            item = batch[0][0]
            self.fail(item, reason, f"{item.path}: {error}")
        return None

    def finish_one(
        self,
        item: InputFile,
        name: str,
        rgb: np.ndarray,
        score: Any,
        amap: np.ndarray,
        decision: Decision,
    ) -> None:
        score = float(score)
        bad = int(np.size(amap) - np.count_nonzero(np.isfinite(amap)))
        if not math.isfinite(score) or bad:
            self.fail(
                item,
                "non_finite_output",
                f"{item.path}: the model gave a score of {score} and {bad} non-finite anomaly "
                "map values; valid: finite numbers. Fix: check the model or bundle (re-export "
                "it; a tampered or wrongly converted graph can give NaN).",
            )
            return
        target = self.folder.path / name
        if self.fresh and (target.exists() or target.is_symlink()):
            self.fail(
                item,
                "write_error",
                f"{item.path}: its picture {str(target)!r} exists and was not written by this "
                "run; it is left alone. Fix: move that file, or choose another --out.",
            )
            return
        try:
            shown = annotate(
                rgb, decision.regions or (), decision.anomalous, score, decision.threshold
            )
            side_by_side(shown, amap, target, score=score)
        except (OSError, MemoryError, CopsError) as exc:
            self.fail(item, "write_error", f"{item.path}: cannot write {target}: {exc}")
            return
        height, width = rgb.shape[:2]
        self.folder.add_result(
            {
                "source": str(item.path),
                "score": score,
                "visual": name,
                "height": int(height),
                "width": int(width),
                "anomalous": decision.anomalous,
                "regions": None
                if decision.regions is None
                else [r.to_dict() for r in decision.regions],
            }
        )
        self.bar.update(1)


# ----------------------------------------------------------------------------------------------
# With a Detector


def detector_batch(
    detector: Detector, batch_size: int | None = None, min_area: int | None = None
) -> PredictBatch:
    """``detector`` as a batch predictor (``batch_size`` images per graph call; None: the
    detector's maximum batch) with its decisions and regions (``min_area``: as
    :meth:`Detector.predict`; None: the calibration's)."""
    size = _batch_size(batch_size, detector.max_batch)

    def predict_batch(rgbs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[Decision]]:
        preds = detector.predict(rgbs, batch_size=size, min_area=min_area)
        scores = np.array([p.score for p in preds], dtype=np.float32)
        decisions = [Decision(p.is_anomalous, p.threshold, p.regions) for p in preds]
        return scores, np.stack([p.anomaly_map for p in preds]), decisions

    return predict_batch


def detector_info(
    detector: Detector, precision: str = "fp32", min_area: int | None = None
) -> dict[str, Any]:
    """The ``info`` (scores.json's top-level keys) of a run of ``detector``: ``bundle``,
    ``backend``, ``provider``, ``precision``, ``threshold`` (None: no decisions),
    ``pixel_threshold`` and ``min_area`` in effect (None without a calibration) and
    ``calibration``, the bundle's calibration record (method, target, date, image sets, ...)."""
    cal = detector.calibration
    return {
        "bundle": str(detector.bundle.root),
        "backend": detector.backend_name,
        "provider": detector.provider,
        "precision": precision,
        "threshold": detector.threshold,
        "pixel_threshold": None if cal is None else cal.pixel_threshold,
        "min_area": None if cal is None else (cal.min_area if min_area is None else min_area),
        "calibration": None if cal is None else cal.to_dict(),
    }


def predict_files(
    detector: Detector,
    inputs: Inputs,
    out: Out,
    *,
    batch_size: int | None = None,
    force: bool = False,
    resume: bool = False,
    precision: str = "fp32",
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_area: int | None = None,
    review: bool = True,
) -> PredictReport:
    """Score every image under ``inputs`` with ``detector`` into ``out`` (see
    :func:`write_predictions`), with the detector's decisions and, on a calibrated bundle, the
    defect regions of at least ``min_area`` pixels (None: the calibration's ``min_area``).

    ``scores.json`` also records :func:`detector_info`: the bundle, the backend, its provider,
    ``precision`` (the one the detector was opened with), the thresholds, ``min_area`` and the
    calibration record.

    Raises:
        ConfigError: ``batch_size`` is not an integer in 1..``detector.max_batch``, or
            ``min_area`` is not an integer >= 1.
        ImageReadError, CopsError: as :func:`write_predictions`.
    """
    size = _batch_size(batch_size, detector.max_batch)
    if min_area is not None:
        check_min_area(min_area)
    info = detector_info(detector, precision, min_area)
    return write_predictions(
        inputs,
        detector_batch(detector, size, min_area),
        out,
        batch_size=size,
        force=force,
        resume=resume,
        info=info,
        progress=progress,
        max_pixels=max_pixels,
        review=review,
    )


def _batch_size(requested: int | None, limit: int) -> int:
    """``--batch-size`` checked against the backend's maximum; None gives the maximum."""
    if requested is None:
        return limit
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ConfigError(
            f"invalid --batch-size {requested!r}; valid: an integer >= 1. Fix: pass e.g. 4."
        )
    if requested > limit:
        raise ConfigError(
            f"--batch-size {requested} exceeds the backend's maximum batch {limit}; valid: "
            f"1..{limit}. Fix: pass --batch-size {limit} or less."
        )
    return requested
