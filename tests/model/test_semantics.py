"""Each METHOD.md rule, checked against an independent straightforward implementation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cops_deploy import create_model
from cops_deploy.model.clip import causal_mask
from cops_deploy.model.layers import scaled_attention

TOL = 1e-5


def _layer_norm(x, ln):
    return F.layer_norm(x, (x.shape[-1],), ln.weight, ln.bias, ln.eps)


def _mha_heads(x, w, b, heads):
    """Split the in-projection into per-head q, k, v, all (B, H, L, D), by hand."""
    bsz, length, width = x.shape
    qkv = x @ w.t() + b
    q, k, v = qkv[..., :width], qkv[..., width : 2 * width], qkv[..., 2 * width :]
    d = width // heads

    def split(t):
        return t.reshape(bsz, length, heads, d).permute(0, 2, 1, 3)

    return split(q), split(k), split(v)


def _merge(t, out_proj):
    bsz, heads, length, d = t.shape
    return (
        t.permute(0, 2, 1, 3).reshape(bsz, length, heads * d) @ out_proj.weight.t() + out_proj.bias
    )


def reference_vvv_block(block, x, x_ori, heads):
    """METHOD.md section 1, written out: one V-VV dual-path block."""
    h = _layer_norm(x_ori, block.ln_1)
    q, k, v = _mha_heads(h, block.attn.in_proj_weight, block.attn.in_proj_bias, heads)
    d = q.shape[-1]
    ori = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    vv = torch.softmax(v @ v.transpose(-1, -2) / math.sqrt(d), dim=-1) @ v
    x_ori = x_ori + _merge(ori, block.attn.out_proj)
    hidden = _layer_norm(x_ori, block.ln_2) @ block.mlp.c_fc.weight.t() + block.mlp.c_fc.bias
    hidden = hidden * torch.sigmoid(1.702 * hidden)
    x_ori = x_ori + hidden @ block.mlp.c_proj.weight.t() + block.mlp.c_proj.bias
    x = x + _merge(vv, block.attn.out_proj)
    return x, x_ori


def _qkv(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, 7, 8, generator=gen).to(dtype) for _ in range(3))


def test_scaled_attention_forms_agree_with_the_formula():
    """softmax((q * scale) k^T + mask) v: explicit = sdpa = by hand; the float32 softmax
    changes nothing for float32 inputs (what the deploy graphs rely on)."""
    q, k, v = _qkv()
    mask = causal_mask(7)
    want = ((q * 0.3) @ k.transpose(-2, -1) + mask).softmax(-1) @ v
    explicit = scaled_attention(q, k, v, 0.3, mask, "explicit")
    assert float((explicit - want).abs().max()) < TOL
    assert float((scaled_attention(q, k, v, 0.3, mask, "sdpa") - want).abs().max()) < TOL
    island = scaled_attention(q, k, v, 0.3, mask, "explicit", float32_softmax=True)
    assert torch.equal(island, explicit)


def test_scaled_attention_float32_softmax_in_half_precision():
    """float16 inputs: the result is float16 and within float16 rounding of the float32 one
    (explicit with its float32 softmax, and sdpa with the float32 mask cast to float16)."""
    q, k, v = _qkv()
    mask = causal_mask(7)
    want = scaled_attention(q, k, v, 0.3, mask, "explicit")
    half = [t.half() for t in (q, k, v)]
    island = scaled_attention(*half, 0.3, mask, "explicit", float32_softmax=True)
    assert island.dtype == torch.float16
    assert float((island.float() - want).abs().max()) < 5e-3
    sdpa = scaled_attention(*half, 0.3, mask, "sdpa")  # the mask is cast to q's dtype
    assert sdpa.dtype == torch.float16 and float((sdpa.float() - want).abs().max()) < 5e-3


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_vvv_block_matches_straightforward(impl):
    model = create_model("cops-tiny", seed=1, attn_impl=impl)
    block = model.clip.visual.transformer.resblocks[0]
    heads = model.cfg.vision.heads
    torch.manual_seed(0)
    x = torch.randn(2, 50, model.cfg.vision.width)
    x_ori = torch.randn(2, 50, model.cfg.vision.width)
    with torch.no_grad():
        got = block.forward_dual(x, x_ori)
        want = reference_vvv_block(block, x, x_ori, heads)
    assert torch.allclose(got[0], want[0], atol=TOL, rtol=0)
    assert torch.allclose(got[1], want[1], atol=TOL, rtol=0)


def test_vvv_path_starts_from_ln_pre_and_reads_original_path(tiny_model):
    """Both paths start at the ln_pre output; the V-VV path only accumulates attention."""
    visual = tiny_model.clip.visual
    torch.manual_seed(0)
    images = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        x = x_ori = visual.tokens(images)
        for block in visual.transformer.resblocks:
            x, x_ori = reference_vvv_block(block, x, x_ori, tiny_model.cfg.vision.heads)
        g = x_ori[:, 0] @ visual.proj
        p = _layer_norm(x[:, 1:], visual.ln_post) @ visual.proj
        out = visual(images)
    assert torch.allclose(out.image_embedding, g, atol=TOL, rtol=0)
    assert torch.allclose(out.patch_embedding, p, atol=TOL, rtol=0)


def test_positions_resized_bilinear_not_bicubic(tiny_model):
    visual = tiny_model.clip.visual
    table = visual.positions(7)
    old = visual.positional_embedding
    grid = old[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    bil = F.interpolate(grid, (7, 7), mode="bilinear", align_corners=False)
    bic = F.interpolate(grid, (7, 7), mode="bicubic", align_corners=False)
    flat = table[1:].t().reshape(1, -1, 7, 7)
    assert torch.equal(table[0], old[0])
    assert torch.allclose(flat, bil, atol=1e-6)
    assert not torch.allclose(flat, bic, atol=1e-4)


def _prompt_inputs(model, batch=2):
    torch.manual_seed(3)
    e = model.cfg.embed_dim
    p = model.cfg.prompt.prototypes
    return torch.randn(batch, p, e), torch.randn(batch, p, e), model.class_bias(batch)


def test_text_tower_17_tokens_equals_77():
    short = create_model("cops-tiny", seed=2)
    full = create_model("cops-tiny", seed=2, text_length=77)
    proto_n, proto_a, bias = _prompt_inputs(short)
    with torch.no_grad():
        a = short.text_features(proto_n, proto_a, bias)
        b = full.text_features(proto_n, proto_a, bias)
    assert short.build_prompts(proto_n, proto_a, bias).shape[-2] == 17
    assert full.build_prompts(proto_n, proto_a, bias).shape[-2] == 77
    assert torch.allclose(a, b, atol=TOL, rtol=0)


def test_deep_tokens_in_layers_2_to_9_positions_1_to_4(tiny_model):
    """Re-run the text tower by hand with deep tokens in 1-based layers 2..9 at 1..4."""
    model = tiny_model
    text = model.clip.text
    proto_n, proto_a, bias = _prompt_inputs(model, batch=1)
    prompts = model.build_prompts(proto_n, proto_a, bias).reshape(-1, 17, model.cfg.text.width)
    deep = [t.half().float() for t in model.prompt.compound_prompts_text]

    def run(layers_1based):
        x = prompts + text.positional_embedding[:17]
        mask = causal_mask(17)
        for i, block in enumerate(text.transformer.resblocks, start=1):
            if i in layers_1based:
                tok = deep[layers_1based.index(i)].expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], tok, x[:, 5:]], dim=1)
            x = block(x, mask)
        return text.ln_final(x[:, 16]) @ text.text_projection

    with torch.no_grad():
        got = text(prompts, model.cfg.prompt.eot_index, model.deep_tokens())
        want = run(list(range(2, 10)))
        shifted = run(list(range(1, 9)))
    assert model.cfg.prompt.deep_layers == tuple(range(1, 9))  # 0-based
    assert torch.allclose(got, want, atol=TOL, rtol=0)
    assert not torch.allclose(got, shifted, atol=1e-3)


def test_prompt_layout_and_anomaly_channel(tiny_model):
    """Channel 1 ('neg', the anomaly channel) carries ctx_neg and the NORMAL prototypes."""
    model = tiny_model
    proto_n, proto_a, bias = _prompt_inputs(model, batch=1)
    prompts = model.build_prompts(proto_n, proto_a, bias)  # (B, 2, R, L, W)
    emb = model.clip.text.token_embedding.weight
    ctx_pos, ctx_neg = model.prompt.ctx_pos[0, 0], model.prompt.ctx_neg[0, 0]
    r = 3
    for ch, ctx, proto in ((0, ctx_pos, proto_a), (1, ctx_neg, proto_n)):
        seq = prompts[0, ch, r]
        assert torch.equal(seq[0], emb[49406])  # SOT
        assert torch.allclose(seq[1:7], ctx[:6])  # context K=6
        assert torch.allclose(seq[7:13], ctx[6:12] + proto[0])  # state M=6
        assert torch.allclose(seq[13:15], ctx[12:14] + bias[0, r])  # class tokens, same bias
        assert torch.equal(seq[15], emb[269]) and torch.equal(seq[16], emb[49407])


def test_period_and_special_token_ids_match_clip_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    tokens = open_clip.tokenize(["X X X X X X X X X X X X X X."])[0]
    cfg = create_model("cops-tiny").cfg.prompt
    assert tokens[0].item() == cfg.sot_token
    assert tokens[15].item() == cfg.period_token
    assert tokens[16].item() == cfg.eot_token
    assert int(tokens.argmax()) == cfg.eot_index


def test_anomaly_map_and_score_use_channel_1(tiny_model):
    torch.manual_seed(5)
    images = torch.randn(1, 3, 98, 98)
    with torch.no_grad():
        out = tiny_model.forward_intermediates(images)
    from cops_deploy.model.head import gaussian_blur, upsample_nearest

    amap = gaussian_blur(upsample_nearest(out.probs_weighted[..., 1], 98), 4.0)
    assert torch.allclose(out.anomaly_map, amap, atol=1e-7)
    head = tiny_model.cfg.head
    img = out.image_logits.softmax(-1)[:, 1]
    score = head.beta * img + (1 - head.beta) * out.probs_weighted[..., 1].amax(-1)
    assert torch.allclose(out.pred_score, score, atol=1e-7)


def test_gaussian_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    from cops_deploy.model.head import gaussian_blur

    torch.manual_seed(0)
    maps = torch.rand(2, 98, 70)
    got = gaussian_blur(maps, 4.0)
    for i in range(2):
        want = ndimage.gaussian_filter(maps[i].double().numpy(), sigma=4)
        assert float((got[i].double() - torch.from_numpy(want)).abs().max()) < 1e-6


def test_batch_of_three_equals_each_alone(tiny_model):
    torch.manual_seed(7)
    images = torch.randn(3, 3, 98, 98)
    with torch.no_grad():
        batch = tiny_model(images)
        for i in range(3):
            one = tiny_model(images[i : i + 1])
            assert float((batch.anomaly_map[i] - one.anomaly_map[0]).abs().max()) < 1e-5
            assert float((batch.pred_score[i] - one.pred_score[0]).abs()) < 1e-5


def test_two_runs_identical(tiny_model):
    torch.manual_seed(8)
    images = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        a, b = tiny_model(images), tiny_model(images)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.pred_score, b.pred_score)


def test_fixed_samples_are_seeded_and_per_batch_mode_draws():
    a = create_model("cops-tiny", seed=0)
    b = create_model("cops-tiny", seed=0)
    assert torch.equal(a.class_samples, b.class_samples)
    assert a.class_samples.shape == (10, 96)
    per_batch = create_model("cops-tiny", seed=0, sampling="per_batch")
    torch.manual_seed(1)
    first = per_batch.class_bias(2)
    second = per_batch.class_bias(2)
    assert not torch.equal(first, second)
    assert not torch.equal(first[0], first[1])  # a fresh draw per image


def test_output_names_and_shapes(tiny_model):
    with torch.no_grad():
        out = tiny_model(torch.zeros(2, 3, 98, 98))
    assert out._fields == ("pred_score", "anomaly_map")
    assert out.pred_score.shape == (2,) and out.anomaly_map.shape == (2, 98, 98)
