"""The export pipeline as a library: CoPS weights -> a deployment bundle, and engines for one.

    cfg = ExportCfg(out="bundles/mvtec", weights="cops_mvtec.pth", clip_weights="ViT-L-14-336px.pt")
    bundle = export_bundle(cfg, progress=PrintProgress())     # -> the written bundle, opened
    add_engines("bundles/mvtec", force=True)                  # TensorRT engines for this GPU

:func:`export_bundle` runs the stages in :data:`STAGES`: loading the model, building the deploy
graphs, exporting vision and head to ONNX (FP16 with FP32 islands for ``precision="fp16"``), the
ONNX Runtime variant of the vision graph (fp32: fused attention sharing ``vision.onnx.data``),
the ONNX checks, the FP16 islands check, TensorRT engines (``engine="trt"``), parity against
PyTorch measured with ONNX Runtime, the atomic bundle write, and the Triton repository
(``triton=True``). It refuses random weights unless ``random_weights`` (the manifest then says
so), an existing bundle unless ``force``, and a bundle whose measured parity exceeds its
precision's tolerance (:data:`PARITY_TOLERANCES`) unless ``allow_parity_drift``. :func:`add_engines` adds TensorRT engines to an
existing bundle, keeping every other file and manifest field.

The library is silent: progress goes to a :class:`~cops_deploy.export.progress.Progress` (stage
begin / end / skip, and notes; see :mod:`cops_deploy.export.progress`, re-exported here), and
:class:`PrintProgress` prints the numbered lines ``cops-export`` shows. Messages and
skip reasons name the ``cops-export`` flag of each :class:`ExportCfg` field (``max_batch`` is
``--max-batch``). Heavy packages (torch, onnx, tensorrt) are imported when a stage needs them.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cops_deploy.errors import ConfigError, ExportError, MissingDependencyError, ParityError
from cops_deploy.export.progress import (
    PrintProgress,
    Progress,
    SilentProgress,
    Stage,
    StageReporter,
)
from cops_deploy.extras import BUILD_INSTALL
from cops_deploy.runtime.bundle import Bundle

__all__ = [
    "ADD_ENGINE_STAGES",
    "ENGINES",
    "PARITY_TOLERANCES",
    "PRECISIONS",
    "STAGES",
    "VISION_ORT",
    "ExportCfg",
    "PrintProgress",
    "Progress",
    "SilentProgress",
    "Stage",
    "add_engines",
    "check_fp16_islands",
    "check_parity",
    "default_engine_cache",
    "export_bundle",
]

ENGINES: tuple[str, ...] = ("onnx", "trt")
PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
VISION_ORT = "vision.ort.onnx"  # the ONNX Runtime variant of vision.onnx (same weights file)
# export_onnx refuses older opsets too (LayerNormalization); checked here before any heavy work.
MIN_OPSET = 17
STAGES: tuple[str, ...] = (
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
ADD_ENGINE_STAGES: tuple[str, ...] = ("engine", "writing bundle")
# Largest max abs difference from PyTorch an exported bundle may have, per precision and output
# (ONNX Runtime on the parity images); the benchmarks' default gates (benchmarks/conftest.py).
PARITY_TOLERANCES: types.MappingProxyType[str, types.MappingProxyType[str, float]] = (
    types.MappingProxyType(
        {
            "fp32": types.MappingProxyType(
                {"anomaly_map_max_abs": 1e-4, "pred_score_max_abs": 1e-5}
            ),
            "fp16": types.MappingProxyType(
                {"anomaly_map_max_abs": 1e-2, "pred_score_max_abs": 1e-2}
            ),
        }
    )
)
_EXAMPLE = "cops-export --model NAME --weights CKPT --clip-weights W --out DIR"


# ----------------------------------------------------------------------------------------------
# Configuration


_BOOL_FIELDS = (
    "random_weights",
    "force",
    "triton",
    "torch_weights",
    "rebuild_engines",
    "ort_variant",
    "allow_parity_drift",
)


@dataclass(frozen=True)
class ExportCfg:
    """What :func:`export_bundle` writes; validated on construction (ConfigError naming the
    field, its ``cops-export`` flag, the value, what is valid and the fix).

    Attributes:
        out: the bundle directory to write (str or Path; stored as a Path).
        model: a registered architecture (``cops_deploy.list_models()``).
        clip_weights: CLIP weights: ``"openai"``, an OpenAI ``.pt`` or safetensors; None: random.
        weights: CoPS checkpoint: reference ``.pth`` or a ``save_model`` folder; None: random.
        random_weights: allow random weights for what is not given (smoke bundle; recorded).
        seed: seed of the random weights.
        engine: ``"onnx"`` (ONNX graphs only) or ``"trt"`` (also TensorRT engines; needs a GPU).
        precision: ``"fp32"`` or ``"fp16"`` (FP16 graphs with FP32 islands).
        max_batch: largest batch of the engine profile and the Triton repository.
        force: replace an existing bundle (and Triton repository).
        triton: also write a Triton model repository (at ``triton_repo``).
        triton_dir: the Triton repository; None: ``OUT-triton`` beside the bundle.
        torch_weights: also store the PyTorch weights (safetensors) for the torch backend.
        engine_cache: TensorRT engine and timing cache folder; None: :func:`default_engine_cache`.
        rebuild_engines: build engines even when the cache has them.
        parity_images: synthetic images of the ONNX Runtime parity measurement.
        ort_variant: fp32: also write the ONNX Runtime variant of the vision graph.
        opset: ONNX opset (>= 17).
        head_overrides: head config values by dotted key, e.g. ``{"head.alpha": 0.3}``.
        allow_parity_drift: write the bundle even when its measured parity exceeds the
            precision's tolerance (:data:`PARITY_TOLERANCES`; the manifest records the drift).
    """

    out: Path
    model: str = "cops-vit-l-14-336"
    clip_weights: str | Path | None = None
    weights: str | Path | None = None
    random_weights: bool = False
    seed: int = 0
    engine: str = "onnx"
    precision: str = "fp32"
    max_batch: int = 8
    force: bool = False
    triton: bool = False
    triton_dir: Path | None = None
    torch_weights: bool = False
    engine_cache: Path | None = None
    rebuild_engines: bool = False
    parity_images: int = 2
    ort_variant: bool = True
    opset: int = 20
    head_overrides: Mapping[str, int | float] = field(default_factory=dict)
    allow_parity_drift: bool = False

    def __post_init__(self) -> None:
        if self.out is None:
            raise ConfigError(
                f"ExportCfg.out is None: --out is required (the bundle directory to write). "
                f"Fix: {_EXAMPLE}, or ExportCfg(out=DIR, ...)."
            )
        for name in ("out", "triton_dir", "engine_cache"):  # frozen: normalise once, here
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _path(name, value))
        overrides = types.MappingProxyType(dict(_mapping(self.head_overrides)))
        object.__setattr__(self, "head_overrides", overrides)
        _check_flags(self)
        _check_numbers(self)
        _check_choices(self)
        _check_weights(self)
        _check_model(self.model, overrides)

    @property
    def triton_repo(self) -> Path:
        """Where the Triton repository goes: ``triton_dir``, else ``OUT-triton`` beside ``out``."""
        return self.triton_dir or self.out.with_name(self.out.name + "-triton")

    def replace(self, **changes: Any) -> ExportCfg:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)


def _path(name: str, value: Any) -> Path:
    if isinstance(value, (str, os.PathLike)):
        return Path(value)
    raise ConfigError(
        f"invalid ExportCfg.{name} {value!r} ({type(value).__name__}); valid: a path (str or "
        f"Path). Fix: pass {name}=Path(...)."
    )


def _mapping(value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    raise ConfigError(
        f"invalid ExportCfg.head_overrides {value!r} ({type(value).__name__}); valid: a mapping "
        f'of dotted head keys to values. Fix: pass head_overrides={{"head.alpha": 0.3}}.'
    )


def _check_flags(cfg: ExportCfg) -> None:
    for name in _BOOL_FIELDS:
        value = getattr(cfg, name)
        if not isinstance(value, bool):
            raise ConfigError(
                f"invalid ExportCfg.{name} {value!r} ({type(value).__name__}); valid: True or "
                f"False. Fix: pass {name}=True or {name}=False."
            )


def _integer(
    name: str, value: Any, least: int, flag: str, what: str, fix: str, owner: str = "ExportCfg"
) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(
            f"invalid {owner}.{name} {value!r}: {flag} must be >= {least}, got {value!r} "
            f"({what}). Fix: {fix}."
        )


def _check_numbers(cfg: ExportCfg) -> None:
    _integer(
        "max_batch",
        cfg.max_batch,
        1,
        "--max-batch",
        "the largest batch of the engine profile and Triton",
        "pass max_batch=8 (--max-batch 8) or another integer >= 1",
    )
    _integer(
        "parity_images",
        cfg.parity_images,
        1,
        "--parity-images",
        "synthetic images of the parity measurement",
        "pass parity_images=2 (--parity-images 2) or another integer >= 1",
    )
    _integer(
        "opset",
        cfg.opset,
        MIN_OPSET,
        "--opset",
        "ONNX opset; LayerNormalization needs 17",
        "pass opset=20 (--opset 20), the default",
    )
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ConfigError(
            f"invalid ExportCfg.seed {cfg.seed!r} ({type(cfg.seed).__name__}); valid: an "
            f"integer (--seed). Fix: pass seed=0."
        )


def _check_choices(cfg: ExportCfg) -> None:
    for name, valid in (("engine", ENGINES), ("precision", PRECISIONS)):
        value = getattr(cfg, name)
        if value not in valid:
            raise ConfigError(
                f"invalid ExportCfg.{name} {value!r} (--{name}); valid: "
                f"{', '.join(map(repr, valid))}. Fix: pass {name}={valid[0]!r}."
            )


def _check_weights(cfg: ExportCfg) -> None:
    if cfg.weights is None and cfg.clip_weights is None and not cfg.random_weights:
        raise ConfigError(
            "no weights given: --weights (ExportCfg.weights, the CoPS checkpoint) and "
            "--clip-weights (ExportCfg.clip_weights, CLIP) are both missing. Fix: pass them, or "
            "--random-weights (random_weights=True) for a smoke bundle (recorded as random in "
            "the manifest)."
        )


def _check_model(model: Any, overrides: Mapping[str, Any]) -> None:
    """The architecture exists and the head overrides are head values of the right type."""
    from cops_deploy.configs import get_config, list_configs

    if not isinstance(model, str):
        raise ConfigError(
            f"invalid ExportCfg.model {model!r} ({type(model).__name__}); valid: a registered "
            f"architecture name, one of {list_configs()}. Fix: pass model='cops-vit-l-14-336'."
        )
    try:
        cfg = get_config(model)
    except ConfigError as exc:  # unknown CoPS model 'nope'; registered models are [...]
        raise ConfigError(
            f"invalid ExportCfg.model {model!r} (--model): {exc}. Fix: pass one of them, or "
            f"register your own architecture with cops_deploy.configs.add_config(path)."
        ) from exc
    for key, value in overrides.items():
        section, _, name = str(key).partition(".")
        default = getattr(cfg.head, name, None) if section == "head" else None
        if default is None or not isinstance(key, str):
            valid = [f"head.{f.name}" for f in dataclasses.fields(cfg.head)]
            raise ConfigError(
                f"invalid ExportCfg.head_overrides key {key!r}; valid: {valid}. Fix: override "
                f'a head value, e.g. head_overrides={{"head.alpha": 0.3}} (--alpha 0.3).'
            )
        kinds = (int,) if isinstance(default, int) else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            kind = "an integer" if kinds == (int,) else "a number"
            raise ConfigError(
                f"invalid ExportCfg.head_overrides[{key!r}] {value!r}; valid: {kind} (the "
                f"config holds {default!r}). Fix: pass {{{key!r}: {default!r}}} or another."
            )
    try:
        get_config(model, **overrides)
    except ConfigError as exc:
        raise ConfigError(
            f"invalid ExportCfg.head_overrides {dict(overrides)} for {model!r}: {exc}. Fix: "
            f"change the values the message names."
        ) from exc


def default_engine_cache() -> Path:
    """TensorRT engine and timing cache folder: ``$XDG_CACHE_HOME`` (else ``~/.cache``)
    ``/cops-deploy/engines``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "cops-deploy" / "engines"


