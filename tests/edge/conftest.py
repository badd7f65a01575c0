"""Fixtures of the edge tests (export/): cops-tiny bundles and real image files.

Puts ``tests/runtime`` (for the ``cops_tiny_bundle`` helper) and ``export/python`` (for the
``cops_service`` package) on sys.path. The ONNX export of cops-tiny is shared with the runtime
tests: it is cached under the session's base temp directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SERVICE_DIR = ROOT / "export" / "python"
for _path in (ROOT / "tests" / "runtime", SERVICE_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import cops_tiny_bundle  # noqa: E402

# Parity figures written into service_bundle's manifest (the service must report them as is).
SERVICE_PARITY = {"anomaly_map_max_abs": 5.1e-07, "pred_score_max_abs": 2.7e-07, "images": 2}
_EXIF_ORIENTATION = 0x0112


@pytest.fixture(scope="session")
def edge_graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """vision.onnx and head.onnx of cops-tiny (the runtime tests' cached export)."""
    return cops_tiny_bundle.export_tiny_graphs(tmp_path_factory.getbasetemp() / "cops_tiny_graphs")


@pytest.fixture(scope="session")
def image_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real image files: name -> path (PNG RGB, JPEG, grey, RGBA, 16-bit, palette, BMP, TIFF,
    WebP, and a JPEG with EXIF orientation 6, i.e. rotated on reading)."""
    out = tmp_path_factory.mktemp("edge_images")
    rgbs = cops_tiny_bundle.rng_images(8, seed=3)
    rng = np.random.default_rng(4)
    images = {
        "rgb.png": Image.fromarray(rgbs[0]),
        "photo.jpg": Image.fromarray(rgbs[1]),
        "grey.png": Image.fromarray(rgbs[2][:, :, 0]),
        "rgba.png": Image.fromarray(
            np.dstack([rgbs[3], rng.integers(0, 256, rgbs[3].shape[:2])]).astype(np.uint8)
        ),
        "grey16.png": Image.fromarray(rng.integers(0, 65536, (50, 140), dtype=np.uint16)),
        "palette.png": Image.fromarray(rgbs[5]).convert("P"),
        "rgb.bmp": Image.fromarray(rgbs[6]),
        "rgb.tif": Image.fromarray(rgbs[7]),
        "rgb.webp": Image.fromarray(rgbs[4]),
    }
    files = {}
    for name, image in images.items():
        image.save(out / name)
        files[name] = out / name
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6
    Image.fromarray(rgbs[0][:60]).save(out / "rotated.jpg", exif=exif)
    files["rotated.jpg"] = out / "rotated.jpg"
    return files


@pytest.fixture(scope="session")
def plain_bundle(tmp_path_factory: pytest.TempPathFactory, edge_graphs: Path) -> Path:
    """A cops-tiny bundle without threshold (no decision) and without parity figures."""
    out = tmp_path_factory.mktemp("edge_plain") / "bundle"
    return cops_tiny_bundle.write_tiny_bundle(out, edge_graphs, torch_weights=False)


@pytest.fixture(scope="session")
def service_bundle(
    tmp_path_factory: pytest.TempPathFactory,
    edge_graphs: Path,
    plain_bundle: Path,
    image_files: dict[str, Path],
) -> Path:
    """A cops-tiny bundle with parity figures and a threshold at the median score of
    ``image_files``, so that some images are anomalous and some are not."""
    from cops_deploy.configs import get_config
    from cops_deploy.export.bundle_writer import BundleWriter
    from cops_deploy.runtime import Detector
    from cops_deploy.runtime.manifest import Provenance

    with Detector.open(plain_bundle, backend="onnxruntime") as detector:
        scores = [p.score for p in detector.predict(list(image_files.values()))]
    threshold = float(np.median(scores))
    cfg = get_config(cops_tiny_bundle.MODEL)
    out = tmp_path_factory.mktemp("edge_service") / "bundle"
    with BundleWriter(out) as writer:
        writer.add_onnx(edge_graphs / "vision.onnx", role="vision_onnx")
        writer.add_onnx(edge_graphs / "head.onnx", role="head_onnx")
        writer.set_metadata(
            model_config=cfg.to_dict(),
            graphs={
                g: cops_tiny_bundle.graph_io(edge_graphs / f"{g}.onnx", f"{g}.onnx")
                for g in ("vision", "head")
            },
            provenance=Provenance(random_weights=True),
            parity=SERVICE_PARITY,
            threshold=threshold,
        )
    return out
