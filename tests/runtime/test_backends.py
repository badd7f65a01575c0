"""Backends: the shared runner contract, ONNX Runtime and TensorRT (key checks; GPU tests marked
``trt``); one test per refusal. The PyTorch backend's tests are in tests/export (it lives on the
build side); the registry's in test_registry.py."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cops_deploy.errors import BundleError, ConfigError, CopsError, MissingDependencyError
from cops_deploy.runtime.backends import (
    Backend,
    OnnxRuntimeBackend,
    TensorRTBackend,
    activate_pair,
    check_engine_key,
    default_ort_providers,
    expected_engine_key,
    import_cudart,
    import_tensorrt,
    tensorrt_machine_fields,
)
from cops_deploy.runtime.backends import tensorrt as trt_runtime
from cops_deploy.runtime.bundle import Bundle, open_bundle
from cops_deploy.runtime.manifest import EngineKey, TensorSpec

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT = "TensorRT is not installed here (needs an NVIDIA GPU and pip install 'cops-deploy[trt]')"
MACHINE = {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}


# ----------------------------------------------------------------------------------------------
# ONNX Runtime and the contract


def test_onnxruntime_contract(bundle: Bundle, images: np.ndarray) -> None:
    backend = OnnxRuntimeBackend(bundle, "vision", threads=1)
    assert not backend.is_active and backend.last_inference_time is None
    with backend as active:
        assert active is backend and backend.is_active
        assert backend.provider == "CPUExecutionProvider"
        meta = backend.input_metadata
        assert list(meta) == ["image"] and meta["image"].dtype == "float32"
        assert meta["image"].shape == ("batch", 3, 98, 98)
        out = backend.infer({"image": images})
        assert list(out) == ["image_embedding", "patch_embedding"] == list(backend.output_names)
        assert out["image_embedding"].shape == (3, 96)
        assert out["patch_embedding"].shape == (3, 49, 96)
        assert backend.last_inference_time is not None and backend.last_inference_time > 0
    assert not backend.is_active
    backend.deactivate()  # idempotent


def test_infer_before_activate_is_refused(bundle: Bundle, images: np.ndarray) -> None:
    with pytest.raises(CopsError, match="not active"):
        OnnxRuntimeBackend(bundle, "vision").infer({"image": images})


def test_activate_twice_is_refused(bundle: Bundle) -> None:
    with OnnxRuntimeBackend(bundle, "head") as backend, pytest.raises(CopsError, match="already"):
        backend.activate()


def test_unknown_graph_is_refused(bundle: Bundle) -> None:
    with pytest.raises(BundleError, match="no graph 'text'.*'head', 'vision'"):
        OnnxRuntimeBackend(bundle, "text")


@pytest.mark.parametrize("threads", [0, -1, 1.5, True, "2"])
def test_invalid_threads_are_refused(bundle: Bundle, threads: object) -> None:
    with pytest.raises(ConfigError, match="threads"):
        OnnxRuntimeBackend(bundle, "vision", threads=threads)  # type: ignore[arg-type]


def test_unavailable_provider_is_refused(bundle: Bundle) -> None:
    backend = OnnxRuntimeBackend(bundle, "vision", providers=["NoSuchExecutionProvider"])
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider.*available"):
        backend.activate()
    assert not backend.is_active


def test_onnxruntime_opens_the_pair(bundle: Bundle, images: np.ndarray) -> None:
    assert OnnxRuntimeBackend.unavailable_reason(bundle) is None
    vision, head = OnnxRuntimeBackend.open_pair(bundle, threads=1)
    try:
        assert (vision.name, head.name) == ("vision", "head")
        assert vision.is_active and head.is_active and vision.threads == 1  # type: ignore[attr-defined]
        assert list(head.infer(vision.infer({"image": images}))) == ["pred_score", "anomaly_map"]
    finally:
        head.deactivate()
        vision.deactivate()


def test_default_providers_prefer_cuda() -> None:
    assert default_ort_providers(["CUDAExecutionProvider", "CPUExecutionProvider"]) == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert default_ort_providers(["AzureExecutionProvider", "CPUExecutionProvider"]) == [
        "CPUExecutionProvider"
    ]


def _head_feed(batch: int = 2) -> dict[str, np.ndarray]:
    return {
        "image_embedding": np.zeros((batch, 96), np.float32),
        "patch_embedding": np.zeros((batch, 49, 96), np.float32),
    }


BAD_FEEDS = {
    "not a mapping": ([np.zeros((2, 96), np.float32)], "a dict of input name"),
    "missing input": ({"image_embedding": np.zeros((2, 96), np.float32)}, "missing input"),
    "unexpected input": ({**_head_feed(), "extra": np.zeros(1)}, "unexpected input.*'extra'"),
    "list, not array": (
        {**_head_feed(), "image_embedding": [[0.0] * 96] * 2},
        "is a list; valid: a numpy array",
    ),
    "float64": (
        {**_head_feed(), "image_embedding": np.zeros((2, 96))},
        "dtype float64; valid: image_embedding float32",
    ),
    "rank": (
        {**_head_feed(), "image_embedding": np.zeros(96, np.float32)},
        "rank 1.*valid: rank 2",
    ),
    "fixed dim": (
        {**_head_feed(), "patch_embedding": np.zeros((2, 50, 96), np.float32)},
        "axis 1 is 50, valid: 49",
    ),
    "batch mismatch": (
        {**_head_feed(2), "patch_embedding": np.zeros((3, 49, 96), np.float32)},
        "'batch' = 3.*'batch' = 2",
    ),
    "empty batch": (_head_feed(0), "axis 0 .* is 0; valid: >= 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_FEEDS))
def test_bad_feed_is_refused(bundle: Bundle, case: str) -> None:
    feed, message = BAD_FEEDS[case]
    with OnnxRuntimeBackend(bundle, "head") as backend, pytest.raises(ConfigError, match=message):
        backend.infer(feed)  # type: ignore[arg-type]


def test_unreadable_graph_is_refused(make_bundle, tmp_path: Path) -> None:
    root = make_bundle(torch_weights=False)
    opened = open_bundle(root, verify=False)  # garbled after opening: the backend still refuses
    (root / "vision.onnx").write_bytes(b"\0" * (root / "vision.onnx").stat().st_size)
    backend = OnnxRuntimeBackend(opened, "vision")
    with pytest.raises(BundleError, match="ONNX Runtime cannot load graph 'vision'"):
        backend.activate()
    with pytest.raises(BundleError, match="'vision.onnx' is not a valid ONNX model"):
        open_bundle(root, verify=False)  # and opening it now refuses it before any backend


def test_manifest_and_graph_names_must_agree(bundle: Bundle) -> None:
    vision = bundle.manifest.graphs["vision"]
    renamed = dataclasses.replace(
        vision, inputs=(TensorSpec("pixels", "float32", ("batch", 3, 98, 98)),)
    )
    manifest = dataclasses.replace(
        bundle.manifest, graphs={**bundle.manifest.graphs, "vision": renamed}
    )
    broken = dataclasses.replace(bundle, manifest=manifest)
    with pytest.raises(BundleError, match="file and manifest disagree"):
        OnnxRuntimeBackend(broken, "vision").activate()


# ----------------------------------------------------------------------------------------------
# The base class: locking, timing, outputs


class _SlowBackend(Backend):
    """Records whether two _infer calls ever overlapped."""

    kind = "slow"

    def __init__(self, thread_safe: bool, outputs: tuple[str, ...] = ("y",)) -> None:
        super().__init__(
            "slow",
            [TensorSpec("x", "float32", ("batch", 2))],
            [TensorSpec(n, "float32", ("batch",)) for n in outputs],
        )
        self.thread_safe = thread_safe  # type: ignore[misc]
        self.inside = 0
        self.overlapped = False

    @classmethod
    def open_pair(
        cls, bundle: Bundle, *, threads: int | None = None, precision: str = "fp32"
    ) -> tuple[Backend, Backend]:
        return activate_pair(cls(False), lambda _: cls(False))

    def _activate(self) -> None: ...

    def _deactivate(self) -> None: ...

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.inside += 1
        self.overlapped |= self.inside > 1
        time.sleep(0.02)
        self.inside -= 1
        return {"y": feed["x"].sum(axis=1)}


@pytest.mark.parametrize("thread_safe", [False, True])
def test_base_class_serialises_unsafe_backends(thread_safe: bool) -> None:
    backend = _SlowBackend(thread_safe)
    feed = {"x": np.ones((2, 2), np.float32)}
    with backend:
        threads = [threading.Thread(target=backend.infer, args=(feed,)) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert backend.overlapped is thread_safe
    assert backend.last_inference_time is not None and backend.last_inference_time >= 0.02


def test_activate_pair_leaves_neither_active_when_the_head_fails() -> None:
    vision = _SlowBackend(False)

    def broken_head(active: Backend) -> Backend:
        assert active.is_active  # the head is made from the active vision backend
        raise BundleError("head refused")

    with pytest.raises(BundleError, match="head refused"):
        activate_pair(vision, broken_head)
    assert not vision.is_active


def test_missing_output_is_reported() -> None:
    with _SlowBackend(False, outputs=("y", "z")) as backend:
        with pytest.raises(BundleError, match=r"did not return output\(s\) \['z'\]"):
            backend.infer({"x": np.ones((1, 2), np.float32)})


# ----------------------------------------------------------------------------------------------
# TensorRT: engine keys (CPU), and the real engine (trt marker)


@pytest.fixture(scope="module")
def engine_bundle(tmp_path_factory: pytest.TempPathFactory, tiny_graphs: Path) -> Bundle:
    from cops_tiny_bundle import write_tiny_bundle

    root = tmp_path_factory.mktemp("engines") / "bundle"
    return open_bundle(write_tiny_bundle(root, tiny_graphs, torch_weights=False, engines=True))


def test_engine_key_matching_machine_is_accepted(engine_bundle: Bundle) -> None:
    key = expected_engine_key(engine_bundle, "vision", MACHINE)
    assert (
        engine_bundle.check_engine_key(key, "vision.engine") == engine_bundle.root / "vision.engine"
    )


@pytest.mark.parametrize(
    "field, value",
    [
        ("gpu_name", "NVIDIA A100-SXM4-80GB"),
        ("tensorrt_version", "10.3.0"),
        ("compute_capability", "8.0"),
    ],
)
def test_engine_key_mismatch_names_the_field(engine_bundle: Bundle, field: str, value: str) -> None:
    key = expected_engine_key(engine_bundle, "head", {**MACHINE, field: value})
    with pytest.raises(BundleError, match=f"built for {field}=.*here {field}='{value}'"):
        engine_bundle.check_engine_key(key, "head.engine")


def test_one_engine_key_message_for_both_sides(tmp_path: Path) -> None:
    """check_engine_key (the build side's engine cache uses it too) names the field, both
    values and the rebuild command."""
    stored = EngineKey("0" * 64, precision="fp32", profile="b1-4-8", **MACHINE)
    check_engine_key(stored, stored, "v.engine")  # equal keys: accepted
    here = dataclasses.replace(stored, precision="fp16")
    with pytest.raises(
        BundleError,
        match=r"engine v\.engine does not fit.*built for precision='fp32', here precision='fp16'"
        r".*Fix: rebuild it on this machine with `make engines`.*backend='onnxruntime'",
    ):
        check_engine_key(stored, here, "v.engine", rebuild="make engines")


def test_engine_from_another_export_is_refused(make_bundle) -> None:
    root = make_bundle(torch_weights=False, engines=True, engine_changes={"onnx_sha256": "c" * 64})
    bundle = open_bundle(root)
    key = expected_engine_key(bundle, "vision", MACHINE)
    with pytest.raises(BundleError, match="onnx_sha256='c{64}'"):
        bundle.check_engine_key(key, "vision.engine")


def test_bundle_without_engines_is_refused(bundle: Bundle) -> None:
    with pytest.raises(BundleError, match="no TensorRT engine for graph 'vision'.*onnxruntime"):
        expected_engine_key(bundle, "vision", MACHINE)


def test_tensorrt_says_why_it_cannot_run(
    engine_bundle: Bundle, bundle: Bundle, monkeypatch
) -> None:
    """Found without importing tensorrt: the package first, then the bundle's engines."""
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())  # "installed"
    assert TensorRTBackend.unavailable_reason(engine_bundle) is None
    reason = TensorRTBackend.unavailable_reason(bundle)
    assert reason == "the bundle has no TensorRT engine(s) ['vision.engine', 'head.engine']"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    reason = TensorRTBackend.unavailable_reason(engine_bundle)
    assert reason == "tensorrt is not installed (pip install 'cops-deploy[trt]')"


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed: the missing-package path cannot run")
def test_missing_tensorrt_gives_install_command(engine_bundle: Bundle) -> None:
    backend = TensorRTBackend(engine_bundle, "vision")
    with pytest.raises(MissingDependencyError, match=r"pip install 'cops-deploy\[trt\]'"):
        backend.activate()
    assert not backend.is_active


