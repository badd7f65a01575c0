"""Every supported weight format loads back to identical outputs; bad files are refused."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from cops_deploy import create_model, load_model, save_model
from cops_deploy.errors import WeightsError
from cops_deploy.model.weights import read_openai_clip

REFERENCE_KEYS = (
    ["ctx_pos", "ctx_neg", "t_n", "t_a"]
    + [
        f"extractor.attn.{k}"
        for k in ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
    ]
    + [
        f"extractor.{m}.{p}"
        for m in ("ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")
    ]
    + [f"vae_decoder.net.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")]
    + [f"compound_prompts_text.{i}" for i in range(8)]
)


@pytest.fixture(scope="module")
def source():
    """A random cops-tiny whose weights the tests save in each format."""
    return create_model("cops-tiny", seed=11)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.randn(2, 3, 98, 98)


def _same_outputs(a, b, images):
    with torch.no_grad():
        x, y = a(images), b(images)
    assert torch.equal(x.pred_score, y.pred_score)
    assert torch.equal(x.anomaly_map, y.anomaly_map)


def _reference_checkpoint(model) -> dict:
    sd = {
        k: v.clone()
        for k, v in model.prompt.state_dict().items()
        if not k.startswith("vae_encoder")
    }
    return {"prompt_learner": sd}


def test_reference_checkpoint_has_exactly_the_reference_keys(source):
    assert sorted(_reference_checkpoint(source)["prompt_learner"]) == sorted(REFERENCE_KEYS)


def test_openai_state_dict_round_trip(source, images, tmp_path):
    clip = tmp_path / "clip.pt"
    sd = source.clip.openai_state_dict()
    sd.update(
        input_resolution=torch.tensor(56),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    torch.save(sd, clip)
    cops = tmp_path / "cops.pth"
    torch.save(_reference_checkpoint(source), cops)
    loaded = create_model("cops-tiny", clip_weights=clip, cops_weights=cops, seed=99)
    _same_outputs(source, loaded, images)


class _OpenAILayout(nn.Module):
    """Holds the CLIP modules under OpenAI's attribute names, for a TorchScript archive."""

    def __init__(self, model) -> None:
        super().__init__()
        self.visual = model.clip.visual
        self.transformer = model.clip.text.transformer
        self.token_embedding = model.clip.text.token_embedding
        self.positional_embedding = model.clip.text.positional_embedding
        self.ln_final = model.clip.text.ln_final
        self.text_projection = model.clip.text.text_projection
        self.logit_scale = model.clip.logit_scale

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.visual(image)[0] * self.logit_scale.exp()


def test_torchscript_archive_round_trip(source, images, tmp_path):
    layout = _OpenAILayout(source).eval()
    with torch.no_grad():
        traced = torch.jit.trace(layout, images[:1], check_trace=False)
    archive = tmp_path / "ViT-tiny.pt"
    # OpenAI's archives hold fp16 weights; the loader converts them to fp32.
    traced.save(str(archive))
    assert sorted(read_openai_clip(archive)) == sorted(source.clip.openai_state_dict())
    cops = tmp_path / "cops.pth"
    torch.save(_reference_checkpoint(source), cops)
    loaded = create_model("cops-tiny", clip_weights=archive, cops_weights=cops, seed=5)
    _same_outputs(source, loaded, images)


def test_safetensors_clip_round_trip(source, images, tmp_path):
    from safetensors.torch import save_file

    clip = tmp_path / "clip.safetensors"
    save_file({k: v.contiguous() for k, v in source.clip.openai_state_dict().items()}, str(clip))
    cops = tmp_path / "cops.pth"
    torch.save(_reference_checkpoint(source), cops)
    loaded = create_model("cops-tiny", clip_weights=clip, cops_weights=cops, seed=5)
    _same_outputs(source, loaded, images)


def test_own_format_round_trip_with_clip(source, images, tmp_path):
    out = save_model(source, tmp_path / "full")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json"}
    _same_outputs(source, load_model(out), images)
    _same_outputs(source, create_model("cops-tiny", cops_weights=out / "model.safetensors"), images)


