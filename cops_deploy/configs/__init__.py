"""Architectures as data: each CoPS model is a JSON file in this folder.

``list_configs()`` names them, ``get_config(name)`` parses one into a :class:`CopsCfg`, and
``add_config(path_or_dict)`` registers a user's own. ``NAME@SIZE`` (e.g.
``cops-vit-l-14-336@700``) is architecture NAME run at SIZE x SIZE pixels: the one way to change
the input size, accepted wherever a model name is. Torch-free, so the run side can read the
model configuration stored in a bundle manifest.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cops_deploy.errors import ConfigError

_CONFIG_DIR = Path(__file__).parent
_REGISTRY: dict[str, dict[str, Any]] = {}
# Model families built from these configs: "cops" (METHOD.md) and "anomalyclip" (AnomalyCLIP,
# ICLR 2024: static learned prompts, per-layer maps summed; cops_deploy.model.anomalyclip).
MODEL_KINDS = ("cops", "anomalyclip")

# Separates an architecture name from the input size it runs at: "cops-vit-l-14-336@700".
SIZE_SEPARATOR = "@"


@dataclass(frozen=True)
class VisionCfg:
    """CLIP ViT image tower. ``image_size`` is the resolution the weights were trained at (sets
    the positional table), ``input_size`` the resolution CoPS runs at."""

    image_size: int
    input_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    v_vv_layers: int
    feature_layers: tuple[int, ...]

    @property
    def weight_grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size


@dataclass(frozen=True)
class TextCfg:
    """CLIP text tower."""

    context_length: int
    vocab_size: int
    width: int
    heads: int
    layers: int


@dataclass(frozen=True)
class PromptCfg:
    """Learned prompt layout: K context, M state and class tokens, deep tokens, prototypes."""

    context_tokens: int
    state_tokens: int
    class_tokens: int
    deep_token_count: int
    deep_token_length: int
    deep_token_first_layer: int
    # The reference casts deep tokens to float16 where it inserts them (``.half()``), so the
    # text tower sees them rounded to fp16 even in an fp32 model; the golden vectors need it.
    deep_token_fp16_round: bool
    prototypes: int
    extractor_heads: int
    sot_token: int
    eot_token: int
    period_token: int

    @property
    def n_ctx(self) -> int:
        """Learned tokens per prompt (14 for the paper's model)."""
        return self.context_tokens + self.state_tokens + self.class_tokens

    @property
    def live_tokens(self) -> int:
        """Tokens up to and including EOT: SOT, the learned tokens, '.', EOT (17)."""
        return self.n_ctx + 3

    @property
    def eot_index(self) -> int:
        return self.n_ctx + 2

    @property
    def deep_layers(self) -> tuple[int, ...]:
        """0-based text layers whose hidden states at positions 1.. are replaced."""
        first = self.deep_token_first_layer - 1
        return tuple(range(first, first + self.deep_token_count))


@dataclass(frozen=True)
class HeadCfg:
    """Inference head: ICTS samples, temperature, SAGA weights, Gaussian, neighbour kernel."""

    samples: int
    sample_seed: int
    tau: float
    alpha: float
    beta: float
    sigma: float
    truncate: float
    neighbour_kernel: int


@dataclass(frozen=True)
class PreprocessCfg:
    """Image preprocessing that travels with the weights."""

    size: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


@dataclass(frozen=True)
class CopsCfg:
    """A complete architecture. ``kind`` names the model family (:data:`MODEL_KINDS`); an
    "anomalyclip" config uses ``prompt.context_tokens`` as its 12 learned context tokens, has
    no state/class tokens or prototypes, and ignores ``head.samples/alpha/beta/neighbour_kernel``.
    """

    name: str
    embed_dim: int
    vision: VisionCfg
    text: TextCfg
    prompt: PromptCfg
    head: HeadCfg
    preprocess: PreprocessCfg
    description: str = ""
    clip_pretrained: dict[str, str] | None = field(default=None)
    kind: str = "cops"

    @property
    def patch_sets(self) -> int:
        """Patch-embedding sets the vision graph outputs, stacked along the token axis: 1 for
        CoPS (its feature layers are averaged), one per feature layer for AnomalyCLIP."""
        return len(self.vision.feature_layers) if self.kind == "anomalyclip" else 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (the inverse of :func:`config_from_dict`)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def replace(self, **overrides: Any) -> CopsCfg:
        """A copy with dotted overrides, e.g. ``replace(**{"head.alpha": 0.26})``."""
        return config_from_dict(_apply_overrides(self.to_dict(), overrides))


_SECTIONS = {
    "vision": VisionCfg,
    "text": TextCfg,
    "prompt": PromptCfg,
    "head": HeadCfg,
    "preprocess": PreprocessCfg,
}


def _build_section(name: str, cls: type, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {name!r} must be an object, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    missing = sorted(names - raw.keys())
    extra = sorted(raw.keys() - names)
    if missing or extra:
        raise ConfigError(
            f"config section {name!r}: missing keys {missing}, unknown keys {extra}; "
            f"valid keys are {sorted(names)}"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return cls(**values)


def config_from_dict(raw: dict[str, Any]) -> CopsCfg:
    """Parse and validate a config dict (as stored in JSON)."""
    raw = copy.deepcopy(raw)
    top = {f.name for f in dataclasses.fields(CopsCfg)}
    extra = sorted(raw.keys() - top)
    if extra:
        raise ConfigError(f"unknown top-level config keys {extra}; valid keys are {sorted(top)}")
    for key in ("name", "embed_dim", *_SECTIONS):
        if key not in raw:
            raise ConfigError(f"config is missing the key {key!r}")
    sections = {k: _build_section(k, cls, raw.pop(k)) for k, cls in _SECTIONS.items()}
    cfg = CopsCfg(**raw, **sections)
    _validate(cfg)
    return cfg


def _validate(cfg: CopsCfg) -> None:
    v, t, p = cfg.vision, cfg.text, cfg.prompt
    if cfg.kind not in MODEL_KINDS:
        raise ConfigError(
            f"invalid config {cfg.name!r}: kind {cfg.kind!r} is not a model family; valid: "
            f"{list(MODEL_KINDS)}. Fix: set \"kind\" to one of them (omitted means 'cops')."
        )
    if cfg.kind == "anomalyclip" and (p.state_tokens, p.class_tokens, p.prototypes) != (0, 0, 0):
        raise ConfigError(
            f"invalid AnomalyCLIP config {cfg.name!r}: prompt.state_tokens, class_tokens and "
            f"prototypes are {p.state_tokens}, {p.class_tokens}, {p.prototypes}; valid: 0, 0, 0 "
            f"(AnomalyCLIP's prompts are context tokens only). Fix: set them to 0."
        )
    checks = [
        (v.width % v.heads == 0, f"vision.width {v.width} must divide by vision.heads {v.heads}"),
        (t.width % t.heads == 0, f"text.width {t.width} must divide by text.heads {t.heads}"),
        (
            cfg.embed_dim % p.extractor_heads == 0,
            f"embed_dim {cfg.embed_dim} must divide by prompt.extractor_heads {p.extractor_heads}",
        ),
        (t.width == cfg.embed_dim, f"text.width {t.width} must equal embed_dim {cfg.embed_dim}"),
        (
            v.input_size % v.patch_size == 0,
            f"vision.input_size {v.input_size} must be a multiple of patch_size {v.patch_size}",
        ),
        (
            0 < v.v_vv_layers <= v.layers,
            f"vision.v_vv_layers {v.v_vv_layers} must be in 1..{v.layers}",
        ),
        (
            all(1 <= i <= v.layers for i in v.feature_layers) and len(v.feature_layers) > 0,
            f"vision.feature_layers {list(v.feature_layers)} must be in 1..{v.layers}",
        ),
        (
            max(p.deep_layers, default=0) < t.layers and p.deep_token_first_layer >= 2,
            f"deep tokens in text layers {p.deep_token_first_layer}.."
            f"{p.deep_token_first_layer + p.deep_token_count - 1} do not fit "
            f"{t.layers} layers (the first layer is 1 and keeps its own tokens)",
        ),
        (
            p.deep_token_length <= p.n_ctx,
            f"prompt.deep_token_length {p.deep_token_length} exceeds the {p.n_ctx} learned tokens",
        ),
        (p.state_tokens == p.prototypes, "prompt.state_tokens must equal prompt.prototypes"),
        (p.live_tokens <= t.context_length, "the prompt does not fit text.context_length"),
        (cfg.head.samples >= 1, f"head.samples must be >= 1, got {cfg.head.samples}"),
        (cfg.head.tau > 0, f"head.tau must be > 0, got {cfg.head.tau}"),
        (
            cfg.head.neighbour_kernel % 2 == 1,
            f"head.neighbour_kernel must be odd, got {cfg.head.neighbour_kernel}",
        ),
        (
            cfg.preprocess.size == v.input_size,
            f"preprocess.size {cfg.preprocess.size} must equal vision.input_size {v.input_size} "
            f"(to run a registered model at another size, name it NAME{SIZE_SEPARATOR}SIZE)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"invalid CoPS config {cfg.name!r}: {message}")


def _apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = dotted.replace("__", ".").split(".")
        if len(parts) == 1:
            section = next((s for s in _SECTIONS if parts[0] in raw[s]), None)
            if section is not None:
                parts = [section, parts[0]]
        node = raw
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], dict):
                raise ConfigError(f"unknown config override {dotted!r}")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(
                f"unknown config override {dotted!r}; valid keys here: {sorted(node)}"
            )
        node[parts[-1]] = list(value) if isinstance(value, tuple) else value
    return raw


def _load_builtin() -> None:
    for path in sorted(_CONFIG_DIR.glob("*.json")):
        raw = json.loads(path.read_text())
        _REGISTRY[raw["name"]] = raw


def list_configs() -> list[str]:
    """Names of the registered architectures, sorted."""
    if not _REGISTRY:
        _load_builtin()
    return sorted(_REGISTRY)


def add_config(source: str | Path | dict[str, Any]) -> str:
    """Register an architecture from a JSON file or dict; returns its name."""
    raw = json.loads(Path(source).read_text()) if not isinstance(source, dict) else source
    cfg = config_from_dict(raw)
    if SIZE_SEPARATOR in cfg.name:
        raise ConfigError(
            f"cannot register the architecture name {cfg.name!r}: {SIZE_SEPARATOR!r} is reserved "
            f"for the input size (NAME{SIZE_SEPARATOR}SIZE). Fix: rename it without "
            f"{SIZE_SEPARATOR!r}, e.g. {cfg.name.replace(SIZE_SEPARATOR, '-')!r}."
        )
    list_configs()
    _REGISTRY[cfg.name] = cfg.to_dict()
    return cfg.name


def split_input_size(name: str) -> tuple[str, int | None]:
    """``"cops-vit-l-14-336@700"`` -> ``("cops-vit-l-14-336", 700)``; a plain name -> (name, None).

    Raises ConfigError when the part after ``@`` is not a positive whole number of pixels.
    """
    base, sep, size = name.partition(SIZE_SEPARATOR)
    if not sep:
        return name, None
    if not re.fullmatch(r"[0-9]+", size) or int(size) == 0:
        raise ConfigError(
            f"invalid model name {name!r}: the input size after {SIZE_SEPARATOR!r} must be a "
            f"positive whole number of pixels, got {size!r}. Fix: write "
            f"'{base}{SIZE_SEPARATOR}SIZE' with SIZE a multiple of the patch size, or {base!r} "
            "for its default size."
        )
    return base, int(size)


def _with_input_size(raw: dict[str, Any], size: int, asked: str) -> dict[str, Any]:
    """``raw`` run at ``size`` (vision.input_size and preprocess.size); named NAME@SIZE unless
    ``size`` is its own default."""
    patch = raw["vision"]["patch_size"]
    if size % patch:
        lower = size - size % patch
        nearest = [n for n in (lower, lower + patch) if n >= patch]
        best = min(nearest, key=lambda n: abs(n - size))
        raise ConfigError(
            f"invalid input size {size} in model name {asked!r}: {raw['name']!r} has "
            f"{patch}-pixel patches, so the input size must be a multiple of {patch} "
            f"(nearest: {', '.join(map(str, nearest))}). Fix: ask for "
            f"'{raw['name']}{SIZE_SEPARATOR}{best}'."
        )
    raw = copy.deepcopy(raw)
    if size != raw["vision"]["input_size"]:
        raw["name"] = f"{raw['name']}{SIZE_SEPARATOR}{size}"
    raw["vision"]["input_size"] = size
    raw["preprocess"]["size"] = size
    return raw


def get_config(name: str, **overrides: Any) -> CopsCfg:
    """The architecture registered as ``name``, with optional dotted or bare-key overrides.

    ``NAME@SIZE`` runs architecture NAME at SIZE x SIZE pixels (a multiple of its patch size);
    the positional table is resized from the weights' grid to SIZE / patch, as at the default.
    """
    names = list_configs()
    base, size = split_input_size(name)
    if base not in _REGISTRY:
        raise ConfigError(f"unknown CoPS model {base!r}; registered models are {names}")
    raw = _REGISTRY[base] if size is None else _with_input_size(_REGISTRY[base], size, name)
    return config_from_dict(_apply_overrides(raw, overrides))
