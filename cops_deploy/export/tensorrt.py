"""TensorRT engines from the exported ONNX graphs (TensorRT >= 10 API, strongly typed).

TensorRT 10/11 builds strongly typed networks: every tensor's type comes from the ONNX graph,
so an FP16 engine is built from the FP16 ONNX graph (``cops_deploy.export.fp16``) and there is
no precision flag. The optimisation profile covers batch 1 .. ``max_batch`` (optimum
``max(1, max_batch // 2)``), or exactly N for a graph exported with a fixed batch N. A timing
cache file speeds up rebuilds; the engine cache keeps one per TensorRT version, GPU and compute
capability (:func:`timing_cache_path`: TensorRT rejects or ignores a cache from another build or
device), and a cache TensorRT refuses is an error, not silently dropped. The engine cache, keyed
by :class:`~cops_deploy.runtime.manifest.EngineKey` (ONNX sha256, TensorRT version, GPU name,
compute capability, precision, profile), reuses an engine only where every field matches.
``build_engine`` selects CUDA device ``device`` before it creates the builder, so the engine is
built (and timed) on the device its key names; it logs through the process's one TensorRT
logger (:func:`~cops_deploy.runtime.backends.tensorrt.tensorrt_logger`).

``tensorrt`` is imported inside functions only, through the run side's
:func:`~cops_deploy.runtime.backends.tensorrt.import_tensorrt` (without it: MissingDependencyError
with the install command); the machine fields of a key and the refusal of a mismatched key are
the run side's too, so both sides key and check engines the same way. Everything up to the build
itself (profiles, keys, cache paths, precision checks) runs on a CPU-only machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cops_deploy.errors import (
    BundleError,
    ConfigError,
    EngineBuildError,
    ExportError,
    MissingDependencyError,
)
from cops_deploy.fileio import atomic_write_bytes
from cops_deploy.runtime.backends.tensorrt import (
    TRT_INSTALL,
    check_engine_key,
    import_tensorrt,
    set_cuda_device,
    tensorrt_logger,
    tensorrt_machine_fields,
)
from cops_deploy.runtime.bundle import sha256_file
from cops_deploy.runtime.manifest import EngineKey

# TRT_INSTALL, check_engine_key and import_tensorrt are the run side's, re-exported for callers
# of this module.
__all__ = [
    "PRECISIONS",
    "TRT_INSTALL",
    "BatchProfile",
    "batch_profile",
    "build_engine",
    "build_engine_cached",
    "check_engine_key",
    "engine_cache_path",
    "engine_key",
    "import_tensorrt",
    "machine_fields",
    "onnx_precision",
    "profile_shapes",
    "read_cached_key",
    "tensorrt_available",
    "timing_cache_path",
]

PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
_FP16, _FP32 = 10, 1  # onnx.TensorProto.FLOAT16, FLOAT


# ----------------------------------------------------------------------------------------------
# Import


def tensorrt_available() -> bool:
    """Whether a usable ``tensorrt`` (>= 10) imports here."""
    try:
        import_tensorrt()
    except MissingDependencyError:
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Profile


@dataclass(frozen=True)
class BatchProfile:
    """The batch range of the optimisation profile: min 1, opt max(1, max // 2), max."""

    min: int
    opt: int
    max: int

    @classmethod
    def from_max_batch(cls, max_batch: int) -> BatchProfile:
        """The profile for batches 1 .. ``max_batch``."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ConfigError(
                f"max_batch must be an integer >= 1, got {max_batch!r}. Fix: pass e.g. "
                f"--max-batch 8."
            )
        return cls(min=1, opt=max(1, max_batch // 2), max=max_batch)

    @classmethod
    def fixed(cls, batch: int) -> BatchProfile:
        """The profile of a graph exported with a fixed batch: exactly ``batch``."""
        return cls(min=batch, opt=batch, max=batch)

    def describe(self) -> str:
        """The profile field of the engine key, e.g. ``"b1-4-8"``."""
        return f"b{self.min}-{self.opt}-{self.max}"


def _onnx_model(onnx_path: str | os.PathLike[str]) -> Any:
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise ExportError(f"ONNX file {path} does not exist. Fix: export the graph first.")
    return onnx.load(str(path), load_external_data=False)


def _fixed_batches(model: Any) -> dict[str, int]:
    """Graph inputs whose batch dimension (dimension 0) is fixed, with its size."""
    fixed = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if not dims or not dims[0].dim_param:
            fixed[value.name] = int(dims[0].dim_value) if dims and dims[0].dim_value > 0 else 1
    return fixed


def batch_profile(onnx_path: str | os.PathLike[str], max_batch: int) -> BatchProfile:
    """The profile an engine of ``onnx_path`` gets for ``max_batch``: batches 1 .. max_batch
    when the batch dimension is dynamic; exactly N when the graph was exported with a fixed
    batch N, which ``max_batch`` must then equal."""
    profile = BatchProfile.from_max_batch(max_batch)
    fixed = _fixed_batches(_onnx_model(onnx_path))
    if not fixed:
        return profile
    if set(fixed.values()) != {max_batch}:
        raise EngineBuildError(
            f"{onnx_path}: input(s) with a fixed batch dimension {fixed}, so no profile up to "
            f"batch {max_batch} fits. Fix: re-export with dynamic_batch=True (cops-export "
            f"does), or use --max-batch {max(fixed.values())}."
        )
    return BatchProfile.fixed(max_batch)


def profile_shapes(
    onnx_path: str | os.PathLike[str], profile: BatchProfile
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """Per graph input, the (min, opt, max) shapes of the profile: dimension 0 (symbolic in the
    ONNX graph) takes the profile's batches, every other dimension must be fixed; a fixed batch
    N is accepted only by the profile N .. N (see :func:`batch_profile`)."""
    model = _onnx_model(onnx_path)
    fixed = _fixed_batches(model)
    shapes = {}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name in fixed and (profile.min, profile.max) != (fixed[value.name],) * 2:
            raise EngineBuildError(
                f"{onnx_path}: input {value.name!r} has a fixed batch dimension "
                f"{fixed[value.name]}, so the profile {profile.describe()} does not fit. Fix: "
                f"re-export with dynamic_batch=True (cops-export does), or use --max-batch "
                f"{fixed[value.name]}."
            )
        rest = []
        for i, d in enumerate(dims[1:], start=1):
            if d.dim_param or d.dim_value <= 0:
                raise EngineBuildError(
                    f"{onnx_path}: input {value.name!r} dimension {i} is dynamic "
                    f"({d.dim_param or '?'}); only the batch dimension may be. Fix: export "
                    f"with a fixed image size."
                )
            rest.append(int(d.dim_value))
        shapes[value.name] = tuple((b, *rest) for b in (profile.min, profile.opt, profile.max))
    return shapes  # type: ignore[return-value]


def onnx_precision(onnx_path: str | os.PathLike[str]) -> str:
    """``"fp16"`` if the graph holds float16 weights or casts to float16, else ``"fp32"``."""
    model = _onnx_model(onnx_path)
    graph = model.graph
    if any(init.data_type == _FP16 for init in graph.initializer):
        return "fp16"
    for node in graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == _FP16 for a in node.attribute):
            return "fp16"
    return "fp32"


def _check_precision(onnx_path: str | os.PathLike[str], precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(
            f"precision {precision!r} is not supported for TensorRT engines; valid: "
            f"{list(PRECISIONS)}."
        )
    actual = onnx_precision(onnx_path)
    if actual != precision:
        raise EngineBuildError(
            f"{onnx_path} is an {actual} graph but precision={precision!r} was asked; a strongly "
            f"typed TensorRT network takes its precision from the ONNX graph. Fix: build from "
            f"the {precision} ONNX export (cops-export --precision {precision})."
        )


# ----------------------------------------------------------------------------------------------
# Keys and cache


# TensorRT version, GPU name and compute capability here, as the runtime reads them: one
# definition for both sides, so an engine built here is accepted where the fields are equal.
machine_fields = tensorrt_machine_fields


def timing_cache_path(cache_dir: str | os.PathLike[str], machine: dict[str, str]) -> Path:
    """The timing cache for ``machine`` in ``cache_dir``:
    ``timing-trt<version>-<gpu>-sm<capability>.cache``. TensorRT rejects or ignores a timing
    cache from another TensorRT build or device, so each keeps its own."""
    fields = [
        "trt" + str(machine["tensorrt_version"]),
        str(machine["gpu_name"]),
        "sm" + str(machine["compute_capability"]),
    ]
    slug = "-".join(re.sub(r"[^A-Za-z0-9.]+", "_", f).strip("_") for f in fields)
    return Path(cache_dir) / f"timing-{slug}.cache"


def engine_key(
    onnx_path: str | os.PathLike[str],
    precision: str,
    profile: BatchProfile,
    machine: dict[str, str],
) -> EngineKey:
    """The key of an engine built from ``onnx_path`` on ``machine`` (see :func:`machine_fields`)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision {precision!r} is not supported; valid: {list(PRECISIONS)}.")
    missing = sorted({"tensorrt_version", "gpu_name", "compute_capability"} - machine.keys())
    if missing:
        raise ConfigError(
            f"machine fields {missing} are missing from {sorted(machine)}; valid: the dict "
            f"returned by machine_fields()."
        )
    return EngineKey(
        onnx_sha256=sha256_file(onnx_path),
        tensorrt_version=str(machine["tensorrt_version"]),
        gpu_name=str(machine["gpu_name"]),
        compute_capability=str(machine["compute_capability"]),
        precision=precision,
        profile=profile.describe(),
    )


def _weights_digest(onnx_path: Path) -> str:
    """sha256 over the external-data files of an ONNX graph (the key's hash covers the graph
    file only, whose bytes do not change when only the weights do)."""
    from cops_deploy.export.bundle_writer import onnx_external_data_files

    digest = hashlib.sha256()
    for loc in onnx_external_data_files(onnx_path):
        digest.update(loc.encode())
        digest.update(sha256_file(onnx_path.parent / loc).encode())
    return digest.hexdigest()


def engine_cache_path(
    cache_dir: str | os.PathLike[str], key: EngineKey, stem: str, weights_digest: str = ""
) -> Path:
    """Where the engine for ``key`` lives in ``cache_dir``: ``<stem>-<precision>-<digest>.engine``
    with the key beside it as ``.json`` (the digest covers every key field and the weights)."""
    if not stem or not stem.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"engine stem {stem!r} must be a plain name such as 'vision'.")
    payload = json.dumps({**key.to_dict(), "weights": weights_digest}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:20]
    return Path(cache_dir) / f"{stem}-{key.precision}-{digest}.engine"


