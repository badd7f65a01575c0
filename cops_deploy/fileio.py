"""Atomic file writes shared by every writer in the package (torch-free).

A file is written to a temporary name in its own folder, flushed to disk, and renamed over the
target, so a reader sees the old file or the new one, never a part; on any error the temporary
file is removed and the target is untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); returns the path.

    ``mode`` sets the permission bits (mkstemp creates files readable by the owner only).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, mode: int | None = None) -> Path:
    """``atomic_write_bytes`` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def prepare_output_dir(out: Path, force: bool, owned: Iterable[str], replace_hint: str) -> None:
    """Create the output folder ``out``. A non-empty one is refused unless ``force``; with it,
    only the entries named in ``owned`` (this command's own outputs) are removed first.

    ``replace_hint`` ends the refusal's fix, e.g. "replace the previous demo in it".
    """
    from cops_deploy.errors import ConfigError

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder. Fix: choose a folder path.")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            shown = ", ".join(sorted(p.name for p in out.iterdir())[:5])
            raise ConfigError(
                f"--out {out} is not empty (holds {shown}). Fix: choose a new or empty folder, "
                f"or pass --force to {replace_hint}."
            )
        for name in owned:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