@pytest.mark.trt
@pytest.mark.skipif(not HAS_TRT, reason=NO_TRT)
def test_tensorrt_matches_onnxruntime(
    tmp_path: Path, tiny_graphs: Path, images: np.ndarray, ort_outputs: dict[str, np.ndarray]
) -> None:
    from cops_tiny_bundle import write_tiny_bundle

    bundle = open_bundle(_bundle_with_real_engines(tmp_path, tiny_graphs, write_tiny_bundle))
    with TensorRTBackend(bundle, "vision") as vision, TensorRTBackend(bundle, "head") as head:
        assert vision.max_batch == 4
        emb = vision.infer({"image": images})
        out = {**emb, **head.infer(emb)}
        assert head.provider == tensorrt_machine_fields()["gpu_name"]
    for name, ref in ort_outputs.items():
        np.testing.assert_allclose(out[name], ref, atol=1e-3, err_msg=name)


def _bundle_with_real_engines(tmp_path: Path, graphs: Path, write) -> Path:
    """Build fp32 engines (batch 1..4) from the tiny graphs and write a bundle listing them."""
    import tensorrt as trt

    from cops_deploy.export.bundle_writer import BundleWriter
    from cops_deploy.runtime.bundle import sha256_file
    from cops_deploy.runtime.manifest import EngineKey

    machine = tensorrt_machine_fields()
    logger = trt.Logger(trt.Logger.WARNING)
    base = open_bundle(write(tmp_path / "base", graphs, torch_weights=False))
    with BundleWriter(tmp_path / "bundle") as writer:
        for graph in ("vision", "head"):
            onnx_path = graphs / f"{graph}.onnx"
            builder = trt.Builder(logger)
            flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
            network = builder.create_network(flags)
            parser = trt.OnnxParser(network, logger)
            assert parser.parse_from_file(str(onnx_path)), parser.get_error(0)
            config = builder.create_builder_config()
            profile = builder.create_optimization_profile()
            for spec in base.manifest.graphs[graph].inputs:
                rest = tuple(spec.shape[1:])
                profile.set_shape(spec.name, (1, *rest), (2, *rest), (4, *rest))
            config.add_optimization_profile(profile)
            engine = builder.build_serialized_network(network, config)
            path = tmp_path / f"{graph}.engine"
            path.write_bytes(bytes(engine))
            writer.add_onnx(onnx_path, role=f"{graph}_onnx")
            key = EngineKey(sha256_file(onnx_path), precision="fp32", profile="b1-2-4", **machine)
            writer.add_engine(path, key, f"{graph}.engine")
        m = base.manifest
        writer.set_metadata(
            model_config=m.model_config,
            graphs=m.graphs,
            provenance=m.provenance,
        )
    return tmp_path / "bundle"


