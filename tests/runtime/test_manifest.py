"""Bundle manifest: the schema file, the round trip, and refusals of malformed manifests.

The schema (manifest.schema.json) is checked as a draft 2020-12 schema that declares every key
the writer writes, with a description on each; every malformed manifest (wrong types at any
depth, unknown or missing keys, NaN, deep nesting, another schema version, preprocess that
disagrees with the model config or the vision graph, bytes that are not UTF-8) is refused with a
BundleError naming the key, never another exception.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator, validators
from manifest_samples import (
    MODEL_CFG,
    default_files,
    engine_key_dict,
    make_manifest,
    read_manifest,
    rewrite_manifest,
    write_bundle,
)

from cops_deploy.errors import BundleError
from cops_deploy.runtime.bundle import open_bundle
from cops_deploy.runtime.manifest import (
    MANIFEST_NAME,
    MAX_DEPTH,
    SCHEMA_PATH,
    SCHEMA_VERSION,
    EngineKey,
    Manifest,
    load_schema,
)

SCHEMA = load_schema()


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle")


def sample() -> dict[str, Any]:
    """A valid manifest with nested parity figures (every kind of value the writer writes)."""
    data = make_manifest(default_files())
    data["parity"] = {"pred_score_max_abs": 3e-7, "images": 2, "ort_variant": {"ok": True}}
    return data


# -- the schema file ---------------------------------------------------------------------------


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    assert SCHEMA_PATH.name == "manifest.schema.json" and SCHEMA_PATH.is_file()
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert validators.validator_for(SCHEMA) is Draft202012Validator
    Draft202012Validator.check_schema(SCHEMA)


def test_schema_declares_the_version_this_reader_reads() -> None:
    assert SCHEMA_VERSION == 2 == SCHEMA["properties"]["schema_version"]["const"]


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with its local ``$ref`` followed (the keywords of the target, then its own)."""
    while "$ref" in node:
        target = SCHEMA
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
    return node


def undeclared(value: Any, node: dict[str, Any], where: str) -> Iterator[str]:
    """Dotted keys of ``value`` that the schema ``node`` does not declare."""
    node = resolve(node)
    if isinstance(value, dict):
        props, extra = node.get("properties", {}), node.get("additionalProperties")
        for key, child in value.items():
            dotted = f"{where}.{key}" if where else key
            if key in props:
                yield from undeclared(child, props[key], dotted)
            elif isinstance(extra, dict):
                yield from undeclared(child, extra, dotted)
            else:
                yield dotted
    elif isinstance(value, list):
        for i, child in enumerate(value):
            if "items" not in node:
                yield f"{where}[{i}]"
            else:
                yield from undeclared(child, node["items"], f"{where}[{i}]")


def test_every_key_the_manifest_writes_is_declared() -> None:
    written = Manifest.from_dict(sample()).to_dict()
    assert list(undeclared(written, SCHEMA, "")) == []
    assert sorted(written) == sorted(SCHEMA["properties"]) == sorted(SCHEMA["required"])
    # the walk does find a key the schema lacks
    written["model_config"]["vision"]["dropout"] = 0.1
    assert list(undeclared(written, SCHEMA, "")) == ["model_config.vision.dropout"]


