"""TensorRT engine building: profiles, keys, cache, refusals on CPU; the build itself under `trt`.

The CPU tests drive ``build_engine`` through a fake ``tensorrt`` module that records the calls,
so the flow (strongly typed network, parser, profile, timing cache, engine cache) is checked
without a GPU; the ``trt`` tests build real engines where TensorRT and a GPU exist.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from cops_deploy.errors import (
    BundleError,
    ConfigError,
    EngineBuildError,
    ExportError,
    MissingDependencyError,
)
from cops_deploy.export import tensorrt as trt_build
from cops_deploy.export.tensorrt import (
    TRT_INSTALL,
    BatchProfile,
    batch_profile,
    build_engine,
    build_engine_cached,
    check_engine_key,
    engine_cache_path,
    engine_key,
    import_tensorrt,
    onnx_precision,
    profile_shapes,
    read_cached_key,
    timing_cache_path,
)
from cops_deploy.runtime.backends import tensorrt as trt_runtime
from cops_deploy.runtime.bundle import sha256_file
from cops_deploy.runtime.manifest import EngineKey

MACHINE = {"tensorrt_version": "10.13.0", "gpu_name": "NVIDIA H200", "compute_capability": "9.0"}


def make_onnx(
    path: Path, batch: int | str = "batch", fp16: bool = False, width: int | str = 4
) -> Path:
    """y = x @ W with x [batch, width]; ``fp16`` adds a float16 weight and casts."""
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    dtype = TensorProto.FLOAT
    weight = numpy_helper.from_array(np.ones((4, 3), "float32"), "W")
    if fp16:
        weight = numpy_helper.from_array(np.ones((4, 3), "float16"), "W")
        nodes = [
            helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
            helper.make_node("MatMul", ["xh", "W"], ["yh"]),
            helper.make_node("Cast", ["yh"], ["y"], to=TensorProto.FLOAT),
        ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, [batch, width])],
        [helper.make_tensor_value_info("y", dtype, [batch, 3])],
        initializer=[weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), str(path))
    return path


# ---------------------------------------------------------------------------------- profile


@pytest.mark.parametrize(
    ("max_batch", "expected"), [(1, (1, 1, 1)), (2, (1, 1, 2)), (5, (1, 2, 5)), (8, (1, 4, 8))]
)
def test_profile_from_max_batch(max_batch, expected):
    profile = BatchProfile.from_max_batch(max_batch)
    assert (profile.min, profile.opt, profile.max) == expected
    assert profile.describe() == "b{}-{}-{}".format(*expected)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_profile_refuses_bad_max_batch(bad):
    with pytest.raises(ConfigError, match="max_batch must be an integer >= 1"):
        BatchProfile.from_max_batch(bad)


def test_profile_shapes(tmp_path):
    path = make_onnx(tmp_path / "g.onnx")
    shapes = profile_shapes(path, BatchProfile.from_max_batch(8))
    assert shapes == {"x": ((1, 4), (4, 4), (8, 4))}


def test_profile_shapes_fixed_batch(tmp_path):
    path = make_onnx(tmp_path / "g.onnx", batch=1)
    with pytest.raises(EngineBuildError, match="fixed batch dimension"):
        profile_shapes(path, BatchProfile.from_max_batch(4))
    assert profile_shapes(path, BatchProfile.from_max_batch(1)) == {"x": ((1, 4),) * 3}


def test_fixed_batch_other_than_one_gets_its_own_profile(tmp_path):
    """A graph exported with a fixed batch N builds with the profile N .. N (not 1 .. N, which
    TensorRT rejects for a fixed dimension), and its key says so."""
    path = make_onnx(tmp_path / "g.onnx", batch=2)
    profile = batch_profile(path, 2)
    assert profile == BatchProfile(2, 2, 2) and profile.describe() == "b2-2-2"
    assert profile_shapes(path, profile) == {"x": ((2, 4),) * 3}
    with pytest.raises(EngineBuildError, match=r"fixed batch dimension.*--max-batch 2"):
        batch_profile(path, 8)
    with pytest.raises(EngineBuildError, match=r"fixed batch dimension 2.*b1-1-2"):
        profile_shapes(path, BatchProfile.from_max_batch(2))
    assert batch_profile(make_onnx(tmp_path / "d.onnx"), 8) == BatchProfile(1, 4, 8)


def test_profile_shapes_refuses_other_dynamic_dims(tmp_path):
    path = make_onnx(tmp_path / "g.onnx", width="w")
    with pytest.raises(EngineBuildError, match="dimension 1 is dynamic"):
        profile_shapes(path, BatchProfile.from_max_batch(2))


def test_missing_onnx_file(tmp_path):
    with pytest.raises(ExportError, match="does not exist"):
        profile_shapes(tmp_path / "none.onnx", BatchProfile.from_max_batch(2))


# -------------------------------------------------------------------------------- precision


def test_onnx_precision(tmp_path):
    assert onnx_precision(make_onnx(tmp_path / "a.onnx")) == "fp32"
    assert onnx_precision(make_onnx(tmp_path / "b.onnx", fp16=True)) == "fp16"


def test_precision_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_build, "machine_fields", lambda device=0: dict(MACHINE))
    path = make_onnx(tmp_path / "a.onnx")
    with pytest.raises(EngineBuildError, match="is an fp32 graph but precision='fp16'"):
        build_engine(path, tmp_path / "a.engine", "fp16", 2)
    with pytest.raises(ConfigError, match="precision 'int8' is not supported"):
        build_engine(path, tmp_path / "a.engine", "int8", 2)


# ------------------------------------------------------------------------------ keys, cache


def test_engine_key_fields(tmp_path):
    path = make_onnx(tmp_path / "g.onnx")
    key = engine_key(path, "fp32", BatchProfile.from_max_batch(8), MACHINE)
    assert key == EngineKey(sha256_file(path), "10.13.0", "NVIDIA H200", "9.0", "fp32", "b1-4-8")


def test_engine_key_refusals(tmp_path):
    path = make_onnx(tmp_path / "g.onnx")
    profile = BatchProfile.from_max_batch(2)
    with pytest.raises(ConfigError, match=r"machine fields \['gpu_name'\] are missing"):
        engine_key(path, "fp32", profile, {k: v for k, v in MACHINE.items() if k != "gpu_name"})
    with pytest.raises(ConfigError, match="precision 'bf16'"):
        engine_key(path, "bf16", profile, MACHINE)


def test_cache_path_depends_on_every_field_and_the_weights(tmp_path):
    path = make_onnx(tmp_path / "g.onnx")
    key = engine_key(path, "fp32", BatchProfile.from_max_batch(4), MACHINE)
    base = engine_cache_path(tmp_path, key, "vision")
    assert base == engine_cache_path(tmp_path, key, "vision")
    assert base.parent == tmp_path and base.name.startswith("vision-fp32-")
    assert base.suffix == ".engine"
    seen = {base}
    for field, value in key.to_dict().items():
        other = EngineKey(**{**key.to_dict(), field: value + "x"})
        seen.add(engine_cache_path(tmp_path, other, "vision"))
    seen.add(engine_cache_path(tmp_path, key, "vision", weights_digest="abc"))
    assert len(seen) == len(key.to_dict()) + 2


def test_cache_path_refuses_odd_stem(tmp_path):
    key = EngineKey("0" * 64, "10", "g", "9.0", "fp32", "b1-1-1")
    with pytest.raises(ConfigError, match="engine stem '../x'"):
        engine_cache_path(tmp_path, key, "../x")


def test_check_engine_key_names_the_field(tmp_path):
    key = EngineKey("0" * 64, "10.13.0", "NVIDIA H200", "9.0", "fp32", "b1-4-8")
    check_engine_key(key, key, tmp_path / "v.engine")
    here = EngineKey(**{**key.to_dict(), "gpu_name": "NVIDIA A100"})
    with pytest.raises(BundleError, match="built for gpu_name='NVIDIA H200', here gpu_name="):
        check_engine_key(key, here, tmp_path / "v.engine")
    here = EngineKey(**{**key.to_dict(), "tensorrt_version": "11.0.0"})
    with pytest.raises(BundleError, match="tensorrt_version.*rebuild"):
        check_engine_key(key, here, tmp_path / "v.engine")


def test_read_cached_key(tmp_path):
    engine = tmp_path / "v.engine"
    assert read_cached_key(engine) is None
    engine.write_bytes(b"x")
    assert read_cached_key(engine) is None  # no key beside it
    key = EngineKey("0" * 64, "10", "g", "9.0", "fp32", "b1-1-1")
    (tmp_path / "v.engine.json").write_text(json.dumps(key.to_dict()))
    assert read_cached_key(engine) == key
    (tmp_path / "v.engine.json").write_text("{not json")
    assert read_cached_key(engine) is None


# --------------------------------------------------------------------------------- import


def test_missing_tensorrt_gives_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError) as info:
        import_tensorrt()
    assert TRT_INSTALL in str(info.value) and "pip install 'cops-deploy[trt]'" in str(info.value)
    assert not trt_build.tensorrt_available()


def test_old_tensorrt_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    with pytest.raises(MissingDependencyError, match="8.6.1 is too old"):
        import_tensorrt()


def test_one_definition_for_both_sides():
    """The build side imports TensorRT, reads the machine and refuses a mismatched key with the
    run side's own functions."""
    from cops_deploy.runtime.backends import tensorrt as trt_runtime

    assert trt_build.import_tensorrt is trt_runtime.import_tensorrt
    assert trt_build.check_engine_key is trt_runtime.check_engine_key
    assert trt_build.machine_fields is trt_runtime.tensorrt_machine_fields
    assert trt_build.TRT_INSTALL == trt_runtime.TRT_INSTALL


