"""Bundle reader: open the one directory a service loads, and check it against its manifest.

A bundle is ``manifest.json`` (parsed and validated by :mod:`cops_deploy.runtime.manifest`
against ``manifest.schema.json``) plus the ONNX graphs, engines and tables it lists. Opening a
bundle checks:

- ``manifest.json`` and every listed path resolve inside the bundle directory (symlinks
  included; listed paths are canonical relative paths);
- the presence and size of each file and, with ``verify``, its sha256;
- every ONNX file (each listed ``*.onnx`` and each graph file): the external-data locations it
  names are files the manifest lists (so, with ``verify``, files whose sha256 was checked),
  read with the stdlib-only :mod:`cops_deploy.runtime.onnx_refs`; and each graph file's
  inputs and outputs agree with ``manifest.graphs`` (names, rank, fixed dims);
- ``preprocess.size`` fits the vision graph's image input, and the required roles.

Re-checking an opened bundle (:func:`reopen_bundle`, what ``Detector.open`` does with a
:class:`Bundle` it is handed): the size, modification time, change time and inode of every file
(``manifest.json`` included) are recorded when the files are checked; a bundle whose hashes were
verified is re-checked against these stamps (cheap: one ``stat`` per file; the change time
cannot be set back by a user, so a rewrite that restores the modification time is still seen);
a bundle opened without verification is opened again, with it.

An engine's key is checked against the machine it is about to run on. Torch-free: stdlib and
numpy only.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from cops_deploy.errors import BundleError
from cops_deploy.runtime.contract import IMAGE
from cops_deploy.runtime.manifest import (
    FIX_REEXPORT,
    MANIFEST_NAME,
    REQUIRED_ROLES,
    EngineKey,
    FileEntry,
    GraphIO,
    Manifest,
    check_engine_key,
    check_relative_path,
    ort_variant_role,
)
from cops_deploy.runtime.onnx_refs import OnnxRefs, ValueSpec, read_onnx_refs

__all__ = [
    "HASH_CHUNK_BYTES",
    "ONNX_SUFFIX",
    "Bundle",
    "FileStamp",
    "open_bundle",
    "reopen_bundle",
    "sha256_file",
]

ONNX_SUFFIX = ".onnx"  # listed files with this suffix are read as ONNX models when opening

HASH_CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Opening a bundle


@dataclass(frozen=True)
class FileStamp:
    """What ``stat`` says of a bundle file when it was checked (see :meth:`Bundle.check_unchanged`)."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        """The stamp of ``path`` now (symlinks followed)."""
        st = path.stat()
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)

    def difference(self, other: FileStamp) -> str | None:
        """Words for the first field that differs from ``other`` (None when equal)."""
        for name, text in (
            ("size", "size"),
            ("inode", "inode (replaced)"),
            ("device", "device (replaced)"),
            ("mtime_ns", "modification time"),
            ("ctime_ns", "change time"),
        ):
            if getattr(self, name) != getattr(other, name):
                return f"{text} {getattr(self, name)} -> {getattr(other, name)}"
        return None


@dataclass(frozen=True)
class Bundle:
    """An opened bundle: its directory, its parsed manifest, whether hashes were verified, and
    the stamp of every file (``manifest.json`` included) when it was checked."""

    root: Path
    manifest: Manifest
    verified: bool
    stamps: Mapping[str, FileStamp] = field(default_factory=dict, compare=False, repr=False)

    def check_unchanged(self) -> None:
        """BundleError if any file recorded in :attr:`stamps` changed since it was checked
        (size, modification or change time, inode), or vanished."""
        for name, stamp in self.stamps.items():
            path = self.root / name
            try:
                now = FileStamp.of(path)
            except OSError as exc:
                raise BundleError(
                    f"bundle {self.root}: file {name!r} cannot be read any more ({exc}) since "
                    f"the bundle was checked. Fix: copy the bundle again, or re-export it, and "
                    f"open it again."
                ) from exc
            change = stamp.difference(now)
            if change is not None:
                raise BundleError(
                    f"bundle {self.root}: file {name!r} changed since the bundle was checked "
                    f"({change}); a changed file is not run unverified. Fix: open the bundle "
                    f"again (Detector.open(path) verifies every sha256), or restore the file."
                )

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
                f"bundle file {path} is not a pickle-free .npy array ({exc}). {FIX_REEXPORT}"
            ) from exc

    def ort_variant(self, graph: str) -> Path | None:
        """Path of the ONNX Runtime variant of ``graph`` (fused contrib ops, same weights as the
        portable graph), or None when the bundle has none."""
        matches = self.manifest.with_role(ort_variant_role(graph))
        if len(matches) > 1:
            raise BundleError(
                f"bundle {self.root} lists {len(matches)} ONNX Runtime variants of graph "
                f"{graph!r}: {[e.path for e in matches]}; valid: at most one. {FIX_REEXPORT}"
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
        (the message of :func:`cops_deploy.runtime.manifest.check_engine_key`)."""
        name, stored = self.engine_key(engine)
        rebuild = f"cops-export --engine trt --bundle {self.root} --force"
        check_engine_key(stored, current, f"{name!r} in bundle {self.root}", rebuild)
        return self.root / name


