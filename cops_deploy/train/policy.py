"""Dataset-dependent choices of the reference scripts, by canonical dataset name.

The reference keys them on the dataset name: training on MVTec-AD uses a 3x3 neighbour kernel
(5x5 otherwise) and training on VisA switches the reconstruction loss off; its test script uses
other head values when the TARGET dataset is VisA (see ``cops_deploy.evaluate.evaluator``).
Names are the registered datasets (``cops data list``) plus ``synth`` (``cops data synth``) and
``custom`` (any other meta.json root), which take the defaults.
"""

from __future__ import annotations

from cops_deploy.data.solvers import DATASETS, get_dataset
from cops_deploy.errors import DatasetError

EXTRA_DATASETS: tuple[str, ...] = ("synth", "custom")


def canonical_dataset(name: str) -> str:
    """The canonical name of a dataset (aliases and case resolved), or DatasetError."""
    key = name.strip().lower()
    if key in EXTRA_DATASETS:
        return key
    try:
        return get_dataset(name).name
    except DatasetError:
        valid = ", ".join([*DATASETS, *EXTRA_DATASETS])
        raise DatasetError(
            f"unknown dataset {name!r}; valid names are {valid}. Fix: pass the name of the "
            "dataset under --data ('synth' for `cops data synth` output, 'custom' for any "
            "other meta.json root)."
        ) from None


def training_kernel(dataset: str) -> int:
    """Neighbour kernel of the reference training script: 3 on MVTec-AD, else 5."""
    return 3 if canonical_dataset(dataset) == "mvtec" else 5


def uses_recon(dataset: str) -> bool:
    """Whether the reconstruction loss is on: off when training on VisA, as the reference."""
    return canonical_dataset(dataset) != "visa"
