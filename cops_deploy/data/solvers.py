"""Solvers: the meta.json of each of the 13 evaluation datasets, from its download layout.

Each solver reads one dataset root as the reference CoPS generator scripts expect it (the layout
is spelled out in each :class:`DatasetSpec`) and returns the meta dict of
:mod:`cops_deploy.data.meta`, with paths relative to the root. ``DATASETS`` is the registry,
keyed by canonical lowercase name; ``prepare_dataset(name, root)`` runs a solver and writes
``root/meta.json`` atomically.

Differences from the reference scripts, all on purpose: folders and files are visited in sorted
order (the scripts used ``os.listdir`` order); only image files are listed (no ``.DS_Store`` or
stray ``meta.json``); a mask is paired with its image by file name (``000.png`` with
``000_mask.png``), not by position in two sorted lists, so a missing mask is an error that names
the image instead of a silent shift; the unlabelled ``pred`` folder of the Br35H download is not
read as anomalous. Torch-free.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cops_deploy.data.folder import FOLDER_DATASET
from cops_deploy.data.meta import Meta, make_entry, write_meta
from cops_deploy.errors import DatasetError
from cops_deploy.imaging.decode import IMAGE_EXTENSIONS

MVTEC_CLASSES: tuple[str, ...] = (
    "carpet", "grid", "leather", "tile", "wood", "bottle", "cable", "capsule", "hazelnut",
    "metal_nut", "pill", "screw", "toothbrush", "transistor", "zipper",
)  # fmt: skip
VISA_CLASSES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
    "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
BTAD_CLASSES: tuple[str, ...] = ("01", "02", "03")
MPDD_CLASSES: tuple[str, ...] = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)  # fmt: skip
DTD_CLASSES: tuple[str, ...] = (
    "Woven_001", "Woven_127", "Woven_104", "Stratified_154", "Blotchy_099", "Woven_068",
    "Woven_125", "Marbled_078", "Perforated_037", "Mesh_114", "Fibrous_183", "Matted_069",
)  # fmt: skip

VISA_SPLIT_CSV = "split_csv/1cls.csv"
ISIC_MASK_DIR = "ISBI2016_ISIC_Part1_Test_GroundTruth"

Solver = Callable[[Path], Meta]

_MVTEC_LAYOUT = (
    "<root>/<class>/train/good/*.png, <root>/<class>/test/{good,<defect>}/*.png, "
    "<root>/<class>/ground_truth/<defect>/<name>_mask.png"
)
_BTAD_LAYOUT = (
    "<root>/{01,02,03}/train/ok/*, <root>/<class>/test/{ok,ko}/*, "
    "<root>/<class>/ground_truth/ko/<name>.{png,bmp}"
)
_VISA_LAYOUT = (
    f"<root>/{VISA_SPLIT_CSV} (columns object,split,label,image,mask) and the image and mask "
    "paths it lists, e.g. <root>/candle/Data/Images/Anomaly/000.JPG"
)
_HEADCT_LAYOUT = "<root>/brain/test/good/*.png, <root>/brain/test/Ungood/*.png"
_BRAINMRI_LAYOUT = "<root>/brain_tumor_dataset/no/*.jpg, <root>/brain_tumor_dataset/yes/*.jpg"
_BR35H_LAYOUT = "<root>/no/*.jpg, <root>/yes/*.jpg"
_ISIC_LAYOUT = (
    f"<root>/skin/test/<folder>/<name>.jpg, <root>/skin/{ISIC_MASK_DIR}/<name>_Segmentation.png"
)
_POLYP_LAYOUT = "<root>/images/<name>.png, <root>/masks/<name>.png"
_KVASIR_LAYOUT = "<root>/images/<name>.jpg, <root>/masks/<name>.jpg"
_ENDO_LAYOUT = (
    "<root>/<folder>/<name>.jpg (any folder name but 'masks'; 'good' for normal images), "
    "<root>/masks/<name>.png"
)


@dataclass(frozen=True)
class DatasetSpec:
    """One evaluation dataset: its names, classes, labels and the solver for its layout.

    ``image_labels``: the test split has good and anomalous images (image metrics apply).
    ``pixel_labels``: anomalous test images have masks (pixel metrics apply).
    """

    name: str
    display_name: str
    classes: tuple[str, ...]
    solver: Solver
    layout: str
    image_labels: bool
    pixel_labels: bool

    @property
    def n_classes(self) -> int:
        """How many classes the test split has."""
        return len(self.classes)


# ----------------------------------------------------------------------------- file helpers


@dataclass(frozen=True)
class _Where:
    """The dataset being read, for error messages."""

    display_name: str
    layout: str

    def missing(self, path: Path, what: str) -> DatasetError:
        return DatasetError(
            f"{self.display_name}: {what} {path} is missing. The {self.display_name} layout is: "
            f"{self.layout}. Fix: pass --root the folder of the unpacked "
            f"{self.display_name} download (the one that holds this layout)."
        )


def _require_dir(path: Path, where: _Where, what: str) -> Path:
    if not path.is_dir():
        raise where.missing(path, f"expected folder ({what})")
    return path


def _subdirs(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images(path: Path, where: _Where) -> list[str]:
    names = sorted(
        p.name
        for p in path.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not names:
        raise DatasetError(
            f"{where.display_name}: folder {path} holds no images (looked for "
            f"{sorted(IMAGE_EXTENSIONS)}); restore its files from the original download, or remove "
            "the empty folder"
        )
    return names


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


class _MaskIndex:
    """The masks of one folder, found by image name: ``<stem><suffix>.<any image extension>``."""

    def __init__(self, mask_dir: Path, suffixes: Sequence[str], where: _Where) -> None:
        _require_dir(mask_dir, where, "masks of the anomalous images")
        self.mask_dir = mask_dir
        self.suffixes = tuple(suffixes)
        self.where = where
        self.by_stem: dict[str, str] = {}
        for name in _images(mask_dir, where):
            self.by_stem.setdefault(Path(name).stem, name)

    def find(self, image: Path, root: Path) -> str:
        """The mask of ``image``, relative to ``root``; DatasetError naming the image if none."""
        for suffix in self.suffixes:
            name = self.by_stem.get(image.stem + suffix)
            if name is not None:
                return _rel(self.mask_dir / name, root)
        expected = [str(self.mask_dir / f"{image.stem}{suffix}.png") for suffix in self.suffixes]
        raise DatasetError(
            f"{self.where.display_name}: anomalous image {image} has no mask; expected one of "
            f"{expected} (any image extension). Fix: restore the mask from the original "
            "download, or remove the image."
        )


def _folder_entries(
    root: Path,
    folder: Path,
    cls_name: str,
    specie: str,
    masks: _MaskIndex | None,
    anomalous: bool,
    where: _Where,
) -> list[dict[str, object]]:
    """Entries of the images in ``folder``; ``masks`` None means no pixel labels."""
    entries = []
    for name in _images(folder, where):
        image = folder / name
        mask = masks.find(image, root) if masks is not None and anomalous else ""
        entries.append(make_entry(_rel(image, root), mask, cls_name, specie, int(anomalous)))
    return entries


# ---------------------------------------------------------------------------------- solvers


def _solve_mvtec_layout(
    root: Path,
    classes: Sequence[str],
    where: _Where,
    good: str = "good",
    mask_suffixes: Sequence[str] = ("_mask",),
) -> Meta:
    """``<cls>/{train,test}/<specie>/<img>``, masks ``<cls>/ground_truth/<specie>/<stem><sfx>``."""
    meta: Meta = {"train": {}, "test": {}}
    for cls_name in classes:
        cls_dir = _require_dir(root / cls_name, where, f"class {cls_name!r}")
        for split in ("train", "test"):
            split_dir = _require_dir(cls_dir / split, where, f"{split} split of {cls_name!r}")
            entries = []
            for specie in _subdirs(split_dir):
                anomalous = specie != good
                masks = (
                    _MaskIndex(cls_dir / "ground_truth" / specie, mask_suffixes, where)
                    if anomalous
                    else None
                )
                entries += _folder_entries(
                    root, split_dir / specie, cls_name, specie, masks, anomalous, where
                )
            if not entries:
                raise where.missing(split_dir / good, "expected image folder")
            meta[split][cls_name] = entries
    return meta


def solve_mvtec(root: Path, classes: Sequence[str] | None = None) -> Meta:
    """MVTec-AD (15 classes); ``classes`` lets another MVTec-layout dataset reuse it."""
    where = _Where("MVTec-AD", _MVTEC_LAYOUT)
    return _solve_mvtec_layout(Path(root), classes or MVTEC_CLASSES, where)


def solve_mpdd(root: Path) -> Meta:
    """MPDD (6 classes, MVTec layout)."""
    return _solve_mvtec_layout(Path(root), MPDD_CLASSES, _Where("MPDD", _MVTEC_LAYOUT))


def solve_dtd(root: Path) -> Meta:
    """DTD-Synthetic (12 texture classes, MVTec layout)."""
    return _solve_mvtec_layout(Path(root), DTD_CLASSES, _Where("DTD-Synthetic", _MVTEC_LAYOUT))


def solve_btad(root: Path) -> Meta:
    """BTAD (3 classes): normal folder ``ok``, masks named like their image."""
    where = _Where("BTAD", _BTAD_LAYOUT)
    return _solve_mvtec_layout(Path(root), BTAD_CLASSES, where, good="ok", mask_suffixes=("",))


def _read_visa_rows(csv_path: Path) -> list[list[str]]:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(
            f"VisA: cannot read {csv_path} ({exc}); restore it from the original VisA download"
        ) from exc
    if not rows or len(rows[0]) < 5:
        raise DatasetError(
            f"VisA: {csv_path} has no header 'object,split,label,image,mask'; "
            "restore it from the original VisA download"
        )
    return rows[1:]


def solve_visa(root: Path) -> Meta:
    """VisA (12 classes), from the split file ``split_csv/1cls.csv`` of the original download."""
    root = Path(root)
    where = _Where("VisA", _VISA_LAYOUT)
    csv_path = root / VISA_SPLIT_CSV
    if not csv_path.is_file():
        raise where.missing(csv_path, "split file")
    meta: Meta = {"train": {c: [] for c in VISA_CLASSES}, "test": {c: [] for c in VISA_CLASSES}}
    for line, row in enumerate(_read_visa_rows(csv_path), start=2):
        if not row or len(row) < 4:
            continue
        obj, split, label, image = (field.strip() for field in row[:4])
        mask = row[4].strip() if len(row) > 4 else ""
        if obj not in meta["test"] or split not in meta:
            continue
        if label not in ("normal", "anomaly"):
            raise DatasetError(
                f"VisA: {csv_path} line {line}: label {label!r}; valid labels are 'normal' and "
                "'anomaly'. Fix: restore the file from the original download"
            )
        anomalous = label == "anomaly"
        if not (root / image).is_file():
            raise DatasetError(
                f"VisA: image {root / image} (line {line} of {csv_path}) does not exist. Fix: "
                "restore it from the original download, or pass --root the VisA folder that "
                f"holds both {VISA_SPLIT_CSV} and the class folders."
            )
        if anomalous and not (mask and (root / mask).is_file()):
            raise DatasetError(
                f"VisA: anomalous image {root / image} (line {line} of {csv_path}) has no mask: "
                f"{(root / mask) if mask else 'the mask column is empty'}. Fix: restore the mask "
                "from the original download, or remove the image's line."
            )
        meta[split][obj].append(
            make_entry(image, mask if anomalous else "", obj, "", int(anomalous))
        )
    empty = [c for c in VISA_CLASSES if not meta["test"][c]]
    if empty:
        raise DatasetError(
            f"VisA: {csv_path} lists no test images of classes {empty}; expected "
            f"all of {list(VISA_CLASSES)}. Restore the file from the original "
            "download"
        )
    return meta


def _solve_image_labels_only(
    root: Path,
    base: Path,
    cls_name: str,
    normal: str,
    species: Sequence[str] | None,
    where: _Where,
) -> Meta:
    """Test-only dataset of ``base/<specie>/<img>``, anomalous unless specie is ``normal``."""
    _require_dir(base, where, "image folders")
    names = list(species) if species is not None else _subdirs(base)
    for needed in [normal] + ([] if species is None else names):
        _require_dir(base / needed, where, f"{needed!r} images")
    if species is None and len(names) < 2:
        raise DatasetError(
            f"{where.display_name}: {base} has no folder of anomalous images next to "
            f"{base / normal}. The {where.display_name} layout is: {where.layout}. Fix: "
            "restore the folder from the original download."
        )
    entries = []
    for specie in names:
        anomalous = specie != normal
        entries += _folder_entries(root, base / specie, cls_name, specie, None, anomalous, where)
    return {"train": {}, "test": {cls_name: entries}}


def solve_headct(root: Path) -> Meta:
    """HeadCT: ``brain/test/good`` and ``brain/test/<anomalous>``; image labels only."""
    root = Path(root)
    where = _Where("HeadCT", _HEADCT_LAYOUT)
    return _solve_image_labels_only(root, root / "brain" / "test", "brain", "good", None, where)


def solve_brainmri(root: Path) -> Meta:
    """BrainMRI: ``brain_tumor_dataset/{no,yes}``; image labels only."""
    root = Path(root)
    where = _Where("BrainMRI", _BRAINMRI_LAYOUT)
    base = root / "brain_tumor_dataset"
    return _solve_image_labels_only(root, base, "brain", "no", ("no", "yes"), where)


def solve_br35h(root: Path) -> Meta:
    """Br35H: ``no`` and ``yes`` at the root (the unlabelled ``pred`` folder is skipped)."""
    root = Path(root)
    where = _Where("Br35H", _BR35H_LAYOUT)
    return _solve_image_labels_only(root, root, "brain", "no", ("no", "yes"), where)


def _solve_polyps(root: Path, where: _Where) -> Meta:
    """``images/`` and ``masks/`` at the root; every image anomalous, mask named like it."""
    root = Path(root)
    images = _require_dir(root / "images", where, "polyp images")
    masks = _MaskIndex(root / "masks", ("", "_mask"), where)
    entries = _folder_entries(root, images, "colon", "", masks, True, where)
    return {"train": {}, "test": {"colon": entries}}


def solve_colondb(root: Path) -> Meta:
    """CVC-ColonDB: images and masks; pixel labels only."""
    return _solve_polyps(root, _Where("CVC-ColonDB", _POLYP_LAYOUT))


def solve_clinicdb(root: Path) -> Meta:
    """CVC-ClinicDB: images and masks; pixel labels only."""
    return _solve_polyps(root, _Where("CVC-ClinicDB", _POLYP_LAYOUT))


def solve_kvasir(root: Path) -> Meta:
    """Kvasir-SEG: images and masks; pixel labels only."""
    return _solve_polyps(root, _Where("Kvasir", _KVASIR_LAYOUT))


def _solve_shared_masks(
    root: Path,
    base: Path,
    mask_dir: Path,
    cls_name: str,
    suffixes: Sequence[str],
    where: _Where,
) -> Meta:
    """``base/<specie>/<img>`` (``good`` normal) with all masks in one ``mask_dir``."""
    _require_dir(base, where, "image folders")
    species = [s for s in _subdirs(base) if (base / s) != mask_dir]
    if not species:
        raise where.missing(base / "<images>", "expected image folder (any name but 'masks')")
    masks = _MaskIndex(mask_dir, suffixes, where)
    entries = []
    for specie in species:
        anomalous = specie != "good"
        entries += _folder_entries(root, base / specie, cls_name, specie, masks, anomalous, where)
    return {"train": {}, "test": {cls_name: entries}}


def solve_isic(root: Path) -> Meta:
    """ISIC 2016 (ISBI) test set: ``skin/test/<folder>`` with masks ``<name>_Segmentation.png``."""
    root = Path(root)
    where = _Where("ISIC", _ISIC_LAYOUT)
    mask_dir = root / "skin" / ISIC_MASK_DIR
    return _solve_shared_masks(
        root, root / "skin" / "test", mask_dir, "skin", ("_Segmentation", ""), where
    )


def solve_endo(root: Path) -> Meta:
    """Endo (EndoTect): image folders at the root and their masks in ``masks/``."""
    root = Path(root)
    where = _Where("Endo", _ENDO_LAYOUT)
    return _solve_shared_masks(root, root, root / "masks", "colon", ("", "_mask"), where)


# --------------------------------------------------------------------------------- registry


def _spec(
    name: str,
    display: str,
    classes: tuple[str, ...],
    solver: Solver,
    layout: str,
    image_labels: bool,
    pixel_labels: bool,
) -> DatasetSpec:
    return DatasetSpec(name, display, classes, solver, layout, image_labels, pixel_labels)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        _spec("mvtec", "MVTec-AD", MVTEC_CLASSES, solve_mvtec, _MVTEC_LAYOUT, True, True),
        _spec("visa", "VisA", VISA_CLASSES, solve_visa, _VISA_LAYOUT, True, True),
        _spec("btad", "BTAD", BTAD_CLASSES, solve_btad, _BTAD_LAYOUT, True, True),
        _spec("mpdd", "MPDD", MPDD_CLASSES, solve_mpdd, _MVTEC_LAYOUT, True, True),
        _spec("dtd", "DTD-Synthetic", DTD_CLASSES, solve_dtd, _MVTEC_LAYOUT, True, True),
        _spec("headct", "HeadCT", ("brain",), solve_headct, _HEADCT_LAYOUT, True, False),
        _spec("brainmri", "BrainMRI", ("brain",), solve_brainmri, _BRAINMRI_LAYOUT, True, False),
        _spec("br35h", "Br35H", ("brain",), solve_br35h, _BR35H_LAYOUT, True, False),
        _spec("isic", "ISIC", ("skin",), solve_isic, _ISIC_LAYOUT, False, True),
        _spec("colondb", "CVC-ColonDB", ("colon",), solve_colondb, _POLYP_LAYOUT, False, True),
        _spec("clinicdb", "CVC-ClinicDB", ("colon",), solve_clinicdb, _POLYP_LAYOUT, False, True),
        _spec("kvasir", "Kvasir", ("colon",), solve_kvasir, _KVASIR_LAYOUT, False, True),
        _spec("endo", "Endo", ("colon",), solve_endo, _ENDO_LAYOUT, False, True),
    )
}

_ALIASES: dict[str, str] = {
    "mvtecad": "mvtec", "dtdsynthetic": "dtd", "br35": "br35h", "isbi": "isic",
    "isic2016": "isic", "cvccolondb": "colondb", "cvcclinicdb": "clinicdb",
    "kvasirseg": "kvasir", "endotect": "endo",
}  # fmt: skip


def get_dataset(name: str) -> DatasetSpec:
    """The spec of dataset ``name`` (case, '-' and '_' ignored; a few common aliases accepted)."""
    key = name.lower().replace("-", "").replace("_", "").replace(" ", "")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names are {', '.join(DATASETS)}")
    return DATASETS[key]


def build_meta(name: str, root: str | os.PathLike[str]) -> Meta:
    """The meta dict of dataset ``name`` read from ``root``, without writing anything."""
    spec = get_dataset(name)
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"{spec.display_name}: dataset root {root} is not a directory; pass "
            f"the folder of the unpacked download ({spec.layout})"
        )
    return spec.solver(root)


def prepare_dataset(name: str, root: str | os.PathLike[str]) -> Path:
    """Build the meta.json of dataset ``name`` under ``root``; return its path.

    The file is written atomically, and only when the whole layout was read without error.
    """
    return write_meta(root, build_meta(name, root))


# Names that are not one of the 13 layouts: `cops data synth` output, your own folders prepared
# with `cops data prepare --dataset folder` (data.folder), and any other meta.json root.
EXTRA_DATASETS: tuple[str, ...] = ("synth", FOLDER_DATASET, "custom")


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
            "dataset under --data ('synth' for `cops data synth` output, 'folder' for "
            "your own folders prepared with `cops data prepare --dataset folder`, 'custom' for "
            "any other meta.json root)."
        ) from None
