"""What an ONNX file makes a runtime read: its external-data locations and its graph's inputs.

A bundle's manifest lists every file with its sha256, but an ONNX file names its own
external-data files (``TensorProto.external_data``, key ``location``), which ONNX Runtime and
OpenVINO open relative to the graph. :func:`read_onnx_refs` reads those locations, and the
names and shapes of the main graph's inputs and outputs, so that opening a bundle can refuse a
graph that reads an unlisted file or disagrees with the manifest, before any backend loads it.

Why a hand-written reader: the ``onnx`` package is a build-side dependency, not part of the
base or ``[cpu]`` install (the run side must stay light), and ONNX Runtime offers no API that
lists a model's external-data locations (it only loads them). The reader decodes the protobuf
wire format (varints and length-delimited fields: https://protobuf.dev/programming-guides/
encoding/) for the handful of ONNX messages that can hold a tensor or a graph, using the
field numbers of ``onnx.proto`` (tests/runtime/test_onnx_refs.py reads models the
``onnx`` package writes, with a reference in every place a tensor can sit). Every other field,
weights included, is skipped without being read, so a file with its weights inline costs no
more than one without. Torch-free, stdlib only.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from pathlib import Path

from cops_deploy.errors import BundleError

__all__ = ["MAX_GRAPH_NESTING", "ExternalRef", "OnnxRefs", "ValueSpec", "read_onnx_refs"]

MAX_GRAPH_NESTING = 64  # subgraphs inside subgraphs (If/Loop bodies); deeper is refused

# Field numbers of onnx.proto (ir_version 10).
_MODEL_GRAPH, _MODEL_TRAINING_INFO, _MODEL_FUNCTIONS = 7, 20, 25
_TRAINING_GRAPHS = (1, 2)  # initialization, algorithm
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12
_NODE_ATTRIBUTE = 5
_FUNCTION_NODE, _FUNCTION_ATTRIBUTE_PROTO = 7, 11
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS = 22, 23
_SPARSE_TENSORS = (1, 2)  # values, indices
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_TYPE_SHAPE = 2
_SHAPE_DIM = 1
_DIM_VALUE, _DIM_PARAM = 1, 2

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class ExternalRef:
    """One tensor stored outside the ONNX file: the tensor's name and the ``location`` given."""

    tensor: str
    location: str | None  # None: data_location is EXTERNAL but no location is given


@dataclass(frozen=True)
class ValueSpec:
    """A graph input or output: its name and shape (ints, names of dynamic dims, or None for a
    dim with neither; ``shape`` None when the file declares no shape)."""

    name: str
    shape: tuple[int | str | None, ...] | None


@dataclass(frozen=True)
class OnnxRefs:
    """What :func:`read_onnx_refs` found in one ONNX file."""

    inputs: tuple[ValueSpec, ...]
    outputs: tuple[ValueSpec, ...]
    external: tuple[ExternalRef, ...]

    @property
    def locations(self) -> tuple[str | None, ...]:
        """The distinct external-data locations, in order of first use."""
        return tuple(dict.fromkeys(ref.location for ref in self.external))


class _Malformed(Exception):
    """Internal: the bytes are not the protobuf encoding of an ONNX model."""


