"""The ``folder`` dataset: your own images as you hold them, as anomalib's Folder datamodule.

A folder of normal images, one or more folders of anomalous images and, optionally, folders
of masks matched to the anomalous images by name::

    root/good/001.png  root/crack/002.png  root/scratch/003.png
    root/masks/crack/002.png (or 002_mask.png)  root/masks/scratch/003.png

:class:`FolderCfg` names the folders as anomalib's ``Folder`` does (``normal_dir``,
``abnormal_dirs``, ``mask_dirs``, ``normal_test_dir``, ``extensions``), relative to the root
or absolute; :func:`build_folder_meta` reads them into the meta dict of
:mod:`cops_deploy.data.meta` and :func:`prepare_folder` writes ``root/meta.json`` atomically,
so ``cops eval``, ``cops train`` and ``cops calibrate`` read it like any prepared dataset.

Splits: CoPS evaluates (and trains) on the labelled ``test`` split. Without ``normal_test_dir``
every normal image goes to ``test`` beside the anomalous ones and ``train`` is empty; with it,
``normal_dir`` is the ``train`` split (normal images only) and ``normal_test_dir`` gives the
normal images of ``test``. Unlike anomalib, no normal image is split off at random.

Masks: one mask folder shared by all anomalous folders, or one per anomalous folder (paired in
the order given). A mask belongs to the image of the same stem (``002.png`` -> ``002.png`` or
``002_mask.png``, any image extension); it must have the image's size (after EXIF rotation).
When mask folders are given, every anomalous image needs a mask and every mask an image.

Folders are read without recursion (sub-folders, such as a mask folder inside an image folder,
are skipped); hidden files are skipped. Without ``extensions`` every other file must be an image
(one of ``imaging.decode.IMAGE_EXTENSIONS``); with it, only files with those extensions are
listed, as anomalib's filter does. Each listed file is opened, so a file that is not an image
fails here, not in the middle of an evaluation. Torch-free.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from cops_deploy.data.meta import Meta, make_entry, write_meta
from cops_deploy.errors import DatasetError
from cops_deploy.imaging.decode import IMAGE_EXTENSIONS

__all__ = ["FOLDER_DATASET", "MASK_SUFFIXES", "FolderCfg", "build_folder_meta", "prepare_folder"]

FOLDER_DATASET = "folder"  # the --dataset name of this layout
MASK_SUFFIXES: tuple[str, ...] = ("", "_mask")  # mask stem = image stem + one of these
_SHOW = 10  # names listed in an error before "... and N more"
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING = (5, 6, 7, 8)  # EXIF orientations that swap width and height


@dataclass(frozen=True)
class FolderCfg:
    """The folders of a ``folder`` dataset (paths relative to the root, or absolute).

    Args:
        normal_dir: normal (good) images.
        abnormal_dirs: one or more folders of anomalous images; each folder name becomes the
            images' defect type (``specie_name``).
        mask_dirs: none, one shared by all ``abnormal_dirs``, or one per abnormal folder.
        normal_test_dir: normal images of the test split; ``normal_dir`` is then the train split.
        extensions: list only files with these suffixes (e.g. ``(".png",)``); None: every file
            must be an image.
        class_name: the class the images are listed under (default: the root folder's name).
    """

    normal_dir: str | os.PathLike[str]
    abnormal_dirs: tuple[str | os.PathLike[str], ...]
    mask_dirs: tuple[str | os.PathLike[str], ...] = ()
    normal_test_dir: str | os.PathLike[str] | None = None
    extensions: tuple[str, ...] | None = None
    class_name: str | None = None


def _more(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _normal_extensions(extensions: Iterable[str] | None) -> frozenset[str] | None:
    if extensions is None:
        return None
    if isinstance(extensions, str):
        extensions = [extensions]
    out = set()
    for ext in extensions:
        if not isinstance(ext, str) or not ext.strip(".").strip():
            raise DatasetError(
                f"folder dataset: extension {ext!r} is not valid; pass suffixes such as "
                "'.png' or 'jpg' (--extensions .png .jpg)"
            )
        out.add("." + ext.strip().lstrip(".").lower())
    if not out:
        raise DatasetError(
            "folder dataset: extensions is empty; pass suffixes such as .png .jpg, or leave "
            "--extensions out to list every image file"
        )
    return frozenset(out)


class _Reader:
    """Lists and checks the files of the dataset's folders."""

    def __init__(self, root: Path, extensions: frozenset[str] | None) -> None:
        self.root = root
        self.extensions = extensions

    def folder(self, value: str | os.PathLike[str], what: str, flag: str) -> Path:
        path = Path(value)
        path = path if path.is_absolute() else self.root / path
        if not path.is_dir():
            raise DatasetError(
                f"folder dataset: the {what} folder {path} ({flag} {os.fspath(value)}) "
                f"{'is not a folder' if path.exists() else 'does not exist'}. Fix: pass {flag} a "
                f"folder relative to --root {self.root}, or an absolute path."
            )
        return path

    def images(self, folder: Path, what: str, flag: str) -> list[Path]:
        """The image files of ``folder`` in name order; DatasetError if none or a non-image."""
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        accepted = self.extensions or IMAGE_EXTENSIONS
        images = [p for p in files if p.suffix.lower() in accepted]
        if self.extensions is None:
            others = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
            if others:
                raise DatasetError(
                    f"folder dataset: the {what} folder {folder} holds files that are not "
                    f"images: {_more(others)} (image files end in "
                    f"{sorted(IMAGE_EXTENSIONS)}). Fix: move them out of the folder, or pass "
                    "--extensions to list only the image kinds you want."
                )
        if not images:
            raise DatasetError(
                f"folder dataset: the {what} folder {folder} ({flag}) holds no images (looked "
                f"for {sorted(accepted)}, not in sub-folders). Fix: put the images there, pass "
                f"{flag} the folder that holds them, or widen --extensions."
            )
        return images

    def size(self, path: Path) -> tuple[int, int]:
        """(width, height) of an image as the model sees it (EXIF rotation applied)."""
        try:
            with Image.open(path) as img:
                width, height = img.size
                orientation = img.getexif().get(_EXIF_ORIENTATION)
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DatasetError(
                f"folder dataset: {path} cannot be read as an image ({exc}). Fix: replace or "
                "remove the file, or pass --extensions to leave its kind out."
            ) from exc
        return (height, width) if orientation in _TRANSPOSING else (width, height)

    def rel(self, path: Path) -> str:
        """``path`` relative to the root when under it (as meta.json holds), else absolute."""
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.resolve().as_posix()


def _pair_masks(
    reader: _Reader, abnormal: list[Path], mask_values: Sequence[str | os.PathLike[str]]
) -> list[Path | None]:
    """The mask folder of each abnormal folder (None for each when no masks are given)."""
    if not mask_values:
        return [None] * len(abnormal)
    masks = [reader.folder(m, "mask", "--mask-dir") for m in mask_values]
    if len(masks) == 1:
        return masks * len(abnormal)
    if len(masks) != len(abnormal):
        raise DatasetError(
            f"folder dataset: {len(masks)} mask folders for {len(abnormal)} anomalous folders; "
            "valid: one mask folder shared by all anomalous folders, or one per anomalous "
            f"folder in the same order. Given: --abnormal-dir {' '.join(map(str, abnormal))} "
            f"--mask-dir {' '.join(map(str, masks))}. Fix: pass one --mask-dir per --abnormal-dir."
        )
    return masks


def _match_masks(reader: _Reader, images_by_mask_dir: dict[Path, list[Path]]) -> dict[Path, Path]:
    """Image -> mask for every anomalous image; DatasetError listing all unmatched files."""
    matched: dict[Path, Path] = {}
    for mask_dir, images in images_by_mask_dir.items():
        masks = reader.images(mask_dir, "mask", "--mask-dir")
        by_stem: dict[str, Path] = {}
        for mask in masks:
            by_stem.setdefault(mask.stem, mask)
        stems = [image.stem for image in images]
        clashes = sorted({s for s in stems if stems.count(s) > 1})
        if clashes:
            raise DatasetError(
                f"folder dataset: the mask folder {mask_dir} is shared by anomalous images of "
                f"the same name in different folders ({_more(clashes)}), so a mask cannot tell "
                "which image it belongs to. Fix: pass one --mask-dir per --abnormal-dir, or "
                "rename the images."
            )
        used: set[Path] = set()
        unmatched: list[str] = []
        for image in images:
            candidates = [by_stem.get(image.stem + suffix) for suffix in MASK_SUFFIXES]
            mask = next((m for m in candidates if m is not None), None)
            if mask is None:
                unmatched.append(str(image))
            else:
                matched[image] = mask
                used.add(mask)
        orphans = [m.name for m in masks if m not in used]
        if unmatched or orphans:
            raise DatasetError(
                f"folder dataset: masks in {mask_dir} do not match the anomalous images one to "
                f"one. Images without a mask ({len(unmatched)}): {_more(unmatched) or 'none'}. "
                f"Masks without an image ({len(orphans)}): {_more(orphans) or 'none'}. A mask "
                f"is named like its image (<stem>.png or <stem>_mask.png, any image extension). "
                "Fix: rename or add the masks, remove the strays, or leave --mask-dir out "
                "(image labels only)."
            )
    return matched


def _check_sizes(reader: _Reader, matched: dict[Path, Path]) -> None:
    wrong = []
    for image, mask in matched.items():
        image_size, mask_size = reader.size(image), reader.size(mask)
        if image_size != mask_size:
            wrong.append(
                f"{image} is {image_size[0]}x{image_size[1]} but {mask} is "
                f"{mask_size[0]}x{mask_size[1]}"
            )
    if wrong:
        raise DatasetError(
            f"folder dataset: {len(wrong)} mask(s) differ in size from their image: "
            f"{_more(wrong)}. Fix: save each mask at its image's size (width x height)."
        )


def _many(value: Any) -> tuple[Any, ...]:
    """A folder or a sequence of folders as a tuple (a lone str is one folder, not letters)."""
    if value is None:
        return ()
    if isinstance(value, str | os.PathLike):
        return (value,)
    return tuple(value)


def _check_distinct(normal: Path, normal_test: Path | None, abnormal: list[Path]) -> None:
    folders = [normal, *([normal_test] if normal_test is not None else []), *abnormal]
    resolved = [f.resolve() for f in folders]
    twice = sorted(
        {str(f) for f, r in zip(folders, resolved, strict=True) if resolved.count(r) > 1}
    )
    if twice:
        raise DatasetError(
            f"folder dataset: {', '.join(twice)} given more than once (as normal and "
            "anomalous, or twice), so its images would be listed twice with two labels. Fix: "
            "pass each folder once, under the one label its images have."
        )


def build_folder_meta(root: str | os.PathLike[str], cfg: FolderCfg) -> Meta:
    """The meta dict of the ``folder`` dataset at ``root`` (nothing is written)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(
            f"folder dataset: --root {root} is not a folder. Fix: pass the folder your image "
            "folders are relative to (meta.json is written there)."
        )
    if not _many(cfg.abnormal_dirs):
        raise DatasetError(
            "folder dataset: no anomalous folder given. Fix: pass --abnormal-dir with one or "
            "more folders of anomalous images."
        )
    reader = _Reader(root, _normal_extensions(cfg.extensions))
    abnormal_values, mask_values = _many(cfg.abnormal_dirs), _many(cfg.mask_dirs)
    cls_name = cfg.class_name or root.resolve().name or FOLDER_DATASET
    normal = reader.folder(cfg.normal_dir, "normal", "--normal-dir")
    normal_test = (
        reader.folder(cfg.normal_test_dir, "normal test", "--normal-test-dir")
        if cfg.normal_test_dir is not None
        else None
    )
    abnormal = [reader.folder(d, "anomalous", "--abnormal-dir") for d in abnormal_values]
    _check_distinct(normal, normal_test, abnormal)
    mask_dirs = _pair_masks(reader, abnormal, mask_values)

    def normal_entries(folder: Path, flag: str) -> list[dict[str, object]]:
        images = reader.images(folder, "normal", flag)
        for image in images:
            reader.size(image)  # refuse a non-image now
        return [make_entry(reader.rel(p), "", cls_name, folder.name, 0) for p in images]

    anomalous = [(d, reader.images(d, "anomalous", "--abnormal-dir")) for d in abnormal]
    by_mask_dir: dict[Path, list[Path]] = {}
    for (_, images), mask_dir in zip(anomalous, mask_dirs, strict=True):
        if mask_dir is not None:
            by_mask_dir.setdefault(mask_dir, []).extend(images)
    matched = _match_masks(reader, by_mask_dir)
    _check_sizes(reader, matched)
    test = (
        normal_entries(normal, "--normal-dir")
        if normal_test is None
        else normal_entries(normal_test, "--normal-test-dir")
    )
    for folder, images in anomalous:
        for image in images:
            reader.size(image)
            mask = reader.rel(matched[image]) if image in matched else ""
            test.append(make_entry(reader.rel(image), mask, cls_name, folder.name, 1))
    train = {cls_name: normal_entries(normal, "--normal-dir")} if normal_test is not None else {}
    return {"train": train, "test": {cls_name: test}}


def prepare_folder(root: str | os.PathLike[str], cfg: FolderCfg) -> Path:
    """Write ``root/meta.json`` of the ``folder`` dataset atomically; return its path."""
    return write_meta(root, build_folder_meta(root, cfg))
