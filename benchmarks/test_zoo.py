"""Zoo benchmark (``--bench-zoo``): each Table S3 row's latency on every CPU backend, drawn
against the paper's accuracy; without the option only the cheap unit tests of the Pareto front,
the table and the chart writer run (part of ``make test``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zoo

from cops_deploy.configs import get_config
from cops_deploy.configs.paper import TABLE_S3

# ---------------------------------------------------------------------------------------------
# unit tests (always run)


def test_pareto_front_keeps_only_undominated_points():
    pts = [(1.0, 80.0), (2.0, 90.0), (3.0, 85.0), (2.0, 70.0), (4.0, 95.0), (1.0, 75.0)]
    assert zoo.pareto_front(pts) == [0, 1, 4]


def test_pareto_front_ties_and_edges():
    assert zoo.pareto_front([]) == []
    assert zoo.pareto_front([(5.0, 1.0)]) == [0]
    # same latency: only the more accurate; same point twice: the first only
    assert zoo.pareto_front([(1.0, 70.0), (1.0, 90.0), (1.0, 90.0)]) == [1]
    # slower and equally accurate is dominated
    assert zoo.pareto_front([(1.0, 90.0), (2.0, 90.0)]) == [0]


def _fake_results() -> dict[str, Any]:
    rows = {}
    latency = {"onnxruntime/fp32": 1.0, "openvino/bf16": 0.5}
    for i, row in enumerate(TABLE_S3[:3]):
        rows[row.model] = {
            "backbone": row.backbone,
            "input_size": row.input_size,
            "image_auroc": row.image_auroc,
            "pixel_auroc": row.pixel_auroc,
            "backends": {k: {"p50_s": v * (1 + 2 * i), "cpu_p50_s": v} for k, v in latency.items()},
        }
    rows[TABLE_S3[0].model]["backends"]["openvino/bf16"] = {"p50_s": None, "skipped": "no bf16"}
    return {
        "backends": [["onnxruntime", "fp32"], ["openvino", "bf16"]],
        "rows": rows,
        "machine": {"processor": "test CPU", "cpu_count": 2},
    }


def test_fronts_follow_the_paper_figures():
    fronts = zoo.fronts(_fake_results())
    # I-AUROC rises with latency over the three rows; the skipped point is not on the front
    got = [(p["model"], p["backend"]) for p in fronts["image_auroc"]]
    assert got == [
        ("cops-vit-b-16-224@336", "onnxruntime/fp32"),
        ("cops-vit-l-14-224@336", "openvino/bf16"),
        ("cops-vit-l-14-224@518", "openvino/bf16"),
    ]


def test_write_zoo_writes_json_markdown_and_chart(tmp_path: Path):
    import matplotlib.image

    paths = zoo.write_zoo(_fake_results(), tmp_path)
    assert [p.name for p in paths] == ["zoo.json", "zoo.md", "zoo.png", "zoo-cpu.png"]
    png = matplotlib.image.imread(paths[2])
    assert png.shape[0] > 300 and png.shape[1] > 600 and png.std() > 0
    md = paths[1].read_text()
    assert (
        "| `cops-vit-l-14-224@518` | ViT-L/14@224px | 518 | 90.0 | 91.8 | 5.00 s (cpu 1.00 s) | 2.50 s (cpu 0.50 s) * |"
        in md
    )
    assert "no bf16" in md and "paper Table S3" in md
    import json

    data = json.loads(paths[0].read_text())
    assert data["fronts"]["pixel_auroc"][0]["model"] == "cops-vit-b-16-224@336"
    assert "not measured here" in data["accuracy_source"]
    # by CPU seconds every row costs the same per backend here: the most accurate bf16 row wins
    front = [(p["model"], p["backend"]) for p in data["fronts_cpu"]["image_auroc"]]
    assert front == [("cops-vit-l-14-224@518", "openvino/bf16")]
    no_cpu = _fake_results()
    del no_cpu["rows"][TABLE_S3[1].model]["backends"]["openvino/bf16"]["cpu_p50_s"]
    assert [p.name for p in zoo.write_zoo(no_cpu, tmp_path / "partial")][-1] == "zoo.png"


def _gpu_check_json(folder: Path, status: str, fp16: float, bf16: float) -> None:
    """A row's gpu_check.json as benchmarks/gpu_check.py writes it (the keys zoo reads)."""
    folder.mkdir(parents=True)
    stages = {
        "fp32_reference": {"status": "ok", "eager": {"p50_ms": 40.0}},
        "deploy_fp16_sdpa": {"status": "ok", "batch1": {"p50_ms": fp16}, "batch32": {}},
        "deploy_bf16_sdpa": {"status": "ok", "batch1": {"p50_ms": bf16}},
    }
    result = {"status": status, "gpu": "NVIDIA H200", "torch": "2.11", "stages": stages}
    (folder / "gpu_check.json").write_text(json.dumps(result))


