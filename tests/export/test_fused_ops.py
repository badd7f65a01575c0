"""The ONNX Runtime variant: the fused attention op, its export, and weight sharing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cops_deploy import create_model
from cops_deploy.errors import ConfigError
from cops_deploy.export import graphs as g
from cops_deploy.export.fused_ops import fused_attention
from cops_deploy.export.onnx_export import (
    ExportError,
    export_onnx,
    export_ort_variant,
    run_onnxruntime,
    share_external_data,
    synthetic_images,
)


@pytest.mark.parametrize("lq", [1, 7])
def test_fused_attention_eager_equals_sdpa(lq: int) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, lq, 32, generator=gen)
    k, v = torch.randn(2, 2, 7, 32, generator=gen)
    got = fused_attention(q, k, v, 4, 0.3)
    split = [t.unflatten(-1, (4, 8)).transpose(1, 2) for t in (q, k, v)]
    want = torch.nn.functional.scaled_dot_product_attention(*split, scale=0.3)
    torch.testing.assert_close(got, want.transpose(1, 2).flatten(-2), atol=1e-6, rtol=0)


def test_vision_graph_with_fused_attention_equals_explicit() -> None:
    model = create_model("cops-tiny", seed=0).eval()
    images = synthetic_images(model.cfg, n=2, seed=3)
    with torch.no_grad():
        fused = g.VisionGraph(model, attn_impl=g.FUSED_ATTN)(images)
        explicit = g.VisionGraph(model, attn_impl="explicit")(images)
    for a, b in zip(fused, explicit, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_fused_attention_is_vision_only() -> None:
    model = create_model("cops-tiny", seed=0)
    with pytest.raises(ConfigError, match="attn_impl must be one of .* for HeadGraph"):
        g.HeadGraph(model, attn_impl=g.FUSED_ATTN)


@pytest.fixture(scope="module")
def portable(tmp_path_factory):
    root = tmp_path_factory.mktemp("variant")
    model = create_model("cops-tiny", seed=0).eval()
    path = export_onnx(
        g.VisionGraph(model), root / "vision.onnx", g.example_inputs("vision", model.cfg)
    )
    return model, path


def test_variant_shares_weights_and_matches(portable) -> None:
    import onnx

    from cops_deploy.export.bundle_writer import onnx_external_data_files

    model, base = portable
    out = base.parent / "vision.ort.onnx"
    vision = g.VisionGraph(model, attn_impl=g.FUSED_ATTN)
    export_ort_variant(vision, base, out, g.example_inputs("vision", model.cfg))
    # The variant's own weights file (and its temp folder) are gone.
    names = sorted(p.name for p in base.parent.iterdir())
    assert names == ["vision.onnx", "vision.onnx.data", "vision.ort.onnx"]
    assert onnx_external_data_files(out) == ["vision.onnx.data"]
    ops = {n.op_type for n in onnx.load(out, load_external_data=False).graph.node}
    assert "MultiHeadAttention" in ops and "Softmax" not in ops
    images = synthetic_images(model.cfg, n=3, seed=4).numpy()
    a = run_onnxruntime(base, {"image": images})
    b = run_onnxruntime(out, {"image": images})
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-5, rtol=0)


def test_variant_with_other_weights_is_refused(portable, tmp_path) -> None:
    _, base = portable
    other = create_model("cops-tiny", seed=1).eval()
    ex = g.example_inputs("vision", other.cfg)
    exported = export_onnx(g.VisionGraph(other, attn_impl=g.FUSED_ATTN), tmp_path / "v.onnx", ex)
    with pytest.raises(ExportError, match="has no byte-identical twin"):
        share_external_data(exported, base, base.parent / "other.ort.onnx")
    assert not (base.parent / "other.ort.onnx").exists()
    with pytest.raises(ConfigError, match="must sit beside"):
        share_external_data(exported, base, tmp_path / "elsewhere.onnx")
