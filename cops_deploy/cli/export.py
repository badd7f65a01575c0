"""``cops-export``: CoPS weights -> a deployment bundle (ONNX graphs, optional TensorRT engines).

    cops-export --model cops-vit-l-14-336 --clip-weights ViT-L-14-336px.pt \\
        --weights cops_mvtec.pth --engine onnx --precision fp32 --max-batch 8 --out bundles/mvtec
    cops-export --model cops-tiny --random-weights --out /tmp/smoke         # smoke bundle
    cops-export --engine trt --bundle bundles/mvtec --force                 # engines on this GPU

Stages: loading the model, building graphs, exporting vision, exporting head, ort variant (fp32:
the vision graph with fused ONNX Runtime attention, sharing vision.onnx.data), checking, fp16
(islands check), engine, measuring parity, writing bundle (atomic), and the Triton repository
with ``--triton``. Without weights it refuses unless ``--random-weights`` (the manifest then
says so). Failures print one message naming what failed and exit with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cops_deploy.errors import ConfigError, CopsError, MissingDependencyError

__all__ = ["build_parser", "main"]

PROG = "cops-export"
ENGINES = ("onnx", "trt")
PRECISIONS = ("fp32", "fp16")
VISION_ORT = "vision.ort.onnx"  # the ONNX Runtime variant of vision.onnx (same weights file)


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
    p.add_argument("--alpha", type=float, help="override head.alpha (SAGA weight)")
    p.add_argument("--beta", type=float, help="override head.beta (score weight)")
    p.add_argument("--kernel", type=int, help="override head.neighbour_kernel")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cops-export``; returns the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return int(exc.code or 0)
    try:
        if args.bundle is not None:
            return _add_engines(args)
        return _export(args)
    except CopsError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """Numbered stage lines with timings: ``[3/9] exporting head ... done (12.3 s)``."""

    def __init__(self, stages: Sequence[str]) -> None:
        self.stages = list(stages)

        self._start: dict[str, float] = {}

    def _tag(self, name: str) -> str:
        return f"[{self.stages.index(name) + 1}/{len(self.stages)}] {name}"

    def begin(self, name: str) -> None:
        print(f"{self._tag(name)} ...", flush=True)
        self._start[name] = time.perf_counter()

    def end(self, name: str) -> None:
        elapsed = time.perf_counter() - self._start.pop(name)
        print(f"{self._tag(name)}: done ({elapsed:.1f} s)", flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.begin(name)
        yield
        self.end(name)

    def skip(self, name: str, why: str) -> None:
        print(f"{self._tag(name)}: skipped ({why})", flush=True)


STAGES = (
    "loading model",
    "building graphs",
    "exporting vision",
    "exporting head",
    "ort variant",
    "checking",
    "fp16",
    "engine",
    "measuring parity",
    "writing bundle",
    "triton",
)


# ----------------------------------------------------------------------------------------------
# Checks that run before any heavy work


def _check_args(args: argparse.Namespace) -> None:
    if args.out is None:
        raise ConfigError(
            f"--out is required (the bundle directory to write). Fix: {PROG} "
            f"--model NAME --weights CKPT --clip-weights W --out DIR"
        )
    if args.max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {args.max_batch}.")
    if args.parity_images < 1:
        raise ConfigError(f"--parity-images must be >= 1, got {args.parity_images}.")
    if args.weights is None and args.clip_weights is None and not args.random_weights:
        raise ConfigError(
            "no weights given: --weights (CoPS checkpoint) and --clip-weights (CLIP) are both "
            "missing. Fix: pass them, or --random-weights for a smoke bundle (recorded as random "
            "in the manifest)."
        )
    if args.engine == "trt":
        from cops_deploy.export.tensorrt import import_tensorrt

        import_tensorrt()
    if args.triton:
        _triton_writer()


def _triton_writer() -> Any:
    try:
        from cops_deploy.export.triton import write_triton_repository
    except ImportError as exc:
        raise MissingDependencyError(
            f"--triton needs cops_deploy.export.triton.write_triton_repository, which is not "
            f"importable here ({exc}). Fix: install a cops-deploy that ships it with its "
            f"dependencies (pip install 'cops-deploy[dev]'), or drop --triton."
        ) from exc
    return write_triton_repository


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    over = {"head.alpha": args.alpha, "head.beta": args.beta, "head.neighbour_kernel": args.kernel}
    return {k: v for k, v in over.items() if v is not None}


def _provenance(model: Any, allow_random: bool) -> Any:
    from cops_deploy.runtime.bundle import Provenance

    prov = getattr(model, "provenance", {"clip": "random", "cops": "random"})
    random_parts = sorted(k for k, v in prov.items() if v == "random")
    if random_parts and not allow_random:
        names = {"clip": "CLIP (--clip-weights)", "cops": "CoPS (--weights)"}
        raise ConfigError(
            f"the {' and '.join(names[p] for p in random_parts)} weights would be random. "
            f"Fix: pass them, or --random-weights for a smoke bundle."
        )
    return Provenance(
        random_weights=bool(random_parts),
        checkpoint_sha256=None if prov.get("cops") == "random" else prov.get("cops"),
        clip_sha256=None if prov.get("clip") == "random" else prov.get("clip"),
    )


# ----------------------------------------------------------------------------------------------
# Export


def _export(args: argparse.Namespace) -> int:
    _check_args(args)
    from cops_deploy.export.bundle_writer import BundleWriter
    from cops_deploy.runtime.bundle import ort_variant_role

    progress = _Progress(STAGES if args.triton else STAGES[:-1])
    out = args.out
    with BundleWriter(out, force=args.force) as writer:  # refuses an existing bundle up front
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.work-", dir=out.parent) as work:
            meta, keys = _export_into(args, Path(work), progress)
            progress.begin("writing bundle")
            writer.add_onnx(Path(work) / "vision.onnx", role="vision_onnx")
            writer.add_onnx(Path(work) / "head.onnx", role="head_onnx")
            variant = Path(work) / VISION_ORT
            if variant.is_file():  # shares vision.onnx.data: no companions of its own
                writer.add_file(variant, role=ort_variant_role("vision"))
            for graph, key in keys.items():
                writer.add_engine(Path(work) / f"{graph}.engine", key, name=f"{graph}.engine")
            if args.torch_weights:
                writer.add_file(Path(work) / "model.safetensors", role="torch_model")
            writer.set_metadata(**meta)
    progress.end("writing bundle")  # after the writer hashed, checked and renamed the bundle
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote bundle {out} ({size / 2**20:.1f} MiB)")
    if args.triton:
        with progress.stage("triton"):
            repo = args.triton_dir or out.with_name(out.name + "-triton")
            _triton_writer()(out, repo, max_batch=args.max_batch, force=args.force)
            print(f"wrote Triton repository {repo}")
    return 0


def _export_into(
    args: argparse.Namespace, work: Path, progress: _Progress
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every stage up to the bundle's files (written into ``work``); returns the manifest
    metadata and the engine keys by graph name."""
    import torch

    from cops_deploy import create_model
    from cops_deploy.export import graphs as g
    from cops_deploy.export.onnx_export import (
        check_onnx,
        export_onnx,
        export_ort_variant,
        pipeline_parity,
    )
    from cops_deploy.export.onnx_export import synthetic_images as images_for

    with progress.stage("loading model"):
        model = create_model(
            args.model,
            clip_weights=args.clip_weights,
            cops_weights=args.weights,
            seed=args.seed,
            **_overrides(args),
        )
        provenance = _provenance(model, args.random_weights)
        if provenance.random_weights:
            print("    note: random weights (smoke bundle); the manifest records it")
    cfg = model.cfg
    if args.torch_weights:
        from cops_deploy.model.weights import save_safetensors

        save_safetensors(model.state_dict(), work / "model.safetensors")
    with progress.stage("building graphs"):
        vision, head = g.VisionGraph(model), g.HeadGraph(model)
    export = export_onnx
    if args.precision == "fp16":
        from cops_deploy.export.fp16 import export_fp16_onnx as export
    paths = {"vision": work / "vision.onnx", "head": work / "head.onnx"}
    for name, graph in (("vision", vision), ("head", head)):
        with progress.stage(f"exporting {name}"), torch.no_grad():
            export(graph, paths[name], g.example_inputs(name, cfg), opset=args.opset, check=False)
    variant = None
    if args.precision != "fp32" or args.no_ort_variant:
        why = "--no-ort-variant" if args.no_ort_variant else f"precision {args.precision}"
        progress.skip("ort variant", why)
    else:
        with progress.stage("ort variant"), torch.no_grad():
            variant = export_ort_variant(
                g.VisionGraph(model, attn_impl=g.FUSED_ATTN),
                paths["vision"],
                work / VISION_ORT,
                g.example_inputs("vision", cfg),
                opset=args.opset,
            )
    with progress.stage("checking"):
        for name, graph in (("vision", vision), ("head", head)):
            check_onnx(paths[name], graph.input_names, graph.output_names)
    if args.precision == "fp16":
        with progress.stage("fp16"):
            _check_islands(paths)
    else:
        progress.skip("fp16", "precision fp32")
    keys = {}
    if args.engine == "trt":
        with progress.stage("engine"):
            keys = _build_engines(args, paths, work)
    else:
        progress.skip("engine", "--engine onnx")
    with progress.stage("measuring parity"):
        images = images_for(cfg, args.parity_images)
        parity = pipeline_parity(model, paths["vision"], paths["head"], images)
        parity["precision"] = args.precision
        _print_parity("ONNX Runtime vs PyTorch", parity)
        if variant is not None:
            parity["ort_variant"] = pipeline_parity(model, variant, paths["head"], images)
            _print_parity("ONNX Runtime variant vs PyTorch", parity["ort_variant"])
    return _metadata(cfg, provenance, parity, args), keys


