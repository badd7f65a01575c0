"""The HTTP edge service (export/python/cops_service) against the Detector it wraps.

The main server is the real entry point, ``python -m cops_service``, in a subprocess on
127.0.0.1 (settings from flags and environment variables); it is stopped with SIGTERM and must
exit 0. Every answer is compared with ``Detector.predict`` on the same file in this process.
State tests (opening, failure, no threshold) serve ``create_app`` with uvicorn in a thread; so
do the tampered-bundle cases (tests/runtime/tampered_bundles.py), each refused at open.
Every request has a timeout and every wait is a bounded loop.
"""

from __future__ import annotations

import base64
import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

httpx = pytest.importorskip(
    "httpx", reason="the service tests need httpx (pip install 'cops-deploy[dev]')"
)
uvicorn = pytest.importorskip("uvicorn", reason="the service needs uvicorn (its [serve] extra)")
pytest.importorskip("fastapi", reason="the service needs fastapi (its [serve] extra)")
pytest.importorskip("multipart", reason="the service needs python-multipart ([serve] extra)")

import tampered_bundles as tb  # noqa: E402  (tests/runtime, on the path: see conftest.py)
from cops_service.app import create_app  # noqa: E402
from cops_service.settings import ServiceCfg, parse_cfg  # noqa: E402

from cops_deploy.errors import BundleError, ConfigError  # noqa: E402
from cops_deploy.imaging.visualize import colorize  # noqa: E402
from cops_deploy.runtime import Detector  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SERVICE_DIR = ROOT / "export" / "python"
HOST = "127.0.0.1"
TIMEOUT = 30.0  # seconds, every request and every wait
UPLOAD_LIMIT = 256 * 1024  # the test server's --max-upload-bytes (via COPS_MAX_UPLOAD_BYTES)
PIXEL_LIMIT = 200_000  # the test server's max pixels (via COPS_MAX_PIXELS)
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff"}
MIME[".webp"] = "image/webp"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_until(check: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll ``check`` every 0.1 s for at most ``timeout`` seconds."""
    for _ in range(int(timeout / 0.1)):
        if check():
            return
        time.sleep(0.1)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def answers(client: Any, path: str, status: int) -> bool:
    try:
        return client.get(path).status_code == status
    except httpx.TransportError:  # not listening yet
        return False


def service_env(**values: str) -> dict[str, str]:
    """This environment plus the service's import path and ``values``."""
    paths = [str(ROOT), str(SERVICE_DIR), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **values}


# ----------------------------------------------------------------------------------------------
# The main server: python -m cops_service in a subprocess


@pytest.fixture(scope="module")
def server(service_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    log = tmp_path_factory.mktemp("service") / "service.log"
    env = service_env(
        COPS_BUNDLE=str(service_bundle),
        COPS_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT),
        COPS_MAX_PIXELS=str(PIXEL_LIMIT),
        COPS_THREADS="1",
        COPS_LOG_LEVEL="info",  # the teardown reads the shutdown lines
    )
    command = [sys.executable, "-m", "cops_service", "--host", HOST, "--port", str(port)]
    command += ["--backend", "onnxruntime"]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://{HOST}:{port}"
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as probe:

            def ready() -> bool:
                if proc.poll() is not None:
                    pytest.fail(f"the service exited with {proc.returncode}: {log.read_text()}")
                return answers(probe, "/ready", 200)

            wait_until(ready, "GET /ready to answer 200", timeout=120)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=TIMEOUT)
            pytest.fail(f"the service did not stop on SIGTERM: {log.read_text()}")
    text = log.read_text()
    # uvicorn stops gracefully, then re-raises the signal: the exit is by SIGTERM
    assert code == -signal.SIGTERM, f"the service exited with {code} on SIGTERM: {text}"
    assert "Application shutdown complete" in text and "closed the Detector" in text, text


@pytest.fixture(scope="module")
def client(server: str) -> Iterator[Any]:
    with httpx.Client(base_url=server, timeout=TIMEOUT) as c:
        yield c


