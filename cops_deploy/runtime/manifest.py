"""Bundle manifest: the dataclasses of ``manifest.json`` and its parsing against the schema.

The format is declared once, in ``manifest.schema.json`` (JSON Schema draft 2020-12) beside this
module; the C++ consumer reads the same file. :meth:`Manifest.from_json` validates with the
``jsonschema`` library and turns the most relevant error into a :class:`BundleError` naming the
dotted manifest key (``graphs.vision.inputs[0].dtype``), the value given, what the schema allows
and the fix. What a schema cannot say is checked here in code: ``model_config`` is a valid CoPS
config, ``preprocess`` equals ``model_config.preprocess``, graph files and engines are listed
files, each path is listed once, tensor names are unique within a graph. Path safety, the files
themselves and the vision input size are checked when a bundle is opened
(:mod:`cops_deploy.runtime.bundle`). Torch-free.

File roles: ``vision_onnx`` / ``head_onnx`` (the portable graphs, named in ``manifest.graphs``),
``<role>_data`` (their external data), ``vision_onnx_ort`` (optional: the vision graph with
``com.microsoft`` fused attention for ONNX Runtime, pointing into ``vision.onnx.data``),
``engine`` (TensorRT, keyed in ``manifest.engines``), ``table`` and ``torch_model``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from cops_deploy.configs import PreprocessCfg, config_from_dict
from cops_deploy.errors import BundleError, ConfigError, MissingDependencyError
from cops_deploy.extras import install_command

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError

__all__ = [
    "DTYPES",
    "FIX_RECALIBRATE",
    "FIX_REEXPORT",
    "INTERPOLATIONS",
    "MANIFEST_NAME",
    "MAX_DEPTH",
    "ORT_VARIANT_SUFFIX",
    "REQUIRED_ROLES",
    "ROLE_CALIBRATION",
    "ROLE_ENGINE",
    "ROLE_HEAD_ONNX",
    "ROLE_TABLE",
    "ROLE_VISION_ONNX",
    "SCHEMA_PATH",
    "SCHEMA_VERSION",
    "Calibration",
    "EngineKey",
    "FileEntry",
    "GraphIO",
    "ImageSetRecord",
    "Manifest",
    "PreprocessCfg",
    "Provenance",
    "TensorSpec",
    "ThresholdRecord",
    "check_relative_path",
    "external_data_role",
    "load_schema",
    "ort_variant_role",
    "check_engine_key",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")
MAX_DEPTH = 32  # JSON nesting a manifest may have (a valid one needs 6); deeper is refused

ROLE_VISION_ONNX = "vision_onnx"
ROLE_HEAD_ONNX = "head_onnx"
ROLE_ENGINE = "engine"
# Optional ONNX Runtime variant of a graph (com.microsoft fused ops), sharing the portable
# graph's external data: role "<graph>_onnx_ort", e.g. "vision_onnx_ort".
ORT_VARIANT_SUFFIX = "_onnx_ort"
ROLE_TABLE = "table"
# The calibration record (cops calibrate): a JSON file listed like any other, content-addressed
# name 'calibration-<sha256 prefix>.json' so that re-calibrating never rewrites a listed file.
ROLE_CALIBRATION = "calibration"
REQUIRED_ROLES: tuple[str, ...] = (ROLE_VISION_ONNX, ROLE_HEAD_ONNX)

FIX_REEXPORT = "Fix: re-export the bundle with cops-export (do not edit manifest.json by hand)."


def load_schema() -> dict[str, Any]:
    """The manifest's JSON Schema (a fresh copy of ``manifest.schema.json``)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


_SCHEMA = load_schema()
SCHEMA_VERSION: int = _SCHEMA["properties"]["schema_version"]["const"]
INTERPOLATIONS: tuple[str, ...] = tuple(
    _SCHEMA["$defs"]["preprocess"]["properties"]["interpolation"]["enum"]
)
DTYPES: tuple[str, ...] = tuple(_SCHEMA["$defs"]["tensor_spec"]["properties"]["dtype"]["enum"])


