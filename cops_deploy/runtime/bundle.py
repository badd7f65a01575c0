"""Bundle reader: the one directory a service loads (``manifest.json`` plus ONNX, engines, tables).

The manifest is plain JSON (sorted keys, no pickle) so a C++ consumer can read it too. Opening a
bundle checks the schema version, that every listed file stays inside the bundle directory, and
each file's size and sha256; an engine's key is checked against the machine it is about to run
on. Torch-free: stdlib and numpy only.

File roles: ``vision_onnx`` / ``head_onnx`` (the portable graphs, named in ``manifest.graphs``),
``<role>_data`` (their external data), ``vision_onnx_ort`` (optional: the vision graph with
``com.microsoft`` fused attention for ONNX Runtime, pointing into ``vision.onnx.data``),
``engine`` (TensorRT, keyed in ``manifest.engines``), ``table`` and ``torch_model``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from cops_deploy.errors import BundleError

__all__ = [
    "DTYPES",
    "HASH_CHUNK_BYTES",
    "INTERPOLATIONS",
    "MANIFEST_NAME",
    "REQUIRED_ROLES",
    "ORT_VARIANT_SUFFIX",
    "ROLE_ENGINE",
    "ROLE_HEAD_ONNX",
    "ROLE_TABLE",
    "ROLE_VISION_ONNX",
    "SCHEMA_VERSION",
    "Bundle",
    "EngineKey",
    "FileEntry",
    "GraphIO",
    "HeadCfg",
    "Manifest",
    "PreprocessCfg",
    "Provenance",
    "TensorSpec",
    "check_relative_path",
    "external_data_role",
    "ort_variant_role",
    "open_bundle",
    "sha256_file",
]

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
HASH_CHUNK_BYTES = 1 << 20

ROLE_VISION_ONNX = "vision_onnx"
ROLE_HEAD_ONNX = "head_onnx"
ROLE_ENGINE = "engine"
# Optional ONNX Runtime variant of a graph (com.microsoft fused ops), sharing the portable
# graph's external data: role "<graph>_onnx_ort", e.g. "vision_onnx_ort".
ORT_VARIANT_SUFFIX = "_onnx_ort"
ROLE_TABLE = "table"
REQUIRED_ROLES: tuple[str, ...] = (ROLE_VISION_ONNX, ROLE_HEAD_ONNX)

INTERPOLATIONS: tuple[str, ...] = ("bicubic", "bilinear", "nearest")
DTYPES: tuple[str, ...] = (
    "float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool",
)  # fmt: skip

_REEXPORT = "Fix: re-export the bundle with cops-export (do not edit manifest.json by hand)."
_REBUILD = (
    "Fix: rebuild the engine on this machine with "
    "`cops-export --engine trt --bundle {root} --force`, or open the bundle with "
    "backend='onnxruntime'."
)
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def external_data_role(role: str) -> str:
    """Role given to the external-data companion(s) of an ONNX file with role ``role``."""
    return f"{role}_data"


def ort_variant_role(graph: str) -> str:
    """Role of the ONNX Runtime variant of ``graph`` ('vision' -> 'vision_onnx_ort')."""
    return f"{graph}{ORT_VARIANT_SUFFIX}"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_relative_path(path: object, what: str = "file path") -> PurePosixPath:
    """Validate a bundle-relative POSIX path: relative, canonical, never leaving the bundle."""
    valid = "a relative POSIX path inside the bundle, e.g. 'vision.onnx' or 'tables/bias.npy'"
    if not isinstance(path, str) or not path:
        raise BundleError(f"{what} {path!r} is not a non-empty string; valid: {valid}.")
    pure = PurePosixPath(path)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", path) or path.startswith("\\"):
        raise BundleError(f"{what} {path!r} is absolute; valid: {valid}. {_REEXPORT}")
    if ".." in pure.parts:
        raise BundleError(f"{what} {path!r} escapes the bundle with '..'; valid: {valid}.")
    if "\\" in path or "\x00" in path or str(pure) != path or "." in pure.parts:
        raise BundleError(f"{what} {path!r} is not a canonical POSIX path; valid: {valid}.")
    if path == MANIFEST_NAME:
        raise BundleError(f"{what} {path!r} is reserved for the manifest; choose another name.")
    return pure


# ----------------------------------------------------------------------------------------------
# Validation helpers: every message names the dotted manifest key, the value and what is valid.

_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "int": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
    "float": (
        "a finite number",
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    ),
    "float?": (
        "a finite number or null",
        lambda v: v is None or _KINDS["float"][1](v),
    ),
    "str": ("a string", lambda v: isinstance(v, str)),
    "str?": ("a string or null", lambda v: v is None or isinstance(v, str)),
    "bool": ("true or false", lambda v: isinstance(v, bool)),
    "object": ("a JSON object", lambda v: isinstance(v, dict)),
    "list": ("a JSON list", lambda v: isinstance(v, list)),
}


def _dotted(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _bad(dotted: str, value: Any, valid: str) -> BundleError:
    return BundleError(f"manifest key '{dotted}' is {_short(value)}; valid: {valid}. {_REEXPORT}")


def _check_kind(value: Any, kind: str, dotted: str) -> Any:
    name, check = _KINDS[kind]
    if not check(value):
        raise _bad(dotted, value, name)
    if kind in ("float", "float?") and value is not None:
        return float(value)
    return value


def _object(value: Any, where: str, allowed: Iterable[str]) -> Mapping[str, Any]:
    """Check ``value`` is a JSON object whose keys are all in ``allowed``."""
    _check_kind(value, "object", where or "<manifest>")
    allowed = sorted(allowed)
    unknown = sorted(k for k in value if k not in allowed)
    if unknown:
        raise BundleError(
            f"manifest object '{where or '<manifest>'}' has unknown key(s) {unknown}; "
            f"valid keys: {allowed}. {_REEXPORT}"
        )
    return value


def _field(data: Mapping[str, Any], key: str, kind: str, where: str) -> Any:
    dotted = _dotted(where, key)
    if key not in data:
        raise BundleError(
            f"manifest key '{dotted}' is missing; a schema-{SCHEMA_VERSION} manifest needs it. "
            f"{_REEXPORT}"
        )
    return _check_kind(data[key], kind, dotted)


def _require(ok: bool, dotted: str, value: Any, valid: str) -> None:
    if not ok:
        raise _bad(dotted, value, valid)


def _require_sha(sha: str | None, dotted: str, optional: bool = False) -> None:
    ok = (optional and sha is None) or (isinstance(sha, str) and bool(_SHA256_RE.match(sha)))
    _require(ok, dotted, sha, "64 lowercase hex digits" + (" or null" if optional else ""))


def _keys_of(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


# ----------------------------------------------------------------------------------------------
# Manifest parts


@dataclass(frozen=True)
class FileEntry:
    """One file of the bundle: its bundle-relative POSIX path, sha256, size in bytes and role."""

    path: str
    sha256: str
    size: int
    role: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"path": self.path, "sha256": self.sha256, "size": self.size, "role": self.role}

    @classmethod
    def from_dict(cls, data: Any, where: str = "files") -> FileEntry:
        """Parse and validate; raises BundleError naming the offending key."""
        data = _object(data, where, _keys_of(cls))
        path = _field(data, "path", "str", where)
        check_relative_path(path, f"manifest key '{_dotted(where, 'path')}'")
        sha = _field(data, "sha256", "str", where)
        _require_sha(sha, _dotted(where, "sha256"))
        size = _field(data, "size", "int", where)
        _require(size >= 0, _dotted(where, "size"), size, "a byte count >= 0")
        role = _field(data, "role", "str", where)
        _require(bool(role), _dotted(where, "role"), role, "a non-empty role name")
        return cls(path=path, sha256=sha, size=size, role=role)


@dataclass(frozen=True)
class EngineKey:
    """What a TensorRT engine is tied to; an engine runs only where every field matches."""

    onnx_sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    precision: str
    profile: str

    def first_mismatch(self, current: EngineKey) -> str | None:
        """Name of the first field (in declaration order) that differs from ``current``."""
        for f in fields(self):
            if getattr(self, f.name) != getattr(current, f.name):
                return f.name
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "engines") -> EngineKey:
        """Parse and validate; raises BundleError naming the offending key."""
        data = _object(data, where, _keys_of(cls))
        values = {name: _field(data, name, "str", where) for name in _keys_of(cls)}
        _require_sha(values["onnx_sha256"], _dotted(where, "onnx_sha256"))
        return cls(**values)


@dataclass(frozen=True)
class PreprocessCfg:
    """Image preprocessing that travels with the weights: square size, mean, std, interpolation."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "preprocess") -> PreprocessCfg:
        """Parse and validate; raises BundleError naming the offending key."""
        data = _object(data, where, _keys_of(cls))
        size = _field(data, "size", "int", where)
        _require(size > 0, _dotted(where, "size"), size, "a positive integer (pixels)")
        triples = {}
        for key in ("mean", "std"):
            dotted = _dotted(where, key)
            raw = _field(data, key, "list", where)
            _require(len(raw) == 3, dotted, raw, "a list of 3 numbers (R, G, B)")
            triples[key] = tuple(
                _check_kind(v, "float", f"{dotted}[{i}]") for i, v in enumerate(raw)
            )
        std = triples["std"]
        _require(all(s > 0 for s in std), _dotted(where, "std"), list(std), "3 numbers > 0")
        interp = _field(data, "interpolation", "str", where)
        _require(
            interp in INTERPOLATIONS, _dotted(where, "interpolation"), interp, str(INTERPOLATIONS)
        )
        return cls(size=size, mean=triples["mean"], std=triples["std"], interpolation=interp)


