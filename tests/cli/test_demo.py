"""``cops demo``: one real (small) run of the whole deployment path, and every artefact checked.

The run is shrunk (tiny images, few of them, one epoch, few latency calls) but takes every
step the real demo takes: synthesise, train, export fp32 and fp16, calibrate, score on every
path, pictures, review page, summary.
"""

from __future__ import annotations

import json
import math
import re
import shlex

import pytest

from cops_deploy.cli import demo_cmd
from cops_deploy.cli.main import build_parser, main
from cops_deploy.export.pipeline import PARITY_TOLERANCES
from cops_deploy.runtime.bundle import open_bundle, sha256_file
from cops_deploy.runtime.calibration import image_set_record, list_images, load_calibration

SMALL = {
    "SYNTH": {"size": 48, "n_train_good": 1, "n_test_good": 4, "n_test_bad": 2},
    "TRAIN_CLASSES": ("noise", "pcb"),
    "HELD_OUT_CLASSES": ("weave", "screw"),
    "CALIBRATION_NORMAL": 2,  # 4 calibration images: fpr 0.25; 8 images scored
    "LATENCY_WARMUP": 1,
    "LATENCY_RUNS": 3,
    "PICTURE_TILE": 64,
    # a path this machine cannot run: skipped with the reason, the demo goes on
    "PATHS": (
        *demo_cmd.PATHS,
        demo_cmd.DemoPath("unrunnable", "fp32", "onnxruntime", "bf16", optional=True),
    ),
}
N_SCORED = 8
RUNTIME_PATHS = ("ONNX Runtime fp32", "ONNX Runtime fp16")  # OpenVINO too where installed


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    with pytest.MonkeyPatch.context() as mp:
        for name, value in SMALL.items():
            mp.setattr(demo_cmd, name, value)
        args = ["demo", "--out", str(out), "--epochs", "1", "--no-progress"]
        assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def summary(demo):
    return json.loads((demo / "summary.json").read_text())


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def test_writes_exactly_demo_outputs(demo):
    assert sorted(p.name for p in demo.iterdir()) == sorted(demo_cmd.DEMO_OUTPUTS)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_both_bundles_verify_and_are_calibrated_on_held_out_normals_only(demo, precision):
    bundle = open_bundle(demo / f"bundle-{precision}", verify=True)
    assert bundle.manifest.provenance.random_weights  # random CLIP, recorded
    assert bundle.manifest.parity["precision"] == precision
    record = load_calibration(bundle)
    assert record is not None and bundle.manifest.threshold == record.image_threshold
    normal = demo / "heldout" / "calibration" / "normal"
    assert record.images["normal"] == image_set_record(normal)
    assert record.images["normal"].count == 4 and record.image.target_fpr == 0.25
    scored = {sha256_file(p) for p in list_images(demo / "heldout" / "test")}
    assert len(scored) == N_SCORED
    assert not scored & {sha256_file(p) for p in list_images(normal)}  # never scored


def test_parity_of_every_runtime_path_is_within_the_export_tolerances(summary):
    rows = {r["path"]: r for r in summary["parity"]}
    assert set(RUNTIME_PATHS) <= set(rows)
    assert set(rows) | set(summary["skipped"]) == {
        p.label for p in SMALL["PATHS"] if p.label != demo_cmd.REFERENCE_PATH
    }
    assert "bf16" in summary["skipped"]["unrunnable"]  # the reason: bf16 is OpenVINO's
    for name, row in rows.items():
        assert _finite(row["score_max_abs"]) and _finite(row["map_max_abs"]), name
        if name.endswith("bf16"):
            assert row["tolerance"] is None and row["map_max_abs"] < 0.05
            continue
        tol = PARITY_TOLERANCES["fp16" if "fp16" in name else "fp32"]
        assert row["score_max_abs"] <= tol["pred_score_max_abs"], row
        assert row["map_max_abs"] <= tol["anomaly_map_max_abs"], row
        assert row["within"] is True


def test_latency_of_each_path_side_by_side(summary):
    rows = {r["path"]: r for r in summary["latency"]}
    assert {demo_cmd.REFERENCE_PATH, *RUNTIME_PATHS} <= set(rows)
    for row in rows.values():
        assert _finite(row["p50_ms"]) and row["p50_ms"] > 0 and row["runs"] == 3
        assert _finite(row["speedup"])


