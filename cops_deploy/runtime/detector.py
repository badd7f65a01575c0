"""The Detector API: open a bundle, pick a backend, predict scores and anomaly maps.

``Detector.open(bundle)`` chooses a backend from the registry
(:mod:`cops_deploy.runtime.backends.registry`): TensorRT (installed, engines present, engine keys
matching this machine), then ONNX Runtime (CUDA, then CPU), then OpenVINO, then the plug-ins
(PyTorch, with the bundle's ``torch_model`` weights), and says which (``backend_name``,
``provider``, ``skipped``). ``predict`` takes paths, PIL images, uint8/uint16 arrays or a mix,
preprocesses them as the manifest says, runs the vision graph then the head graph in batches,
and returns one :class:`Prediction` per image.

Thread safety: one Detector may serve concurrent ``predict`` calls. Preprocessing is per call;
ONNX Runtime sessions are shared (``InferenceSession.run`` is thread-safe, so calls run in
parallel); the TensorRT and PyTorch backends serialise ``infer`` with a lock each. Do not call
``close`` while a ``predict`` is running.

Torch-free: this module imports no backend's package; torch is imported only when the PyTorch
backend plug-in is chosen.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from PIL import Image

from cops_deploy.errors import BackendError, BundleError, ConfigError, CopsError, ImageReadError
from cops_deploy.imaging.decode import DEFAULT_MAX_PIXELS, ImageSource
from cops_deploy.imaging.preprocess import preprocess_batch, resize_map
from cops_deploy.runtime.backends import (
    AUTO,
    Backend,
    check_backend_choice,
    check_graph_names,
    open_backends,
)
from cops_deploy.runtime.bundle import Bundle, open_bundle, reopen_bundle
from cops_deploy.runtime.calibration import load_calibration
from cops_deploy.runtime.contract import ANOMALY_MAP, GRAPHS, IMAGE, PRED_SCORE
from cops_deploy.runtime.manifest import Calibration, Manifest
from cops_deploy.runtime.regions import Region, check_min_area, defect_regions

__all__ = ["DEFAULT_MAX_BATCH", "Detector", "Prediction"]

DEFAULT_MAX_BATCH = 8  # batch size when neither the caller nor the backend sets a limit
_LOG = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)  # arrays inside: compare fields explicitly
class Prediction:
    """The result for one image.

    Attributes:
        score: the image anomaly score (raw; the threshold is separate data).
        anomaly_map: (S, S) float32 map at the model's input size.
        anomaly_map_original: (H, W) float32 map at the image's size, when asked for or when
            the bundle is calibrated (the mask and regions are found on it).
        source: the file path the image came from, None for in-memory images.
        original_hw: (H, W) of the image after EXIF orientation.
        threshold: the bundle's decision threshold, None when the bundle has none.
        pixel_threshold: the calibrated pixel threshold, None when the bundle has no
            calibration record.
        mask: (H, W) bool defect mask at the image's size (``anomaly_map_original >=
            pixel_threshold``, in regions of at least ``min_area`` pixels); None without a
            pixel threshold (or with ``predict(regions=False)``).
        regions: the defect regions (8-connected, bounding box, area, peak and mean score) in
            the image's pixel coordinates, in raster order; None when ``mask`` is None.
    """

    score: float
    anomaly_map: np.ndarray = field(repr=False)
    anomaly_map_original: np.ndarray | None = field(repr=False)
    source: str | None
    original_hw: tuple[int, int]
    threshold: float | None = None
    pixel_threshold: float | None = None
    mask: np.ndarray | None = field(default=None, repr=False)
    regions: tuple[Region, ...] | None = None

    @property
    def is_anomalous(self) -> bool | None:
        """``score >= threshold``; None when the bundle sets no threshold."""
        if self.threshold is None:
            return None
        return self.score >= self.threshold


def _as_items(images: ImageSource | Sequence[ImageSource] | Iterable[ImageSource]) -> list[Any]:
    """One image or many, as a list (a 4-D array is a batch of (H, W, C) images)."""
    if isinstance(images, str | os.PathLike | Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, bytes | bytearray | dict) or not isinstance(images, Iterable):
        raise ImageReadError(
            f"cannot predict on a {type(images).__name__}; valid: a path, a PIL image, a "
            f"uint8/uint16 numpy array, or a list of those. Fix: pass one of those."
        )
    return list(images)


def _check_batch_size(batch_size: int | None, limit: int | None) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(
            f"invalid batch_size={batch_size!r}; valid: None (the backend's maximum) or an "
            f"integer >= 1. Fix: pass e.g. batch_size=4."
        )
    if limit is not None and batch_size > limit:
        raise ConfigError(
            f"batch_size={batch_size} exceeds the backend's maximum batch {limit}; valid: "
            f"1..{limit}. Fix: pass batch_size<={limit} (or None)."
        )
    return batch_size


class Detector:
    """CoPS anomaly detection from a bundle; create it with :meth:`Detector.open`.

    Attributes:
        bundle: the opened bundle.
        backend_name: the registered name of the backend that runs the graphs ('tensorrt',
            'onnxruntime', 'openvino', 'torch' or another plug-in's).
        skipped: backend name -> why auto selection passed over it (empty for an explicit
            backend).
    """

    def __init__(
        self, bundle: Bundle, vision: Backend, head: Backend, skipped: dict[str, str]
    ) -> None:
        self.bundle = bundle
        self.vision = vision
        self.head = head
        self.backend_name = vision.kind
        self.skipped = dict(skipped)
        self._calibration = load_calibration(bundle)  # read once: a re-calibration needs a reopen
        self._lock = threading.Lock()
        self._closed = False

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        bundle: str | os.PathLike[str] | Bundle,
        backend: str = AUTO,
        verify: bool = True,
        threads: int | None = None,
        verbose: bool = False,
        precision: str = "fp32",
        warmup: bool = False,
    ) -> Detector:
        """Open ``bundle`` and activate its two graphs on ``backend``.

        Args:
            bundle: a bundle directory, or an already opened :class:`Bundle`, which is checked
                again (:func:`~cops_deploy.runtime.bundle.reopen_bundle`: a verified Bundle
                against the size, times and inode of every file when it was hashed; an
                unverified one is opened again, with verification).
            backend: 'auto' (TensorRT, then ONNX Runtime, then OpenVINO, then the plug-ins such
                as 'torch'), or one of the names ``backend_names()`` lists.
            verify: check every bundle file's sha256 (on by default; size, presence, paths and
                the ONNX files' external-data locations are always checked).
            threads: intra-op threads for ONNX Runtime and OpenVINO; None: one per core.
            verbose: print the chosen backend (and why others were skipped) to stderr.
            precision: 'fp32' (default), or 'bf16': the vision graph in bfloat16 on a CPU that
                has it (backend 'openvino' only; the head stays fp32). Maps differ from fp32 by
                about 5e-3 on the full model.
            warmup: after the bundle is verified and the backends are active, run one dummy
                image through :meth:`predict` (see :meth:`warm_up`), so the first real image runs
                at the steady-state speed instead of paying the backends' first-call costs.

        Raises:
            ConfigError: ``backend`` or ``precision`` is not a known name (the message lists
                the registered backends), or bf16 is asked of another backend than OpenVINO.
            BundleError: the bundle is invalid or changed since it was opened; or the explicit
                backend does not fit it; or (auto) no backend can run it (the message gives
                each backend's reason).
            BackendError: the backend failed with an error of its own (chained as the cause).
            MissingDependencyError: the explicit backend's package (or plug-in) is not
                installed.
        """
        check_backend_choice(backend, precision, threads)  # before a large bundle is hashed
        if isinstance(bundle, Bundle):
            bundle = reopen_bundle(bundle, verify=verify)
        else:
            bundle = open_bundle(bundle, verify=verify)
        _check_bundle(bundle)
        try:
            vision, head, skipped = open_backends(
                bundle, backend, threads=threads, precision=precision
            )
        except CopsError:
            raise
        except Exception as exc:  # a backend's own error that escaped its class
            raise BackendError(
                f"backend {backend!r} cannot open bundle {bundle.root} "
                f"({type(exc).__name__}: {exc}). Fix: pass another backend, or re-export the "
                f"bundle if the message points at it."
            ) from exc
        detector = cls(bundle, vision, head, skipped)
        if warmup:
            try:
                detector.warm_up()
            except BaseException:
                detector.close()
                raise
        message = f"cops: {detector.describe()}"
        _LOG.info(message)
        if verbose:
            print(message, file=sys.stderr)
        return detector

    # -- properties ----------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The bundle's manifest."""
        return self.bundle.manifest

    @property
    def provider(self) -> str:
        """What runs the graphs: an ONNX Runtime provider, a GPU name, or a torch device."""
        return self.vision.provider

    @property
    def threshold(self) -> float | None:
        """The bundle's decision threshold (None: the bundle sets none)."""
        return self.manifest.threshold

    @property
    def calibration(self) -> Calibration | None:
        """The bundle's calibration record (thresholds, min_area, provenance), None: none."""
        return self._calibration

    @property
    def input_size(self) -> int:
        """Side of the square model input (and of ``Prediction.anomaly_map``)."""
        return self.manifest.preprocess.size

    @property
    def max_batch(self) -> int:
        """The default batch size: the backends' limit, else :data:`DEFAULT_MAX_BATCH`."""
        limits = [b.max_batch for b in (self.vision, self.head) if b.max_batch is not None]
        return min(limits) if limits else DEFAULT_MAX_BATCH

    @property
    def last_inference_time(self) -> dict[str, float | None]:
        """Seconds the latest call spent in each graph: {'vision': ..., 'head': ...}."""
        return {"vision": self.vision.last_inference_time, "head": self.head.last_inference_time}

    def describe(self) -> str:
        """One line: the backend, its provider and why other backends were skipped."""
        text = f"backend {self.backend_name} ({self.provider}) for bundle {self.bundle.root}"
        if self.skipped:
            text += "; skipped: " + "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        return text

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"Detector(bundle={str(self.bundle.root)!r}, backend={self.backend_name!r}, "
            f"provider={self.provider!r}, {state})"
        )

    # -- lifecycle -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the backends; further ``predict`` calls raise. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.head.deactivate()
        finally:
            self.vision.deactivate()

    def __enter__(self) -> Detector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- prediction ----------------------------------------------------------------------------

    def warm_up(self) -> float:
        """Predict one mid-grey image at the bundle's input size and discard the result; returns
        the seconds it took. Backends allocate buffers and choose kernels on their first call
        (about 1.7x the steady-state time on the full model); doing that here keeps it off the
        first real image. ``Detector.open(..., warmup=True)`` calls it.

        Raises:
            CopsError: the detector is closed, or a backend fails on the dummy image.
        """
        size = self.input_size
        start = time.perf_counter()
        self.predict(np.full((size, size, 3), 128, dtype=np.uint8), batch_size=1)
        seconds = time.perf_counter() - start
        _LOG.info("cops: warm-up predict took %.3f s", seconds)
        return seconds

    def predict(
        self,
        images: ImageSource | Sequence[ImageSource],
        original_size: bool = False,
        batch_size: int | None = None,
        regions: bool = True,
        min_area: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> list[Prediction]:
        """Score one or many images; returns one Prediction per image, in input order.

        With a calibrated bundle (:attr:`calibration`), each Prediction also holds the defect
        mask and regions at the image's size (see :mod:`cops_deploy.runtime.regions`); the
        decision ``is_anomalous`` needs only the bundle's ``threshold``.

        Args:
            images: a path, PIL image or uint8/uint16 array (any size; grey, RGB, RGBA), or a
                list of them (mixed kinds allowed), or a 4-D (B, H, W, C) array.
            original_size: also give each map at the image's own size (bilinear).
            batch_size: images per graph call; None: :attr:`max_batch`.
            regions: find the mask and regions when the bundle is calibrated (False: scores
                and maps only, as for an uncalibrated bundle).
            min_area: smallest region kept, in pixels; None: the calibration's ``min_area``.
            max_pixels: the largest width x height an image FILE may claim (the decompression
                limit; see :func:`~cops_deploy.imaging.decode.load_image`).

        Raises:
            ImageReadError: an image cannot be read (the message gives its index and source).
            ConfigError: ``batch_size`` or ``min_area`` is invalid.
            CopsError: the detector is closed.
        """
        if self._closed:
            raise CopsError(
                f"Detector for {self.bundle.root} is closed. Fix: open a new one with "
                f"Detector.open(...), and close it only after the last predict."
            )
        items = _as_items(images)
        size = _check_batch_size(batch_size, self.max_batch) or self.max_batch
        if min_area is not None:
            check_min_area(min_area)
        cal = self._calibration if regions else None
        area = None if cal is None else (cal.min_area if min_area is None else min_area)
        predictions: list[Prediction] = []
        for start in range(0, len(items), size):
            chunk = items[start : start + size]
            predictions.extend(
                self._predict_chunk(chunk, start, len(items), original_size, area, max_pixels)
            )
        return predictions

    def _load(
        self, chunk: list[Any], start: int, total: int, max_pixels: int = DEFAULT_MAX_PIXELS
    ) -> tuple[np.ndarray, list]:
        """(B, 3, S, S) float32 batch and the (H, W) of each image of ``chunk``, the images
        ``start`` .. ``start + B - 1`` of the ``total`` given to ``predict``."""
        pre = self.manifest.preprocess
        try:
            return preprocess_batch(chunk, pre.size, pre.mean, pre.std, max_pixels=max_pixels)
        except ImageReadError as exc:
            if len(chunk) == total:  # one chunk: its item index is the image index
                raise
            last = start + len(chunk) - 1
            raise ImageReadError(f"in images {start}..{last} of {total}: {exc}") from exc

    def _run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Vision graph, then head graph: scores (B,) and maps (B, S, S) as float32."""
        embeddings = self.vision.infer({IMAGE: batch})
        head_feed = {name: embeddings[name] for name in self.head.input_metadata}
        out = self.head.infer(head_feed)
        scores = np.asarray(out[PRED_SCORE], dtype=np.float32)
        maps = np.asarray(out[ANOMALY_MAP], dtype=np.float32)
        s, b = self.input_size, batch.shape[0]
        if scores.shape != (b,) or maps.shape != (b, s, s):
            raise BundleError(
                f"bundle {self.bundle.root}: the head graph returned {PRED_SCORE} "
                f"{scores.shape} and {ANOMALY_MAP} {maps.shape} for a batch of {b}; valid: "
                f"({b},) and ({b}, {s}, {s}). Fix: re-export the bundle."
            )
        return scores, maps

    def _predict_chunk(
        self,
        chunk: list[Any],
        start: int,
        total: int,
        original_size: bool,
        min_area: int | None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> list[Prediction]:
        """Predictions of ``chunk``; ``min_area`` None: no mask nor regions."""
        batch, sizes = self._load(chunk, start, total, max_pixels)
        scores, maps = self._run(batch)
        cal = self._calibration if min_area is not None else None
        out = []
        for item, score, amap, hw in zip(chunk, scores, maps, sizes, strict=True):
            amap = amap.copy()  # (S, S), not a view that keeps the batch alive
            source = str(item) if isinstance(item, str | os.PathLike) else None
            original = resize_map(amap, hw) if original_size or cal is not None else None
            mask, found = None, None
            if cal is not None:  # set only with a min_area, and then ``original`` is too
                mask, listed = defect_regions(original, cal.pixel_threshold, min_area)
                found = tuple(listed)
            out.append(
                Prediction(
                    score=float(score),
                    anomaly_map=amap,
                    anomaly_map_original=original,
                    source=source,
                    original_hw=hw,
                    threshold=self.threshold,
                    pixel_threshold=None if cal is None else cal.pixel_threshold,
                    mask=mask,
                    regions=found,
                )
            )
        return out


# ----------------------------------------------------------------------------------------------
# Bundle checks (the backend itself comes from the registry)


def _check_bundle(bundle: Bundle) -> None:
    """The bundle has both graphs with the contract's names, and a preprocessing we implement."""
    for graph in GRAPHS:
        check_graph_names(bundle, graph)
    interp = bundle.manifest.preprocess.interpolation
    if interp != "bicubic":
        raise BundleError(
            f"bundle {bundle.root}: preprocess.interpolation is {interp!r}; this runtime "
            f"resizes with 'bicubic' only (CLIP's preprocessing). Fix: re-export the bundle "
            f"with bicubic interpolation."
        )