def external_data_role(role: str) -> str:
    """Role given to the external-data companion(s) of an ONNX file with role ``role``."""
    return f"{role}_data"


def ort_variant_role(graph: str) -> str:
    """Role of the ONNX Runtime variant of ``graph`` ('vision' -> 'vision_onnx_ort')."""
    return f"{graph}{ORT_VARIANT_SUFFIX}"


def check_relative_path(path: object, what: str = "file path") -> PurePosixPath:
    """Validate a bundle-relative POSIX path: relative, canonical, never leaving the bundle."""
    valid = "a relative POSIX path inside the bundle, e.g. 'vision.onnx' or 'tables/bias.npy'"
    if not isinstance(path, str) or not path:
        raise BundleError(f"{what} {path!r} is not a non-empty string; valid: {valid}.")
    pure = PurePosixPath(path)
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", path) or path.startswith("\\"):
        raise BundleError(f"{what} {path!r} is absolute; valid: {valid}. {FIX_REEXPORT}")
    if ".." in pure.parts:
        raise BundleError(f"{what} {path!r} escapes the bundle with '..'; valid: {valid}.")
    if "\\" in path or "\x00" in path or str(pure) != path or "." in pure.parts:
        raise BundleError(f"{what} {path!r} is not a canonical POSIX path; valid: {valid}.")
    if path == MANIFEST_NAME:
        raise BundleError(f"{what} {path!r} is reserved for the manifest; choose another name.")
    return pure


# ----------------------------------------------------------------------------------------------
# Schema validation


def _is_number(checker: Any, instance: Any) -> bool:
    """JSON numbers are finite: Python's json reads NaN and Infinity, the manifest refuses them."""
    base = isinstance(instance, int | float) and not isinstance(instance, bool)
    return base and not (isinstance(instance, float) and not math.isfinite(instance))


def _is_integer(checker: Any, instance: Any) -> bool:
    """Integers are written as integers: 518, not 518.0 (JSON Schema would accept 518.0, but the
    runtime passes sizes and dims to code that needs a Python int)."""
    return isinstance(instance, int) and not isinstance(instance, bool)


@functools.cache
def _jsonschema() -> tuple[Any, Any, Any]:
    """(validator class, relevance key, best_match), imported on first use: only parsing a
    manifest needs jsonschema, not the contract's TensorSpec (the GPU check runs without it)."""
    try:
        from jsonschema import Draft202012Validator, validators
        from jsonschema.exceptions import best_match, by_relevance
    except ImportError as exc:
        raise MissingDependencyError(
            f"reading a bundle manifest needs the 'jsonschema' package, a dependency of "
            f"cops-deploy that is missing here ({exc}). Fix: {install_command('cpu')}"
        ) from exc
    validator = validators.extend(
        Draft202012Validator,
        type_checker=Draft202012Validator.TYPE_CHECKER.redefine_many(
            {"number": _is_number, "integer": _is_integer}
        ),
    )
    # Of several errors, report the shallowest (what is wrong "more"), a type error before a
    # value error at the same key, and the provenance rule ('not') last.
    relevance = by_relevance(weak=frozenset({"anyOf", "oneOf", "not"}), strong=frozenset({"type"}))
    return validator, relevance, best_match


_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a finite number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a JSON object",
    "array": "a JSON list",
    "null": "null",
}


@functools.cache
def _validator(part: str | None) -> Any:
    """Validator for the whole manifest (``part`` None) or one of the schema's ``$defs``."""
    validator = _jsonschema()[0]
    if part is None:
        return validator(_SCHEMA)
    return validator(
        {"$schema": _SCHEMA["$schema"], "$defs": _SCHEMA["$defs"], "$ref": f"#/$defs/{part}"}
    )


