"""Reference-eager CoPS: METHOD.md written out the way the reference code runs it.

The side-by-side baseline of the benchmark suite: same weights as a ``CopsModel``, computed the
straightforward way: explicit attention with the scale applied after q k^T, the text tower on
the full 77-token context, the R class-token samples encoded one prompt pair at a time, the
Gaussian blur by SciPy on the CPU, one image at a time. It is not a strawman: its outputs equal
the model's to about 1e-5 (benchmarks/test_reference_eager.py checks it, also against the
reference implementation's golden outputs).

``ReferenceEager(model)`` of an ``AnomalyClipModel`` is an :class:`AnomalyClipReferenceEager`:
AnomalyCLIP's test.py written out the same way (text features once, then per image the vision
tower, per-layer bilinear upsampling of both channels, the sum, SciPy's Gaussian).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from cops_deploy.model.anomalyclip import AnomalyClipModel
from cops_deploy.model.cops import CopsModel


def _ln(x: torch.Tensor, ln: torch.nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, heads, c // heads).permute(0, 2, 1, 3)  # (B, H, N, D)


def _attend(q, k, v, mask=None):
    attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # scale after the matmul
    if mask is not None:
        attn = attn + mask
    return attn.softmax(-1) @ v


def _out(block_attn, x: torch.Tensor) -> torch.Tensor:
    b, h, n, d = x.shape
    return F.linear(
        x.permute(0, 2, 1, 3).reshape(b, n, h * d),
        block_attn.out_proj.weight,
        block_attn.out_proj.bias,
    )


def _mlp(block, x: torch.Tensor) -> torch.Tensor:
    h = F.linear(x, block.mlp.c_fc.weight, block.mlp.c_fc.bias)
    h = h * torch.sigmoid(1.702 * h)
    return F.linear(h, block.mlp.c_proj.weight, block.mlp.c_proj.bias)


def _encode_text(m, prompts: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
    """(P, 77, W) prompt embeddings -> projected EOT features (P, E), not normalised: the text
    tower on the full context, deep tokens rounded to fp16 where inserted."""
    t, cfg = m.clip.text, m.cfg
    length = prompts.shape[1]
    mask = torch.full((length, length), float("-inf"), device=prompts.device)
    mask = mask.triu_(1).to(prompts.dtype)
    x = prompts + t.positional_embedding
    deep = list(m.prompt.compound_prompts_text)
    for i, block in enumerate(t.transformer.resblocks):
        if 1 <= i <= len(deep):
            tok = deep[i - 1].half().to(x.dtype).expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :1], tok, x[:, 1 + tok.shape[1] :]], dim=1)
        h = _ln(x, block.ln_1)
        qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
        q, k, val = (_heads(u, cfg.text.heads) for u in qkv.chunk(3, dim=-1))
        x = x + _out(block.attn, _attend(q, k, val, mask))
        x = x + _mlp(block, _ln(x, block.ln_2))
    return _ln(x, t.ln_final)[torch.arange(x.shape[0]), eot] @ t.text_projection


class ReferenceEager:
    """Run a ``CopsModel``'s weights through the straightforward reference pipeline (an
    ``AnomalyClipModel``'s: :class:`AnomalyClipReferenceEager`)."""

    def __new__(cls, model: CopsModel | AnomalyClipModel) -> ReferenceEager:
        if cls is ReferenceEager and isinstance(model, AnomalyClipModel):
            return AnomalyClipReferenceEager(model)
        return super().__new__(cls)

    def __init__(self, model: CopsModel) -> None:
        self.m = model
        self.cfg = model.cfg

    # ---------------------------------------------------------------- vision
    def vision(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.m.clip.visual
        heads = self.cfg.vision.heads
        x = F.conv2d(image, v.conv1.weight, stride=self.cfg.vision.patch_size)
        side = x.shape[-1]
        x = x.reshape(1, x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([v.class_embedding.reshape(1, 1, -1), x], dim=1)
        pos = v.positional_embedding
        old = int(math.isqrt(pos.shape[0] - 1))
        grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, (side, side), mode="bilinear")
        pos = torch.cat([pos[:1], grid.reshape(-1, side * side).t()], dim=0)
        x = _ln(x + pos, v.ln_pre)
        x_ori = x.clone()
        for block in v.transformer.resblocks:
            h = _ln(x_ori, block.ln_1)
            qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
            q, k, val = (_heads(t, heads) for t in qkv.chunk(3, dim=-1))
            x_ori = x_ori + _out(block.attn, _attend(q, k, val))
            x_ori = x_ori + _mlp(block, _ln(x_ori, block.ln_2))
            x = x + _out(block.attn, _attend(val, val, val))
        g = x_ori[:, 0] @ v.proj
        patches = _ln(x, v.ln_post)[:, 1:] @ v.proj
        return g, patches

    # ---------------------------------------------------------------- text
    def encode_text(self, prompts: torch.Tensor) -> torch.Tensor:
        """(P, 77, W) prompt embeddings -> normalised features (P, E)."""
        eot = torch.full((prompts.shape[0],), self.cfg.prompt.eot_index, device=prompts.device)
        x = _encode_text(self.m, prompts, eot)
        return x / x.norm(dim=-1, keepdim=True)

    def text_features(self, proto_n, proto_a, z) -> torch.Tensor:
        m, p = self.m, self.cfg.prompt
        emb = m.clip.text.token_embedding.weight
        ids = [p.sot_token] + [0] * p.n_ctx + [p.period_token, p.eot_token]
        ids += [0] * (self.cfg.text.context_length - len(ids))
        base = emb[torch.tensor(ids, device=emb.device)]  # (77, W)
        k, s = p.context_tokens, p.state_tokens
        per_sample = []
        for r in range(z.shape[0]):  # one prompt pair per sample, as in the reference loop
            bias = m.prompt.vae_decoder(z[r])
            pair = []
            for ctx, proto in (
                (m.prompt.ctx_pos[0, 0], proto_a[0]),
                (m.prompt.ctx_neg[0, 0], proto_n[0]),
            ):
                learned = torch.cat([ctx[:k], ctx[k : k + s] + proto, ctx[k + s :] + bias], dim=0)
                pair.append(torch.cat([base[:1], learned, base[1 + p.n_ctx :]], dim=0))
            per_sample.append(self.encode_text(torch.stack(pair)))  # (2, E)
        feats = torch.stack(per_sample, dim=1)  # (2, R, E)
        feats = feats.mean(dim=1)
        return feats / feats.norm(dim=-1, keepdim=True)  # (2, E)

    # ---------------------------------------------------------------- head
    @torch.no_grad()
    def __call__(
        self, image: torch.Tensor, z: torch.Tensor | None = None
    ) -> tuple[float, np.ndarray]:
        """One image (1, 3, S, S) -> (score, anomaly map (S, S) as numpy)."""
        m, head = self.m, self.cfg.head
        z = m.class_samples if z is None else z
        g, patches = self.vision(image)
        k = head.neighbour_kernel
        side = int(math.isqrt(patches.shape[1]))
        grid = patches.transpose(1, 2).reshape(1, -1, side, side)
        avg = F.avg_pool2d(grid, k, 1, k // 2).flatten(2).transpose(1, 2)  # (1, N, E)
        ex = m.prompt.extractor

        def extract(t):
            q = t.unsqueeze(0)
            mh = torch.nn.functional.multi_head_attention_forward
            att, _ = mh(
                _ln(q, ex.ln_1).transpose(0, 1),
                _ln(avg, ex.ln_1).transpose(0, 1),
                _ln(avg, ex.ln_1).transpose(0, 1),
                q.shape[-1],
                self.cfg.prompt.extractor_heads,
                ex.attn.in_proj_weight,
                ex.attn.in_proj_bias,
                None,
                None,
                False,
                0.0,
                ex.attn.out_proj.weight,
                ex.attn.out_proj.bias,
                training=False,
                need_weights=False,
            )
            x = q + att.transpose(0, 1)
            return x + _mlp(ex, _ln(x, ex.ln_2))

        proto_n, proto_a = extract(m.prompt.t_n), extract(m.prompt.t_a)
        d_n = (1 - F.cosine_similarity(avg.unsqueeze(2), proto_n.unsqueeze(1), dim=-1)).min(2)[0]
        d_a = (1 - F.cosine_similarity(avg.unsqueeze(2), proto_a.unsqueeze(1), dim=-1)).min(2)[0]
        text = self.text_features(proto_n, proto_a, z)  # (2, E)
        pf = avg / avg.norm(dim=-1, keepdim=True)
        probs = ((pf @ text.t()) / head.tau).softmax(-1)  # (1, N, 2)
        dn = (d_n - d_n.min()) / (d_n.max() - d_n.min())
        da = 1 - (d_a - d_a.min()) / (d_a.max() - d_a.min())
        probs = probs * (head.alpha * dn + (1 - head.alpha) * da).unsqueeze(-1)
        size = image.shape[-1]
        full = F.interpolate(probs.reshape(1, side, side, 2).permute(0, 3, 1, 2), (size, size))
        amap = gaussian_filter(full[0, 1].float().cpu().numpy(), sigma=head.sigma)  # CPU SciPy
        gi = g / g.norm(dim=-1, keepdim=True)
        img = ((gi @ text.t()) / head.tau).softmax(-1)[0, 1]
        score = head.beta * img + (1 - head.beta) * probs[0, :, 1].max()
        return float(score), amap


class AnomalyClipReferenceEager(ReferenceEager):
    """AnomalyCLIP's test.py on an ``AnomalyClipModel``'s weights: the text features once (as
    test.py computes them before its loop), then per image the V-V vision tower with explicit
    attention, each feature layer's softmax upsampled (both channels, bilinear), the layer maps
    summed and blurred by SciPy on the CPU."""

    def __init__(self, model: AnomalyClipModel) -> None:
        self.m = model
        self.cfg = model.cfg
        pl = model.prompt
        prompts = torch.stack(
            [
                torch.cat([pl.token_prefix_pos, pl.ctx_pos, pl.token_suffix_pos], dim=2)[0, 0],
                torch.cat([pl.token_prefix_neg, pl.ctx_neg, pl.token_suffix_neg], dim=2)[0, 0],
            ]
        )
        ids = torch.cat([pl.tokenized_prompts_pos[0], pl.tokenized_prompts_neg[0]])
        with torch.no_grad():
            text = _encode_text(model, prompts, ids.argmax(dim=-1)).float()
        self.text = text / text.norm(dim=-1, keepdim=True)  # (2, E)

    def vision_layers(self, image: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(1, 3, S, S) -> image feature (1, E) and ln_post(tokens) @ proj per feature layer."""
        v, vcfg = self.m.clip.visual, self.cfg.vision
        x = F.conv2d(image, v.conv1.weight, stride=vcfg.patch_size)
        side = x.shape[-1]
        x = x.reshape(1, x.shape[1], -1).permute(0, 2, 1)
        x = torch.cat([v.class_embedding.reshape(1, 1, -1), x], dim=1)
        pos = v.positional_embedding
        old = int(math.isqrt(pos.shape[0] - 1))
        grid = pos[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, (side, side), mode="bilinear", align_corners=False)
        pos = torch.cat([pos[:1], grid.reshape(-1, side * side).t()], dim=0)
        x_ori = _ln(x + pos, v.ln_pre)
        x_vv = None
        first_dual = vcfg.layers - vcfg.v_vv_layers
        feats = []
        for i, block in enumerate(v.transformer.resblocks):
            h = _ln(x_ori, block.ln_1)
            qkv = F.linear(h, block.attn.in_proj_weight, block.attn.in_proj_bias)
            q, k, val = (_heads(t, vcfg.heads) for t in qkv.chunk(3, dim=-1))
            if i >= first_dual:
                x_vv = x_ori if x_vv is None else x_vv  # both streams start at the first V-V block
                x_vv = x_vv + _out(block.attn, _attend(val, val, val))
            x_ori = x_ori + _out(block.attn, _attend(q, k, val))
            x_ori = x_ori + _mlp(block, _ln(x_ori, block.ln_2))
            if i + 1 in vcfg.feature_layers:
                feats.append(_ln(x_ori if x_vv is None else x_vv, v.ln_post) @ v.proj)
        return x_ori[:, 0] @ v.proj, feats

    @torch.no_grad()
    def __call__(
        self, image: torch.Tensor, z: torch.Tensor | None = None
    ) -> tuple[float, np.ndarray]:
        """One image (1, 3, S, S) -> (score, anomaly map (S, S) as numpy); ``z`` is unused."""
        tau, size = self.cfg.head.tau, image.shape[-1]
        g, feats = self.vision_layers(image)
        gi = g / g.norm(dim=-1, keepdim=True)
        score = ((gi @ self.text.t()) / tau).softmax(-1)[0, 1]
        total = None
        for tokens in feats:
            pf = tokens / tokens.norm(dim=-1, keepdim=True)
            probs = ((pf @ self.text.t()) / tau).softmax(-1)[:, 1:]  # (1, N, 2), CLS dropped
            side = int(math.isqrt(probs.shape[1]))
            grid = probs.reshape(1, side, side, 2).permute(0, 3, 1, 2)
            up = F.interpolate(grid, (size, size), mode="bilinear", align_corners=False)
            layer = (up[0, 1] + 1 - up[0, 0]) / 2
            total = layer if total is None else total + layer
        amap = gaussian_filter(total.float().cpu().numpy(), sigma=self.cfg.head.sigma)
        return float(score), amap
