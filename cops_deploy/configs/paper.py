"""The paper's backbone table (CoPS, Table S3) as data: which registered name runs each row.

The accuracy figures are the paper's own (zero-shot on MVTec-AD, trained on VisA), quoted, not
measured here; ``benchmarks/zoo.py`` sets them against latency measured on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PaperRow:
    """One row of Table S3: the model name to ask for and the paper's MVTec-AD figures (%)."""

    model: str
    backbone: str
    input_size: int
    image_auroc: float
    pixel_auroc: float


# Names are spelled NAME@SIZE throughout so each row says its input size; the default size of a
# registered architecture resolves to the plain name (cops-vit-l-14-336@518 is the default).
TABLE_S3: tuple[PaperRow, ...] = (
    PaperRow("cops-vit-b-16-224@336", "ViT-B/16@224px", 336, 85.4, 88.6),
    PaperRow("cops-vit-l-14-224@336", "ViT-L/14@224px", 336, 89.9, 91.5),
    PaperRow("cops-vit-l-14-224@518", "ViT-L/14@224px", 518, 90.0, 91.8),
    PaperRow("cops-vit-l-14-336@336", "ViT-L/14@336px", 336, 92.2, 92.6),
    PaperRow("cops-vit-l-14-336@518", "ViT-L/14@336px", 518, 95.0, 93.4),
    PaperRow("cops-vit-l-14-336@700", "ViT-L/14@336px", 700, 92.4, 92.5),
)
