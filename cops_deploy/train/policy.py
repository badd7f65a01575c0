"""Dataset-dependent choices of the reference scripts, by canonical dataset name.

The reference keys them on the dataset name: training on MVTec-AD uses a 3x3 neighbour kernel
(5x5 otherwise) and training on VisA switches the reconstruction loss off; its test script uses
other head values when the TARGET dataset is VisA (see ``cops_deploy.evaluate.evaluator``).
Names are the registered datasets (``cops data list``) plus ``synth`` (``cops data synth``) and
``custom`` (any other meta.json root), which take the defaults.
"""

from __future__ import annotations

from cops_deploy.data.solvers import canonical_dataset

__all__ = ["training_kernel", "uses_recon"]


def training_kernel(dataset: str) -> int:
    """Neighbour kernel of the reference training script: 3 on MVTec-AD, else 5."""
    return 3 if canonical_dataset(dataset) == "mvtec" else 5


def uses_recon(dataset: str) -> bool:
    """Whether the reconstruction loss is on: off when training on VisA, as the reference."""
    return canonical_dataset(dataset) != "visa"
