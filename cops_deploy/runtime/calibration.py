"""Calibration for the line: thresholds from images, stored with the bundle, read back.

``cops calibrate`` (cops_deploy/cli/calibrate_cmd.py) is a thin layer over three steps:

1. :func:`calibrate` scores folders of images with an open Detector and returns a
   :class:`~cops_deploy.runtime.manifest.Calibration`:

   - image threshold, method 'fpr' (default): the smallest normal score ``t`` such that at most
     ``floor(fpr * n)`` of the ``n`` normal scores are ``>= t`` (if tied scores make every
     observed value exceed that count, the next float above the largest score: no normal image
     is flagged). ``floor(fpr * n)`` must be >= 1, else the rate cannot be told from the data:
     fewer than :func:`required_normal_images` images are refused with the number needed
     (fpr 0.01 needs 100). On the calibration images the flagged fraction is at most ``fpr``.
   - image threshold, method 'f1' (``target='f1'``, anomalous images needed): the observed
     score ``t`` maximising the F1 of ``score >= t`` (anomalous = positive), the largest such
     ``t`` on ties (fewer false alarms).
   - pixel threshold: without masks, the same 'fpr' rule over every pixel of the normal
     images' maps (``pixel_fpr``, default ``fpr``); with masks of the anomalous images, the
     F1-optimal 'f1' rule over the pixels of all images (normal images: all pixels normal;
     a mask pixel is a defect when > 127). Pixel statistics use the maps at the model's input
     size S x S (the original-size map is their bilinear resize), masks resized to S x S with
     nearest neighbour; memory is 4 bytes per pixel per image (1.1 MB per image at S = 518).

2. :func:`write_calibration` stores the record with the bundle, atomically: the record is
   written under a new content-addressed name ``calibration-<sha256[:16]>.json``, then
   ``manifest.json`` is replaced in one rename so that it lists the new record (with its sha256
   and size, like every file) and sets ``threshold`` to the image threshold, then the old record
   is removed. A crash before the rename leaves the old manifest and the old record; graphs and
   every other file are never touched.

3. :func:`load_calibration` reads the record back for the Detector: it must be the one listed
   (sha256 checked on every read), valid against the schema, and agree with the manifest's
   ``threshold``.

The image sets are recorded by count and :func:`image_set_record`'s digest: sha256 of the UTF-8
lines ``<relative POSIX path>\\t<file sha256>\\n``, one per image, sorted by path, so anyone can
recompute it from the folder. Torch-free.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from cops_deploy.errors import BundleError, ConfigError, DatasetError
from cops_deploy.fileio import atomic_write_bytes, atomic_write_text
from cops_deploy.imaging.decode import IMAGE_EXTENSIONS, load_image, scan_inputs
from cops_deploy.runtime.bundle import Bundle, open_bundle, sha256_file
from cops_deploy.runtime.manifest import (
    MANIFEST_NAME,
    ROLE_CALIBRATION,
    Calibration,
    FileEntry,
    ImageSetRecord,
    Manifest,
    ThresholdRecord,
)
from cops_deploy.runtime.regions import check_min_area
from cops_deploy.version import __version__

if TYPE_CHECKING:
    from cops_deploy.runtime.detector import Detector

__all__ = [
    "DEFAULT_FPR",
    "METHODS",
    "MASK_LEVEL",
    "allowed_false_positives",
    "calibrate",
    "check_enough",
    "f1_threshold",
    "fpr_threshold",
    "list_images",
    "image_set_record",
    "load_calibration",
    "match_masks",
    "required_normal_images",
    "write_calibration",
]

DEFAULT_FPR = 0.01
METHODS = ("fpr", "f1")
MASK_LEVEL = 127  # a mask pixel is a defect when its 8-bit value is above this (> 0.5 of 255)
_EPS = 1e-9  # floor(fpr * n) is taken as floor(fpr * n + _EPS): 0.29 * 100 is 29, not 28
_RECORD_PREFIX = "calibration-"
ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------
# Threshold rules


def _check_fpr(fpr: object, name: str = "fpr") -> float:
    ok = isinstance(fpr, int | float) and not isinstance(fpr, bool)
    if not ok or not (0.0 < float(fpr) < 1.0):  # type: ignore[arg-type]
        raise ConfigError(
            f"invalid {name} {fpr!r}; valid: a false-positive rate strictly between 0 and 1. "
            f"Fix: pass e.g. {name}=0.01 (1% of normal images flagged)."
        )
    return float(fpr)  # type: ignore[arg-type]


def allowed_false_positives(fpr: float, n: int) -> int:
    """``floor(fpr * n)``: how many of ``n`` normal values may be at or above the threshold."""
    return math.floor(_check_fpr(fpr) * n + _EPS)


def required_normal_images(fpr: float) -> int:
    """The fewest normal values for which ``floor(fpr * n) >= 1`` (fpr 0.01: 100)."""
    need = math.ceil((1.0 - _EPS) / _check_fpr(fpr))
    while allowed_false_positives(fpr, need) < 1:
        need += 1
    return need


def check_enough(n: int, fpr: float, what: str = "normal images") -> None:
    """Refuse ``n`` normal values too few for ``fpr``: DatasetError with the number needed."""
    if allowed_false_positives(fpr, n) < 1:
        need = required_normal_images(fpr)
        raise DatasetError(
            f"too few {what} for a false-positive rate of {fpr:g}: got {n}, need at least "
            f"{need} (floor(fpr * n) >= 1, else the rate cannot be measured). Fix: add normal "
            f"images until there are {need}, or pass a larger --fpr (e.g. {1 / max(n, 1):.2g})."
        )


def fpr_threshold(
    normal: np.ndarray, fpr: float, what: str = "normal images"
) -> tuple[float, dict[str, float | None]]:
    """The 'fpr' rule (see the module docstring) over ``normal`` values.

    Returns:
        (threshold, achieved): achieved holds 'fpr' (the fraction of ``normal`` >= threshold),
        'false_positives' and 'count'.

    Raises:
        DatasetError: fewer values than :func:`required_normal_images` (the message names
            ``what`` and the number needed).
    """
    values = np.asarray(normal).ravel()
    n = int(values.size)
    check_enough(n, fpr, what)
    k = allowed_false_positives(fpr, n)
    candidate = np.partition(values, n - k)[n - k]  # the k-th largest value
    if int(np.count_nonzero(values >= candidate)) <= k:
        threshold = candidate
    else:  # ties straddle the k-th place: the smallest value above it
        above = values[values > candidate]
        threshold = above.min() if above.size else np.nextafter(candidate, np.inf)
    flagged = int(np.count_nonzero(values >= threshold))
    return float(threshold), {"fpr": flagged / n, "false_positives": flagged, "count": n}


def f1_threshold(values: np.ndarray, labels: np.ndarray) -> tuple[float, dict[str, float | None]]:
    """The 'f1' rule: the observed value t maximising F1 of ``values >= t`` against ``labels``
    (True: anomalous), the largest such t on ties.

    Returns:
        (threshold, achieved): achieved holds 'f1', 'precision', 'recall' ('tpr'), 'fpr' and
        the counts of positives and negatives.

    Raises:
        DatasetError: ``labels`` has no positive or no negative.
    """
    v = np.asarray(values).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    positives, negatives = int(y.sum()), int(y.size - y.sum())
    if positives == 0 or negatives == 0:
        raise DatasetError(
            f"the F1-optimal threshold needs anomalous and normal values; got {positives} "
            f"anomalous and {negatives} normal. Fix: pass --anomalous (and --masks with defect "
            f"pixels > {MASK_LEVEL}) besides --normal."
        )
    order = np.argsort(-v, kind="stable")
    v_sorted, y_sorted = v[order], y[order]
    tp = np.cumsum(y_sorted)
    fp = np.arange(1, v.size + 1) - tp
    last = np.flatnonzero(np.append(v_sorted[1:] != v_sorted[:-1], True))  # end of each value
    f1 = 2 * tp[last] / (tp[last] + fp[last] + positives)
    best = last[int(np.argmax(f1))]  # the first maximum: the largest threshold
    t, f = int(tp[best]), int(fp[best])
    achieved: dict[str, float | None] = {
        "f1": 2 * t / (t + f + positives),
        "precision": t / (t + f),
        "tpr": t / positives,
        "fpr": f / negatives,
        "positives": positives,
        "negatives": negatives,
    }
    return float(v_sorted[best]), achieved


# ----------------------------------------------------------------------------------------------
# Image sets


def list_images(folder: str | os.PathLike[str], what: str = "--normal") -> list[Path]:
    """Every image under ``folder`` (recursive, sorted, hidden entries skipped).

    Raises:
        DatasetError: ``folder`` is not a folder, holds a file that is not an image (by suffix:
            one of IMAGE_EXTENSIONS), or holds no image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DatasetError(
            f"{what} {str(root)!r} is not a folder; valid: a folder of images. Fix: pass the "
            f"folder that holds them."
        )
    # The folder walk of `cops predict` (hidden entries and link loops left out); stricter on
    # what it reports: another suffix is refused here, and only regular files are images.
    scan = scan_inputs(root)
    images = [f.path for f in scan.files if f.path.is_file()]
    others = [s.path for s in scan.skipped if s.reason == "unsupported_extension"]
    if others:
        shown = ", ".join(repr(p.relative_to(root).as_posix()) for p in others[:5])
        raise DatasetError(
            f"{what} {str(root)!r} holds {len(others)} file(s) that are not images ({shown}); "
            f"valid: only images ({', '.join(sorted(IMAGE_EXTENSIONS))}), so that the recorded "
            f"digest is the calibration set. Fix: move the other files out of the folder."
        )
    if not images:
        raise DatasetError(
            f"{what} {str(root)!r} holds no image; valid: a folder with images "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}). Fix: pass the folder that holds them."
        )
    return images


