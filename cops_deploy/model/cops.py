"""The CoPS model (METHOD.md sections 1-5): frozen CLIP, ESTS, ICTS, SAGA and scoring.

``CopsModel(images)`` returns ``CopsOutput(pred_score [B], anomaly_map [B, S, S])``;
``forward_intermediates`` returns every intermediate as a ``CopsIntermediates``. Inference is
deterministic and batch-invariant by default: the R class-token samples are fixed once
(seeded) and stored with the weights, and the SAGA min-max runs per image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import nn

from cops_deploy.configs import CopsCfg
from cops_deploy.errors import ConfigError
from cops_deploy.model.clip import ClipModel, VisionOutput
from cops_deploy.model.head import (
    cosine_distance_min,
    gaussian_blur,
    neighbour_average,
    normalize,
    saga_weight,
    upsample_nearest,
)
from cops_deploy.model.layers import PrototypeExtractor, VAEDecoder, VAEEncoder

Sampling = Literal["fixed", "per_batch"]


class CopsOutput(NamedTuple):
    """Model outputs; the field names are the exported graph's output names."""

    pred_score: torch.Tensor  # (B,)
    anomaly_map: torch.Tensor  # (B, S, S)


@dataclass
class CopsIntermediates:
    """Every intermediate of one forward pass (channel 1 is the anomaly channel)."""

    image_embedding: torch.Tensor  # (B, E)
    patch_embedding: torch.Tensor  # (B, N, E)
    patch_embedding_avg: torch.Tensor  # (B, N, E)
    proto_n: torch.Tensor  # (B, P, E)
    proto_a: torch.Tensor  # (B, P, E)
    d_n: torch.Tensor  # (B, N)
    d_a: torch.Tensor  # (B, N)
    class_bias: torch.Tensor  # (B, R, E)
    text_features: torch.Tensor  # (B, 2, E)
    image_logits: torch.Tensor  # (B, 2): normalise(g) @ T^T / tau
    probs: torch.Tensor  # (B, N, 2) before SAGA
    probs_weighted: torch.Tensor  # (B, N, 2) after SAGA
    anomaly_map: torch.Tensor  # (B, S, S)
    pred_score: torch.Tensor  # (B,)


class PromptLearner(nn.Module):
    """The learned CoPS parameters, under the reference checkpoint's key names."""

    def __init__(self, cfg: CopsCfg, impl: str = "sdpa") -> None:
        super().__init__()
        p, c = cfg.prompt, cfg.embed_dim
        self.ctx_pos = nn.Parameter(torch.randn(1, 1, p.n_ctx, c) * 0.02)
        self.ctx_neg = nn.Parameter(torch.randn(1, 1, p.n_ctx, c) * 0.02)
        self.t_n = nn.Parameter(torch.randn(p.prototypes, c) * 0.02)
        self.t_a = nn.Parameter(torch.randn(p.prototypes, c) * 0.02)
        self.extractor = PrototypeExtractor(c, p.extractor_heads, impl)
        self.vae_encoder = VAEEncoder(c)
        self.vae_decoder = VAEDecoder(c)
        self.compound_prompts_text = nn.ParameterList(
            [
                nn.Parameter(torch.randn(p.deep_token_length, c) * 0.02)
                for _ in range(p.deep_token_count)
            ]
        )
        for module in (self.extractor, self.vae_encoder, self.vae_decoder):
            module.apply(_init_linear)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)


def fixed_class_samples(cfg: CopsCfg) -> torch.Tensor:
    """The deterministic R ICTS samples z ~ N(0, I), (R, E), from ``head.sample_seed``."""
    gen = torch.Generator().manual_seed(cfg.head.sample_seed)
    return torch.randn(cfg.head.samples, cfg.embed_dim, generator=gen)


