"""--preset, --alpha, --beta, --kernel: one definition (cli.head_args) for ``cops predict``,
``cops eval`` and ``cops-export``, and each flag reaching the model's head."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cops_deploy.evaluate.evaluator as evaluator
import cops_deploy.model.factory as factory
from cops_deploy.cli.export import build_parser, export_cfg
from cops_deploy.cli.export import main as export_main
from cops_deploy.cli.head_args import PRESETS
from cops_deploy.cli.main import main
from cops_deploy.errors import CopsError

# cops-tiny's own head (its config): alpha 0.3, beta 0.9, kernel 5
CASES = [
    ([], (0.3, 0.9, 5)),
    (["--preset", "paper"], (0.3, 0.9, 5)),
    (["--preset", "reference"], (0.26, 0.9, 5)),
    (["--alpha", "0.11"], (0.11, 0.9, 5)),
    (["--beta", "0.22"], (0.3, 0.22, 5)),
    (["--kernel", "7"], (0.3, 0.9, 7)),
    (["--preset", "reference", "--alpha", "0.4", "--kernel", "3"], (0.4, 0.9, 3)),
]
BAD = [
    (["--alpha", "1.5"], "'1.5' is not a weight; valid: a number in [0, 1]"),
    (["--alpha", "nan"], "'nan' is not a weight"),
    (["--beta", "-0.1"], "'-0.1' is not a weight"),
    (["--kernel", "4"], "'4' is not a kernel size; valid: an odd integer >= 1"),
    (["--kernel", "-1"], "'-1' is not a kernel size"),
    (["--kernel", "x"], "'x' is not a kernel size"),
    (["--preset", "fast"], "invalid choice: 'fast'"),
]


def test_presets_are_the_evaluators() -> None:
    assert PRESETS == evaluator.PRESETS


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a.png")
    return folder


@pytest.mark.parametrize(("flags", "head"), CASES)
def test_predict_flags_reach_the_model_head(image_dir, tmp_path, monkeypatch, flags, head):
    built = []
    original = factory.create_model

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append(model.cfg.head)
        return model

    monkeypatch.setattr(factory, "create_model", spy)
    args = ["predict", str(image_dir), "--out", str(tmp_path / "out"), "--model", "cops-tiny"]
    assert main([*args, "--random-weights", *flags]) == 0
    assert [(h.alpha, h.beta, h.neighbour_kernel) for h in built] == [head]


@pytest.mark.parametrize(("flags", "head"), CASES[1:])
def test_eval_flags_reach_the_model_head(tmp_path, monkeypatch, capsys, flags, head):
    seen = []

    def stop(cfg, given, warn=None):
        seen.append((given.alpha, given.beta, given.neighbour_kernel))
        raise CopsError("stopped after the head was chosen")

    monkeypatch.setattr(evaluator, "load_eval_model", stop)
    args = ["eval", "--data", str(tmp_path), "--dataset", "synth", "--weights", str(tmp_path)]
    assert main([*args, "--out", str(tmp_path / "e"), *flags]) == 2
    assert seen == [head]


def test_eval_reference_preset_on_visa_then_override(tmp_path, monkeypatch):
    seen = []

    def stop(cfg, given, warn=None):
        seen.append((given.alpha, given.beta, given.neighbour_kernel))
        raise CopsError("stop")

    monkeypatch.setattr(evaluator, "load_eval_model", stop)
    args = ["eval", "--data", str(tmp_path), "--dataset", "visa", "--weights", str(tmp_path)]
    flags = ["--preset", "reference", "--beta", "0.5"]
    assert main([*args, "--out", str(tmp_path / "e"), *flags]) == 2
    assert seen == [(0.35, 0.5, 3)]


@pytest.mark.parametrize(("flags", "head"), CASES)
def test_export_flags_map_onto_head_overrides(flags, head):
    cfg = export_cfg(build_parser().parse_args(["--out", "b", "--random-weights", *flags]))
    keys = ("head.alpha", "head.beta", "head.neighbour_kernel")
    expected = dict(zip(keys, head, strict=True))
    if not flags:
        assert dict(cfg.head_overrides) == {}
    else:  # the preset sets all three; a bare override only its own
        given = dict(cfg.head_overrides)
        assert {k: expected[k] for k in given} == given
        assert "--preset" not in flags or set(given) == set(keys)


@pytest.mark.parametrize(("flags", "message"), BAD)
def test_bad_values_are_refused_alike_by_the_three_commands(tmp_path, capsys, flags, message):
    for argv in (
        ["predict", "x.png", "--out", str(tmp_path), "--random-weights", *flags],
        ["eval", "--data", "d", "--dataset", "synth", "--weights", "w", "--out", "o", *flags],
    ):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert export_main(["--out", str(tmp_path), "--random-weights", *flags]) == 2
    assert message in capsys.readouterr().err


def test_predict_with_a_bundle_refuses_head_flags(image_dir, tmp_path, capsys):
    args = ["predict", str(image_dir), "--out", str(tmp_path / "o"), "--bundle", str(tmp_path)]
    assert main([*args, "--preset", "reference", "--kernel", "3"]) == 2
    err = capsys.readouterr().err
    assert "--preset reference --kernel 3: these set the head of a model built from" in err
    assert "`cops-export ... --preset reference --kernel 3`" in err
