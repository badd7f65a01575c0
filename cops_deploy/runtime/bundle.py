"""Bundle reader: open the one directory a service loads, and check it against its manifest.

A bundle is ``manifest.json`` (parsed and validated by :mod:`cops_deploy.runtime.manifest`
against ``manifest.schema.json``) plus the ONNX graphs, engines and tables it lists. Opening a
bundle checks that every listed path is a canonical relative path that stays inside the bundle
directory (symlinks included), the presence and size of each file and, with ``verify``, its
sha256; that ``preprocess.size`` fits the vision graph's image input; and the required roles.
An engine's key is checked against the machine it is about to run on. Torch-free: stdlib and
numpy only.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cops_deploy.errors import BundleError
from cops_deploy.runtime.contract import IMAGE
from cops_deploy.runtime.manifest import (
    FIX_REEXPORT,
    MANIFEST_NAME,
    REQUIRED_ROLES,
    EngineKey,
    FileEntry,
    Manifest,
    check_engine_key,
    ort_variant_role,
)

__all__ = ["HASH_CHUNK_BYTES", "Bundle", "open_bundle", "sha256_file"]

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
class Bundle:
    """An opened bundle: its directory, its parsed manifest, and whether hashes were verified."""

    root: Path
    manifest: Manifest
    verified: bool

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
    """Open and check a bundle directory.

    Always checks the manifest, path containment, presence and size of every listed file and
    the required roles; with ``verify`` also each file's sha256 (streamed).
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
    try:
        manifest = Manifest.from_json(manifest_path.read_bytes())
    except BundleError as exc:
        raise BundleError(f"bundle {root}: {exc}") from exc
    except OSError as exc:
        raise BundleError(f"cannot read {manifest_path}: {exc}. {FIX_REEXPORT}") from exc
    _check_image_size(root, manifest)
    _check_required_roles(root, manifest, required_roles)
    real_root = root.resolve()
    for entry in manifest.files:
        _check_file(root, real_root, entry, verify)
    return Bundle(root=root, manifest=manifest, verified=verify)


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


def _check_file(root: Path, real_root: Path, entry: FileEntry, verify: bool) -> None:
    target = root / entry.path
    real = target.resolve()
    if not real.is_relative_to(real_root):
        raise BundleError(
            f"bundle {root}: file {entry.path!r} resolves to {real}, outside the bundle "
            f"directory (a symlink leaving the bundle?). Fix: copy the file into the bundle "
            f"and re-export; a bundle never points outside itself."
        )
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
    if verify:
        actual = sha256_file(real)
        if actual != entry.sha256:
            raise BundleError(
                f"bundle {root}: file {entry.path!r} has sha256 {actual}, the manifest expects "
                f"{entry.sha256} (corrupted or tampered with). Fix: copy the bundle again, or "
                f"re-export it."
            )
