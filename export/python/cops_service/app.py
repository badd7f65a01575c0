"""The HTTP edge service: one Detector, opened once, behind FastAPI.

Endpoints:

    GET  /health     liveness: 200 as long as the process answers HTTP
    GET  /ready      readiness: 200 once the Detector is open; 503 while it opens or if it failed
    GET  /describe   backend, provider, input size, threshold, calibration record, provenance,
                     package versions,
                     the manifest's parity figures and the service's limits
    POST /predict    one image -> score, anomalous (the decision), threshold, pixel threshold and
                     defect regions (a calibrated bundle), and the anomaly map on request

``/predict`` takes the image as ``multipart/form-data`` (field ``file``) or as the raw body with
``Content-Type: image/*`` or ``application/octet-stream``. Query parameters: ``map`` = none
(default), grey16 or heatmap; ``map_size`` = model (the model's input size, default) or original
(the image's size). Every error answers JSON ``{"error", "message", "fix"}``; bad input always
gets a 4xx (400 malformed request, 413 body over the limit, 415 media type or image format not
accepted, 422 an image that cannot be decoded or is too large), 503 means not ready.

The Detector opens in a background thread when the app starts, so /health answers at once and
/ready tells when predictions can start. Decoding and prediction run in worker threads (at most
``concurrency`` at once), never on the event loop; ``Detector.predict`` is thread-safe.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from cops_deploy.errors import CopsError
from cops_deploy.runtime import Detector
from cops_deploy.version import __version__

from .decoding import ACCEPTED_FORMATS
from .http_errors import error_response, install_handlers, refuse
from .predicting import MapKind, MapSize, predict_upload
from .settings import ServiceCfg

__all__ = [
    "FILE_FIELD",
    "DetectorSlot",
    "UploadLimit",
    "create_app",
    "describe_service",
    "open_detector",
    "read_image_bytes",
]

FILE_FIELD = "file"  # the multipart field that carries the image
RAW_MEDIA_TYPES = "image/* (image/png, image/jpeg, ...) or application/octet-stream"
_LOG = logging.getLogger("cops_service")
_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]


def open_detector(cfg: ServiceCfg) -> Detector:
    """``Detector.open`` with the service's bundle, backend, precision, threads and warm-up."""
    return Detector.open(
        cfg.bundle,
        backend=cfg.backend,
        precision=cfg.precision,
        threads=cfg.threads,
        warmup=cfg.warmup,
    )


# ----------------------------------------------------------------------------------------------
# The one Detector