# ----------------------------------------------------------------------- fake TensorRT flow


class FakeTensorRT(types.ModuleType):
    """Just enough of the TensorRT >= 10 Python API to run build_engine; records calls."""

    def __init__(self, fail_parse: bool = False) -> None:
        super().__init__("tensorrt")
        self.__version__ = "10.13.0"
        self.calls: list[tuple] = []
        self.loggers: list[object] = []
        self.cudart = FakeCudart()
        self.fail_parse = fail_parse
        fake = self

        class Logger:
            WARNING, VERBOSE = "warning", "verbose"

            def __init__(self, level):
                fake.calls.append(("logger", level))
                self.min_severity = level

        class NetworkDefinitionCreationFlag:
            STRONGLY_TYPED = 5

        class MemoryPoolType:
            WORKSPACE = "workspace"

        class Cache:
            def __init__(self, data):
                self.data = bytes(data)

            def serialize(self):
                return self.data + b"+timed"

        class Config:
            def set_memory_pool_limit(self, pool, size):
                fake.calls.append(("workspace", size))

            def add_optimization_profile(self, profile):
                fake.calls.append(("profile", dict(profile.shapes)))

            def create_timing_cache(self, data):
                return Cache(data)

            def set_timing_cache(self, cache, ignore_mismatch):
                fake.calls.append(("timing_cache_in", cache.data, ignore_mismatch))
                self.cache = cache
                return not cache.data.startswith(b"foreign")  # TensorRT: False when refused

            def get_timing_cache(self):
                return self.cache

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Builder:
            def __init__(self, logger):
                fake.calls.append(("builder_on_device", fake.cudart.current()))
                fake.loggers.append(logger)

            def create_network(self, flags):
                fake.calls.append(("network_flags", flags))
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build",))
                return memoryview(b"ENGINE")

        class OnnxParser:
            num_errors = 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                fake.calls.append(("parse", path))
                return not fake.fail_parse

            def get_error(self, i):
                return "unsupported op Foo"

        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, OnnxParser
        self.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag
        self.MemoryPoolType = MemoryPoolType