def described(node: Any, where: str) -> Iterator[str]:
    """Dotted schema locations of declared properties without a description (constraints, in
    'if'/'then'/'not', declare nothing)."""
    if isinstance(node, dict):
        for key, child in node.get("properties", {}).items():
            if "description" not in child:
                yield f"{where}.properties.{key}"
        for key, child in node.items():
            if key not in ("if", "then", "not"):
                yield from described(child, f"{where}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from described(child, f"{where}[{i}]")


def test_every_declared_key_has_a_description() -> None:
    assert list(described(SCHEMA, "")) == []
    assert all("description" in d for d in SCHEMA["$defs"].values())


@pytest.mark.parametrize("section", ["vision", "text", "prompt", "head", "preprocess"])
def test_model_config_sections_match_the_config_classes(section: str) -> None:
    declared = resolve(resolve(SCHEMA["$defs"]["model_config"])["properties"][section])
    keys = sorted(MODEL_CFG.to_dict()[section])
    assert sorted(declared["properties"]) == keys == sorted(declared["required"])
    assert declared["additionalProperties"] is False


# Declared but not required: bundles written before the AnomalyCLIP family have no "kind" (it
# means "cops").
OPTIONAL_MODEL_KEYS = {"kind"}


def test_model_config_top_level_matches_the_config_class() -> None:
    declared = SCHEMA["$defs"]["model_config"]
    keys = sorted(MODEL_CFG.to_dict())
    assert sorted(declared["properties"]) == keys
    assert sorted(declared["required"]) == sorted(set(keys) - OPTIONAL_MODEL_KEYS)


def test_model_config_without_kind_is_a_cops_model() -> None:
    data = make_manifest(default_files())
    assert data["model_config"]["kind"] == "cops"
    del data["model_config"]["kind"]
    manifest = Manifest.from_dict(data)
    assert manifest.model_config.get("kind", "cops") == "cops"


# -- round trip --------------------------------------------------------------------------------


def test_manifest_dict_round_trip() -> None:
    data = make_manifest(default_files())
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_manifest_json_has_sorted_keys() -> None:
    text = Manifest.from_dict(make_manifest(default_files())).to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


# -- refusals: one per key ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (SCHEMA_VERSION + 1, f"schema_version {SCHEMA_VERSION + 1} is newer"),
        (1, "schema_version 1 is an older format this cops-deploy no longer reads"),
        (0, "schema_version 0 is unknown"),
        (-3, "schema_version -3 is unknown"),
    ],
)
def test_unknown_schema_version(bundle_dir: Path, version: int, message: str) -> None:
    data = read_manifest(bundle_dir)
    data["schema_version"] = version
    rewrite_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match=message) as info:
        open_bundle(bundle_dir)
    assert f"schema_version {SCHEMA_VERSION}" in str(info.value)


def test_schema_version_not_an_integer(bundle_dir: Path) -> None:
    data = read_manifest(bundle_dir)
    data["schema_version"] = "1"
    rewrite_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match="'schema_version' is '1'; valid: an integer"):
        open_bundle(bundle_dir)


TOP_LEVEL_KEYS = sorted(make_manifest({}).keys())


@pytest.mark.parametrize("key", TOP_LEVEL_KEYS)
def test_missing_manifest_key(key: str) -> None:
    data = make_manifest(default_files())
    del data[key]
    with pytest.raises(BundleError, match=f"manifest key '{key}' is missing"):
        Manifest.from_dict(data)


@pytest.mark.parametrize(
    ("path", "dotted"),
    [
        (("preprocess", "mean"), "preprocess.mean"),
        (("preprocess", "interpolation"), "preprocess.interpolation"),
        (("model_config", "head", "alpha"), "model_config.head.alpha"),
        (("model_config", "head", "samples"), "model_config.head.samples"),
        (("model_config", "preprocess", "size"), "model_config.preprocess.size"),
        (("provenance", "random_weights"), "provenance.random_weights"),
        (("graphs", "vision", "outputs"), "graphs.vision.outputs"),
        (("engines", "vision.engine", "gpu_name"), "engines.vision.engine.gpu_name"),
    ],
)
def test_missing_nested_manifest_key(path: tuple[str, ...], dotted: str) -> None:
    data = make_manifest(default_files())
    node = data
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    with pytest.raises(BundleError, match=f"manifest key '{dotted}' is missing"):
        Manifest.from_dict(data)


def test_missing_file_entry_key_is_named(bundle_dir: Path) -> None:
    data = read_manifest(bundle_dir)
    del data["files"][2]["sha256"]
    rewrite_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match=r"manifest key 'files\[2\].sha256' is missing"):
        open_bundle(bundle_dir)


