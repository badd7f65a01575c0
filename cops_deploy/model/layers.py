"""Reusable transformer blocks that keep OpenAI CLIP parameter names.

``Attention`` holds ``in_proj_weight``, ``in_proj_bias`` and ``out_proj`` exactly like
``nn.MultiheadAttention``, so CLIP state dicts load unchanged, and adds the V-VV path of CoPS.
The attention scale multiplies the first operand before the first matmul (q on the original
path, a scaled copy of v on the V-VV path), which is what fused attention kernels expect.
All tensors are batch-first: (B, L, C).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

ATTN_IMPLS = ("sdpa", "explicit")


class QuickGELU(nn.Module):
    """OpenAI CLIP's activation: x * sigmoid(1.702 x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def _mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            [
                ("c_fc", nn.Linear(width, hidden)),
                ("gelu", QuickGELU()),
                ("c_proj", nn.Linear(hidden, width)),
            ]
        )
    )


def scaled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
    impl: str = "sdpa",
    float32_softmax: bool = False,
) -> torch.Tensor:
    """softmax((q * scale) k^T + mask) v over (..., H, L, D) tensors; the one attention of the
    model and of the deploy graphs (``cops_deploy.export.graphs``).

    ``impl`` "sdpa": PyTorch's fused kernel (the mask is cast to q's dtype). "explicit": written
    out as plain matmuls (what ONNX export traces); the scale multiplies q before the first
    matmul, as fused attention kernels expect. ``float32_softmax`` (explicit only): the scores,
    mask and softmax are computed in float32 and the weights cast back to v's dtype, the FP32
    island of an FP16 graph; it changes nothing for float32 inputs.
    """
    if impl == "sdpa":
        mask = None if mask is None else mask.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if scale != 1.0:
        q = q * scale
    scores = q @ k.transpose(-2, -1)  # (..., H, Lq, Lk)
    if float32_softmax:
        scores = scores.float()
    if mask is not None:
        scores = scores + mask
    weights = scores.softmax(dim=-1)
    return (weights.to(v.dtype) if float32_softmax else weights) @ v


class Attention(nn.Module):
    """Multi-head attention with nn.MultiheadAttention's parameter names and a V-VV path."""

    def __init__(self, width: int, heads: int, impl: str = "sdpa") -> None:
        super().__init__()
        self.width, self.heads = width, heads
        self.head_dim = width // heads
        self.scale = self.head_dim**-0.5
        self.impl = impl
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, D)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        b, _, n, _ = x.shape
        return self.out_proj(x.transpose(1, 2).reshape(b, n, self.width))  # (B, L, C)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-head q, k, v of a self-attention input, each (B, H, L, D)."""
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self._split(q), self._split(k), self._split(v)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Ordinary self-attention (the original CLIP path)."""
        q, k, v = self.qkv(x)
        return self._merge(scaled_attention(q, k, v, self.scale, mask, self.impl))

    def forward_dual(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(V-VV output, original output) from one in-projection of ``x``."""
        q, k, v = self.qkv(x)
        out_ori = scaled_attention(q, k, v, self.scale, None, self.impl)
        out_vv = scaled_attention(v, v, v, self.scale, None, self.impl)
        return self._merge(out_vv), self._merge(out_ori)

    def forward_cross(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """Cross-attention of ``query`` (B, Lq, C) over ``memory`` (B, Lk, C)."""
        w_q, w_kv = self.in_proj_weight.split([self.width, 2 * self.width])
        b_q, b_kv = self.in_proj_bias.split([self.width, 2 * self.width])
        q = self._split(F.linear(query, w_q, b_q))
        k, v = (self._split(t) for t in F.linear(memory, w_kv, b_kv).chunk(2, dim=-1))
        return self._merge(scaled_attention(q, k, v, self.scale, None, self.impl))


class ResidualAttentionBlock(nn.Module):
    """CLIP's pre-norm transformer block (ln_1, attn, ln_2, mlp) with the V-VV dual path."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, impl: str = "sdpa") -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, impl)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _mlp(width, width * mlp_ratio)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), mask)
        return x + self.mlp(self.ln_2(x))

    def forward_dual(
        self, x: torch.Tensor, x_ori: torch.Tensor, need_mlp: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One block of both paths: the V-VV path reads the original path's activations and
        only accumulates attention (no MLP); ``need_mlp=False`` skips the original path's MLP
        when nothing reads its tokens (the deploy graph's last block keeps only CLS)."""
        out_vv, out_ori = self.attn.forward_dual(self.ln_1(x_ori))
        x_ori = x_ori + out_ori
        if need_mlp:
            x_ori = x_ori + self.mlp(self.ln_2(x_ori))
        return x + out_vv, x_ori


class PrototypeExtractor(nn.Module):
    """ESTS prototype extractor: learned queries attend over neighbour-averaged patches.

    Parameter names follow the reference checkpoint (``attn.in_proj_weight``, ``ln_1``,
    ``ln_2``, ``mlp.c_fc``, ``mlp.c_proj``); one LayerNorm (ln_1) is shared by queries and
    patches, and the MLP keeps the width (C -> C -> C).
    """

    def __init__(self, width: int, heads: int, impl: str = "sdpa") -> None:
        super().__init__()
        self.attn = Attention(width, heads, impl)
        self.ln_1 = nn.LayerNorm(width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _mlp(width, width)

    def forward(self, queries: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        """queries (Q, C), patches (B, N, C) -> prototypes (B, Q, C)."""
        x = queries.unsqueeze(0).expand(patches.shape[0], -1, -1)  # (B, Q, C)
        x = x + self.attn.forward_cross(self.ln_1(x), self.ln_1(patches))
        return x + self.mlp(self.ln_2(x))


class VAEEncoder(nn.Module):
    """ICTS encoder (training only): g -> (mean, log-variance)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU())
        self.mean = nn.Linear(width, width)
        self.log_var = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.net(x)
        return self.mean(h), self.log_var(h)


class VAEDecoder(nn.Module):
    """ICTS decoder: z -> class-token bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)