class FakeCudart:
    """cudaSetDevice with CUDA's per-thread current device (what build_engine must set)."""

    class cudaError_t:  # noqa: N801 - cuda-python's names
        cudaSuccess = 0

    def __init__(self) -> None:
        import threading

        self.local = threading.local()

    def current(self) -> int:
        return getattr(self.local, "device", 0)

    def cudaSetDevice(self, device):  # noqa: N802
        self.local.device = device
        return (0,)


@pytest.fixture
def fake_trt(monkeypatch):
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(trt_build, "machine_fields", lambda device=0: dict(MACHINE))
    monkeypatch.setattr(trt_runtime, "import_cudart", lambda: fake.cudart)
    return fake


def test_build_engine_flow(fake_trt, tmp_path):
    onnx_path = make_onnx(tmp_path / "g.onnx")
    timing = tmp_path / "timing.cache"
    key = build_engine(
        onnx_path, tmp_path / "g.engine", "fp32", 8, timing_cache=timing, workspace_bytes=1 << 30
    )
    assert (tmp_path / "g.engine").read_bytes() == b"ENGINE"
    assert timing.read_bytes() == b"+timed"
    assert ("network_flags", 1 << 5) in fake_trt.calls  # STRONGLY_TYPED
    assert ("parse", str(onnx_path)) in fake_trt.calls
    assert ("profile", {"x": ((1, 4), (4, 4), (8, 4))}) in fake_trt.calls
    assert ("workspace", 1 << 30) in fake_trt.calls
    assert key.profile == "b1-4-8" and key.onnx_sha256 == sha256_file(onnx_path)
    build_engine(onnx_path, tmp_path / "g.engine", "fp32", 8, timing_cache=timing)
    assert ("timing_cache_in", b"+timed", False) in fake_trt.calls  # the cache is read back


