"""The ``folder`` dataset (data.folder): your own folders of normal, anomalous and mask images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cops_deploy.data.folder import FolderCfg, build_folder_meta, prepare_folder
from cops_deploy.data.meta import iter_samples, load_meta
from cops_deploy.errors import DatasetError


def _image(path: Path, size: tuple[int, int] = (8, 6), value: int = 90) -> Path:
    """An RGB image of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, dtype=np.uint8)).save(path)
    return path


def _mask(path: Path, size: tuple[int, int] = (8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[1:3, 2:5] = 255
    Image.fromarray(array).save(path)
    return path


def _tree(root: Path) -> Path:
    """good/ (2), crack/ (2) with masks/crack/<stem>_mask.png, scratch/ (1) with masks/scratch."""
    for name in ("g1.png", "g2.jpg"):
        _image(root / "good" / name)
    for name in ("c1.png", "c2.png"):
        _image(root / "crack" / name)
        _mask(root / "masks" / "crack" / name.replace(".png", "_mask.png"))
    _image(root / "scratch" / "s1.bmp")
    _mask(root / "masks" / "scratch" / "s1.png")
    return root


def _cfg(**changes: object) -> FolderCfg:
    base: dict[str, object] = {
        "normal_dir": "good",
        "abnormal_dirs": ("crack", "scratch"),
        "mask_dirs": ("masks/crack", "masks/scratch"),
        "class_name": "part",
    }
    base.update(changes)
    return FolderCfg(**base)  # type: ignore[arg-type]


def test_folder_meta_lists_normal_anomalous_and_matched_masks(tmp_path: Path) -> None:
    meta = build_folder_meta(_tree(tmp_path), _cfg())
    assert meta["train"] == {}
    rows = [(s.img_path, s.mask_path, s.specie_name, s.anomaly) for s in iter_samples(meta, "test")]
    assert rows == [
        ("good/g1.png", "", "good", 0),
        ("good/g2.jpg", "", "good", 0),
        ("crack/c1.png", "masks/crack/c1_mask.png", "crack", 1),
        ("crack/c2.png", "masks/crack/c2_mask.png", "crack", 1),
        ("scratch/s1.bmp", "masks/scratch/s1.png", "scratch", 1),
    ]
    assert {s.cls_name for s in iter_samples(meta, "test")} == {"part"}


def test_prepare_folder_writes_a_meta_json_that_loads(tmp_path: Path) -> None:
    path = prepare_folder(_tree(tmp_path), _cfg(class_name=None))
    assert path == tmp_path / "meta.json"
    meta = load_meta(tmp_path)
    assert list(meta["test"]) == [tmp_path.name]  # class name defaults to the root's name
    assert len(meta["test"][tmp_path.name]) == 5


def test_normal_test_dir_makes_normal_dir_the_train_split(tmp_path: Path) -> None:
    _tree(tmp_path)
    _image(tmp_path / "good_test" / "t1.png")
    meta = build_folder_meta(tmp_path, _cfg(normal_test_dir="good_test"))
    assert [e["img_path"] for e in meta["train"]["part"]] == ["good/g1.png", "good/g2.jpg"]
    test = meta["test"]["part"]
    assert [e["img_path"] for e in test if e["anomaly"] == 0] == ["good_test/t1.png"]


def test_one_shared_mask_folder_and_no_masks(tmp_path: Path) -> None:
    _tree(tmp_path)
    for name in ("c1.png", "c2.png", "s1.png"):
        _mask(tmp_path / "all_masks" / name)
    meta = build_folder_meta(tmp_path, _cfg(mask_dirs=("all_masks",)))
    masks = [e["mask_path"] for e in meta["test"]["part"] if e["anomaly"]]
    assert masks == ["all_masks/c1.png", "all_masks/c2.png", "all_masks/s1.png"]
    meta = build_folder_meta(tmp_path, _cfg(mask_dirs=()))
    assert all(e["mask_path"] == "" for e in meta["test"]["part"])


def test_hidden_files_and_subfolders_are_skipped_extensions_filter(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "good" / ".DS_Store").write_text("x")
    _image(tmp_path / "crack" / "nested" / "deep.png")  # not read: no recursion
    meta = build_folder_meta(tmp_path, _cfg(extensions=("png", ".BMP")))
    paths = [e["img_path"] for e in meta["test"]["part"]]
    assert paths == ["good/g1.png", "crack/c1.png", "crack/c2.png", "scratch/s1.bmp"]


def test_a_folder_outside_the_root_is_listed_by_absolute_path(tmp_path: Path) -> None:
    root = _tree(tmp_path / "root")
    outside = _image(tmp_path / "elsewhere" / "o1.png").parent
    meta = build_folder_meta(root, _cfg(normal_dir=str(outside)))
    first = meta["test"]["part"][0]["img_path"]
    assert Path(first).is_absolute() and Path(first).is_file()


def test_exif_rotation_is_applied_before_comparing_mask_sizes(tmp_path: Path) -> None:
    _tree(tmp_path)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: the stored 6x8 image is seen as 8x6, like its mask
    array = np.full((8, 6, 3), 50, dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "crack" / "c1.png", exif=exif.tobytes())
    assert build_folder_meta(tmp_path, _cfg())["test"]["part"][2]["img_path"] == "crack/c1.png"


# ----------------------------------------------------------------------------- refusals


def test_unmatched_masks_name_the_images_and_the_masks(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "masks" / "crack" / "c2_mask.png").rename(tmp_path / "masks" / "crack" / "c9.png")
    with pytest.raises(DatasetError) as info:
        build_folder_meta(tmp_path, _cfg())
    text = str(info.value)
    assert "Images without a mask (1): " + str(tmp_path / "crack" / "c2.png") in text
    assert "Masks without an image (1): c9.png" in text


def test_an_image_without_mask_alone_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path)
    _image(tmp_path / "scratch" / "s2.png")
    with pytest.raises(DatasetError, match=r"Images without a mask \(1\).*s2\.png"):
        build_folder_meta(tmp_path, _cfg())


def test_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path)
    _mask(tmp_path / "masks" / "scratch" / "s1.png", size=(9, 6))
    with pytest.raises(DatasetError, match=r"s1\.bmp is 8x6 but .*s1\.png is 9x6"):
        build_folder_meta(tmp_path, _cfg())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"normal_dir": "nowhere"}, r"normal folder .*nowhere \(--normal-dir nowhere\) does not"),
        ({"abnormal_dirs": ("crack", "gone")}, r"anomalous folder .*gone .*does not exist"),
        ({"mask_dirs": ("masks/none",)}, r"mask folder .*masks/none .*does not exist"),
        ({"normal_test_dir": "missing"}, r"normal test folder .*--normal-test-dir"),
        ({"normal_dir": "good/g1.png"}, r"is not a folder"),
        ({"abnormal_dirs": ()}, r"no anomalous folder given"),
        ({"mask_dirs": ("masks/crack", "masks/scratch", "masks")}, r"3 mask folders for 2"),
        ({"extensions": ("",)}, r"extension '' is not valid"),
        ({"extensions": (".tif",)}, r"holds no images .*widen --extensions"),
    ],
)
def test_bad_folder_arguments_are_refused(
    tmp_path: Path, changes: dict[str, object], message: str
) -> None:
    _tree(tmp_path)
    with pytest.raises(DatasetError, match=message):
        build_folder_meta(tmp_path, _cfg(**changes))


