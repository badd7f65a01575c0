"""A procedural defect dataset in MVTec-AD layout, for tests, demos and parity benchmarks.

``synthesize(out_dir, seed)`` draws three texture categories (``stripes``, ``noise``,
``weave``) and three object categories (``disc``, ``screw``, ``pcb``), and five defect kinds
(``scratch``, ``blob``, ``cut_paste``, ``colour_spot``, ``missing_part``), and writes::

    <out>/<cls>/train/good/000.png
    <out>/<cls>/test/good/000.png
    <out>/<cls>/test/<defect>/000.png
    <out>/<cls>/ground_truth/<defect>/000_mask.png     (0/255, 'L')
    <out>/meta.json                                     (built by the MVTec solver)

Every pixel of a mask is a pixel the defect changed, and the defect changed no pixel outside its
mask. The output is a function of the seed and the arguments only: every image draws from its
own ``numpy.random.Generator`` seeded by (seed, class, split, index), so the bytes written are
identical from run to run. Torch-free: numpy and Pillow only.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from cops_deploy.data.meta import write_meta
from cops_deploy.data.solvers import solve_mvtec
from cops_deploy.errors import ConfigError, DatasetError

TEXTURE_CLASSES: tuple[str, ...] = ("stripes", "noise", "weave")
OBJECT_CLASSES: tuple[str, ...] = ("disc", "screw", "pcb")
SYNTH_CLASSES: tuple[str, ...] = TEXTURE_CLASSES + OBJECT_CLASSES
DEFECT_KINDS: tuple[str, ...] = ("scratch", "blob", "cut_paste", "colour_spot", "missing_part")
MIN_SIZE = 32

_SPLIT_CODES = {"train_good": 0, "test_good": 1, "test_bad": 2}


@dataclass(frozen=True)
class Scene:
    """A defect-free image and what the defects need to know about it.

    ``object_mask``: where surface defects may go (None: anywhere, a texture or a board);
    ``parts``: what a missing part can remove (None: a hole anywhere); ``background``: what a
    missing part reveals.
    """

    image: np.ndarray  # (H, W, 3) uint8
    object_mask: np.ndarray | None  # (H, W) bool
    parts: np.ndarray | None  # (H, W) bool
    background: np.ndarray  # (H, W, 3) uint8


@dataclass(frozen=True)
class DefectSample:
    """A defective image, the defect-free image it was made from, and the defect's pixels."""

    clean: np.ndarray  # (H, W, 3) uint8
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, exactly the pixels where image != clean


