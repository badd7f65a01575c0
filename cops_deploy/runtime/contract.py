"""The exporter/runtime contract of a bundle's two graphs, defined once: tensor names and specs.

    vision: image (B, 3, S, S) -> image_embedding (B, E), patch_embedding (B, N, E)
            (AnomalyCLIP: (B, L*N, E), its L feature layers stacked along the token axis)
    head:   image_embedding, patch_embedding -> pred_score (B,), anomaly_map (B, S, S)

The deploy graphs (``cops_deploy.export.graphs``) name their ONNX inputs and outputs from here,
the bundle manifest lists these specs, and every backend feeds and reads these names. Torch-free.
"""

from __future__ import annotations

from cops_deploy.configs import CopsCfg
from cops_deploy.errors import ConfigError
from cops_deploy.runtime.manifest import TensorSpec

__all__ = [
    "ANOMALY_MAP",
    "BATCH_DIM",
    "GRAPHS",
    "GRAPH_IO_NAMES",
    "IMAGE",
    "IMAGE_EMBEDDING",
    "PATCH_EMBEDDING",
    "PRED_SCORE",
    "graph_specs",
]

IMAGE = "image"
IMAGE_EMBEDDING = "image_embedding"
PATCH_EMBEDDING = "patch_embedding"
PRED_SCORE = "pred_score"
ANOMALY_MAP = "anomaly_map"
BATCH_DIM = "batch"  # the name of the dynamic batch dimension of every graph input and output
GRAPHS: tuple[str, ...] = ("vision", "head")  # in the order they run
GRAPH_IO_NAMES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "vision": ((IMAGE,), (IMAGE_EMBEDDING, PATCH_EMBEDDING)),
    "head": ((IMAGE_EMBEDDING, PATCH_EMBEDDING), (PRED_SCORE, ANOMALY_MAP)),
}


def graph_specs(name: str, cfg: CopsCfg) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """(inputs, outputs) of the ``"vision"`` or ``"head"`` graph of ``cfg``; all float32."""
    s, e = cfg.vision.input_size, cfg.embed_dim
    n = cfg.vision.grid**2 * cfg.patch_sets  # AnomalyCLIP: one N-token set per feature layer
    b = BATCH_DIM
    shapes: dict[str, tuple[int | str, ...]] = {
        IMAGE: (b, 3, s, s),
        IMAGE_EMBEDDING: (b, e),
        PATCH_EMBEDDING: (b, n, e),
        PRED_SCORE: (b,),
        ANOMALY_MAP: (b, s, s),
    }
    if name not in GRAPH_IO_NAMES:
        raise ConfigError(f"unknown deploy graph {name!r}; valid: {list(GRAPHS)}")
    inputs, outputs = GRAPH_IO_NAMES[name]
    return (
        tuple(TensorSpec(n_, "float32", shapes[n_]) for n_ in inputs),
        tuple(TensorSpec(n_, "float32", shapes[n_]) for n_ in outputs),
    )
