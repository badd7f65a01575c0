"""Benchmark suite configuration: options, gate limits, the shared results, the output files.

    pytest benchmarks/                  # every backend on cops-tiny and cops-vit-l-14-336
    pytest benchmarks/ --bench-quick    # cops-tiny only, few repeats (part of ``make test``)
    pytest benchmarks/test_zoo.py --bench-zoo   # the paper's six backbone rows (zoo.py)

Results go to ``--bench-out`` (default ``bench_out/``): results.json, results.md, latency.png.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lib import FULL, RESULTS, TINY  # noqa: E402 - after the sys.path entry


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("cops-bench", "cops-deploy benchmarks")
    g.addoption("--bench-quick", action="store_true", help="cops-tiny only, few repeats")
    g.addoption("--bench-out", default="bench_out", help="folder for results (bench_out)")
    g.addoption(
        "--bench-arch",
        action="append",
        default=None,
        help=f"architecture(s) to run (default {TINY} and {FULL}; quick: {TINY})",
    )
    g.addoption("--bench-repeats", type=int, default=None, help="timed runs per backend")
    g.addoption("--bench-threads", type=int, default=None, help="torch / ORT threads")
    g.addoption("--gate-map-fp32", type=float, default=1e-4, help="fp32 anomaly-map max diff")
    g.addoption("--gate-score-fp32", type=float, default=1e-5, help="fp32 score diff")
    g.addoption("--gate-map-lowp", type=float, default=1e-2, help="fp16/bf16 map max diff")
    g.addoption("--gate-score-lowp", type=float, default=1e-2, help="fp16/bf16 score diff")
    g.addoption("--gate-auroc-fp32", type=float, default=1e-3, help="fp32 I-/P-AUROC diff")
    g.addoption("--gate-auroc-lowp", type=float, default=0.02, help="fp16/bf16 I-/P-AUROC diff")
    g.addoption(
        "--gate-ref-ratio",
        type=float,
        default=1.0,
        help="deployed fp32 p50 at most this times reference-eager p50",
    )
    g.addoption("--gate-floor-fp32", type=float, default=1.1, help="CPU fp32 p50 / fp32 floor")
    g.addoption("--gate-floor-bf16", type=float, default=1.3, help="CPU bf16 p50 / bf16 floor")
    g.addoption("--gate-gpu-ms", type=float, default=168.0, help="GPU latency gate (paper)")
    # Issue 13 parts 3-4: bf16 proof, cold start, bundle reuse.
    g.addoption(
        "--gate-bf16-evidence",
        type=float,
        default=10.0,
        help="torch bf16 map median diff / a bf16 backend's, at most (fp32 runs give ~1e4)",
    )
    g.addoption(
        "--gate-first-ratio",
        type=float,
        default=1.5,
        help="first predict after Detector.open(warmup=True) / steady-state predict",
    )
    g.addoption(
        "--gate-floor-arch",
        action="append",
        default=None,
        help=f"architecture(s) whose CPU latency is gated against the floors (default {FULL})",
    )
    g.addoption(
        "--bench-reuse-bundles",
        action="store_true",
        help="reuse the bundles already exported under --bench-out (skip the exports)",
    )
    z = parser.getgroup("cops-bench-zoo", "cops-deploy zoo benchmark (benchmarks/zoo.py)")
    z.addoption("--bench-zoo", action="store_true", help="run the Table S3 zoo (heavy)")
    z.addoption(
        "--bench-zoo-row",
        action="append",
        default=None,
        help="zoo row(s) to run, e.g. cops-vit-b-16-224@336 (default: all six)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "bench: a benchmark measurement or gate")


@pytest.fixture(scope="session")
def bench_opts(request: pytest.FixtureRequest) -> dict[str, Any]:
    o = request.config.getoption
    quick = o("--bench-quick")
    archs = o("--bench-arch") or ([TINY] if quick else [TINY, FULL])
    return {
        "quick": quick,
        "archs": archs,
        "out": Path(o("--bench-out")),
        "repeats": o("--bench-repeats"),
        "threads": o("--bench-threads"),
        "reuse": o("--bench-reuse-bundles"),
        "floor_archs": o("--gate-floor-arch") or [FULL],
        "gates": {
            k: o(f"--gate-{k}")
            for k in (
                "map-fp32",
                "score-fp32",
                "map-lowp",
                "score-lowp",
                "auroc-fp32",
                "auroc-lowp",
                "ref-ratio",
                "floor-fp32",
                "floor-bf16",
                "gpu-ms",
                "bf16-evidence",
                "first-ratio",
            )
        },
    }


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not RESULTS["archs"]:
        return
    from bench_lib import machine_info, write_results

    RESULTS["machine"] = machine_info()
    out = Path(session.config.getoption("--bench-out"))
    RESULTS["paths"] = [str(p) for p in write_results(RESULTS, out)]


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not RESULTS["archs"]:
        return
    from bench_lib import markdown

    terminalreporter.section("cops-deploy benchmark results")
    terminalreporter.write(markdown(RESULTS))
    paths = RESULTS.get("paths") or []
    terminalreporter.write_line(f"written: {', '.join(paths)}")