@dataclass(frozen=True)
class HeadCfg:
    """Scoring-head parameters (METHOD.md): SAGA alpha, score beta, blur sigma, R, tau, kernel."""

    alpha: float
    beta: float
    sigma: float
    R: int
    tau: float
    kernel: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "head") -> HeadCfg:
        """Parse and validate; raises BundleError naming the offending key."""
        data = _object(data, where, _keys_of(cls))
        v = {k: _field(data, k, "float", where) for k in ("alpha", "beta", "sigma", "tau")}
        v.update({k: _field(data, k, "int", where) for k in ("R", "kernel")})
        for key in ("alpha", "beta"):
            _require(0.0 <= v[key] <= 1.0, _dotted(where, key), v[key], "a number in [0, 1]")
        _require(v["sigma"] >= 0, _dotted(where, "sigma"), v["sigma"], "a number >= 0")
        _require(v["tau"] > 0, _dotted(where, "tau"), v["tau"], "a number > 0")
        _require(v["R"] >= 1, _dotted(where, "R"), v["R"], "an integer >= 1")
        k = v["kernel"]
        _require(k >= 1 and k % 2 == 1, _dotted(where, "kernel"), k, "an odd integer >= 1")
        return cls(**v)


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, dtype name and shape (ints, or strings for dynamic dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> TensorSpec:
        """Parse and validate; raises BundleError naming the offending key."""
        data = _object(data, where, _keys_of(cls))
        name = _field(data, "name", "str", where)
        _require(bool(name), _dotted(where, "name"), name, "a non-empty tensor name")
        dtype = _field(data, "dtype", "str", where)
        _require(dtype in DTYPES, _dotted(where, "dtype"), dtype, str(DTYPES))
        raw = _field(data, "shape", "list", where)
        for i, dim in enumerate(raw):
            ok = (isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0) or (
                isinstance(dim, str) and bool(dim)
            )
            _require(ok, f"{_dotted(where, 'shape')}[{i}]", dim, "an int >= 0 or a dim name")
        return cls(name=name, dtype=dtype, shape=tuple(raw))


@dataclass(frozen=True)
class GraphIO:
    """One ONNX graph of the bundle: its file (bundle-relative path), inputs and outputs."""

    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "file": self.file,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str) -> GraphIO:
        """Parse and validate; raises BundleError naming the offending key."""
        data = _object(data, where, _keys_of(cls))
        file = _field(data, "file", "str", where)
        check_relative_path(file, f"manifest key '{_dotted(where, 'file')}'")
        specs: dict[str, tuple[TensorSpec, ...]] = {}
        for key in ("inputs", "outputs"):
            dotted = _dotted(where, key)
            raw = _field(data, key, "list", where)
            specs[key] = tuple(TensorSpec.from_dict(t, f"{dotted}[{i}]") for i, t in enumerate(raw))
        names = [t.name for t in specs["inputs"] + specs["outputs"]]
        dupes = sorted({n for n in names if names.count(n) > 1})
        _require(not dupes, where, dupes, "unique tensor names across inputs and outputs")
        return cls(file=file, inputs=specs["inputs"], outputs=specs["outputs"])


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from: checkpoint and CLIP sha256, or random weights (smoke bundle)."""

    random_weights: bool
    checkpoint_sha256: str | None = None
    clip_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Any, where: str = "provenance") -> Provenance:
        """Parse and validate; raises BundleError naming the offending key."""
        data = _object(data, where, _keys_of(cls))
        random_weights = _field(data, "random_weights", "bool", where)
        hashes = {k: _field(data, k, "str?", where) for k in ("checkpoint_sha256", "clip_sha256")}
        for key, sha in hashes.items():
            _require_sha(sha, _dotted(where, key), optional=True)
        if not random_weights and all(sha is None for sha in hashes.values()):
            raise _bad(where, dict(data), "random_weights true, or at least one weight hash set")
        return cls(random_weights=random_weights, **hashes)


def _check_json_value(value: Any, dotted: str) -> Any:
    """Refuse NaN/inf and non-JSON types (parity figures and model config must be strict JSON)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise _bad(dotted, value, f"strict JSON (no NaN/inf, no objects): {exc}") from exc
    return value


