"""The trainer's own step against the reference's recorded training step (golden/train).

The official CoPS ``train()`` was run at the tiny size on one fixed batch for two optimizer
steps, per dataset case (mvtec: kernel 3, recon on; visa: kernel 5, recon off). This test
builds cops-tiny from the same weights through the real loaders, replays the recorded noise
through ``train_step`` with the trainer's own optimizer, and checks every loss term, every
gradient and the parameters after both steps, to the tolerances of golden/train/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cops_deploy.data.dataset import DatasetItem
from cops_deploy.model.weights import read_reference_cops
from cops_deploy.train.forward import training_forward
from cops_deploy.train.losses import patch_labels
from cops_deploy.train.policy import training_kernel, uses_recon
from cops_deploy.train.trainer import TrainCfg, make_optimizer, train_step
from tests.golden_support import golden_dir, golden_model

GOLDEN = golden_dir()
TRAIN = GOLDEN / "train"
CASES = ("mvtec", "visa")
FWD_TOL = 2e-5
LOSS_TOL = 2e-5
GRAD_REL = 2e-5
DEEP_GRAD_REL = 1e-3  # compound_prompts_text.*: fp16-quantised per sample
PARAM_TOL = 1e-6
SMALL_GRAD = 1e-3  # elements below this x max|grad| at some step are compared loosely

pytestmark = pytest.mark.skipif(
    not (TRAIN / "train_cases.npz").is_file(), reason=f"no training golden at {TRAIN}"
)


def deep_param_tol(lr: float, steps: int, rel_grad: np.ndarray) -> np.ndarray:
    """Extra parameter tolerance for the deep tokens, from their gradient tolerance.

    Their gradients are good to DEEP_GRAD_REL x max only (each prompt's gradient is rounded to
    float16, so one-ulp flips from op order are expected). Adam's step is scale-free: a
    gradient off by a fraction e of its own size moves the element by about lr x e, so an
    element whose gradient was ``rel_grad`` x max at some step may move by
    lr x steps x DEEP_GRAD_REL / rel_grad (capped at the README's 2 x lr x steps).
    """
    floor = DEEP_GRAD_REL / 2  # below it the cap applies anyway
    return np.minimum(lr * steps * DEEP_GRAD_REL / np.maximum(rel_grad, floor), 2 * lr * steps)


@pytest.fixture(scope="module")
def golden():
    return np.load(TRAIN / "train_cases.npz"), json.loads((TRAIN / "case.json").read_text())


def _model():
    model, _ = golden_model(GOLDEN)
    extras = read_reference_cops(TRAIN / "cops_tiny_vae_encoder_reference_format.pth")
    assert extras and all(k.startswith("vae_encoder.") for k in extras)
    missing, unexpected = model.prompt.load_state_dict(extras, strict=False)
    assert not unexpected
    model.prompt.train()
    return model


def _batch(t) -> DatasetItem:
    masks = torch.from_numpy(t["masks"][:, 0] > 0.5).float()  # what the Dataset gives
    n = masks.shape[0]
    return DatasetItem(
        torch.from_numpy(t["images"]), masks, torch.from_numpy(t["labels"]),
        ["golden"] * n, [f"golden/{i}" for i in range(n)], [True] * n,
    )  # fmt: skip


def _close(got: torch.Tensor, ref: np.ndarray, tol: float, what: str) -> None:
    got = got.detach().cpu().numpy()
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    diff = float(np.abs(got - ref).max())
    assert diff <= tol, f"{what}: max abs diff {diff:.3g} > {tol:.3g}"


def test_case_rules_follow_the_reference(golden):
    _, case = golden
    for name in CASES:
        c = case["cases"][name]
        assert training_kernel(c["dataset_arg"]) == c["train_neighbour_kernel"], name
        assert uses_recon(c["dataset_arg"]) == c["recon_loss"].startswith("on"), name


def test_optimizer_is_the_references(golden):
    _, case = golden
    ref = case["optimizer"]["defaults_read_back"]
    model = _model()
    opt = make_optimizer(model, TrainCfg(data=Path("."), dataset="mvtec", out=Path(".")))
    assert type(opt) is torch.optim.Adam
    for key in ("lr", "eps", "weight_decay", "amsgrad", "maximize"):
        assert opt.defaults[key] == ref[key], key
    assert list(opt.defaults["betas"]) == ref["betas"]
    names = {id(p): n for n, p in model.prompt.named_parameters()}
    in_opt = {names[id(p)] for group in opt.param_groups for p in group["params"]}
    assert set(case["optimizer"]["receive_a_grad"]) <= in_opt
    assert not any(n.startswith("clip.") for n in in_opt)


@pytest.mark.parametrize("case", CASES)
def test_training_steps_match_reference(golden, case):
    t, _ = golden
    model = _model()
    params = dict(model.prompt.named_parameters())
    trained = sorted(k.split("/", 1)[1] for k in t.files if k.startswith("param0/"))
    for name in trained:
        np.testing.assert_array_equal(params[name].detach().numpy(), t[f"param0/{name}"], name)
    kernel, recon = training_kernel(case), uses_recon(case)
    opt = make_optimizer(model, TrainCfg(data=Path("."), dataset=case, out=Path(".")))
    batch = _batch(t)
    patch = model.cfg.vision.patch_size
    np.testing.assert_array_equal(batch.mask.numpy(), t[f"{case}/step1/gt_mask"])
    np.testing.assert_array_equal(
        patch_labels(batch.mask, patch).numpy(), t[f"{case}/step1/gt_mask_patch"]
    )
    ever_small: dict[str, np.ndarray] = {n: np.zeros(params[n].shape, bool) for n in trained}
    smallest: dict[str, np.ndarray] = {n: np.full(params[n].shape, np.inf) for n in trained}
    for step in (1, 2):
        pre = f"{case}/step{step}"
        noise = torch.from_numpy(t[f"{case}/noise"][step - 1])  # (1, B, E)
        with torch.no_grad():  # the step's intermediates, same weights and noise
            out = training_forward(model, batch.image, kernel, noise=noise)
        for got, key in (
            (out.image_embedding, "image_embedding"), (out.vae_mean, "vae_mean"),
            (out.vae_logvar, "vae_log_var"), (out.class_bias, "class_bias"),
            (out.d_n, "d_n"), (out.d_a, "d_a"), (out.image_logits, "image_logits"),
        ):  # fmt: skip
            _close(got, t[f"{pre}/{key}"], FWD_TOL, f"{pre}/{key}")
        if step == 1:
            _close(out.maps, t[f"{pre}/maps"], FWD_TOL, f"{pre}/maps")
        terms = train_step(model, opt, batch, kernel, recon, None, noise=noise)
        for term, value in terms.as_floats().items():
            ref = float(t[f"{case}/loss/{term}"][step - 1])
            assert abs(value - ref) <= LOSS_TOL, f"{pre} loss {term}: {value} vs {ref}"
        for name in trained:
            ref = t[f"{case}/grad{step}/{name}"]
            rel = DEEP_GRAD_REL if name.startswith("compound_prompts_text") else GRAD_REL
            grad = params[name].grad
            assert grad is not None, f"{pre}: {name} got no gradient"
            _close(grad, ref, rel * float(np.abs(ref).max()), f"{pre} grad {name}")
            ever_small[name] |= np.abs(ref) <= SMALL_GRAD * np.abs(ref).max()
            smallest[name] = np.minimum(smallest[name], np.abs(ref) / np.abs(ref).max())
        for name in trained:
            got = params[name].detach().numpy()
            ref = t[f"{case}/param{step}/{name}"]
            diff = np.abs(got - ref)
            loose = 2 * opt.defaults["lr"] * step
            tol = np.full(diff.shape, PARAM_TOL)
            if name.startswith("compound_prompts_text"):
                tol += deep_param_tol(opt.defaults["lr"], step, smallest[name])
            bad = diff[~ever_small[name]] > tol[~ever_small[name]]
            assert not bad.any(), f"{pre} param {name}: max abs diff {diff.max():.3g}"
            assert diff[ever_small[name]].max(initial=0.0) <= loose, f"{pre} param {name} (small)"
