"""Test helper: the tampered-bundle set, one table (case -> what is done, expected error, message).

``CASES`` tampers every file kind of a cops-tiny bundle (manifest.json, each graph ``.onnx``,
each ``.onnx.data`` weights file, the (fake) TensorRT engines, the PyTorch weights) and the
references between them (external-data locations, symlinks, graph shapes). ``make_base`` writes
the bundle they start from; ``tampered(base, dest, case)`` copies it and applies one case. The
same table runs through ``Detector.open`` (tests/runtime/test_bundle_integrity.py), ``cops
predict --bundle`` (tests/cli/test_predict_bundle.py) and the HTTP service
(tests/edge/test_service.py), each case under a timeout (:func:`within`).

A bundle carries no OpenVINO compiled cache or IR: OpenVINO reads the listed ONNX files, which
the cases cover.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cops_tiny_bundle

from cops_deploy.errors import BundleError
from cops_deploy.runtime.bundle import sha256_file
from cops_deploy.runtime.manifest import MANIFEST_NAME

TIMEOUT = 120.0  # seconds for any one case on any one surface


@dataclass(frozen=True)
class Case:
    """One way to tamper with a bundle, and how opening it must fail."""

    name: str
    apply: Callable[[Path], None]
    message: str  # a regex that the error message must match
    error: type[Exception] = BundleError


def make_base(graphs: Path, out: Path) -> Path:
    """The bundle every case starts from: both graphs with external data, fake engines, the
    PyTorch weights and a threshold."""
    return cops_tiny_bundle.write_tiny_bundle(
        out, graphs, torch_weights=True, engines=True, threshold=0.5
    )


def tampered(base: Path, dest: Path, case: Case) -> Path:
    """A copy of ``base`` at ``dest`` with ``case`` applied (symlinks copied as links)."""
    shutil.copytree(base, dest, symlinks=True)
    case.apply(dest)
    return dest


def within(seconds: float, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, or TimeoutError if it has not returned after ``seconds``."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise TimeoutError(f"{getattr(fn, '__name__', fn)} hung for more than {seconds} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ----------------------------------------------------------------------------------------------
# Tampering primitives


def _manifest(root: Path) -> dict[str, Any]:
    return json.loads((root / MANIFEST_NAME).read_text())


def _write_manifest(root: Path, data: dict[str, Any]) -> None:
    (root / MANIFEST_NAME).write_text(json.dumps(data))


def _rehash(root: Path, name: str) -> None:
    """Make the manifest agree with the file ``name`` again (a consistent forgery)."""
    data = _manifest(root)
    for entry in data["files"]:
        if entry["path"] == name:
            entry["sha256"], entry["size"] = sha256_file(root / name), (root / name).stat().st_size
    _write_manifest(root, data)


def flip(name: str) -> Callable[[Path], None]:
    """Flip one bit in the middle of ``name`` (same size: only the sha256 can see it)."""

    def apply(root: Path) -> None:
        path = root / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))

    return apply


def edit_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        data = _manifest(root)
        change(data)
        _write_manifest(root, data)

    return apply


def write_manifest_bytes(content: bytes) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        (root / MANIFEST_NAME).write_bytes(content)

    return apply


def nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def _truncate(root: Path) -> None:
    path = root / "vision.onnx.data"
    path.write_bytes(path.read_bytes()[:-100])


def _symlink_out(name: str) -> Callable[[Path], None]:
    """Move ``name`` beside the bundle and leave a symlink to it (same bytes, outside)."""

    def apply(root: Path) -> None:
        outside = root.parent / f"{root.name}-outside-{Path(name).name}"
        shutil.move(root / name, outside)
        (root / name).symlink_to(outside)

    return apply


def repoint(graph: str, location: str, copy_to: str | None = None) -> Callable[[Path], None]:
    """Point every external tensor of ``graph`` at ``location`` (optionally copying the real
    data there first) and make the manifest agree with the rewritten graph."""

    def apply(root: Path) -> None:
        import onnx
        from onnx.external_data_helper import uses_external_data

        from cops_deploy.export.bundle_writer import onnx_tensors

        if copy_to is not None:
            shutil.copyfile(root / f"{graph}.data", root / copy_to)
        model = onnx.load(str(root / graph), load_external_data=False)
        for tensor in onnx_tensors(model.graph):
            if uses_external_data(tensor):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = location
        (root / graph).write_bytes(model.SerializeToString())
        _rehash(root, graph)

    return apply


def _garble_consistently(root: Path) -> None:
    (root / "head.onnx").write_bytes(b"\xff" * 64)
    _rehash(root, "head.onnx")


def _image_size(data: dict[str, Any]) -> None:
    """preprocess.size 112 everywhere in the manifest, while vision.onnx takes 98x98."""
    data["model_config"]["preprocess"]["size"] = 112
    data["model_config"]["vision"]["input_size"] = 112
    data["preprocess"]["size"] = 112
    data["graphs"]["vision"]["inputs"][0]["shape"] = ["batch", 3, 112, 112]


def _rename_input(data: dict[str, Any]) -> None:
    data["graphs"]["vision"]["inputs"][0]["name"] = "pixels"


def _move_manifest_out(root: Path) -> None:
    outside = root.parent / f"{root.name}-outside-manifest.json"
    shutil.move(root / MANIFEST_NAME, outside)
    (root / MANIFEST_NAME).symlink_to(outside)


def _sha(name: str, value: str) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        for entry in data["files"]:
            if entry["path"] == name:
                entry["sha256"] = value

    return change


def set_key(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(data: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = data
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        node[int(last) if isinstance(node, list) else last] = value

    return change


def _sha_message(name: str) -> str:
    return rf"'{name}' has sha256 [0-9a-f]{{64}}, the manifest expects"


WEIGHTS = [
    "vision.onnx",
    "vision.onnx.data",
    "head.onnx",
    "head.onnx.data",
    "vision.engine",
    "head.engine",
    "torch/model.safetensors",
    "torch/config.json",
]

CASES: list[Case] = [
    # every listed file, one bit flipped (same size)
    *[Case(f"flip {name}", flip(name), _sha_message(name)) for name in WEIGHTS],
    # sizes, presence, symlinks
    Case("truncated vision.onnx.data", _truncate, r"'vision.onnx.data' has \d+ bytes"),
    Case(
        "missing head.onnx.data",
        lambda root: (root / "head.onnx.data").unlink(),
        r"'head.onnx.data' \(role 'head_onnx_data'\) is missing",
    ),
    Case(
        "vision.onnx.data symlinked out",
        _symlink_out("vision.onnx.data"),
        r"'vision.onnx.data' resolves to .* outside the bundle",
    ),
    # manifest.json itself
    Case("manifest symlinked out", _move_manifest_out, r"'manifest.json' resolves to .* outside"),
    Case("manifest not JSON", write_manifest_bytes(b"{oops"), "is not valid JSON"),
    Case("manifest empty", write_manifest_bytes(b""), "is not valid JSON"),
    Case("manifest not UTF-8", write_manifest_bytes(b"\xff\xfe{}"), "is not UTF-8"),
    Case(
        "manifest nested past the parser",
        write_manifest_bytes(b"[" * 100_000 + b"]" * 100_000),
        r"cannot be parsed \(RecursionError",
    ),
    Case(
        "manifest nested 40 deep",
        edit_manifest(set_key("parity/x", nested(40))),
        r"nests more than 32 levels",
    ),
    Case("manifest files not a list", edit_manifest(set_key("files", "x")), r"'files' is 'x'"),
    Case(
        "manifest number too large",
        edit_manifest(set_key("model_config/head/alpha", 10**400)),
        r"alpha|OverflowError",
    ),
    Case(
        "manifest sha256 of the weights edited",
        edit_manifest(_sha("vision.onnx.data", "0" * 64)),
        _sha_message("vision.onnx.data"),
    ),
    # what the ONNX files point at
    Case(
        "vision.onnx reads an unlisted file",
        repoint("vision.onnx", "stolen.data", copy_to="stolen.data"),
        r"'vision.onnx' reads tensor .* from 'stolen.data', a file the manifest does not list",
    ),
    Case(
        "head.onnx reads outside with ..",
        repoint("head.onnx", "../head.onnx.data"),
        r"'head.onnx'.* escapes the bundle with '\.\.'",
    ),
    Case(
        "head.onnx reads an absolute path",
        repoint("head.onnx", "/etc/passwd"),
        r"'head.onnx'.* is absolute",
    ),
    Case("head.onnx not ONNX", _garble_consistently, r"'head.onnx' is not a valid ONNX model"),
    # the manifest and the graphs disagree
    Case(
        "preprocess size vs graph",
        edit_manifest(_image_size),
        r"'graphs.vision.inputs\[0\].shape' is \['batch', 3, 112, 112\] but ONNX file "
        r"'vision.onnx' gives 'image' the shape \['batch', 3, 98, 98\]",
    ),
    Case(
        "graph input renamed",
        edit_manifest(_rename_input),
        r"'vision.onnx' has inputs \['image'\].*file and manifest disagree",
    ),
]
CASE_IDS = [case.name for case in CASES]