def test_build_engine_selects_the_device_before_the_builder(fake_trt, tmp_path):
    """CUDA's current device is per thread: the builder (and the engine it times) must be on
    the device the key names, whatever the thread had selected."""
    onnx_path = make_onnx(tmp_path / "g.onnx")
    build_engine(onnx_path, tmp_path / "g.engine", "fp32", 2, device=1)
    assert ("builder_on_device", 1) in fake_trt.calls
    build_engine(onnx_path, tmp_path / "g.engine", "fp32", 2, device=0)
    assert fake_trt.calls.count(("builder_on_device", 0)) == 1


def test_build_engine_reuses_one_logger(fake_trt, tmp_path):
    """TensorRT keeps the first logger for the process: one logger, its level changed."""
    onnx_path = make_onnx(tmp_path / "g.onnx")
    build_engine(onnx_path, tmp_path / "a.engine", "fp32", 2)
    build_engine(onnx_path, tmp_path / "b.engine", "fp32", 2, verbose=True)
    assert len(fake_trt.loggers) == 2 and fake_trt.loggers[0] is fake_trt.loggers[1]
    assert [c for c in fake_trt.calls if c[0] == "logger"] == [("logger", "warning")]
    assert fake_trt.loggers[0].min_severity == "verbose"
    build_engine(onnx_path, tmp_path / "c.engine", "fp32", 2)
    assert fake_trt.loggers[0].min_severity == "warning"


def test_refused_timing_cache_is_an_error(fake_trt, tmp_path):
    """set_timing_cache's result is checked: a cache TensorRT refuses is not silently dropped."""
    timing = tmp_path / "timing.cache"
    timing.write_bytes(b"foreign build")
    with pytest.raises(EngineBuildError, match=r"refused the timing cache .*Fix: delete"):
        build_engine(make_onnx(tmp_path / "g.onnx"), tmp_path / "g.engine", "fp32", 2, timing)
    assert not (tmp_path / "g.engine").exists()


def test_timing_cache_is_keyed_by_tensorrt_and_gpu(tmp_path):
    base = timing_cache_path(tmp_path, MACHINE)
    assert base == tmp_path / "timing-trt10.13.0-NVIDIA_H200-sm9.0.cache"
    others = {
        timing_cache_path(tmp_path, {**MACHINE, field: value})
        for field, value in (
            ("tensorrt_version", "10.3.0"),
            ("gpu_name", "NVIDIA A100-SXM4-80GB"),
            ("compute_capability", "8.0"),
        )
    }
    assert len(others) == 3 and base not in others
    assert all(p.parent == tmp_path for p in others)  # no separator leaks from a GPU name
    odd = timing_cache_path(tmp_path, {**MACHINE, "gpu_name": "../GPU/x"})
    assert odd.parent == tmp_path


def test_build_engine_fixed_batch_profile(fake_trt, tmp_path):
    key = build_engine(make_onnx(tmp_path / "g.onnx", batch=2), tmp_path / "g.engine", "fp32", 2)
    assert ("profile", {"x": ((2, 4), (2, 4), (2, 4))}) in fake_trt.calls
    assert key.profile == "b2-2-2"


