"""Weight I/O: OpenAI CLIP files, the reference CoPS checkpoint, and our own format.

Readers return plain ``{name: tensor}`` dicts; ``check_state_dict`` refuses a dict with
missing, extra or mis-shaped keys and names them. Pickle-free: ``torch.load`` always runs with
``weights_only=True``; our own format is safetensors plus a JSON config.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from cops_deploy.configs import CopsCfg, config_from_dict
from cops_deploy.errors import MissingDependencyError, WeightsError
from cops_deploy.extras import BUILD_INSTALL
from cops_deploy.fileio import atomic_write_bytes

# Entries an OpenAI CLIP file may carry besides the weights (METHOD.md section 6).
OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
# The reference checkpoint's learned prompt state, stored under this key.
REFERENCE_KEY = "prompt_learner"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MAX_NAMED_KEYS = 12


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_NAMED_KEYS])
    more = len(keys) - MAX_NAMED_KEYS
    return shown + (f", ... ({more} more)" if more > 0 else "")


def check_state_dict(
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    got: Mapping[str, torch.Tensor],
    source: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Refuse ``got`` unless its keys and shapes are exactly ``expected``.

    Keys starting with a prefix in ``optional`` may be absent. The message names the file, the
    missing, extra and mis-shaped keys, and what to do.
    """
    missing = sorted(k for k in expected if k not in got and not k.startswith(optional))
    extra = sorted(k for k in got if k not in expected)
    shapes = sorted(
        f"{k} (file {tuple(got[k].shape)}, model {tuple(expected[k])})"
        for k in got
        if k in expected and tuple(got[k].shape) != tuple(expected[k])
    )
    if not (missing or extra or shapes):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {_names(missing)}")
    if extra:
        parts.append(f"unexpected keys: {_names(extra)}")
    if shapes:
        parts.append(f"mis-shaped keys: {_names(shapes)}")
    raise WeightsError(
        f"{source} does not fit the model: "
        + "; ".join(parts)
        + ". Check that the file matches the architecture (model name) you asked for."
    )


def _torch_load(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise WeightsError(
            f"cannot read {path} as a weights-only PyTorch file ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Pickled objects other than "
            "tensors are refused; re-save the file as a plain state dict or safetensors."
        ) from exc


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("constants.pkl") or "/code/" in name for name in zf.namelist())


def read_safetensors(path: str | Path, what: str = "weights file") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (on the CPU); WeightsError naming ``what`` and the file
    when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise WeightsError(
            f"cannot read {what} {path} as safetensors: {exc}. Valid: a file written by "
            "safetensors (save_model, a training checkpoint). Fix: pass an intact file, or "
            "write it again."
        ) from exc


def safetensors_bytes(
    tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> bytes:
    """``tensors`` (contiguous CPU copies) serialised as safetensors."""
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata)


