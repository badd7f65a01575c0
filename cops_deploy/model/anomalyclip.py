"""AnomalyCLIP (Zhou et al., ICLR 2024; github.com/zqhang/AnomalyCLIP) on the CoPS CLIP towers.

The semantics of the reference's test pipeline (../shared/golden/anomalyclip/README.md):

- Static learned prompts, object-agnostic: row 0 (normal) is [SOT | 12 context | "object." |
  EOT], row 1 (anomalous) [SOT | 12 context | "damaged object." | EOT]; deep text tokens replace
  positions 1..4 before text layers 2..9, rounded to float16 as the reference's ``.half()`` does.
  The text features do not depend on the image.
- Image tower: the CoPS V-V dual path (``ResidualAttentionBlock.forward_dual``) in the last
  ``vision.v_vv_layers`` blocks (the reference's DPAM_layer - 1); the feature at a layer is the
  V-V stream (the plain stream before the first dual block); patch features are
  ``ln_post(tokens) @ proj`` per feature layer, the image feature ``x_ori[CLS] @ proj`` without
  ln_post.
- Per feature layer: softmax(cos(patch, text) / tau) over [normal, anomalous], both channels
  upsampled bilinearly (align_corners False), layer map (P_anom + 1 - P_norm) / 2; the layer
  maps are SUMMED, then a scipy-style Gaussian (sigma 4, reflect). The image score is
  softmax(cos(image, text) / tau)[anomalous], nothing else.

``AnomalyClipModel`` has CopsModel's deploy-facing methods (``encode_image``, ``forward_head``,
``forward``, ``forward_intermediates``), so prediction, evaluation, export and the torch backend
take it unchanged. Its patch embedding is (B, L*N, E): the L feature layers stacked on the
token axis, layer-major.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cops_deploy.configs import CopsCfg
from cops_deploy.errors import ConfigError
from cops_deploy.model.clip import ClipModel, VisionOutput
from cops_deploy.model.cops import CopsOutput
from cops_deploy.model.head import gaussian_blur, normalize

__all__ = [
    "ANOMALOUS_WORDS",
    "NORMAL_WORDS",
    "AnomalyClipIntermediates",
    "AnomalyClipModel",
    "AnomalyClipPromptLearner",
    "layer_maps",
    "prompt_token_ids",
]

# CLIP BPE ids of the reference's fixed prompt words (prompt_ensemble.py: "object" and
# "damaged object", then "."): constants of the method, so no tokenizer is needed here.
PLACEHOLDER_TOKEN = 343  # "X": the tokenised placeholder of each learned context token
NORMAL_WORDS = (14115,)  # "object"
ANOMALOUS_WORDS = (13568, 14115)  # "damaged object"


def prompt_token_ids(cfg: CopsCfg) -> torch.Tensor:
    """Token ids (2, context_length) of the two prompts, row 0 normal, row 1 anomalous, as the
    reference tokenises 'X X ... X object.' and 'X X ... X damaged object.'."""
    p, length = cfg.prompt, cfg.text.context_length
    rows = []
    for words in (NORMAL_WORDS, ANOMALOUS_WORDS):
        ids = [p.sot_token, *[PLACEHOLDER_TOKEN] * p.context_tokens, *words, p.period_token]
        ids.append(p.eot_token)
        if len(ids) > length:
            raise ConfigError(
                f"the AnomalyCLIP prompt needs {len(ids)} tokens, more than text.context_length "
                f"{length}. Fix: use fewer prompt.context_tokens."
            )
        rows.append(ids + [0] * (length - len(ids)))
    return torch.tensor(rows, dtype=torch.int64)


class AnomalyClipPromptLearner(nn.Module):
    """The learned AnomalyCLIP prompt state under the reference checkpoint's key names.

    ``ctx_pos`` / ``ctx_neg`` (1, 1, n_ctx, W) are the normal / anomalous context tokens,
    ``compound_prompts_text.i`` (T, W) the deep tokens. The buffers ``token_prefix_*`` (SOT
    embedding), ``token_suffix_*`` (the embeddings after the context) and ``tokenized_prompts_*``
    (token ids; argmax = EOT) are filled from the CLIP token embedding, and replaced by the
    checkpoint's own copies when one is loaded, as the reference does. The checkpoint's
    ``compound_prompt_projections`` are never used at inference and are not kept.
    """

    def __init__(self, cfg: CopsCfg) -> None:
        super().__init__()
        p, w = cfg.prompt, cfg.text.width
        n, length = p.context_tokens, cfg.text.context_length
        self.ctx_pos = nn.Parameter(torch.randn(1, 1, n, w) * 0.02)
        self.ctx_neg = nn.Parameter(torch.randn(1, 1, n, w) * 0.02)
        self.compound_prompts_text = nn.ParameterList(
            [
                nn.Parameter(torch.randn(p.deep_token_length, w) * 0.02)
                for _ in range(p.deep_token_count)
            ]
        )
        ids = prompt_token_ids(cfg)
        for i, side in enumerate(("pos", "neg")):
            self.register_buffer(f"token_prefix_{side}", torch.zeros(1, 1, 1, w))
            self.register_buffer(f"token_suffix_{side}", torch.zeros(1, 1, length - 1 - n, w))
            self.register_buffer(f"tokenized_prompts_{side}", ids[i].view(1, 1, -1).clone())
        # The EOT positions of these ids; used only where the buffers hold no data (the meta
        # device, on which device placement is checked without a GPU).
        self._eot_of_cfg = tuple(int(ids[i].view(-1).argmax()) for i in range(2))

    @torch.no_grad()
    def fill_token_embeddings(self, token_embedding: torch.Tensor) -> None:
        """Set the prefix/suffix buffers from a (vocab, W) token embedding table."""
        n = self.ctx_pos.shape[2]
        for side in ("pos", "neg"):
            ids = getattr(self, f"tokenized_prompts_{side}").view(-1).long()
            emb = token_embedding[ids.to(token_embedding.device)]  # (L, W)
            getattr(self, f"token_prefix_{side}").copy_(emb[:1].view(1, 1, 1, -1))
            getattr(self, f"token_suffix_{side}").copy_(emb[1 + n :].view(1, 1, -1, emb.shape[1]))

    def prompts(self) -> torch.Tensor:
        """Text-encoder input before the positional embedding (2, L, W): normal, anomalous."""
        rows = []
        for side in ("pos", "neg"):
            prefix = getattr(self, f"token_prefix_{side}")[0, 0]
            suffix = getattr(self, f"token_suffix_{side}")[0, 0]
            rows.append(torch.cat([prefix, getattr(self, f"ctx_{side}")[0, 0], suffix], dim=0))
        return torch.stack(rows)

    def eot_indices(self) -> tuple[int, int]:
        """EOT position of each prompt (the largest token id), normal then anomalous."""
        if self.tokenized_prompts_pos.is_meta:
            return self._eot_of_cfg  # type: ignore[return-value]
        return tuple(  # type: ignore[return-value]
            int(getattr(self, f"tokenized_prompts_{side}").view(-1).argmax())
            for side in ("pos", "neg")
        )


@dataclass
class AnomalyClipIntermediates:
    """Every intermediate of one forward pass (channel / row 1 is the anomalous one)."""

    text_prompts: torch.Tensor  # (2, L, W) text-encoder input before the positional embedding
    text_features_raw: torch.Tensor  # (2, E) before normalisation
    text_features: torch.Tensor  # (2, E) L2-normalised
    image_embedding: torch.Tensor  # (B, E) x_ori[CLS] @ proj, no ln_post, not normalised
    patch_tokens: torch.Tensor  # (B, L, 1 + N, E) ln_post(tokens) @ proj per layer, CLS first
    patch_embedding: torch.Tensor  # (B, L*N, E) the vision graph's output (CLS dropped)
    similarity: torch.Tensor  # (B, L, g, g, 2) softmax over [normal, anomalous]
    layer_maps: torch.Tensor  # (B, L, S, S)
    map_sum: torch.Tensor  # (B, S, S) before the Gaussian
    anomaly_map: torch.Tensor  # (B, S, S)
    pred_score: torch.Tensor  # (B,)


def layer_maps(probs: torch.Tensor, size: int) -> torch.Tensor:
    """(B, L, N, 2) patch probabilities -> (B, L, size, size) maps: both channels upsampled
    bilinearly (align_corners False, no antialias), then (P_anom + 1 - P_norm) / 2."""
    b, n_layers, n, two = probs.shape
    side = math.isqrt(n)
    x = probs.reshape(b * n_layers, side, side, two).permute(0, 3, 1, 2)  # (B*L, 2, g, g)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    out = (x[:, 1] + 1.0 - x[:, 0]) / 2.0  # (B*L, S, S)
    return out.reshape(b, n_layers, size, size)


class AnomalyClipModel(nn.Module):
    """AnomalyCLIP: frozen CLIP with the V-V dual path, static learned prompts, summed layer
    maps. ``attn_impl``: "sdpa" (fused kernels) or "explicit" (plain matmuls)."""

    def __init__(self, cfg: CopsCfg, attn_impl: str = "sdpa") -> None:
        super().__init__()
        if cfg.kind != "anomalyclip":
            raise ConfigError(
                f"AnomalyClipModel needs an 'anomalyclip' config, got {cfg.name!r} of kind "
                f"{cfg.kind!r}. Fix: create_model(name) builds the right model for a config."
            )
        if attn_impl not in ("sdpa", "explicit"):
            raise ConfigError(f"attn_impl must be 'sdpa' or 'explicit', got {attn_impl!r}")
        self.cfg = cfg
        self.clip = ClipModel(cfg, attn_impl)
        self.prompt = AnomalyClipPromptLearner(cfg)
        self.prompt.fill_token_embeddings(self.clip.text.token_embedding.weight)
        self.clip.requires_grad_(False)

    # ----------------------------------------------------------------- text
    def deep_tokens(self) -> dict[int, torch.Tensor]:
        """0-based text layer -> the (T, W) tokens replacing positions 1..T there (rounded to
        float16 with ``prompt.deep_token_fp16_round``, as the reference's ``.half()``)."""
        tokens = list(self.prompt.compound_prompts_text)
        if self.cfg.prompt.deep_token_fp16_round:
            tokens = [t.to(torch.float16).to(t.dtype) for t in tokens]
        return dict(zip(self.cfg.prompt.deep_layers, tokens, strict=True))

    def text_features(self, normalized: bool = True) -> torch.Tensor:
        """The two text features (2, E), row 0 normal, row 1 anomalous; image-independent."""
        prompts = self.prompt.prompts()  # (2, L, W)
        deep = self.deep_tokens()
        rows = [
            self.clip.text(prompts[i : i + 1], eot, deep)
            for i, eot in enumerate(self.prompt.eot_indices())
        ]
        feats = torch.cat(rows).float()  # (2, E)
        return normalize(feats) if normalized else feats

    # ----------------------------------------------------------------- image
    def vision_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image feature g (B, E) and ``ln_post(tokens) @ proj`` per feature layer
        (B, L, 1 + N, E), CLS first."""
        visual = self.clip.visual
        x_ori, feats = visual.dual_path(images)
        layers = [visual.ln_post(x) @ visual.proj for x in feats]
        return x_ori[:, 0] @ visual.proj, torch.stack(layers, dim=1)

    def encode_image(self, images: torch.Tensor) -> VisionOutput:
        """Image embedding g (B, E) and patch embeddings (B, L*N, E), layer-major."""
        g, tokens = self.vision_tokens(images)
        return VisionOutput(g, tokens[:, :, 1:].flatten(1, 2))

    # ----------------------------------------------------------------- head
    def head_intermediates(
        self,
        image_embedding: torch.Tensor,
        patch_embedding: torch.Tensor,
        size: int,
        text: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """(g (B, E), patches (B, L*N, E)) -> similarity, layer maps, map sum, map and score,
        with the normalised text features ``text`` (2, E) (computed when not given)."""
        tau, n_layers = self.cfg.head.tau, len(self.cfg.vision.feature_layers)
        text = self.text_features() if text is None else text
        b = patch_embedding.shape[0]
        patches = patch_embedding.reshape(b, n_layers, -1, patch_embedding.shape[-1])
        image_logits = normalize(image_embedding) @ text.t() / tau  # (B, 2)
        score = image_logits.softmax(dim=-1)[:, 1]
        probs = (normalize(patches) @ text.t() / tau).softmax(dim=-1)  # (B, L, N, 2)
        maps = layer_maps(probs, size)  # (B, L, S, S)
        total = maps.sum(dim=1)
        side = math.isqrt(probs.shape[2])
        return {
            "similarity": probs.reshape(b, n_layers, side, side, 2),
            "layer_maps": maps,
            "map_sum": total,
            "anomaly_map": gaussian_blur(total, self.cfg.head.sigma, self.cfg.head.truncate),
            "pred_score": score,
        }

    def forward_head(
        self, image_embedding: torch.Tensor, patch_embedding: torch.Tensor, size: int
    ) -> CopsOutput:
        """(g, patches) -> (pred_score, anomaly_map): the model after its image tower."""
        out = self.head_intermediates(image_embedding, patch_embedding, size)
        return CopsOutput(out["pred_score"], out["anomaly_map"])

    # ----------------------------------------------------------------- forward
    def forward_intermediates(self, images: torch.Tensor) -> AnomalyClipIntermediates:
        """Run the whole pipeline and return every intermediate."""
        raw = self.text_features(normalized=False)
        text = normalize(raw)
        g, tokens = self.vision_tokens(images)
        patches = tokens[:, :, 1:].flatten(1, 2)
        head = self.head_intermediates(g, patches, images.shape[-1], text)
        return AnomalyClipIntermediates(
            text_prompts=self.prompt.prompts(),
            text_features_raw=raw,
            text_features=text,
            image_embedding=g,
            patch_tokens=tokens,
            patch_embedding=patches,
            **head,
        )

    def forward(self, images: torch.Tensor) -> CopsOutput:
        """(B, 3, S, S) normalised images -> (pred_score (B,), anomaly_map (B, S, S))."""
        g, patches = self.encode_image(images)
        return self.forward_head(g, patches, images.shape[-1])