def image_set_record(
    root: str | os.PathLike[str], files: Sequence[Path] | None = None
) -> ImageSetRecord:
    """Count and digest of an image set: sha256 of the lines ``<path>\\t<sha256>\\n`` (path
    relative to ``root``, POSIX; sha256 of the file), sorted by path. ``files`` None: every
    image :func:`list_images` finds under ``root`` (recompute a record from the folder)."""
    base = Path(root)
    paths = list_images(base) if files is None else list(files)
    lines = sorted(f"{p.relative_to(base).as_posix()}\t{sha256_file(p)}\n" for p in paths)
    digest = hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()
    return ImageSetRecord(count=len(paths), sha256=digest)


def match_masks(anomalous_root: Path, images: Sequence[Path], masks_root: Path) -> list[Path]:
    """The mask of each anomalous image, by name: ``<masks>/<relative dir>/<stem><suffix>`` with
    ``<suffix>`` '' or '_mask' and any image extension (as MVTec AD names them).

    Raises:
        DatasetError: an image has no mask or several (the message lists them).
    """
    available = list_images(masks_root, "--masks")
    by_key: dict[str, list[Path]] = {}
    for mask in available:
        rel = mask.relative_to(masks_root).with_suffix("").as_posix()
        by_key.setdefault(rel, []).append(mask)
    out, missing = [], []
    for image in images:
        rel = image.relative_to(anomalous_root).with_suffix("").as_posix()
        found = by_key.get(rel, []) + by_key.get(rel + "_mask", [])
        if len(found) == 1:
            out.append(found[0])
        elif not found:
            missing.append(rel)
        else:
            raise DatasetError(
                f"anomalous image {rel!r} has {len(found)} masks in {str(masks_root)!r}: "
                f"{[str(p) for p in found]}; valid: one. Fix: keep one of them."
            )
    if missing:
        raise DatasetError(
            f"{len(missing)} anomalous image(s) have no mask in {str(masks_root)!r}, e.g. "
            f"{missing[:3]}; valid: a mask named like the image (same relative folder and stem, "
            f"optionally '_mask', any image suffix). Fix: add the masks or remove the images."
        )
    return out


