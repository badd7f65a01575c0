"""The results folder of ``cops predict``: checked, locked, journalled, then summarised.

    with ResultsFolder.open("results/", inputs=["parts/"], force=True) as folder:
        folder.start({"backend": "onnxruntime"})
        folder.add_result({"source": "parts/a.png", "score": 0.12, "visual": "a.png.png"})
        folder.finish(order=["parts/a.png"], skipped=[])

Files a run writes into the folder (and the only ones ``--force`` removes again):

- ``results.jsonl``, the journal: one JSON object per line, appended and fsync'd as each image
  finishes, so a killed run leaves a record of everything it did and ``--resume`` continues it.
  Line 1 is the header ``{"journal": "cops-predict", "version": 1, "info": {...}}`` (the run's
  ``info``: model or bundle, backend, ...). Every further line is ``{"result": RECORD}`` or
  ``{"failure": RECORD}``. A result RECORD holds ``source`` (the input path as given),
  ``score`` (finite), ``visual`` (the picture's path inside the folder), ``height``, ``width``
  and any further keys a caller adds; a failure RECORD holds ``source``, ``reason`` (a code,
  e.g. ``corrupt``, ``non_finite_output``) and ``error`` (the message). A later line for the
  same source replaces an earlier one. A torn last line (a run killed mid-write) is ignored and
  cut off on resume.
- the pictures named by the results' ``visual`` (PNG files, possibly in sub-folders).
- ``scores.json``, written atomically at the end from the journal: the ``info`` keys, then
  ``results``, ``failures`` (both in input order) and ``skipped`` (folder entries not scored,
  with the reason). Strict JSON: NaN or infinity is never written.
- ``review.html``, the review page (:mod:`cops_deploy.runtime.review`), written by the caller
  after ``scores.json`` (see :func:`cops_deploy.runtime.predict_files.write_predictions`).

Checks when the folder is opened: it is not, and is not inside, an input folder (resolved
paths, so symbolic links count); it is a folder or can be made; it holds nothing unless
``force`` (remove the earlier run's journal, scores.json and the pictures they list, then go
on; any other file is left alone) or ``resume`` (keep the journal and score only what it does
not hold). The folder is locked for the run with ``fcntl.flock`` on the folder itself: a second
run into it is refused while the first is alive, and the kernel drops the lock when a process
ends however it ends, so there is never a stale lock to clean up. Where ``fcntl`` does not
exist (Windows) a lock file ``.cops-predict.lock`` is created with ``O_EXCL`` instead; a run
that crashed leaves it behind, and the refusal says to delete it once no run is writing.

Torch-free.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from cops_deploy.errors import CopsError
from cops_deploy.fileio import atomic_write_text
from cops_deploy.runtime.review import REVIEW_FILE

try:  # POSIX; see the module docstring for the fallback
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "JOURNAL_FILE",
    "JOURNAL_VERSION",
    "LOCK_FILE",
    "SCORES_FILE",
    "ResultsFolder",
    "check_out_outside_inputs",
    "strict_json",
]

SCORES_FILE = "scores.json"
JOURNAL_FILE = "results.jsonl"
LOCK_FILE = ".cops-predict.lock"  # only where fcntl is missing
JOURNAL_VERSION = 1
_JOURNAL_ID = "cops-predict"


def strict_json(value: Any, indent: int | None = None) -> str:
    """``json.dumps`` that refuses NaN and infinity (``allow_nan=False``): strict JSON."""
    return json.dumps(value, indent=indent, allow_nan=False)


def check_out_outside_inputs(out: Path, inputs: Iterable[str | os.PathLike[str]]) -> None:
    """Refuse an ``out`` that is an input folder or lies inside one (resolved paths, so a
    symbolic link to or inside an input folder counts), or that is an input file.

    Raises:
        CopsError: naming ``out``, the input and both resolved paths.
    """
    real_out = Path(os.path.realpath(out))
    for raw in inputs:
        real_in = Path(os.path.realpath(raw))
        if real_out == real_in or (real_in.is_dir() and real_out.is_relative_to(real_in)):
            what = "is the input folder" if real_out == real_in else "is inside the input folder"
            if not real_in.is_dir():
                what = "is the input file"
            raise CopsError(
                f"--out {str(out)!r} {what} {str(raw)!r} (resolved: {real_out} and {real_in}); "
                "results written there would overwrite inputs or be read as inputs by the next "
                "run. Fix: choose an --out outside every input folder, e.g. "
                f"{str(real_in.parent / (real_in.name + '-results'))!r}."
            )


class ResultsFolder:
    """The locked results folder of one run (see the module docstring); use :meth:`open`."""

    def __init__(self, path: Path, resume: bool) -> None:
        self.path = path
        self.resume = resume
        self.cleared: list[str] = []  # what --force removed, for the caller to report
        self.continued = False  # a journal was read: this run continues an earlier one
        self._lock_fd: int | None = None
        self._lock_file: Path | None = None
        self._journal: Any = None
        self._records: dict[str, tuple[str, dict[str, Any]]] = {}  # source -> (kind, record)
        self._info: dict[str, Any] | None = None

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        out: str | os.PathLike[str],
        *,
        inputs: Iterable[str | os.PathLike[str]] = (),
        force: bool = False,
        resume: bool = False,
    ) -> ResultsFolder:
        """Check ``out`` against ``inputs``, create it, lock it, and clear (``force``) or read
        (``resume``) what an earlier run left.

        Raises:
            CopsError: ``out`` is or is inside an input folder; is a file; holds files and
                neither ``force`` nor ``resume`` is set; is locked by another run; or its
                journal cannot be resumed.
        """
        path = Path(out)
        check_out_outside_inputs(path, inputs)
        if path.exists() and not path.is_dir():
            raise CopsError(f"--out {path} exists and is not a folder; choose another path")
        path.mkdir(parents=True, exist_ok=True)
        folder = cls(path, resume)
        folder._lock()
        try:
            folder._prepare(force, resume)
        except BaseException:
            folder.close()
            raise
        return folder

    def _lock(self) -> None:
        if fcntl is not None:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CopsError(
                    f"--out {self.path} is in use by another cops predict run (it holds the "
                    "folder's lock); two runs into one folder would mix their results. Fix: "
                    "wait for it to finish, or choose another --out."
                ) from None
            self._lock_fd = fd
            return
        lock = self.path / LOCK_FILE  # pragma: no cover - Windows
        try:  # pragma: no cover
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # pragma: no cover
            raise CopsError(
                f"--out {self.path} is in use by another cops predict run ({lock} exists). "
                f"Fix: wait for it to finish; if no run is writing there (one crashed), delete "
                f"{lock} and run again."
            ) from None
        os.write(fd, str(os.getpid()).encode())  # pragma: no cover
        os.close(fd)  # pragma: no cover
        self._lock_file = lock  # pragma: no cover

    def _entries(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE)

    def _prepare(self, force: bool, resume: bool) -> None:
        entries = self._entries()
        if resume and (self.path / JOURNAL_FILE).is_file():
            self._read_journal()
            return
        if entries and not force:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            hint = (
                f"it holds no {JOURNAL_FILE} to resume from"
                if resume
                else f"pass --resume to continue the run that wrote {JOURNAL_FILE}"
                if JOURNAL_FILE in entries
                else ""
            )
            raise CopsError(
                f"--out {self.path} already holds results or other files ({shown}); pass "
                "--force to replace the earlier results (only the files a cops predict run "
                "wrote there are removed), or choose an empty folder"
                + (f"; {hint}" if hint else "")
            )
        if entries:
            self._clear_earlier()

    def _clear_earlier(self) -> None:
        """Remove the earlier run's journal, scores.json and the pictures they list."""
        pictures: set[str] = set()
        for record in self._earlier_records():
            visual = record.get("visual")
            if isinstance(visual, str):
                pictures.add(visual)
        root = Path(os.path.realpath(self.path))
        removed_dirs: set[Path] = set()
        for name in sorted(pictures):
            target = self.path / name
            real = Path(os.path.realpath(target))
            if real == root or not real.is_relative_to(root) or not target.is_file():
                continue  # outside the folder (a tampered list) or gone: never touched
            target.unlink()
            self.cleared.append(name)
            removed_dirs.update(
                p for p in target.parents if p != self.path and p.is_relative_to(self.path)
            )
        for name in (SCORES_FILE, JOURNAL_FILE, REVIEW_FILE):
            target = self.path / name
            if target.is_file() and not target.is_symlink():
                target.unlink()
                self.cleared.append(name)
        for folder in sorted(removed_dirs, key=lambda p: len(p.parts), reverse=True):
            if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
                folder.rmdir()

    def _earlier_records(self) -> list[dict[str, Any]]:
        """The result records an earlier run listed (scores.json and the journal), best effort:
        a damaged file lists nothing (and nothing of it is removed but itself)."""
        records: list[dict[str, Any]] = []
        try:
            saved = json.loads((self.path / SCORES_FILE).read_text(encoding="utf-8"))
            if isinstance(saved, dict) and isinstance(saved.get("results"), list):
                records += [r for r in saved["results"] if isinstance(r, dict)]
        except (OSError, ValueError):
            pass  # no readable scores.json: its pictures are found in the journal, if any
        for kind, record in _parse_journal(self.path / JOURNAL_FILE, strict=False)[1]:
            if kind == "result":
                records.append(record)
        return records

    def _read_journal(self) -> None:
        header, lines = _parse_journal(self.path / JOURNAL_FILE, strict=True)
        self._info = header
        self.continued = True
        for kind, record in lines:
            self._records[record["source"]] = (kind, record)

    # -- writing -------------------------------------------------------------------------------

    @property
    def finished(self) -> dict[str, dict[str, Any]]:
        """The result records already in the journal, by source (a resumed run skips these)."""
        return {s: r for s, (kind, r) in self._records.items() if kind == "result"}

    def start(self, info: Mapping[str, Any] | None) -> None:
        """Write the journal's header (a new run) or check ``info`` against it (a resumed run).

        Raises:
            CopsError: ``info`` differs from the journal's (another model, bundle or backend).
        """
        info = json.loads(strict_json(dict(info or {})))
        journal = self.path / JOURNAL_FILE
        if self._info is not None:
            if info != self._info:
                keys = sorted(k for k in {*info, *self._info} if info.get(k) != self._info.get(k))
                raise CopsError(
                    f"cannot resume the run in {self.path}: it was made with other settings "
                    f"({', '.join(f'{k}: {self._info.get(k)!r} then, {info.get(k)!r} now' for k in keys)}). "
                    "Fix: resume with the same model, bundle and backend, or pass --force to "
                    "start over."
                )
            _cut_torn_line(journal)
            self._journal = open(journal, "a", encoding="utf-8")  # noqa: SIM115 - kept open
            return
        self._info = info
        self._journal = open(journal, "w", encoding="utf-8")  # noqa: SIM115 - kept open
        self._append({"journal": _JOURNAL_ID, "version": JOURNAL_VERSION, "info": info})

    def add_result(self, record: Mapping[str, Any]) -> None:
        """Journal one scored image (its picture is already written)."""
        self._add("result", record)

    def add_failure(self, record: Mapping[str, Any]) -> None:
        """Journal one image that could not be scored (``source``, ``reason``, ``error``)."""
        self._add("failure", record)

    def _add(self, kind: str, record: Mapping[str, Any]) -> None:
        record = dict(record)
        self._append({kind: record})
        self._records[str(record["source"])] = (kind, record)

    def _append(self, line: Mapping[str, Any]) -> None:
        if self._journal is None:
            raise CopsError(f"results folder {self.path}: start() was not called. Fix: call it.")
        self._journal.write(strict_json(line) + "\n")
        self._journal.flush()
        os.fsync(self._journal.fileno())

    def records(self, order: Sequence[str]) -> tuple[list[dict], list[dict]]:
        """(results, failures) in the order of the sources in ``order``, then any other
        journalled source (an input of the earlier run that this one did not list)."""
        rank = {source: i for i, source in enumerate(order)}
        ordered = sorted(self._records.items(), key=lambda kv: rank.get(kv[0], len(rank)))
        results = [r for _, (kind, r) in ordered if kind == "result"]
        failures = [r for _, (kind, r) in ordered if kind == "failure"]
        return results, failures

    def finish(
        self, order: Sequence[str], skipped: Sequence[Mapping[str, Any]]
    ) -> tuple[list[dict], list[dict]]:
        """Write ``scores.json`` atomically from the journal; returns (results, failures)."""
        results, failures = self.records(order)
        payload = {
            **(self._info or {}),
            "results": results,
            "failures": failures,
            "skipped": [dict(s) for s in skipped],
        }
        atomic_write_text(self.path / SCORES_FILE, strict_json(payload, indent=2))
        return results, failures

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the journal and release the lock. Idempotent."""
        if self._journal is not None:
            self._journal.close()
            self._journal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        if self._lock_file is not None:  # pragma: no cover - Windows
            self._lock_file.unlink(missing_ok=True)
            self._lock_file = None

    def __enter__(self) -> ResultsFolder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _parse_journal(
    path: Path, strict: bool
) -> tuple[dict[str, Any] | None, list[tuple[str, dict[str, Any]]]]:
    """(header info, [(kind, record), ...]) of a journal. A torn last line is ignored; with
    ``strict`` any other damage raises CopsError, otherwise the damaged lines are ignored."""
    try:
        text = path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        if strict:
            raise
        return None, []
    lines = text.split("\n")
    if lines and lines[-1] != "":
        lines[-1] = ""  # torn: the run was killed while writing it
    info: dict[str, Any] | None = None
    out: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        entry = _journal_line(line)
        if number == 1 and entry is not None and entry.get("journal") == _JOURNAL_ID:
            info = entry.get("info") if isinstance(entry.get("info"), dict) else {}
            continue
        kind = _kind_of(entry)
        if kind is None or (number == 1 and strict):
            if strict:
                raise CopsError(
                    f"cannot resume from {path}: line {number} is not a cops predict journal "
                    f"line ({line[:80]!r}). Fix: pass --force to start over (the earlier "
                    "results are removed)."
                )
            continue
        out.append((kind, entry[kind]))  # type: ignore[index]
    if strict and info is None:
        raise CopsError(f"cannot resume from {path}: it has no header line. Fix: pass --force.")
    return info, out


def _journal_line(line: str) -> dict[str, Any] | None:
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None


def _kind_of(entry: dict[str, Any] | None) -> str | None:
    if entry is None or len(entry) != 1:
        return None
    kind = next(iter(entry))
    record = entry[kind]
    if kind not in ("result", "failure") or not isinstance(record, dict):
        return None
    if not isinstance(record.get("source"), str):
        return None
    if kind == "result" and not (
        isinstance(record.get("score"), (int, float)) and math.isfinite(record["score"])
    ):
        return None
    return kind


def _cut_torn_line(path: Path) -> None:
    """Cut a journal's unterminated last line, so the next line starts on a line of its own."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)