def test_an_empty_folder_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"anomalous folder .*empty \(--abnormal-dir\) holds no"):
        build_folder_meta(tmp_path, _cfg(abnormal_dirs=("crack", "empty"), mask_dirs=()))


def test_a_non_image_file_is_refused_unless_extensions_filter_it(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "good" / "notes.txt").write_text("shift 2")
    with pytest.raises(DatasetError, match=r"good holds files that are not images: notes\.txt"):
        build_folder_meta(tmp_path, _cfg())
    assert build_folder_meta(tmp_path, _cfg(extensions=(".png", ".jpg", ".bmp")))


def test_a_file_that_does_not_decode_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "good" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"broken\.png cannot be read as an image"):
        build_folder_meta(tmp_path, _cfg())


def test_a_shared_mask_folder_refuses_images_of_one_name_in_two_folders(tmp_path: Path) -> None:
    _tree(tmp_path)
    _image(tmp_path / "scratch" / "c1.png")
    for name in ("c1.png", "c2.png", "s1.png"):
        _mask(tmp_path / "all_masks" / name)
    with pytest.raises(DatasetError, match=r"same name in different folders \(c1\)"):
        build_folder_meta(tmp_path, _cfg(mask_dirs=("all_masks",)))


def test_a_root_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"--root .*nothing is not a folder"):
        build_folder_meta(tmp_path / "nothing", _cfg())


def test_a_mask_without_image_alone_is_refused(tmp_path: Path) -> None:
    _tree(tmp_path)
    _mask(tmp_path / "masks" / "crack" / "c3_mask.png")
    with pytest.raises(DatasetError, match=r"Images without a mask \(0\): none.*\(1\): c3_mask"):
        build_folder_meta(tmp_path, _cfg())


def test_a_lone_string_is_one_folder(tmp_path: Path) -> None:
    _tree(tmp_path)
    cfg = _cfg(abnormal_dirs="crack", mask_dirs="masks/crack")
    meta = build_folder_meta(tmp_path, cfg)
    assert [e["specie_name"] for e in meta["test"]["part"]] == ["good"] * 2 + ["crack"] * 2


@pytest.mark.parametrize(
    "changes",
    [{"abnormal_dirs": ("crack", "good")}, {"abnormal_dirs": ("crack", "crack/")},
     {"normal_test_dir": "good"}],
)  # fmt: skip
def test_a_folder_given_twice_is_refused(tmp_path: Path, changes: dict[str, object]) -> None:
    _tree(tmp_path)
    with pytest.raises(DatasetError, match=r"given more than once"):
        build_folder_meta(tmp_path, _cfg(mask_dirs=(), **changes))