def test_decisions_and_regions_count_every_scored_image(summary):
    d = summary["decisions"]
    assert d["path"] == demo_cmd.LINE_PATH
    assert sum(r["images"] for r in d["per_class"]) == N_SCORED
    for r in d["per_class"]:
        assert r["ok"] + r["not_ok"] == r["images"] == 2, r  # 2 good, 2 defect per class
    c = d["confusion"]
    assert c["good"]["ok"] + c["good"]["not_ok"] == 4
    assert c["defect"]["ok"] + c["defect"]["not_ok"] == 4
    assert isinstance(d["regions"]["count"], int) and d["regions"]["count"] >= 0
    assert summary["calibration"]["normal_images"] == 4
    assert set(summary["agreement"]) == {r["path"] for r in summary["latency"]} - {
        demo_cmd.LINE_PATH
    }


def _table(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table after the heading starting with ``heading``."""
    part = text.split("\n## " + heading, 1)[1].split("\n## ", 1)[0]
    rows: list[str] = []
    for line in part.splitlines():
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break  # the end of the first table
    return [[c.strip() for c in r.strip("|").split("|")] for r in rows[2:]]


def test_summary_md_has_the_tables_with_finite_numbers(demo, summary, capsys):
    text = (demo / "summary.md").read_text()
    assert "CLIP is RANDOM" in text and "near chance" in text
    number = re.compile(r"^-?\d+(\.\d+)?(e[-+]\d+)?x?$")
    parity = _table(text, "Parity")
    assert {r[0] for r in parity} == {r["path"] for r in summary["parity"]}
    for r in parity:
        assert number.match(r[2]) and number.match(r[3]), r
    latency = _table(text, "Latency")
    assert {r[0] for r in latency} == {r["path"] for r in summary["latency"]}
    for r in latency:
        assert all(number.match(c) for c in r[2:]), r
    decisions = _table(text, "Decisions")
    assert len(decisions) == 4 and all(c.isdigit() for r in decisions for c in r[2:])
    assert "| truth \\ decision | OK | NOT OK |" in text
    assert "## Regions:" in text and "## Time" in text
    assert "Skipped paths: unrunnable: " in text
    assert "--clip-weights ViT-L-14-336px.pt" in text


def test_review_page_embeds_every_result_and_no_external_resource(demo):
    page = (demo / "review.html").read_text()
    assert page.count('class="card"') == N_SCORED
    sources = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, re.IGNORECASE)
    assert sources and all(s.startswith("data:image/") for s in sources), sources
    assert not re.search(r"https?://|<link|@import|url\(", page, re.IGNORECASE)
    assert "default-src 'none'" in page  # the CSP forbids any network load
    pictures = sorted((demo / "pictures").rglob("*.png"))
    assert len(pictures) == N_SCORED


def test_official_commands_parse_with_the_real_parsers(demo, monkeypatch):
    from cops_deploy.cli.export import build_parser as export_parser

    for name, value in SMALL.items():  # as the demo ran
        monkeypatch.setattr(demo_cmd, name, value)
    commands = demo_cmd.official_commands(demo)
    assert [c[:2] for c in commands] == [
        ["cops", "train"],
        ["cops-export", "--model"],
        ["cops", "calibrate"],
        ["cops", "predict"],
    ]
    for argv in commands:
        parser = export_parser() if argv[0] == "cops-export" else build_parser()
        parser.parse_args(argv[1:])  # an unknown flag exits
    printed = (demo / "summary.md").read_text()
    assert demo_cmd.OFFICIAL_CLIP in printed
    for argv in commands:
        assert shlex.join(argv) in printed


def test_demo_fpr_follows_the_number_of_normal_images():
    assert demo_cmd.demo_fpr(20) == 0.05
    assert demo_cmd.demo_fpr(100) == 0.05
    assert demo_cmd.demo_fpr(4) == 0.25


def test_refuses_a_used_folder_and_force_replaces_only_its_outputs(tmp_path, monkeypatch, capsys):
    import cops_deploy.data.synth as synth
    from cops_deploy.errors import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    for name in demo_cmd.DEMO_OUTPUTS:
        (out / name).write_text("old")
    (out / "mine.txt").write_text("kept")
    args = ["demo", "--out", str(out), "--no-progress"]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err

    def stop(*a, **k):
        raise ConfigError("stopped after the folder was prepared")

    monkeypatch.setattr(synth, "synthesize", stop)
    assert main([*args, "--force"]) == 2
    assert "stopped after" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_refuses_too_few_normal_images_to_calibrate_and_score(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        demo_cmd, "SYNTH", {"size": 48, "n_train_good": 1, "n_test_good": 2, "n_test_bad": 1}
    )
    monkeypatch.setattr(demo_cmd, "CALIBRATION_NORMAL", 2)
    assert main(["demo", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "2 normal test images" in err and "n_test_good" in err
