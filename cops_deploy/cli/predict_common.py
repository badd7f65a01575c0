"""What both paths of ``cops predict`` print when they are done, and their exit status."""

from __future__ import annotations

from pathlib import Path

from cops_deploy.runtime.predict_files import PredictReport

__all__ = ["finish"]


def finish(report: PredictReport, out: Path) -> int:
    """Print how many results went to ``out`` (and how many files failed); returns the exit
    status: 1 if any file failed, else 0."""
    print(
        f"wrote {len(report.results)} result(s) to {out}"
        + (f"; {len(report.failures)} file(s) failed" if report.failures else "")
    )
    return 1 if report.failures else 0
