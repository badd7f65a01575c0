"""Tests for cops_deploy.evaluate.metrics: agreement with scikit-learn and reference code."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cops_deploy.errors import ConfigError
from cops_deploy.evaluate.metrics import (
    IMAGE_METRICS,
    PIXEL_METRICS,
    PixelMetricAccumulator,
    aupro,
    auroc,
    average_precision,
    f1_max,
    image_metrics,
    pixel_metrics,
)

sk_metrics = pytest.importorskip("sklearn.metrics")
ndimage = pytest.importorskip("scipy.ndimage")

TOL = {"rel": 1e-10, "abs": 1e-12}


# ---------------------------------------------------------------------------------------------
# Reference implementations (straightforward, slow)
# ---------------------------------------------------------------------------------------------


def _ref_f1_max(scores: np.ndarray, labels: np.ndarray) -> float:
    """Brute force: F1 of "score >= t" for every distinct score t."""
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        best = max(best, 2 * tp / (2 * tp + fp + fn))
    return float(best)


def _ref_aupro(maps: np.ndarray, masks: np.ndarray, max_fpr: float = 0.3) -> float:
    """Threshold sweep: PRO and FPR at every distinct score, trapezoid up to max_fpr."""
    regions = []
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        above = maps >= t
        fprs.append(np.sum(above & normal) / np.sum(normal))
        pros.append(float(np.mean([above[i][r].mean() for i, r in regions])))
    area = 0.0
    for k in range(1, len(fprs)):
        x0, x1, y0, y1 = fprs[k - 1], fprs[k], pros[k - 1], pros[k]
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


def _data(seed: int, n: int = 6, hw: int = 24, decimals: int | None = 2):
    """Seeded maps (N, H, W) float32 with blob-shaped masks; rounding makes ties."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, hw, hw), dtype=bool)
    for i in range(1, n):  # image 0 stays good
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, hw - 4, 2)
            h, w = rng.integers(1, 6, 2)
            masks[i, y : y + h, x : x + w] = True
    maps = rng.random((n, hw, hw)) + 0.6 * masks
    if decimals is not None:
        maps = maps.round(decimals)
    return maps.astype(np.float32), masks


# ---------------------------------------------------------------------------------------------
# Image level vs sklearn
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_sklearn(seed: int, ties: bool) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    labels = rng.random(n) < rng.uniform(0.1, 0.9)
    labels[:2] = [True, False]
    scores = rng.random(n) + 0.3 * labels
    if ties:
        scores = np.round(scores * 5) / 5  # few distinct values
    assert auroc(scores, labels) == pytest.approx(sk_metrics.roc_auc_score(labels, scores), **TOL)
    assert average_precision(scores, labels) == pytest.approx(
        sk_metrics.average_precision_score(labels, scores), **TOL
    )
    res = image_metrics(scores, labels.astype(int))
    assert tuple(res) == IMAGE_METRICS
    assert res["I-AUROC"] == pytest.approx(sk_metrics.roc_auc_score(labels, scores), **TOL)
    assert res["I-AP"] == pytest.approx(sk_metrics.average_precision_score(labels, scores), **TOL)
    assert res["I-F1max"] == pytest.approx(_ref_f1_max(scores, labels), **TOL)


def test_all_scores_tied_and_integer_scores() -> None:
    labels = np.array([0, 1, 0, 1, 1])
    assert auroc(np.zeros(5), labels) == pytest.approx(0.5)
    assert average_precision(np.zeros(5), labels) == pytest.approx(0.6)
    scores = np.array([3, 1, 2, 5, 3])
    assert auroc(scores, labels) == pytest.approx(sk_metrics.roc_auc_score(labels, scores))
    assert f1_max(scores, labels) == pytest.approx(_ref_f1_max(scores, labels.astype(bool)))


