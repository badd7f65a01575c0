"""The latency floors: what each precision's path could reach at the best GEMM rate measured."""

from __future__ import annotations

import pytest
from bench_lib import floors


def test_the_bf16_floor_counts_the_fp32_head_at_the_fp32_rate():
    """The bf16 paths run the vision graph in bfloat16 and the head in fp32, so the head's FLOPs
    are timed at the fp32 rate: a floor at the bf16 rate for everything would be too strict."""
    flops = {"deploy": 1000e9, "vision": 900e9, "eager": 1100e9}
    got = floors(flops, {"fp32": 200.0, "bf16": 600.0})
    assert got["fp32"] == pytest.approx(1000 / 200)
    assert got["bf16"] == pytest.approx(900 / 600 + 100 / 200)
    assert got["bf16"] > flops["deploy"] / 600e9


def test_a_precision_without_a_rate_has_no_floor():
    flops = {"deploy": 1000e9, "vision": 900e9}
    assert floors(flops, {"fp32": 200.0}) == {"fp32": 5.0}
    assert floors(flops, {"bf16": 600.0}) == {}  # the head's fp32 rate is unknown
