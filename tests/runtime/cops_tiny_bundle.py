"""Test helper: tiny cops-tiny bundles, built without the real exporter.

The two deploy graphs are exported here with ``torch.onnx.export(dynamo=True)`` from small
wrappers (vision: ``model.encode_image``; head: the rest of ``CopsModel.forward_intermediates``
from the embeddings), with a batch-2 example and a dynamic batch, and written with the build
side's ``BundleWriter``. The ONNX export runs once per test session (cached under the session's
base temp directory); bundles are cheap copies. When the real exporter lands, swap
``export_tiny_graphs`` for it.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cops_deploy.runtime.manifest import EngineKey, GraphIO, Provenance, TensorSpec

SEED = 0
MODEL = "cops-tiny"
_DONE = "export.json"
_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


def reference_model() -> Any:
    """The PyTorch cops-tiny the bundles are exported from (seeded, eval mode, sdpa)."""
    from cops_deploy import create_model

    return create_model(MODEL, seed=SEED)


def _wrappers(model: Any) -> tuple[Any, Any]:
    import torch

    from cops_deploy.model.head import (
        cosine_distance_min,
        gaussian_blur,
        neighbour_average,
        normalize,
        saga_weight,
        upsample_nearest,
    )

    class VisionGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            g, patches = self.model.encode_image(image)
            return g, patches

    class HeadGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, g: torch.Tensor, patches: torch.Tensor) -> tuple[torch.Tensor, ...]:
            m, head = self.model, self.model.cfg.head
            avg = neighbour_average(patches, head.neighbour_kernel)  # (B, N, E)
            proto_n, proto_a = m.prototypes(avg)
            d_n = cosine_distance_min(avg, proto_n)
            d_a = cosine_distance_min(avg, proto_a)
            text = m.text_features(proto_n, proto_a, m.class_bias(g.shape[0]))  # (B, 2, E)
            probs = (normalize(avg) @ text.transpose(1, 2) / head.tau).softmax(dim=-1)
            probs_w = probs * saga_weight(d_n, d_a, head.alpha).unsqueeze(-1)
            logits = (normalize(g).unsqueeze(1) @ text.transpose(1, 2)).squeeze(1) / head.tau
            image_prob = logits.softmax(dim=-1)[:, 1]  # (B,)
            patch_max = probs_w[..., 1].amax(dim=-1)  # (B,)
            score = head.beta * image_prob + (1.0 - head.beta) * patch_max
            size = m.cfg.vision.input_size
            amap = gaussian_blur(upsample_nearest(probs_w[..., 1], size), head.sigma, head.truncate)
            return score, amap

    return VisionGraph().eval(), HeadGraph().eval()


def export_tiny_graphs(out_dir: Path) -> Path:
    """Export vision.onnx and head.onnx (external data beside them) once into ``out_dir``."""
    if (out_dir / _DONE).is_file():
        return out_dir
    import torch

    from cops_deploy import create_model, save_model

    out_dir.mkdir(parents=True, exist_ok=True)
    ref = reference_model()
    model = create_model(MODEL, seed=SEED, attn_impl="explicit")
    model.load_state_dict(ref.state_dict())
    vision, head = _wrappers(model)
    size = model.cfg.vision.input_size
    image = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        g, patches = model.encode_image(image)
    with warnings.catch_warnings():
        # torch.onnx notes that the two head inputs share the one 'batch' dim: intended.
        warnings.filterwarnings("ignore", message=".*axis name: batch will not be used.*")
        _export(vision, head, image, g, patches, out_dir)
    save_model(ref, out_dir / "torch")
    (out_dir / _DONE).write_text(json.dumps({"model": MODEL, "seed": SEED}))
    return out_dir


def _export(vision: Any, head: Any, image: Any, g: Any, patches: Any, out_dir: Path) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=64)
    torch.onnx.export(
        vision,
        (image,),
        str(out_dir / "vision.onnx"),
        dynamo=True,
        input_names=["image"],
        output_names=["image_embedding", "patch_embedding"],
        dynamic_shapes={"image": {0: batch}},
        external_data=True,
        verbose=False,
    )
    torch.onnx.export(
        head,
        (g, patches),
        str(out_dir / "head.onnx"),
        dynamo=True,
        input_names=["image_embedding", "patch_embedding"],
        output_names=["pred_score", "anomaly_map"],
        dynamic_shapes={"g": {0: batch}, "patches": {0: batch}},
        external_data=True,
        verbose=False,
    )


def graph_io(onnx_path: Path, name: str) -> GraphIO:
    """The manifest entry of an ONNX file, read from its inputs and outputs."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)

    def spec(value: Any) -> TensorSpec:
        t = value.type.tensor_type
        dims = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
        dims = tuple("batch" if i == 0 and isinstance(d, str) else d for i, d in enumerate(dims))
        return TensorSpec(value.name, _ONNX_DTYPES[t.elem_type], dims)

    return GraphIO(
        file=name,
        inputs=tuple(spec(v) for v in model.graph.input),
        outputs=tuple(spec(v) for v in model.graph.output),
    )