@pytest.fixture(scope="module")
def detector(service_bundle: Path) -> Iterator[Detector]:
    """The reference: the same bundle, backend and threads as the server, in this process."""
    with Detector.open(service_bundle, backend="onnxruntime", threads=1) as d:
        yield d


def post_image(client: Any, path: Path, transport: str, **params: str) -> Any:
    data = path.read_bytes()
    if transport == "multipart":
        return client.post("/predict", files={"file": (path.name, data)}, params=params)
    mime = MIME[path.suffix] if transport == "raw" else "application/octet-stream"
    return client.post("/predict", content=data, headers={"content-type": mime}, params=params)


def png_pixels(encoded: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        assert image.format == "PNG"
        return np.asarray(image)


def grey16(anomaly_map: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(anomaly_map, 0, 1) * 65535).astype(np.uint16)


def check_error(response: Any, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code, body
    assert body["message"] and body["fix"], body


# ----------------------------------------------------------------------------------------------
# Health, readiness, description


def test_health_and_ready(client: Any) -> None:
    assert client.get("/health").json() == {"status": "alive"}
    response = client.get("/ready")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "status": "ready"}


def test_describe_reports_the_detector_and_manifest(
    client: Any, detector: Detector, service_bundle: Path
) -> None:
    from cops_deploy.version import __version__

    body = client.get("/describe").json()
    manifest = detector.manifest
    assert body["backend"] == detector.backend_name == "onnxruntime"
    assert body["provider"] == detector.provider
    assert body["input_size"] == detector.input_size
    assert body["threshold"] == detector.threshold is not None
    assert body["provenance"] == manifest.provenance.to_dict()
    assert body["parity"] == manifest.parity and body["parity"]["images"] == 2
    assert body["package_version"] == manifest.package_version
    assert body["runtime_version"] == __version__
    assert body["model"] == "cops-tiny" and body["precision"] == "fp32"
    assert Path(body["bundle"]) == service_bundle
    assert body["limits"]["max_upload_bytes"] == UPLOAD_LIMIT
    assert body["limits"]["max_pixels"] == PIXEL_LIMIT


# ----------------------------------------------------------------------------------------------
# Predictions equal Detector.predict on the same file

IMAGES = [
    "rgb.png", "photo.jpg", "grey.png", "rgba.png", "grey16.png", "palette.png", "rgb.bmp",
    "rgb.tif", "rgb.webp", "rotated.jpg",
]  # fmt: skip


@pytest.mark.parametrize("transport", ["multipart", "raw"])
@pytest.mark.parametrize("name", IMAGES)
def test_predict_equals_detector(
    client: Any, detector: Detector, image_files: dict[str, Path], name: str, transport: str
) -> None:
    path = image_files[name]
    ref = detector.predict([path])[0]
    response = post_image(client, path, transport, map="grey16")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["score"] == ref.score  # exactly: the same decode, preprocessing and graphs
    assert body["anomalous"] is body["decision"] is ref.is_anomalous
    assert body["threshold"] == ref.threshold == detector.threshold
    assert body["pixel_threshold"] is body["regions"] is None  # a threshold, no calibration
    assert (body["image"]["height"], body["image"]["width"]) == ref.original_hw
    amap = body["anomaly_map"]
    size = detector.input_size
    assert (amap["encoding"], amap["height"], amap["width"]) == ("grey16", size, size)
    pixels = png_pixels(amap["png_base64"])
    assert pixels.shape == (size, size) and pixels.dtype == np.uint16
    np.testing.assert_array_equal(pixels, grey16(ref.anomaly_map))


def test_gif_is_scored_as_its_first_frame(client: Any, detector: Detector) -> None:
    frames = [Image.fromarray(rgb).convert("P") for rgb in cops_tiny_bundle_rgbs()]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    response = client.post("/predict", **raw(buffer.getvalue(), "image/gif"))
    assert response.status_code == 200, response.text
    first = np.asarray(frames[0].convert("RGB"))
    assert response.json()["score"] == detector.predict([first])[0].score


def cops_tiny_bundle_rgbs() -> list[np.ndarray]:
    import cops_tiny_bundle

    return cops_tiny_bundle.rng_images(2, seed=9)


def test_octet_stream_body_and_no_map(
    client: Any, detector: Detector, image_files: dict[str, Path]
) -> None:
    path = image_files["photo.jpg"]
    body = post_image(client, path, "octet").json()
    assert body["score"] == detector.predict([path])[0].score
    assert "anomaly_map" not in body


def test_decisions_follow_the_threshold(
    client: Any, detector: Detector, image_files: dict[str, Path]
) -> None:
    """The threshold is the median score of these images: both decisions occur."""
    decisions = {}
    for name in IMAGES:
        body = post_image(client, image_files[name], "multipart").json()
        assert body["decision"] == (body["score"] >= detector.threshold)
        decisions[name] = body["decision"]
    assert set(decisions.values()) == {True, False}, decisions


def test_map_at_original_size(
    client: Any, detector: Detector, image_files: dict[str, Path]
) -> None:
    path = image_files["rotated.jpg"]  # EXIF-rotated: the original size is (W, H) of the file
    ref = detector.predict([path], original_size=True)[0]
    assert ref.anomaly_map_original is not None
    body = post_image(client, path, "multipart", map="grey16", map_size="original").json()
    pixels = png_pixels(body["anomaly_map"]["png_base64"])
    assert pixels.shape == ref.original_hw == (90, 60)
    np.testing.assert_array_equal(pixels, grey16(ref.anomaly_map_original))


def test_heatmap_png(client: Any, detector: Detector, image_files: dict[str, Path]) -> None:
    path = image_files["rgb.png"]
    ref = detector.predict([path])[0]
    body = post_image(client, path, "raw", map="heatmap").json()
    assert body["anomaly_map"]["encoding"] == "heatmap"
    pixels = png_pixels(body["anomaly_map"]["png_base64"])
    np.testing.assert_array_equal(pixels, colorize(ref.anomaly_map))


def test_concurrent_predictions(
    client: Any, detector: Detector, image_files: dict[str, Path]
) -> None:
    """Eight requests at once (more than the server's two workers) all give the right scores."""
    names = IMAGES[:8]
    expected = {n: detector.predict([image_files[n]])[0].score for n in names}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {n: pool.submit(post_image, client, image_files[n], "raw") for n in names}
        scores = {n: f.result(timeout=TIMEOUT).json()["score"] for n, f in futures.items()}
    assert scores == expected


# ----------------------------------------------------------------------------------------------
# Bad input: each case a 4xx with a JSON error naming the problem and the fix


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height 8-bit grey pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (width + 1) * 2)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def nan_tiff() -> bytes:
    """A 32-bit float TIFF with a NaN pixel: it decodes, but the Detector refuses to convert it."""
    pixels = np.full((8, 8), 0.5, dtype=np.float32)
    pixels[0, 0] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="TIFF")
    return buffer.getvalue()