def read_openai_clip(path: str | Path) -> dict[str, torch.Tensor]:
    """CLIP weights (OpenAI key names, float32) from a TorchScript archive (OpenAI's own
    ``.pt`` release files), a plain state dict, or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"CLIP weights file {path} does not exist")
    if path.suffix == ".safetensors":
        sd = read_safetensors(path, "CLIP weights file")
    elif _is_torchscript(path):
        try:
            sd = dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except RuntimeError as exc:
            raise WeightsError(f"cannot read TorchScript archive {path}: {exc}") from exc
    else:
        obj = _torch_load(path)
        if (
            isinstance(obj, Mapping)
            and "state_dict" in obj
            and isinstance(obj["state_dict"], Mapping)
        ):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping):
            raise WeightsError(f"{path} holds a {type(obj).__name__}, not a CLIP state dict")
        sd = dict(obj)
    for key in OPENAI_EXTRA_KEYS:
        sd.pop(key, None)
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {_names(sorted(bad))}")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


def download_openai_clip(cfg: CopsCfg) -> Path:
    """Download (or find in open_clip's cache) the OpenAI weights for ``cfg``; sha256-checked
    by open_clip. Needs network access to the weights host."""
    info = cfg.clip_pretrained
    if not info:
        raise WeightsError(
            f"model {cfg.name!r} has no published CLIP weights; pass a file as clip_weights"
        )
    try:
        from open_clip import pretrained as oc_pretrained
    except ImportError as exc:
        raise MissingDependencyError(
            "loading the 'openai' tag needs open_clip, which is not installed. Fix: "
            f"{BUILD_INSTALL}"
        ) from exc
    pcfg = oc_pretrained.get_pretrained_cfg(info["open_clip_model"], info["open_clip_tag"])
    if not pcfg:
        raise WeightsError(
            f"open_clip knows no {info['open_clip_model']!r} weights with tag "
            f"{info['open_clip_tag']!r}"
        )
    try:
        return Path(oc_pretrained.download_pretrained(pcfg))
    except Exception as exc:  # noqa: BLE001 - network errors of several kinds
        raise WeightsError(
            f"could not download CLIP {info['open_clip_model']}/{info['open_clip_tag']} "
            f"({type(exc).__name__}: {exc}). Without network access, download "
            f"{info['openai_file']} elsewhere and pass its path as --clip-weights."
        ) from exc


def read_reference_cops(path: str | Path) -> dict[str, torch.Tensor]:
    """The learned state of a reference CoPS or AnomalyCLIP checkpoint
    ``{"prompt_learner": state_dict}`` (floating tensors as float32, token ids kept)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"CoPS checkpoint {path} does not exist")
    obj = _torch_load(path)
    if not isinstance(obj, Mapping) or REFERENCE_KEY not in obj:
        keys = sorted(obj)[:MAX_NAMED_KEYS] if isinstance(obj, Mapping) else type(obj).__name__
        raise WeightsError(
            f"{path} is not a reference CoPS checkpoint: expected a dict with the key "
            f"{REFERENCE_KEY!r}, found {keys}"
        )
    sd = obj[REFERENCE_KEY]
    if not isinstance(sd, Mapping):
        raise WeightsError(f"{path}: {REFERENCE_KEY!r} is a {type(sd).__name__}, not a state dict")
    return {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}


# Keys only one family's reference checkpoint carries (CoPS: ESTS/ICTS; AnomalyCLIP: the token
# buffers and deep-prompt projections its train.py saves).
_FAMILY_KEYS = {
    "cops": ("t_n", "t_a", "extractor.", "vae_decoder."),
    "anomalyclip": ("token_prefix_", "tokenized_prompts_", "compound_prompt_projections."),
}


def reference_checkpoint_kind(sd: Mapping[str, torch.Tensor]) -> str | None:
    """ "cops" or "anomalyclip" when the keys of a reference prompt-learner state show which
    family saved it; None when they do not."""
    for kind, prefixes in _FAMILY_KEYS.items():
        if any(k.startswith(prefixes) for k in sd):
            return kind
    return None


def save_safetensors(
    tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write contiguous CPU copies of ``tensors`` as safetensors."""
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata))


def read_own_format(path: str | Path) -> tuple[CopsCfg, dict[str, torch.Tensor]]:
    """Config and tensors of a model saved by ``save_model`` (a folder, or its safetensors
    file with ``config.json`` beside it)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    cfg_path = folder / CONFIG_FILE
    if not weights.is_file():
        raise WeightsError(f"{weights} does not exist (expected a model saved by save_model)")
    if not cfg_path.is_file():
        raise WeightsError(f"{cfg_path} is missing: our format is {WEIGHTS_FILE} + {CONFIG_FILE}")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{cfg_path} is not valid JSON: {exc}") from exc
    return config_from_dict(raw["model"] if "model" in raw else raw), read_safetensors(
        weights, "model weights file"
    )


def is_own_format(path: str | Path) -> bool:
    """True for a folder or .safetensors file written by ``save_model``."""
    path = Path(path)
    if path.is_dir():
        return (path / WEIGHTS_FILE).is_file()
    return path.suffix == ".safetensors" and (path.parent / CONFIG_FILE).is_file()
