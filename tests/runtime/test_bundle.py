"""Bundle reader: manifest round trip, and one test per refusal (tampered, truncated, escaping...).

Bundles here are written by hand (not by the build-side writer) so the reader is tested alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cops_deploy.errors import BundleError
from cops_deploy.runtime.bundle import (
    HASH_CHUNK_BYTES,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    EngineKey,
    Manifest,
    open_bundle,
    sha256_file,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def engine_key_dict(**changes: str) -> dict[str, str]:
    key = {
        "onnx_sha256": SHA_A,
        "tensorrt_version": "10.13.0",
        "gpu_name": "NVIDIA H200",
        "compute_capability": "9.0",
        "precision": "fp16",
        "profile": "b1-4-8",
    }
    key.update(changes)
    return key


def make_manifest(files: dict[str, tuple[bytes, str]]) -> dict[str, Any]:
    """A valid manifest dict for ``files`` (name -> (content, role))."""
    return {
        "schema_version": SCHEMA_VERSION,
        "package_version": "0.1.0",
        "model_config": {"name": "cops-tiny", "width": 64, "layers": [6]},
        "preprocess": {
            "size": 518,
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
        },
        "head": {"alpha": 0.3, "beta": 0.9, "sigma": 4.0, "R": 10, "tau": 0.07, "kernel": 5},
        "graphs": {
            "vision": {
                "file": "vision.onnx",
                "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 518, 518]}],
                "outputs": [
                    {"name": "image_embedding", "dtype": "float32", "shape": ["batch", 768]},
                    {"name": "patch_embeddings", "dtype": "float32", "shape": ["batch", 1369, 768]},
                ],
            },
        },
        "files": [
            {
                "path": name,
                "sha256": hashlib.sha256(content).hexdigest(),
                "size": len(content),
                "role": role,
            }
            for name, (content, role) in files.items()
        ],
        "provenance": {"random_weights": True, "checkpoint_sha256": None, "clip_sha256": None},
        "engines": {"vision.engine": engine_key_dict()},
        "parity": {"vision": {"max_abs": 1.2e-6}, "score_max_abs": 3e-7},
        "threshold": 0.42,
        "created": "2026-01-01T00:00:00+00:00",
        "tool_versions": {"python": "3.11.7", "onnx": "1.16.0"},
    }


def default_files() -> dict[str, tuple[bytes, str]]:
    return {
        "vision.onnx": (b"fake vision graph" * 7, "vision_onnx"),
        "head.onnx": (b"fake head graph" * 5, "head_onnx"),
        "vision.engine": (b"fake engine", "engine"),
        "tables/bias.npy": (_npy_bytes(np.arange(6, dtype=np.float32).reshape(2, 3)), "table"),
    }


def write_bundle(
    root: Path,
    files: dict[str, tuple[bytes, str]] | None = None,
    manifest: dict[str, Any] | None = None,
) -> Path:
    files = default_files() if files is None else files
    root.mkdir(parents=True, exist_ok=True)
    for name, (content, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(content)
    manifest = make_manifest(files) if manifest is None else manifest
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, sort_keys=True, indent=2))
    return root


def rewrite_manifest(root: Path, data: dict[str, Any]) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def read_manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST_NAME).read_text())


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle")


# -- round trip -------------------------------------------------------------------------------


def test_manifest_dict_round_trip() -> None:
    data = make_manifest(default_files())
    manifest = Manifest.from_dict(data)
    assert manifest.to_dict() == data
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_manifest_json_has_sorted_keys() -> None:
    text = Manifest.from_dict(make_manifest(default_files())).to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_open_bundle_round_trip(bundle_dir: Path) -> None:
    bundle = open_bundle(bundle_dir)
    m = bundle.manifest
    assert bundle.verified
    assert m.head.R == 10 and m.head.kernel == 5
    assert m.preprocess.mean == (0.48145466, 0.4578275, 0.40821073)
    assert m.graphs["vision"].inputs[0].shape == ("batch", 3, 518, 518)
    assert m.threshold == 0.42 and m.provenance.random_weights
    assert bundle.path_of("head_onnx") == bundle_dir / "head.onnx"
    assert bundle.path_of("tables/bias.npy") == bundle_dir / "tables" / "bias.npy"
    np.testing.assert_array_equal(
        bundle.load_array("table"), np.arange(6, dtype=np.float32).reshape(2, 3)
    )


def test_null_threshold_and_hashed_provenance(tmp_path: Path) -> None:
    files = default_files()
    data = make_manifest(files)
    data["threshold"] = None
    data["provenance"] = {"random_weights": False, "checkpoint_sha256": SHA_B, "clip_sha256": None}
    bundle = open_bundle(write_bundle(tmp_path / "b", files, data))
    assert bundle.manifest.threshold is None
    assert bundle.manifest.provenance.checkpoint_sha256 == SHA_B


def test_symlink_inside_bundle_is_allowed(tmp_path: Path) -> None:
    files = default_files()
    root = write_bundle(tmp_path / "b", files)
    (root / "alias.onnx").symlink_to("vision.onnx")
    data = make_manifest({**files, "alias.onnx": (files["vision.onnx"][0], "alias")})
    rewrite_manifest(root, data)
    assert open_bundle(root).path_of("alias") == root / "alias.onnx"


def test_sha256_file_streams_in_chunks(tmp_path: Path) -> None:
    content = np.random.default_rng(0).bytes(HASH_CHUNK_BYTES * 2 + 17)
    path = tmp_path / "big.bin"
    path.write_bytes(content)
    assert sha256_file(path) == hashlib.sha256(content).hexdigest()


# -- refusals: files ---------------------------------------------------------------------------


def test_tampered_file_one_byte_flipped(bundle_dir: Path) -> None:
    path = bundle_dir / "head.onnx"
    expected = sha256_file(path)
    content = bytearray(path.read_bytes())
    content[3] ^= 0x01
    path.write_bytes(bytes(content))
    with pytest.raises(BundleError, match="'head.onnx' has sha256") as info:
        open_bundle(bundle_dir)
    assert expected in str(info.value) and sha256_file(path) in str(info.value)
    assert "Fix:" in str(info.value)


def test_tampered_file_passes_without_verify(bundle_dir: Path) -> None:
    path = bundle_dir / "head.onnx"
    content = bytearray(path.read_bytes())
    content[0] ^= 0xFF
    path.write_bytes(bytes(content))
    assert not open_bundle(bundle_dir, verify=False).verified


def test_truncated_file(bundle_dir: Path) -> None:
    path = bundle_dir / "vision.onnx"
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match="'vision.onnx' has") as info:
        open_bundle(bundle_dir, verify=False)
    assert f"{size - 10} bytes" in str(info.value) and f"expects {size}" in str(info.value)


def test_missing_file(bundle_dir: Path) -> None:
    (bundle_dir / "tables" / "bias.npy").unlink()
    with pytest.raises(BundleError, match=r"'tables/bias.npy' \(role 'table'\) is missing"):
        open_bundle(bundle_dir)


@pytest.mark.parametrize("bad", ["../x", "tables/../../x", ".."])
def test_path_escaping_with_dotdot(bundle_dir: Path, bad: str) -> None:
    (bundle_dir.parent / "x").write_bytes(b"outside")
    data = read_manifest(bundle_dir)
    data["files"].append({"path": bad, "sha256": SHA_A, "size": 7, "role": "extra"})
    rewrite_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match=r"escapes the bundle with '\.\.'") as info:
        open_bundle(bundle_dir)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["/etc/passwd", "C:/x.onnx", "\\\\server\\x"])
def test_absolute_path(bundle_dir: Path, bad: str) -> None:
    data = read_manifest(bundle_dir)
    data["files"][0]["path"] = bad
    rewrite_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match="is absolute") as info:
        open_bundle(bundle_dir)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["./vision.onnx", "tables//bias.npy", "tables\\bias.npy", ""])
def test_non_canonical_path(bundle_dir: Path, bad: str) -> None:
    data = read_manifest(bundle_dir)
    data["files"][0]["path"] = bad
    rewrite_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match="files\\[0\\].path"):
        open_bundle(bundle_dir)


def test_symlink_leaving_the_bundle(tmp_path: Path) -> None:
    files = default_files()
    root = write_bundle(tmp_path / "b", files)
    secret = tmp_path / "outside.bin"
    secret.write_bytes(b"not part of the bundle")
    (root / "leak.bin").symlink_to(secret)
    data = make_manifest({**files, "leak.bin": (secret.read_bytes(), "leak")})
    rewrite_manifest(root, data)
    with pytest.raises(BundleError, match="'leak.bin' resolves to .*outside the bundle"):
        open_bundle(root)


def test_symlinked_directory_leaving_the_bundle(tmp_path: Path) -> None:
    files = default_files()
    root = write_bundle(tmp_path / "b", files)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "t.npy").write_bytes(b"x")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    rewrite_manifest(root, make_manifest({**files, "linked/t.npy": (b"x", "t")}))
    with pytest.raises(BundleError, match="'linked/t.npy' resolves to .*outside"):
        open_bundle(root)


def test_duplicate_path(bundle_dir: Path) -> None:
    data = read_manifest(bundle_dir)
    data["files"].append(dict(data["files"][0]))
    rewrite_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match="a path listed once"):
        open_bundle(bundle_dir)


def test_manifest_listing_itself(bundle_dir: Path) -> None:
    data = read_manifest(bundle_dir)
    data["files"][0]["path"] = MANIFEST_NAME
    rewrite_manifest(bundle_dir, data)
    with pytest.raises(BundleError, match="reserved for the manifest"):
        open_bundle(bundle_dir)


@pytest.mark.parametrize("role", ["vision_onnx", "head_onnx"])
def test_missing_required_role(tmp_path: Path, role: str) -> None:
    files = {k: v for k, v in default_files().items() if v[1] != role}
    data = make_manifest(files)
    if role == "vision_onnx":
        data["graphs"] = {}
    root = write_bundle(tmp_path / "b", files, data)
    with pytest.raises(BundleError, match=f"required role\\(s\\) \\['{role}'\\]"):
        open_bundle(root)
    assert open_bundle(root, required_roles=()).manifest


def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist or is not a directory"):
        open_bundle(tmp_path / "nope")


def test_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=f"has no {MANIFEST_NAME}"):
        open_bundle(tmp_path)


def test_manifest_not_json(bundle_dir: Path) -> None:
    (bundle_dir / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON .* line 1"):
        open_bundle(bundle_dir)


# -- refusals: manifest content ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (SCHEMA_VERSION + 1, f"schema_version {SCHEMA_VERSION + 1} is newer"),
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
        (("head", "alpha"), "head.alpha"),
        (("head", "R"), "head.R"),
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
    data["head"]["gamma"] = 1.0
    with pytest.raises(BundleError, match=r"'head' has unknown key\(s\) \['gamma'\]"):
        Manifest.from_dict(data)


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("head", "kernel"), 4, "'head.kernel' is 4; valid: an odd integer"),
        (("head", "alpha"), 1.5, "'head.alpha' is 1.5; valid: a number in"),
        (("head", "R"), True, "'head.R' is True; valid: an integer"),
        (("preprocess", "interpolation"), "lanczos", "'preprocess.interpolation' is 'lanczos'"),
        (("preprocess", "std"), [1.0, 0.0, 1.0], "'preprocess.std'"),
        (("preprocess", "mean"), [0.5, 0.5], "'preprocess.mean'"),
        (("threshold",), float("nan"), "'threshold' is nan"),
        (("parity",), {"x": float("inf")}, "'parity'"),
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


# -- path_of and engine keys -------------------------------------------------------------------


def test_path_of_unknown_role(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="no file or role 'tokenizer'; roles: "):
        open_bundle(bundle_dir).path_of("tokenizer")


def test_path_of_ambiguous_role(tmp_path: Path) -> None:
    files = {**default_files(), "tables/more.npy": (_npy_bytes(np.zeros(2)), "table")}
    bundle = open_bundle(write_bundle(tmp_path / "b", files))
    with pytest.raises(BundleError, match="role 'table' names 2 files"):
        bundle.path_of("table")
    assert len(bundle.paths_with_role("table")) == 2


def test_engine_key_match_returns_path(bundle_dir: Path) -> None:
    bundle = open_bundle(bundle_dir)
    current = EngineKey(**engine_key_dict())
    assert bundle.check_engine_key(current) == bundle_dir / "vision.engine"
    assert bundle.check_engine_key(current, engine="engine") == bundle_dir / "vision.engine"


ENGINE_FIELDS = [f.name for f in dataclasses.fields(EngineKey)]


@pytest.mark.parametrize("field", ENGINE_FIELDS)
def test_engine_key_mismatch_names_field(bundle_dir: Path, field: str) -> None:
    value = SHA_B if field == "onnx_sha256" else "something-else"
    current = EngineKey(**engine_key_dict(**{field: value}))
    with pytest.raises(BundleError, match=f"built for {field}=") as info:
        open_bundle(bundle_dir).check_engine_key(current)
    text = str(info.value)
    assert f"here {field}={value!r}" in text
    assert "cops-export --engine trt" in text and "--force" in text


def test_first_mismatch_order() -> None:
    stored = EngineKey(**engine_key_dict())
    assert stored.first_mismatch(stored) is None
    other = EngineKey(**engine_key_dict(gpu_name="A100", precision="fp32"))
    assert stored.first_mismatch(other) == "gpu_name"


def test_engine_key_with_no_or_several_engines(tmp_path: Path) -> None:
    files = default_files()
    data = make_manifest(files)
    data["engines"] = {}
    bundle = open_bundle(write_bundle(tmp_path / "b", files, data))
    with pytest.raises(BundleError, match="lists 0 engines"):
        bundle.check_engine_key(EngineKey(**engine_key_dict()))


def test_engine_key_unknown_engine(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="no engine key for 'head.onnx'"):
        open_bundle(bundle_dir).engine_key("head.onnx")


# -- torch-free --------------------------------------------------------------------------------


def test_bundle_module_does_not_import_torch() -> None:
    code = "import cops_deploy.runtime.bundle, sys; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
