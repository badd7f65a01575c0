"""Bundle writer: builds a bundle in a temp directory and moves it into place atomically.

Files are staged in a hidden temp directory next to the output (same filesystem, so the final
``rename`` is atomic). On a clean exit of the ``with`` block the writer hashes every file, writes
``manifest.json``, re-reads it with the run-side reader and renames the directory into place.
An existing bundle is replaced only with ``force=True``, by moving it aside first, so a failure
never leaves neither bundle. On an exception nothing changes and the temp directory is removed.

Temporaries: every hidden folder made beside a bundle ``OUT`` is named
``.OUT.<kind>-<pid>-<random>`` (:func:`make_temp_dir`; kinds ``tmp``, ``work``, ``old``,
``engines``). A process killed before it could clean up (SIGKILL, power loss) leaves them; the
next writer of ``OUT`` removes those whose process no longer runs on this machine
(:func:`clean_stale_temporaries`), and never one of a live export. Folders and files are created
with the umask's permissions, like any other tool's (a bundle is 0755 under umask 022).
No torch here; ``onnx`` is imported only by ``add_onnx``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import secrets
import shutil
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from cops_deploy.configs import CopsCfg
from cops_deploy.errors import BundleError, MissingDependencyError
from cops_deploy.extras import BUILD_INSTALL
from cops_deploy.runtime.bundle import open_bundle, sha256_file
from cops_deploy.runtime.manifest import (
    MANIFEST_NAME,
    REQUIRED_ROLES,
    ROLE_ENGINE,
    SCHEMA_VERSION,
    EngineKey,
    FileEntry,
    GraphIO,
    Manifest,
    Provenance,
    check_relative_path,
    external_data_role,
)
from cops_deploy.version import __version__

__all__ = [
    "TEMP_KINDS",
    "BundleWriter",
    "clean_stale_temporaries",
    "make_temp_dir",
    "onnx_external_data_files",
    "onnx_tensors",
    "replace_dir",
]

TEMP_KINDS = ("tmp", "work", "old", "engines")

_PathLike = str | os.PathLike[str]
_UNSET: Any = object()
_REQUIRED_METADATA = ("model_config", "graphs", "provenance")


def onnx_external_data_files(onnx_path: _PathLike) -> list[str]:
    """Relative locations of the external-data files an ONNX model refers to (sorted, unique)."""
    try:
        import onnx
        from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    except ImportError as exc:  # pragma: no cover - onnx is a build-side dependency
        raise MissingDependencyError(
            f"adding an ONNX file with external data needs the 'onnx' package. Fix: {BUILD_INSTALL}"
        ) from exc
    try:
        model = onnx.load(os.fspath(onnx_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and others without a common base
        raise BundleError(f"cannot read ONNX file {onnx_path}: {exc}") from exc
    locations = {
        ExternalDataInfo(t).location for t in onnx_tensors(model.graph) if uses_external_data(t)
    }
    return sorted(locations)


def onnx_tensors(graph: Any) -> Iterable[Any]:
    """Every TensorProto of a graph: initializers, sparse ones, and attributes, recursively."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from onnx_tensors(attr.g)
            for sub in attr.graphs:
                yield from onnx_tensors(sub)


