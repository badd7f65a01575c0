"""``cops data``: prepare a dataset's meta.json, list the datasets, write a synthetic dataset.

    cops data list
    cops data prepare --dataset mvtec --root /data/mvtec
    cops data synth --out /tmp/synth --seed 0 [--size 128] [--force]

Failures raise DatasetError or ConfigError, which ``cops`` prints with a non-zero exit status.
Torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``data`` command and its actions to the ``cops`` sub-parsers."""
    parser = subparsers.add_parser(
        "data",
        help="prepare, list or synthesise datasets",
        description="Dataset tools: build meta.json for a dataset root, list the supported "
        "datasets, write a synthetic defect dataset.",
    )
    parser.set_defaults(func=lambda args: _print_help(parser))
    actions = parser.add_subparsers(dest="data_command", metavar="ACTION")

    prepare = actions.add_parser(
        "prepare", help="write ROOT/meta.json from a dataset's download layout"
    )
    prepare.add_argument("--dataset", required=True, help="dataset name (see `cops data list`)")
    prepare.add_argument("--root", required=True, type=Path, help="the unpacked dataset folder")
    prepare.set_defaults(func=_prepare)

    listing = actions.add_parser("list", help="list the supported datasets and their classes")
    listing.set_defaults(func=_list)

    synth = actions.add_parser("synth", help="write a procedural defect dataset (MVTec layout)")
    synth.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    synth.add_argument("--n-train-good", type=int, default=4, help="train images per class")
    synth.add_argument("--n-test-good", type=int, default=3, help="good test images per class")
    synth.add_argument("--n-test-bad", type=int, default=5, help="anomalous test images per class")
    synth.add_argument(
        "--force", action="store_true", help="write into a non-empty folder, replacing its classes"
    )
    synth.set_defaults(func=_synth)
    return parser


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _summary(root: Path) -> str:
    from cops_deploy.data.meta import load_meta

    meta = load_meta(root)
    test = [entry for entries in meta["test"].values() for entry in entries]
    n_train = sum(len(entries) for entries in meta["train"].values())
    n_bad = sum(entry["anomaly"] for entry in test)
    return (
        f"{len(meta['test'])} classes, {n_train} train images, {len(test)} test images "
        f"({len(test) - n_bad} good, {n_bad} anomalous)"
    )


def _prepare(args: argparse.Namespace) -> int:
    from cops_deploy.data.solvers import get_dataset, prepare_dataset

    spec = get_dataset(args.dataset)
    path = prepare_dataset(spec.name, args.root)
    print(f"wrote {path} ({spec.display_name}: {_summary(args.root)})")
    return 0


def _list(args: argparse.Namespace) -> int:
    from cops_deploy.data.solvers import DATASETS

    print(f"{'name':<10} {'dataset':<14} {'classes':>7}  labels")
    for spec in DATASETS.values():
        labels = " + ".join(
            kind
            for kind, present in (("image", spec.image_labels), ("pixel", spec.pixel_labels))
            if present
        )
        print(f"{spec.name:<10} {spec.display_name:<14} {spec.n_classes:>7}  {labels}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from cops_deploy.data.synth import synthesize

    root = synthesize(
        args.out,
        seed=args.seed,
        n_train_good=args.n_train_good,
        n_test_good=args.n_test_good,
        n_test_bad=args.n_test_bad,
        size=args.size,
        force=args.force,
    )
    print(f"wrote synthetic dataset to {root} ({_summary(root)}); index: {root / 'meta.json'}")
    return 0
