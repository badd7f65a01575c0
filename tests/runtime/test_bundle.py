"""Bundle reader: open round trip, and one test per refusal (tampered, truncated, escaping...).

Bundles here are written by hand (manifest_samples.py, not the build-side writer) so the reader
is tested alone. The manifest's content (schema, malformed manifests) is tested in
test_manifest.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from manifest_samples import (
    DOC,
    MODEL_CFG,
    SHA_A,
    SHA_B,
    default_files,
    engine_key_dict,
    make_manifest,
    npy_bytes,
    read_manifest,
    rewrite_manifest,
    write_bundle,
)

from cops_deploy.errors import BundleError
from cops_deploy.runtime.bundle import HASH_CHUNK_BYTES, open_bundle, sha256_file
from cops_deploy.runtime.manifest import MANIFEST_NAME, EngineKey


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return write_bundle(tmp_path / "bundle")


# -- round trip -------------------------------------------------------------------------------


def test_open_bundle_round_trip(bundle_dir: Path) -> None:
    bundle = open_bundle(bundle_dir)
    m = bundle.manifest
    assert bundle.verified
    assert m.model_config["head"]["samples"] == 10 and m.model_config["head"]["alpha"] == 0.3
    assert m.preprocess == MODEL_CFG.preprocess
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
    at = content.index(DOC.encode())  # a byte change that keeps a valid ONNX file
    content[at] ^= 0x01
    path.write_bytes(bytes(content))
    assert not open_bundle(bundle_dir, verify=False).verified
    with pytest.raises(BundleError, match="'head.onnx' has sha256"):
        open_bundle(bundle_dir)


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


# -- path_of and engine keys -------------------------------------------------------------------


def test_path_of_unknown_role(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="no file or role 'tokenizer'; roles: "):
        open_bundle(bundle_dir).path_of("tokenizer")


def test_path_of_ambiguous_role(tmp_path: Path) -> None:
    files = {**default_files(), "tables/more.npy": (npy_bytes(np.zeros(2)), "table")}
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