class DetectorSlot:
    """Holds the service's Detector and its state: 'opening', 'ready', 'failed' or 'closed'."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state = "opening"
        self.detector: Detector | None = None
        self.error: str | None = None

    def open(
        self,
        cfg: ServiceCfg,
        opener: Callable[[ServiceCfg], Detector],
        on_failure: Callable[[str], None] | None,
    ) -> None:
        """Open the Detector (blocking; the app runs this in a background thread)."""
        try:
            detector = opener(cfg)
        except Exception as exc:  # CopsError, or anything else a backend raises: both reported
            message = str(exc) if isinstance(exc, CopsError) else f"{type(exc).__name__}: {exc}"
            _LOG.error("cannot open the Detector for bundle %s: %s", cfg.bundle, message)
            with self._lock:
                if self.state == "opening":
                    self.state, self.error = "failed", message
            if on_failure is not None:
                on_failure(message)
            return
        with self._lock:
            if self.state == "opening":
                self.state, self.detector = "ready", detector
                _LOG.info("ready: %s", detector.describe())
                return
        detector.close()  # the service closed while it was opening

    def require(self) -> Detector:
        """The open Detector, or a 503 refusal saying why there is none."""
        with self._lock:
            state, detector, error = self.state, self.detector, self.error
        if detector is not None and state == "ready":
            return detector
        raise refuse(503, "not_ready", *_not_ready(state, error))

    def close(self) -> None:
        """Close the Detector (if open); later requests get 503. Idempotent."""
        with self._lock:
            detector, self.detector, self.state = self.detector, None, "closed"
        if detector is not None:
            detector.close()
            _LOG.info("closed the Detector (%s)", detector.backend_name)


def _not_ready(state: str, error: str | None) -> tuple[str, str]:
    """(message, fix) for a service that cannot predict in ``state``."""
    if state == "opening":
        return "the Detector is still opening the bundle", "retry when GET /ready answers 200"
    if state == "failed":
        return (
            f"the Detector could not open the bundle: {error}",
            "fix the bundle or the service's settings as the message says, then restart",
        )
    return "the service is shutting down", "retry on another instance or after the restart"


# ----------------------------------------------------------------------------------------------
# Request bodies


class UploadLimit:
    """ASGI middleware: refuse a request body over ``max_bytes`` with 413.

    A declared Content-Length over the limit is refused before any byte is read (curl's
    ``Expect: 100-continue`` then sends nothing); a chunked body is counted as it streams.
    """

    def __init__(self, app: _ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            response = error_response(413, "upload_too_large", *self._explain(declared))
            await response(scope, receive, send)
            return
        seen = 0

        async def limited() -> _Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise refuse(413, "upload_too_large", *self._explain(seen, streamed=True))
            return message

        await self.app(scope, limited, send)

    def _explain(self, size: int, streamed: bool = False) -> tuple[str, str]:
        what = f"more than {size - 1}" if streamed else f"{size}"
        return (
            f"the request body is {what} bytes; this service accepts at most {self.max_bytes}",
            "send a smaller image (PNG or JPEG of the part), or raise the service's "
            "--max-upload-bytes / COPS_MAX_UPLOAD_BYTES",
        )


def _content_length(scope: _Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:  # the HTTP server refuses a malformed length before us
                return None
    return None


def _media_type(header: str | None) -> str:
    return (header or "").split(";", 1)[0].strip().lower()


async def read_image_bytes(request: Request) -> bytes:
    """The uploaded image's bytes, from a multipart field or the raw body (4xx if neither)."""
    header = request.headers.get("content-type")
    media = _media_type(header)
    if media == "multipart/form-data":
        return await _read_multipart(request)
    if media == "application/octet-stream" or media.startswith("image/"):
        return b"".join([chunk async for chunk in request.stream()])
    raise refuse(
        415,
        "unsupported_media_type",
        f"Content-Type {header!r} is not accepted for an image",
        f"send multipart/form-data with the image in field '{FILE_FIELD}' (curl -F "
        f"{FILE_FIELD}=@part.png), or the raw image with Content-Type {RAW_MEDIA_TYPES}",
    )


async def _read_multipart(request: Request) -> bytes:
    try:
        form = await request.form(max_files=1, max_fields=16)
    except StarletteHTTPException as exc:
        if isinstance(exc.detail, dict):  # our own refusal (the upload limit): keep it
            raise
        raise refuse(
            400,
            "invalid_multipart",
            f"the multipart body cannot be parsed: {exc.detail}",
            f"send exactly one file, in field '{FILE_FIELD}' (curl -F {FILE_FIELD}=@part.png)",
        ) from exc
    try:
        item = form.get(FILE_FIELD)
        if not isinstance(item, UploadFile):
            given = "text, not a file" if item is not None else "missing"
            raise refuse(
                400,
                "missing_file",
                f"multipart field '{FILE_FIELD}' is {given} (fields sent: {sorted(form.keys())})",
                f"send the image as a file in field '{FILE_FIELD}': curl -F "
                f"{FILE_FIELD}=@part.png (the @ makes curl upload the file)",
            )
        return await item.read()
    finally:
        await form.close()


# ----------------------------------------------------------------------------------------------
# The app


