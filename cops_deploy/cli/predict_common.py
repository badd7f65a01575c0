"""What both paths of ``cops predict`` share: the input and output arguments, opening the
results folder before the model loads, and the closing summary (with the decision counts) and
the exit status."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cops_deploy.imaging.decode import DEFAULT_MAX_PIXELS, InputScan, check_max_pixels, scan_inputs
from cops_deploy.runtime.predict_files import PredictReport
from cops_deploy.runtime.results_folder import JOURNAL_FILE, SCORES_FILE, ResultsFolder
from cops_deploy.runtime.review import REVIEW_FILE

__all__ = ["add_output_args", "finish", "open_run"]


def add_output_args(p: argparse.ArgumentParser) -> None:
    """``--out``, ``--force``, ``--resume``, ``--max-pixels`` and ``--no-review``."""
    p.add_argument(
        "--out", required=True, type=Path, help="output folder (not inside an input folder)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help=f"replace the results of an earlier run in --out: its {SCORES_FILE}, "
        f"{JOURNAL_FILE} and the pictures they list are removed; other files are left alone",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help=f"continue a run that was stopped, from its {JOURNAL_FILE} in --out: images with a "
        "result are not scored again (failed ones are retried)",
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="largest image decoded, width x height; larger files are reported as failures "
        f"(default {DEFAULT_MAX_PIXELS})",
    )
    p.add_argument(
        "--no-review",
        dest="review",
        action="store_false",
        help=f"do not write {REVIEW_FILE}, the self-contained review page of the run (the "
        "summary, the decision counts and the pictures sorted by score)",
    )


def open_run(args: argparse.Namespace) -> tuple[InputScan, ResultsFolder]:
    """Scan the inputs and open (check, lock, clear or resume) ``--out``, before any model
    loads; the caller closes the folder.

    Raises:
        ImageReadError: an input path does not exist.
        ConfigError: ``--max-pixels`` is invalid.
        CopsError: ``--out`` is refused (see ``ResultsFolder.open``).
    """
    check_max_pixels(getattr(args, "max_pixels", DEFAULT_MAX_PIXELS))
    out = Path(args.out)
    scan = scan_inputs(args.inputs, exclude=[out])
    folder = ResultsFolder.open(
        out,
        inputs=scan.roots,
        force=bool(getattr(args, "force", False)),
        resume=bool(getattr(args, "resume", False)),
    )
    if folder.cleared:
        print(
            f"--force: removed {len(folder.cleared)} file(s) of an earlier run from {out} "
            f"({', '.join(folder.cleared[:3])}{', ...' if len(folder.cleared) > 3 else ''}); "
            "other files there are left alone",
            file=sys.stderr,
        )
    return scan, folder


def finish(report: PredictReport, out: Path) -> int:
    """Print how many results went to ``out`` (and how many files failed or were skipped);
    returns the exit status: 1 if any file failed, else 0."""
    parts = [f"wrote {len(report.results)} result(s) to {out}"]
    decided = [r["anomalous"] for r in report.results if r.get("anomalous") is not None]
    if decided:
        parts.append(f"{sum(decided)} anomalous, {len(decided) - sum(decided)} OK")
    undecided = len(report.results) - len(decided)
    if undecided:
        parts.append(f"{undecided} undecided (no threshold: cops calibrate sets one)")
    if report.resumed:
        parts.append(f"{report.resumed} of them from the earlier run (--resume)")
    if report.failures:
        parts.append(f"{len(report.failures)} file(s) failed")
    if report.skipped:
        parts.append(f"{len(report.skipped)} folder entr(ies) skipped (listed in {SCORES_FILE})")
    if report.review is not None:
        parts.append(f"review: {report.review}")
    print("; ".join(parts))
    return 1 if report.failures else 0
