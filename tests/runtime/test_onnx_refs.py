"""The stdlib-only ONNX reader (cops_deploy.runtime.onnx_refs): external-data locations in every
place the ONNX format can hold a tensor, graph inputs and outputs, and malformed files refused.

Models are written with the ``onnx`` package (a build-side dependency, present in tests), so the
reader's field numbers are checked against ``onnx.proto`` as the package encodes it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cops_deploy.errors import BundleError
from cops_deploy.runtime.onnx_refs import MAX_GRAPH_NESTING, ExternalRef, ValueSpec, read_onnx_refs

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def external(name: str, location: str | None) -> TensorProto:
    """A float tensor [2] whose data is stored externally at ``location`` (None: no location)."""
    tensor = helper.make_tensor(name, TensorProto.FLOAT, [2], [0.0, 0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    if location is not None:
        for key, value in (("location", location), ("offset", "0"), ("length", "8")):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return tensor


def write(tmp_path: Path, model: onnx.ModelProto) -> Path:
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def subgraph(location: str, depth: int = 1) -> onnx.GraphProto:
    """An If branch holding one external initializer, nested ``depth`` levels deep."""
    inner = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["y"])],
        "branch",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [external("w", location)],
    )
    empty = helper.make_graph([], "empty", [], [])
    for _ in range(depth - 1):
        node = helper.make_node("If", ["c"], ["y"], then_branch=inner, else_branch=empty)
        inner = helper.make_graph(
            [node], "nest", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]
        )
    return inner


def test_every_place_a_tensor_can_sit(tmp_path: Path) -> None:
    sparse = helper.make_sparse_tensor(
        external("sv", "sparse.data"), external("si", "idx.data"), [4]
    )
    nodes = [
        helper.make_node("Constant", [], ["k"], value=external("const", "attr.data")),
        helper.make_node(
            "If", ["c"], ["z"], then_branch=subgraph("then.data"), else_branch=subgraph("else.data")
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 98, 98])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch"])],
        [external("w", "weights.data")],
        sparse_initializer=[sparse],
    )
    function = helper.make_function(
        "custom",
        "f",
        [],
        ["o"],
        [helper.make_node("Constant", [], ["o"], value=external("fconst", "function.data"))],
        [helper.make_opsetid("", 17)],
    )
    model = helper.make_model(graph, functions=[function])
    refs = read_onnx_refs(write(tmp_path, model))
    assert set(refs.locations) == {
        "weights.data",
        "sparse.data",
        "idx.data",
        "attr.data",
        "then.data",
        "else.data",
        "function.data",
    }
    assert ExternalRef("w", "weights.data") in refs.external
    assert refs.inputs == (ValueSpec("image", ("batch", 3, 98, 98)),)
    assert refs.outputs == (ValueSpec("score", ("batch",)),)  # subgraph outputs are not listed


def test_agrees_with_onnx_on_the_tiny_graphs(tiny_graphs: Path) -> None:
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from cops_deploy.export.bundle_writer import onnx_tensors

    for name in ("vision.onnx", "head.onnx"):
        model = onnx.load(str(tiny_graphs / name), load_external_data=False)
        expected = sorted(
            (t.name, ExternalDataInfo(t).location)
            for t in onnx_tensors(model.graph)
            if uses_external_data(t)
        )
        refs = read_onnx_refs(tiny_graphs / name)
        assert sorted((r.tensor, r.location) for r in refs.external) == expected
        assert refs.locations == (f"{name}.data",)
        assert [v.name for v in refs.inputs] == [v.name for v in model.graph.input]


def test_external_without_location_and_inline_data(tmp_path: Path) -> None:
    inline = helper.make_tensor("inline", TensorProto.FLOAT, [2], [1.0, 2.0])
    graph = helper.make_graph([], "g", [], [], [inline, external("lost", None)])
    refs = read_onnx_refs(write(tmp_path, helper.make_model(graph)))
    assert refs.external == (ExternalRef("lost", None),)


def test_empty_file_is_an_empty_model(tmp_path: Path) -> None:
    (tmp_path / "e.onnx").write_bytes(b"")
    refs = read_onnx_refs(tmp_path / "e.onnx")
    assert (refs.inputs, refs.outputs, refs.external) == ((), (), ())


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x08", r"truncated or overlong varint at byte 1"),
        (b"\x08" + b"\xff" * 11, "truncated or overlong varint"),
        (b"\x3a\x05ab", r"field 7 at byte 2 runs past its message"),
        (b"\x0b", r"unsupported wire type 3 \(field 1\)"),
        (b"\x00\x00", "field number 0"),
        (b"\x38\x01", r"field 7 should be a message \(wire type 2\), got 0"),
        (b"\x09abc", "runs past its message"),
        (b"fake vision graph", "unsupported wire type 6"),
    ],
)
def test_malformed_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "bad.onnx").write_bytes(content)
    with pytest.raises(BundleError, match=rf"bad.onnx is not a valid ONNX model \(.*{message}"):
        read_onnx_refs(tmp_path / "bad.onnx")


def test_non_utf8_name_is_refused(tmp_path: Path) -> None:
    graph = helper.make_graph([], "g", [], [], [external("w", "w.data")])
    data = helper.make_model(graph).SerializeToString().replace(b"w.data", b"\xff.data")
    (tmp_path / "bad.onnx").write_bytes(data)
    with pytest.raises(BundleError, match="is not UTF-8"):
        read_onnx_refs(tmp_path / "bad.onnx")


def _field(number: int, payload: bytes) -> bytes:
    """One length-delimited protobuf field (numbers and lengths here are below 128)."""
    assert number < 16 and len(payload) < 2**14
    length = len(payload)
    size = bytes([length]) if length < 128 else bytes([length & 0x7F | 0x80, length >> 7])
    return bytes([number << 3 | 2]) + size + payload


def nested_model(depth: int) -> bytes:
    """A model whose external tensor sits ``depth`` subgraphs deep (graph.node.attribute.g),
    encoded by hand: the protobuf library refuses to build messages nested this deep."""
    graph = _field(5, external("w", "d.data").SerializeToString())  # graph.initializer
    for _ in range(depth):
        graph = _field(1, _field(5, _field(6, graph)))  # graph.node.attribute.g
    return _field(7, graph)  # model.graph


def test_nesting_is_bounded(tmp_path: Path) -> None:
    (tmp_path / "ok.onnx").write_bytes(nested_model(MAX_GRAPH_NESTING))
    assert read_onnx_refs(tmp_path / "ok.onnx").locations == ("d.data",)
    (tmp_path / "deep.onnx").write_bytes(nested_model(MAX_GRAPH_NESTING + 1))
    with pytest.raises(BundleError, match=f"nested more than {MAX_GRAPH_NESTING} levels"):
        read_onnx_refs(tmp_path / "deep.onnx")


def test_unreadable_path_is_a_bundle_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="cannot read ONNX file"):
        read_onnx_refs(tmp_path / "missing.onnx")


def test_the_module_imports_no_onnx() -> None:
    import subprocess
    import sys

    code = (
        "import sys; import cops_deploy.runtime.onnx_refs, cops_deploy.runtime.bundle; "
        "assert 'onnx' not in sys.modules and 'torch' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
