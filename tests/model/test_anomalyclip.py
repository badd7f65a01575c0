"""AnomalyCLIP loading: reference checkpoints and OpenAI CLIP files through the real loaders,
our own format, and clear errors for bad or mismatched files and configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cops_deploy import create_model, load_model, save_model
from cops_deploy.configs import get_config
from cops_deploy.errors import ConfigError, WeightsError
from cops_deploy.model.anomalyclip import AnomalyClipModel


@pytest.fixture(scope="module")
def source():
    """A random anomalyclip-tiny whose weights the tests save in each format."""
    return create_model("anomalyclip-tiny", seed=5)


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 98, 98, generator=torch.Generator().manual_seed(0))


def _reference(model: AnomalyClipModel, projections: bool = True) -> dict:
    """The prompt learner as the reference's train.py saves it."""
    sd = {k: v.clone() for k, v in model.prompt.state_dict().items()}
    for key in [k for k in sd if k.startswith("tokenized_prompts_")]:
        sd[key] = sd[key].to(torch.int32)  # the reference stores int32 token ids
    if projections:
        for i in range(model.cfg.prompt.deep_token_count):
            sd[f"compound_prompt_projections.{i}.weight"] = torch.randn(896, model.cfg.embed_dim)
            sd[f"compound_prompt_projections.{i}.bias"] = torch.randn(896)
    return {"prompt_learner": sd}


def _clip_file(model: AnomalyClipModel, path: Path) -> Path:
    sd = {k: v.half() if v.dim() >= 2 else v for k, v in model.clip.openai_state_dict().items()}
    sd["input_resolution"] = torch.tensor(56)
    torch.save(sd, path)
    return path


def _same(a, b, images) -> None:
    with torch.no_grad():
        x, y = a(images), b(images)
    assert torch.equal(x.pred_score, y.pred_score)
    assert torch.equal(x.anomaly_map, y.anomaly_map)


def test_factory_builds_the_family_of_the_config(source):
    assert isinstance(source, AnomalyClipModel)
    assert source.cfg.kind == "anomalyclip"
    assert get_config("cops-tiny").kind == "cops"
    full = get_config("anomalyclip-vit-l-14-336")
    assert (full.vision.v_vv_layers, list(full.vision.feature_layers)) == (19, [6, 12, 18, 24])
    assert full.patch_sets == 4 and get_config("cops-tiny").patch_sets == 1


def test_reference_checkpoint_round_trip(source, images, tmp_path):
    clip = _clip_file(source, tmp_path / "clip.pt")
    torch.save(_reference(source), tmp_path / "epoch_15.pth")
    loaded = create_model("anomalyclip-tiny", clip, tmp_path / "epoch_15.pth", seed=99)
    with torch.no_grad():
        a, b = source(images), loaded(images)
    # the CLIP file is fp16 (as OpenAI's): the map moves by the weight rounding only
    assert float((a.anomaly_map - b.anomaly_map).abs().max()) < 0.05
    assert loaded.provenance["cops"] != "random" and loaded.provenance["clip"] != "random"
    for key, value in source.prompt.state_dict().items():
        assert torch.equal(loaded.prompt.state_dict()[key], value), key


def test_token_buffers_come_from_clip_when_the_checkpoint_lacks_them(source, images, tmp_path):
    ref = _reference(source)
    ref["prompt_learner"] = {
        k: v for k, v in ref["prompt_learner"].items() if not k.startswith("token")
    }
    torch.save(ref, tmp_path / "no_tokens.pth")
    torch.save(source.clip.openai_state_dict(), tmp_path / "clip32.pt")
    loaded = create_model("anomalyclip-tiny", tmp_path / "clip32.pt", tmp_path / "no_tokens.pth")
    _same(source, loaded, images)


def test_own_format_round_trip(source, images, tmp_path):
    save_model(source, tmp_path / "m")
    _same(source, load_model(tmp_path / "m"), images)


def test_cops_checkpoint_is_refused_with_the_family_named(tmp_path):
    cops = create_model("cops-tiny")
    sd = {k: v for k, v in cops.prompt.state_dict().items() if not k.startswith("vae_encoder")}
    torch.save({"prompt_learner": sd}, tmp_path / "cops.pth")
    with pytest.raises(WeightsError, match=r"reference cops checkpoint.*kind 'anomalyclip'"):
        create_model("anomalyclip-tiny", cops_weights=tmp_path / "cops.pth")


def test_anomalyclip_checkpoint_into_cops_is_refused(source, tmp_path):
    torch.save(_reference(source), tmp_path / "aclip.pth")
    with pytest.raises(WeightsError, match=r"reference anomalyclip checkpoint.*kind 'cops'"):
        create_model("cops-tiny", cops_weights=tmp_path / "aclip.pth")


def test_mis_shaped_checkpoint_names_the_key(source, tmp_path):
    ref = _reference(source)
    ref["prompt_learner"]["ctx_pos"] = torch.zeros(1, 1, 14, 96)
    torch.save(ref, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match=r"mis-shaped keys: ctx_pos \(file \(1, 1, 14, 96\)"):
        create_model("anomalyclip-tiny", cops_weights=tmp_path / "bad.pth")


def test_missing_deep_tokens_are_named(source, tmp_path):
    ref = _reference(source)
    del ref["prompt_learner"]["compound_prompts_text.3"]
    torch.save(ref, tmp_path / "short.pth")
    with pytest.raises(WeightsError, match=r"missing keys: compound_prompts_text\.3"):
        create_model("anomalyclip-tiny", cops_weights=tmp_path / "short.pth")


def test_not_a_reference_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="expected a dict with the key 'prompt_learner'"):
        create_model("anomalyclip-tiny", cops_weights=tmp_path / "other.pth")


def test_pickled_checkpoint_is_refused(tmp_path):
    torch.save({"prompt_learner": {"ctx_pos": object()}}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match="weights-only"):
        create_model("anomalyclip-tiny", cops_weights=tmp_path / "pickled.pth")


def test_clip_of_another_architecture_is_refused(tmp_path):
    torch.save(create_model("cops-tiny").clip.openai_state_dict(), tmp_path / "clip2.pt")
    with pytest.raises(WeightsError, match=r"CLIP weights .*missing keys: visual\.transformer"):
        create_model("anomalyclip-tiny", clip_weights=tmp_path / "clip2.pt")


def test_own_format_of_another_family_is_refused(tmp_path):
    save_model(create_model("cops-tiny"), tmp_path / "cops")
    with pytest.raises(WeightsError, match=r"differs from 'anomalyclip-tiny' in \[.*'kind'"):
        create_model("anomalyclip-tiny", cops_weights=tmp_path / "cops")


def test_cops_only_options_are_refused():
    with pytest.raises(ConfigError, match=r"\['text_length'\] are CoPS options"):
        create_model("anomalyclip-tiny", text_length=20)
    with pytest.raises(ConfigError, match="needs an 'anomalyclip' config"):
        AnomalyClipModel(get_config("cops-tiny"))


def test_invalid_kind_and_prompt_layout():
    with pytest.raises(ConfigError, match=r"kind 'winclip' is not a model family"):
        get_config("anomalyclip-tiny").replace(kind="winclip")
    with pytest.raises(ConfigError, match="state_tokens, class_tokens and prototypes are 6, 0, 6"):
        get_config("anomalyclip-tiny", state_tokens=6, prototypes=6)