def read_onnx_refs(path: str | os.PathLike[str], what: str | None = None) -> OnnxRefs:
    """The external-data references and main-graph inputs/outputs of the ONNX file ``path``.

    ``what`` names the file in messages (default: its path).

    Raises:
        BundleError: the file cannot be read, or is not a protobuf-encoded ONNX model (the
            message names the file and the byte offset).
    """
    path = Path(path)
    what = what or str(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return _Reader(b"").model()
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    return _Reader(view).model()
                finally:
                    view.release()
    except _Malformed as exc:
        raise BundleError(
            f"{what} is not a valid ONNX model ({exc}); valid: an ONNX file written by "
            f"cops-export. Fix: re-export the bundle with cops-export."
        ) from exc
    except (OSError, ValueError, BufferError) as exc:
        raise BundleError(f"cannot read ONNX file {what}: {exc}") from exc


class _Reader:
    """Walks the wire format of one buffer; every method takes a (start, end) byte span."""

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = data
        self.inputs: list[ValueSpec] = []
        self.outputs: list[ValueSpec] = []
        self.external: list[ExternalRef] = []

    # -- the wire format -----------------------------------------------------------------------

    def _varint(self, pos: int, end: int) -> tuple[int, int]:
        result, shift = 0, 0
        while True:
            if pos >= end or shift > 63:
                raise _Malformed(f"truncated or overlong varint at byte {pos}")
            byte = self.data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result, pos
            shift += 7

    def _fields(self, start: int, end: int):  # -> Iterator[(field, wire, value or (s, e))]
        pos = start
        while pos < end:
            key, pos = self._varint(pos, end)
            field, wire = key >> 3, key & 7
            if field == 0:
                raise _Malformed(f"field number 0 at byte {pos}")
            if wire == _VARINT:
                value, pos = self._varint(pos, end)
                yield field, wire, value
            elif wire == _LENGTH:
                length, pos = self._varint(pos, end)
                if pos + length > end:
                    raise _Malformed(f"field {field} at byte {pos} runs past its message")
                yield field, wire, (pos, pos + length)
                pos += length
            elif wire in (_FIXED64, _FIXED32):
                pos += 8 if wire == _FIXED64 else 4
                if pos > end:
                    raise _Malformed(f"field {field} runs past its message at byte {end}")
            else:
                raise _Malformed(f"unsupported wire type {wire} (field {field}) at byte {pos}")

    def _sub(self, field: int, wire: int, value: object) -> tuple[int, int]:
        if wire != _LENGTH:
            raise _Malformed(f"field {field} should be a message (wire type 2), got {wire}")
        return value  # type: ignore[return-value]

    def _text(self, field: int, wire: int, value: object) -> str:
        start, end = self._sub(field, wire, value)
        try:
            return bytes(self.data[start:end]).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _Malformed(f"string field {field} at byte {start} is not UTF-8") from exc

    # -- ONNX messages -------------------------------------------------------------------------

    def model(self) -> OnnxRefs:
        for field, wire, value in self._fields(0, len(self.data)):
            if field == _MODEL_GRAPH:
                self._graph(*self._sub(field, wire, value), depth=0, main=True)
            elif field == _MODEL_FUNCTIONS:
                self._function(*self._sub(field, wire, value))
            elif field == _MODEL_TRAINING_INFO:
                for f, w, v in self._fields(*self._sub(field, wire, value)):
                    if f in _TRAINING_GRAPHS:
                        self._graph(*self._sub(f, w, v), depth=1, main=False)
        return OnnxRefs(tuple(self.inputs), tuple(self.outputs), tuple(self.external))

    def _graph(self, start: int, end: int, depth: int, main: bool) -> None:
        if depth > MAX_GRAPH_NESTING:
            raise _Malformed(f"subgraphs nested more than {MAX_GRAPH_NESTING} levels deep")
        for field, wire, value in self._fields(start, end):
            if field == _GRAPH_NODE:
                self._node(*self._sub(field, wire, value), depth, _NODE_ATTRIBUTE)
            elif field == _GRAPH_INITIALIZER:
                self._tensor(*self._sub(field, wire, value))
            elif field == _GRAPH_SPARSE_INITIALIZER:
                self._sparse(*self._sub(field, wire, value))
            elif main and field in (_GRAPH_INPUT, _GRAPH_OUTPUT):
                spec = self._value_info(*self._sub(field, wire, value))
                (self.inputs if field == _GRAPH_INPUT else self.outputs).append(spec)

    def _function(self, start: int, end: int) -> None:
        for field, wire, value in self._fields(start, end):
            if field == _FUNCTION_NODE:
                self._node(*self._sub(field, wire, value), 1, _NODE_ATTRIBUTE)
            elif field == _FUNCTION_ATTRIBUTE_PROTO:
                self._attribute(*self._sub(field, wire, value), 1)

    def _node(self, start: int, end: int, depth: int, attribute_field: int) -> None:
        for field, wire, value in self._fields(start, end):
            if field == attribute_field:
                self._attribute(*self._sub(field, wire, value), depth)

    def _attribute(self, start: int, end: int, depth: int) -> None:
        for field, wire, value in self._fields(start, end):
            if field in (_ATTR_TENSOR, _ATTR_TENSORS):
                self._tensor(*self._sub(field, wire, value))
            elif field in (_ATTR_GRAPH, _ATTR_GRAPHS):
                self._graph(*self._sub(field, wire, value), depth=depth + 1, main=False)
            elif field in (_ATTR_SPARSE_TENSOR, _ATTR_SPARSE_TENSORS):
                self._sparse(*self._sub(field, wire, value))

    def _sparse(self, start: int, end: int) -> None:
        for field, wire, value in self._fields(start, end):
            if field in _SPARSE_TENSORS:
                self._tensor(*self._sub(field, wire, value))

    def _tensor(self, start: int, end: int) -> None:
        name, external, location = "", False, None
        for field, wire, value in self._fields(start, end):
            if field == _TENSOR_NAME:
                name = self._text(field, wire, value)
            elif field == _TENSOR_DATA_LOCATION and wire == _VARINT:
                external = value == _EXTERNAL
            elif field == _TENSOR_EXTERNAL_DATA:
                key, text = self._entry(*self._sub(field, wire, value))
                if key == "location":
                    location = text
        if external or location is not None:
            self.external.append(ExternalRef(name, location))

    def _entry(self, start: int, end: int) -> tuple[str, str]:
        key = text = ""
        for field, wire, value in self._fields(start, end):
            if field == _ENTRY_KEY:
                key = self._text(field, wire, value)
            elif field == _ENTRY_VALUE:
                text = self._text(field, wire, value)
        return key, text

    def _value_info(self, start: int, end: int) -> ValueSpec:
        name, shape = "", None
        for field, wire, value in self._fields(start, end):
            if field == _VALUE_NAME:
                name = self._text(field, wire, value)
            elif field == _VALUE_TYPE:
                for f, w, v in self._fields(*self._sub(field, wire, value)):
                    if f == _TYPE_TENSOR:
                        shape = self._tensor_type_shape(*self._sub(f, w, v))
        return ValueSpec(name, shape)

    def _tensor_type_shape(self, start: int, end: int) -> tuple[int | str | None, ...] | None:
        shape = None
        for field, wire, value in self._fields(start, end):
            if field == _TENSOR_TYPE_SHAPE:
                dims = []
                for f, w, v in self._fields(*self._sub(field, wire, value)):
                    if f == _SHAPE_DIM:
                        dims.append(self._dim(*self._sub(f, w, v)))
                shape = tuple(dims)
        return shape

    def _dim(self, start: int, end: int) -> int | str | None:
        dim: int | str | None = None
        for field, wire, value in self._fields(start, end):
            if field == _DIM_VALUE and wire == _VARINT:
                dim = value if value < 1 << 63 else value - (1 << 64)  # int64
            elif field == _DIM_PARAM:
                dim = self._text(field, wire, value)
        return dim