def _print_parity(what: str, parity: dict[str, Any]) -> None:
    print(
        f"    {what}: anomaly map max diff {parity['anomaly_map_max_abs']:.3g}, score max "
        f"diff {parity['pred_score_max_abs']:.3g}"
    )


def _check_islands(paths: dict[str, Path]) -> None:
    from cops_deploy.export.fp16 import ISLAND_OPS, precision_report

    for name, path in paths.items():
        report = precision_report(path)
        wrong = {
            op: types
            for op, types in report.items()
            if op in ISLAND_OPS and set(types) - {"float32"}
        }
        if wrong:
            from cops_deploy.errors import ExportError

            raise ExportError(
                f"FP16 {name} graph {path} computes FP32-island ops in another type: {wrong}. "
                f"Fix: keep these ops in float32 in cops_deploy/export/graphs.py."
            )
        n16 = sum(t.get("float16", 0) for op, t in report.items() if op in ("MatMul", "Gemm"))
        print(f"    {name}: {n16} float16 matmuls; islands {', '.join(ISLAND_OPS)} in float32")


def _engine_cache(args: argparse.Namespace) -> Path:
    if args.engine_cache is not None:
        return args.engine_cache
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cops-deploy" / "engines"


def _build_engines(args: argparse.Namespace, paths: dict[str, Path], work: Path) -> dict[str, Any]:
    """Build (or reuse from the cache) one engine per graph into ``work``; returns the keys."""
    import shutil

    from cops_deploy.export.tensorrt import build_engine_cached

    keys = {}
    for name, onnx_path in paths.items():
        engine, key = build_engine_cached(
            onnx_path,
            _engine_cache(args),
            name,
            args.precision,
            args.max_batch,
            force=args.rebuild_engines,
        )
        shutil.copyfile(engine, work / f"{name}.engine")
        keys[name] = key
        print(f"    {name}: {engine} ({key.profile}, {key.gpu_name})")
    return keys


