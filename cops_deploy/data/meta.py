"""The ``meta.json`` index of a dataset root, in the format of the reference CoPS code.

A dataset root holds the images of one dataset and a ``meta.json`` that lists them::

    {"train": {cls_name: [entry, ...]}, "test": {cls_name: [entry, ...]}}

where each entry is ``{"img_path", "mask_path", "cls_name", "specie_name", "anomaly"}``. Paths
are relative to the dataset root (an absolute path, as some reference generators wrote, is
read as is); ``mask_path`` is ``""`` when the image has no mask; ``anomaly`` is 0 or 1. A split
may be empty (``{}``), as ``train`` is for the test-only medical datasets.

``write_meta`` writes the file atomically, ``load_meta`` reads and validates it, and
``iter_samples`` walks it as :class:`Sample` records. Torch-free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cops_deploy.errors import DatasetError
from cops_deploy.fileio import atomic_write_text

META_FILENAME = "meta.json"
SPLITS: tuple[str, ...] = ("train", "test")
ENTRY_KEYS: tuple[str, ...] = ("img_path", "mask_path", "cls_name", "specie_name", "anomaly")

# {"train"|"test": {class_name: [entry, ...]}}
Meta = dict[str, dict[str, list[dict[str, Any]]]]

_PREPARE_HINT = "rebuild it with `cops data prepare --dataset NAME --root DIR`"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset split: paths relative to the dataset root, label 0 (good) or 1."""

    img_path: str
    mask_path: str
    cls_name: str
    specie_name: str
    anomaly: int

    @property
    def has_mask(self) -> bool:
        """Whether the image has a pixel mask (anomalous images of segmentation datasets)."""
        return self.mask_path != ""

    def image_file(self, root: str | os.PathLike[str]) -> Path:
        """The image file under the dataset ``root``."""
        return Path(root) / self.img_path

    def mask_file(self, root: str | os.PathLike[str]) -> Path | None:
        """The mask file under the dataset ``root``, or None when the image has no mask."""
        return Path(root) / self.mask_path if self.mask_path else None


def make_entry(
    img_path: str, mask_path: str, cls_name: str, specie_name: str, anomaly: int
) -> dict[str, Any]:
    """One meta.json entry, keys in the reference order."""
    return {
        "img_path": img_path,
        "mask_path": mask_path,
        "cls_name": cls_name,
        "specie_name": specie_name,
        "anomaly": int(anomaly),
    }


def _fail(source: str, where: str, problem: str) -> DatasetError:
    return DatasetError(f"{source}: {where}: {problem}; {_PREPARE_HINT}")


def _check_entry(entry: Any, cls_name: str, where: str, source: str) -> None:
    if not isinstance(entry, Mapping):
        raise _fail(
            source,
            where,
            f"expected an object with keys {list(ENTRY_KEYS)}, got {type(entry).__name__}",
        )
    missing = [key for key in ENTRY_KEYS if key not in entry]
    if missing:
        raise _fail(source, where, f"missing keys {missing} (every entry needs {list(ENTRY_KEYS)})")
    for key in ("img_path", "mask_path", "cls_name", "specie_name"):
        if not isinstance(entry[key], str):
            raise _fail(source, f"{where}.{key}", f"expected a string, got {entry[key]!r}")
    if entry["img_path"] == "":
        raise _fail(source, f"{where}.img_path", "is empty; every entry names an image")
    anomaly = entry["anomaly"]
    if isinstance(anomaly, bool) or anomaly not in (0, 1):
        raise _fail(source, f"{where}.anomaly", f"got {anomaly!r}; valid values are 0 and 1")
    if entry["cls_name"] != cls_name:
        raise _fail(
            source,
            f"{where}.cls_name",
            f"is {entry['cls_name']!r} but the entry is "
            f"listed under class {cls_name!r}; they must be equal",
        )


def validate_meta(meta: Any, source: str = META_FILENAME) -> None:
    """Check the structure of a meta dict; raise DatasetError naming ``source`` and the problem."""
    if not isinstance(meta, Mapping):
        raise _fail(
            source,
            "top level",
            f"expected an object with keys {list(SPLITS)}, got {type(meta).__name__}",
        )
    unknown = sorted(set(meta) - set(SPLITS))
    missing = [split for split in SPLITS if split not in meta]
    if unknown or missing:
        raise _fail(
            source,
            "top level",
            f"keys {sorted(meta)} found; valid keys are exactly "
            f"{list(SPLITS)} (missing {missing}, unknown {unknown})",
        )
    for split in SPLITS:
        classes = meta[split]
        if not isinstance(classes, Mapping):
            raise _fail(
                source,
                split,
                f"expected an object {{class_name: [entries]}}, got {type(classes).__name__}",
            )
        for cls_name, entries in classes.items():
            if not isinstance(entries, list):
                raise _fail(
                    source,
                    f"{split}.{cls_name}",
                    f"expected a list of entries, got {type(entries).__name__}",
                )
            for index, entry in enumerate(entries):
                _check_entry(entry, cls_name, f"{split}.{cls_name}[{index}]", source)


def write_meta(root: str | os.PathLike[str], meta: Meta) -> Path:
    """Validate ``meta`` and write ``root/meta.json`` atomically; return its path.

    The JSON goes to a temporary file in ``root`` that replaces ``meta.json`` in one step, so a
    reader sees the old file or the new one, never a partial one; on any error the temporary file
    is removed and an existing ``meta.json`` is left untouched.
    """
    root = Path(root)
    target = root / META_FILENAME
    if not root.is_dir():
        raise DatasetError(
            f"cannot write {target}: dataset root {root} is not a directory; "
            "pass the folder that holds the dataset"
        )
    validate_meta(meta, str(target))
    text = json.dumps(meta, indent=4) + "\n"
    atomic_write_text(target, text)
    return target


def load_meta(root: str | os.PathLike[str]) -> Meta:
    """Read and validate ``root/meta.json`` (``root`` may also be the meta.json file itself)."""
    path = Path(root)
    if path.is_dir() or path.name != META_FILENAME:
        path = path / META_FILENAME
    if not path.is_file():
        raise DatasetError(
            f"{path}: no {META_FILENAME} here; pass a dataset root that holds "
            f"one, or create it with `cops data prepare --dataset NAME --root DIR`"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column "
            f"{exc.colno}); {_PREPARE_HINT}"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(
            f"{path}: cannot be read ({exc}); check the file's permissions and encoding (UTF-8)"
        ) from exc
    validate_meta(meta, str(path))
    return meta


def iter_samples(meta: Meta, split: str, classes: Iterable[str] | None = None) -> Iterator[Sample]:
    """The samples of ``split`` ("train" or "test"), class by class in meta order.

    ``classes`` restricts (and orders) the classes; a class the split does not have is an error
    (raised at the call, not at the first iteration).
    """
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; valid splits are {list(SPLITS)}")
    available = meta.get(split, {})
    if classes is None:
        names = list(available)
    else:
        names = [classes] if isinstance(classes, str) else list(dict.fromkeys(classes))
        unknown = [name for name in names if name not in available]
        if unknown:
            raise DatasetError(
                f"classes {unknown} are not in the {split} split; valid classes "
                f"are {sorted(available)}"
            )
    return _walk(available, names)


def _walk(available: Mapping[str, list[dict[str, Any]]], names: list[str]) -> Iterator[Sample]:
    for name in names:
        for entry in available[name]:
            yield Sample(
                img_path=entry["img_path"],
                mask_path=entry["mask_path"],
                cls_name=entry["cls_name"],
                specie_name=entry["specie_name"],
                anomaly=int(entry["anomaly"]),
            )
