"""``cops train``: train the learned CoPS parameters on an auxiliary dataset.

    cops train --data /data/visa --dataset visa --out runs/visa --clip-weights ViT-L-14-336px.pt
    cops train ... --resume          # continue an interrupted run, same result as uninterrupted

See :mod:`cops_deploy.train.trainer` for what a run folder holds.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


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
    p.add_argument("--data", required=True, type=Path, help="dataset root holding meta.json")
    p.add_argument(
        "--dataset",
        required=True,
        help="dataset name (see `cops data list`; 'synth' or 'custom' for others): sets the "
        "neighbour kernel (3 on mvtec, else 5) and the recon loss (off on visa)",
    )
    p.add_argument("--out", required=True, type=Path, help="run folder (new or empty)")
    p.add_argument("--model", default="cops-vit-l-14-336", help="architecture name")
    p.add_argument(
        "--clip-weights",
        help="'openai' (download) or an OpenAI CLIP .pt / state dict / safetensors",
    )
    p.add_argument(
        "--random-clip",
        action="store_true",
        help="train on a randomly initialised CLIP (smoke runs; results are meaningless)",
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs (default 10)")
    p.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    p.add_argument("--classes", nargs="+", help="train on these classes only (default: all)")
    p.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``cops train``; returns the exit status."""
    from cops_deploy.train.trainer import TrainCfg, parse_classes, train

    cfg = TrainCfg(
        data=args.data,
        dataset=args.dataset,
        out=args.out,
        model=args.model,
        clip_weights=args.clip_weights,
        random_clip=args.random_clip,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        classes=parse_classes(args.classes),
        resume=args.resume,
        device=args.device,
        num_workers=args.workers,
        progress=not args.no_progress,
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