class BundleWriter:
    """Write a bundle atomically: ``with BundleWriter(out) as w: w.add_onnx(...); ...``."""

    def __init__(
        self,
        out_dir: _PathLike,
        force: bool = False,
        required_roles: Iterable[str] = REQUIRED_ROLES,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.force = force
        self.required_roles = tuple(required_roles)
        self._tmp: Path | None = None
        self._roles: dict[str, str] = {}  # bundle-relative path -> role, in insertion order
        self._engines: dict[str, EngineKey] = {}
        self._meta: dict[str, Any] = {
            "parity": {},
            "threshold": None,
            "tool_versions": {},
            "package_version": __version__,
        }
        self.manifest: Manifest | None = None  # set after a successful commit

    # -- context management --------------------------------------------------------------------

    def __enter__(self) -> BundleWriter:
        if self._tmp is not None:
            raise BundleError(f"BundleWriter for {self.out_dir} is already open; open it once.")
        clean_stale_temporaries(self.out_dir)  # first: it may put a bundle back in place
        self._check_target()
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = make_temp_dir(self.out_dir, "tmp")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        tmp = self._tmp
        self._tmp = None
        if tmp is None:
            return
        try:
            if exc_type is None:
                self._commit(tmp)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    @property
    def staging_dir(self) -> Path:
        """The temp directory files are staged in (valid inside the ``with`` block only)."""
        return self._staging()

    # -- adding files --------------------------------------------------------------------------

    def add_file(
        self,
        src: _PathLike,
        role: str,
        name: str | None = None,
        companions: Sequence[_PathLike] = (),
    ) -> str:
        """Copy ``src`` into the bundle as ``name`` (default: its file name); returns the name.

        ``companions`` (e.g. ``model.onnx.data``) must sit in ``src``'s directory tree; each keeps
        its path relative to ``src`` and gets role ``external_data_role(role)``.
        """
        src = Path(src)
        if not src.is_file():
            raise BundleError(f"cannot add {src} to the bundle: it is not an existing file.")
        name = name if name is not None else src.name
        dest_dir = Path(name).parent
        planned = [(src, name, role)]
        for comp in companions:
            rel = _relative_to(Path(comp), src.parent, src)
            planned.append((Path(comp), (dest_dir / rel).as_posix(), external_data_role(role)))
        for comp_src, dest_name, _ in planned:
            self._claim(dest_name)
            if not comp_src.is_file():
                raise BundleError(
                    f"companion file {comp_src} of {src} does not exist. Fix: keep the model's "
                    f"external-data file(s) beside it, or re-save the model."
                )
        for comp_src, dest_name, comp_role in planned:
            target = self._target(dest_name)
            shutil.copyfile(comp_src, target)
            self._roles[dest_name] = comp_role
        return name

    def add_onnx(self, src: _PathLike, role: str, name: str | None = None) -> str:
        """Copy an ONNX model and every external-data file it refers to; returns its name."""
        src = Path(src)
        if not src.is_file():
            raise BundleError(f"cannot add ONNX file {src}: it is not an existing file.")
        locations = onnx_external_data_files(src)
        for loc in locations:
            check_relative_path(loc, f"external-data location in {src}")
        return self.add_file(src, role, name, companions=[src.parent / loc for loc in locations])

    def add_bytes(self, data: bytes, name: str, role: str) -> str:
        """Write ``data`` into the bundle as ``name``; returns the name."""
        self._claim(name)
        self._target(name).write_bytes(bytes(data))
        self._roles[name] = role
        return name

    def add_array(self, array: np.ndarray, name: str, role: str) -> str:
        """Save ``array`` as a pickle-free ``.npy`` named ``name``; returns the name."""
        if not name.endswith(".npy"):
            raise BundleError(f"array file name {name!r} must end in '.npy'; e.g. {name}.npy.")
        array = np.asarray(array)
        if array.dtype.hasobject:
            raise BundleError(
                f"array {name!r} has dtype {array.dtype}, which needs pickle; valid: numeric or "
                f"bool dtypes. Fix: convert it, e.g. array.astype(np.float32)."
            )
        self._claim(name)
        with open(self._target(name), "wb") as fh:
            np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
        self._roles[name] = role
        return name

    def add_engine(
        self, src: _PathLike, key: EngineKey, name: str | None = None, role: str = ROLE_ENGINE
    ) -> str:
        """Copy a TensorRT engine and record the key it is tied to; returns its name."""
        if not isinstance(key, EngineKey):
            raise BundleError(f"engine key for {src} is {type(key).__name__}; pass an EngineKey.")
        name = self.add_file(src, role, name)
        self._engines[name] = key
        return name

    def set_metadata(
        self,
        *,
        model_config: CopsCfg | Mapping[str, Any] = _UNSET,
        graphs: Mapping[str, GraphIO | Mapping[str, Any]] = _UNSET,
        provenance: Provenance | Mapping[str, Any] = _UNSET,
        parity: Mapping[str, Any] = _UNSET,
        threshold: float | None = _UNSET,
        tool_versions: Mapping[str, str] = _UNSET,
        package_version: str = _UNSET,
    ) -> None:
        """Set manifest fields (dataclasses or their dict form; validated when the block ends).

        May be called several times: the last value given for a field wins. The manifest's
        ``preprocess`` is not set here: it is derived from ``model_config`` (its ``preprocess``
        section), and the head parameters are ``model_config``'s ``head`` section.
        """
        given = {
            "model_config": model_config,
            "graphs": graphs,
            "provenance": provenance,
            "parity": parity,
            "threshold": threshold,
            "tool_versions": tool_versions,
            "package_version": package_version,
        }
        for key, value in given.items():
            if value is not _UNSET:
                self._meta[key] = value

    # -- internals -----------------------------------------------------------------------------

    def _staging(self) -> Path:
        if self._tmp is None:
            raise BundleError(
                f"BundleWriter for {self.out_dir} is not open. Fix: use it as "
                f"`with BundleWriter(out_dir) as writer: ...`."
            )
        return self._tmp

    def _claim(self, name: str) -> None:
        self._staging()
        check_relative_path(name, "bundle file name")
        if name in self._roles:
            raise BundleError(f"bundle file name {name!r} is already used; choose another name.")

    def _target(self, name: str) -> Path:
        target = self._staging() / name
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def _check_target(self) -> None:
        """Refuse an existing output unless forced; never replace something that is no bundle."""
        out = self.out_dir
        if not out.exists() and not out.is_symlink():
            return
        if not self.force:
            raise BundleError(
                f"bundle directory {out} already exists; refusing to overwrite it. Fix: pass "
                f"--force (force=True) to replace it, or choose another output directory."
            )
        is_bundle = out.is_dir() and (out / MANIFEST_NAME).is_file()
        is_empty_dir = out.is_dir() and not any(out.iterdir())
        if not (is_bundle or is_empty_dir):
            raise BundleError(
                f"{out} exists and is not a bundle (no {MANIFEST_NAME}); --force replaces only "
                f"bundles. Fix: remove it yourself, or choose another output directory."
            )

    def _build_manifest(self, tmp: Path) -> Manifest:
        missing = [k for k in _REQUIRED_METADATA if k not in self._meta]
        if missing:
            raise BundleError(
                f"bundle {self.out_dir}: manifest field(s) {missing} were never set. Fix: call "
                f"writer.set_metadata({', '.join(f'{k}=...' for k in missing)}) before the "
                f"`with` block ends."
            )
        files = []
        for name in sorted(self._roles):
            path = tmp / name
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            files.append(FileEntry(name, sha256_file(path), path.stat().st_size, self._roles[name]))
        meta = self._meta
        model_config = _jsonable(meta["model_config"])
        data = {
            **{k: _jsonable(v) for k, v in meta.items()},
            "schema_version": SCHEMA_VERSION,
            "preprocess": _derived_preprocess(self.out_dir, model_config),
            "files": [f.to_dict() for f in files],
            "engines": {k: key.to_dict() for k, key in self._engines.items()},
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "tool_versions": {
                "cops_deploy": __version__,
                "python": platform.python_version(),
                "numpy": np.__version__,
                **_jsonable(meta["tool_versions"]),
            },
        }
        try:
            text = json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise BundleError(
                f"bundle {self.out_dir}: manifest is not strict JSON ({exc}); valid: numbers "
                f"(no NaN/inf), strings, booleans, null, lists and objects. Fix: convert the "
                f"values passed to set_metadata."
            ) from exc
        # Parse with the run-side reader: the writer never emits what the reader refuses.
        try:
            return Manifest.from_json(text)
        except BundleError as exc:
            raise BundleError(
                f"bundle {self.out_dir}: the values given to BundleWriter.set_metadata are "
                f"invalid: {exc}"
            ) from exc

    def _commit(self, tmp: Path) -> None:
        present = set(self._roles.values())
        missing = [r for r in self.required_roles if r not in present]
        if missing:
            raise BundleError(
                f"bundle {self.out_dir} has no file with required role(s) {missing}; roles "
                f"added: {sorted(present)}. Fix: add them (e.g. writer.add_onnx(path, "
                f"role={missing[0]!r})), or pass required_roles= to BundleWriter."
            )
        manifest = self._build_manifest(tmp)
        manifest_path = tmp / MANIFEST_NAME
        with open(manifest_path, "w", encoding="utf-8") as fh:
            fh.write(manifest.to_json())
            fh.flush()
            os.fsync(fh.fileno())
        open_bundle(tmp, verify=False, required_roles=self.required_roles)
        _fsync_dir(tmp)
        self._move_into_place(tmp)
        self.manifest = manifest

    def _move_into_place(self, tmp: Path) -> None:
        self._check_target()
        replace_dir(tmp, self.out_dir, what="bundle")


def replace_dir(tmp: Path, out: Path, what: str = "folder") -> None:
    """Rename the finished folder ``tmp`` to ``out``. An existing ``out`` is renamed aside first
    and put back if the rename fails, so a failure never leaves neither; the old one is then
    deleted (a warning, not an error, if that fails)."""
    if not out.exists() and not out.is_symlink():
        os.rename(tmp, out)
        _fsync_dir(out.parent)
        return
    aside = _temp_name(out, "old")
    os.rename(out, aside)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(aside, out)
        raise
    _fsync_dir(out.parent)
    try:
        if aside.is_dir() and not aside.is_symlink():
            shutil.rmtree(aside)
        else:
            aside.unlink()
    except OSError as exc:
        warnings.warn(
            f"new {what} is in place at {out}, but the old one could not be deleted from "
            f"{aside}: {exc}. Remove it by hand.",
            RuntimeWarning,
            stacklevel=3,
        )


def _temp_name(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(6)}"


def make_temp_dir(out: str | os.PathLike[str], kind: str) -> Path:
    """A new, empty hidden folder beside ``out`` named ``.OUT.<kind>-<pid>-<random>`` (see the
    module docstring), mode 0777 less the umask (``tempfile.mkdtemp`` would make it 0700)."""
    out = Path(out)
    if kind not in TEMP_KINDS:
        raise BundleError(f"unknown temporary kind {kind!r}; valid: {list(TEMP_KINDS)}.")
    for _ in range(100):
        path = _temp_name(out, kind)
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return path
    raise BundleError(f"no free temporary folder name beside {out} after 100 tries.")


def _process_runs(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (a process of another user counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def clean_stale_temporaries(out: str | os.PathLike[str]) -> list[Path]:
    """Remove the hidden temporaries beside ``out`` (:func:`make_temp_dir` names) whose process
    no longer runs; returns what was removed. Temporaries of a live process are kept.

    One exception: a process killed while replacing ``out`` (between moving the old bundle
    aside and moving the new one in) leaves no ``out`` and the old bundle in an ``old``
    folder; that folder is moved back to ``out`` instead of being removed."""
    out = Path(out)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{'|'.join(TEMP_KINDS)})-(\d+)-[0-9a-f]+$")
    removed: list[Path] = []
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return removed  # no parent folder yet: nothing can be left there
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or _process_runs(int(match.group(1))):
            continue
        restorable = (
            entry.name.startswith(f".{out.name}.old-") and (entry / MANIFEST_NAME).is_file()
        )
        if restorable and not out.exists() and not out.is_symlink():
            os.rename(entry, out)  # the interrupted replacement's old bundle, back in place
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def _jsonable(value: Any) -> Any:
    """Manifest parts (dataclasses with ``to_dict``) and mappings, as plain JSON values."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if isinstance(value, Mapping):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _derived_preprocess(out_dir: Path, model_config: Any) -> Any:
    """The manifest's ``preprocess``: a copy of ``model_config``'s (the reader checks they agree)."""
    if not isinstance(model_config, Mapping) or "preprocess" not in model_config:
        given = (
            f"an object with keys {sorted(model_config, key=str)}"
            if isinstance(model_config, Mapping)
            else f"a {type(model_config).__name__}"
        )
        raise BundleError(
            f"bundle {out_dir}: model_config is {given}, with no 'preprocess' section; valid: "
            f"a CoPS config (the manifest's preprocess is derived from it). Fix: pass "
            f"set_metadata(model_config=cfg) or model_config=cfg.to_dict()."
        )
    return model_config["preprocess"]


def _relative_to(path: Path, base: Path, model: Path) -> Path:
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(base))
    except ValueError as exc:
        raise BundleError(
            f"companion file {path} does not sit beside {model} (under {base}); external data is "
            f"located relative to its model. Fix: move it into {base}, or re-save the model."
        ) from exc


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (best effort: some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