def test_unknown_manifest_key() -> None:
    data = make_manifest(default_files())
    data["model_config"]["head"]["gamma"] = 1.0
    with pytest.raises(BundleError, match=r"'model_config.head' has unknown key\(s\) \['gamma'\]"):
        Manifest.from_dict(data)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (
            ("model_config", "head", "neighbour_kernel"),
            4,
            "'model_config' is not a valid CoPS config: .*neighbour_kernel must be odd, got 4",
        ),
        (("model_config", "head", "alpha"), 1.5, "'model_config.head.alpha' is 1.5; valid: a num"),
        (
            ("model_config", "head", "samples"),
            True,
            "'model_config.head.samples' is True; valid: an",
        ),
        (("preprocess", "interpolation"), "lanczos", "'preprocess.interpolation' is 'lanczos'"),
        (
            ("preprocess", "std"),
            [1.0, 0.0, 1.0],
            r"'preprocess.std\[1\]' is 0.0; valid: a number > 0",
        ),
        (("preprocess", "mean"), [0.5, 0.5], "'preprocess.mean' is .*; valid: a list of exactly 3"),
        (("threshold",), float("nan"), "'threshold' is nan"),
        (("parity",), {"x": float("inf")}, "'parity.x' is inf; valid: any JSON value"),
        (("files", 0, "sha256"), "ABC", r"'files\[0\].sha256' is 'ABC'"),
        (("files", 0, "size"), -1, r"'files\[0\].size' is -1"),
        (("engines", "nope.engine"), engine_key_dict(), "'engines.nope.engine'"),
        (("graphs", "vision", "file"), "other.onnx", "'graphs.vision.file'"),
        (("graphs", "vision", "inputs", 0, "dtype"), "float128", "dtype' is 'float128'"),
        (("provenance", "random_weights"), False, "at least one weight hash"),
    ],
)
def test_invalid_manifest_value(path: tuple[Any, ...], value: Any, message: str) -> None:
    data = make_manifest(default_files())
    node: Any = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    with pytest.raises(BundleError, match=message):
        Manifest.from_json(json.dumps(data))


# -- malformed manifests: each refused at open with a BundleError naming the key ---------------

Mutation = Callable[[dict[str, Any]], Any]


def setting(path: str, value: Any) -> Mutation:
    """Set the node at ``path`` ('graphs/vision/inputs/0/dtype') to ``value``."""

    def mutate(data: dict[str, Any]) -> dict[str, Any]:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        node = data
        for part in parents:
            node = node[part]
        node[last] = value
        return data

    return mutate


def deleting(path: str) -> Mutation:
    """Delete the key at ``path``."""

    def mutate(data: dict[str, Any]) -> dict[str, Any]:
        *parents, last = path.split("/")
        node: Any = data
        for part in parents:
            node = node[int(part) if part.isdigit() else part]
        del node[last]
        return data

    return mutate


def both(*mutations: Mutation) -> Mutation:
    """Apply ``mutations`` in order."""

    def mutate(data: dict[str, Any]) -> Any:
        for m in mutations:
            data = m(data)
        return data

    return mutate


def nested(depth: int) -> dict[str, Any]:
    """``{"a": {"a": ... {"x": 1}}}``, ``depth`` levels deep."""
    node: dict[str, Any] = {"x": 1}
    for _ in range(depth):
        node = {"a": node}
    return node