# ----------------------------------------------------------------------------------------------
# TensorRTBackend's control flow on CPU: fake tensorrt and cuda-python modules whose "engine"
# runs the graph with ONNX Runtime and whose "device memory" is host memory.


class _FakeCudart:
    """The cuda-python runtime calls TensorRTBackend makes, on host memory."""

    class cudaError_t:  # cuda-python's names
        cudaSuccess = 0

    class cudaMemcpyKind:
        cudaMemcpyHostToDevice = 1
        cudaMemcpyDeviceToHost = 2

    def __init__(self) -> None:
        import threading

        self.memory: dict[int, np.ndarray] = {}
        self.copies: list[int] = []
        self.local = threading.local()  # CUDA's current device is per host thread
        self.malloc_devices: list[int] = []
        self.free_devices: list[int] = []

    def current(self) -> int:
        return getattr(self.local, "device", 0)

    def cudaGetDeviceProperties(self, device: int):
        props = type("Props", (), {"name": b"NVIDIA H200\x00\x00", "major": 9, "minor": 0})
        return 0, props

    def cudaGetErrorString(self, err: int):
        return 0, b"fake error"

    def cudaSetDevice(self, device: int):
        self.local.device = device
        return (0,)

    def cudaStreamCreate(self):
        return 0, _FakeStream(7)

    def cudaStreamDestroy(self, stream: int):
        return (0,)

    def cudaStreamSynchronize(self, stream: int):
        return (0,)

    def cudaMalloc(self, nbytes: int):
        self.malloc_devices.append(self.current())
        buf = np.zeros(nbytes, np.uint8)
        self.memory[buf.ctypes.data] = buf
        return 0, buf.ctypes.data

    def cudaFree(self, ptr: int):
        self.free_devices.append(self.current())
        del self.memory[ptr]
        return (0,)

    def cudaMemcpyAsync(self, dst: int, src: int, count: int, kind: int, stream: int):
        import ctypes

        ctypes.memmove(dst, src, count)
        self.copies.append(kind)
        return (0,)