# ----------------------------------------------------------------------------------------------
# Export


def export_bundle(cfg: ExportCfg, progress: Progress | None = None) -> Bundle:
    """Export CoPS as ``cfg`` says and return the written bundle, opened.

    The bundle appears atomically (temp dir + rename) or not at all; with ``cfg.triton`` the
    Triton repository is written after it.

    Temporaries (hidden ``.OUT.tmp-*``/``.OUT.work-*`` folders beside ``cfg.out``) are removed
    on any error or interrupt, and those a killed export left are removed by the next one.

    Raises:
        ConfigError: the bundle exists and ``cfg.force`` is not set, or weights would be random
            without ``cfg.random_weights``.
        MissingDependencyError: ``engine="trt"`` without TensorRT, ``triton`` without the
            Triton writer (checked before any work).
        ParityError: the measured parity exceeds the precision's tolerance and
            ``cfg.allow_parity_drift`` is not set (no bundle is written).
        ExportError: a stage failed (exporter, ONNX check, FP16 islands, engine build).
        WeightsError: a weight file that cannot be read or does not fit the model.
    """
    from cops_deploy.export.bundle_writer import BundleWriter, make_temp_dir
    from cops_deploy.runtime.bundle import open_bundle

    _check_environment(cfg)
    stages = StageReporter(STAGES if cfg.triton else STAGES[:-1], progress)
    out = cfg.out
    with BundleWriter(out, force=cfg.force) as writer:  # refuses an existing bundle up front
        work = make_temp_dir(out, "work")
        try:
            meta, keys = _export_into(cfg, work, stages)
            stages.begin("writing bundle")
            _stage_files(writer, work, keys, cfg.torch_weights)
            writer.set_metadata(**meta)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    stages.end("writing bundle")  # after the writer hashed, checked and renamed the bundle
    if cfg.triton:
        with stages.stage("triton"):
            _triton_writer()(out, cfg.triton_repo, max_batch=cfg.max_batch, force=cfg.force)
    return open_bundle(out, verify=False)  # the writer has just hashed every file


