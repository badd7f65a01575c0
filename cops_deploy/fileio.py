"""Atomic file writes shared by every writer in the package (torch-free).

A file is written to a temporary name in its own folder, flushed to disk, and renamed over the
target, so a reader sees the old file or the new one, never a part; on any error the temporary
file is removed and the target is untouched. The file's permission bits follow the umask, as
any other tool's (0644 under the usual umask 022), unless a ``mode`` is given.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterable
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_text", "prepare_output_dir"]

_TEMP_ATTEMPTS = 100


def _create_temp(path: Path) -> tuple[int, Path]:
    """Create and open a new hidden temp file beside ``path``, mode 0666 less the umask
    (``tempfile.mkstemp`` would make it 0600 whatever the umask)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(_TEMP_ATTEMPTS):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path} after {_TEMP_ATTEMPTS} tries")


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename); returns the path.

    ``mode`` sets the permission bits; None (default): 0666 less the umask, like ``open``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
