"""Deploy graphs: each restructuring of CopsModel is exact (tiny model, max diff < 1e-5)."""

from __future__ import annotations

import pytest
import torch

from cops_deploy import create_model
from cops_deploy.errors import ConfigError
from cops_deploy.export.graphs import (
    DeployModel,
    HeadGraph,
    VisionGraph,
    example_inputs,
)
from cops_deploy.model.clip import causal_mask
from cops_deploy.model.cops import CopsOutput
from cops_deploy.runtime.contract import graph_specs

TOL = 1e-5


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


@pytest.fixture(scope="module")
def model():
    return create_model("cops-tiny", seed=0)


@pytest.fixture(scope="module")
def images(model):
    gen = torch.Generator().manual_seed(1)
    s = model.cfg.vision.input_size
    return torch.randn(3, 3, s, s, generator=gen)


@pytest.fixture(scope="module")
def reference(model, images):
    with torch.no_grad():
        return model.forward_intermediates(images)


@pytest.fixture(scope="module", params=["explicit", "sdpa"])
def deploy(model, request):
    """Both attention forms: "explicit" is what is exported, "sdpa" the torch backend."""
    return DeployModel(model, attn_impl=request.param).eval()


def test_vision_graph_equals_model(deploy, images, reference):
    with torch.no_grad():
        g, patches = deploy.vision(images)
    assert g.shape == reference.image_embedding.shape
    assert patches.shape == reference.patch_embedding.shape
    assert maxdiff(g, reference.image_embedding) < TOL
    assert maxdiff(patches, reference.patch_embedding) < TOL


def test_head_graph_equals_model(deploy, reference):
    with torch.no_grad():
        score, amap = deploy.head(reference.image_embedding, reference.patch_embedding)
    assert maxdiff(score, reference.pred_score) < TOL
    assert maxdiff(amap, reference.anomaly_map) < TOL


def test_deploy_model_equals_model(deploy, images, reference):
    with torch.no_grad():
        out = deploy(images)
    assert isinstance(out, CopsOutput)
    assert maxdiff(out.pred_score, reference.pred_score) < TOL
    assert maxdiff(out.anomaly_map, reference.anomaly_map) < TOL


def test_prototypes_both_query_sets_in_one_pass(deploy, reference):
    with torch.no_grad():
        proto_n, proto_a = deploy.head._prototypes(reference.patch_embedding_avg)
    assert maxdiff(proto_n, reference.proto_n) < TOL
    assert maxdiff(proto_a, reference.proto_a) < TOL


def test_shared_prefix_text_equals_77_token_per_sample_model(deploy, reference):
    """The shared-prefix, 17-token text path equals CopsModel's 77-token per-sample path."""
    long = create_model("cops-tiny", seed=0, text_length=77)
    b = reference.proto_n.shape[0]
    with torch.no_grad():
        ours = deploy.head._text_features(reference.proto_n, reference.proto_a)
        full = long.text_features(reference.proto_n, reference.proto_a, long.class_bias(b))
    assert maxdiff(ours, full) < TOL
    assert maxdiff(ours, reference.text_features) < TOL


def test_prefix_keys_values_do_not_depend_on_the_image(model, deploy, reference):
    """Positions 0..K: each layer's k, v inside the full 77-token run equal the constants,
    whatever the prototypes (two different images)."""
    text = model.clip.text
    deep = model.deep_tokens()
    pre = deploy.head.prefix_len
    bias = model.class_bias(2)
    protos = torch.stack([reference.proto_n[0], reference.proto_n[1]]), reference.proto_a[:2]
    with torch.no_grad():
        prompts = model.build_prompts(*protos, bias)  # (2, 2, R, 17, W)
        x = prompts.flatten(0, 2)
        x = x + text.positional_embedding[: x.shape[1]]
        mask = causal_mask(x.shape[1])
        for i, block in enumerate(text.transformer.resblocks):
            if i in deep:
                tok = deep[i].expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], tok, x[:, 1 + tok.shape[1] :]], dim=1)
            _, k, v = block.attn.qkv(block.ln_1(x))  # (2*2*R, H, L, D)
            k = k[:, :, :pre].unflatten(0, (2, 2, -1))  # (B, channel, R, H, K+1, D)
            v = v[:, :, :pre].unflatten(0, (2, 2, -1))
            const_k = getattr(deploy.head, f"prefix_k{i}")  # (channel, H, K+1, D)
            const_v = getattr(deploy.head, f"prefix_v{i}")
            assert maxdiff(k, const_k[None, :, None].expand_as(k)) < TOL, i
            assert maxdiff(v, const_v[None, :, None].expand_as(v)) < TOL, i
            x = block(x, mask)


@pytest.mark.parametrize(
    "overrides",
    [
        {"vision.v_vv_layers": 1, "vision.feature_layers": [1]},  # plain block; V-VV stops early
        {"vision.feature_layers": [1, 2]},  # averaged feature layers
        {"head.neighbour_kernel": 3, "head.samples": 3, "head.alpha": 0.26},
    ],
    ids=["plain-block-early-features", "two-feature-layers", "kernel3-R3"],
)
def test_restructuring_exact_on_variants(overrides):
    model = create_model("cops-tiny", seed=2, **overrides)
    images = example_inputs("vision", model.cfg, batch=2, seed=3)[0]
    with torch.no_grad():
        ref = model(images)
        out = DeployModel(model, attn_impl="explicit")(images)
    assert maxdiff(out.pred_score, ref.pred_score) < TOL
    assert maxdiff(out.anomaly_map, ref.anomaly_map) < TOL


