"""``cops train`` and ``cops eval``: smoke runs and refusals (``cops demo``: test_demo.py)."""

from __future__ import annotations

import json

import pytest

from cops_deploy.cli.dataset_args import parse_classes
from cops_deploy.cli.main import main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from cops_deploy.data.synth import synthesize

    root = tmp_path_factory.mktemp("clisynth")
    return synthesize(
        root, seed=0, n_train_good=1, n_test_good=2, n_test_bad=2, size=48,
        classes=("noise", "pcb", "screw"),
    )  # fmt: skip


def _train_args(data, out, *extra):
    return [
        "train", "--data", str(data), "--dataset", "synth", "--out", str(out),
        "--model", "cops-tiny", "--random-clip", "--epochs", "1", "--batch-size", "4",
        "--classes", "noise,pcb", "--no-progress", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def run_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("clirun") / "run"
    assert main(_train_args(data, out)) == 0
    return out


def test_train_writes_a_run(run_dir, capsys):
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert (run_dir / "checkpoints" / "epoch_0001" / "state.json").is_file()
    config = json.loads((run_dir / "train_config.json").read_text())
    assert config["classes"] == ["noise", "pcb"] and config["epochs"] == 1


def test_train_resume_continues_with_more_epochs(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_train_args(data, out)) == 0
    args = _train_args(data, out, "--resume")
    args[args.index("--epochs") + 1] = "2"
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "resumed from epoch 1" in text and "epoch 2/2" in text
    assert (out / "checkpoints" / "epoch_0002").is_dir()


def test_eval_on_held_out_class_and_refusal_to_overwrite(data, run_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    args = [
        "eval", "--data", str(data), "--dataset", "synth", "--weights", str(run_dir / "model"),
        "--random-clip", "--classes", "screw", "--out", str(out), "--no-progress",
    ]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "mean: I-AUROC" in text and "preset paper (alpha 0.3" in text
    assert (out / "results.md").is_file() and (out / "overlays" / "screw.png").is_file()
    assert main(args) == 2
    assert "not empty" in capsys.readouterr().err
    assert main([*args, "--force", "--preset", "reference"]) == 0
    assert "alpha 0.26" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--weights", "nowhere"], "does not exist"),
        (["--weights", "{run}/model", "--dataset", "imagenet"], "unknown dataset"),
        (["--weights", "{run}/model"], "holds no CLIP weights"),
    ],
)
def test_eval_refusals(data, run_dir, tmp_path, capsys, extra, message):
    extra = [e.replace("{run}", str(run_dir)) for e in extra]
    args = ["eval", "--data", str(data), "--dataset", "synth", "--out", str(tmp_path / "e")]
    assert main([*args, *extra]) == 2
    assert message in capsys.readouterr().err


def test_eval_unknown_preset_is_an_argparse_error(data, run_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(
            ["eval", "--data", str(data), "--dataset", "synth", "--weights", str(run_dir),
             "--out", str(tmp_path), "--preset", "fast"]
        )  # fmt: skip
    assert "invalid choice" in capsys.readouterr().err


def test_train_refusals(data, run_dir, tmp_path, capsys):
    assert main(_train_args(data, run_dir)) == 2
    assert "not empty" in capsys.readouterr().err
    args = _train_args(data, tmp_path / "x")
    args.remove("--random-clip")
    assert main(args) == 2
    assert "no CLIP weights given" in capsys.readouterr().err
    assert main(_train_args(data, tmp_path / "y", "--resume")) == 2
    assert "no run to resume" in capsys.readouterr().err
    assert main(_train_args(data, tmp_path / "z", "--classes", "carpet")) == 2
    assert "valid classes" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (None, None),
        ([], None),
        (["a", "b"], ("a", "b")),
        (["a,b", "c"], ("a", "b", "c")),
        (["b,a,b", "a"], ("b", "a")),  # first-seen order, no repeats
        ([","], None),
    ],
)
def test_parse_classes(values, expected):
    assert parse_classes(values) == expected


@pytest.mark.parametrize(
    ("flags", "want"),
    [
        ([], {"neighbour_kernel": None, "recon_loss": None, "empty_gather": "reference"}),
        (
            ["--neighbour-kernel", "7", "--no-recon", "--empty-gather", "zero"],
            {"neighbour_kernel": 7, "recon_loss": False, "empty_gather": "zero"},
        ),
        (["--recon"], {"neighbour_kernel": None, "recon_loss": True, "empty_gather": "reference"}),
    ],
    ids=["defaults", "overrides", "recon-on"],
)
def test_train_flags_reach_train_cfg(flags, want, tmp_path, monkeypatch) -> None:
    """--neighbour-kernel, --[no-]recon and --empty-gather are mapped onto TrainCfg."""
    from cops_deploy.cli.main import main as cops_main
    from cops_deploy.train import trainer

    seen = {}

    class Stop(Exception):
        pass

    def fake_train(cfg):
        seen["cfg"] = cfg
        raise Stop

    monkeypatch.setattr(trainer, "train", fake_train)
    argv = ["train", "--data", str(tmp_path), "--dataset", "mvtec", "--out", str(tmp_path / "o")]
    with pytest.raises(Stop):
        cops_main([*argv, *flags])
    cfg = seen["cfg"]
    assert {k: getattr(cfg, k) for k in want} == want