def _check_environment(cfg: ExportCfg) -> None:
    """What the configuration needs from this machine, checked before any heavy work."""
    if cfg.engine == "trt":
        from cops_deploy.export.tensorrt import import_tensorrt

        import_tensorrt()
    if cfg.triton:
        _triton_writer()


def _triton_writer() -> Any:
    try:
        from cops_deploy.export.triton import write_triton_repository
    except ImportError as exc:
        raise MissingDependencyError(
            f"--triton needs cops_deploy.export.triton.write_triton_repository, which is not "
            f"importable here ({exc}). Fix: {BUILD_INSTALL}, or drop --triton."
        ) from exc
    return write_triton_repository


def _stage_files(writer: Any, work: Path, keys: Mapping[str, Any], torch_weights: bool) -> None:
    """Hand the files exported into ``work`` to the bundle writer, with their roles."""
    from cops_deploy.runtime.manifest import ort_variant_role

    writer.add_onnx(work / "vision.onnx", role="vision_onnx")
    writer.add_onnx(work / "head.onnx", role="head_onnx")
    variant = work / VISION_ORT
    if variant.is_file():  # shares vision.onnx.data: no companions of its own
        writer.add_file(variant, role=ort_variant_role("vision"))
    for graph, key in keys.items():
        writer.add_engine(work / f"{graph}.engine", key, name=f"{graph}.engine")
    if torch_weights:
        writer.add_file(work / "model.safetensors", role="torch_model")