def test_batch_invariant(deploy, images):
    with torch.no_grad():
        batch = deploy(images)
        alone = [deploy(images[i : i + 1]) for i in range(images.shape[0])]
    for i, one in enumerate(alone):
        assert maxdiff(batch.pred_score[i], one.pred_score[0]) < 1e-6
        assert maxdiff(batch.anomaly_map[i], one.anomaly_map[0]) < 1e-6


def test_graphs_share_weights_and_keep_constants(model, deploy):
    vision = deploy.vision
    assert vision.conv1.weight is model.clip.visual.conv1.weight
    grid = model.cfg.vision.grid
    assert vision.positions.shape == (grid * grid + 1, model.cfg.vision.width)
    assert torch.equal(vision.positions, model.clip.visual.positions(grid))
    head = deploy.head
    n = head.state_len + head.samples * head.tail_len
    assert head.text_mask.shape == (n, head.prefix_len + n)
    assert head.eot_mask.shape == (head.samples, head.prefix_len + n)


def test_graphs_are_float32_in_and_out(deploy, images):
    with torch.no_grad():
        outputs = (*deploy.vision(images[:1]), *deploy(images[:1]))
    assert all(t.dtype == torch.float32 for t in outputs)


def test_graphs_refuse_unknown_attention(model):
    with pytest.raises(ConfigError, match="attn_impl must be one of"):
        VisionGraph(model, attn_impl="flash")


def test_exported_form_is_explicit(model):
    assert VisionGraph(model).attn_impl == HeadGraph(model).attn_impl == "explicit"
    deploy = DeployModel(model)  # the torch backend: the faster form per graph
    assert (deploy.vision.attn_impl, deploy.head.attn_impl) == ("sdpa", "explicit")


def test_head_refuses_per_batch_sampling():
    model = create_model("cops-tiny", seed=0, sampling="per_batch")
    with pytest.raises(ConfigError, match="sampling='fixed'"):
        HeadGraph(model)


def test_head_refuses_deep_tokens_reaching_the_state_block():
    model = create_model("cops-tiny", seed=0, **{"prompt.deep_token_length": 7})
    with pytest.raises(ConfigError, match="deep_token_length 7 exceeds"):
        HeadGraph(model)


def test_graph_specs_contract(model):
    cfg = model.cfg
    s, e, n = cfg.vision.input_size, cfg.embed_dim, cfg.vision.grid**2
    v_in, v_out = graph_specs("vision", cfg)
    h_in, h_out = graph_specs("head", cfg)
    assert [t.name for t in v_in] == list(VisionGraph.input_names) == ["image"]
    assert [t.name for t in v_out] == list(VisionGraph.output_names)
    assert [t.name for t in h_in] == list(HeadGraph.input_names) == [t.name for t in v_out]
    assert [t.name for t in h_out] == ["pred_score", "anomaly_map"]
    assert v_in[0].shape == ("batch", 3, s, s)
    assert v_out[1].shape == ("batch", n, e)
    assert h_out[1].shape == ("batch", s, s)
    assert {t.dtype for t in (*v_in, *v_out, *h_in, *h_out)} == {"float32"}


def test_graph_specs_unknown_name(model):
    with pytest.raises(ConfigError, match="unknown deploy graph 'text'"):
        graph_specs("text", model.cfg)


def test_example_inputs_batch_two(model):
    (image,) = example_inputs("vision", model.cfg)
    g, p = example_inputs("head", model.cfg)
    assert image.shape[0] == g.shape[0] == p.shape[0] == 2


@pytest.mark.slow
def test_full_size_restructuring_exact(request):
    """cops-vit-l-14-336 (random weights), one image: the exported (explicit) form is exact."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("full-size model (about a minute on 2 CPU cores); run with -m slow")
    from cops_deploy.export.onnx_export import synthetic_images

    model = create_model("cops-vit-l-14-336", seed=0)
    image = synthetic_images(model.cfg, n=1, seed=7)
    with torch.no_grad():
        ref = model(image)
        out = DeployModel(model, attn_impl="explicit")(image)
    assert maxdiff(out.pred_score, ref.pred_score) < TOL
    assert maxdiff(out.anomaly_map, ref.anomaly_map) < TOL


@pytest.mark.parametrize("attn_impl", ["explicit", "sdpa"])
def test_graphs_build_and_run_on_the_model_device(attn_impl):
    """A model moved to another device (``meta`` stands in for CUDA) builds its deploy graphs
    there: every constant (prompt masks, EOT rows, the folding inputs) on the weights' device,
    and a forward pass meets no CPU tensor (gpu_check builds DeployModel after .to("cuda"))."""
    from cops_deploy.export.fp16 import to_fp16

    model = create_model("cops-tiny", seed=0).to("meta")
    deploy = DeployModel(model, attn_impl=attn_impl).eval()
    tensors = [*deploy.buffers(), *deploy.parameters()]
    assert {t.device.type for t in tensors} == {"meta"}
    s = model.cfg.vision.input_size
    images = torch.empty(2, 3, s, s, device="meta")
    with torch.no_grad():
        out = deploy(images)
        deploy.vision, deploy.head = to_fp16(deploy.vision), to_fp16(deploy.head)
        half = deploy(images)
    for o in (out, half):
        assert o.anomaly_map.device.type == "meta" and o.anomaly_map.shape == (2, s, s)
        assert o.pred_score.shape == (2,) and o.pred_score.dtype == torch.float32