def damaged_png(data: bytes) -> bytes:
    """One byte of the first IDAT chunk's data flipped (the decoder fails)."""
    at = data.index(b"IDAT") + 8
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]


def bad_checksum_png(data: bytes) -> bytes:
    """The last IDAT chunk's CRC flipped: the pixels decode, only the checksum tells."""
    at = len(data) - 12 - 4  # the CRC just before the 12-byte IEND chunk
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def bad_bmp() -> bytes:
    """A BMP header with 99 bits per pixel: recognised as BMP, refused when opened."""
    info = struct.pack("<IiiHH", 40, 5, 5, 1, 99) + b"\x00" * 24
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (8, 8)).save(buffer, format="GIF")
    return buffer.getvalue()


EPS_BYTES = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"


def ico_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, format="ICO")
    return buffer.getvalue()


def raw(data: Any, mime: str | None = "image/png", **params: str) -> dict[str, Any]:
    headers = {"content-type": mime} if mime is not None else {}
    return {"content": data, "headers": headers, "params": params}


def multipart(files: Any, data: dict[str, str] | None = None) -> dict[str, Any]:
    return {"files": files, "data": data or {}}


@dataclass(frozen=True)
class Bad:
    """A bad request: ``build(image bytes of rgb.png, of photo.jpg)`` -> httpx post kwargs."""

    build: Callable[[bytes, bytes], dict[str, Any]]
    status: int
    code: str


