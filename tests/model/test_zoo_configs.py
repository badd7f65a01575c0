"""The paper's backbone table (Table S3) as registered architectures: each row resolves by name
(``NAME@SIZE`` for the input size), matches the OpenAI CLIP key layout of its weights file at
full shape, loads a file written in that layout, and runs with the positional table resized from
the weights' grid to the input grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from zoo_support import BACKBONES, NARROW, open_clip_model, require_slow, write_openai_file

from cops_deploy import create_model, list_models
from cops_deploy.configs import add_config, get_config, split_input_size
from cops_deploy.configs.paper import TABLE_S3
from cops_deploy.errors import ConfigError
from cops_deploy.model.clip import ClipModel
from cops_deploy.model.cops import CopsModel
from cops_deploy.model.weights import check_state_dict

ROW_IDS = [r.model for r in TABLE_S3]


# ---------------------------------------------------------------------------------------------
# names and sizes


@pytest.mark.parametrize("row", TABLE_S3, ids=ROW_IDS)
def test_each_row_resolves_to_its_backbone_and_size(row):
    cfg = get_config(row.model)
    name, oc_name, openai_file, image_size = BACKBONES[row.backbone]
    assert cfg.vision.input_size == cfg.preprocess.size == row.input_size
    assert cfg.vision.image_size == image_size
    assert cfg.clip_pretrained == {
        "open_clip_model": oc_name,
        "open_clip_tag": "openai",
        "openai_file": openai_file,
    }
    assert cfg.vision.grid == row.input_size // cfg.vision.patch_size
    assert split_input_size(row.model) == (name, row.input_size)


def test_registered_backbones():
    assert {"cops-vit-b-16-224", "cops-vit-l-14-224", "cops-vit-l-14-336"} <= set(list_models())


def test_default_name_and_size_suffix():
    default = get_config("cops-vit-l-14-336")
    assert default == get_config("cops-vit-l-14-336@518")  # its own size: the plain name
    assert default.name == "cops-vit-l-14-336" and default.vision.input_size == 518
    big = get_config("cops-vit-l-14-336@700")
    assert big.name == "cops-vit-l-14-336@700"
    assert big.replace() == big  # the resolved config round-trips through its dict
    # only the name and the two sizes differ
    assert big.replace(**{"vision.input_size": 518, "preprocess.size": 518}).to_dict() == (
        default.to_dict() | {"name": "cops-vit-l-14-336@700"}
    )


def test_size_suffix_composes_with_overrides():
    cfg = get_config("cops-vit-b-16-224@448", alpha=0.26)
    assert cfg.vision.input_size == 448 and cfg.head.alpha == 0.26


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "cops-vit-l-14-336@500",
            "invalid input size 500 in model name 'cops-vit-l-14-336@500': 'cops-vit-l-14-336' "
            "has 14-pixel patches, so the input size must be a multiple of 14 (nearest: 490, "
            "504). Fix: ask for 'cops-vit-l-14-336@504'.",
        ),
        ("cops-vit-b-16-224@8", "(nearest: 16). Fix: ask for 'cops-vit-b-16-224@16'."),
        ("cops-vit-b-16-224@340", "(nearest: 336, 352). Fix: ask for 'cops-vit-b-16-224@336'."),
        ("cops-vit-l-14-224@x", "must be a positive whole number of pixels, got 'x'"),
        ("cops-vit-l-14-224@0", "must be a positive whole number of pixels, got '0'"),
        ("cops-vit-l-14-224@-14", "got '-14'"),
        ("cops-vit-l-14-224@", "got ''"),
        ("vit-nope@336", "unknown CoPS model 'vit-nope'; registered models are"),
    ],
)
def test_bad_sizes_refused(name, message):
    with pytest.raises(ConfigError) as info:
        get_config(name)
    assert message in str(info.value)


def test_bare_input_size_override_points_at_the_suffix():
    with pytest.raises(ConfigError, match="name it NAME@SIZE"):
        get_config("cops-vit-l-14-336", input_size=700)


def test_names_with_the_size_separator_cannot_be_registered():
    raw = get_config("cops-tiny").to_dict() | {"name": "my@model"}
    with pytest.raises(ConfigError, match="'@' is reserved for the input size"):
        add_config(raw)


# ---------------------------------------------------------------------------------------------
# full-shape key layout (meta tensors: no memory, no time)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_full_shape_openai_layout_matches_open_clip(backbone):
    cfg = get_config(BACKBONES[backbone][0])
    with torch.device("meta"):
        theirs = open_clip_model(cfg, narrow=False).state_dict()
        ours = ClipModel(cfg).openai_state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in theirs.items()
    }
    check_state_dict({k: v.shape for k, v in ours.items()}, theirs, backbone)  # the loader's check
    grid = cfg.vision.weight_grid
    assert ours["visual.positional_embedding"].shape == (grid * grid + 1, cfg.vision.width)


@pytest.mark.parametrize("backbone", list(BACKBONES))
def test_prompt_sizes_follow_the_reference(backbone):
    """The reference's learned state for its text width C: 12 + 2 prompt tokens, 6 prototypes,
    8 deep tokens of length 4, an extractor and the VAE at width C."""
    cfg = get_config(BACKBONES[backbone][0])
    with torch.device("meta"):
        learned = CopsModel(cfg).prompt.state_dict()
    c = cfg.text.width
    shapes = {k: tuple(v.shape) for k, v in learned.items()}
    assert c == cfg.embed_dim
    assert shapes["ctx_pos"] == shapes["ctx_neg"] == (1, 1, 14, c)
    assert shapes["t_n"] == shapes["t_a"] == (6, c)
    assert [shapes[f"compound_prompts_text.{i}"] for i in range(8)] == [(4, c)] * 8
    assert "compound_prompts_text.8" not in shapes
    assert shapes["extractor.attn.in_proj_weight"] == (3 * c, c)
    assert shapes["vae_decoder.net.0.weight"] == (c, c)
    assert cfg.prompt.deep_layers == tuple(range(1, 9))  # text layers 2..9 (1-based)
    assert c % cfg.prompt.extractor_heads == 0


def test_vit_b_choices_are_stated():
    cfg = get_config("cops-vit-b-16-224")
    assert cfg.prompt.extractor_heads == 8  # the reference's 12 does not divide 512
    assert cfg.vision.v_vv_layers == cfg.vision.layers == 12 and cfg.vision.feature_layers == (12,)
    assert "extractor has 8 heads" in cfg.description


# ---------------------------------------------------------------------------------------------
# loading a file in the OpenAI layout and running at the row's size


def _check_loaded(model, written: dict[str, torch.Tensor]) -> None:
    ours = model.clip.openai_state_dict()
    assert set(ours) == set(written)
    for k, v in written.items():
        assert torch.equal(ours[k], v.float()), k


def _check_positions(model, written: dict[str, torch.Tensor]) -> None:
    """Bilinear resize (align_corners=False) of the file's patch grid; the class row kept."""
    v = model.cfg.vision
    table = written["visual.positional_embedding"].float()
    g, grid = v.weight_grid, v.grid
    patch = table[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    want = F.interpolate(patch, size=(grid, grid), mode="bilinear", align_corners=False)
    want = torch.cat([table[:1], want.flatten(2)[0].t()])
    got = model.clip.visual.positions(grid)
    assert got.shape == (grid * grid + 1, v.width)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("row", TABLE_S3, ids=ROW_IDS)
def test_narrow_stand_in_loads_and_runs_at_the_row_size(row, tmp_path):
    cfg = get_config(row.model).replace(**NARROW)
    path = tmp_path / BACKBONES[row.backbone][2]
    written = write_openai_file(cfg, path, narrow=True)
    model = create_model(cfg, clip_weights=path, seed=0)
    _check_loaded(model, written)
    _check_positions(model, written)
    images = torch.randn(1, 3, row.input_size, row.input_size)
    with torch.no_grad():
        out = model(images)
    assert out.anomaly_map.shape == (1, row.input_size, row.input_size)
    assert torch.isfinite(out.anomaly_map).all() and torch.isfinite(out.pred_score).all()


def _full_size_run(model_name: str, tmp_path: Path) -> None:
    cfg = get_config(model_name)
    path = tmp_path / cfg.clip_pretrained["openai_file"]
    written = write_openai_file(cfg, path, narrow=False)
    model = create_model(model_name, clip_weights=path, seed=0)
    _check_loaded(model, written)
    del written
    _check_positions(model, model.clip.openai_state_dict())
    size = cfg.vision.input_size
    with torch.no_grad():
        out = model(torch.randn(1, 3, size, size))
    assert out.anomaly_map.shape == (1, size, size)
    assert torch.isfinite(out.anomaly_map).all()


def test_vit_b16_full_size_loads_its_openai_file_and_runs(tmp_path):
    _full_size_run("cops-vit-b-16-224@336", tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "row", [r for r in TABLE_S3 if r.backbone != "ViT-B/16@224px"], ids=lambda r: r.model
)
def test_vit_l_full_size_loads_its_openai_file_and_runs(row, tmp_path, request):
    require_slow(request)
    _full_size_run(row.model, tmp_path)
