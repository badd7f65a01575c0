"""export/triton/client.py: requests, answers and the command line, without a Triton server.

No Triton server can run here. What can be tested is: the request the client builds from a real
image (names, shapes, dtypes equal the ensemble's config.pbtxt parsed into Triton's ModelConfig),
and the round trip over real gRPC against a stand-in on 127.0.0.1 that speaks Triton's
GRPCInferenceService (tritonclient's own generated service), checks each request against the
ensemble's config as Triton would, and computes the ensemble (vision then head) with ONNX
Runtime on the repository's own model.onnx files. The answers must equal Detector.predict.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

grpc = pytest.importorskip("grpc", reason="needs grpcio (pip install 'cops-deploy[triton]')")
grpcclient = pytest.importorskip(
    "tritonclient.grpc", reason="needs tritonclient (pip install 'cops-deploy[triton]')"
)
ort = pytest.importorskip("onnxruntime")
from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc  # noqa: E402

from cops_deploy.errors import BundleError, ImageReadError, MissingDependencyError  # noqa: E402
from cops_deploy.export.triton import (  # noqa: E402
    ENSEMBLE_MODEL,
    HEAD_MODEL,
    VISION_MODEL,
    write_triton_repository,
)
from cops_deploy.runtime import Detector  # noqa: E402

CLIENT_PATH = Path(__file__).resolve().parents[2] / "export" / "triton" / "client.py"
TIMEOUT = 30.0
IMAGES = ["rgb.png", "photo.jpg", "grey.png", "rgba.png", "grey16.png", "rotated.jpg"]


def load_client() -> ModuleType:
    """export/triton/client.py as a module (it is a script, not part of a package)."""
    spec = importlib.util.spec_from_file_location("cops_triton_client", CLIENT_PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


client = load_client()


@pytest.fixture(scope="module")
def repo(service_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Triton repository written from the service bundle (what cops-export --triton does)."""
    out = tmp_path_factory.mktemp("triton") / "models"
    return write_triton_repository(service_bundle, out, max_batch=4, kind="KIND_CPU")


@pytest.fixture(scope="module")
def ensemble(repo: Path) -> Any:
    text = (repo / ENSEMBLE_MODEL / "config.pbtxt").read_text()
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def manifest(service_bundle: Path) -> Any:
    return client.load_manifest(service_bundle)


@pytest.fixture(scope="module")
def detector(service_bundle: Path) -> Iterator[Detector]:
    with Detector.open(service_bundle, backend="onnxruntime") as d:
        yield d


# ----------------------------------------------------------------------------------------------
# A stand-in for Triton: its gRPC service, the ensemble computed with ONNX Runtime


def triton_type(data_type: int) -> str:
    """TYPE_FP32 -> FP32, as Triton names tensor types on the wire."""
    return model_config_pb2.DataType.Name(data_type).removeprefix("TYPE_")


def run(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every output of an ONNX Runtime session, by name."""
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds), strict=True))


class EnsembleStandIn(service_pb2_grpc.GRPCInferenceServiceServicer):
    """ModelInfer for the ensemble only; refuses what Triton refuses (unknown model, wrong
    input name, shape, dtype or batch size) with Triton's status codes."""

    def __init__(self, repo: Path, config: Any) -> None:
        self.config = config
        self.vision = ort.InferenceSession(str(repo / VISION_MODEL / "1" / "model.onnx"))
        self.head = ort.InferenceSession(str(repo / HEAD_MODEL / "1" / "model.onnx"))
        self.requests: list[Any] = []

    def ModelInfer(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC's name)
        self.requests.append(request)
        cfg = self.config
        if request.model_name != cfg.name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model: '{request.model_name}'")
        declared = {t.name: t for t in cfg.input}
        feeds = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            want = declared.get(tensor.name)
            shape = list(tensor.shape)
            ok = (
                want is not None
                and tensor.datatype == triton_type(want.data_type)
                and shape[1:] == list(want.dims)
                and 1 <= shape[0] <= cfg.max_batch_size
            )
            if not ok:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"bad input {tensor.name}")
            feeds[tensor.name] = np.frombuffer(raw, dtype=np.float32).reshape(shape)
        if set(feeds) != set(declared):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "missing inputs")
        embeddings = run(self.vision, feeds)
        results = run(self.head, {i.name: embeddings[i.name] for i in self.head.get_inputs()})
        response = service_pb2.ModelInferResponse(model_name=cfg.name, model_version="1")
        batch = next(iter(feeds.values())).shape[0]
        for out in cfg.output:
            if request.outputs and out.name not in {o.name for o in request.outputs}:
                continue
            value = results[out.name].reshape(batch, *out.dims)  # the client sees the dims
            tensor = response.outputs.add()
            tensor.name, tensor.datatype = out.name, triton_type(out.data_type)
            tensor.shape.extend(value.shape)
            response.raw_output_contents.append(np.ascontiguousarray(value).tobytes())
        return response


