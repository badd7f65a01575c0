"""``cops demo``: the whole pipeline on a synthetic dataset, in a few minutes on a CPU.

    cops demo --out demo_out [--force]

1. writes a procedural defect dataset (``cops_deploy.data.synth``) to ``OUT/data``;
2. trains ``cops-tiny`` on the TRAIN categories (``OUT/run``);
3. evaluates zero-shot on the other, HELD-OUT categories, once with the untrained weights (the
   same seeded initialisation training started from) and once with the trained ones
   (``OUT/eval_untrained``, ``OUT/eval_trained``: reports and overlay grids);
4. prints both mean-metric rows and writes them to ``OUT/summary.md``.

CLIP is randomly initialised (seeded): no weights can be downloaded here, and the tiny
architecture has none. The numbers show that the pipeline runs end to end and what training
does on this toy problem, not the accuracy of CoPS.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

TRAIN_CLASSES: tuple[str, ...] = ("stripes", "noise", "disc", "pcb")
HELD_OUT_CLASSES: tuple[str, ...] = ("weave", "screw")
DEMO_MODEL = "cops-tiny"
# What the demo writes under OUT; --force replaces exactly these.
DEMO_OUTPUTS: tuple[str, ...] = ("data", "run", "eval_untrained", "eval_trained", "summary.md")
SYNTH = {"size": 128, "n_train_good": 1, "n_test_good": 20, "n_test_bad": 20}


NEEDS_BUILD = True  # runs PyTorch: cli.main refuses it with the install hint without [build]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``demo`` command to the ``cops`` sub-parsers."""
    p = subparsers.add_parser(
        "demo",
        help="synthesise data, train cops-tiny, evaluate on held-out categories",
        description=(
            "End-to-end demo on a synthetic defect dataset: train cops-tiny (random CLIP) on "
            f"{', '.join(TRAIN_CLASSES)}, evaluate zero-shot on {', '.join(HELD_OUT_CLASSES)} "
            "before and after training, write reports and overlays."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (new or empty)")
    p.add_argument("--force", action="store_true", help="replace a previous demo in --out")
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, model and training")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def _prepare(out: Path, force: bool) -> None:
    from cops_deploy.fileio import prepare_output_dir

    prepare_output_dir(out, force, DEMO_OUTPUTS, "replace the previous demo in it")


def _summary(rows: list[tuple[str, dict[str, float | None]]], out: Path, seconds: float) -> str:
    from cops_deploy.evaluate.evaluator import METRICS

    lines = [
        "# cops demo",
        "",
        f"cops-tiny with a RANDOM CLIP (seeded; no weights can be downloaded here), trained on "
        f"{', '.join(TRAIN_CLASSES)} and evaluated zero-shot on the held-out "
        f"{', '.join(HELD_OUT_CLASSES)}. Mean over held-out classes, in %. "
        f"Wall time {seconds:.0f} s.",
        "",
        "| weights | " + " | ".join(METRICS) + " |",
        "|:--|" + "--:|" * len(METRICS),
    ]
    for label, mean in rows:
        cells = ["n/a" if mean[m] is None else f"{100 * mean[m]:.1f}" for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Reports: {out / 'eval_untrained'}, {out / 'eval_trained'}", ""]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run ``cops demo``; returns the exit status."""
    from cops_deploy.data.synth import synthesize
    from cops_deploy.evaluate.evaluator import (
        evaluate_model,
        format_mean_row,
        write_eval_outputs,
    )
    from cops_deploy.fileio import atomic_write_bytes
    from cops_deploy.model.factory import create_model, load_model
    from cops_deploy.train.trainer import TrainCfg, train

    start = time.perf_counter()
    out: Path = args.out
    progress = not args.no_progress
    _prepare(out, args.force)
    print("note: CLIP is randomly initialised (no weights can be downloaded here): the numbers")
    print("      show the pipeline working on a toy problem, not the accuracy of CoPS.")
    data = synthesize(out / "data", seed=args.seed, **SYNTH)
    print(f"data:     {data} (synthetic, {len(TRAIN_CLASSES) + len(HELD_OUT_CLASSES)} classes)")

    cfg = TrainCfg(
        data=data,
        dataset="synth",
        out=out / "run",
        model=DEMO_MODEL,
        random_clip=True,
        epochs=args.epochs,
        seed=args.seed,
        classes=TRAIN_CLASSES,
        progress=progress,
    )
    result = train(cfg)
    first, last = result.epoch_losses[0]["total"], result.epoch_losses[-1]["total"]
    print(
        f"train:    {result.run_dir} ({', '.join(TRAIN_CLASSES)}; {result.steps} steps, "
        f"{result.seconds:.0f} s; loss {first:.3f} (epoch 1) -> {last:.3f} (epoch {cfg.epochs}))"
    )

    rows = []
    models = {
        "untrained": create_model(DEMO_MODEL, seed=args.seed),
        "trained": load_model(result.model_dir, seed=args.seed),
    }
    for label, model in models.items():
        res = evaluate_model(model, data, "synth", HELD_OUT_CLASSES, progress=progress)
        meta = {
            "weights": label,
            "clip": f"random (seed {args.seed})",
            "trained_on": ", ".join(TRAIN_CLASSES) if label == "trained" else "nothing",
        }
        files = write_eval_outputs(res, out / f"eval_{label}", meta, f"cops demo: {label}")
        rows.append((label, res.mean))
        print(
            f"eval:     {files['markdown']} (overlays in {files['markdown'].parent / 'overlays'})"
        )
    seconds = time.perf_counter() - start
    atomic_write_bytes(out / "summary.md", _summary(rows, out, seconds).encode())
    print(f"\nheld-out classes {', '.join(HELD_OUT_CLASSES)}, mean over classes in %:")
    for label, mean in rows:
        print("  " + format_mean_row(f"{label:>9}", mean))
    print(f"summary:  {out / 'summary.md'}\nwall time: {seconds:.0f} s")
    return 0
