"""Each CoPS loss term against a straightforward computation written here, and the training
forward pass against the inference path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cops_deploy.data.solvers import canonical_dataset
from cops_deploy.errors import ConfigError, DatasetError
from cops_deploy.train.forward import training_forward
from cops_deploy.train.losses import (
    cops_loss,
    dice_loss,
    focal_loss,
    gather_loss,
    kl_loss,
    patch_labels,
    recon_loss,
    scatter_loss,
)
from cops_deploy.train.policy import training_kernel, uses_recon


def _probs(seed: int, shape=(2, 2, 4, 4)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).softmax(dim=1)


def _mask(seed: int, shape=(2, 4, 4)) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) > 0.6).double()


def test_focal_matches_pixel_loop():
    probs, mask = _probs(0), _mask(1)
    terms = []
    for b, y, x in np.ndindex(*mask.shape):
        t = int(mask[b, y, x])
        weights = [1 - 1e-5, 1e-5] if t == 0 else [1e-5, 1 - 1e-5]
        pt = sum(w * float(probs[b, c, y, x]) for c, w in enumerate(weights)) + 1e-5
        terms.append(-((1 - pt) ** 2) * math.log(pt))
    assert float(focal_loss(probs, mask)) == pytest.approx(np.mean(terms), rel=1e-12)


def test_dice_matches_per_image_formula():
    pred, mask = _probs(2)[:, 1], _mask(3)
    dices = []
    for b in range(mask.shape[0]):
        p, t = pred[b].numpy().ravel(), mask[b].numpy().ravel()
        dices.append((2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))
    assert float(dice_loss(pred, mask)) == pytest.approx(1 - np.mean(dices), rel=1e-12)


def test_patch_labels_max_pool_each_block():
    mask = torch.zeros(2, 28, 28)
    mask[0, 15, 3] = 1  # block (1, 0) of image 0
    mask[1, 27, 27] = 1  # block (1, 1) of image 1
    labels = patch_labels(mask, 14)
    assert labels.tolist() == [[0, 0, 1, 0], [0, 0, 0, 1]]


def test_patch_labels_refuse_untileable_masks():
    with pytest.raises(ConfigError, match="multiple of the patch size"):
        patch_labels(torch.zeros(1, 30, 30), 14)


def test_gather_and_scatter_are_means_over_the_batch_patches():
    d_n = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    d_a = torch.tensor([[0.9, 0.8, 0.7], [0.6, 0.5, 0.4]])
    labels = torch.tensor([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert float(gather_loss(d_n, labels)) == pytest.approx((0.1 + 0.3 + 0.6) / 3)
    assert float(scatter_loss(d_a, labels)) == pytest.approx((0.8 + 0.6 + 0.5) / 3)


def test_scatter_is_zero_without_anomalous_patches_and_gather_without_normal():
    d = torch.rand(2, 5, requires_grad=True)
    assert float(scatter_loss(d, torch.zeros(2, 5))) == 0.0
    zero = gather_loss(d, torch.ones(2, 5), empty_gather="zero")
    assert float(zero) == 0.0 and not zero.requires_grad  # a constant: no gradient


def test_gather_without_normal_patches_is_the_references_nan_with_a_zero_gradient():
    d = torch.rand(2, 5, requires_grad=True)
    gather = gather_loss(d, torch.ones(2, 5))  # default: the reference
    assert torch.isnan(gather)
    gather.backward()
    assert d.grad is not None and torch.equal(d.grad, torch.zeros(2, 5))


def test_gather_refuses_an_unknown_empty_mode():
    with pytest.raises(ConfigError, match="empty_gather must be one of reference, zero.*'nan'"):
        gather_loss(torch.rand(2, 5), torch.ones(2, 5), empty_gather="nan")


def test_kl_matches_formula():
    gen = torch.Generator().manual_seed(4)
    mean = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    logvar = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    m, lv = mean.numpy(), logvar.numpy()
    per_image = [-0.5 * np.sum(1 + lv[i] - m[i] ** 2 - np.exp(lv[i])) for i in range(3)]
    assert float(kl_loss(mean, logvar)) == pytest.approx(np.mean(per_image), rel=1e-12)


def test_recon_compares_every_image_with_every_bias():
    gen = torch.Generator().manual_seed(5)
    g = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    total = 0.0
    for i in range(3):
        for j in range(3):
            total += float(((g[j] - bias[i]) ** 2).mean())
    assert float(recon_loss(g, bias)) == pytest.approx(total / 9, rel=1e-12)
    # The reference's own expression: g (B, E) minus bias (B, 1, 1, E), summed over axis 1.
    reference = (g - bias.unsqueeze(1).unsqueeze(1)).pow(2).sum(1).mean()
    assert float(recon_loss(g, bias)) == pytest.approx(float(reference), rel=1e-12)


class _Fwd:
    """A stand-in for TrainForward with chosen values."""

    def __init__(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.image_embedding = torch.randn(2, 6, generator=gen, dtype=torch.float64)
        self.class_bias = torch.randn(2, 6, generator=gen, dtype=torch.float64)
        self.vae_mean = torch.randn(2, 6, generator=gen, dtype=torch.float64)
        self.vae_logvar = torch.randn(2, 6, generator=gen, dtype=torch.float64) * 0.1
        self.image_logits = torch.randn(2, 2, generator=gen, dtype=torch.float64)
        self.maps = torch.randn(2, 2, 28, 28, generator=gen, dtype=torch.float64).softmax(1)
        self.d_n = torch.rand(2, 4, generator=gen, dtype=torch.float64)
        self.d_a = torch.rand(2, 4, generator=gen, dtype=torch.float64)


def test_cops_loss_total_is_the_weighted_sum_of_the_terms():
    out = _Fwd(6)
    mask = torch.zeros(2, 28, 28, dtype=torch.float64)
    mask[1, :10, :10] = 1
    labels = torch.tensor([0, 1])
    terms = cops_loss(out, mask, labels, 14, use_recon=True)
    logits = out.image_logits.numpy()
    ce = np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, int(labels[i])] for i in range(2)])
    assert float(terms.image) == pytest.approx(ce, rel=1e-12)
    expected = (
        ce
        + 4 * float(terms.focal + terms.dice_anomaly + terms.dice_normal)
        + float(terms.gather + terms.scatter + terms.kl + terms.recon)
    )
    assert float(terms.total) == pytest.approx(expected, rel=1e-12)
    assert float(terms.dice_normal) == pytest.approx(float(dice_loss(out.maps[:, 0], 1 - mask)))
    # Patch labels from the mask: image 1, block (0, 0) only.
    assert float(terms.scatter) == pytest.approx(float(out.d_a[1, 0]))
    off = cops_loss(out, mask, labels, 14, use_recon=False)
    assert float(off.recon) == 0.0
    assert float(off.total) == pytest.approx(float(terms.total - terms.recon), rel=1e-12)


def test_training_kernel_and_recon_follow_the_training_dataset():
    assert training_kernel("mvtec") == 3
    assert training_kernel("MVTec-AD") == 3
    assert training_kernel("visa") == 5
    assert training_kernel("synth") == 5
    assert uses_recon("visa") is False
    assert uses_recon("mvtec") is True
    assert canonical_dataset("Custom") == "custom"


def test_unknown_dataset_name_is_refused_with_the_valid_names():
    with pytest.raises(DatasetError, match="valid names are .*mvtec.*synth"):
        canonical_dataset("imagenet")


# ----------------------------------------------------------------------------- forward pass


def test_training_forward_equals_inference_path_with_the_same_z(tiny_model):
    model = tiny_model
    images = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(7))
    out = training_forward(model, images, 5, torch.Generator().manual_seed(3))
    with torch.no_grad():
        g = model.encode_image(images).image_embedding
        mean, logvar = model.prompt.vae_encoder(g)
        eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
        z = (mean + torch.exp(0.5 * logvar) * eps).unsqueeze(1)  # (B, R=1, E)
        ref = model.forward_intermediates(images, z=z)  # kernel 5 is the config's
    torch.testing.assert_close(out.image_logits, ref.image_logits, rtol=1e-5, atol=1e-5)
    side = 98 // 14
    probs = ref.probs.transpose(1, 2).reshape(2, 2, side, side)
    expected = probs.repeat_interleave(14, dim=2).repeat_interleave(14, dim=3)
    torch.testing.assert_close(out.maps, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.d_n, ref.d_n)
    assert out.class_bias.shape == (2, model.cfg.embed_dim)


def test_training_forward_uses_the_given_kernel(tiny_model):
    images = torch.randn(1, 3, 98, 98, generator=torch.Generator().manual_seed(8))
    gen = torch.Generator()
    a = training_forward(tiny_model, images, 3, gen.manual_seed(0))
    b = training_forward(tiny_model, images, 5, gen.manual_seed(0))
    assert not torch.allclose(a.d_n, b.d_n)
    with pytest.raises(ConfigError, match="odd"):
        training_forward(tiny_model, images, 4)


def test_prototypes_are_detached_where_they_enter_the_prompts():
    from cops_deploy import create_model

    model = create_model("cops-tiny", seed=0)
    images = torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(9))
    mask = torch.zeros(2, 98, 98)
    mask[1, 20:40, 20:40] = 1
    out = training_forward(model, images, 5, torch.Generator().manual_seed(0))
    terms = cops_loss(out, mask, torch.tensor([0, 1]), 14)
    (terms.image + terms.patch).backward(retain_graph=True)
    ex = model.prompt.extractor
    assert all(p.grad is None for p in ex.parameters())
    assert model.prompt.t_n.grad is None and model.prompt.t_a.grad is None
    assert model.prompt.ctx_pos.grad is not None and model.prompt.ctx_pos.grad.abs().sum() > 0
    (terms.gather + terms.scatter).backward()
    assert model.prompt.t_n.grad.abs().sum() > 0
    assert all(p.requires_grad is False for p in model.clip.parameters())
