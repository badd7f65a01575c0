"""Arguments shared by the commands that run a CoPS model over a meta.json dataset (``cops
train``, ``cops eval``), and their mapping to the config fields that ``TrainCfg`` and ``EvalCfg``
share. Each command adds its own arguments (``--model``, ``--weights``, ``--epochs`` ...) and
fields beside these. Imports nothing heavy, so ``cops --help`` stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DatasetRunHelp", "add_dataset_run_arguments", "dataset_run_fields", "parse_classes"]


@dataclass(frozen=True)
class DatasetRunHelp:
    """What differs between the commands in the shared arguments: help texts and defaults."""

    out: str  # what --out holds
    classes: str  # what --classes restricts
    random_clip: str  # what --random-clip is for
    seed: str  # what --seed seeds
    batch_size: int  # default of --batch-size
    dataset_note: str = ""  # appended to --dataset's help


def add_dataset_run_arguments(p: argparse.ArgumentParser, helps: DatasetRunHelp) -> None:
    """Add --data, --dataset, --out, --clip-weights, --random-clip, --seed, --classes,
    --batch-size, --device and --no-progress to a command's parser."""
    p.add_argument("--data", required=True, type=Path, help="dataset root holding meta.json")
    p.add_argument(
        "--dataset",
        required=True,
        help="dataset name (see `cops data list`; 'synth', 'folder' or 'custom' for others)"
        + helps.dataset_note,
    )
    p.add_argument("--out", required=True, type=Path, help=f"{helps.out} (new or empty)")
    p.add_argument(
        "--clip-weights",
        help="'openai' (download) or an OpenAI CLIP .pt / state dict / safetensors",
    )
    p.add_argument("--random-clip", action="store_true", help=helps.random_clip)
    p.add_argument("--seed", type=int, default=0, help=f"seed of {helps.seed} (default 0)")
    p.add_argument(
        "--classes", nargs="+", help=f"{helps.classes} these classes only (default: all)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=helps.batch_size,
        help=f"images per forward pass (default {helps.batch_size})",
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def dataset_run_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the shared arguments set (and ``--model``, which every such command
    has), as keyword arguments for ``TrainCfg`` or ``EvalCfg``."""
    return {
        "data": args.data,
        "dataset": args.dataset,
        "out": args.out,
        "model": args.model,
        "clip_weights": args.clip_weights,
        "random_clip": args.random_clip,
        "seed": args.seed,
        "classes": parse_classes(args.classes),
        "batch_size": args.batch_size,
        "device": args.device,
        "progress": not args.no_progress,
    }


def parse_classes(values: Sequence[str] | None) -> tuple[str, ...] | None:
    """``--classes a b`` or ``--classes a,b`` as a tuple (None when not given)."""
    if not values:
        return None
    names = [n for v in values for n in v.split(",") if n]
    return tuple(dict.fromkeys(names)) or None
