"""Training: the dataset, loss going down, exact resume, atomic pickle-free checkpoints, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from cops_deploy.data.dataset import MetaDataset
from cops_deploy.data.transforms import load_mask
from cops_deploy.errors import ConfigError, DatasetError, TrainingError, WeightsError
from cops_deploy.train import checkpoint as ckpt_module
from cops_deploy.train import trainer as trainer_module
from cops_deploy.train.checkpoint import list_checkpoints, load_checkpoint
from cops_deploy.train.forward import training_forward
from cops_deploy.train.losses import cops_loss
from cops_deploy.train.trainer import TrainCfg, read_loss_log, train, train_step


def _cfg(root: Path, out: Path, **kw) -> TrainCfg:
    base = dict(
        data=root, dataset="synth", out=out, model="cops-tiny", random_clip=True, epochs=2,
        batch_size=3, progress=False,
    )  # fmt: skip
    base.update(kw)
    return TrainCfg(**base)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------- dataset


def test_dataset_items(synth_root, tiny_model):
    data = MetaDataset(synth_root, tiny_model.cfg.preprocess)
    assert len(data) == 8 and data.classes == ["stripes", "disc"]
    labels = data.labels()
    bad = int(np.flatnonzero(labels)[0])
    item = data[bad]
    assert item.image.shape == (3, 98, 98) and item.image.dtype == torch.float32
    assert item.mask.shape == (98, 98) and item.mask.dtype == torch.float32
    sample = data.samples[bad]
    expected = load_mask(sample.mask_file(synth_root), 98).astype(np.float32)
    np.testing.assert_array_equal(item.mask.numpy(), expected)
    assert item.mask.sum() > 0 and int(item.label) == 1 and item.has_mask
    good = data[int(np.flatnonzero(labels == 0)[0])]
    assert good.mask.sum() == 0 and int(good.label) == 0 and not good.has_mask
    assert Path(good.path).is_file()


def test_dataset_batches_collate(synth_root, tiny_model):
    loader = DataLoader(MetaDataset(synth_root, tiny_model.cfg.preprocess), batch_size=3)
    batch = next(iter(loader))
    assert batch.image.shape == (3, 3, 98, 98) and batch.mask.shape == (3, 98, 98)
    assert batch.label.dtype == torch.int64 and len(batch.cls_name) == 3


def test_dataset_classes_filter_and_refusals(synth_root, tiny_model):
    pre = tiny_model.cfg.preprocess
    assert MetaDataset(synth_root, pre, classes=["disc", "disc"]).classes == ["disc"]
    with pytest.raises(DatasetError, match="valid classes"):
        MetaDataset(synth_root, pre, classes=["carpet"])
    with pytest.raises(ConfigError, match="valid splits"):
        MetaDataset(synth_root, pre, split="val")
    with pytest.raises(DatasetError, match="no meta.json"):
        MetaDataset(synth_root / "disc", pre)


# ------------------------------------------------------------------------------- steps


def test_loss_decreases_over_a_few_steps(synth_root):
    from cops_deploy import create_model

    model = create_model("cops-tiny", seed=0)
    data = MetaDataset(synth_root, model.cfg.preprocess)
    batch = next(iter(DataLoader(data, batch_size=8)))
    opt = torch.optim.Adam(model.prompt.parameters(), lr=1e-3, betas=(0.5, 0.999))

    def loss_now() -> float:
        with torch.no_grad():
            out = training_forward(model, batch.image, 5, torch.Generator().manual_seed(0))
            return float(cops_loss(out, batch.mask, batch.label, 14).total)

    before = loss_now()
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        train_step(model, opt, batch, 5, True, gen)
    after = loss_now()
    assert after < before * 0.9, (before, after)


def test_a_non_finite_loss_stops_training(synth_root):
    from cops_deploy import create_model

    model = create_model("cops-tiny", seed=0)
    with torch.no_grad():
        model.prompt.ctx_pos.fill_(float("nan"))
    batch = next(iter(DataLoader(MetaDataset(synth_root, model.cfg.preprocess), batch_size=2)))
    opt = torch.optim.Adam(model.prompt.parameters())
    with pytest.raises(TrainingError, match="not finite.*lower --lr"):
        train_step(model, opt, batch, 5, True, None)


def _all_anomalous_batch(synth_root, model):
    """A batch whose every patch is anomalous (no normal patch: the gather set is empty)."""
    batch = next(iter(DataLoader(MetaDataset(synth_root, model.cfg.preprocess), batch_size=2)))
    return batch._replace(mask=torch.ones_like(batch.mask), label=torch.ones_like(batch.label))


def test_a_batch_without_normal_patches_gives_the_references_nan_gather(synth_root):
    from cops_deploy import create_model

    model = create_model("cops-tiny", seed=0)
    batch = _all_anomalous_batch(synth_root, model)
    opt = torch.optim.Adam(model.prompt.parameters())
    before = model.prompt.t_n.detach().clone()
    terms = train_step(model, opt, batch, 5, True, torch.Generator().manual_seed(0))
    assert torch.isnan(terms.gather) and torch.isnan(terms.total)
    assert torch.isfinite(terms.scatter) and torch.isfinite(terms.image)
    t_n = model.prompt.t_n
    assert t_n.grad is not None and torch.equal(t_n.grad, torch.zeros_like(t_n))
    assert opt.state[t_n]["step"] == 1  # the zero gradient advances its Adam state
    assert torch.equal(t_n.detach(), before)  # Adam's first step on a zero gradient: no move
    assert all(torch.isfinite(p).all() for p in model.prompt.parameters())


def test_a_batch_without_normal_patches_gives_zero_gather_when_asked(synth_root):
    from cops_deploy import create_model

    model = create_model("cops-tiny", seed=0)
    batch = _all_anomalous_batch(synth_root, model)
    opt = torch.optim.Adam(model.prompt.parameters())
    gen = torch.Generator().manual_seed(0)
    terms = train_step(model, opt, batch, 5, True, gen, empty_gather="zero")
    assert float(terms.gather) == 0.0 and torch.isfinite(terms.total)
    assert model.prompt.t_n.grad is None and model.prompt.t_n not in opt.state


# ------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def straight_run(synth_root, tmp_path_factory):
    """Two epochs without interruption (3 steps each: 8 images, batch 3)."""
    out = tmp_path_factory.mktemp("runs") / "straight"
    result = train(_cfg(synth_root, out))
    return out, result


def test_run_folder_contents(straight_run):
    out, result = straight_run
    assert result.steps == 6 and result.start_epoch == 0
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["epoch_0001", "epoch_0002"]
    steps = read_loss_log(out / "losses.jsonl", "step")
    assert [r["step"] for r in steps] == list(range(1, 7))
    epochs = read_loss_log(out / "losses.jsonl", "epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    assert {"total", "image", "patch", "gather", "scatter", "kl", "recon"} <= set(epochs[0])
    config = json.loads((out / "train_config.json").read_text())
    assert config["neighbour_kernel"] == 5 and config["recon_loss"] is True
    assert config["empty_gather"] == "reference"
    assert config["classes"] == ["stripes", "disc"] and config["clip"] == "random"
    saved = json.loads((out / "model" / "config.json").read_text())
    assert saved["includes_clip"] is False
    assert not any(k.startswith("clip.") for k in _tensors(out / "model"))


def test_saved_model_loads_with_the_trained_prompt(straight_run):
    from cops_deploy.model.factory import load_model

    out, result = straight_run
    loaded = load_model(out / "model", seed=0)
    for name, tensor in result.model.prompt.state_dict().items():
        assert torch.equal(loaded.prompt.state_dict()[name], tensor), name
    fresh = trainer_module.build_model(_cfg(Path("."), Path(".")))
    assert torch.equal(loaded.clip.visual.conv1.weight, fresh.clip.visual.conv1.weight)
    assert not torch.equal(loaded.prompt.ctx_pos, fresh.prompt.ctx_pos)


def _assert_same_run(a: Path, b: Path) -> None:
    ta, tb = _tensors(a / "model"), _tensors(b / "model")
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    last_a = load_checkpoint(list_checkpoints(a / "checkpoints")[-1])
    last_b = load_checkpoint(list_checkpoints(b / "checkpoints")[-1])
    for k, v in last_a.optimizer_tensors.items():
        assert torch.equal(v, last_b.optimizer_tensors[k]), k
    for k, v in last_a.rng.items():
        assert torch.equal(v, last_b.rng[k]), k
    assert (a / "losses.jsonl").read_text() == (b / "losses.jsonl").read_text()


def test_resume_gives_the_uninterrupted_result(synth_root, straight_run, tmp_path):
    out = tmp_path / "resumed"
    first = train(_cfg(synth_root, out, epochs=1))
    assert first.steps == 3
    second = train(_cfg(synth_root, out, epochs=2, resume=True))
    assert second.start_epoch == 1 and second.steps == 6
    _assert_same_run(straight_run[0], out)


def test_resume_after_a_crash_in_the_middle_of_an_epoch(
    synth_root, straight_run, tmp_path, monkeypatch
):
    out = tmp_path / "crashed"
    calls = {"n": 0}
    real_step = trainer_module.train_step

    def crashing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # the second step of epoch 2
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", crashing_step)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(synth_root, out))
    monkeypatch.setattr(trainer_module, "train_step", real_step)
    assert len(read_loss_log(out / "losses.jsonl", "step")) == 4
    train(_cfg(synth_root, out, resume=True))
    _assert_same_run(straight_run[0], out)


def test_checkpoint_write_is_atomic(synth_root, straight_run, tmp_path, monkeypatch):
    out = tmp_path / "atomic"
    real_write = ckpt_module._write_synced
    written = []

    def failing_write(path: Path, data: bytes) -> str:
        written.append(path.name)
        if path.name == "optimizer.safetensors" and ".epoch_0002." in str(path):
            raise OSError(28, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(ckpt_module, "_write_synced", failing_write)
    with pytest.raises(OSError, match="No space"):
        train(_cfg(synth_root, out))
    monkeypatch.setattr(ckpt_module, "_write_synced", real_write)
    ckpt_root = out / "checkpoints"
    assert [p.name for p in ckpt_root.iterdir()] == ["epoch_0001"]  # no partial folder left
    assert "prompt.safetensors" in written
    train(_cfg(synth_root, out, resume=True))
    _assert_same_run(straight_run[0], out)


def test_checkpoints_hold_no_pickle(straight_run):
    out, _ = straight_run
    for folder in list_checkpoints(out / "checkpoints"):
        names = sorted(p.name for p in folder.iterdir())
        assert names == [
            "optimizer.safetensors",
            "prompt.safetensors",
            "rng.safetensors",
            "state.json",
        ]
        for p in folder.iterdir():
            head = p.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", p  # no pickle, no torch zip
            if p.suffix == ".json":
                json.loads(p.read_text())
            else:
                with safe_open(str(p), "pt") as f:
                    assert len(list(f.keys())) > 0
    ck = load_checkpoint(list_checkpoints(out / "checkpoints")[-1])
    assert ck.rng["torch_cpu"].dtype == torch.uint8
    assert ck.rng["torch_cpu"].shape == torch.get_rng_state().shape
    assert {"generator.loader", "generator.noise"} <= set(ck.rng)
    assert ck.optimizer_meta["param_groups"][0]["betas"] == [0.5, 0.999]
    assert any(k.endswith("/exp_avg_sq") for k in ck.optimizer_tensors)
    assert ck.epoch == 2 and ck.step == 6


def test_a_damaged_checkpoint_is_refused(straight_run, tmp_path):
    import shutil

    src = list_checkpoints(straight_run[0] / "checkpoints")[0]
    copy = tmp_path / "epoch_0001"
    shutil.copytree(src, copy)
    data = bytearray((copy / "prompt.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (copy / "prompt.safetensors").write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="prompt.safetensors.*sha256"):
        load_checkpoint(copy)


def test_an_unreadable_checkpoint_file_is_refused(straight_run, tmp_path):
    """A file that matches its recorded sha256 but is no safetensors file is named."""
    import hashlib
    import json
    import shutil

    src = list_checkpoints(straight_run[0] / "checkpoints")[0]
    copy = tmp_path / "epoch_0001"
    shutil.copytree(src, copy)
    junk = b"not a safetensors file"
    (copy / "rng.safetensors").write_bytes(junk)
    state = json.loads((copy / "state.json").read_text())
    state["files"]["rng.safetensors"] = hashlib.sha256(junk).hexdigest()
    (copy / "state.json").write_text(json.dumps(state))
    with pytest.raises(WeightsError, match="cannot read checkpoint file .*rng.safetensors"):
        load_checkpoint(copy)


# ------------------------------------------------------------------------------- refusals


def test_refuses_a_non_empty_out_without_resume(synth_root, straight_run):
    with pytest.raises(ConfigError, match="not empty.*--resume"):
        train(_cfg(synth_root, straight_run[0]))


def test_refuses_resume_without_a_run(synth_root, tmp_path):
    with pytest.raises(ConfigError, match="no run to resume"):
        train(_cfg(synth_root, tmp_path / "none", resume=True))


def test_refuses_resume_with_other_settings(synth_root, straight_run):
    with pytest.raises(ConfigError, match="batch_size: run 3, now 4"):
        train(_cfg(synth_root, straight_run[0], batch_size=4, resume=True))


def test_kernel_and_recon_override_the_dataset_rule(synth_root, tmp_path, monkeypatch):
    used = []
    real = trainer_module.train_step

    def spy(model, opt, batch, kernel, use_recon, *args, **kwargs):
        used.append((kernel, use_recon))
        return real(model, opt, batch, kernel, use_recon, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", spy)
    out = tmp_path / "r"
    train(_cfg(synth_root, out, epochs=1, neighbour_kernel=3, recon_loss=False))
    config = json.loads((out / "train_config.json").read_text())
    assert config["neighbour_kernel"] == 3 and config["recon_loss"] is False
    assert used and set(used) == {(3, False)}
    assert all(r["recon"] == 0.0 for r in read_loss_log(out / "losses.jsonl", "step"))


def test_a_finished_run_resumed_is_left_as_it_is(synth_root, straight_run):
    before = _tensors(straight_run[0] / "model")
    result = train(_cfg(synth_root, straight_run[0], resume=True))
    assert result.start_epoch == 2 and result.epoch_losses == []
    after = _tensors(straight_run[0] / "model")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"random_clip": False}, "no CLIP weights given"),
        ({"clip_weights": "x.pt"}, "exclude each other"),
        ({"epochs": 0}, "--epochs must be >= 1"),
        ({"batch_size": 0}, "--batch-size must be >= 1"),
        ({"lr": 0.0}, "--lr must be > 0"),
        ({"empty_gather": "nan"}, "empty_gather must be one of reference, zero"),
        ({"neighbour_kernel": 4}, "--neighbour-kernel must be a positive odd int, got 4"),
    ],
)
def test_refuses_bad_settings(synth_root, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        train(_cfg(synth_root, tmp_path / "r", **kw))
    assert not (tmp_path / "r").exists()


def test_refuses_an_unknown_dataset_name(synth_root, tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        train(_cfg(synth_root, tmp_path / "r", dataset="nope"))


def test_refuses_a_file_as_out(synth_root, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="not a folder"):
        train(_cfg(synth_root, tmp_path / "f"))


def test_checkpoint_of_another_format_is_refused(straight_run, tmp_path):
    import shutil

    copy = tmp_path / "epoch_0001"
    shutil.copytree(list_checkpoints(straight_run[0] / "checkpoints")[0], copy)
    state = json.loads((copy / "state.json").read_text())
    state["version"] = 99
    (copy / "state.json").write_text(json.dumps(state))
    with pytest.raises(WeightsError, match="version 99"):
        load_checkpoint(copy)
    (copy / "state.json").write_text("{")
    with pytest.raises(WeightsError, match="damaged"):
        load_checkpoint(copy)


def test_optimizer_and_rng_state_must_fit_the_run(straight_run):
    from cops_deploy.train.checkpoint import load_optimizer_state, restore_rng_state

    ck = load_checkpoint(list_checkpoints(straight_run[0] / "checkpoints")[-1])
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([param])
    with pytest.raises(WeightsError, match="same model"):
        load_optimizer_state(opt, ["other"], ck.optimizer_tensors, ck.optimizer_meta, "ck")
    with pytest.raises(WeightsError, match="generator 'extra'"):
        restore_rng_state(ck.rng, {"extra": torch.Generator()}, "ck")