@pytest.fixture(scope="module")
def triton(repo: Path, ensemble: Any) -> Iterator[tuple[str, EnsembleStandIn]]:
    """(url, stand-in) of the gRPC stand-in, served on 127.0.0.1."""
    stand_in = EnsembleStandIn(repo, ensemble)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(stand_in, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", stand_in
    finally:
        server.stop(grace=None).wait(timeout=TIMEOUT)


# ----------------------------------------------------------------------------------------------
# The request


def test_request_matches_the_ensemble_config(
    ensemble: Any, manifest: Any, image_files: dict[str, Path]
) -> None:
    io = client.ensemble_io(manifest)
    batch = client.preprocess_images([image_files["rgb.png"], image_files["grey16.png"]], io)
    inputs, outputs = client.build_request(batch, io)
    assert len(inputs) == len(ensemble.input) == 1
    declared = ensemble.input[0]
    assert inputs[0].name() == declared.name
    assert inputs[0].shape() == [2, *declared.dims]
    assert inputs[0].datatype() == triton_type(declared.data_type) == "FP32"
    assert [o.name() for o in outputs] == [o.name for o in ensemble.output]
    assert ensemble.name == client.DEFAULT_MODEL == ENSEMBLE_MODEL


def test_preprocessing_uses_the_manifest(manifest: Any, image_files: dict[str, Path]) -> None:
    from cops_deploy.imaging.decode import load_image
    from cops_deploy.imaging.preprocess import preprocess

    pre = manifest.preprocess
    io = client.ensemble_io(manifest)
    assert (io.size, io.mean, io.std) == (pre.size, tuple(pre.mean), tuple(pre.std))
    path = image_files["rotated.jpg"]
    batch = client.preprocess_images([path], io)
    expected = preprocess(load_image(path), pre.size, pre.mean, pre.std)
    np.testing.assert_array_equal(batch[0], expected)


@pytest.mark.parametrize("protocol", ["http"])
def test_http_client_or_its_install_hint(protocol: str, manifest: Any) -> None:
    io = client.ensemble_io(manifest)
    batch = np.zeros((1, 3, io.size, io.size), dtype=np.float32)
    try:
        import tritonclient.http  # noqa: F401
    except (ImportError, RuntimeError):  # RuntimeError: tritonclient without its http extra
        with pytest.raises(MissingDependencyError, match=r"pip install 'tritonclient\[http\]'"):
            client.build_request(batch, io, protocol)
        return
    inputs, _ = client.build_request(batch, io, protocol)
    assert inputs[0].name() == io.image and inputs[0].shape() == list(batch.shape)


# ----------------------------------------------------------------------------------------------
# Round trip over gRPC


@pytest.mark.parametrize("batch_size", [1, 3])
def test_answers_equal_the_detector(
    triton: tuple[str, EnsembleStandIn],
    manifest: Any,
    detector: Detector,
    image_files: dict[str, Path],
    batch_size: int,
) -> None:
    url, stand_in = triton
    paths = [image_files[n] for n in IMAGES]
    before = len(stand_in.requests)
    triton_client = grpcclient.InferenceServerClient(url)
    try:
        got = client.infer(triton_client, paths, manifest, batch_size=batch_size)
    finally:
        triton_client.close()
    assert len(stand_in.requests) - before == -(-len(paths) // batch_size)
    refs = detector.predict(paths, batch_size=batch_size)
    for name, pred, ref in zip(IMAGES, got, refs, strict=True):
        assert pred.score == ref.score, name
        np.testing.assert_array_equal(pred.anomaly_map, ref.anomaly_map, err_msg=name)
        assert pred.threshold == ref.threshold and pred.is_anomalous is ref.is_anomalous


def test_command_line(
    triton: tuple[str, EnsembleStandIn],
    service_bundle: Path,
    detector: Detector,
    image_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = triton
    paths = [image_files["rgb.png"], image_files["photo.jpg"]]
    argv = [*map(str, paths), "--manifest", str(service_bundle / "manifest.json")]
    assert client.main([*argv, "--url", url, "--maps", str(tmp_path / "maps"), "--batch", "2"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for path, line, ref in zip(paths, lines, detector.predict(paths), strict=True):
        assert line["image"] == str(path) and line["score"] == ref.score
        assert line["decision"] is ref.is_anomalous and line["threshold"] == ref.threshold
        np.testing.assert_array_equal(np.load(line["map"]), ref.anomaly_map)


def test_unknown_model_exits_1(
    triton: tuple[str, EnsembleStandIn],
    service_bundle: Path,
    image_files: dict[str, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = triton
    argv = [str(image_files["rgb.png"]), "--manifest", str(service_bundle), "--url", url]
    assert client.main([*argv, "--model", "nope"]) == 1
    err = capsys.readouterr().err
    assert f"Triton at {url} failed the request for model 'nope'" in err and "Fix" in err


def test_unreachable_server_exits_1(
    service_bundle: Path, image_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{sock.getsockname()[1]}"
    argv = [str(image_files["rgb.png"]), "--manifest", str(service_bundle), "--url", url]
    assert client.main([*argv, "--timeout", "5"]) == 1
    assert f"Triton at {url} failed" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Parsing answers, and refusals


class FakeResult:
    """An InferResult stand-in: name -> array."""

    def __init__(self, outputs: dict[str, np.ndarray]) -> None:
        self.outputs = outputs

    def as_numpy(self, name: str) -> np.ndarray | None:
        return self.outputs.get(name)


@pytest.mark.parametrize("score_shape", [(2, 1), (2,)])
def test_parse_response(manifest: Any, score_shape: tuple[int, ...]) -> None:
    io = client.ensemble_io(manifest)
    maps = np.random.default_rng(0).random((2, io.size, io.size), dtype=np.float32)
    scores = np.array([0.25, 0.75], dtype=np.float32).reshape(score_shape)
    got = client.parse_response(FakeResult({io.score: scores, io.anomaly_map: maps}), io, 2)
    assert [p.score for p in got] == [0.25, 0.75]
    np.testing.assert_array_equal(np.stack([p.anomaly_map for p in got]), maps)
    assert [p.is_anomalous for p in got] == [0.25 >= io.threshold, 0.75 >= io.threshold]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pred_score": None}, "has no output 'pred_score'"),
        ({"anomaly_map": None}, "has no output 'anomaly_map'"),
        ({"pred_score": np.zeros(3, np.float32)}, r"'pred_score' has shape \(3,\)"),
        ({"anomaly_map": np.zeros((2, 7, 7), np.float32)}, r"'anomaly_map' has shape \(2, 7, 7\)"),
    ],
)
def test_parse_response_refuses_a_mismatch(manifest: Any, change: dict, message: str) -> None:
    io = client.ensemble_io(manifest)
    outputs = {
        io.score: np.zeros(2, np.float32),
        io.anomaly_map: np.zeros((2, io.size, io.size), np.float32),
    }
    outputs.update(change)
    outputs = {k: v for k, v in outputs.items() if v is not None}
    with pytest.raises(BundleError, match=message):
        client.parse_response(FakeResult(outputs), io, 2)


def test_ensemble_io_refuses_foreign_graphs(manifest: Any) -> None:
    no_head = dataclasses.replace(manifest, graphs={"vision": manifest.graphs["vision"]})
    with pytest.raises(BundleError, match="no 'head' graph"):
        client.ensemble_io(no_head)
    vision = manifest.graphs["vision"]
    renamed = dataclasses.replace(
        vision, inputs=(dataclasses.replace(vision.inputs[0], name="pixels"),)
    )
    other = dataclasses.replace(manifest, graphs={**manifest.graphs, "vision": renamed})
    with pytest.raises(BundleError, match=r"take \['pixels'\].*this client knows"):
        client.ensemble_io(other)


def test_missing_manifest_exits_2(
    tmp_path: Path, image_files: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [str(image_files["rgb.png"]), "--manifest", str(tmp_path)]
    assert client.main(argv) == 2
    err = capsys.readouterr().err
    assert "cannot read the bundle manifest" in err and "manifest.json" in err and "Fix" in err


def test_unreadable_image_exits_2(
    triton: tuple[str, EnsembleStandIn],
    service_bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, _ = triton
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert client.main([str(text), "--manifest", str(service_bundle), "--url", url]) == 2
    assert "notes.png" in capsys.readouterr().err
    with pytest.raises(ImageReadError):
        client.preprocess_images([text], client.ensemble_io(client.load_manifest(service_bundle)))


def test_invalid_batch_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        client.build_parser().parse_args(["x.png", "--manifest", "m", "--batch", "0"])
    assert exc.value.code == 2 and "'0' is not an integer >= 1" in capsys.readouterr().err