MALFORMED: list[tuple[str, Mutation, str]] = [
    # wrong types, at each depth
    ("root not an object", lambda d: [d], r"manifest key '<manifest>' is \[.*valid: a JSON object"),
    (
        "d1 package_version",
        setting("package_version", 3),
        r"'package_version' is 3; valid: a string",
    ),
    (
        "d1 threshold",
        setting("threshold", "0.5"),
        r"'threshold' is '0.5'; valid: a finite number or null",
    ),
    ("d1 files", setting("files", {}), r"'files' is \{\}; valid: a JSON list"),
    (
        "d2 preprocess.size",
        setting("preprocess/size", "518"),
        r"'preprocess.size' is '518'; valid: an integer",
    ),
    (
        "d2 files[1]",
        setting("files/1", "vision.onnx"),
        r"'files\[1\]' is 'vision.onnx'; valid: a JSON object",
    ),
    (
        "d2 provenance",
        setting("provenance/random_weights", 1),
        r"'provenance.random_weights' is 1; valid: true or false",
    ),
    (
        "d3 int as float",
        setting("model_config/vision/layers", 24.0),
        r"'model_config.vision.layers' is 24.0; valid: an integer",
    ),
    (
        "d3 engine field",
        setting("engines/vision.engine/gpu_name", 9),
        r"'engines.vision.engine.gpu_name' is 9; valid: a string",
    ),
    (
        "d3 files[0].size",
        setting("files/0/size", True),
        r"'files\[0\].size' is True; valid: an integer",
    ),
    (
        "d3 zero heads",
        setting("model_config/vision/heads", 0),
        r"'model_config.vision.heads' is 0; valid: a number >= 1",
    ),
    (
        "d4 dtype type",
        setting("graphs/vision/inputs/0/dtype", 32),
        r"'graphs.vision.inputs\[0\].dtype' is 32; valid: a string",
    ),
    (
        "d4 dtype enum",
        setting("graphs/vision/inputs/0/dtype", "float128"),
        r"'graphs.vision.inputs\[0\].dtype' is 'float128'; valid: one of \['float32'",
    ),
    (
        "d4 feature layer",
        setting("model_config/vision/feature_layers/0", "24"),
        r"'model_config.vision.feature_layers\[0\]' is '24'; valid: an integer",
    ),
    (
        "d5 shape dim",
        setting("graphs/vision/inputs/0/shape/1", -3),
        r"'graphs.vision.inputs\[0\].shape\[1\]' is -3; valid: a number >= 0",
    ),
    (
        "d5 shape dim bool",
        setting("graphs/vision/inputs/0/shape/0", True),
        r"'graphs.vision.inputs\[0\].shape\[0\]' is True; valid: an integer or a string",
    ),
    (
        "d5 shape dim empty",
        setting("graphs/vision/outputs/1/shape/0", ""),
        r"'graphs.vision.outputs\[1\].shape\[0\]' is ''; valid: a non-empty string",
    ),
    # unknown keys
    (
        "unknown top-level head",
        setting("head", {"alpha": 0.3}),
        r"manifest object '<manifest>' has unknown key\(s\) \['head'\]; valid keys: \[.*'preprocess'",
    ),
    (
        "unknown preprocess key",
        setting("preprocess/antialias", True),
        r"manifest object 'preprocess' has unknown key\(s\) \['antialias'\]",
    ),
    (
        "unknown tensor key",
        setting("graphs/vision/inputs/0/layout", "NCHW"),
        r"manifest object 'graphs.vision.inputs\[0\]' has unknown key\(s\) \['layout'\]",
    ),
    (
        "unknown config key",
        setting("model_config/vision/dropout", 0.1),
        r"manifest object 'model_config.vision' has unknown key\(s\) \['dropout'\]",
    ),
    # missing keys
    ("missing preprocess", deleting("preprocess"), r"manifest key 'preprocess' is missing"),
    (
        "missing config key",
        deleting("model_config/preprocess/std"),
        r"manifest key 'model_config.preprocess.std' is missing",
    ),
    ("missing file role", deleting("files/0/role"), r"manifest key 'files\[0\].role' is missing"),
    (
        "missing hash key",
        deleting("provenance/clip_sha256"),
        r"manifest key 'provenance.clip_sha256' is missing",
    ),
    (
        "missing two keys",
        both(deleting("created"), deleting("threshold")),
        r"manifest keys 'threshold', 'created' are missing",
    ),
    # NaN and infinities (Python's json reads them; the manifest refuses them)
    (
        "NaN threshold",
        setting("threshold", float("nan")),
        r"'threshold' is nan; valid: a finite number or null",
    ),
    (
        "NaN mean",
        setting("preprocess/mean/0", float("nan")),
        r"'preprocess.mean\[0\]' is nan; valid: a finite number",
    ),
    (
        "inf tau",
        setting("model_config/head/tau", float("inf")),
        r"'model_config.head.tau' is inf; valid: a finite number",
    ),
    (
        "-inf parity",
        setting("parity/deep", {"x": -float("inf")}),
        r"'parity.deep.x' is -inf; valid: any JSON value",
    ),
    # nesting deeper than the schema walk allows (where Python would raise RecursionError)
    (
        "deep parity",
        setting("parity/deep", nested(400)),
        r"manifest key 'parity.deep.a.a.a.*' nests more than 32 levels",
    ),
    (
        "deep config",
        setting("model_config/description", nested(500)),
        r"manifest key 'model_config.description.a.a.*' nests more than 32",
    ),
    # other schema versions
    (
        "schema 1",
        setting("schema_version", 1),
        r"schema_version 1 is an older format .*Fix: re-export",
    ),
    (
        "schema 3",
        setting("schema_version", 3),
        r"schema_version 3 is newer .*Fix: upgrade cops-deploy",
    ),
    (
        "schema bool",
        setting("schema_version", True),
        r"'schema_version' is True; valid: an integer",
    ),
    # preprocess disagreeing with the model config it is derived from
    (
        "preprocess mean",
        setting("preprocess/mean", [0.5, 0.5, 0.5]),
        r"'preprocess.mean' is \(0.5, 0.5, 0.5\) but 'model_config.preprocess.mean' is \(0.48145466",
    ),
    (
        "preprocess interp",
        setting("preprocess/interpolation", "bilinear"),
        r"'preprocess.interpolation' is 'bilinear' but 'model_config.preprocess.interpolation' is 'bicubic'",
    ),
    (
        "preprocess size",
        setting("preprocess/size", 336),
        r"'preprocess.size' is 336 but 'model_config.preprocess.size' is 518",
    ),
    # preprocess.size disagreeing with the vision graph's image input (refused at open)
    (
        "size vs graph",
        both(
            setting("preprocess/size", 336),
            setting("model_config/preprocess/size", 336),
            setting("model_config/vision/input_size", 336),
        ),
        r"'preprocess.size' is 336 but 'graphs.vision.inputs\[0\].shape' is \['batch', 3, 518, 518\]",
    ),
    (
        "image rank",
        setting("graphs/vision/inputs/0/shape", ["batch", 3, 518]),
        r"'preprocess.size' is 518 but 'graphs.vision.inputs\[0\].shape' is \['batch', 3, 518\]",
    ),
    # what a schema cannot say, checked in code
    (
        "config rule",
        setting("model_config/vision/heads", 7),
        r"'model_config' is not a valid CoPS config: .*vision.heads 7",
    ),
    (
        "odd kernel",
        setting("model_config/head/neighbour_kernel", 4),
        r"'model_config' is not a valid CoPS config: .*neighbour_kernel must be odd",
    ),
    (
        "tensor names",
        setting("graphs/vision/outputs/1/name", "image"),
        r"'graphs.vision' is \['image'\]; valid: unique tensor names",
    ),
    (
        "graph file",
        setting("graphs/vision/file", "other.onnx"),
        r"'graphs.vision.file' is 'other.onnx'; valid: one of the listed files",
    ),
    (
        "engine file",
        setting("engines/nope.engine", engine_key_dict()),
        r"'engines.nope.engine' is 'nope.engine'; valid: a listed file",
    ),
    (
        "sha256",
        setting("files/0/sha256", "ABC"),
        r"'files\[0\].sha256' is 'ABC'; valid: a sha256 as 64 lowercase hex digits",
    ),
    (
        "provenance",
        setting("provenance/random_weights", False),
        r"'provenance' is .*; valid: random_weights true, or at least one weight hash",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_manifest_is_refused_naming_the_key(
    tmp_path: Path, mutate: Mutation, message: str
) -> None:
    root = write_bundle(tmp_path / "b")
    (root / MANIFEST_NAME).write_text(json.dumps(mutate(read_manifest(root))))
    with pytest.raises(BundleError, match=message) as info:
        open_bundle(root)
    assert "Fix:" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            b'{"schema_version": 2, "package_version": "caf\xe9"}',
            r"not UTF-8 text \(byte 0xe9 at offset 45\)",
        ),
        (b"[" * 100_000 + b"]" * 100_000, r"cannot be parsed \(RecursionError.*nested at most 32"),
        (b'{"schema_version": 1' + b"0" * 5000 + b"}", r"cannot be parsed \(ValueError"),
        (b'{"schema_version": 2', r"not valid JSON \(Expecting"),
    ],
    ids=["not UTF-8", "nested 100000 deep", "5000-digit integer", "truncated"],
)
def test_unparsable_manifest_is_refused(bundle_dir: Path, text: bytes, message: str) -> None:
    (bundle_dir / MANIFEST_NAME).write_bytes(text)
    with pytest.raises(BundleError, match=message) as info:
        open_bundle(bundle_dir)
    assert "Fix:" in str(info.value)


