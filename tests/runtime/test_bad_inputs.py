"""A corpus of awkward inputs through every way in: ``cops predict`` with PyTorch weights,
``cops predict --bundle`` (ONNX Runtime) and the HTTP service.

The corpus (:data:`CASES`, the one table of expected outcomes) is written into tmp_path by the
tests: truncated, empty and non-image files, decompression bombs, lying headers, formats
outside the allowlist (EPS named .png: a fake ``gs`` on PATH records whether Ghostscript ever
ran), every mode and format the README lists, EXIF orientations, unicode and non-UTF-8 names,
extreme aspect ratios, links that dangle or loop, FIFOs, folders named like images, hidden and
duplicate entries. Each run must finish under a timeout without a traceback, list every entry
in scores.json (result, failure or skipped, each with its reason) exactly as the table says,
write strict JSON and bounded pictures.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from timeouts_support import deadline

from cops_deploy.errors import ImageReadError
from cops_deploy.imaging.decode import load_image
from cops_deploy.imaging.visualize import MAX_PANEL_ASPECT

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 600  # seconds for one whole cops predict run over the corpus
CASE_TIMEOUT = 20  # seconds for one file through load_image
TILE = 518  # side_by_side's default panel height
ROOT_USER = os.geteuid() == 0
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n%%EOF\n"
NON_UTF8 = os.fsdecode(b"bad\xff name.png")


# ----------------------------------------------------------------------------------------------
# Builders


def _rgb(h: int = 40, w: int = 30, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def save(image: Image.Image, **kw: object) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        image.save(path, **kw)

    return make


def data(payload: bytes | Callable[[], bytes]) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.write_bytes(payload() if callable(payload) else payload)

    return make


def encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def exif(orientation: int) -> Callable[[Path], None]:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return save(Image.fromarray(_rgb(40, 30, orientation)), format="JPEG", exif=tags)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")


def bomb_png() -> bytes:
    """A 200-byte PNG whose header claims 30000 x 30000 grey pixels."""
    header = (30000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])
    rows = zlib.compress(b"\x00" * 30001 * 2)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", rows)


def lying_jpeg(width: int, height: int) -> bytes:
    """A 16x16 JPEG (about 630 bytes) whose frame header claims width x height."""
    raw = encoded(Image.new("RGB", (16, 16), (200, 10, 10)), "JPEG")
    at = raw.index(b"\xff\xc0") + 5
    return raw[:at] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + raw[at + 4 :]


def lying_gif() -> bytes:
    raw = bytearray(encoded(Image.new("P", (8, 8)), "GIF"))
    raw[6:10] = (60000).to_bytes(2, "little") + (1000).to_bytes(2, "little")
    return bytes(raw)


def nan_tiff() -> bytes:
    pixels = np.full((8, 8), 0.5, np.float32)
    pixels[0, 0] = np.nan
    return encoded(Image.fromarray(pixels), "TIFF")


def good_png() -> bytes:
    return encoded(Image.fromarray(_rgb()), "PNG")


def bad_crc() -> bytes:
    raw = good_png()
    at = len(raw) - 16  # the last IDAT's CRC
    return raw[:at] + bytes([raw[at] ^ 1]) + raw[at + 1 :]


def multipage() -> Callable[[Path], None]:
    pages = [Image.fromarray(_rgb(20, 20, s)) for s in (1, 2)]
    return save(pages[0], format="TIFF", save_all=True, append_images=pages[1:])


def animated() -> Callable[[Path], None]:
    frames = [Image.fromarray(_rgb(24, 24, s)).convert("P") for s in (1, 2, 3)]
    return save(frames[0], format="GIF", save_all=True, append_images=frames[1:])


def symlink(target: str, is_dir: bool = False) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.symlink_to(target, target_is_directory=is_dir)

    return make


def fifo(path: Path) -> None:
    os.mkfifo(path)


def folder_with_image(path: Path) -> None:
    path.mkdir()
    Image.fromarray(_rgb(10, 10)).save(path / "inner.png")


def unreadable(path: Path) -> None:
    Image.fromarray(_rgb()).save(path, format="PNG")
    path.chmod(0)


# ----------------------------------------------------------------------------------------------
# The table: name -> how it is made, what cops predict does with it, what the service answers


@dataclass(frozen=True)
class Case:
    """``outcome``: 'ok', 'failed:<reason>', 'skipped:<reason>' or 'folder' (searched, not an
    input itself). ``upload``: the service's answer to the entry's bytes, '200' or
    '<status> <error code>'; None when there are no bytes to send (links, FIFOs, folders)."""

    make: Callable[[Path], None]
    outcome: str
    upload: str | None


CASES: dict[str, Case] = {
    # every mode and format the README lists: scored
    "rgb.png": Case(save(Image.fromarray(_rgb())), "ok", "200"),
    "grey.png": Case(save(Image.fromarray(_rgb()[..., 0])), "ok", "200"),
    "la.png": Case(save(Image.fromarray(_rgb()[..., :2].copy(), "LA")), "ok", "200"),
    "rgba.png": Case(save(Image.fromarray(np.dstack([_rgb(), _rgb()[..., :1]]))), "ok", "200"),
    "palette.png": Case(save(Image.fromarray(_rgb()).convert("P")), "ok", "200"),
    "palette_trns.png": Case(
        save(Image.fromarray(_rgb()).convert("P"), transparency=3), "ok", "200"
    ),
    "bilevel.png": Case(save(Image.fromarray(_rgb()).convert("1")), "ok", "200"),
    "deep16.png": Case(
        save(Image.fromarray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50)), "ok", "200"
    ),
    "photo.jpg": Case(save(Image.fromarray(_rgb())), "ok", "200"),
    "grey.jpg": Case(save(Image.fromarray(_rgb()[..., 0])), "ok", "200"),
    "cmyk.jpg": Case(save(Image.fromarray(_rgb()).convert("CMYK")), "ok", "200"),
    "progressive.jpg": Case(save(Image.fromarray(_rgb()), progressive=True), "ok", "200"),
    "exif3.jpg": Case(exif(3), "ok", "200"),
    "exif6.jpg": Case(exif(6), "ok", "200"),
    "exif8.jpg": Case(exif(8), "ok", "200"),
    "image.bmp": Case(save(Image.fromarray(_rgb())), "ok", "200"),
    "image.tif": Case(save(Image.fromarray(_rgb())), "ok", "200"),
    "float01.tif": Case(save(Image.fromarray(np.full((9, 9), 0.25, np.float32))), "ok", "200"),
    "multipage.tif": Case(multipage(), "ok", "200"),
    "image.webp": Case(save(Image.fromarray(_rgb())), "ok", "200"),
    "anim.gif": Case(animated(), "ok", "200"),
    "UPPER.PNG": Case(save(Image.fromarray(_rgb()), format="PNG"), "ok", "200"),
    "jpeg_inside.png": Case(data(lambda: encoded(Image.fromarray(_rgb()), "JPEG")), "ok", "200"),
    "ünïcødé 画像.png": Case(save(Image.fromarray(_rgb())), "ok", "200"),
    NON_UTF8: Case(save(Image.fromarray(_rgb()), format="PNG"), "ok", "200"),
    "tall_1x2000.png": Case(save(Image.new("RGB", (1, 2000), (9, 9, 9))), "ok", "200"),
    "wide_2000x1.png": Case(save(Image.new("RGB", (2000, 1), (9, 9, 9))), "ok", "200"),
    "wide_10000x1.png": Case(save(Image.new("L", (10000, 1), 7)), "ok", "200"),
    "tall_1x10000.png": Case(save(Image.new("L", (1, 10000), 7)), "ok", "200"),
    "one_pixel.png": Case(save(Image.new("RGB", (1, 1), (1, 2, 3))), "ok", "200"),
    "flat_3000.png": Case(save(Image.new("L", (3000, 3000), 90)), "ok", "200"),
    "a.jpg": Case(save(Image.fromarray(_rgb(seed=5))), "ok", "200"),
    "a.png": Case(save(Image.fromarray(_rgb(seed=6))), "ok", "200"),
    "a_00002.png": Case(save(Image.fromarray(_rgb(seed=7))), "ok", "200"),
    "sub/a.png": Case(save(Image.fromarray(_rgb(seed=8))), "ok", "200"),
    "sub/deep/nested.png": Case(save(Image.fromarray(_rgb(seed=9))), "ok", "200"),
    # damaged or hostile files: failures with their reason
    "truncated.png": Case(data(lambda: good_png()[:300]), "failed:corrupt", "422 corrupt_image"),
    "truncated.jpg": Case(
        data(lambda: encoded(Image.fromarray(_rgb()), "JPEG")[:400]),
        "failed:corrupt",
        "422 corrupt_image",
    ),
    "bad_crc.png": Case(data(bad_crc), "failed:corrupt", "422 corrupt_image"),
    "no_iend.png": Case(data(lambda: good_png()[:-12]), "failed:corrupt", "422 corrupt_image"),
    "empty.png": Case(data(b""), "failed:empty", "400 empty_body"),
    "text.png": Case(data(b"just some text\n"), "failed:not_an_image", "422 not_an_image"),
    "noise.jpg": Case(data(bytes(range(256)) * 4), "failed:not_an_image", "422 not_an_image"),
    "eps_named.png": Case(data(EPS), "failed:unsupported_format", "415 unsupported_format"),
    "icon.png": Case(
        data(lambda: encoded(Image.new("RGB", (16, 16)), "ICO")),
        "failed:unsupported_format",
        "415 unsupported_format",
    ),
    "bomb.png": Case(data(bomb_png), "failed:too_many_pixels", "422 too_many_pixels"),
    "lying_9000.jpg": Case(
        data(lambda: lying_jpeg(9000, 9000)), "failed:too_many_pixels", "422 too_many_pixels"
    ),
    "lying_4000x3000.jpg": Case(
        data(lambda: lying_jpeg(4000, 3000)), "failed:implausible_size", "422 corrupt_image"
    ),
    "lying.gif": Case(data(lying_gif), "failed:implausible_size", "422 corrupt_image"),
    "float_nan.tif": Case(data(nan_tiff), "failed:unconvertible", "422 unreadable_image"),
    # paths that are not plain files
    "dangling.png": Case(symlink("nowhere.png"), "failed:dangling_symlink", None),
    "loop.png": Case(symlink("loop.png"), "failed:symlink_loop", None),
    "loop_a.png": Case(symlink("loop_b.png"), "failed:symlink_loop", None),
    "loop_b.png": Case(symlink("loop_a.png"), "failed:symlink_loop", None),
    "pipe.png": Case(fifo, "failed:special_file", None),
    "unreadable.png": Case(
        unreadable, "ok" if ROOT_USER else "failed:unreadable", "200" if ROOT_USER else None
    ),
    "dir.png": Case(folder_with_image, "folder", None),
    "dir.png/inner.png": Case(lambda p: None, "ok", "200"),  # made with dir.png
    # entries that are not image candidates: skipped, with the reason
    "alias.png": Case(symlink("rgb.png"), "skipped:duplicate", "200"),
    "notes.txt": Case(data(b"notes\n"), "skipped:unsupported_extension", "422 not_an_image"),
    "README": Case(data(b"readme\n"), "skipped:unsupported_extension", "422 not_an_image"),
    "pipe": Case(fifo, "skipped:unsupported_extension", None),
    ".hidden.png": Case(save(Image.fromarray(_rgb()), format="PNG"), "skipped:hidden", "200"),
    "sub/up": Case(symlink("..", is_dir=True), "skipped:already_searched", None),
}


def test_the_corpus_is_large_enough() -> None:
    files = [n for n, c in CASES.items() if c.outcome != "folder"]
    assert len(files) >= 40
    reasons = {c.outcome for c in CASES.values()}
    assert {"failed:symlink_loop", "failed:special_file", "failed:implausible_size"} <= reasons


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus") / "in"
    root.mkdir()
    for name, case in CASES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        case.make(path)
    return root


# ----------------------------------------------------------------------------------------------
# Each file alone, under its own timeout


@pytest.mark.parametrize(
    "name", [n for n, c in CASES.items() if c.outcome.split(":")[0] != "skipped"]
)
def test_each_case_decodes_as_the_table_says(corpus: Path, name: str) -> None:
    case = CASES[name]
    with deadline(CASE_TIMEOUT):
        try:
            rgb = load_image(corpus / name)
            got = "ok"
        except ImageReadError as exc:
            got = "folder" if exc.reason == "directory" else f"failed:{exc.reason}"
    assert got == case.outcome
    if got == "ok":
        assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3


# ----------------------------------------------------------------------------------------------
# cops predict: PyTorch weights and the ONNX Runtime bundle


def fake_ghostscript(folder: Path) -> tuple[Path, Path]:
    """A ``gs`` that records being run: (the folder to put first on PATH, the marker file)."""
    folder.mkdir(exist_ok=True)
    marker = folder / "ghostscript-ran"
    gs = folder / "gs"
    gs.write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
    gs.chmod(0o755)
    return folder, marker


def run_cops(args: list[str], tmp: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """``cops predict CORPUS --out OUT ARGS`` in a subprocess under RUN_TIMEOUT."""
    bin_dir, marker = fake_ghostscript(tmp / "bin")
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [sys.executable, "-m", "cops_deploy.cli.main", "predict", *args]
    try:
        proc = subprocess.run(command, env=env, capture_output=True, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"cops predict hung (> {RUN_TIMEOUT} s): {exc.stderr!r}")
    assert not marker.exists(), "Ghostscript ran"
    return proc, marker


def strict_load(path: Path) -> dict:
    def refuse(name: str) -> None:
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(path.read_text(), parse_constant=refuse)


def check_run(proc: subprocess.CompletedProcess, corpus: Path, out: Path) -> dict[str, float]:
    """Every table entry in scores.json as the table says; returns name -> score."""
    stderr = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1, stderr  # failures exist: 1, never a crash (2) or a signal
    assert "Traceback" not in stderr, stderr
    saved = strict_load(out / "scores.json")

    def name(source: str) -> str:
        return Path(source).relative_to(corpus).as_posix()

    got: dict[str, list[str]] = {}
    for r in saved["results"]:
        got.setdefault(name(r["source"]), []).append("ok")
        assert math.isfinite(r["score"])
        with Image.open(out / r["visual"]) as picture:
            width, height = picture.size
        assert width <= 3 * MAX_PANEL_ASPECT * TILE + 8 and height == TILE + 22
    for f in saved["failures"]:
        assert f["error"] and f["reason"], f
        got.setdefault(name(f["source"]), []).append(f"failed:{f['reason']}")
    for s in saved["skipped"]:
        got.setdefault(name(s["source"]), []).append(f"skipped:{s['reason']}")
    want = {n: [c.outcome] for n, c in CASES.items() if c.outcome != "folder"}
    assert got == want  # every entry exactly once, with the table's outcome: nothing lost
    visuals = [r["visual"] for r in saved["results"]]
    assert len(set(visuals)) == len(visuals)
    assert {"a.jpg.png", "a.png.png", "a_00002.png.png", "sub/a.png.png"} <= set(visuals)
    exif6 = next(r for r in saved["results"] if r["source"].endswith("exif6.jpg"))
    assert (exif6["height"], exif6["width"]) == (30, 40)  # rotated on reading
    return {name(r["source"]): r["score"] for r in saved["results"]}


@pytest.fixture(scope="module")
def torch_scores(
    corpus: Path, tiny_graphs: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, float]:
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("torch_run")
    out = tmp / "out"
    weights = ["--model", "cops-tiny", "--weights", str(tiny_graphs / "torch")]
    proc, _ = run_cops([str(corpus), "--out", str(out), *weights, "--batch-size", "4"], tmp)
    return check_run(proc, corpus, out)


def test_corpus_through_cops_predict_with_pytorch_weights(torch_scores: dict[str, float]) -> None:
    assert torch_scores


def test_corpus_through_cops_predict_with_the_bundle(
    corpus: Path, tiny_bundle: Path, tmp_path: Path, torch_scores: dict[str, float]
) -> None:
    out = tmp_path / "out"
    bundle = ["--bundle", str(tiny_bundle), "--backend", "onnxruntime"]
    proc, _ = run_cops([str(corpus), "--out", str(out), *bundle], tmp_path)
    scores = check_run(proc, corpus, out)
    assert scores.keys() == torch_scores.keys()
    for name, score in scores.items():
        assert score == pytest.approx(torch_scores[name], abs=1e-4), name


# ----------------------------------------------------------------------------------------------
# The HTTP service


def test_corpus_through_the_service(corpus: Path, tiny_bundle: Path) -> None:
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    testclient = pytest.importorskip("fastapi.testclient")
    service = str(ROOT / "export" / "python")
    if service not in sys.path:
        sys.path.insert(0, service)
    from cops_service.app import create_app
    from cops_service.settings import ServiceCfg

    app = create_app(ServiceCfg(bundle=tiny_bundle, backend="onnxruntime", threads=1))
    answers: dict[str, str] = {}
    with deadline(RUN_TIMEOUT), testclient.TestClient(app) as client:
        for _ in range(600):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the service did not get ready in 60 s")
        for name, case in CASES.items():
            if case.upload is None:
                continue
            body = (corpus / name).read_bytes()
            response = client.post(
                "/predict", content=body, headers={"content-type": "application/octet-stream"}
            )
            if response.status_code == 200:
                assert math.isfinite(response.json()["score"]), name
                answers[name] = "200"
            else:
                answers[name] = f"{response.status_code} {response.json()['error']}"
            assert client.get("/ready").status_code == 200  # unharmed
    assert answers == {n: c.upload for n, c in CASES.items() if c.upload is not None}