def test_build_engine_parser_errors(fake_trt, tmp_path):
    fake_trt.fail_parse = True
    with pytest.raises(EngineBuildError, match="parser rejected .*unsupported op Foo"):
        build_engine(make_onnx(tmp_path / "g.onnx"), tmp_path / "g.engine", "fp32", 2)
    assert not (tmp_path / "g.engine").exists()


def test_engine_cache_reuse_and_force(fake_trt, tmp_path):
    onnx_path = make_onnx(tmp_path / "g.onnx", fp16=True)
    cache = tmp_path / "cache"
    path, key = build_engine_cached(onnx_path, cache, "head", "fp16", 4)
    assert path.parent == cache and path.name.startswith("head-fp16-")
    assert read_cached_key(path) == key and timing_cache_path(cache, MACHINE).is_file()
    builds = fake_trt.calls.count(("build",))
    again, key2 = build_engine_cached(onnx_path, cache, "head", "fp16", 4)
    assert (again, key2) == (path, key) and fake_trt.calls.count(("build",)) == builds
    build_engine_cached(onnx_path, cache, "head", "fp16", 4, force=True)
    assert fake_trt.calls.count(("build",)) == builds + 1
    other, _ = build_engine_cached(onnx_path, cache, "head", "fp16", 2)  # another profile
    assert other != path


def test_engine_cache_refuses_a_mismatched_key(fake_trt, tmp_path):
    onnx_path = make_onnx(tmp_path / "g.onnx")
    cache = tmp_path / "cache"
    path, key = build_engine_cached(onnx_path, cache, "vision", "fp32", 2)
    stored = {**key.to_dict(), "gpu_name": "NVIDIA A100"}  # a key file that does not fit
    (cache / (path.name + ".json")).write_text(json.dumps(stored))
    with pytest.raises(
        BundleError,
        match=r"built for gpu_name='NVIDIA A100', here gpu_name='NVIDIA H200'.*"
        r"--engine-cache .*--rebuild-engines",
    ):
        build_engine_cached(onnx_path, cache, "vision", "fp32", 2)


# ------------------------------------------------------------------- packaging (CPU)


def test_trt_extra_keeps_cuda_python_on_cuda_12():
    """cuda-python 13 binds CUDA 13 and fails with 'insufficient driver' (error 35) where
    TensorRT's CUDA 12 wheels run: the [trt] extra must not let pip take it."""
    import tomllib

    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    extra = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["trt"]
    reqs = {Requirement(r).name: Requirement(r).specifier for r in extra}
    assert {"tensorrt", "cuda-python"} <= reqs.keys()
    cuda = reqs["cuda-python"]
    assert all(v in cuda for v in ("12.0.0", "12.6.2", "12.9.1"))
    assert not any(v in cuda for v in ("13.0.0", "13.0.3", "13.1.0", "14.0"))


# ------------------------------------------------------------------------------ real TensorRT
# Build the tiny engines the way users do (cops-export, whose engine stage is build_engine),
# run them, and compare every output with ONNX Runtime (CPU) on the same bundle's graphs.
# They skip only where TensorRT or cuda-python is not installed or no CUDA device exists;
# any other trouble (a driver too old for the bindings, a build failure) fails.

TRT_TOL = {"fp32": 2e-3, "fp16": 1e-2}  # fp32: TF32 is on by default in TensorRT builds


def _require_tensorrt_gpu():
    try:
        import_tensorrt()
        cudart = trt_runtime.import_cudart()
    except MissingDependencyError as exc:
        pytest.skip(f"TensorRT or cuda-python is not installed here: {exc}")
    err, count = cudart.cudaGetDeviceCount()
    if err == cudart.cudaError_t.cudaErrorNoDevice:
        pytest.skip("cuda-python sees no CUDA device (cudaErrorNoDevice)")
    assert err == cudart.cudaError_t.cudaSuccess, f"cudaGetDeviceCount failed: {err!r}"
    assert count >= 1