def _dotted(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else str(key)


def _dotted_path(where: str, path: Iterable[str | int]) -> str:
    for key in path:
        where = _dotted(where, key)
    return where


def _clip(text: str) -> str:
    return text if len(text) <= 80 else text[:77] + "..."


def _short(value: Any) -> str:
    return _clip(repr(value))


def _bad(key: str, value: Any, valid: str) -> BundleError:
    return BundleError(
        f"manifest key '{key or '<manifest>'}' is {_short(value)}; valid: {valid}. {FIX_REEXPORT}"
    )


def _valid_phrase(error: ValidationError) -> str:
    """What the schema allows where ``error`` happened, in words."""
    kind, value, schema = error.validator, error.validator_value, error.schema
    description = str(schema.get("description", "")).rstrip(".") if isinstance(schema, dict) else ""
    if kind == "type":
        types = [value] if isinstance(value, str) else list(value)
        if len(types) > 2 and description:  # e.g. "any JSON value (numbers finite)"
            return description
        return " or ".join(_TYPE_WORDS.get(t, t) for t in types)
    if kind == "enum":
        return f"one of {list(value)}"
    if kind == "const":
        return f"exactly {json.dumps(value)}"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if kind in bounds:
        return f"a number {bounds[kind]} {value}"
    if kind == "minLength" and value == 1:
        return "a non-empty string"
    if kind in ("minItems", "maxItems"):
        low, high = schema.get("minItems"), schema.get("maxItems")
        if low is not None and low == high:
            return f"a list of exactly {low} items"
        return f"a list of at least {low} items" if kind == "minItems" else f"at most {high} items"
    if kind == "pattern":
        return f"{description} (pattern {value})" if description else f"a string matching {value}"
    return description or error.message


def _schema_error(error: ValidationError, where: str) -> BundleError:
    """One jsonschema error as a BundleError that names the dotted key, the value, what is valid
    and the fix."""
    key = _dotted_path(where, error.absolute_path)
    instance = error.instance
    if error.validator == "required" and isinstance(instance, Mapping):
        missing = [k for k in error.validator_value if k not in instance]
        names = ", ".join(f"'{_dotted(key, k)}'" for k in missing)
        verb, it = (f"key {names} is", "it") if len(missing) == 1 else (f"keys {names} are", "them")
        return BundleError(
            f"manifest {verb} missing; a schema-{SCHEMA_VERSION} manifest needs {it}. "
            f"{FIX_REEXPORT}"
        )
    if error.validator == "additionalProperties" and isinstance(instance, Mapping):
        allowed = sorted(error.schema.get("properties", {}))
        unknown = sorted((k for k in instance if k not in allowed), key=str)
        return BundleError(
            f"manifest object '{key or '<manifest>'}' has unknown key(s) {unknown}; valid "
            f"keys: {allowed}. {FIX_REEXPORT}"
        )
    return _bad(key, instance, _valid_phrase(error))


def _check_nesting(data: Any, where: str) -> None:
    """Refuse nesting deeper than MAX_DEPTH (the schema validator recurses) and non-string object
    keys, walking iteratively so no input can exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(data, where, 0)]
    while stack:
        node, key, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BundleError(
                f"manifest key '{_clip(key)}' nests more than {MAX_DEPTH} levels deep; "
                f"valid: at most {MAX_DEPTH} (a manifest needs 6). {FIX_REEXPORT}"
            )
        if isinstance(node, Mapping):
            for name, child in node.items():
                if not isinstance(name, str):
                    raise BundleError(
                        f"manifest object '{_clip(key) or '<manifest>'}' has the key {name!r}, "
                        f"which is not a string; valid: string keys (JSON). {FIX_REEXPORT}"
                    )
                stack.append((child, _dotted(key, name), depth + 1))
        elif isinstance(node, list | tuple):
            stack.extend((child, _dotted(key, i), depth + 1) for i, child in enumerate(node))


def _validate(data: Any, part: str | None = None, where: str = "") -> None:
    """Validate ``data`` against the schema (or its ``$defs/part``); BundleError on the first
    (most relevant) error."""
    _check_nesting(data, where)
    _, relevance, best_match = _jsonschema()
    error = best_match(_validator(part).iter_errors(data), key=relevance)
    if error is not None:
        raise _schema_error(error, where)


def _check_schema_version(data: Any) -> None:
    """Refuse another format version with its own message (a schema error would say less)."""
    version = data.get("schema_version") if isinstance(data, Mapping) else None
    if not isinstance(version, int) or isinstance(version, bool) or version == SCHEMA_VERSION:
        return  # a wrong type or a missing key is the schema's to report
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"manifest schema_version {version} is newer than this cops-deploy reads "
            f"(schema_version {SCHEMA_VERSION}). Fix: upgrade cops-deploy, or re-export the "
            f"bundle with this version's cops-export."
        )
    if version == 1:
        raise BundleError(
            f"manifest schema_version 1 is an older format this cops-deploy no longer reads "
            f"(it reads schema_version {SCHEMA_VERSION}: preprocess derived from model_config, "
            f"no 'head' section). Fix: re-export the bundle with this version's cops-export."
        )
    raise BundleError(
        f"manifest schema_version {version} is unknown; this cops-deploy reads "
        f"schema_version {SCHEMA_VERSION}. {FIX_REEXPORT}"
    )


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
        """Parse and validate against the schema's ``engine_key``; BundleError naming the key."""
        _validate(data, "engine_key", where)
        return cls(**data)


def check_engine_key(
    stored: EngineKey,
    current: EngineKey,
    engine: str,
    rebuild: str = "cops-export --engine trt --force",
) -> None:
    """Refuse an engine whose key ``stored`` differs from ``current`` (this machine's): a
    BundleError naming the first differing field, both values and the fix.

    Args:
        stored: the key recorded with the engine.
        current: the key an engine must carry here (:func:`expected_engine_key`).
        engine: how the message names the engine (a path, or a name in a bundle).
        rebuild: the command that rebuilds it here.
    """
    field = stored.first_mismatch(current)
    if field is None:
        return
    raise BundleError(
        f"engine {engine} does not fit this machine: it was built for "
        f"{field}={getattr(stored, field)!r}, here {field}={getattr(current, field)!r} (engines "
        f"are tied to the ONNX graph, TensorRT version, GPU, precision and profile). Fix: "
        f"rebuild it on this machine with `{rebuild}`, or run the ONNX graphs with "
        f"backend='onnxruntime'."
    )


@dataclass(frozen=True)
class TensorSpec:
    """A graph input or output: name, dtype name and shape (ints, or strings for dynamic dims)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


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


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from: checkpoint and CLIP sha256, or random weights (smoke bundle)."""

    random_weights: bool
    checkpoint_sha256: str | None = None
    clip_sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _preprocess(data: Mapping[str, Any]) -> PreprocessCfg:
    """A schema-valid preprocess object as the config class (numbers as floats)."""
    return PreprocessCfg(
        size=data["size"],
        interpolation=data["interpolation"],
        mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
        std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
    )


def _preprocess_dict(pre: PreprocessCfg) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(pre).items()}