# ------------------------------------------------------------------------------- rendering


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [0, 1): (yy, xx), each (size, size)."""
    axis = (np.arange(size, dtype=np.float64) + 0.5) / size
    return np.meshgrid(axis, axis, indexing="ij")


def _colourise(value: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """Blend two RGB colours by ``value`` in [0, 1]: (H, W) -> (H, W, 3) float."""
    return low[None, None, :] * (1.0 - value[..., None]) + high[None, None, :] * value[..., None]


def _jitter_colour(rng: np.random.Generator, base: Sequence[float], spread: float) -> np.ndarray:
    return np.asarray(base, dtype=np.float64) + rng.normal(0.0, spread, 3)


def _finish(rgb: np.ndarray, rng: np.random.Generator, noise: float = 3.0) -> np.ndarray:
    """Add sensor noise and quantise to uint8."""
    noisy = rgb + rng.normal(0.0, noise, rgb.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random (cells x cells) grid upsampled bicubically."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    image = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float64)


def _render_stripes(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    theta = np.deg2rad(30.0 + rng.normal(0.0, 3.0))
    freq = 9.0 + rng.uniform(-0.5, 0.5)
    wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 6))
    value = np.clip(wave * 1.5 + 0.5, 0.0, 1.0)
    low, high = _jitter_colour(rng, (40, 60, 120), 4), _jitter_colour(rng, (200, 190, 150), 4)
    image = _finish(_colourise(value, low, high), rng)
    return Scene(image, None, None, np.full_like(image, 12))


def _render_noise(rng: np.random.Generator, size: int) -> Scene:
    value = 0.65 * _value_noise(rng, size, 6) + 0.35 * _value_noise(rng, size, 16)
    value = (value - value.min()) / max(float(np.ptp(value)), 1e-6)
    low, high = _jitter_colour(rng, (90, 70, 50), 4), _jitter_colour(rng, (190, 160, 115), 4)
    image = _finish(_colourise(value, low, high), rng)
    return Scene(image, None, None, np.full_like(image, 12))


def _render_weave(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    threads = 8.0
    x = threads * xx + rng.uniform(0, 1)
    y = threads * yy + rng.uniform(0, 1)
    over = (np.floor(x) + np.floor(y)) % 2 == 0
    value = np.where(over, np.abs(np.sin(np.pi * x)), np.abs(np.sin(np.pi * y))) ** 0.6
    low, high = _jitter_colour(rng, (110, 30, 35), 4), _jitter_colour(rng, (235, 205, 185), 4)
    image = _finish(_colourise(value, low, high), rng)
    return Scene(image, None, None, np.full_like(image, 12))


def _plain_background(rng: np.random.Generator, size: int, colour: Sequence[float]) -> np.ndarray:
    shade = 0.9 + 0.2 * _value_noise(rng, size, 4)
    return _jitter_colour(rng, colour, 2)[None, None, :] * shade[..., None]


def _render_disc(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    back = _plain_background(rng, size, (60, 62, 68))
    cy, cx = 0.5 + rng.normal(0, 0.02, 2)
    radius = 0.32 * (1.0 + rng.normal(0, 0.02))
    dist = np.hypot(yy - cy, xx - cx) / radius
    disc = dist < 1.0
    shade = 0.75 + 0.25 * np.cos(dist * np.pi / 2) - 0.25 * (np.abs(dist - 0.6) < 0.05)
    metal = _jitter_colour(rng, (185, 182, 170), 3)[None, None, :] * shade[..., None]
    image = _finish(np.where(disc[..., None], metal, back), rng)
    return Scene(image, disc, disc, _finish(back, rng))


def _render_screw(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    back = _plain_background(rng, size, (30, 30, 36))
    theta = rng.uniform(0, np.pi)
    cy, cx = 0.5 + rng.normal(0, 0.02, 2)
    length, width = 0.6, 0.09
    along = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    across = -(xx - cx) * np.sin(theta) + (yy - cy) * np.cos(theta)
    shaft = (np.abs(along) < length / 2) & (np.abs(across) < width / 2)
    head = np.hypot(along + length / 2, across) < 0.1
    thread = 0.7 + 0.3 * (np.sin(2 * np.pi * along / 0.035) > 0)
    shade = np.where(head, 1.0, thread) * (1.0 - 1.5 * np.abs(across))
    metal = _jitter_colour(rng, (205, 205, 210), 3)[None, None, :] * shade[..., None]
    screw = shaft | head
    image = _finish(np.where(screw[..., None], metal, back), rng)
    return Scene(image, screw, screw, _finish(back, rng))


def _render_pcb(rng: np.random.Generator, size: int) -> Scene:
    yy, xx = _grid(size)
    board = _plain_background(rng, size, (30, 105, 55))
    pitch = 1.0 / 6.0
    oy, ox = rng.uniform(-0.1, 0.1, 2) * pitch
    cell_y = (yy - oy) / pitch
    cell_x = (xx - ox) / pitch
    fy, fx = cell_y - np.floor(cell_y) - 0.5, cell_x - np.floor(cell_x) - 0.5
    pads = (np.abs(fy) < 0.18) & (np.abs(fx) < 0.18)
    traces = (np.abs(fy) < 0.05) & (np.floor(cell_y) % 2 == 0)
    traces |= (np.abs(fx) < 0.05) & (np.floor(cell_x) % 3 == 1)
    parts = pads | traces
    copper = _jitter_colour(rng, (205, 165, 65), 3)[None, None, :] * np.ones((size, size, 1))
    image = _finish(np.where(parts[..., None], copper, board), rng)
    return Scene(image, None, parts, _finish(board, rng))


_RENDERERS: dict[str, Callable[[np.random.Generator, int], Scene]] = {
    "stripes": _render_stripes,
    "noise": _render_noise,
    "weave": _render_weave,
    "disc": _render_disc,
    "screw": _render_screw,
    "pcb": _render_pcb,
}


def render_good(category: str, rng: np.random.Generator, size: int = 128) -> Scene:
    """A defect-free scene of ``category`` (one of SYNTH_CLASSES) at ``size x size``."""
    _check_choice("category", category, SYNTH_CLASSES)
    return _RENDERERS[category](rng, _check_size(size))


# --------------------------------------------------------------------------------- defects


def _shape_mask(size: int, draw: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw(ImageDraw.Draw(canvas))
    return np.asarray(canvas) > 0


def _erode(mask: np.ndarray, steps: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(steps):
        shrunk = out.copy()
        shrunk[1:, :] &= out[:-1, :]
        shrunk[:-1, :] &= out[1:, :]
        shrunk[:, 1:] &= out[:, :-1]
        shrunk[:, :-1] &= out[:, 1:]
        out = shrunk
    return out


def _centre(
    rng: np.random.Generator, where: np.ndarray | None, size: int, rim: bool = False
) -> tuple[float, float]:
    """A defect centre (x, y) in pixels: in ``where`` (its rim if asked), else anywhere inside."""
    if where is None:
        x, y = rng.uniform(0.2 * size, 0.8 * size, 2)
        return float(x), float(y)
    candidates = where
    if rim:
        band = candidates & ~_erode(candidates, max(2, size // 32))
        candidates = band if band.any() else candidates
    ys, xs = np.nonzero(candidates)
    pick = int(rng.integers(len(ys)))
    return float(xs[pick]), float(ys[pick])


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> list[float]:
    return [cx - rx, cy - ry, cx + rx, cy + ry]


def _scratch(rng: np.random.Generator, scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _centre(rng, scene.object_mask, size)
    angle = rng.uniform(0, 2 * np.pi)
    half = rng.uniform(0.12, 0.2) * size
    bend = rng.normal(0, 0.05) * size
    points = [
        (cx - half * np.cos(angle), cy - half * np.sin(angle)),
        (cx - bend * np.sin(angle), cy + bend * np.cos(angle)),
        (cx + half * np.cos(angle), cy + half * np.sin(angle)),
    ]
    width = max(2, size // 48)
    region = _shape_mask(size, lambda d: d.line(points, fill=255, width=width, joint="curve"))
    if scene.object_mask is not None:
        region &= scene.object_mask
    lum = float(scene.image[region].mean()) if region.any() else 128.0
    colour = np.array([245, 245, 240] if lum < 128 else [15, 15, 20], dtype=np.float64)
    out = scene.image.astype(np.float64)
    out[region] = colour
    return region, out


def _blob(rng: np.random.Generator, scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _centre(rng, scene.object_mask, size)
    blobs = []
    for _ in range(int(rng.integers(3, 6))):
        dx, dy = rng.normal(0, 0.03 * size, 2)
        rx, ry = rng.uniform(0.025, 0.06, 2) * size
        blobs.append(_ellipse(cx + dx, cy + dy, rx, ry))

    def draw(canvas: ImageDraw.ImageDraw) -> None:
        for box in blobs:
            canvas.ellipse(box, fill=255)

    region = _shape_mask(size, draw)
    if scene.object_mask is not None:
        region &= scene.object_mask
    stain = np.array([60, 35, 20], dtype=np.float64)
    out = scene.image.astype(np.float64)
    out[region] = 0.35 * out[region] + 0.65 * stain
    return region, out


def _colour_spot(
    rng: np.random.Generator, scene: Scene, size: int
) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _centre(rng, scene.object_mask, size)
    rx, ry = rng.uniform(0.04, 0.08, 2) * size
    region = _shape_mask(size, lambda d: d.ellipse(_ellipse(cx, cy, rx, ry), fill=255))
    if scene.object_mask is not None:
        region &= scene.object_mask
    palette = np.array([[230, 30, 30], [30, 60, 230], [240, 220, 20]], dtype=np.float64)
    colour = palette[int(rng.integers(len(palette)))]
    out = scene.image.astype(np.float64)
    out[region] = 0.4 * out[region] + 0.6 * colour
    return region, out


def _cut_paste(rng: np.random.Generator, scene: Scene, size: int) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _centre(rng, scene.object_mask, size)
    side = int(rng.integers(int(0.12 * size), int(0.22 * size) + 1))
    top = int(np.clip(round(cy - side / 2), 0, size - side))
    left = int(np.clip(round(cx - side / 2), 0, size - side))
    src_top, src_left = (int(v) for v in rng.integers(0, size - side + 1, 2))
    patch = scene.image[src_top : src_top + side, src_left : src_left + side].astype(np.float64)
    patch = np.rot90(patch, int(rng.integers(1, 4))) * rng.uniform(1.15, 1.3)
    region = np.zeros((size, size), dtype=bool)
    region[top : top + side, left : left + side] = True
    out = scene.image.astype(np.float64)
    out[top : top + side, left : left + side] = patch  # (side, side, 3)
    return region, out


def _missing_part(
    rng: np.random.Generator, scene: Scene, size: int
) -> tuple[np.ndarray, np.ndarray]:
    cx, cy = _centre(rng, scene.parts, size, rim=True)
    rx, ry = rng.uniform(0.06, 0.12, 2) * size
    region = _shape_mask(size, lambda d: d.ellipse(_ellipse(cx, cy, rx, ry), fill=255))
    if scene.parts is not None:
        region &= scene.parts
    out = scene.image.astype(np.float64)
    out[region] = scene.background[region]
    return region, out


_DEFECTS: dict[str, Callable[[np.random.Generator, Scene, int], tuple[np.ndarray, np.ndarray]]] = {
    "scratch": _scratch,
    "blob": _blob,
    "cut_paste": _cut_paste,
    "colour_spot": _colour_spot,
    "missing_part": _missing_part,
}


def render_defect(
    category: str, defect: str, rng: np.random.Generator, size: int = 128
) -> DefectSample:
    """A defective image of ``category`` with a ``defect`` (one of DEFECT_KINDS) and its mask.

    The mask is exactly the set of changed pixels: a defect pixel that happens to keep its
    colour is inverted, so no masked pixel is left unchanged.
    """
    _check_choice("defect", defect, DEFECT_KINDS)
    scene = render_good(category, rng, size)
    min_pixels = max(8, size * size // 1000)
    for _ in range(50):
        region, out = _DEFECTS[defect](rng, scene, size)
        if int(region.sum()) >= min_pixels:
            break
    else:
        raise DatasetError(
            f"could not place a {defect} of at least {min_pixels} pixels on a "
            f"{category} image of size {size}; use a larger size or another seed"
        )
    image = np.where(region[..., None], np.clip(np.rint(out), 0, 255), scene.image)
    image = image.astype(np.uint8)
    same = region & np.all(image == scene.image, axis=-1)
    image[same] = 255 - scene.image[same]
    return DefectSample(clean=scene.image, image=image, mask=region)


# ----------------------------------------------------------------------------------- writer


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < MIN_SIZE:
        raise ConfigError(f"image size {size!r} is not valid; pass an int >= {MIN_SIZE}, e.g. 128")
    return int(size)


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{name} {value!r} is not valid; pass an int >= {minimum}")
    return int(value)


def _check_choice(kind: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ConfigError(f"unknown {kind} {value!r}; valid values are {', '.join(valid)}")


def _rng(seed: int, cls_name: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SYNTH_CLASSES.index(cls_name), _SPLIT_CODES[split], index])


def _save_png(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _prepare_out_dir(out: Path, classes: Sequence[str], force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DatasetError(f"output {out} exists and is not a directory; pass a folder path")
    contents = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if contents and not force:
        shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
        raise DatasetError(
            f"output folder {out} is not empty (holds {shown}); choose a new or "
            "empty folder, or pass --force (force=True) to replace the synthetic "
            "classes in it"
        )
    for cls_name in classes:
        if (out / cls_name).is_dir():
            shutil.rmtree(out / cls_name)
    out.mkdir(parents=True, exist_ok=True)


def _write_class(
    out: Path, cls_name: str, seed: int, counts: dict[str, int], size: int, defects: Sequence[str]
) -> None:
    for split, folder in (("train_good", "train/good"), ("test_good", "test/good")):
        for index in range(counts[split]):
            scene = render_good(cls_name, _rng(seed, cls_name, split, index), size)
            _save_png(scene.image, out / cls_name / folder / f"{index:03d}.png")
    per_defect: dict[str, int] = {}
    for index in range(counts["test_bad"]):
        defect = defects[index % len(defects)]
        number = per_defect.get(defect, 0)
        per_defect[defect] = number + 1
        sample = render_defect(cls_name, defect, _rng(seed, cls_name, "test_bad", index), size)
        _save_png(sample.image, out / cls_name / "test" / defect / f"{number:03d}.png")
        mask = sample.mask.astype(np.uint8) * 255
        _save_png(mask, out / cls_name / "ground_truth" / defect / f"{number:03d}_mask.png")


def synthesize(
    out_dir: str | os.PathLike[str],
    seed: int = 0,
    n_train_good: int = 4,
    n_test_good: int = 3,
    n_test_bad: int = 5,
    size: int = 128,
    classes: Sequence[str] | None = None,
    defects: Sequence[str] | None = None,
    force: bool = False,
) -> Path:
    """Write the synthetic dataset and its meta.json under ``out_dir``; return ``out_dir``.

    Per class: ``n_train_good`` train images, ``n_test_good`` good and ``n_test_bad`` anomalous
    test images (defect kinds taken in turn from ``defects``, all five by default). A non-empty
    ``out_dir`` is refused unless ``force``, which replaces the folders of ``classes`` in it.
    """
    seed = _check_count("seed", seed, 0)
    size = _check_size(size)
    counts = {
        "train_good": _check_count("n_train_good", n_train_good, 1),
        "test_good": _check_count("n_test_good", n_test_good, 1),
        "test_bad": _check_count("n_test_bad", n_test_bad, 1),
    }
    classes = tuple(classes) if classes is not None else SYNTH_CLASSES
    defects = tuple(defects) if defects is not None else DEFECT_KINDS
    if not classes or not defects:
        raise ConfigError(
            f"classes {list(classes)} and defects {list(defects)} must not be empty;"
            f" valid classes are {list(SYNTH_CLASSES)}, defects {list(DEFECT_KINDS)}"
        )
    for cls_name in classes:
        _check_choice("category", cls_name, SYNTH_CLASSES)
    if len(set(classes)) != len(classes):
        raise ConfigError(f"classes {list(classes)} repeat a name; list each class once")
    for defect in defects:
        _check_choice("defect", defect, DEFECT_KINDS)
    out = Path(out_dir)
    _prepare_out_dir(out, classes, force)
    for cls_name in classes:
        _write_class(out, cls_name, seed, counts, size, defects)
    write_meta(out, solve_mvtec(out, classes=classes))
    return out