class _FakeStream:
    """A cudaStream_t whose int() is refused (deprecated in cuda-bindings 13): TensorRT must get
    the native handle through cuda.bindings.utils.get_cuda_native_handle."""

    def __init__(self, handle: int) -> None:
        self.handle = handle

    def __int__(self) -> int:
        raise AssertionError("int(stream) is deprecated: use get_cuda_native_handle")


@pytest.fixture
def native_handles(monkeypatch) -> list[int]:
    """A fake cuda.bindings.utils whose get_cuda_native_handle records the handles it gives."""
    import types

    given: list[int] = []

    def get_cuda_native_handle(obj: _FakeStream) -> int:
        given.append(obj.handle)
        return obj.handle

    utils = types.ModuleType("cuda.bindings.utils")
    utils.get_cuda_native_handle = get_cuda_native_handle
    monkeypatch.setitem(sys.modules, "cuda.bindings.utils", utils)
    return given


def _fake_tensorrt(cudart: _FakeCudart, graphs: Path) -> Any:
    import ctypes
    import types

    import onnxruntime as ort

    class Engine:
        def __init__(self, graph: str) -> None:
            self.session = ort.InferenceSession(str(graphs / f"{graph}.onnx"))
            self.inputs = [i.name for i in self.session.get_inputs()]
            self.names = self.inputs + [o.name for o in self.session.get_outputs()]
            self.num_io_tensors = len(self.names)
            self.shapes = {i.name: i.shape for i in self.session.get_inputs()}

        def get_tensor_name(self, i: int) -> str:
            return self.names[i]

        def get_tensor_mode(self, name: str) -> str:
            return "input" if name in self.inputs else "output"

        def get_tensor_profile_shape(self, name: str, profile: int):
            rest = self.shapes[name][1:]
            return [(1, *rest), (2, *rest), (4, *rest)]

        def get_tensor_dtype(self, name: str) -> str:
            return fake.dtypes.get(name, "float")

        def create_execution_context(self) -> Context:
            return Context(self)

    class Context:
        def __init__(self, engine: Engine) -> None:
            self.engine, self.shapes, self.addresses, self.results = engine, {}, {}, None

        def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
            self.shapes[name], self.results = tuple(shape), None
            return True

        def set_tensor_address(self, name: str, ptr: int) -> bool:
            self.addresses[name] = ptr
            return name not in fake.refuse_address

        def _run(self) -> dict[str, np.ndarray]:
            if self.results is None:
                feed = {}
                for name in self.engine.inputs:
                    count = int(np.prod(self.shapes[name]))
                    raw = (ctypes.c_float * count).from_address(self.addresses[name])
                    feed[name] = np.ctypeslib.as_array(raw).reshape(self.shapes[name]).copy()
                outs = self.engine.session.run(None, feed)
                self.results = dict(zip(self.engine.names[len(feed) :], outs, strict=True))
            return self.results

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._run()[name].shape

        def execute_async_v3(self, stream: int) -> bool:
            assert isinstance(stream, int) and stream == 7, stream  # the native handle
            fake.run_devices.append(cudart.current())
            for name, value in self._run().items():
                ctypes.memmove(self.addresses[name], value.ctypes.data, value.nbytes)
            return True

    class Runtime:
        def __init__(self, logger: object) -> None:
            fake.runtime_loggers.append(logger)

        def deserialize_cuda_engine(self, data: bytes) -> Engine:
            return Engine(data.decode().strip())  # the fake engine file holds its graph name

    class Logger:
        WARNING, VERBOSE = 2, 4

        def __init__(self, level: int) -> None:
            self.min_severity = level

    fake = types.SimpleNamespace(
        __version__="10.13.0",
        Logger=Logger,
        Runtime=Runtime,
        TensorIOMode=types.SimpleNamespace(INPUT="input"),
        nptype=lambda dtype: {"float": np.float32, "half": np.float16}[dtype],
        dtypes={},  # tensor name -> engine dtype (default "float")
        refuse_address=set(),  # tensor names whose set_tensor_address returns False
        run_devices=[],
        runtime_loggers=[],
    )
    return fake


