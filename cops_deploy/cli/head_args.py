"""The inference-head arguments shared by ``cops eval``, ``cops predict`` and ``cops-export``:
``--preset paper|reference`` and the overrides ``--alpha``, ``--beta``, ``--kernel``.

One definition, so the three commands mean and check the same thing:

- ``--preset``: the head values of :func:`cops_deploy.evaluate.evaluator.preset_head` (paper:
  alpha 0.3, beta 0.9, kernel 5; reference: the reference test script's 0.26, 0.9, 5, or 0.35,
  1.0, 3 when the target dataset is VisA; a command without ``--dataset``, predict or export,
  takes the values for any dataset but VisA, and says in its help how to get VisA's);
- ``--alpha`` / ``--beta`` / ``--kernel``: replace one value of the preset (or, without a preset,
  of the model's config). Alpha and beta are weights in [0, 1]; the kernel is an odd size >= 1.

Imports nothing heavy at parse time, so ``cops --help`` stays fast; :func:`head_overrides`
imports the preset table (PyTorch side) only when a preset is asked for.
"""

from __future__ import annotations

import argparse
from typing import Any, Protocol

__all__ = [
    "HEAD_FLAGS",
    "PRESETS",
    "ArgumentAdder",
    "add_head_arguments",
    "given_head_flags",
    "head_overrides",
    "odd_kernel",
    "unit_weight",
]

# The names of evaluate.evaluator.PRESETS (a test keeps the two equal; importing it here would
# load PyTorch for `cops --help`).
PRESETS: tuple[str, ...] = ("paper", "reference")
# argparse dest -> the dotted head key create_model / CopsCfg.replace / ExportCfg take
HEAD_FLAGS: dict[str, str] = {
    "alpha": "head.alpha",
    "beta": "head.beta",
    "kernel": "head.neighbour_kernel",
}
_PAPER_HELP = "head values: paper (alpha 0.3, beta 0.9, kernel 5) or reference (the reference "
_REFERENCE_HELP = {
    True: "test script: 0.26, 0.9, 5, and 0.35, 1.0, 3 with --dataset visa)",
    False: "test script's values for any dataset but VisA: 0.26, 0.9, 5; for its VisA values add "
    "--alpha 0.35 --beta 1.0 --kernel 3)",
}


class ArgumentAdder(Protocol):
    """A parser or an argument group: anything with argparse's ``add_argument``."""

    def add_argument(self, *names: str, **kwargs: Any) -> Any:
        """As :meth:`argparse.ArgumentParser.add_argument`."""


def unit_weight(text: str) -> float:
    """An argparse type: a finite number in [0, 1] (--alpha, --beta)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # NaN fails the comparison too
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a weight; valid: a number in [0, 1], e.g. 0.3"
        )
    return value


def odd_kernel(text: str) -> int:
    """An argparse type: an odd integer >= 1 (--kernel, the neighbour-averaging window)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1 or value % 2 == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a kernel size; valid: an odd integer >= 1 (1, 3, 5, ...), e.g. 5"
        )
    return value


def add_head_arguments(
    parser: ArgumentAdder,
    preset_default: str | None,
    reads_dataset: bool = False,
    default_note: str = "",
) -> None:
    """Add --preset, --alpha, --beta and --kernel to a parser or an argument group.

    ``preset_default``: ``"paper"`` for ``cops eval``; None where the model's own config is the
    default (``cops predict``, ``cops-export``), described by ``default_note``.
    ``reads_dataset``: the command has ``--dataset``, which the reference preset reads (VisA).
    """
    default = f"default {preset_default}" if preset_default else (default_note or "no default")
    parser.add_argument(
        "--preset",
        default=preset_default,
        choices=PRESETS,
        help=f"{_PAPER_HELP}{_REFERENCE_HELP[reads_dataset]}; {default}",
    )
    parser.add_argument(
        "--alpha", type=unit_weight, help="override head.alpha, the SAGA weight in [0, 1]"
    )
    parser.add_argument(
        "--beta", type=unit_weight, help="override head.beta, the image-score weight in [0, 1]"
    )
    parser.add_argument(
        "--kernel", type=odd_kernel, help="override head.neighbour_kernel (odd, >= 1)"
    )


def given_head_flags(args: argparse.Namespace) -> list[str]:
    """The head flags given on the command line with their values, e.g. ``["--alpha 0.3"]``
    (for refusals where they cannot apply)."""
    names = ("preset", *HEAD_FLAGS)
    return [f"--{n} {getattr(args, n)}" for n in names if getattr(args, n, None) is not None]


def head_overrides(args: argparse.Namespace, target_dataset: str | None = None) -> dict[str, Any]:
    """The dotted head values the arguments ask for: the preset's (for ``target_dataset``,
    which only the reference preset reads), then each given override; ``{}`` when none."""
    out: dict[str, Any] = {}
    if args.preset is not None:
        from cops_deploy.evaluate.evaluator import preset_head

        out.update(preset_head(args.preset, target_dataset or "custom").overrides())
    for name, key in HEAD_FLAGS.items():
        value = getattr(args, name)
        if value is not None:
            out[key] = value
    return out
