"""Score images on a Triton Inference Server serving the repository ``cops-export --triton`` wrote.

    python client.py --manifest bundle/manifest.json part.png other.jpg           # gRPC, :8001
    python client.py --manifest bundle/ --protocol http --url host:8000 part.png  # HTTP

Each image is decoded and preprocessed exactly as ``cops_deploy.runtime.Detector`` does
(``cops_deploy.imaging.decode.load_image``, then ``cops_deploy.imaging.preprocess.preprocess``
with the size, mean and std of the bundle's manifest), sent to the ensemble model ``cops``
(vision -> head), and the score and the anomaly map (S x S, the model's input size) are read
back. Tensor names come from the manifest as well; nothing about the model is hard-coded. One
JSON line per image is printed (score, decision with the manifest's threshold, map statistics);
``--maps DIR`` also writes each map as a float32 ``.npy`` (``NNNN-<image stem>.npy``).

Needs ``cops-deploy`` (its torch-free run side: numpy, Pillow) and ``tritonclient[grpc]`` (or
``tritonclient[http]`` for ``--protocol http``). Exit status: 0, 1 when the server fails the
request (the message says what Triton answered), 2 for a bad argument, manifest or image.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from cops_deploy.errors import BundleError, CopsError, MissingDependencyError
from cops_deploy.imaging.decode import ImageSource, load_image
from cops_deploy.imaging.preprocess import preprocess
from cops_deploy.runtime.contract import ANOMALY_MAP, IMAGE, PRED_SCORE
from cops_deploy.runtime.manifest import MANIFEST_NAME, Manifest

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_URLS",
    "PROTOCOLS",
    "EnsembleIO",
    "TritonPrediction",
    "build_request",
    "ensemble_io",
    "import_client",
    "infer",
    "load_manifest",
    "main",
    "parse_response",
    "preprocess_images",
]

# The ensemble's name in the repository (cops_deploy.export.triton.ENSEMBLE_MODEL; not imported:
# that module is on the build side, and this client must run without it).
DEFAULT_MODEL = "cops"
PROTOCOLS: tuple[str, ...] = ("grpc", "http")
DEFAULT_URLS: dict[str, str] = {"grpc": "localhost:8001", "http": "localhost:8000"}
TRITON_FP32 = "FP32"  # Triton's name of float32, the dtype of every graph input and output


class InferResultLike(Protocol):
    """What this client reads of a Triton answer (tritonclient's grpc and http InferResult)."""

    def as_numpy(self, name: str) -> np.ndarray | None: ...


@dataclass(frozen=True)
class EnsembleIO:
    """The ensemble's tensors and the preprocessing, all read from the bundle manifest."""

    image: str
    score: str
    anomaly_map: str
    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threshold: float | None


@dataclass(frozen=True, eq=False)  # an array inside
class TritonPrediction:
    """Score and (S, S) float32 anomaly map of one image, as Triton computed them."""

    score: float
    anomaly_map: np.ndarray
    threshold: float | None

    @property
    def is_anomalous(self) -> bool | None:
        """``score >= threshold``; None when the bundle sets no threshold."""
        return None if self.threshold is None else self.score >= self.threshold


def load_manifest(path: str | Path) -> Manifest:
    """The manifest of a bundle: ``path`` is its ``manifest.json`` or the bundle folder.

    Only the manifest is read (the client needs no graph file).

    Raises:
        BundleError: the file is missing or not a valid manifest.
    """
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise BundleError(
            f"cannot read the bundle manifest {str(path)!r}: {exc.strerror or exc}. Fix: pass "
            f"--manifest with the {MANIFEST_NAME} (or the folder) of the bundle the Triton "
            f"repository was written from."
        ) from exc
    return Manifest.from_json(text)


def ensemble_io(manifest: Manifest) -> EnsembleIO:
    """Input and output names of the ensemble, and the preprocessing, from ``manifest``.

    Raises:
        BundleError: the manifest lacks the vision or head graph or their contract tensors.
    """
    try:
        vision_in = [t.name for t in manifest.graphs["vision"].inputs]
        head_out = [t.name for t in manifest.graphs["head"].outputs]
    except KeyError as exc:
        raise BundleError(
            f"the manifest has no {exc.args[0]!r} graph (graphs: {sorted(manifest.graphs)}). "
            f"Fix: pass the manifest of a bundle written by cops-export."
        ) from exc
    if vision_in != [IMAGE] or sorted(head_out) != sorted([PRED_SCORE, ANOMALY_MAP]):
        raise BundleError(
            f"the manifest's graphs take {vision_in} and give {head_out}; this client knows "
            f"[{IMAGE!r}] -> [{PRED_SCORE!r}, {ANOMALY_MAP!r}]. Fix: use the client shipped "
            f"with the cops-deploy version that wrote the bundle."
        )
    pre = manifest.preprocess
    return EnsembleIO(
        image=IMAGE,
        score=PRED_SCORE,
        anomaly_map=ANOMALY_MAP,
        size=pre.size,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        threshold=manifest.threshold,
    )


def preprocess_images(images: Sequence[ImageSource], io: EnsembleIO) -> np.ndarray:
    """(B, 3, S, S) float32: each image decoded and preprocessed exactly as the Detector does.

    Raises:
        ImageReadError: an image cannot be read (the message names it).
    """
    batch = np.empty((len(images), 3, io.size, io.size), dtype=np.float32)
    for i, image in enumerate(images):
        batch[i] = preprocess(load_image(image), io.size, io.mean, io.std)
    return batch


def import_client(protocol: str) -> ModuleType:
    """The ``tritonclient.grpc`` or ``tritonclient.http`` module.

    Raises:
        MissingDependencyError: that client is not installed (the message gives the pip
            command).
    """
    try:
        return importlib.import_module(f"tritonclient.{protocol}")
    except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError for an extra
        # that was not installed ("The installation does not include http support")
        raise MissingDependencyError(
            f"the Triton {protocol} client is not installed ({exc}). Fix: pip install "
            f"'tritonclient[{protocol}]'."
        ) from exc


def build_request(batch: np.ndarray, io: EnsembleIO, protocol: str = "grpc") -> tuple[list, list]:
    """The tritonclient inputs (the image batch) and requested outputs (score, map)."""
    client = import_client(protocol)
    image = client.InferInput(io.image, list(batch.shape), TRITON_FP32)
    image.set_data_from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
    outputs = [client.InferRequestedOutput(name) for name in (io.score, io.anomaly_map)]
    return [image], outputs


def parse_response(
    result: InferResultLike, io: EnsembleIO, batch_size: int
) -> list[TritonPrediction]:
    """One TritonPrediction per image of the request.

    The score arrives as (B, 1) (the repository declares it ``dims: [1]``) or (B,).

    Raises:
        BundleError: an output is missing or has the wrong shape (the repository does not
            match the manifest).
    """
    s = io.size
    scores = _output(result, io.score)
    maps = _output(result, io.anomaly_map)
    if scores.size != batch_size or scores.shape[0] != batch_size:
        raise _mismatch(io.score, scores.shape, f"({batch_size},) or ({batch_size}, 1)")
    if maps.shape != (batch_size, s, s):
        raise _mismatch(io.anomaly_map, maps.shape, f"({batch_size}, {s}, {s})")
    scores = scores.reshape(batch_size).astype(np.float32)
    maps = maps.astype(np.float32)
    return [
        TritonPrediction(float(score), amap.copy(), io.threshold)
        for score, amap in zip(scores, maps, strict=True)
    ]


def _output(result: InferResultLike, name: str) -> np.ndarray:
    value = result.as_numpy(name)
    if value is None:
        raise BundleError(
            f"Triton's answer has no output {name!r}. Fix: serve the repository that "
            f"`cops-export --triton` wrote from this bundle, and pass its manifest."
        )
    return np.asarray(value)


def _mismatch(name: str, shape: tuple[int, ...], valid: str) -> BundleError:
    return BundleError(
        f"Triton's output {name!r} has shape {shape}; valid: {valid}. Fix: serve the repository "
        f"written from the bundle whose manifest you pass (its input size may differ)."
    )


def infer(
    client: Any,
    images: Sequence[ImageSource],
    manifest: Manifest,
    model: str = DEFAULT_MODEL,
    protocol: str = "grpc",
    batch_size: int = 1,
    timeout_s: float | None = 60.0,
) -> list[TritonPrediction]:
    """Score ``images`` on ``client`` (a tritonclient InferenceServerClient), in batches."""
    io = ensemble_io(manifest)
    out: list[TritonPrediction] = []
    for start in range(0, len(images), batch_size):
        batch = preprocess_images(images[start : start + batch_size], io)
        inputs, outputs = build_request(batch, io, protocol)
        kwargs = {"client_timeout": timeout_s} if protocol == "grpc" else {}
        result = client.infer(model, inputs, outputs=outputs, **kwargs)
        out.extend(parse_response(result, io, len(batch)))
    return out


# ----------------------------------------------------------------------------------------------
# Command line


def _batch(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an integer >= 1; at most the repository's max_batch_size (8 by "
            f"default)"
        )
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The client's argument parser."""
    p = argparse.ArgumentParser(
        prog="client.py",
        description="Score images on a Triton server serving a cops-export --triton repository.",
    )
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument(
        "--manifest",
        required=True,
        type=Path,
        help="the bundle's manifest.json (or the bundle folder) the repository was written from",
    )
    p.add_argument("--protocol", choices=PROTOCOLS, default="grpc", help="default grpc")
    p.add_argument("--url", help="server address (default localhost:8001 grpc, :8000 http)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default {DEFAULT_MODEL})")
    p.add_argument("--batch", type=_batch, default=1, help="images per request (default 1)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    p.add_argument("--maps", type=Path, help="write each anomaly map to DIR/NNNN-<stem>.npy")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client; prints one JSON line per image."""
    args = build_parser().parse_args(argv)
    url = args.url or DEFAULT_URLS[args.protocol]
    try:
        manifest = load_manifest(args.manifest)
        module = import_client(args.protocol)
        client = module.InferenceServerClient(url=url)
        images = [str(p) for p in args.images]
        try:
            predictions = infer(
                client, images, manifest, args.model, args.protocol, args.batch, args.timeout
            )
        finally:
            client.close()
    except CopsError as exc:
        print(f"client.py: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # tritonclient.utils.InferenceServerException and transport errors
        print(
            f"client.py: Triton at {url} failed the request for model {args.model!r}: "
            f"{type(exc).__name__}: {exc}. Fix: check that tritonserver runs there with the "
            f"repository loaded (curl http://HOST:8000/v2/models/{args.model}/ready).",
            file=sys.stderr,
        )
        return 1
    if args.maps is not None:
        args.maps.mkdir(parents=True, exist_ok=True)
    for index, (path, pred) in enumerate(zip(args.images, predictions, strict=True)):
        line: dict[str, Any] = {
            "image": str(path),
            "score": pred.score,
            "decision": pred.is_anomalous,
            "threshold": pred.threshold,
            "map_max": float(pred.anomaly_map.max()),
        }
        if args.maps is not None:
            target = args.maps / f"{index:04d}-{path.stem}.npy"  # unique for equal stems
            np.save(target, pred.anomaly_map)
            line["map"] = str(target)
        print(json.dumps(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