def test_gpu_zoo_rows_are_collected_and_drawn(tmp_path: Path, capsys):
    """gpu_zoo.sh's rows: collected in table order (a row that wrote nothing is "missing", and
    the exit status says a row did not pass); each passing row gives an fp16 and a bf16 point
    (ms), a failed one none; the chart is written."""
    _gpu_check_json(tmp_path / "row1", "pass", 2.7, 2.8)
    _gpu_check_json(tmp_path / "row2", "fail", 4.4, 4.5)
    assert zoo.main(["--collect-gpu", str(tmp_path)]) == 1  # rows 2-6 did not pass
    data = json.loads((tmp_path / "gpu_zoo.json").read_text())
    assert [r["model"] for r in data["rows"]] == [r.model for r in TABLE_S3]
    assert [r["status"] for r in data["rows"]] == ["pass", "fail", *["missing"] * 4]
    assert data["rows"][0]["deploy_fp16_sdpa"]["batch1"] == {"p50_ms": 2.7}
    assert "fp16 p50 2.70 ms  status pass" in capsys.readouterr().out
    results = zoo.from_gpu_zoo(data)
    first, second = (results["rows"][r.model] for r in TABLE_S3[:2])
    assert first["backends"] == {
        "torch-cuda/fp16": {"p50_ms": 2.7},
        "torch-cuda/bf16": {"p50_ms": 2.8},
    }
    assert second["backends"] == {}  # a row that failed its gates is not drawn
    assert first["image_auroc"] == TABLE_S3[0].image_auroc
    assert "NVIDIA H200" in results["machine"]["title"]
    chart = tmp_path / "g.png"
    assert zoo.main(["--gpu-zoo", str(tmp_path / "gpu_zoo.json"), "--out", str(chart)]) == 0
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_keeps_earlier_rows_of_the_same_machine():
    earlier, now = _fake_results(), _fake_results()
    first = TABLE_S3[0].model
    earlier["rows"] = {first: earlier["rows"][first]}
    earlier["backends"] = [["onnxruntime", "fp32"]]
    del now["rows"][first]
    merged = zoo.merge(earlier, now)
    assert list(merged["rows"]) == [r.model for r in TABLE_S3[:3]]  # table order
    assert merged["backends"] == [["onnxruntime", "fp32"], ["openvino", "bf16"]]
    other = dict(earlier, machine={"processor": "another CPU"})
    assert first not in zoo.merge(other, now)["rows"]
    assert zoo.merge(None, now) is now


def test_rows_filter_and_refusal():
    assert [r.model for r in zoo.rows(None)] == [r.model for r in TABLE_S3]
    assert [r.model for r in zoo.rows(["cops-vit-l-14-336@700"])] == ["cops-vit-l-14-336@700"]
    with pytest.raises(ValueError, match="not a Table S3 row; valid"):
        zoo.rows(["cops-vit-l-14-336@504"])


