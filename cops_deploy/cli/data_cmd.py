"""``cops data``: prepare a dataset's meta.json, list the datasets, write a synthetic dataset.

    cops data list
    cops data prepare --dataset mvtec --root /data/mvtec
    cops data prepare --dataset folder --root /data/parts --normal-dir good \
        --abnormal-dir crack scratch [--mask-dir masks/crack masks/scratch] \
        [--normal-test-dir good_test] [--extensions .png .jpg] [--class-name part]
    cops data synth --out /tmp/synth --seed 0 [--size 128] [--force]

Failures raise DatasetError or ConfigError, which ``cops`` prints with a non-zero exit status.
Torch-free.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cops_deploy.errors import ConfigError


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
        "prepare",
        help="write ROOT/meta.json from a dataset's download layout, or from your own folders",
        description="Write ROOT/meta.json from one of the 13 download layouts (--dataset NAME), "
        "or from your own folders (--dataset folder: a folder of normal images, one or more "
        "folders of anomalous images, optional mask folders matched by name; as anomalib's "
        "Folder datamodule).",
    )
    prepare.add_argument(
        "--dataset", required=True, help="dataset name (see `cops data list`), or 'folder'"
    )
    prepare.add_argument("--root", required=True, type=Path, help="the unpacked dataset folder")
    own = prepare.add_argument_group("--dataset folder (paths relative to --root, or absolute)")
    own.add_argument("--normal-dir", help="folder of normal (good) images")
    own.add_argument("--abnormal-dir", nargs="+", help="one or more folders of anomalous images")
    own.add_argument(
        "--mask-dir",
        nargs="+",
        help="mask folders: one shared, or one per --abnormal-dir in order; a mask is named "
        "like its image (<stem>.png or <stem>_mask.png)",
    )
    own.add_argument(
        "--normal-test-dir",
        help="normal test images; --normal-dir then becomes the train split (default: the "
        "normal images are tested)",
    )
    own.add_argument(
        "--extensions",
        nargs="+",
        help="list only these file kinds, e.g. .png .jpg (default: every file must be an image)",
    )
    own.add_argument("--class-name", help="class name of the images (default: the root's name)")
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


_FOLDER_FLAGS: tuple[str, ...] = (
    "normal_dir", "abnormal_dir", "mask_dir", "normal_test_dir", "extensions", "class_name",
)  # fmt: skip


def _prepare(args: argparse.Namespace) -> int:
    from cops_deploy.data.folder import FOLDER_DATASET
    from cops_deploy.data.solvers import get_dataset, prepare_dataset

    if args.dataset.strip().lower() == FOLDER_DATASET:
        return _prepare_folder(args)
    spec = get_dataset(args.dataset)
    given = [f"--{name.replace('_', '-')}" for name in _FOLDER_FLAGS if getattr(args, name)]
    if given:
        raise ConfigError(
            f"{', '.join(given)} describe your own folders and need --dataset folder, got "
            f"--dataset {args.dataset}. Fix: pass --dataset folder, or leave them out to read "
            f"the {spec.display_name} download layout."
        )
    path = prepare_dataset(spec.name, args.root)
    print(f"wrote {path} ({spec.display_name}: {_summary(args.root)})")
    return 0


def _prepare_folder(args: argparse.Namespace) -> int:
    from cops_deploy.data.folder import FolderCfg, prepare_folder

    missing = [flag for flag, value in (("--normal-dir", args.normal_dir),
               ("--abnormal-dir", args.abnormal_dir)) if not value]  # fmt: skip
    if missing:
        raise ConfigError(
            f"--dataset folder needs {' and '.join(missing)}. Fix: e.g. --normal-dir good "
            "--abnormal-dir crack scratch (folders relative to --root)."
        )
    cfg = FolderCfg(
        normal_dir=args.normal_dir,
        abnormal_dirs=tuple(args.abnormal_dir),
        mask_dirs=tuple(args.mask_dir or ()),
        normal_test_dir=args.normal_test_dir,
        extensions=tuple(args.extensions) if args.extensions else None,
        class_name=args.class_name,
    )
    path = prepare_folder(args.root, cfg)
    print(f"wrote {path} (folder: {_summary(args.root)}); use --dataset folder --data {args.root}")
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
