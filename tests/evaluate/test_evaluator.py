"""Evaluation end to end on a tiny synthetic set: metrics, n/a handling, reports, presets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from cops_deploy.data.meta import load_meta, write_meta
from cops_deploy.errors import ConfigError, WeightsError
from cops_deploy.evaluate.evaluator import (
    METRICS,
    EvalCfg,
    HeadSettings,
    apply_head,
    evaluate_model,
    prepare_out_dir,
    preset_head,
    run_eval,
    write_eval_outputs,
)
from cops_deploy.evaluate.metrics import image_metrics, pixel_metrics


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    from cops_deploy.data.synth import synthesize

    root = tmp_path_factory.mktemp("evalsynth")
    return synthesize(
        root, seed=1, n_train_good=1, n_test_good=2, n_test_bad=3, size=64,
        classes=("weave", "screw"),
    )  # fmt: skip


@pytest.fixture(scope="module")
def model():
    from cops_deploy import create_model

    return create_model("cops-tiny", seed=0)


@pytest.fixture(scope="module")
def result(model, eval_root):
    return evaluate_model(model, eval_root, "synth", batch_size=3, progress=False)


def test_metrics_per_class_match_the_metrics_module(result, model, eval_root):
    assert list(result.metrics) == ["weave", "screw"]
    assert len(result.records) == 10 and result.pixel_skipped == 0
    from cops_deploy.data.dataset import MetaDataset

    data = MetaDataset(eval_root, model.cfg.preprocess, classes=["screw"])
    items = [data[i] for i in range(len(data))]
    import torch

    with torch.inference_mode():
        out = model(torch.stack([it.image for it in items]))
    labels = np.array([int(it.label) for it in items])
    expected = image_metrics(out.pred_score.numpy(), labels)
    expected.update(
        pixel_metrics(out.anomaly_map.numpy(), np.stack([it.mask.numpy() > 0.5 for it in items]))
    )
    for m in METRICS:
        assert result.metrics["screw"][m] == pytest.approx(expected[m], abs=1e-6), m


def test_results_do_not_depend_on_the_batch_size(model, eval_root, result):
    one = evaluate_model(model, eval_root, "synth", batch_size=1, progress=False)
    scores_a = np.array([r.score for r in one.records])
    scores_b = np.array([r.score for r in result.records])
    np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=1e-6)


def test_reports_and_overlays_are_written(result, tmp_path):
    files = write_eval_outputs(result, tmp_path, {"weights": "random"}, "t")
    payload = json.loads(files["json"].read_text())
    assert set(payload["classes"]) == {"weave", "screw"}
    assert payload["metrics"] == list(METRICS)
    assert payload["meta"]["alpha"] == 0.3 and payload["meta"]["weights"] == "random"
    assert "| **Mean** |" in files["markdown"].read_text()
    rows = list(csv.DictReader(files["scores"].read_text().splitlines()))
    assert len(rows) == 10 and {r["class"] for r in rows} == {"weave", "screw"}
    for cls in ("weave", "screw"):
        assert (tmp_path / "overlays" / f"{cls}.png").is_file()
    overlay = result.overlays["weave"]
    assert len(overlay.paths) == 5 and overlay.labels[0].endswith(f"{result.records[0].score:.3f}")


def _rewrite_meta(src: Path, dst: Path, edit) -> Path:
    import shutil

    shutil.copytree(src, dst)
    meta = load_meta(dst)
    edit(meta["test"])
    write_meta(dst, meta)
    return dst


def test_undefined_metrics_are_na(model, eval_root, tmp_path):
    def edit(test):
        test["weave"] = [e for e in test["weave"] if e["anomaly"] == 0]  # good only
        test["screw"] = [e for e in test["screw"] if e["anomaly"] == 1]  # anomalous only

    root = _rewrite_meta(eval_root, tmp_path / "data", edit)
    res = evaluate_model(model, root, "synth", progress=False)
    assert all(res.metrics["weave"][m] is None for m in METRICS)
    screw = res.metrics["screw"]
    assert all(screw[m] is None for m in ("I-AUROC", "I-AP", "I-F1max"))
    assert all(screw[m] is not None for m in ("P-AUROC", "P-AP", "AUPRO", "P-F1max"))
    files = write_eval_outputs(res, tmp_path / "out")
    table = files["markdown"].read_text()
    assert "| weave | n/a | n/a | n/a | n/a | n/a | n/a | n/a |" in table
    assert "P-AUROC over 1 of 2" in table
    assert "n/a" in files["csv"].read_text()
    assert json.loads(files["json"].read_text())["classes"]["weave"]["I-AUROC"] is None


def test_anomalous_images_without_masks_are_left_out_of_pixel_metrics(model, eval_root, tmp_path):
    def edit(test):
        bad = [e for e in test["screw"] if e["anomaly"] == 1]
        bad[0]["mask_path"] = ""

    root = _rewrite_meta(eval_root, tmp_path / "data", edit)
    res = evaluate_model(model, root, "synth", classes=["screw"], progress=False)
    assert res.pixel_skipped == 1
    assert res.metrics["screw"]["I-AUROC"] is not None
    assert res.metrics["screw"]["P-AUROC"] is not None


def test_image_label_datasets_get_no_pixel_metrics(model, eval_root):
    res = evaluate_model(model, eval_root, "headct", classes=["screw"], progress=False)
    assert res.metrics["screw"]["I-AUROC"] is not None
    assert all(res.metrics["screw"][m] is None for m in ("P-AUROC", "P-AP", "AUPRO", "P-F1max"))


def test_presets():
    assert preset_head("paper", "mvtec") == HeadSettings(0.3, 0.9, 5)
    assert preset_head("paper", "visa") == HeadSettings(0.3, 0.9, 5)
    assert preset_head("reference", "mvtec") == HeadSettings(0.26, 0.9, 5)
    assert preset_head("reference", "VisA") == HeadSettings(0.35, 1.0, 3)
    with pytest.raises(ConfigError, match="valid presets"):
        preset_head("fast", "mvtec")


def test_apply_head_changes_what_the_model_computes():
    from cops_deploy import create_model

    m = create_model("cops-tiny", seed=0)
    apply_head(m, HeadSettings(0.35, 1.0, 3))
    assert (m.cfg.head.alpha, m.cfg.head.beta, m.cfg.head.neighbour_kernel) == (0.35, 1.0, 3)


def test_out_dir_refused_unless_forced(tmp_path):
    (tmp_path / "results.md").write_text("old")
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty.*--force"):
        prepare_out_dir(tmp_path, force=False)
    prepare_out_dir(tmp_path, force=True)
    assert not (tmp_path / "results.md").exists() and (tmp_path / "keep.txt").exists()


def test_run_eval_refusals(eval_root, tmp_path):
    from cops_deploy.model.factory import create_model, save_model

    base = dict(data=eval_root, dataset="synth", progress=False)
    with pytest.raises(WeightsError, match="does not exist"):
        run_eval(EvalCfg(out=tmp_path / "a", weights=tmp_path / "missing", **base))
    weights = save_model(create_model("cops-tiny", seed=0), tmp_path / "w", include_clip=False)
    with pytest.raises(ConfigError, match="holds no CLIP weights"):
        run_eval(EvalCfg(out=tmp_path / "b", weights=weights, **base))
    with pytest.raises(ConfigError, match="exclude each other"):
        run_eval(
            EvalCfg(out=tmp_path / "c", weights=weights, clip_weights="x", random_clip=True, **base)
        )


def test_run_eval_warns_when_clip_differs_from_training(eval_root, tmp_path):
    from cops_deploy.model.factory import create_model, save_model

    model = create_model("cops-tiny", seed=0)
    model.provenance = {"clip": "0" * 64, "cops": "random"}
    weights = save_model(model, tmp_path / "w", include_clip=False)
    warnings: list[str] = []
    cfg = EvalCfg(
        data=eval_root, dataset="synth", out=tmp_path / "o", weights=weights, random_clip=True,
        classes=("screw",), progress=False,
    )  # fmt: skip
    result, files = run_eval(cfg, warn=warnings.append)
    assert warnings and "trained on CLIP" in warnings[0]
    assert files["markdown"].is_file() and list(result.metrics) == ["screw"]


@pytest.mark.parametrize(
    ("kw", "match"), [({"batch_size": 0}, "batch-size"), ({"overlay_rows": 0}, "overlay_rows")]
)
def test_evaluate_refuses_bad_settings(model, eval_root, kw, match):
    with pytest.raises(ConfigError, match=match):
        evaluate_model(model, eval_root, "synth", progress=False, **kw)


def test_out_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        prepare_out_dir(tmp_path / "f", force=True)
