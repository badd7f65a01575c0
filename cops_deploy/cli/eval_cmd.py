"""``cops eval``: zero-shot metrics of CoPS weights on a dataset's test split.

    cops eval --data /data/mvtec --dataset mvtec --weights runs/visa/model \\
        --clip-weights ViT-L-14-336px.pt --out eval/mvtec [--preset paper|reference] \
        [--alpha A] [--beta B] [--kernel K]

Writes results.md / results.csv / results.json (per class and mean; n/a where a metric is
undefined), scores.csv (per image) and overlays/<class>.png into --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cops_deploy.cli.dataset_args import (
    DatasetRunHelp,
    add_dataset_run_arguments,
    dataset_run_fields,
)
from cops_deploy.cli.head_args import add_head_arguments

EVAL_HELP = DatasetRunHelp(
    out="output folder",
    classes="evaluate",
    random_clip="random CLIP from --seed (for models trained with `cops train --random-clip`)",
    seed="the random CLIP",
    batch_size=4,
)


NEEDS_BUILD = True  # runs PyTorch: cli.main refuses it with the install hint without [build]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` command to the ``cops`` sub-parsers."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate CoPS weights on a dataset (AUROC, AP, AUPRO, F1-max)",
        description=(
            "Evaluate CoPS weights zero-shot on the test split of a dataset with a meta.json: "
            "per-class and mean I-AUROC, I-AP, I-F1max, P-AUROC, P-AP, AUPRO, P-F1max, reports "
            "and overlay grids."
        ),
    )
    add_dataset_run_arguments(p, EVAL_HELP)
    p.add_argument(
        "--weights",
        required=True,
        type=Path,
        help="CoPS weights: a reference .pth, or a saved model folder (a `cops train` RUN/model)",
    )
    p.add_argument(
        "--model", help="architecture (default: the one saved with --weights, else the paper's)"
    )
    add_head_arguments(p, preset_default="paper", reads_dataset=True)
    p.add_argument("--force", action="store_true", help="replace the results in a non-empty --out")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``cops eval``; returns the exit status."""
    from cops_deploy.evaluate.evaluator import EvalCfg, format_mean_row, run_eval

    cfg = EvalCfg(
        **dataset_run_fields(args),
        weights=args.weights,
        preset=args.preset,
        alpha=args.alpha,
        beta=args.beta,
        neighbour_kernel=args.kernel,
        force=args.force,
    )
    result, files = run_eval(cfg, warn=lambda text: print(text, file=sys.stderr))
    h = result.head
    print(
        f"{result.dataset}: {len(result.records)} images, {len(result.metrics)} classes, "
        f"preset {args.preset} (alpha {h.alpha}, beta {h.beta}, kernel {h.neighbour_kernel}), "
        f"{result.seconds:.1f} s"
    )
    print(format_mean_row("mean", result.mean))
    print(f"report: {files['markdown']}\noverlays: {args.out / 'overlays'}")
    return 0