def test_bundle_key_follows_the_config():
    assert zoo.bundle_key("cops-vit-l-14-336@518").startswith("cops-vit-l-14-336-")
    assert zoo.bundle_key("cops-vit-l-14-336@518") == zoo.bundle_key("cops-vit-l-14-336")
    assert zoo.bundle_key("cops-vit-l-14-336@700") != zoo.bundle_key("cops-vit-l-14-336")


def test_test_image_is_seeded_uint8_at_size():
    a, b = zoo.test_image(48, seed=1), zoo.test_image(48, seed=1)
    assert a.shape == (48, 48, 3) and a.dtype == np.uint8 and np.array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# the zoo itself (--bench-zoo)


@pytest.fixture(scope="module")
def zoo_run(request: pytest.FixtureRequest):
    """Results shared by the row tests; merged with an earlier run's rows in --bench-out and
    written there after every row (so a partial run keeps what it measured)."""
    opt = request.config.getoption
    if not opt("--bench-zoo"):
        pytest.skip("the zoo benchmark runs with --bench-zoo (six full-size exports; heavy)")
    out = Path(opt("--bench-out"))
    results: dict[str, Any] = {
        "backends": zoo.available_backends(),
        "rows": {},
        "machine": zoo.machine(),
        "selected": [r.model for r in zoo.rows(opt("--bench-zoo-row"))],
        "repeats": opt("--bench-repeats") or 3,
        "threads": opt("--bench-threads"),
        "cache": str(zoo.default_cache()),
    }
    previous = zoo.read_previous(out)

    def save() -> list[Path]:
        return zoo.write_zoo(zoo.merge(previous, results), out)

    yield results, save
    if results["rows"]:
        paths = save()
        print(
            "\n"
            + zoo.markdown(zoo.merge(previous, results))
            + "written: "
            + ", ".join(map(str, paths))
        )


@pytest.mark.bench
@pytest.mark.parametrize("row", TABLE_S3, ids=[r.model for r in TABLE_S3])
def test_zoo_row(row, zoo_run, request: pytest.FixtureRequest):
    zoo_run, save = zoo_run
    if row.model not in zoo_run["selected"]:
        pytest.skip(f"{row.model} not selected by --bench-zoo-row")
    opt = request.config.getoption
    bundle, exported, export_s = zoo.cached_bundle(row.model, zoo.default_cache())
    from cops_deploy.runtime.bundle import open_bundle

    manifest = open_bundle(bundle, verify=False).manifest
    cfg = get_config(row.model)
    assert manifest.model_config == cfg.to_dict(), "cached bundle holds another config"
    parity = manifest.parity
    entry: dict[str, Any] = {
        "backbone": row.backbone,
        "input_size": row.input_size,
        "image_auroc": row.image_auroc,
        "pixel_auroc": row.pixel_auroc,
        "bundle": str(bundle),
        "exported_now": exported,
        "export_s": export_s,
        "export_parity": {k: parity[k] for k in ("anomaly_map_max_abs", "pred_score_max_abs")},
        "backends": {},
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average_before": os.getloadavg(),
    }
    zoo_run["rows"][row.model] = entry
    assert parity["anomaly_map_max_abs"] < opt("--gate-map-fp32")
    image = zoo.test_image(cfg.preprocess.size)
    reference = None
    for backend, precision in zoo_run["backends"]:
        got = zoo.measure(
            bundle,
            backend,
            precision,
            image,
            repeats=zoo_run["repeats"],
            threads=opt("--bench-threads"),
        )
        amap = got.pop("anomaly_map")
        assert amap.shape == (row.input_size, row.input_size)
        if reference is None:
            reference = (got["score"], amap)
        else:
            got["map_max_abs_vs_first"] = float(np.abs(amap - reference[1]).max())
            got["score_abs_vs_first"] = abs(got["score"] - reference[0])
        entry["backends"][f"{backend}/{precision}"] = got
    entry["load_average_after"] = os.getloadavg()
    save()
    for key, got in entry["backends"].items():
        limit = opt("--gate-map-lowp") if key.endswith("bf16") else opt("--gate-map-fp32")
        assert got.get("map_max_abs_vs_first", 0.0) <= limit, (key, got)