def _graph(data: Mapping[str, Any]) -> GraphIO:
    def specs(key: str) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data[key])

    return GraphIO(file=data["file"], inputs=specs("inputs"), outputs=specs("outputs"))


# ----------------------------------------------------------------------------------------------
# The manifest


@dataclass(frozen=True)
class Manifest:
    """The whole ``manifest.json``: everything a service needs besides the files it lists.

    ``preprocess`` is derived from ``model_config`` (always equal to
    ``model_config["preprocess"]``); the scoring-head parameters are ``model_config["head"]``,
    informative only (they are baked into head.onnx).
    """

    schema_version: int
    package_version: str
    model_config: dict[str, Any]
    preprocess: PreprocessCfg
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
            "preprocess": _preprocess_dict(self.preprocess),
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
        """Parse and validate a manifest; raises BundleError naming the offending key.

        Whatever the shape of ``data`` (nesting, types, huge numbers), the only error raised is
        a BundleError: a Python error that escapes a check (e.g. OverflowError on an integer too
        large for a float) becomes one, with the original chained.
        """
        try:
            return cls._parse(data)
        except BundleError:
            raise
        except (
            TypeError,
            ValueError,
            KeyError,
            AttributeError,
            OverflowError,
            RecursionError,
        ) as exc:
            raise BundleError(
                f"{MANIFEST_NAME} cannot be read ({type(exc).__name__}: {_short(str(exc))}); "
                f"valid: a manifest as manifest.schema.json describes, with numbers a float can "
                f"hold. {FIX_REEXPORT}"
            ) from exc

    @classmethod
    def _parse(cls, data: Any) -> Manifest:
        _check_schema_version(data)
        _validate(data)
        threshold = data["threshold"]
        manifest = cls(
            schema_version=data["schema_version"],
            package_version=data["package_version"],
            model_config=data["model_config"],
            preprocess=_preprocess(data["preprocess"]),
            graphs={name: _graph(g) for name, g in data["graphs"].items()},
            files=tuple(FileEntry(**e) for e in data["files"]),
            provenance=Provenance(**data["provenance"]),
            engines={name: EngineKey(**k) for name, k in data["engines"].items()},
            parity=data["parity"],
            threshold=None if threshold is None else float(threshold),
            created=data["created"],
            tool_versions=dict(data["tool_versions"]),
        )
        manifest._check_model_config()
        manifest._check_references()
        return manifest

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        """Parse manifest JSON text (bytes must be UTF-8; see ``from_dict``)."""
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BundleError(
                    f"{MANIFEST_NAME} is not UTF-8 text (byte {text[exc.start]:#04x} at offset "
                    f"{exc.start}); valid: UTF-8 JSON. {FIX_REEXPORT}"
                ) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BundleError(
                f"{MANIFEST_NAME} is not valid JSON ({exc.msg} at line {exc.lineno}, "
                f"column {exc.colno}). {FIX_REEXPORT}"
            ) from exc
        except (ValueError, RecursionError) as exc:  # an integer too long; nesting too deep
            raise BundleError(
                f"{MANIFEST_NAME} cannot be parsed ({type(exc).__name__}: {_short(str(exc))}); "
                f"valid: JSON nested at most {MAX_DEPTH} levels, integers of at most a few "
                f"thousand digits. {FIX_REEXPORT}"
            ) from exc
        return cls.from_dict(data)

    def _check_model_config(self) -> None:
        """model_config is a valid CoPS config and preprocess is derived from it."""
        try:
            cfg = config_from_dict(self.model_config)
        except ConfigError as exc:
            raise BundleError(
                f"manifest key 'model_config' is not a valid CoPS config: {exc}. {FIX_REEXPORT}"
            ) from exc
        derived = _preprocess(dataclasses.asdict(cfg.preprocess))
        for f in fields(PreprocessCfg):
            mine, theirs = getattr(self.preprocess, f.name), getattr(derived, f.name)
            if mine != theirs:
                raise BundleError(
                    f"manifest key 'preprocess.{f.name}' is {_short(mine)} but "
                    f"'model_config.preprocess.{f.name}' is {_short(theirs)}; valid: preprocess "
                    f"equal to model_config.preprocess (it is derived from it). {FIX_REEXPORT}"
                )

    def _check_references(self) -> None:
        """Paths canonical, inside the bundle and listed once; graph files and engines listed; tensor names unique."""
        seen: set[str] = set()
        for i, entry in enumerate(self.files):
            check_relative_path(entry.path, f"manifest key 'files[{i}].path'")
            if entry.path in seen:
                raise _bad(f"files[{i}].path", entry.path, "a path listed once")
            seen.add(entry.path)
        listed = sorted(seen)
        for name, graph in self.graphs.items():
            if graph.file not in seen:
                raise _bad(f"graphs.{name}.file", graph.file, f"one of the listed files {listed}")
            names = [t.name for t in graph.inputs + graph.outputs]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise _bad(f"graphs.{name}", dupes, "unique tensor names across inputs and outputs")
        for name in self.engines:
            if name not in seen:
                raise _bad(f"engines.{name}", name, f"a listed file {listed}")


