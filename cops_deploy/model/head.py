"""Image-independent pieces of the CoPS head: neighbour averaging, SAGA, upsampling, and the
Gaussian blur with scipy.ndimage.gaussian_filter semantics (reflect border, truncate 4.0).

Everything here is a plain tensor function, so the same code runs in eager PyTorch and in the
exported head graph.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def neighbour_average(patches: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, N, C) patch embeddings on a square grid -> k x k average with zero padding counted."""
    b, n, c = patches.shape
    side = math.isqrt(n)
    x = patches.transpose(1, 2).reshape(b, c, side, side)  # (B, C, g, g)
    x = F.avg_pool2d(x, kernel_size=kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return x.flatten(2).transpose(1, 2)  # (B, N, C)


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise along the last axis (as x / ||x||, the reference's formula)."""
    return x / x.norm(dim=-1, keepdim=True)


def cosine_distance_min(patches: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
    """min_j (1 - cos(patch_p, proto_j)): (B, N, C), (B, Q, C) -> (B, N).

    Matches torch.nn.functional.cosine_similarity (eps 1e-8 on each norm).
    """
    pn = patches / patches.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    qn = protos / protos.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return (1.0 - pn @ qn.transpose(1, 2)).amin(dim=-1)


def minmax(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max over the last axis: (B, N) -> (B, N) in [0, 1]."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def saga_weight(d_n: torch.Tensor, d_a: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spatial weight alpha * minmax(d_n) + (1 - alpha) * (1 - minmax(d_a)): (B, N)."""
    return alpha * minmax(d_n) + (1.0 - alpha) * (1.0 - minmax(d_a))


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage's 1-D Gaussian weights (radius int(truncate * sigma + 0.5)), float64."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 / (float(sigma) ** 2) * x**2)
    return phi / phi.sum()


def reflect_indices(size: int, radius: int) -> np.ndarray:
    """Source index of each padded position under scipy's 'reflect' (d c b a | a b c d) mode."""
    idx = np.arange(-radius, size + radius)
    period = 2 * size
    idx = np.mod(idx, period)
    return np.where(idx >= size, period - 1 - idx, idx).astype(np.int64)


_BLUR_CONSTANTS: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def _blur_constants(
    h: int,
    w: int,
    sigma: float,
    truncate: float,
    dtype: torch.dtype,
    device: torch.device,
    cache: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kernel weights and reflect indices, built once per shape/dtype/device (so repeated calls
    copy nothing to the device, and CUDA-graph capture sees no host transfers)."""
    key = (h, w, float(sigma), float(truncate), dtype, str(device))
    if key in _BLUR_CONSTANTS and cache:
        return _BLUR_CONSTANTS[key]
    weights = torch.as_tensor(gaussian_kernel1d(sigma, truncate), dtype=dtype).to(device)
    radius = (weights.numel() - 1) // 2
    rows = torch.as_tensor(reflect_indices(h, radius)).to(device)
    cols = torch.as_tensor(reflect_indices(w, radius)).to(device)
    if cache:
        _BLUR_CONSTANTS[key] = (weights, rows, cols)
    return weights, rows, cols


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian of (B, H, W) maps with scipy.ndimage.gaussian_filter semantics."""
    b, h, w = maps.shape
    # Cache only for plain eager tensors: under tracing (export, compile) they would be fakes.
    eager = type(maps) is torch.Tensor and not torch.compiler.is_compiling()
    weights, rows, cols = _blur_constants(
        int(h), int(w), sigma, truncate, maps.dtype, maps.device, cache=eager
    )
    x = maps.unsqueeze(1)  # (B, 1, H, W)
    x = x.index_select(2, rows)  # (B, 1, H + 2r, W)
    x = F.conv2d(x, weights.view(1, 1, -1, 1))  # (B, 1, H, W)
    x = x.index_select(3, cols)  # (B, 1, H, W + 2r)
    x = F.conv2d(x, weights.view(1, 1, 1, -1))  # (B, 1, H, W)
    return x.squeeze(1)


def upsample_nearest(patch_map: torch.Tensor, size: int) -> torch.Tensor:
    """(B, N) on a square grid -> (B, size, size), nearest neighbour (the reference default)."""
    b, n = patch_map.shape
    side = math.isqrt(n)
    x = patch_map.reshape(b, 1, side, side)
    return F.interpolate(x, size=(size, size), mode="nearest").squeeze(1)
