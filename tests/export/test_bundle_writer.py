"""Bundle writer: atomic writes, --force semantics, ONNX external data, reader round trip."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from jsonschema import Draft202012Validator

from cops_deploy.configs import get_config
from cops_deploy.errors import BundleError
from cops_deploy.export import bundle_writer
from cops_deploy.export.bundle_writer import BundleWriter, onnx_external_data_files
from cops_deploy.runtime.bundle import open_bundle, sha256_file
from cops_deploy.runtime.contract import graph_specs
from cops_deploy.runtime.manifest import (
    MANIFEST_NAME,
    EngineKey,
    GraphIO,
    Provenance,
    TensorSpec,
    load_schema,
)

onnx = pytest.importorskip("onnx")
TINY = get_config("cops-tiny")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


def make_onnx(path: Path, external: bool) -> np.ndarray:
    """A tiny y = x @ W graph; with ``external`` W lives in ``<name>.data`` beside it."""
    weight = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
        size_threshold=0,
    )
    return weight


def set_meta(writer: BundleWriter, **overrides: object) -> None:
    io = GraphIO(
        file="vision.onnx",
        inputs=(TensorSpec("x", "float32", ("batch", 4)),),
        outputs=(TensorSpec("y", "float32", ("batch", 3)),),
    )
    meta: dict[str, object] = {
        "model_config": TINY.to_dict(),
        "graphs": {"vision": io},
        "provenance": Provenance(random_weights=True),
        "parity": {"max_abs": 1e-6},
        "threshold": 0.5,
        "tool_versions": {"onnx": onnx.__version__},
    }
    meta.update(overrides)
    writer.set_metadata(**meta)  # type: ignore[arg-type]


def tagged(tag: bytes) -> bytes:
    """A valid (empty) ONNX model whose doc string is ``tag``: the reader parses .onnx files."""
    model = helper.make_model(helper.make_graph([], "head", [], []), doc_string=tag.decode())
    return model.SerializeToString()


def write_minimal(out: Path, tag: bytes = b"v1", force: bool = False) -> Path:
    """A small valid bundle whose head graph is ``tagged(tag)`` (to tell versions apart)."""
    src = out.parent / f"src-{out.name}-{tag.decode()}"
    make_onnx(src / "vision.onnx", external=False)
    with BundleWriter(out, force=force) as w:
        w.add_onnx(src / "vision.onnx", "vision_onnx")
        w.add_bytes(tagged(tag), "head.onnx", "head_onnx")
        set_meta(w)
    return out


def siblings(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if not p.name.startswith("src-"))


# -- round trip --------------------------------------------------------------------------------


def test_round_trip_with_external_data(tmp_path: Path) -> None:
    src = tmp_path / "export"
    weight = make_onnx(src / "vision.onnx", external=True)
    make_onnx(src / "head.onnx", external=False)
    (src / "vision.engine").write_bytes(b"engine bytes")
    assert onnx_external_data_files(src / "vision.onnx") == ["vision.onnx.data"]
    key = EngineKey("0" * 64, "10.13", "NVIDIA H200", "9.0", "fp16", "b1-4-8")
    out = tmp_path / "out" / "bundle"
    bias = np.arange(12, dtype=np.float32).reshape(3, 4)
    with BundleWriter(out) as w:
        assert w.add_onnx(src / "vision.onnx", "vision_onnx") == "vision.onnx"
        w.add_onnx(src / "head.onnx", "head_onnx")
        w.add_array(bias, "tables/bias.npy", "table")
        w.add_bytes(b"\x00\x01", "raw.bin", "raw")
        w.add_engine(src / "vision.engine", key)
        set_meta(w)
    bundle = open_bundle(out)
    m = bundle.manifest
    assert w.manifest == m
    roles = {e.path: e.role for e in m.files}
    assert roles == {
        "vision.onnx": "vision_onnx",
        "vision.onnx.data": "vision_onnx_data",
        "head.onnx": "head_onnx",
        "tables/bias.npy": "table",
        "raw.bin": "raw",
        "vision.engine": "engine",
    }
    data_entry = m.file("vision.onnx.data")
    assert data_entry.sha256 == sha256_file(src / "vision.onnx.data")
    assert data_entry.size == (src / "vision.onnx.data").stat().st_size
    assert m.engines == {"vision.engine": key}
    assert m.preprocess == TINY.preprocess and m.model_config == TINY.to_dict()
    assert m.threshold == 0.5 and m.parity == {"max_abs": 1e-6}
    assert m.tool_versions["onnx"] == onnx.__version__ and "numpy" in m.tool_versions
    loaded = onnx.load(str(bundle.path_of("vision_onnx")))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), weight)
    np.testing.assert_array_equal(bundle.load_array("table"), bias)
    assert siblings(out) == ["bundle"]


def test_manifest_file_is_sorted_json(tmp_path: Path) -> None:
    out = write_minimal(tmp_path / "b")
    text = (out / MANIFEST_NAME).read_text()
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_renamed_onnx_keeps_external_data_beside_it(tmp_path: Path) -> None:
    src = tmp_path / "export"
    make_onnx(src / "m.onnx", external=True)
    out = tmp_path / "b"
    with BundleWriter(out, required_roles=()) as w:
        w.add_onnx(src / "m.onnx", "vision_onnx", name="graphs/vision.onnx")
        set_meta(w, graphs={})
    names = [e.path for e in open_bundle(out, required_roles=()).manifest.files]
    assert names == ["graphs/m.onnx.data", "graphs/vision.onnx"]
    onnx.load(str(out / "graphs" / "vision.onnx"))  # finds its external data


def test_metadata_as_dicts(tmp_path: Path) -> None:
    out = tmp_path / "b"
    make_onnx(tmp_path / "src" / "vision.onnx", external=False)
    with BundleWriter(out, required_roles=["vision_onnx"]) as w:
        w.add_onnx(tmp_path / "src" / "vision.onnx", "vision_onnx")
        set_meta(
            w,
            model_config=TINY.replace(**{"head.neighbour_kernel": 3}),  # a CopsCfg, not a dict
            provenance={
                "random_weights": False,
                "checkpoint_sha256": "c" * 64,
                "clip_sha256": None,
            },
            threshold=None,
        )
    m = open_bundle(out, required_roles=["vision_onnx"]).manifest
    assert m.model_config["head"]["neighbour_kernel"] == 3
    assert m.threshold is None and not m.provenance.random_weights


# -- existing output and --force ---------------------------------------------------------------


def test_existing_bundle_without_force(tmp_path: Path) -> None:
    out = write_minimal(tmp_path / "b", b"v1")
    before = (out / MANIFEST_NAME).read_bytes()
    with pytest.raises(BundleError, match="already exists; refusing to overwrite.*--force"):
        write_minimal(out, b"v2")
    assert (out / MANIFEST_NAME).read_bytes() == before
    assert (out / "head.onnx").read_bytes() == tagged(b"v1")
    assert siblings(out) == ["b"]


def test_force_replaces(tmp_path: Path) -> None:
    out = write_minimal(tmp_path / "b", b"v1")
    write_minimal(out, b"v2", force=True)
    assert (out / "head.onnx").read_bytes() == tagged(b"v2")
    open_bundle(out)
    assert siblings(out) == ["b"]


def test_force_into_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    write_minimal(out, b"v1", force=True)
    open_bundle(out)


def test_force_refuses_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    out = tmp_path / "b"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(BundleError, match="is not a bundle .*--force replaces only bundles"):
        write_minimal(out, force=True)
    assert (out / "precious.txt").read_text() == "keep me"


def test_exception_inside_writer_leaves_old_bundle_and_no_temp(tmp_path: Path) -> None:
    out = write_minimal(tmp_path / "b", b"v1")
    with pytest.raises(RuntimeError, match="boom"):
        with BundleWriter(out, force=True) as w:
            w.add_bytes(b"v2", "head.onnx", "head_onnx")
            staging = w.staging_dir
            assert staging.is_dir()
            raise RuntimeError("boom")
    assert not staging.exists()
    assert (out / "head.onnx").read_bytes() == tagged(b"v1")
    open_bundle(out)
    assert siblings(out) == ["b"]


def test_exception_without_existing_bundle_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        with BundleWriter(out) as w:
            w.add_bytes(b"x", "head.onnx", "head_onnx")
            raise KeyboardInterrupt
    assert siblings(out) == []


def test_failed_final_rename_restores_old_bundle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = write_minimal(tmp_path / "b", b"v1")
    real_rename = os.rename

    def flaky_rename(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        if ".tmp-" in Path(src).name:
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr(bundle_writer.os, "rename", flaky_rename)
    with pytest.raises(OSError, match="disk full"):
        write_minimal(out, b"v2", force=True)
    assert (out / "head.onnx").read_bytes() == tagged(b"v1")
    open_bundle(out)
    assert siblings(out) == ["b"]


def test_missing_required_role_fails_commit_cleanly(tmp_path: Path) -> None:
    out = write_minimal(tmp_path / "b", b"v1")
    with pytest.raises(BundleError, match=r"required role\(s\) \['vision_onnx'\]"):
        with BundleWriter(out, force=True) as w:
            w.add_bytes(b"v2", "head.onnx", "head_onnx")
            set_meta(w)
    assert (out / "head.onnx").read_bytes() == tagged(b"v1")
    assert siblings(out) == ["b"]


def test_metadata_never_set(tmp_path: Path) -> None:
    out = tmp_path / "b"
    with pytest.raises(
        BundleError, match=r"\['model_config', 'graphs', 'provenance'\] were never set"
    ):
        with BundleWriter(out, required_roles=()) as w:
            w.add_bytes(b"x", "x.bin", "x")
    assert siblings(out) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"parity": {"max_abs": float("nan")}}, "not strict JSON"),
        (
            {"model_config": {**TINY.to_dict(), "head": {"alpha": 0.3}}},
            r"manifest keys 'model_config.head.samples', .*'model_config.head.neighbour_kernel' are",
        ),
        (
            {"model_config": {"name": "cops-tiny"}},
            r"model_config is an object with keys \['name'\], with no 'preprocess' section",
        ),
        ({"model_config": "cops-tiny"}, "model_config is a str, with no 'preprocess' section"),
    ],
)
def test_invalid_metadata_is_refused(tmp_path: Path, override: dict, message: str) -> None:
    out = tmp_path / "b"
    with pytest.raises(BundleError, match=message):
        with BundleWriter(out, required_roles=()) as w:
            set_meta(w, graphs={}, **override)
    assert siblings(out) == []


def test_preprocess_is_derived_from_model_config(tmp_path: Path) -> None:
    out = write_minimal(tmp_path / "b")
    written = json.loads((out / MANIFEST_NAME).read_text())
    assert written["preprocess"] == written["model_config"]["preprocess"]
    assert "head" not in written  # the head parameters are model_config["head"]
    Draft202012Validator(load_schema()).validate(written)  # what any schema validator accepts


@pytest.mark.parametrize("field", ["preprocess", "head"])
def test_set_metadata_takes_no_preprocess_or_head(tmp_path: Path, field: str) -> None:
    with pytest.raises(TypeError, match=f"unexpected keyword argument '{field}'"):
        with BundleWriter(tmp_path / "b", required_roles=()) as w:
            w.set_metadata(**{field: {}})
    assert siblings(tmp_path / "b") == []


def test_preprocess_size_must_fit_the_vision_graph(tmp_path: Path) -> None:
    other = TINY.replace(**{"preprocess.size": 56, "vision.input_size": 56})
    inputs, outputs = graph_specs("vision", TINY)  # image (batch, 3, 98, 98)
    out = tmp_path / "b"
    with pytest.raises(BundleError, match=r"'preprocess.size' is 56 but 'graphs.vision.inp"):
        with BundleWriter(out, required_roles=["vision_onnx"]) as w:
            w.add_bytes(b"graph", "vision.onnx", "vision_onnx")
            set_meta(
                w, model_config=other, graphs={"vision": GraphIO("vision.onnx", inputs, outputs)}
            )
    assert siblings(out) == []


# -- bad inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../x.bin", "escapes the bundle"),
        ("/abs.bin", "is absolute"),
        ("manifest.json", "reserved"),
    ],
)
def test_bad_file_name(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(BundleError, match=message):
        with BundleWriter(tmp_path / "b") as w:
            w.add_bytes(b"x", name, "x")
    assert siblings(tmp_path / "b") == []


def test_duplicate_name(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="'a.bin' is already used"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_bytes(b"x", "a.bin", "x")
            w.add_bytes(b"y", "a.bin", "y")


def test_add_array_refuses_pickle_and_bad_name(tmp_path: Path) -> None:
    with BundleWriter(tmp_path / "b", required_roles=()) as w:
        with pytest.raises(BundleError, match="dtype object, which needs pickle"):
            w.add_array(np.array([{"a": 1}], dtype=object), "t.npy", "table")
        with pytest.raises(BundleError, match="must end in '.npy'"):
            w.add_array(np.zeros(3), "t.bin", "table")
        set_meta(w, graphs={})


def test_add_missing_source_file(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="nope.onnx: it is not an existing file"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_onnx(tmp_path / "nope.onnx", "vision_onnx")


def test_companion_outside_model_directory(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "model.onnx").write_bytes(b"m")
    (tmp_path / "elsewhere.data").write_bytes(b"d")
    with pytest.raises(BundleError, match="does not sit beside"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_file(
                tmp_path / "m" / "model.onnx",
                "vision_onnx",
                companions=[tmp_path / "elsewhere.data"],
            )


def test_writer_used_outside_with_block(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="is not open.*with BundleWriter"):
        BundleWriter(tmp_path / "b").add_bytes(b"x", "x.bin", "x")


def test_writer_module_does_not_import_torch() -> None:
    code = "import cops_deploy.export.bundle_writer, sys; assert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_missing_companion_file(tmp_path: Path) -> None:
    src = tmp_path / "export"
    make_onnx(src / "vision.onnx", external=True)
    (src / "vision.onnx.data").unlink()
    with pytest.raises(BundleError, match="companion file .*vision.onnx.data .* does not exist"):
        with BundleWriter(tmp_path / "b") as w:
            w.add_onnx(src / "vision.onnx", "vision_onnx")
    assert siblings(tmp_path / "b") == ["export"]


def test_unreadable_onnx_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\xff\xfe not a protobuf")
    with pytest.raises(BundleError, match="cannot read ONNX file .*bad.onnx"):
        onnx_external_data_files(bad)


# -- temporaries and file modes ----------------------------------------------------------------


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait(timeout=60)
    return child.pid


def test_stale_temporaries_are_removed_by_the_next_writer(tmp_path: Path) -> None:
    out = tmp_path / "b"
    dead = dead_pid()
    stale = [tmp_path / f".b.{kind}-{dead}-0123abcd" for kind in bundle_writer.TEMP_KINDS]
    for folder in stale:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "vision.onnx.data").write_bytes(b"half written")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        kept = [
            tmp_path / f".b.work-{live.pid}-0123abcd",  # an export that still runs
            tmp_path / f".b.tmp-{os.getpid()}-0123abcd",  # this process's own
            tmp_path / f".other.tmp-{dead}-0123abcd",  # another bundle's
            tmp_path / ".b.tmp-notapid",  # not a name this package makes
        ]
        for folder in kept:
            folder.mkdir()
        write_minimal(out)
        assert not any(folder.exists() for folder in stale)
        assert all(folder.is_dir() for folder in kept)
        assert bundle_writer.clean_stale_temporaries(out) == []
    finally:
        live.kill()
        live.wait(timeout=60)
    assert bundle_writer.clean_stale_temporaries(out) == [kept[0]]


def test_an_interrupted_replacement_puts_the_old_bundle_back(tmp_path: Path) -> None:
    out = write_minimal(tmp_path / "b", b"v1")
    aside = tmp_path / f".b.old-{dead_pid()}-0123abcd"
    os.rename(out, aside)  # killed between moving the old bundle aside and the new one in
    with pytest.raises(BundleError, match="already exists"):
        write_minimal(out, b"v2")  # the old bundle is back: replacing it needs --force
    assert (out / "head.onnx").read_bytes() == tagged(b"v1")
    assert siblings(out) == ["b"]


@pytest.mark.parametrize(
    ("umask", "folder", "file"), [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)]
)
def test_bundle_modes_follow_the_umask(tmp_path: Path, umask: int, folder: int, file: int) -> None:
    src = tmp_path / "src"
    make_onnx(src / "vision.onnx", external=True)
    old = os.umask(umask)
    try:
        out = tmp_path / "b"
        with BundleWriter(out) as w:
            w.add_onnx(src / "vision.onnx", "vision_onnx")
            w.add_bytes(tagged(b"v1"), "head.onnx", "head_onnx")
            w.add_array(np.zeros(3, np.float32), "tables/t.npy", "table")
            set_meta(w)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == folder
    assert (out / "tables").stat().st_mode & 0o777 == folder
    for name in (MANIFEST_NAME, "vision.onnx", "vision.onnx.data", "head.onnx", "tables/t.npy"):
        assert (out / name).stat().st_mode & 0o777 == file, name


def test_make_temp_dir_refuses_an_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="unknown temporary kind 'scratch'"):
        bundle_writer.make_temp_dir(tmp_path / "b", "scratch")
