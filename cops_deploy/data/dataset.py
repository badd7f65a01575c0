"""A torch ``Dataset`` over a dataset root's ``meta.json``, for training and evaluation.

Each item is a :class:`DatasetItem`: the image preprocessed for CLIP at the model's input size
(``imaging.preprocess.preprocess``: PIL bicubic, CLIP mean/std), the ground-truth mask at the same
size as a float 0/1 tensor (``data.transforms.load_mask``: the 0/255 mask resized bilinearly,
then > 0.5; METHOD.md section 6), the 0/1 image label, the class name and the image path.

As in the reference loader, a good image (``anomaly == 0``) always gets an all-zero mask, and
so does an anomalous image without a mask file (``has_mask`` tells the two apart, so that an
evaluation can leave such images out of the pixel metrics).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from cops_deploy.configs import PreprocessCfg
from cops_deploy.data.meta import SPLITS, Sample, iter_samples, load_meta
from cops_deploy.data.transforms import load_mask
from cops_deploy.errors import ConfigError, DatasetError
from cops_deploy.imaging.decode import load_image
from cops_deploy.imaging.preprocess import preprocess


class DatasetItem(NamedTuple):
    """One image; the DataLoader's default collate turns a list of these into a batch."""

    image: torch.Tensor  # (3, S, S) float32, CLIP-normalised
    mask: torch.Tensor  # (S, S) float32 in {0, 1}
    label: torch.Tensor  # () int64: 0 good, 1 anomalous
    cls_name: str
    path: str
    has_mask: bool  # the image has a mask file (False for every good image)


class MetaDataset(Dataset):
    """The images of one split of a dataset root, optionally restricted to some classes.

    Args:
        root: the dataset folder that holds ``meta.json``.
        preprocess_cfg: the model's preprocessing (``model.cfg.preprocess``): size, mean, std.
        split: ``"test"`` (the labelled split CoPS trains and evaluates on) or ``"train"``.
        classes: the classes to keep, in this order (default: all, in meta.json order).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        preprocess_cfg: PreprocessCfg,
        split: str = "test",
        classes: Sequence[str] | None = None,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(
                f"unknown split {split!r}; valid splits are {list(SPLITS)}. Fix: CoPS trains "
                "and evaluates on 'test', the labelled split."
            )
        self.root = Path(root)
        self.split = split
        self.size = int(preprocess_cfg.size)
        self.mean = tuple(preprocess_cfg.mean)
        self.std = tuple(preprocess_cfg.std)
        meta = load_meta(self.root)
        if classes is not None:
            classes = list(dict.fromkeys(classes))  # each class once, first order kept
        self.samples: list[Sample] = list(iter_samples(meta, split, classes))
        if not self.samples:
            chosen = list(classes) if classes is not None else sorted(meta[split])
            raise DatasetError(
                f"{self.root / 'meta.json'}: the {split} split has no images for classes "
                f"{chosen}; valid classes with images are "
                f"{sorted(c for c, e in meta[split].items() if e)}. Fix: pass other --classes "
                "or another dataset root."
            )
        self.classes: list[str] = list(dict.fromkeys(s.cls_name for s in self.samples))

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> np.ndarray:
        """The 0/1 labels of all samples, in order (no image is read)."""
        return np.array([s.anomaly for s in self.samples], dtype=np.int64)

    def __getitem__(self, index: int) -> DatasetItem:
        sample = self.samples[index]
        path = sample.image_file(self.root)
        rgb = load_image(path)
        image = torch.from_numpy(preprocess(rgb, self.size, self.mean, self.std))
        mask_file = sample.mask_file(self.root) if sample.anomaly == 1 else None
        mask = torch.from_numpy(load_mask(mask_file, self.size).astype(np.float32))
        return DatasetItem(
            image=image,
            mask=mask,
            label=torch.tensor(sample.anomaly, dtype=torch.int64),
            cls_name=sample.cls_name,
            path=str(path),
            has_mask=mask_file is not None,
        )