def _metadata(cfg: Any, provenance: Any, parity: dict[str, Any], args: Any) -> dict[str, Any]:
    import onnx
    import onnxruntime
    import torch

    from cops_deploy.runtime.bundle import GraphIO
    from cops_deploy.runtime.contract import graph_specs

    graphs = {}
    for name in ("vision", "head"):
        inputs, outputs = graph_specs(name, cfg)
        graphs[name] = GraphIO(file=f"{name}.onnx", inputs=inputs, outputs=outputs)
    versions = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if args.engine == "trt":
        from cops_deploy.export.tensorrt import import_tensorrt

        versions["tensorrt"] = str(import_tensorrt().__version__)
    return {
        "model_config": cfg.to_dict(),
        "graphs": graphs,
        "provenance": provenance,
        "parity": parity,
        "tool_versions": versions,
    }


# ----------------------------------------------------------------------------------------------
# Engines for an existing bundle


def _add_engines(args: argparse.Namespace) -> int:
    """``--bundle DIR --engine trt``: build engines for the bundle's graphs and rewrite it with
    them (every other file and the manifest fields are kept)."""
    if args.engine != "trt":
        raise ConfigError(
            f"--bundle adds TensorRT engines to an existing bundle and needs --engine trt, got "
            f"--engine {args.engine}. Fix: add --engine trt, or use --out to export a new bundle."
        )
    if args.out is not None:
        raise ConfigError("--bundle and --out exclude each other; pass one of them.")
    from cops_deploy.export.bundle_writer import BundleWriter
    from cops_deploy.export.tensorrt import import_tensorrt, onnx_precision
    from cops_deploy.runtime.bundle import ROLE_ENGINE, open_bundle

    import_tensorrt()
    bundle = open_bundle(args.bundle)
    manifest = bundle.manifest
    if manifest.engines and not args.force:
        raise ConfigError(
            f"bundle {bundle.root} already has engines {sorted(manifest.engines)}. Fix: pass "
            f"--force to rebuild them for this machine."
        )
    progress = _Progress(("engine", "writing bundle"))
    with tempfile.TemporaryDirectory(prefix=".engines-", dir=bundle.root.parent) as work:
        paths = {name: bundle.root / manifest.graphs[name].file for name in ("vision", "head")}
        args.precision = onnx_precision(paths["vision"])
        with progress.stage("engine"):
            keys = _build_engines(args, paths, Path(work))
        progress.begin("writing bundle")
        with BundleWriter(bundle.root, force=True) as writer:
            for entry in manifest.files:
                if entry.role != ROLE_ENGINE:
                    writer.add_file(bundle.root / entry.path, entry.role, entry.path)
            for name, key in keys.items():
                writer.add_engine(Path(work) / f"{name}.engine", key, name=f"{name}.engine")
            writer.set_metadata(
                model_config=manifest.model_config,
                graphs=manifest.graphs,
                provenance=manifest.provenance,
                parity=manifest.parity,
                threshold=manifest.threshold,
                tool_versions=manifest.tool_versions,
                package_version=manifest.package_version,
            )
        progress.end("writing bundle")
    print(f"added engines {sorted(keys)} to {bundle.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