def fake_engine_key(**changes: str) -> EngineKey:
    """An EngineKey for a fake engine file (TensorRT never runs on it in CPU tests)."""
    values = {
        "onnx_sha256": "a" * 64,
        "tensorrt_version": "10.13.0",
        "gpu_name": "NVIDIA H200",
        "compute_capability": "9.0",
        "precision": "fp32",
        "profile": "b1-4-8",
    }
    values.update(changes)
    return EngineKey(**values)


def write_tiny_bundle(
    out: Path,
    graphs_dir: Path,
    torch_weights: bool = True,
    threshold: float | None = None,
    engines: bool = False,
    engine_changes: Mapping[str, str] | None = None,
    preprocess: Mapping[str, Any] | None = None,
) -> Path:
    """Write a cops-tiny bundle from ``export_tiny_graphs`` output into ``out``.

    ``preprocess`` overrides values of the model config's preprocessing (e.g. mean and std; the
    graphs do not depend on them)."""
    from cops_deploy.configs import get_config
    from cops_deploy.export.bundle_writer import BundleWriter
    from cops_deploy.runtime.bundle import sha256_file

    cfg = get_config(MODEL)
    with BundleWriter(out) as writer:
        writer.add_onnx(graphs_dir / "vision.onnx", role="vision_onnx")
        writer.add_onnx(graphs_dir / "head.onnx", role="head_onnx")
        if torch_weights:
            writer.add_file(
                graphs_dir / "torch" / "model.safetensors",
                role="torch_model",
                name="torch/model.safetensors",
                companions=[graphs_dir / "torch" / "config.json"],
            )
        if engines:
            for graph in ("vision", "head"):
                sha = sha256_file(graphs_dir / f"{graph}.onnx")
                changes = {"onnx_sha256": sha, **dict(engine_changes or {})}
                key = fake_engine_key(**changes)
                fake = graphs_dir / "fake_engines" / f"{graph}.engine"
                fake.parent.mkdir(exist_ok=True)
                fake.write_bytes(b"not a real engine")
                writer.add_engine(fake, key, f"{graph}.engine")
        model_config = cfg.to_dict()
        model_config["preprocess"] = {**model_config["preprocess"], **dict(preprocess or {})}
        writer.set_metadata(
            model_config=model_config,
            graphs={
                "vision": graph_io(graphs_dir / "vision.onnx", "vision.onnx"),
                "head": graph_io(graphs_dir / "head.onnx", "head.onnx"),
            },
            provenance=Provenance(random_weights=True),
            threshold=threshold,
        )
    return out


def rng_images(count: int, seed: int = 0) -> list[np.ndarray]:
    """``count`` random uint8 RGB images of different sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(120, 90), (64, 64), (98, 98), (50, 140), (200, 33), (77, 77), (31, 64), (90, 120)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(count)]
