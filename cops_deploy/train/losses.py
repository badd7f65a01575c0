"""The CoPS training loss (METHOD.md section 6), term by term.

    loss = CE(image_logits, label)
         + 4 * [focal(maps, mask) + dice(maps[:, 1], mask) + dice(maps[:, 0], 1 - mask)]
         + gather + scatter + KL + recon

Each term is a plain function of tensors so it can be checked on its own. Two choices follow
the reference code where METHOD.md is silent:

- focal: the reference adds its clamp value (1e-5) to p_t before taking the log, so
  ``p_t = sum(clamp(one_hot, 1e-5, 1 - 1e-5) * p) + 1e-5`` and
  ``focal = mean(-(1 - p_t)^2 * log(p_t))``;
- recon: ``mean_{i, j, c} (g[j, c] - bias[i, c])^2``, every image against every bias (the
  reference's broadcast of g (B, E) against bias (B, 1, 1, E)).

``gather`` is the mean of d_n over the normal patches of the batch and ``scatter`` the mean of
d_a over its anomalous patches. ``scatter`` is 0 (a constant) when the batch has no anomalous
patch, as in the reference. For ``gather`` on a batch with no normal patch, ``empty_gather``
chooses: ``"reference"`` (default) is the reference's mean of nothing, NaN, whose gradient is
zero (t_n gets an all-zero gradient, the logged total is NaN); ``"zero"`` is the project's
departure, a constant 0 (t_n gets no gradient, the total stays finite).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from cops_deploy.errors import ConfigError
from cops_deploy.train.forward import TrainForward

PATCH_LOSS_WEIGHT = 4.0
FOCAL_GAMMA = 2.0
FOCAL_CLAMP = 1e-5
DICE_SMOOTH = 1.0
# What gather is on a batch without normal patches: the reference's NaN, or 0 (a departure).
EMPTY_GATHER_MODES = ("reference", "zero")


def patch_labels(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, S, S) 0/1 masks -> (B, N) patch labels: 1 where any pixel of the patch is anomalous."""
    if masks.dim() != 3 or masks.shape[-1] % patch_size or masks.shape[-2] % patch_size:
        raise ConfigError(
            f"masks of shape {tuple(masks.shape)} do not tile into {patch_size}x{patch_size} "
            "patches; valid: (B, S, S) with S a multiple of the patch size. Fix: load the masks "
            "at the model's input size."
        )
    pooled = F.max_pool2d(masks.unsqueeze(1).float(), patch_size)  # (B, 1, g, g)
    return pooled.flatten(1)  # (B, N)


def focal_loss(
    probs: torch.Tensor, target: torch.Tensor, gamma: float = FOCAL_GAMMA
) -> torch.Tensor:
    """Focal loss of (B, C, H, W) probabilities against (B, H, W) class indices (0/1 masks)."""
    n_class = probs.shape[1]
    p = probs.permute(0, 2, 3, 1).reshape(-1, n_class)  # (B*H*W, C)
    one_hot = F.one_hot(target.reshape(-1).long(), n_class).to(p.dtype)
    one_hot = one_hot.clamp(FOCAL_CLAMP / (n_class - 1), 1.0 - FOCAL_CLAMP)
    pt = (one_hot * p).sum(dim=1) + FOCAL_CLAMP  # (B*H*W,)
    return (-torch.pow(1.0 - pt, gamma) * pt.log()).mean()


def dice_loss(
    pred: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH
) -> torch.Tensor:
    """1 - mean over images of (2 |pred * target| + smooth) / (|pred| + |target| + smooth)."""
    b = target.shape[0]
    p = pred.reshape(b, -1)
    t = target.reshape(b, -1)
    dice = (2.0 * (p * t).sum(dim=1) + smooth) / (p.sum(dim=1) + t.sum(dim=1) + smooth)
    return 1.0 - dice.mean()


def check_empty_gather(mode: str) -> str:
    """``mode`` if it is one of EMPTY_GATHER_MODES, else a ConfigError."""
    if mode not in EMPTY_GATHER_MODES:
        raise ConfigError(
            f"empty_gather must be one of {', '.join(EMPTY_GATHER_MODES)}, got {mode!r}. "
            "Fix: 'reference' for the reference's NaN gather on a batch without normal "
            "patches, 'zero' for a gather of 0 there."
        )
    return mode


def gather_loss(
    d_n: torch.Tensor, labels: torch.Tensor, empty_gather: str = "reference"
) -> torch.Tensor:
    """Mean distance to the normal prototypes over the normal patches; with none, NaN
    (``empty_gather="reference"``, zero gradient) or a constant 0 (``"zero"``)."""
    normal = d_n[labels == 0]
    if normal.numel() or check_empty_gather(empty_gather) == "reference":
        return normal.mean()
    return d_n.new_zeros(())


def scatter_loss(d_a: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean distance to the anomalous prototypes over the anomalous patches (0 if none)."""
    anomalous = d_a[labels != 0]
    return anomalous.mean() if anomalous.numel() else d_a.new_zeros(())


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)): summed over the channels, averaged over images."""
    return (-0.5 * (1.0 + logvar - mean.pow(2) - logvar.exp()).sum(dim=1)).mean()


def recon_loss(g: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The reference's reconstruction term: mean over (i, j, c) of (g[j, c] - bias[i, c])^2."""
    diff = g.unsqueeze(0) - bias.unsqueeze(1)  # (B_bias, B_g, E)
    return diff.pow(2).mean()


@dataclass
class LossTerms:
    """Every term of one batch's loss; ``total`` is what is back-propagated."""

    total: torch.Tensor
    image: torch.Tensor
    patch: torch.Tensor  # focal + dice_anomaly + dice_normal (before the factor 4)
    focal: torch.Tensor
    dice_anomaly: torch.Tensor
    dice_normal: torch.Tensor
    gather: torch.Tensor
    scatter: torch.Tensor
    kl: torch.Tensor
    recon: torch.Tensor

    def as_floats(self) -> dict[str, float]:
        """Every term as a Python float (for logs and progress bars)."""
        return {f.name: float(getattr(self, f.name).detach()) for f in fields(self)}


def cops_loss(
    out: TrainForward,
    masks: torch.Tensor,
    labels: torch.Tensor,
    patch_size: int,
    use_recon: bool = True,
    empty_gather: str = "reference",
) -> LossTerms:
    """The full CoPS loss of one batch: (B, S, S) 0/1 masks, (B,) 0/1 labels."""
    masks = masks.to(out.maps.dtype)
    image = F.cross_entropy(out.image_logits, labels.long())
    focal = focal_loss(out.maps, masks)
    dice_a = dice_loss(out.maps[:, 1], masks)
    dice_n = dice_loss(out.maps[:, 0], 1.0 - masks)
    patch = focal + dice_a + dice_n
    plabels = patch_labels(masks, patch_size)
    gather = gather_loss(out.d_n, plabels, empty_gather)
    scatter = scatter_loss(out.d_a, plabels)
    kl = kl_loss(out.vae_mean, out.vae_logvar)
    recon = (
        recon_loss(out.image_embedding, out.class_bias)
        if use_recon
        else out.image_embedding.new_zeros(())
    )
    total = image + PATCH_LOSS_WEIGHT * patch + gather + scatter + kl + recon
    return LossTerms(total, image, patch, focal, dice_a, dice_n, gather, scatter, kl, recon)
