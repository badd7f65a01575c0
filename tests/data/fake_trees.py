"""Miniature dataset trees in each of the 13 download layouts, with tiny images.

``build_tree(name, root)`` writes the tree of dataset ``name`` under ``root`` and returns the
meta dict a correct solver must produce (entry order aside). Each tree also holds the clutter
of a real download that the solver must skip (``.DS_Store``, a stale ``meta.json``, Br35H's
unlabelled ``pred`` folder, Kvasir's bounding-box JSON, BrainMRI's duplicate top-level folders).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cops_deploy.data.solvers import (
    BTAD_CLASSES,
    DTD_CLASSES,
    ISIC_MASK_DIR,
    MPDD_CLASSES,
    MVTEC_CLASSES,
    VISA_CLASSES,
)

Meta = dict[str, dict[str, list[dict[str, Any]]]]


class _Tree:
    """Writes files under a root and records the meta entries they should produce."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.meta: Meta = {"train": {}, "test": {}}
        self.count = 0

    def image(self, rel: str) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        self.count += 1
        value = (self.count * 37) % 256
        array = np.full((6, 5, 3), value, dtype=np.uint8)
        fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP"}.get(path.suffix.lower(), "PNG")
        Image.fromarray(array).save(path, format=fmt)
        return rel

    def mask(self, rel: str) -> str:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        array = np.zeros((6, 5), dtype=np.uint8)
        array[1:4, 1:3] = 255
        fmt = {".bmp": "BMP", ".tif": "TIFF", ".jpg": "JPEG"}.get(path.suffix.lower(), "PNG")
        Image.fromarray(array).save(path, format=fmt)
        return rel

    def clutter(self, rel: str, text: str = "x") -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    def add(self, split: str, cls: str, img: str, mask: str, specie: str, anomaly: int) -> None:
        entry = {
            "img_path": img,
            "mask_path": mask,
            "cls_name": cls,
            "specie_name": specie,
            "anomaly": anomaly,
        }
        self.meta[split].setdefault(cls, []).append(entry)


def _mvtec_like(
    root: Path,
    classes: tuple[str, ...],
    good: str = "good",
    defects: tuple[str, ...] = ("crack", "hole"),
    image_ext: Callable[[str], str] = lambda cls: ".png",
    mask_name: Callable[[str, str], str] = lambda stem, cls: f"{stem}_mask.png",
) -> Meta:
    tree = _Tree(root)
    for index, cls in enumerate(classes):
        ext = image_ext(cls)
        for name in ("000", "001"):
            img = tree.image(f"{cls}/train/{good}/{name}{ext}")
            tree.add("train", cls, img, "", good, 0)
        img = tree.image(f"{cls}/test/{good}/000{ext}")
        tree.add("test", cls, img, "", good, 0)
        # the first class has two defect kinds with two images each, the others one
        kinds = defects if index == 0 else defects[:1]
        for defect in kinds:
            for name in ("000", "001")[: 2 if index == 0 else 1]:
                img = tree.image(f"{cls}/test/{defect}/{name}{ext}")
                mask = tree.mask(f"{cls}/ground_truth/{defect}/{mask_name(name, cls)}")
                tree.add("test", cls, img, mask, defect, 1)
        tree.clutter(f"{cls}/test/{good}/.DS_Store")
    tree.clutter("meta.json", "{}")
    return tree.meta


def make_mvtec(root: Path) -> Meta:
    return _mvtec_like(root, MVTEC_CLASSES)


def make_mpdd(root: Path) -> Meta:
    return _mvtec_like(root, MPDD_CLASSES)


def make_dtd(root: Path) -> Meta:
    return _mvtec_like(root, DTD_CLASSES, defects=("bad",))


def make_btad(root: Path) -> Meta:
    # BTAD: normal folder 'ok'; class 01 .bmp images with .png masks, 02 .png with .png,
    # 03 .bmp with .bmp; masks named like their image
    image_ext = {"01": ".bmp", "02": ".png", "03": ".bmp"}
    mask_ext = {"01": ".png", "02": ".png", "03": ".bmp"}
    return _mvtec_like(
        root,
        BTAD_CLASSES,
        good="ok",
        defects=("ko",),
        image_ext=image_ext.__getitem__,
        mask_name=lambda stem, cls: f"{stem}{mask_ext[cls]}",
    )


