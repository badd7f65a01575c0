"""The model built from ../shared/golden reproduces the reference implementation's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from golden_support import golden_model as load_golden_model

from cops_deploy import create_model

ARRAYS = [
    "image_embedding",
    "patch_embedding_avg",
    "proto_n",
    "proto_a",
    "d_n",
    "d_a",
    "text_features",
    "probs_weighted",
    "anomaly_map",
    "pred_score",
]
TOL = 1e-5


@pytest.fixture(scope="module")
def golden_model(golden):
    return load_golden_model(golden)


def test_golden_architecture_is_cops_tiny(golden):
    case = json.loads((golden / "case.json").read_text())
    cfg = create_model("cops-tiny").cfg
    arch = case["architecture"]
    assert cfg.vision.width == arch["vision_width"]
    assert cfg.vision.layers == arch["vision_layers"]
    assert cfg.vision.image_size == arch["image_resolution"]
    assert cfg.text.heads == arch["transformer_heads"]
    assert cfg.text.layers == arch["transformer_layers"]
    assert cfg.vision.input_size == case["input_size"]


@pytest.mark.parametrize("index", [0, 1, 2])
def test_golden_case(golden_model, index):
    model, cases = golden_model
    image = torch.from_numpy(cases["images"][index : index + 1])
    z = torch.from_numpy(cases["z"][index])
    with torch.no_grad():
        out = model.forward_intermediates(image, z=z)
    for name in ARRAYS:
        got = getattr(out, name)[0].numpy()
        want = cases[name][index]
        assert got.shape == want.shape, name
        err = float(np.abs(got - want).max())
        assert err <= TOL, f"{name}: max difference {err:.2e} > {TOL}"


def test_golden_needs_fp16_deep_tokens(golden_model):
    """The reference rounds deep tokens to fp16; without it the text features drift > 1e-5."""
    model, cases = golden_model
    exact = create_model(model.cfg.replace(**{"prompt.deep_token_fp16_round": False}), seed=None)
    exact.load_state_dict(model.state_dict())
    image = torch.from_numpy(cases["images"][:1])
    with torch.no_grad():
        out = exact.forward_intermediates(image, z=torch.from_numpy(cases["z"][0]))
    assert np.abs(out.text_features[0].numpy() - cases["text_features"][0]).max() > TOL