def open_bundle(
    path: str | os.PathLike[str],
    verify: bool = True,
    required_roles: Iterable[str] = REQUIRED_ROLES,
) -> Bundle:
    """Open and check a bundle directory (see the module docstring for every check).

    Always checks the manifest, path containment, presence and size of every listed file, the
    ONNX files' external-data locations and inputs/outputs, and the required roles; with
    ``verify`` also each file's sha256 (streamed).
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
            f"interrupted. {FIX_REEXPORT}"
        )
    real_root = root.resolve()
    _check_inside(root, real_root, MANIFEST_NAME)
    stamps = {MANIFEST_NAME: FileStamp.of(manifest_path)}
    try:
        manifest = Manifest.from_json(manifest_path.read_bytes())
    except BundleError as exc:
        raise BundleError(f"bundle {root}: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}. {FIX_REEXPORT}") from exc
    _check_image_size(root, manifest)
    _check_required_roles(root, manifest, required_roles)
    for entry in manifest.files:
        stamps[entry.path] = _check_file(root, real_root, entry, verify)
    _check_onnx_files(root, manifest)
    return Bundle(root=root, manifest=manifest, verified=verify, stamps=stamps)


def reopen_bundle(bundle: Bundle, verify: bool = True) -> Bundle:
    """``bundle`` checked again before it is run (what ``Detector.open`` does with a Bundle).

    A bundle with stamps whose hashes were verified (or, without ``verify``, any bundle with
    stamps) is re-checked against them (:meth:`Bundle.check_unchanged`) and returned; otherwise
    the directory is opened again with :func:`open_bundle` and must hold the same manifest.

    Raises:
        BundleError: a file changed since it was checked, or the bundle is no longer valid.
    """
    if bundle.stamps and (bundle.verified or not verify):
        bundle.check_unchanged()
        return bundle
    fresh = open_bundle(bundle.root, verify=verify)
    if fresh.manifest != bundle.manifest:
        raise BundleError(
            f"bundle {bundle.root}: manifest.json changed since the Bundle was opened. Fix: "
            f"open the bundle again (Detector.open(path)), or restore its manifest.json."
        )
    return fresh


def _check_image_size(root: Path, manifest: Manifest) -> None:
    """preprocess.size is the height and width of the vision graph's image input."""
    vision = manifest.graphs.get("vision")
    images = (
        [] if vision is None else [(i, t) for i, t in enumerate(vision.inputs) if t.name == IMAGE]
    )
    if not images:
        return  # no vision graph: nothing to compare (required roles and backends say more)
    (index, spec), size = images[0], manifest.preprocess.size
    if len(spec.shape) != 4 or tuple(spec.shape[2:]) != (size, size):
        raise BundleError(
            f"bundle {root}: manifest key 'preprocess.size' is {size} but "
            f"'graphs.vision.inputs[{index}].shape' is {list(spec.shape)}; valid: an image "
            f"input of shape [batch, 3, {size}, {size}] (the vision graph takes images of "
            f"preprocess.size). {FIX_REEXPORT}"
        )


def _check_required_roles(root: Path, manifest: Manifest, required: Iterable[str]) -> None:
    present = {e.role for e in manifest.files}
    missing = [r for r in required if r not in present]
    if missing:
        raise BundleError(
            f"bundle {root} lists no file with required role(s) {missing}; roles present: "
            f"{sorted(present)}. {FIX_REEXPORT}"
        )


def _check_inside(root: Path, real_root: Path, name: str) -> Path:
    """The real path of ``root / name``; BundleError if it resolves outside the bundle."""
    real = (root / name).resolve()
    if not real.is_relative_to(real_root):
        raise BundleError(
            f"bundle {root}: file {name!r} resolves to {real}, outside the bundle "
            f"directory (a symlink leaving the bundle?). Fix: copy the file into the bundle "
            f"and re-export; a bundle never points outside itself."
        )
    return real