def _run_both(root: Path, n: int = 3) -> tuple[dict, dict]:
    """(TensorRT outputs, ONNX Runtime CPU outputs) of a bundle on ``n`` synthetic images."""
    from cops_deploy.configs import config_from_dict
    from cops_deploy.export.onnx_export import run_onnxruntime, synthetic_images
    from cops_deploy.runtime.backends.tensorrt import TensorRTBackend
    from cops_deploy.runtime.bundle import open_bundle

    bundle = open_bundle(root)
    assert set(bundle.manifest.engines) == {"vision.engine", "head.engine"}
    cfg = config_from_dict(bundle.manifest.model_config)
    images = synthetic_images(cfg, n=n, seed=5).numpy()
    vision, head = TensorRTBackend.open_pair(bundle)
    try:
        emb = vision.infer({"image": images})
        got = {**emb, **head.infer(emb)}
    finally:
        vision.deactivate()
        head.deactivate()
    graphs = {g: root / bundle.manifest.graphs[g].file for g in ("vision", "head")}
    ref = run_onnxruntime(graphs["vision"], {"image": images})
    ref.update(run_onnxruntime(graphs["head"], ref))
    return got, ref


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cops_export_engines_run_and_match_onnxruntime(precision, tmp_path):
    """cops-export --engine trt (export + build_engine in one go), then run both engines."""
    _require_tensorrt_gpu()
    from cops_deploy.cli.export import main as cops_export

    out = tmp_path / "bundle"
    args = ["--model", "cops-tiny", "--random-weights", "--precision", precision]
    args += ["--engine", "trt", "--max-batch", "4", "--engine-cache", str(tmp_path / "cache")]
    assert cops_export([*args, "--out", str(out)]) == 0
    got, ref = _run_both(out)
    for name, value in ref.items():
        assert got[name].dtype == np.float32 and got[name].shape == value.shape, name
        np.testing.assert_allclose(got[name], value, atol=TRT_TOL[precision], err_msg=name)
    machine = trt_build.machine_fields()
    assert timing_cache_path(tmp_path / "cache", machine).is_file()


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engines_added_to_a_bundle_run_and_match_onnxruntime(precision, tmp_path):
    """cops-export --engine onnx, then cops-export --engine trt --bundle (add_engines ->
    build_engine_cached -> build_engine), and the engines run at batch 1 and the profile max."""
    _require_tensorrt_gpu()
    from cops_deploy.cli.export import main as cops_export

    out = tmp_path / "bundle"
    base = ["--model", "cops-tiny", "--random-weights", "--precision", precision]
    assert cops_export([*base, "--engine", "onnx", "--out", str(out)]) == 0
    cache = ["--engine-cache", str(tmp_path / "cache"), "--max-batch", "4"]
    assert cops_export(["--engine", "trt", "--bundle", str(out), *cache]) == 0
    for n in (1, 4):
        got, ref = _run_both(out, n)
        for name, value in ref.items():
            np.testing.assert_allclose(got[name], value, atol=TRT_TOL[precision], err_msg=name)


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_build_engine_tiny_graphs(precision, tmp_path):
    """build_engine itself: the engine's I/O names, float32 I/O dtypes and profile."""
    _require_tensorrt_gpu()
    from cops_deploy import create_model
    from cops_deploy.export.fp16 import to_fp16
    from cops_deploy.export.graphs import HeadGraph, VisionGraph, example_inputs
    from cops_deploy.export.onnx_export import export_onnx

    model = create_model("cops-tiny", seed=0)
    trt = import_tensorrt()
    for name, graph in (("vision", VisionGraph(model)), ("head", HeadGraph(model))):
        graph = to_fp16(graph) if precision == "fp16" else graph
        onnx_path = export_onnx(graph, tmp_path / f"{name}.onnx", example_inputs(name, model.cfg))
        key = build_engine(onnx_path, tmp_path / f"{name}.engine", precision, 4)
        assert key.precision == precision and key.profile == "b1-2-4"
        runtime = trt.Runtime(trt_runtime.tensorrt_logger())
        engine = runtime.deserialize_cuda_engine((tmp_path / f"{name}.engine").read_bytes())
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        assert set(names) == set(graph.input_names) | set(graph.output_names)
        for tensor in names:
            assert engine.get_tensor_dtype(tensor) == trt.DataType.FLOAT, tensor
        first = graph.input_names[0]
        assert [s[0] for s in engine.get_tensor_profile_shape(first, 0)] == [1, 2, 4]
