"""Build CoPS models from a registered architecture and the weights users hold.

Split as resolve config -> build -> load CLIP weights -> load CoPS weights, each a small
function. ``create_model`` is the entry point; ``save_model`` / ``load_model`` handle our own
pickle-free format (safetensors + config.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cops_deploy.configs import CopsCfg, get_config
from cops_deploy.errors import ConfigError, WeightsError
from cops_deploy.model.anomalyclip import AnomalyClipModel
from cops_deploy.model.cops import CopsModel
from cops_deploy.model.weights import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    atomic_write_bytes,
    check_state_dict,
    download_openai_clip,
    is_own_format,
    read_openai_clip,
    read_own_format,
    read_reference_cops,
    reference_checkpoint_kind,
    save_safetensors,
    sha256_file,
)
from cops_deploy.version import __version__

MODEL_KWARGS = ("attn_impl", "text_length", "sampling")
# Learned tensors that a reference checkpoint does not carry (training-only encoder).
REFERENCE_OPTIONAL = ("vae_encoder.",)
# AnomalyCLIP checkpoints: token buffers may be absent (then taken from the CLIP embedding);
# the deep-prompt projections are saved by the reference but never used at inference.
ANOMALYCLIP_OPTIONAL = ("token_prefix_", "token_suffix_", "tokenized_prompts_")
ANOMALYCLIP_UNUSED = ("compound_prompt_projections.",)


def _split_kwargs(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    model_kw = {k: overrides.pop(k) for k in MODEL_KWARGS if k in overrides}
    return model_kw, overrides


def build_model(cfg: CopsCfg, **model_kw: Any) -> CopsModel | AnomalyClipModel:
    """The model family of ``cfg.kind`` (random weights): CopsModel or AnomalyClipModel."""
    if cfg.kind == "anomalyclip":
        cops_only = sorted(k for k in model_kw if k != "attn_impl")
        if cops_only:
            raise ConfigError(
                f"options {cops_only} are CoPS options; AnomalyCLIP model {cfg.name!r} takes "
                f"only attn_impl. Fix: drop them."
            )
        return AnomalyClipModel(cfg, **model_kw)
    return CopsModel(cfg, **model_kw)


def load_clip_weights(model: CopsModel | AnomalyClipModel, source: str | Path) -> str:
    """Load CLIP weights into ``model`` from ``"openai"`` (open_clip download) or a file.

    Returns a provenance string (the file's sha256).
    """
    path = download_openai_clip(model.cfg) if str(source) == "openai" else Path(source)
    sd = read_openai_clip(path)
    expected = {k: v.shape for k, v in model.clip.openai_state_dict().items()}
    check_state_dict(expected, sd, f"CLIP weights {path}")
    model.clip.load_openai_state_dict(sd)
    if isinstance(model, AnomalyClipModel):  # its prompt buffers are CLIP token embeddings
        model.prompt.fill_token_embeddings(model.clip.text.token_embedding.weight)
    return sha256_file(path)


def load_cops_weights(model: CopsModel | AnomalyClipModel, source: str | Path) -> str:
    """Load learned CoPS (or AnomalyCLIP) weights from a reference ``.pth`` or our own format.

    Our own format may include the CLIP weights and the fixed ICTS samples; they are loaded too.
    Returns the file's sha256.
    """
    path = Path(source)
    if is_own_format(path):
        cfg, sd = read_own_format(path)
        _check_same_arch(model.cfg, cfg, path)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        has_clip = any(k.startswith("clip.") for k in sd)
        check_state_dict(expected, sd, f"CoPS weights {path}", () if has_clip else ("clip.",))
        model.load_state_dict(sd, strict=has_clip)
        weights = path / WEIGHTS_FILE if path.is_dir() else path
        return sha256_file(weights)
    sd = read_reference_cops(path)
    found = reference_checkpoint_kind(sd)
    if found is not None and found != model.cfg.kind:
        raise WeightsError(
            f"{path} is a reference {found} checkpoint, but the model {model.cfg.name!r} is of "
            f"kind {model.cfg.kind!r}. Fix: create a {found} architecture "
            f"(cops_deploy.list_models()) for this checkpoint, or pass a {model.cfg.kind} one."
        )
    expected = {k: v.shape for k, v in model.prompt.state_dict().items()}
    if isinstance(model, AnomalyClipModel):
        sd = {k: v for k, v in sd.items() if not k.startswith(ANOMALYCLIP_UNUSED)}
        what = f"reference AnomalyCLIP checkpoint {path}"
        check_state_dict(expected, sd, what, ANOMALYCLIP_OPTIONAL)
    else:
        check_state_dict(expected, sd, f"reference CoPS checkpoint {path}", REFERENCE_OPTIONAL)
    model.prompt.load_state_dict(sd, strict=False)
    return sha256_file(path)


def _check_same_arch(want: CopsCfg, got: CopsCfg, path: Path) -> None:
    a, b = want.to_dict(), got.to_dict()
    diff = sorted(k for k in ("kind", "embed_dim", "vision", "text", "prompt") if a[k] != b[k])
    if diff:
        raise WeightsError(
            f"{path} was saved for architecture {got.name!r}, which differs from {want.name!r} "
            f"in {diff}; create the model with the name stored in its config.json"
        )


def create_model(
    name: str | CopsCfg = "cops-vit-l-14-336",
    clip_weights: str | Path | None = None,
    cops_weights: str | Path | None = None,
    seed: int | None = 0,
    **overrides: Any,
) -> CopsModel | AnomalyClipModel:
    """Build a CoPS model in eval mode.

    Args:
        name: a registered architecture (``cops_deploy.list_models()``) or a ``CopsCfg``.
        clip_weights: ``None`` (random, for smoke runs), ``"openai"`` (open_clip's download of
            the OpenAI release), or a path: OpenAI TorchScript ``.pt``, plain state dict, or
            safetensors with OpenAI key names.
        cops_weights: ``None`` (random), a reference checkpoint (``{"prompt_learner": ...}``)
            or a model saved by ``save_model`` (folder or its ``.safetensors``).
        seed: seed for the random initialisation of whatever is not loaded.
        **overrides: model options ``attn_impl``, ``text_length``, ``sampling``, or config
            values (``alpha=0.26``, ``**{"head.neighbour_kernel": 3}``).
    """
    model_kw, cfg_over = _split_kwargs(dict(overrides))
    if isinstance(name, CopsCfg):
        cfg = name.replace(**cfg_over) if cfg_over else name
    else:
        cfg = get_config(name, **cfg_over)
    with torch.random.fork_rng(devices=[]):  # seeding must not disturb the caller's RNG
        if seed is not None:
            torch.manual_seed(seed)
        model = build_model(cfg, **model_kw)
    provenance = {"clip": "random", "cops": "random"}
    if clip_weights is not None:
        provenance["clip"] = load_clip_weights(model, clip_weights)
    if cops_weights is not None:
        provenance["cops"] = load_cops_weights(model, cops_weights)
        if clip_weights is None and is_own_format(cops_weights) and _own_has_clip(cops_weights):
            provenance["clip"] = provenance["cops"]
    model.provenance = provenance
    return model.eval()


def _own_has_clip(path: str | Path) -> bool:
    from safetensors import safe_open

    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    with safe_open(str(weights), "pt") as f:
        return any(k.startswith("clip.") for k in f.keys())  # noqa: SIM118


def save_model(
    model: CopsModel | AnomalyClipModel, out_dir: str | Path, include_clip: bool = True
) -> Path:
    """Save in our format: ``model.safetensors`` + ``config.json`` in ``out_dir``.

    ``include_clip=False`` keeps only the learned CoPS tensors and the fixed ICTS samples
    (a few MB); load it with ``create_model(name, clip_weights=..., cops_weights=out_dir)``.
    """
    out = Path(out_dir)
    sd = model.state_dict()
    if not include_clip:
        sd = {k: v for k, v in sd.items() if not k.startswith("clip.")}
    save_safetensors(sd, out / WEIGHTS_FILE, {"format": "cops-deploy", "version": __version__})
    meta = {
        "model": model.cfg.to_dict(),
        "includes_clip": include_clip,
        "provenance": getattr(model, "provenance", {}),
        "cops_deploy_version": __version__,
    }
    atomic_write_bytes(out / CONFIG_FILE, json.dumps(meta, indent=2).encode())
    return out


def load_model(
    path: str | Path, clip_weights: str | Path | None = None, **overrides: Any
) -> CopsModel | AnomalyClipModel:
    """A model saved by ``save_model``; ``clip_weights`` is needed when it was saved without."""
    cfg, _ = read_own_format(path)
    return create_model(cfg, clip_weights=clip_weights, cops_weights=path, **overrides)
