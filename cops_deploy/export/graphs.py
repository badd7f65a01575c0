"""Deploy graphs: exact restructurings of ``CopsModel`` for export (DESIGN.md, "Deploy graphs").

- :class:`VisionGraph`: image (B, 3, S, S) -> image embedding (B, E), patch embeddings (B, N, E).
  The resized positional table is a constant; attention is written out (scale on q, and on a
  scaled copy of v on the V-VV path, before the first matmul); the V-VV path stops at the last
  feature layer, and the last block runs the original path for the CLS token only (its query,
  attention row and MLP), since only that token reaches the image embedding.
- :class:`HeadGraph`: embeddings -> pred_score (B,), anomaly_map (B, S, S). Neighbour averaging,
  the prototype extractor (both query sets in one pass, their projections folded), the text tower,
  SAGA, the nearest upsample and the reflect-border Gaussian. Everything image-independent is a
  constant: the hidden states of prompt positions 0..K (SOT and context, deep tokens included)
  never see the image, so their per-layer keys and values are precomputed; the state block
  (K+1..K+M) runs once per image and channel, shared by the R samples; only the class tokens,
  '.' and EOT run once per ICTS sample, attending over the cached prefix and the shared state
  keys (one token set per image and channel under a block-causal mask). The tower runs on the
  17 live tokens, and its last layer computes the EOT tokens only.
- :class:`AnomalyClipHeadGraph`: the AnomalyCLIP head (``model.cfg.kind == "anomalyclip"``). Its
  text features do not depend on the image, so they are a (2, E) constant and the graph holds no
  text tower; the vision graph stacks the L feature layers' patch embeddings on the token axis.
  :func:`head_graph` picks the head of a model's family.
- :class:`DeployModel`: both graphs composed, returning :class:`CopsOutput` (the torch backend).

Each graph takes float32 inputs and returns float32 outputs. ``compute_dtype`` (float32 here;
``cops_deploy.export.fp16`` sets float16) is the dtype of the matmuls and the residual streams;
LayerNorm, softmax, L2 norms, distances, SAGA, reductions (the mean over feature layers
included) and the Gaussian always run in float32. In a float16 graph the explicit attention
also computes its logits in float32 (q and k cast before the scaled q k^T; see
:func:`fp32_logits_attention`): CLIP's activations have outlier channels of a few hundred, and
``(q * scale) k^T`` then exceeds float16's 65504 (v v^T on the V-VV path first).

Every constant the graphs create (prompt masks, indices, the folding inputs) is created on the
device of the model's weights, so a model moved to CUDA (or the ``meta`` device, which the tests
use as its stand-in) builds its graphs there.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cops_deploy.configs import CopsCfg
from cops_deploy.errors import ConfigError
from cops_deploy.export.fused_ops import fused_attention
from cops_deploy.model.anomalyclip import AnomalyClipModel
from cops_deploy.model.clip import causal_mask
from cops_deploy.model.cops import CopsModel, CopsOutput
from cops_deploy.model.head import (
    cosine_distance_min,
    gaussian_blur,
    gaussian_kernel1d,
    neighbour_average,
    normalize,
    reflect_indices,
    saga_weight,
)
from cops_deploy.model.layers import ATTN_IMPLS, ResidualAttentionBlock, scaled_attention
from cops_deploy.runtime.contract import GRAPH_IO_NAMES, graph_specs

__all__ = [
    "FUSED_ATTN",
    "AnomalyClipHeadGraph",
    "DeployGraph",
    "DeployModel",
    "HeadGraph",
    "VisionGraph",
    "example_inputs",
    "fp32_logits_attention",
    "head_graph",
    "map_projection",
]

FUSED_ATTN = "ort_mha"  # VisionGraph only: attention as one com.microsoft.MultiHeadAttention node
# Additive mask value: exp(MASKED - max) is exactly 0 in float32, as with -inf, but it stays
# finite for kernels that dislike infinities.
MASKED = torch.finfo(torch.float32).min


# ----------------------------------------------------------------------------------------------
# Shared pieces (all dtype-generic: float32 islands are explicit)


def _layer_norm(ln: nn.LayerNorm, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """LayerNorm computed in float32 (an FP32 island in FP16 graphs), returned as ``dtype``."""
    out = F.layer_norm(x.float(), ln.normalized_shape, ln.weight.float(), ln.bias.float(), ln.eps)
    return out.to(dtype)


def fp32_logits_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """softmax((q * scale) k^T + mask) v with the logits an FP32 island: (..., H, L, D).

    q and k are cast to float32 before the scale and the first matmul, so the logits are never
    float16 (TensorRT runs that matmul in float32, or TF32 with float32's range); the mask and
    softmax are float32 too, and the weights go back to v's dtype for the second matmul, which
    stays float16 (its outputs are convex combinations of v, as bounded as v). Pre-scaling a
    float16 q (the fused-kernel form) is not enough: with CLIP's outlier channels of a few
    hundred, ``scale * |v|^2`` on the V-VV path exceeds 65504. For float32 inputs it computes
    exactly what :func:`~cops_deploy.model.layers.scaled_attention` does.
    """
    scores = (q.float() * scale) @ k.float().transpose(-2, -1)  # (..., H, Lq, Lk) float32
    if mask is not None:
        scores = scores + mask.float()
    return scores.softmax(dim=-1).to(v.dtype) @ v


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, W) -> (..., H, L, D)."""
    return x.unflatten(-1, (heads, x.shape[-1] // heads)).transpose(-3, -2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(..., H, L, D) -> (..., L, H * D)."""
    return x.transpose(-3, -2).flatten(-2)


def _qkv(
    block: ResidualAttentionBlock, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-head q, k, v (..., H, L, D) of a block's (already normalised) input (..., L, W)."""
    q, k, v = _qkv_merged(block, h)
    heads = block.attn.heads
    return _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)


def _qkv_merged(
    block: ResidualAttentionBlock, h: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (..., L, W), heads not split, of a block's (already normalised) input."""
    attn = block.attn
    q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    return q, k, v


def _project(block: ResidualAttentionBlock, heads_out: torch.Tensor) -> torch.Tensor:
    """Merge heads and apply the block's out-projection: (..., H, L, D) -> (..., L, W)."""
    return block.attn.out_proj(_merge_heads(heads_out))


def _mlp_residual(block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
    """x + mlp(ln_2(x))."""
    return x + block.mlp(_layer_norm(block.ln_2, x, x.dtype))


class DeployGraph(nn.Module):
    """Base of the deploy graphs (:class:`VisionGraph`, :class:`HeadGraph`): I/O names, compute
    dtype, buffers kept in float32, and the attention form (``attn_impl``)."""

    input_names: tuple[str, ...] = ()
    output_names: tuple[str, ...] = ()
    fp32_buffers: tuple[str, ...] = ()  # names of buffers an FP16 cast must leave in float32

    attn_impls: tuple[str, ...] = ATTN_IMPLS
    # Explicit attention in a float16 graph computes its logits in float32
    # (fp32_logits_attention; bfloat16 has float32's range and keeps its logits). False
    # restores the float16 logits of the form before the fix: only for the overflow test and
    # the cost measurement (tests/export/test_fp16.py, benchmarks/gpu_check.py).
    fp32_logits: bool = True

    def __init__(self, attn_impl: str = "explicit") -> None:
        super().__init__()
        if attn_impl not in self.attn_impls:
            raise ConfigError(
                f"attn_impl must be one of {list(self.attn_impls)} for {type(self).__name__}, "
                f"got {attn_impl!r}; 'explicit' is the portable exported form, 'sdpa' the fast "
                f"torch backend"
                + (
                    f", {FUSED_ATTN!r} the ONNX Runtime variant."
                    if FUSED_ATTN in self.attn_impls
                    else "."
                )
            )
        self.compute_dtype = torch.float32
        self.attn_impl = attn_impl

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The model's attention in this graph's form, softmax an FP32 island (and, explicit in a
        float16 graph, the logits too): (..., H, L, D)."""
        if self.attn_impl == "explicit" and q.dtype == torch.float16 and self.fp32_logits:
            return fp32_logits_attention(q, k, v, scale, mask)
        return scaled_attention(q, k, v, scale, mask, self.attn_impl, float32_softmax=True)


# ----------------------------------------------------------------------------------------------
# Vision


class VisionGraph(DeployGraph):
    """CLIP V-VV image tower: (B, 3, S, S) float32 -> (image_embedding (B, E), patch_embedding
    (B, N, E)), both float32. Shares its parameters with ``model``.

    ``attn_impl``: "explicit" (default; the portable exported form), "sdpa" (torch backend) or
    "ort_mha" (exports ``com.microsoft.MultiHeadAttention``: the ONNX Runtime variant).
    """

    input_names, output_names = GRAPH_IO_NAMES["vision"]
    attn_impls = (*ATTN_IMPLS, FUSED_ATTN)

    def __init__(self, model: CopsModel, attn_impl: str = "explicit") -> None:
        super().__init__(attn_impl)
        visual = model.clip.visual
        vcfg = model.cfg.vision
        self.cfg = model.cfg
        self.conv1 = visual.conv1
        self.class_embedding = visual.class_embedding
        self.ln_pre = visual.ln_pre
        self.ln_post = visual.ln_post
        self.proj = visual.proj
        self.blocks = visual.transformer.resblocks
        with torch.no_grad():
            self.register_buffer("positions", visual.positions(vcfg.grid).detach().clone())
        self.first_dual = vcfg.layers - vcfg.v_vv_layers  # 0-based index of the first dual block
        self.feature_layers = tuple(vcfg.feature_layers)
        self.last_feature = max(vcfg.feature_layers)  # 1-based: the V-VV path stops there
        # AnomalyCLIP keeps each feature layer (stacked on the token axis); CoPS averages them.
        self.stack_layers = model.cfg.patch_sets > 1

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.compute_dtype
        x = self.conv1(image.to(dtype))  # (B, W, g, g)
        x = x.flatten(2).transpose(1, 2)  # (B, N, W)
        cls = self.class_embedding.to(dtype).expand(x.shape[0], 1, -1)  # (B, 1, W)
        x = torch.cat([cls, x], dim=1) + self.positions.to(dtype)  # (B, 1 + N, W)
        x = x_ori = _layer_norm(self.ln_pre, x, dtype)
        feats = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            if i < self.first_dual:
                x = x_ori = self._plain_block(block, x_ori)
            else:
                need_vv = i + 1 <= self.last_feature
                x, x_ori = self._dual_block(block, x, x_ori, need_vv, cls_only=i == last)
            if i + 1 in self.feature_layers:
                feats.append(x)
        image_embedding = x_ori[:, 0] @ self.proj  # (B, E)
        patches = [(_layer_norm(self.ln_post, f[:, 1:], dtype) @ self.proj).float() for f in feats]
        if self.stack_layers:
            patch = torch.cat(patches, dim=1)  # (B, L*N, E)
        else:
            # the mean over feature layers is a float32 reduction (an FP32 island)
            patch = patches[0] if len(patches) == 1 else torch.stack(patches).mean(0)  # (B, N, E)
        return image_embedding.float(), patch

    def _plain_block(self, block: ResidualAttentionBlock, x: torch.Tensor) -> torch.Tensor:
        """An ordinary CLIP block (before the first V-VV block)."""
        q, k, v = _qkv_merged(block, _layer_norm(block.ln_1, x, x.dtype))  # (B, L, W)
        x = x + block.attn.out_proj(self._attend(block, q, k, v))
        return _mlp_residual(block, x)

    def _attend(
        self, block: ResidualAttentionBlock, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Multi-head attention on merged-head (B, L, W) tensors -> (B, Lq, W)."""
        attn = block.attn
        if self.attn_impl == FUSED_ATTN:
            return fused_attention(q, k, v, attn.heads, attn.scale)
        heads = (_split_heads(t, attn.heads) for t in (q, k, v))
        return _merge_heads(self._attention(*heads, attn.scale))

    def _dual_block(
        self,
        block: ResidualAttentionBlock,
        x: torch.Tensor,
        x_ori: torch.Tensor,
        need_vv: bool,
        cls_only: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One V-VV block. ``need_vv=False``: the V-VV update is unused (past the last feature
        layer) and skipped. ``cls_only``: x_ori keeps only CLS, (B, 1, W), on return."""
        attn = block.attn
        h = _layer_norm(block.ln_1, x_ori, x_ori.dtype)  # (B, L, W)
        if cls_only:
            w_q, w_kv = attn.in_proj_weight.split([attn.width, 2 * attn.width])
            b_q, b_kv = attn.in_proj_bias.split([attn.width, 2 * attn.width])
            q = F.linear(h[:, :1], w_q, b_q)  # (B, 1, W)
            k, v = F.linear(h, w_kv, b_kv).chunk(2, -1)  # (B, L, W)
            x_ori = x_ori[:, :1]  # (B, 1, W)
        else:
            q, k, v = _qkv_merged(block, h)  # (B, L, W)
        if need_vv:
            x = x + attn.out_proj(self._attend(block, v, v, v))
        x_ori = x_ori + attn.out_proj(self._attend(block, q, k, v))
        return x, _mlp_residual(block, x_ori)


# ----------------------------------------------------------------------------------------------
# Head


class HeadGraph(DeployGraph):
    """Scoring head: (image_embedding (B, E), patch_embedding (B, N, E)) float32 ->
    (pred_score (B,), anomaly_map (B, S, S)) float32, with the prompts precomputed.

    ``attn_impl``: "explicit" (default; what is exported) or "sdpa" (torch backend).
    """

    input_names, output_names = GRAPH_IO_NAMES["head"]
    fp32_buffers = ("text_mask", "eot_mask")

    def __init__(self, model: CopsModel, attn_impl: str = "explicit") -> None:
        super().__init__(attn_impl)
        cfg = model.cfg
        p, head = cfg.prompt, cfg.head
        _check_head_model(model)
        self.cfg = cfg
        self.size = cfg.vision.input_size
        self.grid = cfg.vision.grid
        self.kernel = head.neighbour_kernel
        self.alpha, self.beta, self.tau = head.alpha, head.beta, head.tau
        self.sigma, self.truncate = head.sigma, head.truncate
        self.samples = head.samples
        self.prototypes = p.prototypes
        self.prefix_len = 1 + p.context_tokens  # SOT + context: image-independent
        self.state_len = p.state_tokens
        self.tail_len = p.live_tokens - self.prefix_len - self.state_len  # class, '.', EOT
        self.extractor = model.prompt.extractor
        text = model.clip.text
        self.text_blocks = text.transformer.resblocks
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.text_heads = cfg.text.heads
        with torch.no_grad():
            self._fold_extractor(model)
            self._fold_prompts(model)

    # -- constants ---------------------------------------------------------------------------

    def _fold_extractor(self, model: CopsModel) -> None:
        """Both query sets in one (2P, C) table, with their LayerNorm and scaled q folded."""
        ex = model.prompt.extractor
        attn = ex.attn
        queries = torch.cat([model.prompt.t_n, model.prompt.t_a]).detach()  # (2P, C)
        w_q = attn.in_proj_weight[: attn.width]
        b_q = attn.in_proj_bias[: attn.width]
        q = _split_heads(F.linear(ex.ln_1(queries), w_q, b_q), attn.heads)  # (H, 2P, D)
        self.register_buffer("proto_queries", queries.clone())
        self.register_buffer("proto_q", (q * attn.scale).clone())

    def _fold_prompts(self, model: CopsModel) -> None:
        """Prompt constants: prefix keys/values per layer, state and tail inputs, masks."""
        cfg = model.cfg
        m, pre = self.state_len, self.prefix_len
        live = cfg.prompt.live_tokens
        device = model.class_samples.device  # every constant on the weights' device
        zeros = torch.zeros(1, m, cfg.embed_dim, device=device)
        bias = model.class_bias(1)  # (1, R, E): decoder(z) for the fixed samples
        prompts = model.build_prompts(zeros, zeros, bias)[0, :, :, :live]  # (2, R, 17, W)
        pos = model.clip.text.positional_embedding[:live]  # (17, W)
        ctx = torch.stack([model.prompt.ctx_pos[0, 0], model.prompt.ctx_neg[0, 0]])  # (2, 14, W)
        k = cfg.prompt.context_tokens
        self.register_buffer("state_ctx", ctx[:, k : k + m].clone())  # (2, M, W)
        self.register_buffer("state_pos", pos[pre : pre + m].clone())  # (M, W)
        tail = (prompts[:, :, pre + m :] + pos[pre + m :]).flatten(1, 2)  # (2, R*T, W)
        block0 = self.text_blocks[0]
        q0, k0, v0 = _qkv(block0, block0.ln_1(tail))  # (2, H, R*T, D): layer 0 is constant
        for name, value in (("tail_h0", tail), ("tail_q0", q0), ("tail_k0", k0), ("tail_v0", v0)):
            self.register_buffer(name, value.clone())
        self._fold_prefix(model, prompts[:, 0, :pre] + pos[:pre])
        mask = self._token_mask().to(device)
        self.register_buffer("text_mask", mask)  # (M + R*T, K+1 + M + R*T)
        eot = m + torch.arange(self.samples, device=device) * self.tail_len + self.tail_len - 1
        self.register_buffer("eot_rows", eot)
        self.register_buffer("eot_mask", mask[eot].clone())  # (R, K+1 + M + R*T)

    def _token_mask(self) -> torch.Tensor:
        """Additive mask of the per-(image, channel) token set [state (M) | tail_0 .. tail_R-1
        (T each)] over the keys [prefix (K+1) | the same tokens]: the causal mask of the
        77-token prompt of every sample, restricted to the tokens each one really reads."""
        m, t, r, pre = self.state_len, self.tail_len, self.samples, self.prefix_len
        n = m + r * t
        sample = torch.cat([torch.full((m,), -1), torch.arange(r).repeat_interleave(t)])  # (n,)
        position = torch.cat([torch.arange(m), m + torch.arange(t).repeat(r)])  # (n,)
        same_prompt = (sample[None, :] == -1) | (sample[None, :] == sample[:, None])  # (n, n)
        allowed = same_prompt & (position[None, :] <= position[:, None])
        own = torch.zeros(n, n).masked_fill(~allowed, MASKED)
        return torch.cat([torch.zeros(n, pre), own], dim=1)

    def _fold_prefix(self, model: CopsModel, x: torch.Tensor) -> None:
        """Run positions 0..K (2, K+1, W) through the tower once, keeping each layer's k, v."""
        deep = model.deep_tokens()
        mask = causal_mask(x.shape[1], x.dtype).to(x.device)
        for i, block in enumerate(self.text_blocks):
            if i in deep:
                tok = deep[i].to(x.dtype).expand(x.shape[0], -1, -1)  # (2, T, W)
                x = torch.cat([x[:, :1], tok, x[:, 1 + tok.shape[1] :]], dim=1)
            _, k, v = block.attn.qkv(block.ln_1(x))  # (2, H, K+1, D)
            self.register_buffer(f"prefix_k{i}", k.clone())
            self.register_buffer(f"prefix_v{i}", v.clone())
            x = block(x, mask)

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self, image_embedding: torch.Tensor, patch_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = image_embedding.float()
        patches_avg = neighbour_average(patch_embedding.float(), self.kernel)  # (B, N, E)
        proto_n, proto_a = self._prototypes(patches_avg)  # (B, P, E) each, compute dtype
        d_n = cosine_distance_min(patches_avg, proto_n.float())  # (B, N)
        d_a = cosine_distance_min(patches_avg, proto_a.float())
        text = self._text_features(proto_n, proto_a)  # (B, 2, E) float32
        patch_logits = normalize(patches_avg) @ text.transpose(1, 2) / self.tau  # (B, N, 2)
        probs_w = patch_logits.softmax(dim=-1) * saga_weight(d_n, d_a, self.alpha).unsqueeze(-1)
        image_logits = (normalize(g).unsqueeze(1) @ text.transpose(1, 2)).squeeze(1) / self.tau
        image_prob = image_logits.softmax(dim=-1)[:, 1]  # (B,)
        score = self.beta * image_prob + (1.0 - self.beta) * probs_w[..., 1].amax(dim=-1)
        amap = gaussian_blur(self._upsample(probs_w[..., 1]), self.sigma, self.truncate)
        return score, amap

    def _prototypes(self, patches_avg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ESTS prototypes for both query sets at once: (B, N, C) -> 2 x (B, P, C)."""
        dtype = self.compute_dtype
        ex = self.extractor
        attn = ex.attn
        memory = _layer_norm(ex.ln_1, patches_avg, dtype)  # (B, N, C)
        w_kv = attn.in_proj_weight[attn.width :]
        b_kv = attn.in_proj_bias[attn.width :]
        k, v = (_split_heads(t, attn.heads) for t in F.linear(memory, w_kv, b_kv).chunk(2, -1))
        heads = self._attention(self.proto_q, k, v, 1.0)  # (B, H, 2P, D)
        x = self.proto_queries + attn.out_proj(_merge_heads(heads))  # (B, 2P, C)
        x = x + ex.mlp(_layer_norm(ex.ln_2, x, dtype))
        return x[:, : self.prototypes], x[:, self.prototypes :]

    def _text_features(self, proto_n: torch.Tensor, proto_a: torch.Tensor) -> torch.Tensor:
        """T (B, 2, E): channel 0 'pos' carries proto_a, channel 1 (anomaly) proto_n.

        Per image and channel one token set [state block | R tails] runs through the tower,
        attending over the constant prefix keys/values and itself under ``text_mask``.
        """
        b = proto_n.shape[0]
        state = torch.stack([proto_a, proto_n], dim=1)  # (B, 2, M, W)
        x_s = (self.state_ctx + state) + self.state_pos  # (B, 2, M, W)
        tail = self.tail_h0.expand(b, -1, -1, -1)  # (B, 2, R*T, W)
        x = torch.cat([x_s, tail], dim=2)  # (B, 2, M + R*T, W)
        last = len(self.text_blocks) - 1
        for i, block in enumerate(self.text_blocks):
            if i == 0:  # the tails' layer-0 q, k, v are constants
                q, k, v = _qkv(block, _layer_norm(block.ln_1, x_s, x_s.dtype))  # (B,2,H,M,D)
                q, k, v = (
                    torch.cat([a, c.expand(b, -1, -1, -1, -1)], dim=-2)
                    for a, c in ((q, self.tail_q0), (k, self.tail_k0), (v, self.tail_v0))
                )  # (B, 2, H, M + R*T, D)
            else:
                q, k, v = _qkv(block, _layer_norm(block.ln_1, x, x.dtype))
            k = torch.cat([getattr(self, f"prefix_k{i}").expand(b, -1, -1, -1, -1), k], dim=-2)
            v = torch.cat([getattr(self, f"prefix_v{i}").expand(b, -1, -1, -1, -1), v], dim=-2)
            mask = self.text_mask
            if i == last:  # only the R EOT tokens are read after the last layer
                q = q.index_select(-2, self.eot_rows)  # (B, 2, H, R, D)
                x = x.index_select(-2, self.eot_rows)  # (B, 2, R, W)
                mask = self.eot_mask
            heads = self._attention(q, k, v, block.attn.scale, mask)
            x = x + _project(block, heads)
            x = _mlp_residual(block, x)
        eot = _layer_norm(self.ln_final, x, x.dtype)  # (B, 2, R, W)
        feats = normalize((eot @ self.text_projection).float())  # (B, 2, R, E)
        return normalize(feats.mean(dim=2))

    def _upsample(self, patch_map: torch.Tensor) -> torch.Tensor:
        """Nearest upsample (B, N) -> (B, S, S) as an exact block repeat (S = grid * factor)."""
        g, s = self.grid, self.size
        f = s // g
        x = patch_map.reshape(-1, g, 1, g, 1).expand(-1, g, f, g, f)  # (B, g, f, g, f)
        return x.reshape(-1, s, s)


def _check_head_model(model: CopsModel) -> None:
    p = model.cfg.prompt
    if model.sampling != "fixed":
        raise ConfigError(
            f"deploy graphs need the model's fixed ICTS samples, got sampling={model.sampling!r}; "
            f"valid: 'fixed'. Fix: create the model with sampling='fixed' (the default)."
        )
    if p.deep_token_length > p.context_tokens:
        raise ConfigError(
            f"prompt.deep_token_length {p.deep_token_length} exceeds prompt.context_tokens "
            f"{p.context_tokens}: deep tokens would replace state tokens, and the head graph's "
            f"image-independent prefix would not be. Valid: deep_token_length <= context_tokens."
        )
    size, grid = model.cfg.vision.input_size, model.cfg.vision.grid
    if size % grid:
        raise ConfigError(
            f"vision.input_size {size} is not a multiple of the patch grid {grid}; the head's "
            f"nearest upsample needs an integer factor. Fix: use a multiple of the patch size."
        )


# ----------------------------------------------------------------------------------------------
# AnomalyCLIP head


def map_projection(grid: int, size: int, sigma: float, truncate: float) -> np.ndarray:
    """(size, grid) float64 matrix K with K @ m @ K.T == gaussian_blur(bilinear(m)) for a
    (grid, grid) map m: the bilinear upsample (align_corners False, no antialias) and the
    scipy-style reflect-border Gaussian are both separable linear maps, so their product is one
    matrix per axis (exact up to float rounding)."""
    eye = torch.eye(grid, dtype=torch.float64).unsqueeze(0)  # (1, g, g): one basis map per row
    up = F.interpolate(eye, size=size, mode="linear", align_corners=False)[0].T.numpy()  # (S, g)
    weights = gaussian_kernel1d(sigma, truncate)
    radius = (len(weights) - 1) // 2
    source = reflect_indices(size, radius)  # padded position -> source index
    blur = np.zeros((size, size))
    for tap, w in enumerate(weights):  # out[i] += w * x[source[i + tap]]
        np.add.at(blur, (np.arange(size), source[tap : tap + size]), w)
    return blur @ up


class AnomalyClipHeadGraph(DeployGraph):
    """AnomalyCLIP scoring head: (image_embedding (B, E), patch_embedding (B, L*N, E)) float32
    -> (pred_score (B,), anomaly_map (B, S, S)) float32, no text tower: the normalised text
    features (2, E) are a constant.

    Exact restructurings of :class:`AnomalyClipModel`'s head: the per-layer map formula
    (P_anom + 1 - P_norm) / 2 is affine and bilinear weights sum to 1, so the layer maps are
    summed on the patch grid, then upsampled and blurred by one (S, g) matrix per axis
    (:func:`map_projection`). Everything runs in float32 (the head is tiny; an FP16 copy keeps
    its constants in float32 too).
    """

    input_names, output_names = GRAPH_IO_NAMES["head"]
    fp32_buffers = ("text_t", "projection")

    def __init__(self, model: AnomalyClipModel, attn_impl: str = "explicit") -> None:
        super().__init__(attn_impl)
        cfg = model.cfg
        self.cfg = cfg
        self.tau = cfg.head.tau
        self.layers = len(cfg.vision.feature_layers)
        self.grid = cfg.vision.grid
        with torch.no_grad():
            text = model.text_features().detach().float()  # (2, E), normalised
        self.register_buffer("text_t", text.t().contiguous().clone())  # (E, 2)
        k = map_projection(self.grid, cfg.vision.input_size, cfg.head.sigma, cfg.head.truncate)
        projection = torch.from_numpy(k).float().to(text.device)  # on the weights' device
        self.register_buffer("projection", projection)  # (S, g)

    def forward(
        self, image_embedding: torch.Tensor, patch_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        text_t = self.text_t.float()
        image_logits = normalize(image_embedding.float()) @ text_t / self.tau  # (B, 2)
        score = image_logits.softmax(dim=-1)[:, 1]
        g, e = self.grid, patch_embedding.shape[-1]
        patches = patch_embedding.float().reshape(-1, self.layers, g * g, e)  # (B, L, N, E)
        probs = (normalize(patches) @ text_t / self.tau).softmax(dim=-1)  # (B, L, N, 2)
        grid_map = ((probs[..., 1] + 1.0 - probs[..., 0]) / 2.0).sum(dim=1)  # (B, N)
        k = self.projection.float()
        amap = k @ grid_map.reshape(-1, g, g) @ k.t()  # (B, S, S)
        return score, amap


def head_graph(model: CopsModel | AnomalyClipModel, attn_impl: str = "explicit") -> DeployGraph:
    """The head graph of ``model``'s family: :class:`HeadGraph` (CoPS) or
    :class:`AnomalyClipHeadGraph`."""
    if isinstance(model, AnomalyClipModel):
        return AnomalyClipHeadGraph(model, attn_impl)
    return HeadGraph(model, attn_impl)


# ----------------------------------------------------------------------------------------------
# Composition and I/O specs


class DeployModel(nn.Module):
    """Vision and head graphs composed: (B, 3, S, S) -> CopsOutput (the torch backend).

    ``attn_impl=None`` (default) picks the faster form per graph on CPU: "sdpa" for the vision
    tower (about 4x faster than the explicit form at 1370 tokens), "explicit" for the head (its
    small masked attentions are slower through SDPA); a string forces both ("explicit" runs
    exactly the exported computation).
    """

    def __init__(self, model: CopsModel | AnomalyClipModel, attn_impl: str | None = None) -> None:
        super().__init__()
        self.vision = VisionGraph(model, attn_impl or "sdpa")
        self.head = head_graph(model, attn_impl or "explicit")

    def forward(self, images: torch.Tensor) -> CopsOutput:
        image_embedding, patch_embedding = self.vision(images)
        return CopsOutput(*self.head(image_embedding, patch_embedding))


def example_inputs(
    name: str, cfg: CopsCfg, batch: int = 2, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """Seeded standard-normal inputs of a graph (batch 2 by default: export with batch 1 would
    specialise the batch dimension to 1)."""
    gen = torch.Generator().manual_seed(seed)
    inputs, _ = graph_specs(name, cfg)
    return tuple(torch.randn(batch, *spec.shape[1:], generator=gen) for spec in inputs)
