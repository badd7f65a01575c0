"""CLIP towers with OpenAI key names: the V-VV image tower and the deep-token text tower.

``ClipModel.state_dict()`` has exactly the keys of an OpenAI CLIP checkpoint (``visual.*``,
``transformer.*``, ``token_embedding.weight``, ...), so those files load unchanged.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cops_deploy.configs import CopsCfg, TextCfg, VisionCfg
from cops_deploy.model.layers import ResidualAttentionBlock


class Transformer(nn.Module):
    """A stack of residual attention blocks under the key ``resblocks``."""

    def __init__(self, width: int, layers: int, heads: int, impl: str = "sdpa") -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, impl=impl) for _ in range(layers)]
        )


class VisionOutput(NamedTuple):
    image_embedding: torch.Tensor  # (B, E): CLS of the original path @ proj, no ln_post
    patch_embedding: torch.Tensor  # (B, N, E): ln_post(V-VV path patches) @ proj


def resize_positions(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """Bilinearly resize the patch part of a (1 + g*g, W) positional table to ``grid``."""
    old = math.isqrt(int(pos.shape[0]) - 1)
    grid = int(grid)
    if old == grid:
        return pos
    patch = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, W, g, g)
    patch = F.interpolate(patch, size=(grid, grid), mode="bilinear", align_corners=False)
    patch = patch.reshape(pos.shape[1], grid * grid).t()  # (grid*grid, W)
    return torch.cat([pos[:1], patch], dim=0)


class VisionTower(nn.Module):
    """CLIP ViT with the CoPS V-VV dual path in its last ``v_vv_layers`` blocks."""

    def __init__(self, cfg: VisionCfg, embed_dim: int, impl: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        scale = w**-0.5
        self.conv1 = nn.Conv2d(3, w, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.weight_grid**2 + 1, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, impl)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, embed_dim))

    def positions(self, grid: int) -> torch.Tensor:
        """The positional table for a ``grid`` x ``grid`` patch grid (bilinear resize)."""
        return resize_positions(self.positional_embedding, grid)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Patchify, add CLS and positions, ln_pre: (B, 3, H, W) -> (B, 1 + N, W)."""
        x = self.conv1(images)  # (B, W, g, g)
        grid = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positions(grid).to(x.dtype)
        return self.ln_pre(x)

    def dual_path(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The blocks, the last ``v_vv_layers`` on both paths: the original path's tokens after
        the last block and the V-V path's tokens after each feature layer, (B, 1 + N, W)."""
        cfg = self.cfg
        first_dual = cfg.layers - cfg.v_vv_layers  # 0-based index of the first dual block
        x = self.tokens(images)
        x_ori = x
        feats = []
        for i, block in enumerate(self.transformer.resblocks):
            if i < first_dual:
                x = x_ori = block(x)
            else:
                x, x_ori = block.forward_dual(x, x_ori)
            if i + 1 in cfg.feature_layers:
                feats.append(x)
        return x_ori, feats

    def forward(self, images: torch.Tensor) -> VisionOutput:
        x_ori, feats = self.dual_path(images)
        image = x_ori[:, 0] @ self.proj  # (B, E)
        patches = [self.ln_post(f[:, 1:]) @ self.proj for f in feats]  # each (B, N, E)
        patch = patches[0] if len(patches) == 1 else torch.stack(patches).mean(0)
        return VisionOutput(image, patch)


def causal_mask(length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive causal mask (L, L): -inf above the diagonal."""
    return torch.full((length, length), float("-inf"), dtype=dtype).triu_(1)


class TextTower(nn.Module):
    """CLIP text transformer that runs on prompt embeddings and inserts deep tokens."""

    def __init__(self, cfg: TextCfg, embed_dim: int, impl: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, impl)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def forward(
        self,
        prompts: torch.Tensor,
        eot_index: int,
        deep_tokens: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Prompt embeddings (P, L, W) -> projected EOT features (P, E), not normalised.

        ``L`` may be anything from ``eot_index + 1`` to the context length: with the causal
        mask, tokens after EOT never reach it. ``deep_tokens`` maps a 0-based layer index to a
        (T, W) tensor that replaces positions 1..T before that layer runs.
        """
        length = prompts.shape[1]
        mask = causal_mask(length, prompts.dtype).to(prompts.device)
        x = prompts + self.positional_embedding[:length].to(prompts.dtype)
        deep_tokens = deep_tokens or {}
        for i, block in enumerate(self.transformer.resblocks):
            if i in deep_tokens:
                tok = deep_tokens[i].to(x.dtype).expand(x.shape[0], -1, -1)  # (P, T, W)
                x = torch.cat([x[:, :1], tok, x[:, 1 + tok.shape[1] :]], dim=1)
            x = block(x, mask)
        return self.ln_final(x[:, eot_index]) @ self.text_projection


class ClipModel(nn.Module):
    """Both CLIP towers under OpenAI's key layout (text tower keys live at the top level)."""

    def __init__(self, cfg: CopsCfg, impl: str = "sdpa") -> None:
        super().__init__()
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, impl)
        self.text = TextTower(cfg.text, cfg.embed_dim, impl)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # OpenAI keys: transformer.*, token_embedding.*, positional_embedding, ln_final.*,
    # text_projection sit at the top level; map them onto the text tower.
    _TEXT_KEYS = (
        "transformer.",
        "token_embedding.",
        "positional_embedding",
        "ln_final.",
        "text_projection",
    )

    def openai_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights under OpenAI CLIP's key names."""
        out = {}
        for k, v in self.state_dict().items():
            out[k[len("text.") :] if k.startswith("text.") else k] = v
        return out

    def load_openai_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load weights given under OpenAI CLIP's key names (already checked by the caller)."""
        mapped = {}
        for k, v in sd.items():
            mapped[f"text.{k}" if k.startswith(self._TEXT_KEYS) else k] = v
        self.load_state_dict(mapped, strict=True)