# ----------------------------------------------------------------------------------------------
# Scoring


def _score(
    detector: Detector, paths: Sequence[Path], progress: ProgressFn | None, done: int, total: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """Scores (n,), maps (n, S, S) float32 and original (H, W) of ``paths``, in batches."""
    size, batch = detector.input_size, detector.max_batch
    scores = np.empty(len(paths), dtype=np.float64)
    maps = np.empty((len(paths), size, size), dtype=np.float32)
    sizes: list[tuple[int, int]] = []
    for start in range(0, len(paths), batch):
        preds = detector.predict(list(paths[start : start + batch]), regions=False)
        for i, p in enumerate(preds, start):
            scores[i], maps[i] = p.score, p.anomaly_map
            sizes.append(p.original_hw)
        if progress is not None:
            progress(done + start + len(preds), total)
    return scores, maps, sizes


def _mask_labels(masks: Sequence[Path], sizes: Sequence[tuple[int, int]], size: int) -> np.ndarray:
    """(n, S, S) bool defect labels of the masks, each checked against its image's size."""
    out = np.empty((len(masks), size, size), dtype=bool)
    for i, (path, hw) in enumerate(zip(masks, sizes, strict=True)):
        grey = load_image(path).max(axis=2)  # (H, W) uint8
        if grey.shape != hw:
            raise DatasetError(
                f"mask {str(path)!r} is {grey.shape[1]}x{grey.shape[0]} but its image is "
                f"{hw[1]}x{hw[0]}; valid: a mask of the image's size. Fix: use the right mask."
            )
        small = Image.fromarray(grey).resize((size, size), Image.Resampling.NEAREST)
        out[i] = np.asarray(small) > MASK_LEVEL
    return out


def calibrate(
    detector: Detector,
    normal: str | os.PathLike[str],
    anomalous: str | os.PathLike[str] | None = None,
    masks: str | os.PathLike[str] | None = None,
    target: str = "fpr",
    fpr: float = DEFAULT_FPR,
    pixel_fpr: float | None = None,
    min_area: int = 1,
    precision: str = "fp32",
    progress: ProgressFn | None = None,
) -> Calibration:
    """Score the image folders with ``detector`` and compute the thresholds (module docstring).

    Args:
        detector: an open Detector on the bundle to calibrate.
        normal: folder of normal (defect-free) images.
        anomalous: folder of anomalous images (needed by ``target='f1'`` and ``masks``; with
            'fpr' it only adds the achieved recall to the record).
        masks: folder of the anomalous images' defect masks (see :func:`match_masks`): makes
            the pixel threshold F1-optimal.
        target: 'fpr' or 'f1' for the image threshold.
        fpr: the target false-positive rate of 'fpr'.
        pixel_fpr: the target rate on normal pixels without masks; None: ``fpr``.
        min_area: smallest defect region kept at prediction time (pixels, original size).
        precision: the precision the detector runs in (recorded).
        progress: called with (images scored, total) after each batch.

    Raises:
        ConfigError: an option is invalid or inconsistent.
        DatasetError: a folder is missing, empty, holds non-image files, or has too few images
            for the rate; a mask is missing or of the wrong size.
        ImageReadError: an image cannot be read (the message names it).
    """
    if target not in METHODS:
        raise ConfigError(
            f"invalid target {target!r}; valid: {list(METHODS)} ('fpr': the image threshold at "
            f"a false-positive rate on normal images; 'f1': F1-optimal, needs --anomalous)."
        )
    fpr = _check_fpr(fpr)
    pixel_fpr = fpr if pixel_fpr is None else _check_fpr(pixel_fpr, "pixel_fpr")
    min_area = check_min_area(min_area)
    if anomalous is None and (target == "f1" or masks is not None):
        need = "target 'f1'" if target == "f1" else "masks"
        raise ConfigError(
            f"{need} needs anomalous images; got none. Fix: pass --anomalous DIR (the images "
            f"with defects{', whose masks --masks holds' if masks is not None else ''})."
        )
    normal_root = Path(normal)
    normal_files = list_images(normal_root, "--normal")
    if target == "fpr":  # refused before any image is scored
        check_enough(len(normal_files), fpr, f"normal images in {str(normal_root)!r}")
    anomalous_root = None if anomalous is None else Path(anomalous)
    anomalous_files = [] if anomalous_root is None else list_images(anomalous_root, "--anomalous")
    mask_files = None
    if masks is not None and anomalous_root is not None:
        mask_files = match_masks(anomalous_root, anomalous_files, Path(masks))

    total = len(normal_files) + len(anomalous_files)
    n_scores, n_maps, _ = _score(detector, normal_files, progress, 0, total)
    a_scores, a_maps, a_sizes = _score(
        detector, anomalous_files, progress, len(normal_files), total
    )
    images = {"normal": image_set_record(normal_root, normal_files)}
    if anomalous_root is not None:
        images["anomalous"] = image_set_record(anomalous_root, anomalous_files)

    if target == "fpr":
        threshold, achieved = fpr_threshold(n_scores, fpr, f"normal images in {str(normal)!r}")
        if anomalous_files:
            achieved["tpr"] = float(np.mean(a_scores >= threshold))
        image = ThresholdRecord(threshold, "fpr", fpr, achieved)
    else:
        scores = np.concatenate([n_scores, a_scores])
        labels = np.concatenate([np.zeros(len(n_scores), bool), np.ones(len(a_scores), bool)])
        threshold, achieved = f1_threshold(scores, labels)
        image = ThresholdRecord(threshold, "f1", None, achieved)

    if mask_files is not None and masks is not None:
        images["masks"] = image_set_record(Path(masks), mask_files)
        labels = _mask_labels(mask_files, a_sizes, detector.input_size)
        values = np.concatenate([n_maps.ravel(), a_maps.ravel()])
        truth = np.concatenate([np.zeros(n_maps.size, bool), labels.ravel()])
        del n_maps, a_maps
        p_threshold, p_achieved = f1_threshold(values, truth)
        pixel = ThresholdRecord(p_threshold, "f1", None, p_achieved)
    else:
        p_threshold, p_achieved = fpr_threshold(n_maps, pixel_fpr, "normal pixels")
        pixel = ThresholdRecord(p_threshold, "fpr", pixel_fpr, p_achieved)

    return Calibration(
        image=image,
        pixel=pixel,
        min_area=min_area,
        images=images,
        backend=detector.backend_name,
        provider=str(detector.provider),
        precision=precision,
        package_version=__version__,
        created=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )


# ----------------------------------------------------------------------------------------------
# Storing and reading


def write_calibration(bundle: str | os.PathLike[str] | Bundle, calibration: Calibration) -> Path:
    """Store ``calibration`` with the bundle, atomically (module docstring, step 2); returns the
    record's path. The bundle is opened and verified first (a broken bundle is refused before
    anything is written); only the record and ``manifest.json`` are written.

    Raises:
        BundleError: the bundle cannot be opened or verified.
        OSError: a file cannot be written (the bundle keeps its previous calibration).
    """
    root = Path(bundle.root if isinstance(bundle, Bundle) else bundle)
    opened = open_bundle(root, verify=True)
    data = calibration.to_json().encode("utf-8")
    sha = hashlib.sha256(data).hexdigest()
    name = f"{_RECORD_PREFIX}{sha[:16]}.json"
    old = [e.path for e in opened.manifest.with_role(ROLE_CALIBRATION)]
    files = tuple(e for e in opened.manifest.files if e.role != ROLE_CALIBRATION)
    entry = FileEntry(path=name, sha256=sha, size=len(data), role=ROLE_CALIBRATION)
    manifest = dataclasses.replace(
        opened.manifest, files=(*files, entry), threshold=calibration.image_threshold
    )
    text = Manifest.from_dict(manifest.to_dict()).to_json()  # validated before anything is written
    manifest_path = root / MANIFEST_NAME
    mode = manifest_path.stat().st_mode & 0o777
    record = atomic_write_bytes(root / name, data, mode=mode)
    try:
        atomic_write_text(manifest_path, text, mode=mode)
    except BaseException:
        if name not in old:
            record.unlink(missing_ok=True)
        raise
    for stale in root.glob(f"{_RECORD_PREFIX}*.json"):  # the old record, and any crash leftover
        if stale.name != name:
            stale.unlink(missing_ok=True)
    return record


def load_calibration(bundle: Bundle) -> Calibration | None:
    """The bundle's calibration record, or None when it lists none (module docstring, step 3).

    Raises:
        BundleError: several records are listed; the record is missing, changed since it was
            listed (sha256), invalid, or disagrees with the manifest's ``threshold``.
    """
    entries = bundle.manifest.with_role(ROLE_CALIBRATION)
    if not entries:
        return None
    fix = f"Fix: run `cops calibrate {bundle.root} --normal DIR` again."
    if len(entries) > 1:
        raise BundleError(
            f"bundle {bundle.root} lists {len(entries)} calibration records "
            f"{[e.path for e in entries]}; valid: at most one. {fix}"
        )
    entry = entries[0]
    try:
        data = (bundle.root / entry.path).read_bytes()
    except OSError as exc:
        raise BundleError(
            f"bundle {bundle.root}: cannot read {entry.path!r}: {exc}. {fix}"
        ) from exc
    actual = hashlib.sha256(data).hexdigest()
    if actual != entry.sha256:
        raise BundleError(
            f"bundle {bundle.root}: calibration record {entry.path!r} has sha256 {actual}, the "
            f"manifest expects {entry.sha256} (changed after calibration). {fix}"
        )
    record = Calibration.from_json(data, f"bundle {bundle.root}: calibration record {entry.path!r}")
    if bundle.manifest.threshold != record.image_threshold:
        raise BundleError(
            f"bundle {bundle.root}: manifest key 'threshold' is {bundle.manifest.threshold!r} "
            f"but the calibration record {entry.path!r} has image threshold "
            f"{record.image_threshold!r}; valid: equal (cops calibrate writes both). {fix}"
        )
    return record
