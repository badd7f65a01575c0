"""cops_deploy.data: meta.json datasets, solvers for the 13 dataset layouts and your own folders,
synthetic defects.

Torch-free (numpy and Pillow only), except :mod:`cops_deploy.data.dataset` (the torch
``Dataset`` over a meta.json split for training and evaluation), which this package does not
import.
"""

from cops_deploy.data.folder import FolderCfg, build_folder_meta, prepare_folder
from cops_deploy.data.meta import Sample, iter_samples, load_meta, write_meta
from cops_deploy.data.solvers import DATASETS, DatasetSpec, get_dataset, prepare_dataset
from cops_deploy.data.synth import synthesize
from cops_deploy.data.transforms import load_mask

__all__ = [
    "DATASETS",
    "DatasetSpec",
    "FolderCfg",
    "build_folder_meta",
    "Sample",
    "get_dataset",
    "iter_samples",
    "load_mask",
    "load_meta",
    "prepare_dataset",
    "prepare_folder",
    "synthesize",
    "write_meta",
]