def test_nesting_limit_is_max_depth() -> None:
    """parity.deep.<k levels>.x: the leaf is at depth k + 3, refused beyond MAX_DEPTH."""
    data = sample()
    data["parity"]["deep"] = nested(MAX_DEPTH - 3)
    assert Manifest.from_dict(data).parity["deep"]["a"]
    data["parity"]["deep"] = nested(MAX_DEPTH - 2)
    with pytest.raises(BundleError, match=f"nests more than {MAX_DEPTH} levels"):
        Manifest.from_dict(data)


def test_overflowing_number_is_refused(bundle_dir: Path) -> None:
    text = (bundle_dir / MANIFEST_NAME).read_text()
    assert '"threshold": 0.42' in text
    (bundle_dir / MANIFEST_NAME).write_text(text.replace('"threshold": 0.42', '"threshold": 1e999'))
    with pytest.raises(BundleError, match="'threshold' is inf; valid: a finite number or null"):
        open_bundle(bundle_dir)


def nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path into ``value`` (the root included)."""
    yield path
    items = (
        value.items()
        if isinstance(value, dict)
        else enumerate(value)
        if isinstance(value, list)
        else ()
    )
    for key, child in items:
        yield from nodes(child, (*path, key))


WRONG_VALUES: list[Any] = [
    None, True, 0, -1, 1.5, float("nan"), "", "x", [], {}, [[]], {1: 2}, (1,), object(),
]  # fmt: skip


def test_any_wrong_value_anywhere_gives_a_bundle_error() -> None:
    """Every node of a valid manifest replaced by wrong values (4 per node, rotating through
    WRONG_VALUES so each is tried at every depth): a BundleError or a valid manifest, never
    another exception. About 2 s: validation takes some 3 ms per manifest."""
    base = sample()
    refused = 0
    for n, path in enumerate(nodes(base)):
        for k in range(4):
            value = WRONG_VALUES[(4 * n + k) % len(WRONG_VALUES)]
            data: Any = copy.deepcopy(base)
            if path:
                node = data
                for key in path[:-1]:
                    node = node[key]
                node[path[-1]] = value
            else:
                data = value
            try:
                Manifest.from_dict(data)
            except BundleError:
                refused += 1
    assert refused > 400


def test_non_string_object_key_is_refused() -> None:
    data = sample()
    data["graphs"][1] = data["graphs"]["vision"]
    with pytest.raises(BundleError, match="object 'graphs' has the key 1, which is not a string"):
        Manifest.from_dict(data)


def test_engine_key_from_dict_names_the_key() -> None:
    assert EngineKey.from_dict(engine_key_dict()) == EngineKey(**engine_key_dict())
    with pytest.raises(BundleError, match=r"'cache/v.engine.json.gpu_name' is 3; valid: a string"):
        EngineKey.from_dict({**engine_key_dict(), "gpu_name": 3}, "cache/v.engine.json")
    with pytest.raises(BundleError, match=r"'engines' is \[\]; valid: a JSON object"):
        EngineKey.from_dict([])


def test_graph_contract_does_not_need_jsonschema() -> None:
    """benchmarks/gpu_check.py runs on a machine with PyTorch only: the deploy graphs import the
    tensor contract (TensorSpec), which must not pull in jsonschema; parsing a manifest does."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "import cops_deploy.runtime.contract, cops_deploy.runtime.manifest\n"
        "assert 'jsonschema' not in sys.modules, 'jsonschema imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