@pytest.mark.parametrize("seed", range(4))
def test_f1_max_matches_brute_force_and_sklearn_curve(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.random(200) < 0.3
    scores = np.round(rng.random(200) + 0.2 * labels, 1)
    precision, recall, _ = sk_metrics.precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        sk_f1 = np.nanmax(2 * precision * recall / (precision + recall))
    assert f1_max(scores, labels) == pytest.approx(_ref_f1_max(scores, labels), **TOL)
    assert f1_max(scores, labels) == pytest.approx(sk_f1, **TOL)


@pytest.mark.parametrize(
    "labels",
    [[1, 1, 1], [0, 0, 0], [], [True]],
    ids=["only-anomalous", "only-good", "empty", "one"],
)
def test_image_metrics_undefined_are_none(labels: list) -> None:
    scores = np.linspace(0, 1, len(labels))
    assert auroc(scores, labels) is None
    assert average_precision(scores, labels) is None
    assert f1_max(scores, labels) is None
    assert image_metrics(scores, labels) == dict.fromkeys(IMAGE_METRICS)


def test_perfect_and_inverted_scores() -> None:
    labels = np.array([0, 0, 1, 1])
    good = np.array([0.1, 0.2, 0.8, 0.9])
    assert image_metrics(good, labels) == {"I-AUROC": 1.0, "I-AP": 1.0, "I-F1max": 1.0}
    assert auroc(-good, labels) == 0.0


# ---------------------------------------------------------------------------------------------
# Image level: bad input
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scores", "labels", "match"),
    [
        ([0.1, np.nan], [0, 1], "NaN or inf"),
        ([0.1, np.inf], [0, 1], "NaN or inf"),
        ([0.1, 0.2], [0, 2], "neither 0 nor 1"),
        ([0.1, 0.2], [0, 255], "mask > 127"),
        ([0.1, 0.2, 0.3], [0, 1], "same length"),
        ([[0.1, 0.2]], [[0, 1]], "1-D"),
        (["a", "b"], [0, 1], "not a real number"),
        ([True, False], [0, 1], "not a real number"),
        ([0.1, 0.2], ["x", "y"], "bool or numbers"),
    ],
    ids=[
        "nan",
        "inf",
        "label-2",
        "label-255",
        "length",
        "2d",
        "str-scores",
        "bool-scores",
        "str-labels",
    ],
)
def test_image_metrics_refuse_bad_input(scores, labels, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        image_metrics(scores, labels)


# ---------------------------------------------------------------------------------------------
# Pixel level
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("decimals", [2, None], ids=["ties", "continuous"])
def test_pixel_metrics_match_sklearn_and_one_shot(seed: int, decimals: int | None) -> None:
    maps, masks = _data(seed, decimals=decimals)
    flat_s, flat_y = maps.ravel(), masks.ravel()
    acc = PixelMetricAccumulator()
    for m, g in zip(maps, masks, strict=True):
        acc.add(m, g if g.any() else None)
    res = acc.compute()
    assert tuple(res) == PIXEL_METRICS
    assert acc.num_images == len(maps) and acc.num_pixels == maps.size
    assert res["P-AUROC"] == pytest.approx(sk_metrics.roc_auc_score(flat_y, flat_s), **TOL)
    assert res["P-AP"] == pytest.approx(sk_metrics.average_precision_score(flat_y, flat_s), **TOL)
    assert res["P-AUROC"] == pytest.approx(auroc(flat_s, flat_y), **TOL)
    assert res["P-AP"] == pytest.approx(average_precision(flat_s, flat_y), **TOL)
    assert res["P-F1max"] == pytest.approx(f1_max(flat_s, flat_y), **TOL)
    assert res["AUPRO"] == pytest.approx(_ref_aupro(maps, masks), **TOL)
    batch = pixel_metrics(maps, masks)  # (N, H, W) in one call
    listed = pixel_metrics(list(maps), [g if g.any() else None for g in masks])
    for key in PIXEL_METRICS:
        assert batch[key] == pytest.approx(res[key], **TOL)
        assert listed[key] == pytest.approx(res[key], **TOL)


@pytest.mark.parametrize("max_fpr", [0.05, 0.3, 1.0])
def test_aupro_matches_threshold_sweep(max_fpr: float) -> None:
    maps, masks = _data(7, n=5, hw=20, decimals=1)  # heavy ties between normal and anomalous
    assert aupro(maps, masks, max_fpr=max_fpr) == pytest.approx(
        _ref_aupro(maps, masks, max_fpr), **TOL
    )


def test_sweep_blocks_give_the_same_result(monkeypatch: pytest.MonkeyPatch) -> None:
    from cops_deploy.evaluate import metrics

    maps, masks = _data(8, n=4, hw=16, decimals=2)
    whole = pixel_metrics(maps, masks)
    monkeypatch.setattr(metrics, "_SWEEP_BLOCK", 3)
    blocked = pixel_metrics(maps, masks)
    for key in PIXEL_METRICS:
        assert blocked[key] == pytest.approx(whole[key], **TOL)
    assert blocked["AUPRO"] == pytest.approx(_ref_aupro(maps, masks), **TOL)


def test_constant_map_is_chance_level() -> None:
    maps = np.full((2, 6, 6), 0.25, dtype=np.float32)
    masks = np.zeros(maps.shape, dtype=bool)
    masks[1, 1:3, 1:4] = True
    res = pixel_metrics(maps, masks)
    assert res["P-AUROC"] == pytest.approx(0.5)
    assert res["P-AP"] == pytest.approx(masks.mean())
    assert res["AUPRO"] == pytest.approx(0.15)  # the diagonal PRO = FPR, integrated to 0.3
    assert res["AUPRO"] == pytest.approx(_ref_aupro(maps, masks), **TOL)


def test_aupro_uses_8_connectivity() -> None:
    # (0,0)-(0,1) and the diagonal (1,2): one region of 3 pixels with 8-connectivity (AUPRO 1/3),
    # two regions with 4-connectivity (AUPRO 1/2).
    m = np.full((4, 4), 0.5, dtype=np.float32)
    g = np.zeros((4, 4), dtype=bool)
    g[0, 0] = g[0, 1] = g[1, 2] = True
    m[g] = 0.0
    m[1, 2] = 1.0
    assert aupro(m[None], g[None]) == pytest.approx(1 / 3)


def test_aupro_perfect_and_worst_maps() -> None:
    g = np.zeros((2, 8, 8), dtype=bool)
    g[1, 2:5, 2:5] = True
    assert aupro(g.astype(np.float32), g) == pytest.approx(1.0)
    assert aupro(1.0 - g.astype(np.float32), g) == pytest.approx(0.0)


def test_mixed_image_sizes_and_float64_maps() -> None:
    a_map, a_mask = _data(3, n=2, hw=16)
    b_map, b_mask = _data(4, n=2, hw=9)
    acc = PixelMetricAccumulator()
    for m, g in [*zip(a_map, a_mask, strict=True), *zip(b_map, b_mask, strict=True)]:
        acc.add(m.astype(np.float64), g.astype(np.uint8))
    s = np.concatenate([a_map.ravel(), b_map.ravel()])
    y = np.concatenate([a_mask.ravel(), b_mask.ravel()])
    res = acc.compute()
    assert res["P-AUROC"] == pytest.approx(sk_metrics.roc_auc_score(y, s), **TOL)
    assert res["P-AP"] == pytest.approx(sk_metrics.average_precision_score(y, s), **TOL)


def test_accumulator_copies_input_and_compute_is_repeatable() -> None:
    maps, masks = _data(5, n=3)
    expected = pixel_metrics(maps, masks)
    acc = PixelMetricAccumulator()
    buf_map, buf_mask = np.empty_like(maps[0]), np.empty_like(masks[0])
    for m, g in zip(maps, masks, strict=True):  # a reused buffer, as a runner would do
        buf_map[:], buf_mask[:] = m, g
        acc.add(buf_map, buf_mask)
    buf_map[:] = 0.0
    assert acc.compute() == expected
    assert acc.compute() == expected
    assert 0 < acc.nbytes <= 8 * maps.size
    acc.reset()
    assert acc.num_images == 0 and acc.compute() == dict.fromkeys(PIXEL_METRICS)


def test_accumulator_without_aupro() -> None:
    maps, masks = _data(6, n=3)
    acc = PixelMetricAccumulator(compute_aupro=False)
    acc.add(maps, masks)
    res = acc.compute()
    assert res["AUPRO"] is None
    assert res["P-AUROC"] == pytest.approx(pixel_metrics(maps, masks)["P-AUROC"], **TOL)
    assert acc.nbytes == 4 * maps.size


@pytest.mark.parametrize("case", ["no-images", "all-good", "none-masks", "all-anomalous"])
def test_pixel_metrics_undefined_are_none(case: str) -> None:
    acc = PixelMetricAccumulator()
    maps = np.random.default_rng(0).random((2, 8, 8)).astype(np.float32)
    if case == "all-good":
        acc.add(maps, np.zeros(maps.shape, dtype=bool))
    elif case == "none-masks":
        acc.add(maps[0], None)
        acc.add(maps[1], None)
    elif case == "all-anomalous":
        acc.add(maps, np.ones(maps.shape, dtype=bool))
    assert acc.compute() == dict.fromkeys(PIXEL_METRICS)


@pytest.mark.parametrize(
    ("anomaly_map", "mask", "match"),
    [
        (np.full((4, 4), np.nan), None, "NaN or inf"),
        (np.zeros((4, 4)), np.full((4, 4), 255, dtype=np.uint8), "mask > 127"),
        (np.zeros((4, 4)), np.full((4, 4), 0.5), "mask > 0.5"),
        (np.zeros((4, 4)), np.zeros((4, 5), dtype=bool), "does not match"),
        (np.zeros(16), None, r"\(H, W\)"),
        (np.zeros((1, 1, 4, 4)), None, r"\(N, H, W\)"),
        (np.zeros((0, 4)), None, "H, W >= 1"),
        (np.zeros((4, 4), dtype=bool), None, "not a real number"),
    ],
    ids=["nan", "mask-255", "mask-float", "shape", "1d", "4d", "empty", "bool-map"],
)
def test_accumulator_refuses_bad_input(anomaly_map, mask, match: str) -> None:
    acc = PixelMetricAccumulator()
    with pytest.raises(ConfigError, match=match):
        acc.add(anomaly_map, mask)
    assert acc.num_images == 0


@pytest.mark.parametrize("max_fpr", [0.0, -0.1, 1.5, True, "0.3"])
def test_accumulator_refuses_bad_max_fpr(max_fpr: object) -> None:
    with pytest.raises(ConfigError, match="max_fpr"):
        PixelMetricAccumulator(max_fpr=max_fpr)  # type: ignore[arg-type]


def test_pixel_metrics_refuses_count_mismatch() -> None:
    with pytest.raises(ConfigError, match="2 anomaly maps but 1 masks"):
        pixel_metrics([np.zeros((2, 2))] * 2, [None])


def test_metrics_module_imports_numpy_only() -> None:
    code = (
        "import sys, cops_deploy.evaluate.metrics; "
        "print(sorted(m for m in ('torch', 'sklearn', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
