"""``cops-export``: CoPS weights -> a deployment bundle (ONNX graphs, optional TensorRT engines).

    cops-export --model cops-vit-l-14-336 --clip-weights ViT-L-14-336px.pt \\
        --weights cops_mvtec.pth --engine onnx --precision fp32 --max-batch 8 --out bundles/mvtec
    cops-export --model cops-tiny --random-weights --out /tmp/smoke         # smoke bundle
    cops-export --engine trt --bundle bundles/mvtec --force                 # engines on this GPU

The arguments map onto :class:`cops_deploy.export.pipeline.ExportCfg` (``--bundle``: onto
:func:`~cops_deploy.export.pipeline.add_engines`); the library runs the stages and this command
prints their numbered progress lines. Failures print one message naming what failed and exit
with status 2 (a bundle whose parity with PyTorch exceeds the precision's tolerance is such a
failure unless --allow-parity-drift). SIGTERM and SIGHUP stop an export like Ctrl-C: the
temporary folders are removed and the exit status is 128 + the signal number.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from cops_deploy.cli.head_args import add_head_arguments, head_overrides
from cops_deploy.errors import ConfigError, CopsError
from cops_deploy.export.pipeline import (
    ENGINES,
    PRECISIONS,
    ExportCfg,
    PrintProgress,
    add_engines,
    export_bundle,
)
from cops_deploy.extras import require_build

__all__ = ["build_parser", "export_cfg", "main"]

PROG = "cops-export"


def build_parser() -> argparse.ArgumentParser:
    """The ``cops-export`` argument parser."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Export CoPS to a deployment bundle: vision and head ONNX graphs (and "
        "TensorRT engines with --engine trt), manifest with parity figures, optional Triton "
        "model repository.",
    )
    p.add_argument("--model", default="cops-vit-l-14-336", help="registered architecture name")
    p.add_argument("--clip-weights", help="CLIP weights: 'openai', an OpenAI .pt or safetensors")
    p.add_argument("--weights", help="CoPS checkpoint: reference .pth or a save_model folder")
    p.add_argument(
        "--random-weights",
        action="store_true",
        help="allow random weights for what is not given (smoke bundle; recorded)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of random weights (default 0)")
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="onnx",
        help="onnx: ONNX graphs only; trt: also TensorRT engines (needs a GPU)",
    )
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="graph precision; fp16 keeps FP32 islands (default fp32)",
    )
    p.add_argument(
        "--max-batch",
        type=int,
        default=8,
        help="largest batch of the engine profile and Triton (default 8)",
    )
    p.add_argument("--out", type=Path, help="bundle directory to write")
    p.add_argument(
        "--bundle", type=Path, help="with --engine trt: add engines to this existing bundle instead"
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle/repository")
    p.add_argument("--triton", action="store_true", help="also write a Triton model repository")
    p.add_argument(
        "--torch-weights",
        action="store_true",
        help="also store the PyTorch weights (safetensors) so Detector's torch backend can run",
    )
    p.add_argument("--triton-dir", type=Path, help="Triton repository (default OUT-triton)")
    p.add_argument(
        "--engine-cache",
        type=Path,
        help="TensorRT engine and timing cache folder (default ~/.cache/cops-deploy)",
    )
    p.add_argument("--rebuild-engines", action="store_true", help="build engines even if cached")
    p.add_argument(
        "--parity-images",
        type=int,
        default=2,
        help="synthetic images for the ONNX Runtime parity check (default 2)",
    )
    p.add_argument(
        "--no-ort-variant",
        action="store_true",
        help="fp32: leave out the ONNX Runtime variant of the vision graph (fused "
        "com.microsoft attention sharing the portable graph's weights; ONNX Runtime runs it "
        "by default, TensorRT always builds from the portable graph)",
    )
    p.add_argument("--opset", type=int, default=20, help="ONNX opset (default 20)")
    add_head_arguments(p, preset_default=None, default_note="default: the model's config")
    p.add_argument(
        "--allow-parity-drift",
        action="store_true",
        help="write the bundle even if its parity with PyTorch exceeds the precision's "
        "tolerance (recorded in the manifest; by default such an export fails)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cops-export``; returns the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        with _signals_interrupt():
            require_build(PROG)  # a runtime-only install: one line naming the extra
            if args.bundle is not None:
                return _add_engines(args)
            return _export(args)
    except CopsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except _Interrupted as exc:
        print(f"{PROG}: stopped by {exc.name}; temporary folders removed", file=sys.stderr)
        return 128 + exc.signum


class _Interrupted(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP so that every ``with`` block cleans up."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


_STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s)


@contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`_Interrupted` inside the block (the default action
    kills the process without unwinding, leaving the temporary folders behind)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted(signum)

    try:
        previous = {s: signal.signal(s, interrupt) for s in _STOP_SIGNALS}
    except ValueError:  # not the main thread: leave the handlers alone
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def export_cfg(args: argparse.Namespace) -> ExportCfg:
    """The :class:`ExportCfg` that parsed ``cops-export`` arguments ask for (validated)."""
    return ExportCfg(
        out=args.out,
        model=args.model,
        clip_weights=args.clip_weights,
        weights=args.weights,
        random_weights=args.random_weights,
        seed=args.seed,
        engine=args.engine,
        precision=args.precision,
        max_batch=args.max_batch,
        force=args.force,
        triton=args.triton,
        triton_dir=args.triton_dir,
        torch_weights=args.torch_weights,
        engine_cache=args.engine_cache,
        rebuild_engines=args.rebuild_engines,
        parity_images=args.parity_images,
        ort_variant=not args.no_ort_variant,
        opset=args.opset,
        head_overrides=head_overrides(args),
        allow_parity_drift=args.allow_parity_drift,
    )


def _export(args: argparse.Namespace) -> int:
    cfg = export_cfg(args)
    bundle = export_bundle(cfg, PrintProgress())
    size = sum(f.stat().st_size for f in bundle.root.rglob("*") if f.is_file())
    print(f"wrote bundle {bundle.root} ({size / 2**20:.1f} MiB)")
    if cfg.triton:
        print(f"wrote Triton repository {cfg.triton_repo}")
    return 0


def _add_engines(args: argparse.Namespace) -> int:
    """``--bundle DIR --engine trt``: engines for an existing bundle."""
    if args.engine != "trt":
        raise ConfigError(
            f"--bundle adds TensorRT engines to an existing bundle and needs --engine trt, got "
            f"--engine {args.engine}. Fix: add --engine trt, or use --out to export a new bundle."
        )
    if args.out is not None:
        raise ConfigError("--bundle and --out exclude each other; pass one of them.")
    bundle = add_engines(
        args.bundle,
        engine_cache=args.engine_cache,
        rebuild=args.rebuild_engines,
        max_batch=args.max_batch,
        force=args.force,
        progress=PrintProgress(),
    )
    graphs = sorted(Path(name).stem for name in bundle.manifest.engines)
    print(f"added engines {graphs} to {bundle.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
