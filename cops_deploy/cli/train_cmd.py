"""``cops train``: train the learned CoPS parameters on an auxiliary dataset.

    cops train --data /data/visa --dataset visa --out runs/visa --clip-weights ViT-L-14-336px.pt
    cops train ... --resume          # continue an interrupted run, same result as uninterrupted

See :mod:`cops_deploy.train.trainer` for what a run folder holds.
"""

from __future__ import annotations

import argparse
from typing import Any

from cops_deploy.cli.dataset_args import (
    DatasetRunHelp,
    add_dataset_run_arguments,
    dataset_run_fields,
)

TRAIN_HELP = DatasetRunHelp(
    out="run folder",
    classes="train on",
    random_clip="train on a randomly initialised CLIP (smoke runs; results are meaningless)",
    seed="everything random",
    batch_size=8,
    dataset_note=": sets the neighbour kernel (3 on mvtec, else 5) and the recon loss (off on visa)",
)


NEEDS_BUILD = True  # runs PyTorch: cli.main refuses it with the install hint without [build]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` command to the ``cops`` sub-parsers."""
    p = subparsers.add_parser(
        "train",
        help="train CoPS prompts on an auxiliary dataset",
        description=(
            "Train the learned CoPS parameters (prompts, deep tokens, prototype queries and "
            "extractor, VAE) on the labelled test split of a dataset with a meta.json, CLIP "
            "frozen. Writes a checkpoint per epoch, a loss log and the final model to --out."
        ),
    )
    add_dataset_run_arguments(p, TRAIN_HELP)
    p.add_argument("--model", default="cops-vit-l-14-336", help="architecture name")
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument(
        "--neighbour-kernel",
        type=int,
        default=None,
        help="training neighbour kernel (default: the reference's rule, 3 on MVTec-AD, else 5)",
    )
    p.add_argument(
        "--recon",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="reconstruction loss on or off (default: the reference's rule, off on VisA)",
    )
    p.add_argument(
        "--empty-gather",
        choices=("reference", "zero"),
        default="reference",
        help="gather loss of a batch without normal patches: the reference's NaN (default; "
        "its gradient is zero and training goes on) or 0",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``cops train``; returns the exit status."""
    from cops_deploy.train.trainer import TrainCfg, train

    cfg = TrainCfg(
        **dataset_run_fields(args),
        epochs=args.epochs,
        lr=args.lr,
        resume=args.resume,
        num_workers=args.workers,
        empty_gather=args.empty_gather,
        neighbour_kernel=args.neighbour_kernel,
        recon_loss=args.recon,
    )
    if cfg.random_clip:
        print("note: CLIP is randomly initialised (--random-clip): a smoke run, not a CoPS model")
    result = train(cfg)
    if result.start_epoch:
        print(f"resumed from epoch {result.start_epoch}")
    for i, losses in enumerate(result.epoch_losses, start=result.start_epoch + 1):
        terms = ", ".join(f"{k} {losses[k]:.4f}" for k in ("total", "image", "patch", "gather"))
        print(f"epoch {i}/{result.epochs}: {terms}")
    print(
        f"trained {result.epochs} epoch(s), {result.steps} steps, in {result.seconds:.1f} s\n"
        f"model:       {result.model_dir}\n"
        f"loss log:    {result.loss_log}\n"
        f"checkpoints: {result.run_dir / 'checkpoints'}"
    )
    return 0