BAD_INPUT: dict[str, Bad] = {
    "text as image/png": Bad(lambda png, jpg: raw(b"hello, not an image"), 422, "not_an_image"),
    "text file in multipart": Bad(
        lambda png, jpg: multipart({"file": ("notes.txt", b"just text\n", "text/plain")}),
        422,
        "not_an_image",
    ),
    "EPS (format not accepted, never parsed)": Bad(
        lambda png, jpg: raw(EPS_BYTES, "image/png"), 415, "unsupported_format"
    ),
    "ICO (format not accepted)": Bad(
        lambda png, jpg: raw(ico_bytes(), "image/x-icon"), 415, "unsupported_format"
    ),
    "truncated PNG": Bad(lambda png, jpg: raw(png[: len(png) // 2]), 422, "corrupt_image"),
    "truncated JPEG": Bad(
        lambda png, jpg: raw(jpg[: len(jpg) // 2], "image/jpeg"), 422, "corrupt_image"
    ),
    "PNG with damaged data": Bad(lambda png, jpg: raw(damaged_png(png)), 422, "corrupt_image"),
    "PNG with a bad checksum": Bad(
        lambda png, jpg: raw(bad_checksum_png(png)), 422, "corrupt_image"
    ),
    "PNG without its end marker": Bad(lambda png, jpg: raw(png[:-12]), 422, "corrupt_image"),
    "BMP header Pillow rejects": Bad(
        lambda png, jpg: raw(bad_bmp(), "image/bmp"), 422, "corrupt_image"
    ),
    "float TIFF with NaN": Bad(
        lambda png, jpg: raw(nan_tiff(), "image/tiff"), 422, "unreadable_image"
    ),
    "empty body": Bad(lambda png, jpg: raw(b""), 400, "empty_body"),
    "empty file": Bad(
        lambda png, jpg: multipart({"file": ("part.png", b"", "image/png")}), 400, "empty_body"
    ),
    "more pixels than max-pixels": Bad(
        lambda png, jpg: raw(png_bytes(Image.new("L", (500, 401)))), 422, "too_many_pixels"
    ),
    "decompression bomb": Bad(lambda png, jpg: raw(bomb_png(30000, 30000)), 422, "too_many_pixels"),
    "upload over the limit": Bad(
        lambda png, jpg: raw(b"\x00" * (UPLOAD_LIMIT + 1)), 413, "upload_too_large"
    ),
    "chunked upload over the limit": Bad(
        lambda png, jpg: raw(iter([b"\x00" * 65536] * (UPLOAD_LIMIT // 65536 + 1))),
        413,
        "upload_too_large",
    ),
    "multipart upload over the limit": Bad(
        lambda png, jpg: multipart({"file": ("big.png", b"\x00" * UPLOAD_LIMIT)}),
        413,
        "upload_too_large",
    ),
    "Content-Type text/plain": Bad(
        lambda png, jpg: raw(png, "text/plain"), 415, "unsupported_media_type"
    ),
    "JSON body": Bad(
        lambda png, jpg: {"json": {"image": "part.png"}}, 415, "unsupported_media_type"
    ),
    "no Content-Type": Bad(lambda png, jpg: raw(png, None), 415, "unsupported_media_type"),
    "form-urlencoded": Bad(
        lambda png, jpg: {"data": {"file": "part.png"}}, 415, "unsupported_media_type"
    ),
    "file in another field": Bad(
        lambda png, jpg: multipart({"image": ("part.png", png)}), 400, "missing_file"
    ),
    "file field is text": Bad(
        lambda png, jpg: multipart({"other": ("x.png", png)}, {"file": "part.png"}),
        400,
        "missing_file",
    ),
    "multipart without parts": Bad(
        lambda png, jpg: raw(b"--xyz--\r\n", "multipart/form-data; boundary=xyz"),
        400,
        "missing_file",
    ),
    "two files": Bad(
        lambda png, jpg: multipart([("file", ("a.png", png)), ("file", ("b.png", png))]),
        400,
        "invalid_multipart",
    ),
    "multipart without boundary": Bad(
        lambda png, jpg: raw(png, "multipart/form-data"), 400, "invalid_multipart"
    ),
    "unknown map kind": Bad(lambda png, jpg: raw(png, map="colour"), 400, "invalid_parameter"),
    "unknown map size": Bad(lambda png, jpg: raw(png, map_size="huge"), 400, "invalid_parameter"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_a_clear_4xx(client: Any, image_files: dict[str, Path], case: str) -> None:
    bad = BAD_INPUT[case]
    png, jpg = image_files["rgb.png"].read_bytes(), image_files["photo.jpg"].read_bytes()
    check_error(client.post("/predict", **bad.build(png, jpg)), bad.status, bad.code)
    assert client.get("/ready").status_code == 200  # the service is unharmed


def test_limits_fit_the_valid_images(image_files: dict[str, Path]) -> None:
    """The valid images are within the test server's limits (so the table tests the limits)."""
    for path in image_files.values():
        assert path.stat().st_size < UPLOAD_LIMIT
        with Image.open(path) as image:
            assert image.width * image.height <= PIXEL_LIMIT


def test_unknown_endpoint_and_method(client: Any) -> None:
    check_error(client.get("/nothing"), 404, "not_found")
    check_error(client.get("/predict"), 405, "method_not_allowed")


# ----------------------------------------------------------------------------------------------
# Service states, with the app served from a thread


@contextmanager
def serve_in_thread(app: Any) -> Iterator[Any]:
    """Serve ``app`` on 127.0.0.1 (a socket bound here, port chosen by the OS); yields a client."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((HOST, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, "the server to start")
        with httpx.Client(base_url=f"http://{HOST}:{port}", timeout=TIMEOUT) as c:
            yield c
    finally:
        server.should_exit = True
        thread.join(timeout=TIMEOUT)
        sock.close()
    assert not thread.is_alive(), "the server did not stop"


def test_bundle_without_threshold_gives_no_decision(
    plain_bundle: Path, image_files: dict[str, Path]
) -> None:
    app = create_app(ServiceCfg(bundle=plain_bundle, backend="onnxruntime", threads=1))
    path = image_files["rgb.png"]
    with Detector.open(plain_bundle, backend="onnxruntime", threads=1) as d:
        ref = d.predict([path])[0]
    with serve_in_thread(app) as c:
        wait_until(lambda: answers(c, "/ready", 200), "readiness")
        body = post_image(c, path, "multipart").json()
        assert body["score"] == ref.score
        assert body["decision"] is None and body["threshold"] is None
        assert body["anomalous"] is body["pixel_threshold"] is body["regions"] is None
        described = c.get("/describe").json()
        assert described["threshold"] is None and described["parity"] == {}
        assert described["calibration"] is None


def test_a_calibrated_bundle_answers_decisions_and_regions_of_the_detector(
    plain_bundle: Path, image_files: dict[str, Path], tmp_path: Path
) -> None:
    """The answer's anomalous, threshold, pixel_threshold and regions equal Detector.predict's,
    with the threshold at one image's exact score (at the threshold: anomalous)."""
    import dataclasses
    import shutil

    from cops_deploy.runtime.calibration import calibrate, write_calibration

    bundle = tmp_path / "bundle"
    shutil.copytree(plain_bundle, bundle)
    normal = tmp_path / "normal"
    normal.mkdir()
    names = ["rgb.png", "photo.jpg", "grey.png", "rgb.bmp"]
    for name in names:
        shutil.copy(image_files[name], normal / name)
    with Detector.open(bundle, backend="onnxruntime", threads=1) as d:
        record = calibrate(d, normal, fpr=0.5, min_area=2)
        at = d.predict([image_files["rgb.png"]])[0].score
    image = dataclasses.replace(record.image, threshold=at)
    write_calibration(bundle, dataclasses.replace(record, image=image))
    app = create_app(ServiceCfg(bundle=bundle, backend="onnxruntime", threads=1))
    with Detector.open(bundle, backend="onnxruntime", threads=1) as d, serve_in_thread(app) as c:
        wait_until(lambda: answers(c, "/ready", 200), "readiness")
        assert c.get("/describe").json()["calibration"] == d.calibration.to_dict()
        decided, found = set(), 0
        for name in names:
            ref = d.predict([image_files[name]])[0]
            body = post_image(c, image_files[name], "multipart").json()
            assert body["score"] == ref.score
            assert body["anomalous"] is body["decision"] is ref.is_anomalous
            assert body["threshold"] == ref.threshold == at
            assert body["pixel_threshold"] == ref.pixel_threshold == record.pixel_threshold
            assert ref.regions is not None
            assert body["regions"] == [r.to_dict() for r in ref.regions]
            assert all(r["area"] >= 2 for r in body["regions"])
            decided.add(body["anomalous"])
            found += len(body["regions"])
            if name == "rgb.png":
                assert body["score"] == at and body["anomalous"] is True  # the boundary
        assert decided == {True, False} and found > 0


def test_not_ready_while_the_detector_opens(
    plain_bundle: Path, image_files: dict[str, Path]
) -> None:
    release = threading.Event()

    def slow_open(cfg: ServiceCfg) -> Detector:
        if not release.wait(timeout=TIMEOUT):
            raise TimeoutError("the test never released the opener")
        return Detector.open(cfg.bundle, backend=cfg.backend)

    app = create_app(ServiceCfg(bundle=plain_bundle, backend="onnxruntime"), opener=slow_open)
    with serve_in_thread(app) as c:
        assert c.get("/health").status_code == 200  # alive while opening
        response = c.get("/ready")
        check_error(response, 503, "not_ready")
        assert response.json()["status"] == "opening" and response.json()["ready"] is False
        check_error(post_image(c, image_files["rgb.png"], "multipart"), 503, "not_ready")
        check_error(c.get("/describe"), 503, "not_ready")
        release.set()
        wait_until(lambda: answers(c, "/ready", 200), "readiness after the open")
        assert post_image(c, image_files["rgb.png"], "multipart").status_code == 200


def test_failed_open_is_reported(plain_bundle: Path, image_files: dict[str, Path]) -> None:
    failures: list[str] = []
    message = "bundle /x: manifest.json is missing. Fix: re-export it"

    def broken_open(cfg: ServiceCfg) -> Detector:
        raise BundleError(message)

    app = create_app(
        ServiceCfg(bundle=plain_bundle), opener=broken_open, on_open_failure=failures.append
    )
    with serve_in_thread(app) as c:
        wait_until(lambda: answers(c, "/ready", 503) and bool(failures), "the failure")
        body = c.get("/ready").json()
        assert body["status"] == "failed" and message in body["message"]
        check_error(post_image(c, image_files["rgb.png"], "raw"), 503, "not_ready")
        assert c.get("/health").status_code == 200
    assert failures == [message]


def test_closed_detector_gives_503(plain_bundle: Path, image_files: dict[str, Path]) -> None:
    opened: list[Detector] = []

    def open_and_keep(cfg: ServiceCfg) -> Detector:
        opened.append(Detector.open(cfg.bundle, backend=cfg.backend))
        return opened[0]

    app = create_app(ServiceCfg(bundle=plain_bundle, backend="onnxruntime"), opener=open_and_keep)
    with serve_in_thread(app) as c:
        wait_until(lambda: answers(c, "/ready", 200), "readiness")
        opened[0].close()  # as if the service were shutting down under the request
        response = post_image(c, image_files["rgb.png"], "raw")
        check_error(response, 503, "not_ready")
        assert "closed" in response.json()["message"]


class BrokenDetector:
    """Opens fine, fails every prediction with an unexpected error (a bug, not bad input)."""

    backend_name = "broken"

    def describe(self) -> str:
        return "broken test double"

    def predict(self, images: Any, original_size: bool = False) -> list:
        raise RuntimeError("the backend crashed")

    def close(self) -> None:
        pass


class GatedDetector(BrokenDetector):
    """Predicts only once ``gate`` is set: a prediction that takes as long as the test wants."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.started = threading.Event()

    def predict(self, images: Any, original_size: bool = False) -> list:
        from cops_deploy.runtime import Prediction

        self.started.set()
        if not self.gate.wait(timeout=TIMEOUT):
            raise TimeoutError("the test never opened the gate")
        amap = np.zeros((8, 8), dtype=np.float32)
        return [Prediction(0.5, amap, None, None, (8, 8), None)]


def test_predictions_run_off_the_event_loop(
    plain_bundle: Path, image_files: dict[str, Path]
) -> None:
    """While a prediction blocks its worker thread, the server still answers."""
    detector = GatedDetector()
    app = create_app(ServiceCfg(bundle=plain_bundle), opener=lambda cfg: detector)
    with serve_in_thread(app) as c, ThreadPoolExecutor(max_workers=1) as pool:
        wait_until(lambda: answers(c, "/ready", 200), "readiness")
        pending = pool.submit(post_image, c, image_files["rgb.png"], "raw")
        wait_until(detector.started.is_set, "the prediction to start")
        assert c.get("/health", timeout=5).status_code == 200  # the loop is free
        assert not pending.done()
        detector.gate.set()
        assert pending.result(timeout=TIMEOUT).json()["score"] == 0.5


def test_unexpected_error_is_a_json_500(plain_bundle: Path, image_files: dict[str, Path]) -> None:
    app = create_app(ServiceCfg(bundle=plain_bundle), opener=lambda cfg: BrokenDetector())
    with serve_in_thread(app) as c:
        wait_until(lambda: answers(c, "/ready", 200), "readiness")
        response = post_image(c, image_files["rgb.png"], "raw")
        check_error(response, 500, "internal_error")
        assert "RuntimeError: the backend crashed" in response.json()["message"]
        assert c.get("/health").status_code == 200


def test_cli_exits_1_when_the_bundle_cannot_open(tmp_path: Path) -> None:
    missing = tmp_path / "no_bundle"
    command = [sys.executable, "-m", "cops_service", "--bundle", str(missing)]
    command += ["--host", HOST, "--port", str(free_port()), "--log-level", "warning"]
    done = subprocess.run(command, env=service_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"cannot serve bundle {missing}" in done.stderr
    assert "Fix" in done.stderr.split("cannot serve bundle")[-1]


# ----------------------------------------------------------------------------------------------
# The tampered-bundle set (tests/runtime/tampered_bundles.py): refused at open, never served


@pytest.fixture(scope="module")
def tamper_base(tmp_path_factory: pytest.TempPathFactory, edge_graphs: Path) -> Path:
    return tb.make_base(edge_graphs, tmp_path_factory.mktemp("service_tamper") / "base")


@pytest.mark.parametrize("case", tb.CASES, ids=tb.CASE_IDS)
def test_tampered_bundle_is_refused_by_the_service(
    tamper_base: Path, tmp_path: Path, image_files: dict[str, Path], case: tb.Case
) -> None:
    root = tb.tampered(tamper_base, tmp_path / "bundle", case)
    failures: list[str] = []
    cfg = ServiceCfg(bundle=root, threads=1)  # backend auto, verification by default
    app = create_app(cfg, on_open_failure=failures.append)
    with serve_in_thread(app) as c:
        wait_until(lambda: bool(failures), "the open to fail", timeout=tb.TIMEOUT)
        response = c.get("/ready")
        check_error(response, 503, "not_ready")
        assert response.json()["status"] == "failed"
        assert re.search(case.message, response.json()["message"])
        check_error(post_image(c, image_files["rgb.png"], "raw"), 503, "not_ready")
        assert c.get("/health").status_code == 200
    assert re.search(case.message, failures[0])
    assert not re.match(r"^[A-Za-z]*(Error|Exception): ", failures[0])  # a typed refusal


@pytest.mark.parametrize("name", ["flip vision.onnx.data", "vision.onnx reads an unlisted file"])
def test_service_process_exits_1_on_a_tampered_bundle(
    tamper_base: Path, tmp_path: Path, name: str
) -> None:
    case = next(c for c in tb.CASES if c.name == name)
    root = tb.tampered(tamper_base, tmp_path / "bundle", case)
    command = [sys.executable, "-m", "cops_service", "--bundle", str(root)]
    command += ["--host", HOST, "--port", str(free_port()), "--log-level", "warning"]
    done = subprocess.run(
        command, env=service_env(), capture_output=True, text=True, timeout=tb.TIMEOUT
    )
    assert done.returncode == 1, done.stderr
    assert f"cannot serve bundle {root}" in done.stderr
    assert re.search(case.message, done.stderr) and "Traceback" not in done.stderr


def test_script_form_shows_its_help() -> None:
    done = subprocess.run(
        [sys.executable, str(SERVICE_DIR / "serve.py"), "--help"],
        env=service_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "COPS_MAX_UPLOAD_BYTES" in done.stdout


# ----------------------------------------------------------------------------------------------
# Settings: flags over environment variables


def test_settings_from_environment_and_flags(tmp_path: Path) -> None:
    env = {
        "COPS_BUNDLE": str(tmp_path / "a"),
        "COPS_PORT": "9000",
        "COPS_THREADS": "3",
        "COPS_MAX_UPLOAD_BYTES": "1_000_000",
        "COPS_BACKEND": "openvino",
        "COPS_PRECISION": "bf16",
    }
    cfg = parse_cfg([], env)
    assert (cfg.bundle, cfg.port, cfg.threads, cfg.max_upload_bytes) == (
        tmp_path / "a", 9000, 3, 1_000_000,
    )  # fmt: skip
    assert (cfg.backend, cfg.precision, cfg.host) == ("openvino", "bf16", "127.0.0.1")
    assert cfg.warmup is True  # on by default
    assert parse_cfg([], {**env, "COPS_WARMUP": "off"}).warmup is False
    assert parse_cfg(["--warmup", "on"], {**env, "COPS_WARMUP": "0"}).warmup is True
    flags = ["--bundle", str(tmp_path / "b"), "--port", "9001", "--threads", "auto"]
    cfg = parse_cfg([*flags, "--host", "0.0.0.0", "--max-pixels", "1000"], env)
    assert (cfg.bundle, cfg.port, cfg.threads) == (tmp_path / "b", 9001, None)
    assert (cfg.host, cfg.max_pixels) == ("0.0.0.0", 1000)


@pytest.mark.parametrize(
    "argv, env, message",
    [
        ([], {}, "no bundle given.*--bundle DIR or set COPS_BUNDLE"),
        (
            ["--bundle", "b"],
            {"COPS_PORT": "http"},
            "'http' is not an integer in 0..65535.*COPS_PORT",
        ),
        (["--bundle", "b", "--port", "70000"], {}, "'70000' is not an integer in 0..65535"),
        (["--bundle", "b"], {"COPS_THREADS": "0"}, "'0' is not an integer >= 1.*COPS_THREADS"),
        (["--bundle", "b", "--max-upload-bytes", "-1"], {}, "COPS_MAX_UPLOAD_BYTES"),
        (["--bundle", "b", "--max-pixels", "999999999999"], {}, "COPS_MAX_PIXELS"),
        (["--bundle", "b"], {"COPS_CONCURRENCY": "none"}, "COPS_CONCURRENCY"),
        (["--bundle", "b"], {"COPS_LOG_LEVEL": "loud"}, "invalid log level 'loud'"),
        (["--bundle", "b"], {"COPS_WARMUP": "maybe"}, "'maybe' is not on or off.*COPS_WARMUP"),
    ],
)
def test_invalid_settings_exit_2(
    argv: list[str], env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_cfg(argv, env)
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize(
    "field, value",
    [("port", -1), ("threads", 0), ("max_pixels", 10**12), ("log_level", "loud"), ("warmup", "on")],
)
def test_invalid_service_cfg(field: str, value: object, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"invalid {field}={value!r}"):
        ServiceCfg(bundle=tmp_path, **{field: value})


@pytest.mark.parametrize("warmup", [True, False])
def test_open_detector_passes_the_warmup_setting(
    warmup: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cops_service.app as service_app

    seen: dict[str, Any] = {}
    monkeypatch.setattr(service_app.Detector, "open", lambda bundle, **kw: seen.update(kw))
    service_app.open_detector(ServiceCfg(bundle=tmp_path, warmup=warmup))
    assert seen["warmup"] is warmup