class CopsModel(nn.Module):
    """CoPS: CLIP (frozen) + the learned prompt synthesis, with the inference head.

    Args:
        cfg: the architecture.
        attn_impl: "sdpa" (fused kernels) or "explicit" (plain matmuls, for export).
        text_length: tokens the text tower runs on; the default (the 17 live tokens) gives the
            same features as the full context length (77) because of the causal mask.
        sampling: "fixed" (default; seeded samples stored with the weights, deterministic and
            batch-invariant) or "per_batch" (the reference's fresh draw from the global RNG
            for every batch, different per image).
    """

    def __init__(
        self,
        cfg: CopsCfg,
        attn_impl: str = "sdpa",
        text_length: int | None = None,
        sampling: Sampling = "fixed",
    ) -> None:
        super().__init__()
        if attn_impl not in ("sdpa", "explicit"):
            raise ConfigError(f"attn_impl must be 'sdpa' or 'explicit', got {attn_impl!r}")
        if sampling not in ("fixed", "per_batch"):
            raise ConfigError(f"sampling must be 'fixed' or 'per_batch', got {sampling!r}")
        self.cfg = cfg
        self.sampling = sampling
        self.text_length = text_length or cfg.prompt.live_tokens
        if not cfg.prompt.live_tokens <= self.text_length <= cfg.text.context_length:
            raise ConfigError(
                f"text_length must be in {cfg.prompt.live_tokens}..{cfg.text.context_length}, "
                f"got {self.text_length}"
            )
        self.clip = ClipModel(cfg, attn_impl)
        self.prompt = PromptLearner(cfg, attn_impl)
        self.register_buffer("class_samples", fixed_class_samples(cfg))  # (R, E)
        self.clip.requires_grad_(False)

    # ----------------------------------------------------------------- pieces
    def encode_image(self, images: torch.Tensor) -> VisionOutput:
        """Image embedding g (B, E) and patch embeddings P (B, N, E)."""
        return self.clip.visual(images)

    def prototypes(self, patches_avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ESTS prototypes (proto_n, proto_a), each (B, P, E)."""
        ex = self.prompt.extractor
        return ex(self.prompt.t_n, patches_avg), ex(self.prompt.t_a, patches_avg)

    def class_bias(self, batch: int, z: torch.Tensor | None = None) -> torch.Tensor:
        """ICTS class-token biases (B, R, E) from z (R, E) or (B, R, E), or the model's mode."""
        if z is None:
            if self.sampling == "fixed":
                z = self.class_samples
            else:
                z = torch.randn(batch, *self.class_samples.shape, device=self.class_samples.device)
        z = z.to(self.class_samples.dtype)
        bias = self.prompt.vae_decoder(z)
        return bias.expand(batch, -1, -1) if bias.dim() == 2 else bias

    def deep_tokens(self, prompts: int | None = None) -> dict[int, torch.Tensor]:
        """0-based text layer -> the (T, W) tokens that replace positions 1..T there, or
        (prompts, T, W) copies of them when ``prompts`` is given.

        With ``prompt.deep_token_fp16_round`` the tokens are rounded to float16 first, as the
        reference does (it casts them with ``.half()`` at insertion). The values do not depend
        on ``prompts``; the gradient does: the reference rounds after expanding to the prompts,
        so in backward each prompt's gradient is rounded to float16 before the sum over prompts
        (golden/train), which the per-prompt copies reproduce.
        """
        tokens = list(self.prompt.compound_prompts_text)
        if prompts is not None:
            tokens = [t.expand(prompts, -1, -1) for t in tokens]
        if self.cfg.prompt.deep_token_fp16_round:
            tokens = [t.to(torch.float16).to(t.dtype) for t in tokens]
        return dict(zip(self.cfg.prompt.deep_layers, tokens, strict=True))

    def token_embeddings(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed embeddings around the learned tokens: prefix (1, W) and suffix (L-15, W)."""
        p = self.cfg.prompt
        emb = self.clip.text.token_embedding.weight
        suffix_ids = [p.period_token, p.eot_token] + [0] * (length - p.live_tokens)
        ids = torch.tensor([p.sot_token, *suffix_ids], device=emb.device)
        tok = emb[ids]
        return tok[:1], tok[1:]

    def build_prompts(
        self, proto_n: torch.Tensor, proto_a: torch.Tensor, bias: torch.Tensor
    ) -> torch.Tensor:
        """Prompt embeddings (B, 2, R, L, W): channel 0 'pos' carries proto_a, channel 1 'neg'
        (the anomaly channel) carries proto_n, as in the reference."""
        p = self.cfg.prompt
        b, r, w = bias.shape
        k, m = p.context_tokens, p.state_tokens
        prefix, suffix = self.token_embeddings(self.text_length)
        channels = []
        for ctx, proto in (
            (self.prompt.ctx_pos[0, 0], proto_a),
            (self.prompt.ctx_neg[0, 0], proto_n),
        ):
            context = ctx[:k].expand(b, r, k, w)  # (B, R, K, W)
            state = (ctx[k : k + m] + proto).unsqueeze(1).expand(b, r, m, w)  # (B, R, M, W)
            cls = ctx[k + m :].unsqueeze(0).unsqueeze(0) + bias.unsqueeze(2)  # (B, R, 2, W)
            pre = prefix.expand(b, r, -1, w)
            suf = suffix.expand(b, r, -1, w)
            channels.append(torch.cat([pre, context, state, cls, suf], dim=2))  # (B, R, L, W)
        return torch.stack(channels, dim=1)  # (B, 2, R, L, W)

    def text_features(
        self,
        proto_n: torch.Tensor,
        proto_a: torch.Tensor,
        bias: torch.Tensor,
        per_prompt_deep_tokens: bool = False,
    ) -> torch.Tensor:
        """T (B, 2, E): per-sample features normalised, averaged over R, normalised again.

        ``per_prompt_deep_tokens`` (training) gives the deep tokens the reference's gradient
        (see :meth:`deep_tokens`); the values, and the inference and export graphs, are the
        same either way.
        """
        prompts = self.build_prompts(proto_n, proto_a, bias)  # (B, 2, R, L, W)
        b, two, r, length, w = prompts.shape
        feats = self.clip.text(
            prompts.reshape(b * two * r, length, w),
            self.cfg.prompt.eot_index,
            self.deep_tokens(b * two * r if per_prompt_deep_tokens else None),
        )
        feats = normalize(feats.reshape(b, two, r, -1))  # (B, 2, R, E)
        return normalize(feats.mean(dim=2))

    # ----------------------------------------------------------------- forward
    def forward_intermediates(
        self, images: torch.Tensor, z: torch.Tensor | None = None
    ) -> CopsIntermediates:
        """Run the whole pipeline and return every intermediate.

        ``z`` (R, E) or (B, R, E) overrides the ICTS samples (e.g. to replay the reference).
        """
        g, patches = self.encode_image(images)
        return self.head_intermediates(g, patches, images.shape[-1], z)

    def head_intermediates(
        self,
        image_embedding: torch.Tensor,
        patch_embedding: torch.Tensor,
        size: int,
        z: torch.Tensor | None = None,
    ) -> CopsIntermediates:
        """Everything after the image tower: (g (B, E), P (B, N, E)) -> all intermediates,
        with the anomaly map at ``size`` x ``size``."""
        head = self.cfg.head
        g, patches = image_embedding, patch_embedding
        patches_avg = neighbour_average(patches, head.neighbour_kernel)  # (B, N, E)
        proto_n, proto_a = self.prototypes(patches_avg)
        d_n = cosine_distance_min(patches_avg, proto_n)  # (B, N)
        d_a = cosine_distance_min(patches_avg, proto_a)
        bias = self.class_bias(g.shape[0], z)
        text = self.text_features(proto_n, proto_a, bias)  # (B, 2, E)
        patch_logits = normalize(patches_avg) @ text.transpose(1, 2) / head.tau  # (B, N, 2)
        probs = patch_logits.softmax(dim=-1)
        probs_w = probs * saga_weight(d_n, d_a, head.alpha).unsqueeze(-1)
        image_logits = (normalize(g).unsqueeze(1) @ text.transpose(1, 2)).squeeze(1) / head.tau
        image_prob = image_logits.softmax(dim=-1)[:, 1]
        score = head.beta * image_prob + (1.0 - head.beta) * probs_w[..., 1].amax(dim=-1)
        amap = gaussian_blur(upsample_nearest(probs_w[..., 1], size), head.sigma, head.truncate)
        return CopsIntermediates(
            image_embedding=g,
            patch_embedding=patches,
            patch_embedding_avg=patches_avg,
            proto_n=proto_n,
            proto_a=proto_a,
            d_n=d_n,
            d_a=d_a,
            class_bias=bias,
            text_features=text,
            image_logits=image_logits,
            probs=probs,
            probs_weighted=probs_w,
            anomaly_map=amap,
            pred_score=score,
        )

    def forward_head(
        self, image_embedding: torch.Tensor, patch_embedding: torch.Tensor, size: int
    ) -> CopsOutput:
        """(g, P) -> (pred_score, anomaly_map): the model after its image tower."""
        out = self.head_intermediates(image_embedding, patch_embedding, size)
        return CopsOutput(out.pred_score, out.anomaly_map)

    def forward(self, images: torch.Tensor) -> CopsOutput:
        """(B, 3, S, S) normalised images -> (pred_score (B,), anomaly_map (B, S, S))."""
        out = self.forward_intermediates(images)
        return CopsOutput(out.pred_score, out.anomaly_map)