@dataclass(frozen=True)
class Manifest:
    """The whole ``manifest.json``: everything a service needs besides the files it lists."""

    schema_version: int
    package_version: str
    model_config: dict[str, Any]
    preprocess: PreprocessCfg
    head: HeadCfg
    graphs: dict[str, GraphIO]
    files: tuple[FileEntry, ...]
    provenance: Provenance
    engines: dict[str, EngineKey]
    parity: dict[str, Any]
    threshold: float | None
    created: str
    tool_versions: dict[str, str]

    def file(self, path: str) -> FileEntry:
        """The entry listed under ``path``; BundleError naming the listed paths if absent."""
        for entry in self.files:
            if entry.path == path:
                return entry
        listed = [e.path for e in self.files]
        raise BundleError(f"file {path!r} is not listed in the manifest; listed files: {listed}.")

    def with_role(self, role: str) -> list[FileEntry]:
        """Entries whose role is ``role``, in manifest order."""
        return [e for e in self.files if e.role == role]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the writer dumps it with sorted keys)."""
        return {
            "schema_version": self.schema_version,
            "package_version": self.package_version,
            "model_config": self.model_config,
            "preprocess": self.preprocess.to_dict(),
            "head": self.head.to_dict(),
            "graphs": {k: g.to_dict() for k, g in self.graphs.items()},
            "files": [e.to_dict() for e in self.files],
            "provenance": self.provenance.to_dict(),
            "engines": {k: e.to_dict() for k, e in self.engines.items()},
            "parity": self.parity,
            "threshold": self.threshold,
            "created": self.created,
            "tool_versions": self.tool_versions,
        }

    def to_json(self) -> str:
        """Strict JSON text, sorted keys, 2-space indent, trailing newline."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Parse and validate a manifest; raises BundleError naming the offending key."""
        _check_kind(data, "object", "<manifest>")
        _check_schema_version(data)
        data = _object(data, "", _keys_of(cls))
        files = _parse_files(_field(data, "files", "list", ""))
        graphs = {
            name: GraphIO.from_dict(g, _dotted("graphs", name))
            for name, g in _field(data, "graphs", "object", "").items()
        }
        engines = {
            name: EngineKey.from_dict(e, _dotted("engines", name))
            for name, e in _field(data, "engines", "object", "").items()
        }
        tool_versions = _field(data, "tool_versions", "object", "")
        for name, version in tool_versions.items():
            _check_kind(version, "str", _dotted("tool_versions", name))
        manifest = cls(
            schema_version=data["schema_version"],
            package_version=_field(data, "package_version", "str", ""),
            model_config=_check_json_value(
                _field(data, "model_config", "object", ""), "model_config"
            ),
            preprocess=PreprocessCfg.from_dict(_field(data, "preprocess", "object", "")),
            head=HeadCfg.from_dict(_field(data, "head", "object", "")),
            graphs=graphs,
            files=files,
            provenance=Provenance.from_dict(_field(data, "provenance", "object", "")),
            engines=engines,
            parity=_check_json_value(_field(data, "parity", "object", ""), "parity"),
            threshold=_field(data, "threshold", "float?", ""),
            created=_field(data, "created", "str", ""),
            tool_versions=dict(tool_versions),
        )
        manifest._check_references()
        return manifest

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        """Parse manifest JSON text (see ``from_dict``)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(
                f"{MANIFEST_NAME} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                f"column {exc.colno}). {_REEXPORT}"
            ) from exc
        return cls.from_dict(data)

    def _check_references(self) -> None:
        listed = {e.path for e in self.files}
        for name, graph in self.graphs.items():
            _require(
                graph.file in listed,
                _dotted(_dotted("graphs", name), "file"),
                graph.file,
                f"one of the listed files {sorted(listed)}",
            )
        for name in self.engines:
            _require(
                name in listed, _dotted("engines", name), name, f"a listed file {sorted(listed)}"
            )


def _check_schema_version(data: Mapping[str, Any]) -> None:
    version = _field(data, "schema_version", "int", "")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"manifest schema_version {version} is newer than this cops-deploy reads "
            f"(schema_version {SCHEMA_VERSION}). Fix: upgrade cops-deploy, or re-export the "
            f"bundle with this version's cops-export."
        )
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"manifest schema_version {version} is unknown; this cops-deploy reads "
            f"schema_version {SCHEMA_VERSION}. {_REEXPORT}"
        )


def _parse_files(raw: list[Any]) -> tuple[FileEntry, ...]:
    entries = tuple(FileEntry.from_dict(e, f"files[{i}]") for i, e in enumerate(raw))
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        _require(entry.path not in seen, f"files[{i}].path", entry.path, "a path listed once")
        seen.add(entry.path)
    return entries


# ----------------------------------------------------------------------------------------------
# Opening a bundle


@dataclass(frozen=True)
class Bundle:
    """An opened bundle: its directory, its parsed manifest, and whether hashes were verified."""

    root: Path
    manifest: Manifest
    verified: bool

    def path_of(self, role_or_name: str) -> Path:
        """Absolute path of the file listed as ``role_or_name`` (a file path, else a role)."""
        for entry in self.manifest.files:
            if entry.path == role_or_name:
                return self.root / entry.path
        matches = self.manifest.with_role(role_or_name)
        if len(matches) == 1:
            return self.root / matches[0].path
        if matches:
            raise BundleError(
                f"role {role_or_name!r} names {len(matches)} files in bundle {self.root}: "
                f"{[e.path for e in matches]}. Fix: ask for one of these file names instead."
            )
        roles = sorted({e.role for e in self.manifest.files})
        names = [e.path for e in self.manifest.files]
        raise BundleError(
            f"bundle {self.root} has no file or role {role_or_name!r}; roles: {roles}; "
            f"files: {names}."
        )

    def paths_with_role(self, role: str) -> list[Path]:
        """Absolute paths of every file with ``role`` (possibly none)."""
        return [self.root / e.path for e in self.manifest.with_role(role)]

    def load_array(self, role_or_name: str) -> np.ndarray:
        """Load a listed ``.npy`` table (pickle refused)."""
        path = self.path_of(role_or_name)
        try:
            return np.load(path, allow_pickle=False)
        except ValueError as exc:
            raise BundleError(
                f"bundle file {path} is not a pickle-free .npy array ({exc}). {_REEXPORT}"
            ) from exc

    def ort_variant(self, graph: str) -> Path | None:
        """Path of the ONNX Runtime variant of ``graph`` (fused contrib ops, same weights as the
        portable graph), or None when the bundle has none."""
        matches = self.manifest.with_role(ort_variant_role(graph))
        if len(matches) > 1:
            raise BundleError(
                f"bundle {self.root} lists {len(matches)} ONNX Runtime variants of graph "
                f"{graph!r}: {[e.path for e in matches]}; valid: at most one. {_REEXPORT}"
            )
        return self.root / matches[0].path if matches else None

    def engine_key(self, engine: str | None = None) -> tuple[str, EngineKey]:
        """(file path, key) of ``engine`` (a listed engine path or role); None: the only engine."""
        engines = self.manifest.engines
        if engine is None:
            if len(engines) != 1:
                raise BundleError(
                    f"bundle {self.root} lists {len(engines)} engines {sorted(engines)}; "
                    f"pass engine= one of them."
                )
            return next(iter(engines.items()))
        if engine in engines:
            name = engine
        else:
            name = self.path_of(engine).relative_to(self.root).as_posix()
        if name not in engines:
            raise BundleError(
                f"bundle {self.root} has no engine key for {engine!r}; engines: {sorted(engines)}."
            )
        return name, engines[name]

    def check_engine_key(self, current: EngineKey, engine: str | None = None) -> Path:
        """Path of the engine if its key matches ``current``; else BundleError naming the field
        (the message of :func:`cops_deploy.runtime.backends.tensorrt.check_engine_key`)."""
        # Imported here: the backends package imports this module at its top.
        from cops_deploy.runtime.backends.tensorrt import check_engine_key

        name, stored = self.engine_key(engine)
        rebuild = f"cops-export --engine trt --bundle {self.root} --force"
        check_engine_key(stored, current, f"{name!r} in bundle {self.root}", rebuild)
        return self.root / name


def open_bundle(
    path: str | os.PathLike[str],
    verify: bool = True,
    required_roles: Iterable[str] = REQUIRED_ROLES,
) -> Bundle:
    """Open and check a bundle directory.

    Always checks the manifest, path containment, presence and size of every listed file and
    the required roles; with ``verify`` also each file's sha256 (streamed).
    """
    root = Path(path)
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(
            f"bundle directory {root} does not exist or is not a directory. Fix: pass the "
            f"directory written by cops-export (it holds {MANIFEST_NAME})."
        )
    if not manifest_path.is_file():
        raise BundleError(
            f"bundle {root} has no {MANIFEST_NAME}; it is not a bundle or the export was "
            f"interrupted. {_REEXPORT}"
        )
    try:
        manifest = Manifest.from_json(manifest_path.read_text(encoding="utf-8"))
    except BundleError as exc:
        raise BundleError(f"bundle {root}: {exc}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}. {_REEXPORT}") from exc
    _check_required_roles(root, manifest, required_roles)
    real_root = root.resolve()
    for entry in manifest.files:
        _check_file(root, real_root, entry, verify)
    return Bundle(root=root, manifest=manifest, verified=verify)


def _check_required_roles(root: Path, manifest: Manifest, required: Iterable[str]) -> None:
    present = {e.role for e in manifest.files}
    missing = [r for r in required if r not in present]
    if missing:
        raise BundleError(
            f"bundle {root} lists no file with required role(s) {missing}; roles present: "
            f"{sorted(present)}. {_REEXPORT}"
        )


def _check_file(root: Path, real_root: Path, entry: FileEntry, verify: bool) -> None:
    target = root / entry.path
    real = target.resolve()
    if not real.is_relative_to(real_root):
        raise BundleError(
            f"bundle {root}: file {entry.path!r} resolves to {real}, outside the bundle "
            f"directory (a symlink leaving the bundle?). Fix: copy the file into the bundle "
            f"and re-export; a bundle never points outside itself."
        )
    if not real.is_file():
        raise BundleError(
            f"bundle {root}: listed file {entry.path!r} (role {entry.role!r}) is missing. "
            f"Fix: copy the whole bundle directory again, or re-export it."
        )
    size = real.stat().st_size
    if size != entry.size:
        raise BundleError(
            f"bundle {root}: file {entry.path!r} has {size} bytes, the manifest expects "
            f"{entry.size} (truncated or replaced). Fix: copy the bundle again, or re-export it."
        )
    if verify:
        actual = sha256_file(real)
        if actual != entry.sha256:
            raise BundleError(
                f"bundle {root}: file {entry.path!r} has sha256 {actual}, the manifest expects "
                f"{entry.sha256} (corrupted or tampered with). Fix: copy the bundle again, or "
                f"re-export it."
            )
