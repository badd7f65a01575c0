"""PyTorch CoPS, faithful to METHOD.md: backbone, text tower, ESTS, ICTS, head, weight I/O; and
AnomalyCLIP (``kind: "anomalyclip"`` configs) on the same CLIP towers."""

from cops_deploy.model.anomalyclip import AnomalyClipModel
from cops_deploy.model.cops import CopsIntermediates, CopsModel, CopsOutput
from cops_deploy.model.factory import create_model, load_model, save_model

__all__ = [
    "AnomalyClipModel",
    "CopsIntermediates",
    "CopsModel",
    "CopsOutput",
    "create_model",
    "load_model",
    "save_model",
]
