"""Progress reporting: the lines PrintProgress prints, and StageReporter's numbering and timing."""

from __future__ import annotations

import io

import pytest

from cops_deploy.export.progress import PrintProgress, Stage, StageReporter


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def begin(self, stage: Stage) -> None:
        self.events.append(("begin", stage))

    def end(self, stage: Stage, seconds: float) -> None:
        self.events.append(("end", stage, seconds >= 0))

    def skip(self, stage: Stage, why: str) -> None:
        self.events.append(("skip", stage, why))

    def note(self, text: str) -> None:
        self.events.append(("note", text))


def test_print_progress_lines():
    stream = io.StringIO()
    printer = PrintProgress(stream)
    stage = Stage("exporting head", 3, 9)
    printer.begin(stage)
    printer.note("vision: 12 float16 matmuls")
    printer.end(stage, 12.34)
    printer.skip(Stage("fp16", 7, 9), "precision fp32")
    assert stream.getvalue().splitlines() == [
        "[3/9] exporting head ...",
        "    vision: 12 float16 matmuls",
        "[3/9] exporting head: done (12.3 s)",
        "[7/9] fp16: skipped (precision fp32)",
    ]


def test_print_progress_defaults_to_stdout(capsys):
    PrintProgress().note("hello")
    assert capsys.readouterr().out == "    hello\n"


def test_stage_reporter_numbers_and_times_stages():
    recorder = Recorder()
    stages = StageReporter(("a", "b", "c"), recorder)
    with stages.stage("a"):
        stages.note("inside a")
    stages.skip("b", "not needed")
    with pytest.raises(RuntimeError), stages.stage("c"):
        raise RuntimeError("c failed")
    assert recorder.events == [
        ("begin", Stage("a", 1, 3)),
        ("note", "inside a"),
        ("end", Stage("a", 1, 3), True),
        ("skip", Stage("b", 2, 3), "not needed"),
        ("begin", Stage("c", 3, 3)),  # a stage that raises reports no end
    ]


def test_stage_reporter_is_silent_by_default(capsys):
    stages = StageReporter(("a",), None)
    with stages.stage("a"):
        stages.note("quiet")
    assert capsys.readouterr() == ("", "")
