"""Atomic writes (cops_deploy.fileio): permission bits follow the umask, no temp file is left."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cops_deploy.fileio import atomic_write_bytes, atomic_write_text


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_mode_follows_the_umask(tmp_path: Path, umask: int, expected: int) -> None:
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "scores.json", "{}")
        replaced = atomic_write_text(path, '{"a": 1}')  # replacing keeps following it
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == expected
    assert replaced.read_text() == '{"a": 1}'


def test_explicit_mode_wins(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        path = atomic_write_bytes(tmp_path / "a.png", b"x", mode=0o644)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_failure_leaves_no_temporary_and_the_old_file(tmp_path: Path) -> None:
    path = atomic_write_text(tmp_path / "a.json", "old")

    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