def make_visa(root: Path) -> Meta:
    tree = _Tree(root)
    rows = ["object,split,label,image,mask"]
    for cls in VISA_CLASSES:
        for split, name in (("train", "0000"), ("train", "0001"), ("test", "0002")):
            img = tree.image(f"{cls}/Data/Images/Normal/{name}.JPG")
            rows.append(f"{cls},{split},normal,{img},")
            tree.add(split, cls, img, "", "", 0)
        img = tree.image(f"{cls}/Data/Images/Anomaly/000.JPG")
        mask = tree.mask(f"{cls}/Data/Masks/Anomaly/000.png")
        rows.append(f"{cls},test,anomaly,{img},{mask}")
        tree.add("test", cls, img, mask, "", 1)
    tree.clutter("split_csv/1cls.csv", "\n".join(rows) + "\n")
    tree.clutter("split_csv/2cls_fewshot.csv", "object,split,label,image,mask\n")
    return tree.meta


def make_headct(root: Path) -> Meta:
    tree = _Tree(root)
    for specie, anomaly in (("good", 0), ("Ungood", 1)):
        for name in ("000", "001"):
            img = tree.image(f"brain/test/{specie}/{name}.png")
            tree.add("test", "brain", img, "", specie, anomaly)
    tree.meta["train"] = {}
    return tree.meta


def _no_yes(root: Path, base: str) -> Meta:
    tree = _Tree(root)
    prefix = f"{base}/" if base else ""
    for specie, anomaly, names in (("no", 0, ("1 no.jpeg", "N2.JPG")), ("yes", 1, ("Y1.jpg",))):
        for name in names:
            img = tree.image(f"{prefix}{specie}/{name}")
            tree.add("test", "brain", img, "", specie, anomaly)
    tree.meta["train"] = {}
    return tree.meta


def make_brainmri(root: Path) -> Meta:
    meta = _no_yes(root, "brain_tumor_dataset")
    clutter = _Tree(root)  # the Kaggle download repeats the folders at its top level
    clutter.image("yes/Y1.jpg")
    clutter.image("no/N1.jpg")
    return meta


def make_br35h(root: Path) -> Meta:
    meta = _no_yes(root, "")
    _Tree(root).image("pred/pred0.jpg")  # unlabelled: must not be read
    return meta


def make_isic(root: Path) -> Meta:
    tree = _Tree(root)
    for number in ("0000003", "0000012"):
        img = tree.image(f"skin/test/anomaly/ISIC_{number}.jpg")
        mask = tree.mask(f"skin/{ISIC_MASK_DIR}/ISIC_{number}_Segmentation.png")
        tree.add("test", "skin", img, mask, "anomaly", 1)
    tree.meta["train"] = {}
    return tree.meta


def _polyps(root: Path, image_ext: str, mask_ext: str, names: tuple[str, ...]) -> Meta:
    tree = _Tree(root)
    for name in names:
        img = tree.image(f"images/{name}{image_ext}")
        mask = tree.mask(f"masks/{name}{mask_ext}")
        tree.add("test", "colon", img, mask, "", 1)
    tree.meta["train"] = {}
    return tree.meta


def make_colondb(root: Path) -> Meta:
    return _polyps(root, ".png", ".png", ("1", "2", "10"))


def make_clinicdb(root: Path) -> Meta:
    return _polyps(root, ".png", ".tif", ("1", "2"))


def make_kvasir(root: Path) -> Meta:
    meta = _polyps(root, ".jpg", ".jpg", ("cju0qkwl35piu0993l0dewei2", "cju0qoxqj9q6s0835b43399p4"))
    _Tree(root).clutter("kavsir_bboxes.json", "{}")
    return meta


def make_endo(root: Path) -> Meta:
    tree = _Tree(root)
    for name in ("a1", "b2"):
        img = tree.image(f"images/{name}.jpg")
        mask = tree.mask(f"masks/{name}.png")
        tree.add("test", "colon", img, mask, "images", 1)
    tree.meta["train"] = {}
    return tree.meta


TREES: dict[str, Callable[[Path], Meta]] = {
    "mvtec": make_mvtec,
    "visa": make_visa,
    "btad": make_btad,
    "mpdd": make_mpdd,
    "dtd": make_dtd,
    "headct": make_headct,
    "brainmri": make_brainmri,
    "br35h": make_br35h,
    "isic": make_isic,
    "colondb": make_colondb,
    "clinicdb": make_clinicdb,
    "kvasir": make_kvasir,
    "endo": make_endo,
}


def build_tree(name: str, root: Path) -> Meta:
    """Write the fake tree of dataset ``name`` under ``root``; return the expected meta."""
    root.mkdir(parents=True, exist_ok=True)
    return TREES[name](root)


def sorted_meta(meta: Meta) -> Meta:
    """``meta`` with each class's entries sorted by image path, for order-free comparison."""
    return {
        split: {
            cls: sorted(entries, key=lambda e: e["img_path"]) for cls, entries in classes.items()
        }
        for split, classes in meta.items()
    }