def _check_file(root: Path, real_root: Path, entry: FileEntry, verify: bool) -> FileStamp:
    """Containment, presence, size and (``verify``) sha256 of one listed file; its stamp."""
    real = _check_inside(root, real_root, entry.path)
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
    stamp = FileStamp.of(real)
    if verify:
        actual = sha256_file(real)
        if actual != entry.sha256:
            raise BundleError(
                f"bundle {root}: file {entry.path!r} has sha256 {actual}, the manifest expects "
                f"{entry.sha256} (corrupted or tampered with). Fix: copy the bundle again, or "
                f"re-export it."
            )
        change = stamp.difference(FileStamp.of(real))
        if change is not None:
            raise BundleError(
                f"bundle {root}: file {entry.path!r} changed while its sha256 was checked "
                f"({change}). Fix: open the bundle again once nothing writes to it."
            )
    return stamp


# ----------------------------------------------------------------------------------------------
# What the ONNX files themselves say


def _onnx_files(manifest: Manifest) -> dict[str, list[str]]:
    """Listed path -> the graphs it must agree with, for every file read as ONNX: each listed
    ``*.onnx`` and each graph file (the ONNX Runtime variant of a graph agrees with it too)."""
    files: dict[str, list[str]] = {
        e.path: [] for e in manifest.files if e.path.endswith(ONNX_SUFFIX)
    }
    for name, graph in manifest.graphs.items():
        files.setdefault(graph.file, []).append(name)
        for entry in manifest.with_role(ort_variant_role(name)):
            files.setdefault(entry.path, []).append(name)
    return files


def _check_onnx_files(root: Path, manifest: Manifest) -> None:
    listed = {e.path for e in manifest.files}
    for path, graphs in _onnx_files(manifest).items():
        refs = read_onnx_refs(root / path, f"bundle {root}: ONNX file {path!r}")
        _check_external_data(root, path, refs, listed)
        for graph in graphs:
            _check_graph_io(root, path, graph, manifest.graphs[graph], refs)


def _check_external_data(root: Path, path: str, refs: OnnxRefs, listed: set[str]) -> None:
    """Every external-data location of the ONNX file ``path`` is a listed file."""
    where = f"bundle {root}: ONNX file {path!r}"
    fix = "Fix: re-export the bundle with cops-export; a graph reads only files its manifest lists."
    for ref in refs.external:
        if ref.location is None:
            raise BundleError(
                f"{where} stores tensor {ref.tensor!r} externally but names no location; valid: "
                f"a location that is a file listed in the manifest. {fix}"
            )
        try:
            check_relative_path(ref.location, f"external-data location of tensor {ref.tensor!r}")
        except BundleError as exc:
            raise BundleError(f"{where}: {exc} {fix}") from exc
        # ONNX Runtime and OpenVINO resolve the location against the graph file's folder.
        target = posixpath.join(PurePosixPath(path).parent.as_posix(), ref.location)
        target = posixpath.normpath(target)
        if target not in listed:
            raise BundleError(
                f"{where} reads tensor {ref.tensor!r} from {target!r}, a file the manifest does "
                f"not list (so its sha256 is never checked); valid: one of the listed files "
                f"{sorted(listed)}. {fix}"
            )


def _check_graph_io(root: Path, path: str, graph: str, io: GraphIO, refs: OnnxRefs) -> None:
    """The ONNX file's inputs are the manifest's, its outputs include the manifest's, and
    every dim both give as a number is the same number."""
    found = {spec.name: spec for spec in (*refs.inputs, *refs.outputs)}
    want_in = sorted(s.name for s in io.inputs)
    got_in = sorted(s.name for s in refs.inputs)
    missing_out = [s.name for s in io.outputs if s.name not in {v.name for v in refs.outputs}]
    if got_in != want_in or missing_out:
        raise BundleError(
            f"bundle {root}: ONNX file {path!r} has inputs {got_in} and outputs "
            f"{sorted(v.name for v in refs.outputs)}, but manifest.graphs.{graph} lists inputs "
            f"{want_in} and outputs {sorted(s.name for s in io.outputs)} (file and manifest "
            f"disagree). {FIX_REEXPORT}"
        )
    for kind, specs in (("inputs", io.inputs), ("outputs", io.outputs)):
        for index, spec in enumerate(specs):
            _check_shape(
                root, path, f"graphs.{graph}.{kind}[{index}]", spec.shape, found[spec.name]
            )


def _check_shape(
    root: Path, path: str, key: str, shape: tuple[int | str, ...], value: ValueSpec
) -> None:
    if value.shape is None:
        return  # the file declares no shape: the backend checks what it gets
    fixed_differ = len(value.shape) != len(shape) or any(
        isinstance(a, int) and isinstance(b, int) and a != b
        for a, b in zip(shape, value.shape, strict=False)
    )
    if fixed_differ:
        raise BundleError(
            f"bundle {root}: manifest key '{key}.shape' is {list(shape)} but ONNX file "
            f"{path!r} gives {value.name!r} the shape {list(value.shape)}; valid: the graph's "
            f"own shape (e.g. preprocess.size must be the image input's height and width). "
            f"{FIX_REEXPORT}"
        )