def create_app(
    cfg: ServiceCfg,
    opener: Callable[[ServiceCfg], Detector] = open_detector,
    on_open_failure: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app serving ``cfg.bundle``.

    Args:
        cfg: the service settings.
        opener: opens the Detector (``cfg`` -> Detector); runs once, in a background thread.
        on_open_failure: called with the message when ``opener`` fails (``python -m
            cops_service`` uses it to stop the server with status 1).
    """
    slot = DetectorSlot()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.limiter = anyio.CapacityLimiter(cfg.concurrency)
        threading.Thread(
            target=slot.open,
            args=(cfg, opener, on_open_failure),
            name="cops-open-detector",
            daemon=True,
        ).start()
        try:
            yield
        finally:
            slot.close()

    app = FastAPI(
        title="CoPS anomaly detection",
        version=__version__,
        description="Scores images with a CoPS deployment bundle (cops_deploy Detector).",
        lifespan=lifespan,
    )
    app.state.cfg, app.state.slot = cfg, slot
    app.add_middleware(UploadLimit, max_bytes=cfg.max_upload_bytes)
    install_handlers(app)

    @app.get("/health", summary="Liveness")
    def health() -> dict:
        """200 while the process answers HTTP."""
        return {"status": "alive"}

    @app.get("/ready", summary="Readiness")
    def ready() -> JSONResponse:
        """200 once the Detector is open, else 503 with the reason."""
        try:
            slot.require()
        except StarletteHTTPException as exc:
            body = {"ready": False, "status": slot.state, **exc.detail}
            return JSONResponse(body, status_code=exc.status_code)
        return JSONResponse({"ready": True, "status": "ready"})

    @app.get("/describe", summary="The bundle and the backend serving it")
    def describe() -> dict:
        """What is served, by what, and the service's limits (503 until ready)."""
        return describe_service(slot.require(), cfg)

    @app.post("/predict", summary="Score one image", openapi_extra=_PREDICT_BODY)
    async def predict(
        request: Request,
        map_kind: Annotated[MapKind, Query(alias="map")] = "none",
        map_size: MapSize = "model",
    ) -> dict:
        """Score, anomalous (null without a threshold), threshold, pixel threshold and regions
        (null without a calibration), image size, optional map."""
        detector = slot.require()
        data = await read_image_bytes(request)
        work = partial(predict_upload, detector, data, cfg.max_pixels, map_kind, map_size)
        try:
            return await anyio.to_thread.run_sync(work, limiter=request.app.state.limiter)
        except CopsError as exc:  # the Detector closed under the request (shutdown)
            raise refuse(503, "not_ready", f"prediction stopped: {exc}", "retry") from exc

    return app


def describe_service(detector: Detector, cfg: ServiceCfg) -> dict:
    """The /describe answer."""
    manifest = detector.manifest
    return {
        "bundle": str(cfg.bundle),
        "model": manifest.model_config.get("name"),
        "backend": detector.backend_name,
        "provider": detector.provider,
        "precision": cfg.precision,
        "summary": detector.describe(),
        "input_size": detector.input_size,
        "threshold": detector.threshold,
        "calibration": None if detector.calibration is None else detector.calibration.to_dict(),
        "provenance": manifest.provenance.to_dict(),
        "package_version": manifest.package_version,
        "runtime_version": __version__,
        "parity": manifest.parity,
        "limits": {
            "max_upload_bytes": cfg.max_upload_bytes,
            "max_pixels": cfg.max_pixels,
            "concurrency": cfg.concurrency,
            "formats": list(ACCEPTED_FORMATS),
            "content_types": ["multipart/form-data", "image/*", "application/octet-stream"],
        },
    }


_BINARY = {"schema": {"type": "string", "format": "binary"}}
_PREDICT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FILE_FIELD],
                    "properties": {FILE_FIELD: {"type": "string", "format": "binary"}},
                }
            },
            "image/png": _BINARY,
            "image/jpeg": _BINARY,
            "application/octet-stream": _BINARY,
        },
    }
}