# ----------------------------------------------------------------------------------------------
# The calibration record (a listed file of role 'calibration'; written by cops calibrate)

FIX_RECALIBRATE = "Fix: run `cops calibrate` on the bundle again (do not edit the record by hand)."


@dataclass(frozen=True)
class ThresholdRecord:
    """One calibrated threshold: ``value >= threshold`` decides 'anomalous' (or 'defective').

    Attributes:
        threshold: the threshold.
        method: 'fpr' (target false-positive rate on normal values) or 'f1' (F1-optimal on
            labelled values).
        target_fpr: the target rate for 'fpr', None for 'f1'.
        achieved: what the threshold gives on the calibration values (fpr, tpr, f1, counts).
    """

    threshold: float
    method: str
    target_fpr: float | None
    achieved: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ImageSetRecord:
    """A calibration image set: its count and the sha256 of its sorted (path, sha256) list."""

    count: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"count": self.count, "sha256": self.sha256}


@dataclass(frozen=True)
class Calibration:
    """The calibration record of a bundle (schema ``$defs/calibration``).

    Attributes:
        image: the image threshold on ``pred_score`` (the manifest's ``threshold`` equals it).
        pixel: the pixel threshold on the anomaly map (defect mask: ``map >= threshold``).
        min_area: defect regions with fewer pixels (original image size) are dropped.
        images: 'normal' (always), 'anomalous' and 'masks' (when given) image sets.
        backend, provider, precision: what scored the calibration images.
        package_version: cops-deploy version that calibrated.
        created: ISO 8601 UTC date-time of the calibration.
    """

    image: ThresholdRecord
    pixel: ThresholdRecord
    min_area: int
    images: dict[str, ImageSetRecord]
    backend: str
    provider: str
    precision: str
    package_version: str
    created: str

    @property
    def image_threshold(self) -> float:
        """The image decision threshold (``score >= image_threshold``: anomalous)."""
        return self.image.threshold

    @property
    def pixel_threshold(self) -> float:
        """The pixel threshold (``map >= pixel_threshold``: defective pixel)."""
        return self.pixel.threshold

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "calibration_version": 1,
            "image": self.image.to_dict(),
            "pixel": self.pixel.to_dict(),
            "min_area": self.min_area,
            "images": {k: v.to_dict() for k, v in self.images.items()},
            "backend": self.backend,
            "provider": self.provider,
            "precision": self.precision,
            "package_version": self.package_version,
            "created": self.created,
        }

    def to_json(self) -> str:
        """Strict JSON text, sorted keys, 2-space indent, trailing newline."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "calibration record") -> Calibration:
        """Parse and validate against the schema's ``calibration``; BundleError naming the key."""
        try:
            _validate(data, "calibration", "")
        except BundleError as exc:
            text = str(exc).replace(FIX_REEXPORT, FIX_RECALIBRATE).replace("manifest ", "", 1)
            text = text.replace(f"a schema-{SCHEMA_VERSION} manifest needs", "the record needs")
            raise BundleError(f"{where}: {text}") from exc

        def threshold(part: Mapping[str, Any]) -> ThresholdRecord:
            target = part["target_fpr"]
            return ThresholdRecord(
                threshold=float(part["threshold"]),
                method=part["method"],
                target_fpr=None if target is None else float(target),
                achieved=dict(part["achieved"]),
            )

        return cls(
            image=threshold(data["image"]),
            pixel=threshold(data["pixel"]),
            min_area=data["min_area"],
            images={k: ImageSetRecord(**v) for k, v in data["images"].items()},
            backend=data["backend"],
            provider=data["provider"],
            precision=data["precision"],
            package_version=data["package_version"],
            created=data["created"],
        )

    @classmethod
    def from_json(cls, text: str | bytes, where: str = "calibration record") -> Calibration:
        """Parse calibration JSON text (see ``from_dict``)."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise BundleError(
                f"{where} is not valid UTF-8 JSON ({type(exc).__name__}: {_short(str(exc))}). "
                f"{FIX_RECALIBRATE}"
            ) from exc
        return cls.from_dict(data, where)