def _export_into(
    cfg: ExportCfg, work: Path, stages: StageReporter
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every stage up to the bundle's files (written into ``work``); returns the manifest
    metadata and the engine keys by graph name."""
    from cops_deploy.export.onnx_export import pipeline_parity
    from cops_deploy.export.onnx_export import synthetic_images as images_for

    model, provenance = _load_model(cfg, stages)
    if cfg.torch_weights:
        from cops_deploy.model.weights import save_safetensors

        save_safetensors(model.state_dict(), work / "model.safetensors")
    paths, variant = _export_graphs(cfg, model, work, stages)
    if cfg.precision == "fp16":
        from cops_deploy.export.fp16 import ISLAND_OPS

        with stages.stage("fp16"):
            for name, matmuls in check_fp16_islands(paths).items():
                islands = ", ".join(ISLAND_OPS)
                stages.note(f"{name}: {matmuls} float16 matmuls; islands {islands} in float32")
    else:
        stages.skip("fp16", "precision fp32")
    keys = {}
    if cfg.engine == "trt":
        with stages.stage("engine"):
            keys = _build_engines(
                paths,
                work,
                cfg.precision,
                cfg.max_batch,
                cfg.engine_cache,
                cfg.rebuild_engines,
                stages,
            )
    else:
        stages.skip("engine", "--engine onnx")
    with stages.stage("measuring parity"):
        images = images_for(model.cfg, cfg.parity_images)
        parity = pipeline_parity(model, paths["vision"], paths["head"], images)
        parity["precision"] = cfg.precision
        stages.note(_parity_note("ONNX Runtime vs PyTorch", parity))
        if variant is not None:
            parity["ort_variant"] = pipeline_parity(model, variant, paths["head"], images)
            stages.note(_parity_note("ONNX Runtime variant vs PyTorch", parity["ort_variant"]))
        _gate_parity(parity, cfg, stages)
    return _metadata(model.cfg, provenance, parity, cfg.engine == "trt"), keys


def _load_model(cfg: ExportCfg, stages: StageReporter) -> tuple[Any, Any]:
    from cops_deploy.model.factory import create_model

    with stages.stage("loading model"):
        model = create_model(
            cfg.model,
            clip_weights=cfg.clip_weights,
            cops_weights=cfg.weights,
            seed=cfg.seed,
            **cfg.head_overrides,
        )
        provenance = _provenance(model, cfg.random_weights)
        if provenance.random_weights:
            stages.note("note: random weights (smoke bundle); the manifest records it")
    return model, provenance


def _provenance(model: Any, allow_random: bool) -> Any:
    from cops_deploy.runtime.manifest import Provenance

    prov = getattr(model, "provenance", {"clip": "random", "cops": "random"})
    random_parts = sorted(k for k, v in prov.items() if v == "random")
    if random_parts and not allow_random:
        names = {"clip": "CLIP (--clip-weights)", "cops": "CoPS (--weights)"}
        raise ConfigError(
            f"the {' and '.join(names[p] for p in random_parts)} weights would be random. "
            f"Fix: pass them, or --random-weights (random_weights=True) for a smoke bundle."
        )
    return Provenance(
        random_weights=bool(random_parts),
        checkpoint_sha256=None if prov.get("cops") == "random" else prov.get("cops"),
        clip_sha256=None if prov.get("clip") == "random" else prov.get("clip"),
    )


def _export_graphs(
    cfg: ExportCfg, model: Any, work: Path, stages: StageReporter
) -> tuple[dict[str, Path], Path | None]:
    """The deploy graphs as checked ONNX files in ``work`` (and the ORT variant, if any)."""
    import torch

    from cops_deploy.export import graphs as g
    from cops_deploy.export.onnx_export import check_onnx, export_onnx, export_ort_variant

    with stages.stage("building graphs"):
        vision, head = g.VisionGraph(model), g.head_graph(model)
    paths = {"vision": work / "vision.onnx", "head": work / "head.onnx"}
    for name, graph in (("vision", vision), ("head", head)):
        with stages.stage(f"exporting {name}"), torch.no_grad():
            if cfg.precision == "fp16":
                from cops_deploy.export.fp16 import to_fp16

                graph = to_fp16(graph)  # FP16 copy with FP32 islands, same float32 I/O
            example = g.example_inputs(name, model.cfg)
            export_onnx(graph, paths[name], example, opset=cfg.opset, check=False)
    variant = None
    if cfg.precision != "fp32" or not cfg.ort_variant:
        why = "--no-ort-variant" if not cfg.ort_variant else f"precision {cfg.precision}"
        stages.skip("ort variant", why)
    else:
        with stages.stage("ort variant"), torch.no_grad():
            variant = export_ort_variant(
                g.VisionGraph(model, attn_impl=g.FUSED_ATTN),
                paths["vision"],
                work / VISION_ORT,
                g.example_inputs("vision", model.cfg),
                opset=cfg.opset,
            )
    with stages.stage("checking"):
        for name, graph in (("vision", vision), ("head", head)):
            check_onnx(paths[name], graph.input_names, graph.output_names)
    return paths, variant


def check_parity(parity: Mapping[str, Any], precision: str) -> list[str]:
    """The outputs whose measured difference exceeds ``precision``'s tolerance, in words
    ('anomaly_map_max_abs 0.02 > 0.0001'); the ONNX Runtime variant's as 'ort_variant.NAME'.
    A figure that is missing or not finite counts as exceeding."""
    tolerances = PARITY_TOLERANCES[precision]
    drifts = []
    for prefix, figures in (("", parity), ("ort_variant.", parity.get("ort_variant"))):
        if figures is None:
            continue
        for name, tolerance in tolerances.items():
            value = figures.get(name)
            ok = isinstance(value, int | float) and value == value and abs(value) <= tolerance
            if not ok:
                drifts.append(
                    f"{prefix}{name} {value:.3g} > {tolerance:g}"
                    if isinstance(value, int | float)
                    else f"{prefix}{name} {value!r} (no finite figure)"
                )
    return drifts


def _gate_parity(parity: dict[str, Any], cfg: ExportCfg, stages: StageReporter) -> None:
    """Refuse a bundle whose parity exceeds the tolerance unless allowed; record the outcome."""
    drifts = check_parity(parity, cfg.precision)
    parity["tolerance"] = dict(PARITY_TOLERANCES[cfg.precision])
    if not drifts:
        return
    listed = "; ".join(drifts)
    if not cfg.allow_parity_drift:
        raise ParityError(
            f"parity check failed, no bundle written: ONNX Runtime differs from PyTorch beyond "
            f"the {cfg.precision} tolerance on {listed} (max abs difference over "
            f"{parity.get('images')} synthetic images). Fix: report it with the export log (a "
            f"graph computes something else than the model), try --precision fp32 or another "
            f"--opset; or pass --allow-parity-drift (ExportCfg.allow_parity_drift=True) to write "
            f"it anyway, recorded in the manifest."
        )
    parity["drift_allowed"] = drifts
    stages.note(
        f"warning: parity exceeds the {cfg.precision} tolerance on {listed}; written "
        f"anyway (--allow-parity-drift), recorded in the manifest"
    )


def _parity_note(what: str, parity: Mapping[str, Any]) -> str:
    return (
        f"{what}: anomaly map max diff {parity['anomaly_map_max_abs']:.3g}, score max "
        f"diff {parity['pred_score_max_abs']:.3g}"
    )


def check_fp16_islands(paths: Mapping[str, str | os.PathLike[str]]) -> dict[str, int]:
    """Check that FP16 graphs compute every FP32-island op, and every attention-logit matmul,
    in float32.

    ``paths`` maps graph names to ONNX files. Returns the number of float16 matmuls per graph;
    raises ExportError naming the graph and the ops computed in another type.
    """
    from cops_deploy.export.fp16 import ISLAND_OPS, logit_matmul_report, precision_report

    matmuls = {}
    for name, path in paths.items():
        report = precision_report(path)
        wrong = {
            op: kinds
            for op, kinds in report.items()
            if op in ISLAND_OPS and set(kinds) - {"float32"}
        }
        if wrong:
            raise ExportError(
                f"FP16 {name} graph {path} computes FP32-island ops in another type: {wrong}. "
                f"Fix: keep these ops in float32 in cops_deploy/export/graphs.py."
            )
        logits = logit_matmul_report(path)
        if set(logits) - {"float32"}:
            raise ExportError(
                f"FP16 {name} graph {path} computes attention logits (the MatMul before a "
                f"Softmax) in {logits}; valid: float32 only (float16 logits overflow with "
                f"CLIP's outlier channels). Fix: compute them with fp32_logits_attention in "
                f"cops_deploy/export/graphs.py."
            )
        matmuls[name] = sum(
            kinds.get("float16", 0) for op, kinds in report.items() if op in ("MatMul", "Gemm")
        )
    return matmuls


def _build_engines(
    paths: Mapping[str, Path],
    work: Path,
    precision: str,
    max_batch: int,
    cache: Path | None,
    rebuild: bool,
    stages: StageReporter,
) -> dict[str, Any]:
    """Build (or reuse from the cache) one engine per graph into ``work``; returns the keys."""
    from cops_deploy.export.tensorrt import build_engine_cached

    keys = {}
    for name, onnx_path in paths.items():
        engine, key = build_engine_cached(
            onnx_path,
            cache or default_engine_cache(),
            name,
            precision,
            max_batch,
            force=rebuild,
        )
        shutil.copyfile(engine, work / f"{name}.engine")
        keys[name] = key
        stages.note(f"{name}: {engine} ({key.profile}, {key.gpu_name})")
    return keys


def _metadata(
    cfg: Any, provenance: Any, parity: dict[str, Any], with_tensorrt: bool
) -> dict[str, Any]:
    """The manifest fields of an exported bundle (``BundleWriter.set_metadata`` keywords)."""
    import onnx
    import onnxruntime
    import torch

    from cops_deploy.runtime.contract import graph_specs
    from cops_deploy.runtime.manifest import GraphIO

    graphs = {}
    for name in ("vision", "head"):
        inputs, outputs = graph_specs(name, cfg)
        graphs[name] = GraphIO(file=f"{name}.onnx", inputs=inputs, outputs=outputs)
    versions = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    if with_tensorrt:
        from cops_deploy.export.tensorrt import import_tensorrt

        versions["tensorrt"] = str(import_tensorrt().__version__)
    return {
        "model_config": cfg.to_dict(),  # the writer derives manifest.preprocess from it
        "graphs": graphs,
        "provenance": provenance,
        "parity": parity,
        "tool_versions": versions,
    }


# ----------------------------------------------------------------------------------------------
# Engines for an existing bundle


def add_engines(
    bundle_dir: str | os.PathLike[str],
    *,
    engine_cache: str | os.PathLike[str] | None = None,
    rebuild: bool = False,
    max_batch: int = 8,
    force: bool = False,
    progress: Progress | None = None,
) -> Bundle:
    """Build TensorRT engines for an existing bundle's graphs (at the graphs' own precision) and
    rewrite the bundle with them, atomically; every other file and manifest field is kept.

    ``engine_cache`` (None: :func:`default_engine_cache`) holds built engines and the timing
    cache; ``rebuild`` builds even when it has them; ``force`` replaces engines the bundle
    already holds. Returns the rewritten bundle, opened.

    Raises:
        ConfigError: ``max_batch`` < 1, or the bundle has engines and ``force`` is not set.
        MissingDependencyError: TensorRT is not importable here.
        BundleError: ``bundle_dir`` is not a valid bundle.
        EngineBuildError: TensorRT could not build an engine.
    """
    from cops_deploy.export.bundle_writer import BundleWriter
    from cops_deploy.export.tensorrt import import_tensorrt, onnx_precision
    from cops_deploy.runtime.bundle import open_bundle
    from cops_deploy.runtime.manifest import ROLE_ENGINE

    _integer(
        "max_batch",
        max_batch,
        1,
        "--max-batch",
        "the largest batch of the engine profile",
        "pass max_batch=8 (--max-batch 8) or another integer >= 1",
        owner="add_engines",
    )
    import_tensorrt()
    bundle = open_bundle(bundle_dir)
    manifest = bundle.manifest
    if manifest.engines and not force:
        raise ConfigError(
            f"bundle {bundle.root} already has engines {sorted(manifest.engines)}. Fix: pass "
            f"--force (force=True) to rebuild them for this machine."
        )
    stages = StageReporter(ADD_ENGINE_STAGES, progress)
    cache = None if engine_cache is None else Path(engine_cache)
    from cops_deploy.export.bundle_writer import clean_stale_temporaries, make_temp_dir

    clean_stale_temporaries(bundle.root)
    work = make_temp_dir(bundle.root, "engines")
    try:
        paths = {name: bundle.root / manifest.graphs[name].file for name in ("vision", "head")}
        precision = onnx_precision(paths["vision"])
        with stages.stage("engine"):
            keys = _build_engines(paths, work, precision, max_batch, cache, rebuild, stages)
        stages.begin("writing bundle")
        with BundleWriter(bundle.root, force=True) as writer:
            for entry in manifest.files:
                if entry.role != ROLE_ENGINE:
                    writer.add_file(bundle.root / entry.path, entry.role, entry.path)
            for name, key in keys.items():
                writer.add_engine(work / f"{name}.engine", key, name=f"{name}.engine")
            writer.set_metadata(**_kept_metadata(manifest))
        stages.end("writing bundle")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return open_bundle(bundle.root, verify=False)


def _kept_metadata(manifest: Any) -> dict[str, Any]:
    """An existing manifest's fields as ``BundleWriter.set_metadata`` keywords (all kept)."""
    return {
        "model_config": manifest.model_config,
        "graphs": manifest.graphs,
        "provenance": manifest.provenance,
        "parity": manifest.parity,
        "threshold": manifest.threshold,
        "tool_versions": manifest.tool_versions,
        "package_version": manifest.package_version,
    }
