"""Pickle-free, atomic training checkpoints: one folder per epoch.

``RUN/checkpoints/epoch_0003/`` holds

- ``prompt.safetensors``: the learned CoPS tensors (``model.prompt.state_dict()``);
- ``optimizer.safetensors``: the optimizer's per-parameter tensors, keyed
  ``<parameter name>/<state key>`` (Adam: ``step``, ``exp_avg``, ``exp_avg_sq``);
- ``rng.safetensors``: the RNG states as uint8 tensors: ``torch_cpu``
  (``torch.get_rng_state()``), ``cuda.<i>`` when CUDA is in use, and ``generator.<name>``
  for each named ``torch.Generator`` of the run (the DataLoader's shuffling, the ICTS noise);
- ``state.json``: epoch and step counters, the optimizer's hyper-parameters (its param groups,
  by parameter name) and the sha256 of each file above.

The folder is written under a temporary name in the same parent and renamed into place in one
step, so a crash leaves either the previous checkpoints or the new complete one, never a partial
folder; ``load_checkpoint`` checks every file against its sha256. No pickle anywhere: tensors in
safetensors, the rest in JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cops_deploy.errors import WeightsError
from cops_deploy.model.weights import read_safetensors, safetensors_bytes

CHECKPOINT_FORMAT = "cops-deploy-train-checkpoint"
CHECKPOINT_VERSION = 1
PROMPT_FILE = "prompt.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
_PREFIX = "epoch_"


@dataclass
class Checkpoint:
    """A checkpoint as read back: tensors, RNG states and counters."""

    path: Path
    epoch: int
    step: int
    prompt: dict[str, torch.Tensor]
    optimizer_tensors: dict[str, torch.Tensor]
    optimizer_meta: dict[str, Any]
    rng: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------- optimizer


def optimizer_state(
    optimizer: torch.optim.Optimizer, names: Sequence[str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors keyed by parameter name and JSON data.

    ``names`` are the parameter names in the optimizer's own order (its param groups, flat).
    """
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{names[index]}/{key}"] = value
            else:
                scalars.setdefault(names[index], {})[key] = value
    groups = []
    for group in sd["param_groups"]:
        entry = {k: list(v) if isinstance(v, tuple) else v for k, v in group.items()}
        entry["params"] = [names[i] for i in group["params"]]
        groups.append(entry)
    return tensors, {"param_names": list(names), "param_groups": groups, "scalars": scalars}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer,
    names: Sequence[str],
    tensors: Mapping[str, torch.Tensor],
    meta: Mapping[str, Any],
    source: str,
) -> None:
    """Restore what :func:`optimizer_state` saved; the parameter names must be the same."""
    if list(meta.get("param_names", [])) != list(names):
        raise WeightsError(
            f"{source}: the optimizer state was saved for parameters "
            f"{meta.get('param_names')} but the model has {list(names)}; a run can only be "
            "resumed with the same model. Fix: resume with the --model of the original run."
        )
    index = {name: i for i, name in enumerate(names)}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, item = key.rpartition("/")
        if name not in index:
            raise WeightsError(f"{source}: optimizer state for unknown parameter {name!r}")
        state.setdefault(index[name], {})[item] = value
    for name, entries in meta.get("scalars", {}).items():
        state.setdefault(index[name], {}).update(entries)
    groups = []
    for group in meta["param_groups"]:
        entry = {k: tuple(v) if isinstance(v, list) else v for k, v in group.items()}
        entry["params"] = [index[n] for n in group["params"]]
        groups.append(entry)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# --------------------------------------------------------------------------------- rng


def rng_state(generators: Mapping[str, torch.Generator]) -> dict[str, torch.Tensor]:
    """The global torch RNG states and each named generator's state, as uint8 tensors."""
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda.{i}"] = s
    for name, gen in generators.items():
        states[f"generator.{name}"] = gen.get_state()
    return states


def restore_rng_state(
    states: Mapping[str, torch.Tensor], generators: Mapping[str, torch.Generator], source: str
) -> None:
    """Put back what :func:`rng_state` saved."""
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    for name, gen in generators.items():
        key = f"generator.{name}"
        if key not in states:
            raise WeightsError(f"{source}: no state for the RNG generator {name!r}")
        gen.set_state(states[key])


# --------------------------------------------------------------------------------- files


def _write_synced(path: Path, data: bytes) -> str:
    """Write and fsync ``data``; return its sha256."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def checkpoint_dir(root: Path, epoch: int) -> Path:
    """The folder of the checkpoint after ``epoch`` epochs."""
    return Path(root) / f"{_PREFIX}{epoch:04d}"


def save_checkpoint(
    root: str | os.PathLike[str],
    epoch: int,
    step: int,
    prompt: Mapping[str, torch.Tensor],
    optimizer_tensors: Mapping[str, torch.Tensor],
    optimizer_meta: Mapping[str, Any],
    rng: Mapping[str, torch.Tensor],
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write the checkpoint after ``epoch`` epochs atomically into ``root``; return its folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(root, epoch)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=root))
    try:
        files = {
            PROMPT_FILE: _write_synced(tmp / PROMPT_FILE, safetensors_bytes(prompt)),
            OPTIMIZER_FILE: _write_synced(
                tmp / OPTIMIZER_FILE, safetensors_bytes(optimizer_tensors)
            ),
            RNG_FILE: _write_synced(tmp / RNG_FILE, safetensors_bytes(rng)),
        }
        state = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "epoch": int(epoch),
            "step": int(step),
            "optimizer": dict(optimizer_meta),
            "extra": dict(extra or {}),
            "files": files,
        }
        _write_synced(tmp / STATE_FILE, (json.dumps(state, indent=2) + "\n").encode())
        _fsync_dir(tmp)
        if final.exists():  # a re-run of the same epoch: replace it
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first (temporary folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(_PREFIX) and p.name[len(_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def remove_stale_temporaries(root: str | os.PathLike[str]) -> list[Path]:
    """Delete temporary folders left by a checkpoint write that was killed; return them."""
    root = Path(root)
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(f".{_PREFIX}")]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read and verify one checkpoint folder."""
    path = Path(path)
    state_path = path / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(
            f"checkpoint {path} cannot be read ({exc}); it is damaged. Fix: delete the folder "
            "to resume from the checkpoint before it."
        ) from exc
    if state.get("format") != CHECKPOINT_FORMAT or state.get("version") != CHECKPOINT_VERSION:
        raise WeightsError(
            f"{state_path}: format {state.get('format')!r} version {state.get('version')!r}; "
            f"valid: {CHECKPOINT_FORMAT!r} version {CHECKPOINT_VERSION}. Fix: resume with the "
            "cops-deploy version that wrote the run."
        )
    for name, digest in state["files"].items():
        file = path / name
        actual = hashlib.sha256(file.read_bytes()).hexdigest() if file.is_file() else None
        if actual != digest:
            raise WeightsError(
                f"checkpoint file {file} is missing or does not match the sha256 recorded in "
                f"{state_path}; it is damaged. Fix: delete {path} to resume from the "
                "checkpoint before it."
            )
    return Checkpoint(
        path=path,
        epoch=int(state["epoch"]),
        step=int(state["step"]),
        prompt=read_safetensors(path / PROMPT_FILE, "checkpoint file"),
        optimizer_tensors=read_safetensors(path / OPTIMIZER_FILE, "checkpoint file"),
        optimizer_meta=state["optimizer"],
        rng=read_safetensors(path / RNG_FILE, "checkpoint file"),
        extra=state.get("extra", {}),
    )
