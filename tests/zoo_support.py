"""Test support for the Table S3 architectures: OpenAI-release-style CLIP files written by
open_clip's CLIP class (an independent writer of OpenAI's key layout), at full or narrow width."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.model import CLIP

# Table S3 backbone -> (registered name, open_clip name, OpenAI release file, weights' size).
BACKBONES = {
    "ViT-B/16@224px": ("cops-vit-b-16-224", "ViT-B-16", "ViT-B-16.pt", 224),
    "ViT-L/14@224px": ("cops-vit-l-14-224", "ViT-L-14", "ViT-L-14.pt", 224),
    "ViT-L/14@336px": ("cops-vit-l-14-336", "ViT-L-14-336", "ViT-L-14-336px.pt", 336),
}
# Entries OpenAI's release files carry besides the weights.
OPENAI_EXTRAS = {"input_resolution": 0, "context_length": 77, "vocab_size": 49408}
# A narrow stand-in: the row's grids, patch, depths and prompt layout at small widths.
NARROW = {
    "embed_dim": 32,
    "vision.width": 64,
    "vision.heads": 2,
    "text.width": 32,
    "text.heads": 2,
    "prompt.extractor_heads": 2,
}


def open_clip_model(cfg: Any, narrow: bool) -> CLIP:
    """open_clip's CLIP for ``cfg``'s backbone: its published config (full), or ``cfg``'s own
    sizes (narrow stand-in)."""
    if not narrow:
        return CLIP(**open_clip.get_model_config(cfg.clip_pretrained["open_clip_model"]))
    v, t = cfg.vision, cfg.text
    return CLIP(
        embed_dim=cfg.embed_dim,
        vision_cfg={
            "image_size": v.image_size,
            "layers": v.layers,
            "width": v.width,
            "patch_size": v.patch_size,
            "head_width": v.width // v.heads,
        },
        text_cfg={
            "context_length": t.context_length,
            "vocab_size": t.vocab_size,
            "width": t.width,
            "heads": t.heads,
            "layers": t.layers,
        },
        quick_gelu=True,
    )


def write_openai_file(cfg: Any, path: Path, narrow: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """An OpenAI-release-style file for ``cfg``'s backbone (fp16 weights plus the extra
    entries) at random values; returns the tensors as written."""
    torch.manual_seed(seed)
    sd = {k: v.half() for k, v in open_clip_model(cfg, narrow).state_dict().items()}
    extras = dict(OPENAI_EXTRAS, input_resolution=cfg.vision.image_size)
    torch.save({**sd, **{k: torch.tensor(v) for k, v in extras.items()}}, path)
    return sd


def require_slow(request: Any) -> None:
    """Skip unless the run selects slow tests (``-m slow``), as the other full-size tests do."""
    import pytest

    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full-size Table S3 row (minutes, GBs of memory); run with -m slow")