def _key_path(engine_path: Path) -> Path:
    return engine_path.with_name(engine_path.name + ".json")


def read_cached_key(engine_path: str | os.PathLike[str]) -> EngineKey | None:
    """The key stored beside a cached engine, or None when either file is missing."""
    engine_path = Path(engine_path)
    key_path = _key_path(engine_path)
    if not engine_path.is_file() or not key_path.is_file():
        return None
    try:
        return EngineKey.from_dict(json.loads(key_path.read_text()), str(key_path))
    except (ValueError, BundleError):
        return None


# ----------------------------------------------------------------------------------------------
# Build


def build_engine(
    onnx_path: str | os.PathLike[str],
    engine_path: str | os.PathLike[str],
    precision: str,
    max_batch: int,
    timing_cache: str | os.PathLike[str] | None = None,
    workspace_bytes: int | None = None,
    device: int = 0,
    verbose: bool = False,
) -> EngineKey:
    """Build a TensorRT engine from ``onnx_path`` into ``engine_path``; returns its key.

    Strongly typed network (precision from the graph; ``precision`` must match it), ONNX parser
    (external data resolved beside the file), one optimisation profile (:func:`batch_profile`),
    and ``timing_cache`` read (when present; EngineBuildError when TensorRT refuses it) and
    written back. CUDA device ``device`` is selected before the builder is created.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    profile = batch_profile(onnx_path, max_batch)
    shapes = profile_shapes(onnx_path, profile)
    _check_precision(onnx_path, precision)
    trt = import_tensorrt()
    key = engine_key(onnx_path, precision, profile, machine_fields(device))
    set_cuda_device(device)  # the builder and its timing run on the device the key names
    logger = tensorrt_logger(verbose)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(
            f"TensorRT's ONNX parser rejected {onnx_path}: {errors}. Fix: check the graph with "
            f"`polygraphy inspect model {onnx_path}` and report the failing node."
        )
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache_path = Path(timing_cache) if timing_cache is not None else None
    cache_bytes = cache_path.read_bytes() if cache_path and cache_path.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if cache is None or not config.set_timing_cache(cache, False):
        raise EngineBuildError(
            f"TensorRT {trt.__version__} refused the timing cache {cache_path} "
            f"({len(cache_bytes)} bytes: corrupt, or written by another TensorRT build or GPU). "
            f"Fix: delete {cache_path} (it only speeds up builds) and build again."
        )
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineBuildError(
            f"TensorRT could not build an engine from {onnx_path} (precision {precision}, "
            f"profile {profile.describe()}); see the TensorRT log above. Fix: lower --max-batch "
            f"or raise the workspace."
        )
    atomic_write_bytes(engine_path, bytes(serialized))
    if cache_path is not None:
        atomic_write_bytes(cache_path, bytes(config.get_timing_cache().serialize()))
    return key


def build_engine_cached(
    onnx_path: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    stem: str,
    precision: str,
    max_batch: int,
    force: bool = False,
    device: int = 0,
    **build_kwargs: Any,
) -> tuple[Path, EngineKey]:
    """An engine for ``onnx_path`` from ``cache_dir``, built there when absent (or ``force``).

    The timing cache is ``cache_dir``'s one for this TensorRT version and GPU
    (:func:`timing_cache_path`). Returns (engine path, key).
    """
    onnx_path, cache_dir = Path(onnx_path), Path(cache_dir)
    profile = batch_profile(onnx_path, max_batch)
    _check_precision(onnx_path, precision)
    import_tensorrt()
    machine = machine_fields(device)
    key = engine_key(onnx_path, precision, profile, machine)
    path = engine_cache_path(cache_dir, key, stem, _weights_digest(onnx_path))
    cached = read_cached_key(path)
    if cached is not None and not force:
        rebuild = f"cops-export --engine trt --engine-cache {cache_dir} --rebuild-engines"
        check_engine_key(cached, key, str(path), rebuild)
        return path, cached
    build_kwargs.setdefault("timing_cache", timing_cache_path(cache_dir, machine))
    built = build_engine(onnx_path, path, precision, max_batch, device=device, **build_kwargs)
    atomic_write_bytes(_key_path(path), json.dumps(built.to_dict(), sort_keys=True).encode())
    return path, built
