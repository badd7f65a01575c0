"""The training-time forward pass of CoPS (METHOD.md section 6).

It differs from inference (``CopsModel.forward_intermediates``) in four ways, all from the
reference training script:

- the neighbour kernel is the training one (3 when training on MVTec-AD, else 5);
- the ICTS class token is ONE sample per image from the VAE encoder fed the image embedding,
  ``z = mean + exp(logvar / 2) * eps``, so the class biases are (B, 1, E);
- the prototypes are detached where they enter the prompts (the gather and scatter losses
  train the extractor; the prompt losses do not reach it through the text tower);
- no SAGA: the maps are the plain softmax probabilities, both channels, nearest-upsampled to
  the input size.

CLIP is frozen: the image tower runs without autograd; the text tower keeps autograd so the
gradients reach the learned prompt tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cops_deploy.errors import ConfigError
from cops_deploy.model.cops import CopsModel
from cops_deploy.model.head import cosine_distance_min, neighbour_average, normalize


@dataclass
class TrainForward:
    """What the training losses need from one batch (channel 1 is the anomaly channel)."""

    image_embedding: torch.Tensor  # (B, E) g, not normalised
    d_n: torch.Tensor  # (B, N) distance to the nearest normal prototype
    d_a: torch.Tensor  # (B, N) distance to the nearest anomalous prototype
    vae_mean: torch.Tensor  # (B, E)
    vae_logvar: torch.Tensor  # (B, E)
    class_bias: torch.Tensor  # (B, E) decoder(z), one sample per image
    image_logits: torch.Tensor  # (B, 2) normalise(g) @ T^T / tau, no SAGA
    maps: torch.Tensor  # (B, 2, S, S) softmax probabilities, no SAGA, nearest-upsampled


def sample_class_bias(
    model: CopsModel,
    g: torch.Tensor,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, logvar, bias): the VAE encoder on g (B, E) and decoder(std * eps + mean).

    ``eps`` is ``noise`` when given ((B, E), or the reference's (1, B, E) draw), else drawn on
    the CPU from ``generator`` (the global RNG if None) and moved to g's device, so a run gives
    the same numbers whatever the device and can be resumed exactly.
    """
    mean, logvar = model.prompt.vae_encoder(g)  # (B, E) each
    if noise is None:
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
    elif noise.numel() == mean.numel() and noise.shape[-2:] == mean.shape:
        eps = noise.reshape(mean.shape)
    else:
        raise ConfigError(
            f"noise of shape {tuple(noise.shape)} does not fit the batch's VAE mean "
            f"{tuple(mean.shape)}; valid: (B, E) or (1, B, E). Fix: draw one value per image "
            "and channel."
        )
    eps = eps.to(device=mean.device, dtype=mean.dtype)
    z = torch.exp(0.5 * logvar) * eps + mean  # (B, E), the reference's order (train.py:82)
    return mean, logvar, model.prompt.vae_decoder(z)


def training_forward(
    model: CopsModel,
    images: torch.Tensor,
    kernel: int,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> TrainForward:
    """Run CoPS on (B, 3, S, S) normalised images the way the reference trains it.

    ``noise`` replaces the ICTS draw (see :func:`sample_class_bias`), e.g. to replay a run.
    """
    if kernel < 1 or kernel % 2 != 1:
        raise ConfigError(f"neighbour kernel must be a positive odd int, got {kernel}")
    tau = model.cfg.head.tau
    with torch.no_grad():
        g, patches = model.encode_image(images)  # (B, E), (B, N, E)
    patches_avg = neighbour_average(patches, kernel)  # (B, N, E)
    proto_n, proto_a = model.prototypes(patches_avg)  # (B, P, E) each
    d_n = cosine_distance_min(patches_avg, proto_n)  # (B, N)
    d_a = cosine_distance_min(patches_avg, proto_a)
    mean, logvar, bias = sample_class_bias(model, g, generator, noise)
    text = model.text_features(  # (B, 2, E)
        proto_n.detach(), proto_a.detach(), bias.unsqueeze(1), per_prompt_deep_tokens=True
    )
    patch_logits = normalize(patches_avg) @ text.transpose(1, 2) / tau  # (B, N, 2)
    probs = patch_logits.softmax(dim=-1)
    b, n, _ = probs.shape
    side = math.isqrt(n)
    grid = probs.transpose(1, 2).reshape(b, 2, side, side)  # (B, 2, g, g)
    size = images.shape[-1]
    maps = F.interpolate(grid, size=(size, size), mode="nearest")  # (B, 2, S, S)
    image_logits = (normalize(g).unsqueeze(1) @ text.transpose(1, 2)).squeeze(1) / tau  # (B, 2)
    return TrainForward(
        image_embedding=g,
        d_n=d_n,
        d_a=d_a,
        vae_mean=mean,
        vae_logvar=logvar,
        class_bias=bias,
        image_logits=image_logits,
        maps=maps,
    )
