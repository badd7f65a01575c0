"""Progress of a long library call (an export, an engine build), reported to a callback.

A :class:`Progress` receives each :class:`Stage` as it begins and ends (with its time) or is
skipped, and notes (details such as a parity figure). The library reports to a
:class:`SilentProgress` unless given another; :class:`PrintProgress` prints the numbered lines
``cops-export`` shows. A :class:`StageReporter` is what a pipeline uses to report its stages.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, TextIO

__all__ = ["PrintProgress", "Progress", "SilentProgress", "Stage", "StageReporter"]


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its name and its place (``step`` of ``total``, from 1)."""

    name: str
    step: int
    total: int


class Progress(Protocol):
    """Receives a run's progress: each stage begins and ends (or is skipped), notes between."""

    def begin(self, stage: Stage) -> None:
        """``stage`` starts."""

    def end(self, stage: Stage, seconds: float) -> None:
        """``stage`` finished after ``seconds``."""

    def skip(self, stage: Stage, why: str) -> None:
        """``stage`` does not run, for the reason ``why``."""

    def note(self, text: str) -> None:
        """A detail of the running stage (a parity figure, an engine built, a warning)."""


class SilentProgress:
    """A :class:`Progress` that reports nothing: the library's default."""

    def begin(self, stage: Stage) -> None:
        """Nothing."""

    def end(self, stage: Stage, seconds: float) -> None:
        """Nothing."""

    def skip(self, stage: Stage, why: str) -> None:
        """Nothing."""

    def note(self, text: str) -> None:
        """Nothing."""


class PrintProgress:
    """Numbered stage lines with timings, ``[3/10] exporting head: done (12.3 s)``, and notes
    indented below them (what ``cops-export`` prints)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def _print(self, text: str) -> None:
        print(text, file=self._stream or sys.stdout, flush=True)

    @staticmethod
    def _tag(stage: Stage) -> str:
        return f"[{stage.step}/{stage.total}] {stage.name}"

    def begin(self, stage: Stage) -> None:
        """``[k/n] name ...``"""
        self._print(f"{self._tag(stage)} ...")

    def end(self, stage: Stage, seconds: float) -> None:
        """``[k/n] name: done (s)``"""
        self._print(f"{self._tag(stage)}: done ({seconds:.1f} s)")

    def skip(self, stage: Stage, why: str) -> None:
        """``[k/n] name: skipped (why)``"""
        self._print(f"{self._tag(stage)}: skipped ({why})")

    def note(self, text: str) -> None:
        """The note, indented by four spaces."""
        self._print(f"    {text}")


class StageReporter:
    """Reports the stages of one run (from a fixed list of names) to a Progress, timing each;
    None: a :class:`SilentProgress`."""

    def __init__(self, names: Sequence[str], progress: Progress | None) -> None:
        self._names = tuple(names)
        self._progress: Progress = progress if progress is not None else SilentProgress()
        self._start: dict[str, float] = {}

    def _stage(self, name: str) -> Stage:
        return Stage(name, self._names.index(name) + 1, len(self._names))

    def begin(self, name: str) -> None:
        """Stage ``name`` starts."""
        self._progress.begin(self._stage(name))
        self._start[name] = time.perf_counter()

    def end(self, name: str) -> None:
        """Stage ``name`` ends (its time since :meth:`begin` is reported)."""
        self._progress.end(self._stage(name), time.perf_counter() - self._start.pop(name))

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """``with reporter.stage(name):`` begins and ends stage ``name`` around the block."""
        self.begin(name)
        yield  # a stage that raises reports no end
        self.end(name)

    def skip(self, name: str, why: str) -> None:
        """Stage ``name`` does not run, for the reason ``why``."""
        self._progress.skip(self._stage(name), why)

    def note(self, text: str) -> None:
        """A detail of the running stage."""
        self._progress.note(text)