@pytest.fixture
def fake_engines(monkeypatch, tmp_path: Path, tiny_graphs: Path, native_handles) -> tuple:
    """(bundle, fake cudart, fake tensorrt): a bundle whose engines the fakes run with ORT."""
    from cops_tiny_bundle import write_tiny_bundle

    root = write_tiny_bundle(tmp_path / "b", tiny_graphs, torch_weights=False, engines=True)
    for graph in ("vision", "head"):  # the fake engine's bytes name its graph
        (root / f"{graph}.engine").write_bytes(graph.encode().ljust(17))
    bundle = open_bundle(root, verify=False)
    cudart = _FakeCudart()
    fake = _fake_tensorrt(cudart, tiny_graphs)
    monkeypatch.setattr(trt_runtime, "import_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_runtime, "import_cudart", lambda: cudart)
    return bundle, cudart, fake


def test_tensorrt_backend_control_flow_with_fakes(
    fake_engines, native_handles, images, ort_outputs
) -> None:
    bundle, cudart, fake = fake_engines
    with TensorRTBackend(bundle, "vision") as vision, TensorRTBackend(bundle, "head") as head:
        assert vision.provider == "NVIDIA H200" and vision.max_batch == 4
        emb = vision.infer({"image": images})
        out = {**emb, **head.infer(emb)}
        out2 = head.infer(vision.infer({"image": images[:1]}))  # buffers reused
        with pytest.raises(ConfigError, match=r"profile accepts \(1, 3, 98, 98\) \.\. \(4,"):
            vision.infer({"image": np.zeros((5, 3, 98, 98), np.float32)})
    assert cudart.memory == {}  # every buffer freed on deactivate
    for name, ref in ort_outputs.items():
        np.testing.assert_allclose(out[name], ref, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(out2["anomaly_map"], ort_outputs["anomaly_map"][:1], atol=1e-6)
    assert native_handles == [7] * len(fake.run_devices) and len(fake.run_devices) == 4
    # TensorRT keeps the first logger for the process: both runtimes get the same one
    assert len(fake.runtime_loggers) == 2 and fake.runtime_loggers[0] is fake.runtime_loggers[1]


def test_tensorrt_infer_from_another_thread_stays_on_its_device(
    fake_engines, images, native_handles
) -> None:
    """CUDA's current device is per thread: activate on device 1 in this thread, infer from a
    worker thread (whose current device is 0): every allocation, run and free is on device 1."""
    from concurrent.futures import ThreadPoolExecutor

    bundle, cudart, fake = fake_engines
    vision = TensorRTBackend(bundle, "vision", device=1)
    vision.activate()
    cudart.cudaSetDevice(0)  # this thread moves on to another device
    with ThreadPoolExecutor(1) as pool:
        pool.submit(vision.infer, {"image": images}).result()
        pool.submit(vision.deactivate).result()
    assert cudart.malloc_devices and set(cudart.malloc_devices) == {1}
    assert fake.run_devices == [1] and set(cudart.free_devices) == {1}
    assert native_handles == [7] and cudart.memory == {}


def test_tensorrt_refused_tensor_address_is_an_error(fake_engines, images) -> None:
    bundle, _, fake = fake_engines
    fake.refuse_address.add("patch_embedding")
    with TensorRTBackend(bundle, "vision") as vision:
        with pytest.raises(CopsError, match=r"refused the device address of tensor 'patch_emb"):
            vision.infer({"image": images})
    fake.refuse_address.clear()
    fake.refuse_address.add("image")
    with TensorRTBackend(bundle, "vision") as vision:
        with pytest.raises(CopsError, match=r"tensor 'image'.*set_tensor_address returned False"):
            vision.infer({"image": images})


def test_tensorrt_engine_dtypes_are_checked_against_the_bundle(fake_engines) -> None:
    bundle, _, fake = fake_engines
    fake.dtypes["image"] = "half"  # an engine built with float16 I/O
    backend = TensorRTBackend(bundle, "vision")
    with pytest.raises(BundleError, match=r"tensor 'image' as float16.*declares float32.*--force"):
        backend.activate()
    assert not backend.is_active


def test_old_tensorrt_is_refused(monkeypatch) -> None:
    import types

    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(MissingDependencyError, match=r"tensorrt >= 10.*installed: 8\.6\.1"):
        import_tensorrt()


def test_missing_cuda_python_is_refused(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(MissingDependencyError, match=r"cuda-python.*cops-deploy\[trt\]"):
        import_cudart()