def test_own_format_without_clip_keeps_class_samples(images, tmp_path):
    model = create_model("cops-tiny", seed=12)
    with torch.no_grad():
        model.class_samples.normal_()  # differs from the seeded default: must travel
    clip = tmp_path / "clip.pt"
    torch.save(model.clip.openai_state_dict(), clip)
    out = save_model(model, tmp_path / "learned", include_clip=False)
    loaded = load_model(out, clip_weights=clip)
    assert torch.equal(loaded.class_samples, model.class_samples)
    _same_outputs(model, loaded, images)


def test_own_format_refuses_other_architecture(source, tmp_path):
    out = save_model(source, tmp_path / "tiny")
    with pytest.raises(WeightsError, match="architecture"):
        create_model(
            "cops-tiny",
            cops_weights=out,
            **{"vision.layers": 3, "vision.v_vv_layers": 3, "vision.feature_layers": [3]},
        )


def test_missing_extra_and_misshaped_keys_are_named(source, tmp_path):
    sd = source.clip.openai_state_dict()
    sd.pop("visual.proj")
    sd["visual.unknown"] = torch.zeros(1)
    sd["ln_final.weight"] = torch.zeros(5)
    path = tmp_path / "bad.pt"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as err:
        create_model("cops-tiny", clip_weights=path)
    msg = str(err.value)
    assert "missing keys: visual.proj" in msg
    assert "unexpected keys: visual.unknown" in msg
    assert "ln_final.weight (file (5,), model (96,))" in msg
    assert str(path) in msg


def test_reference_checkpoint_with_extra_or_missing_keys_refused(source, tmp_path):
    ckpt = _reference_checkpoint(source)
    ckpt["prompt_learner"]["projector.fc.0.weight"] = torch.zeros(2, 2)
    del ckpt["prompt_learner"]["t_a"]
    path = tmp_path / "bad.pth"
    torch.save(ckpt, path)
    with pytest.raises(WeightsError, match=r"missing keys: t_a.*unexpected keys: projector"):
        create_model("cops-tiny", cops_weights=path)


def test_reference_checkpoint_without_prompt_learner_refused(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"model": {}}, path)
    with pytest.raises(WeightsError, match="prompt_learner"):
        create_model("cops-tiny", cops_weights=path)


class _Payload:
    def __reduce__(self):
        return (print, ("arbitrary code ran",))


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"visual.proj": _Payload()}, f)
    with pytest.raises(WeightsError, match="weights-only"):
        create_model("cops-tiny", clip_weights=path)


def test_missing_and_corrupt_files_are_refused(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_model("cops-tiny", clip_weights=tmp_path / "nope.pt")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read CLIP weights file .*junk.safetensors"):
        create_model("cops-tiny", clip_weights=junk)


def test_openai_tag_without_network_gives_clear_error(monkeypatch):
    pytest.importorskip("open_clip")
    from open_clip import pretrained

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(pretrained, "download_pretrained", offline)
    with pytest.raises(WeightsError, match=r"ViT-L-14-336px\.pt"):
        create_model("cops-vit-l-14-336", clip_weights="openai")


def test_openai_tag_resolves_open_clip_file(monkeypatch, source, tmp_path):
    """The 'openai' tag asks open_clip for ViT-L-14-336/openai and loads the file it returns."""
    pytest.importorskip("open_clip")
    from open_clip import pretrained

    asked = {}
    clip = tmp_path / "clip.pt"
    torch.save(source.clip.openai_state_dict(), clip)

    def fake_download(cfg, *args, **kwargs):
        asked.update(cfg)
        return str(clip)

    monkeypatch.setattr(pretrained, "download_pretrained", fake_download)
    cfg = create_model("cops-tiny").cfg
    cfg = cfg.replace(
        clip_pretrained={
            "open_clip_model": "ViT-L-14-336",
            "open_clip_tag": "openai",
            "openai_file": "ViT-L-14-336px.pt",
        }
    )
    model = create_model(cfg, clip_weights="openai")
    assert "ViT-L-14-336px.pt" in str(asked.get("url", "")) or asked.get("hf_hub")
    assert torch.equal(model.clip.visual.proj, source.clip.visual.proj)


def test_provenance_records_hashes(source, tmp_path):
    clip = tmp_path / "clip.pt"
    torch.save(source.clip.openai_state_dict(), clip)
    model = create_model("cops-tiny", clip_weights=clip)
    assert len(model.provenance["clip"]) == 64 and model.provenance["cops"] == "random"
    assert Path(clip).is_file()
