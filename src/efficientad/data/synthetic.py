"""A small synthetic inspection dataset, so that EfficientAD can be tried without downloading one.

The part is a turned metal flange seen from above: a disc with fine concentric lathe grooves, a
bevelled rim, a smooth hub, a centre bore and six bolt holes, on a dark conveyor. Good images vary
only by what a real line would vary by (a few pixels of placement, a little rotation, exposure and
sensor noise), so a model that learns them should flag the three drawn defects: scratches, stains
and worn patches where the grooves are polished away.

Each image is rendered from its own random streams, one for the part and one for the defect, so a
defective image can be re-rendered without its defect; that is what makes the ground-truth masks
exact: a pixel is in the mask exactly when the defect touched it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..errors import EfficientADError

DEFECT_TYPES = ("scratch", "stain", "worn")

# Every folder gets its own seed stream, so that e.g. train/good/000.png and test/good/000.png are
# different parts rather than the same one twice.
_FOLDERS = ("train", "good", *DEFECT_TYPES)

# A folder holding this file was written by make_dataset and may be rewritten by it; any other
# non-empty folder is left alone, because it could be a user's real data.
_MARKER = ".efficientad-synthetic"

_METAL_TINT = np.array([0.97, 0.99, 1.03], dtype=np.float32)
_SENSOR_NOISE = 0.012


class _Part(NamedTuple):
    """One rendered part, in float RGB in [0, 1] before exposure and noise are applied."""

    image: np.ndarray
    plain: np.ndarray  # the same part with the lathe grooves polished away, for worn patches
    surface: np.ndarray  # coverage of metal, so defects never land on the conveyor or in a hole
    cx: float
    cy: float
    turn: float  # angle of the first bolt hole
    x: np.ndarray
    y: np.ndarray


def _coverage(signed_distance: np.ndarray) -> np.ndarray:
    """Fraction of each pixel inside a shape, from its distance to the edge (positive inside).

    A one-pixel ramp keeps edges anti-aliased like a real camera's, without the blur that would
    make the mask of a defect fuzzy.
    """
    return np.clip(signed_distance + 0.5, 0.0, 1.0)


def _paint(base: np.ndarray, alpha: np.ndarray, value: np.ndarray | float) -> np.ndarray:
    return base + alpha * (value - base)


def _render_part(rng: np.random.Generator, size: int) -> _Part:
    """Draw one flange with its placement, rotation and lighting jittered by ``rng``."""
    scale = size / 256.0
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx = size / 2 + rng.uniform(-3.0, 3.0) * scale
    cy = size / 2 + rng.uniform(-3.0, 3.0) * scale
    radius = 0.40 * size * rng.uniform(0.99, 1.01)
    turn = rng.uniform(-0.04, 0.04)
    light = np.pi / 4 + rng.uniform(-0.1, 0.1)
    groove_phase = rng.uniform(0.0, 2 * np.pi)
    dx, dy = x - cx, y - cy
    r = np.hypot(dx, dy)
    phi = np.arctan2(dy, dx)

    # Conveyor: dark, lit a little more towards the bottom, with a faint low-frequency mottle.
    mottle = Image.fromarray(rng.standard_normal((6, 6)).astype(np.float32))
    mottle = np.asarray(mottle.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    background = 0.15 + 0.05 * (y / size) + 0.012 * mottle

    # A turned face reflects in two lobes across the grooves (anisotropic highlights).
    face = 0.50 + 0.16 * np.cos(2 * (phi - light)) + 0.06 * (1 - r / radius)
    # At least three pixels a groove, so small renders do not alias the grooves into moire.
    period = max(5.0 * scale, 3.0)
    grooves = 0.07 * np.sin(2 * np.pi * r / period + groove_phase) + 0.015 * np.sin(2 * np.pi * r / (7.3 * period))
    bevel = 0.74 + 0.14 * np.cos(phi - light)
    hub = 0.64 + 0.05 * np.cos(2 * (phi - light))

    disc = _coverage(radius - r)
    inside_bevel = _coverage(radius - 0.045 * size - r)
    hub_cover = _coverage(0.14 * size - r)
    bore = _coverage(0.085 * size - r)
    hole_radius = 0.032 * size
    # Distance of every pixel to each of the six bolt-hole centres.
    angles = turn + np.arange(6) * np.pi / 3
    holes = [np.hypot(x - cx - 0.27 * size * np.cos(a), y - cy - 0.27 * size * np.sin(a)) for a in angles]

    def shade(with_grooves: bool) -> np.ndarray:
        lum = _paint(background, disc, bevel)
        lum = _paint(lum, inside_bevel, face + grooves if with_grooves else face)
        lum = _paint(lum, hub_cover, hub)
        lum = _paint(lum, bore, 0.06)
        for distance in holes:
            lum = _paint(lum, _coverage(hole_radius + 1.6 * scale - distance), 0.86)  # chamfered edge
            lum = _paint(lum, _coverage(hole_radius - distance), 0.08)
        return lum[..., None] * _METAL_TINT

    surface = disc * (1 - bore)
    for distance in holes:
        surface = surface * (1 - _coverage(hole_radius + 1.6 * scale - distance))
    return _Part(shade(True), shade(False), surface, cx, cy, turn, x, y)


def _place(part: _Part, rng: np.random.Generator, size: int, low: float, high: float) -> tuple[float, float]:
    """A point on the grooved face, between ``low`` and ``high`` times the image size from the centre.

    It lies roughly midway between two bolt holes, so that a hole does not hide half the defect.
    """
    rho = rng.uniform(low, high) * size
    angle = part.turn + (rng.integers(6) + 0.5) * np.pi / 3 + rng.uniform(-0.2, 0.2)
    return part.cx + rho * np.cos(angle), part.cy + rho * np.sin(angle)


def _scratch(part: _Part, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray | float]:
    """A thin, slightly curved line, bright (freshly exposed metal) or dark (dirt-filled)."""
    scale = size / 256.0
    mx, my = _place(part, rng, size, 0.20, 0.30)
    # Roughly tangential, so the whole scratch stays on the face instead of running into the bore.
    direction = np.arctan2(my - part.cy, mx - part.cx) + np.pi / 2 + rng.uniform(-0.6, 0.6)
    length = rng.uniform(0.28, 0.45) * size
    ux, uy = np.cos(direction), np.sin(direction)
    bend = rng.uniform(-0.12, 0.12) * length
    start = np.array([mx - ux * length / 2, my - uy * length / 2])
    end = np.array([mx + ux * length / 2, my + uy * length / 2])
    control = np.array([mx - uy * bend, my + ux * bend])
    t = np.linspace(0.0, 1.0, 9)[:, None]
    points = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end

    distance = np.full(part.x.shape, np.inf, dtype=np.float32)
    for (ax, ay), (bx, by) in zip(points[:-1], points[1:]):
        sx, sy = bx - ax, by - ay
        along = np.clip(((part.x - ax) * sx + (part.y - ay) * sy) / (sx * sx + sy * sy), 0.0, 1.0)
        distance = np.minimum(distance, np.hypot(part.x - ax - along * sx, part.y - ay - along * sy))
    half_width = rng.uniform(1.2, 1.8) * scale
    alpha = _coverage(half_width - distance) * part.surface
    colour = 0.95 if rng.random() < 0.6 else 0.10
    return alpha, colour


def _ellipse_frame(part: _Part, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates relative to a random point on the face, along randomly rotated axes."""
    cx, cy = _place(part, rng, size, 0.18, 0.32)
    rotation = rng.uniform(0, np.pi)
    dx, dy = part.x - cx, part.y - cy
    return dx * np.cos(rotation) + dy * np.sin(rotation), -dx * np.sin(rotation) + dy * np.cos(rotation)


def _stain(part: _Part, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray | float]:
    """An irregular soft-edged spot of rust or oil."""
    u, v = _ellipse_frame(part, rng, size)
    a, b = rng.uniform(0.045, 0.075, size=2) * size
    theta = np.arctan2(v, u)
    phases = rng.uniform(0, 2 * np.pi, size=2)
    wobble = 1 + 0.12 * np.sin(3 * theta + phases[0]) + 0.07 * np.sin(5 * theta + phases[1])
    q = np.hypot(u / a, v / b) / wobble
    # The fade reaches exactly zero at the outline, so the soft edge stays inside the mask.
    alpha = rng.uniform(0.75, 0.9) * np.clip((1 - q) / 0.3, 0.0, 1.0) * part.surface
    rust, oil = np.array([0.50, 0.28, 0.14], np.float32), np.array([0.10, 0.09, 0.08], np.float32)
    return alpha, rust if rng.random() < 0.5 else oil


def _worn(part: _Part, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray | float]:
    """An elliptical patch rubbed smooth and shiny: the grooves are missing there."""
    u, v = _ellipse_frame(part, rng, size)
    a, b = rng.uniform(0.05, 0.08, size=2) * size
    q = np.hypot(u / a, v / b)
    alpha = _coverage((1 - q) * min(a, b)) * part.surface
    return alpha, np.minimum(part.plain * 1.18, 1.0)


_DRAW = {"scratch": _scratch, "stain": _stain, "worn": _worn}


def _sample(seed: int, folder: str, index: int, size: int, with_defect: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Render image ``index`` of ``folder`` as (HxWx3 uint8 image, HxW bool defect mask).

    ``with_defect=False`` renders the very same part, exposure and noise without the defect.
    """
    part_seq, defect_seq = np.random.SeedSequence([seed, _FOLDERS.index(folder), index]).spawn(2)
    part_rng = np.random.default_rng(part_seq)
    part = _render_part(part_rng, size)
    gain = part_rng.uniform(0.96, 1.04)
    noise = part_rng.standard_normal((size, size, 3), dtype=np.float32) * _SENSOR_NOISE

    image = part.image
    mask = np.zeros((size, size), dtype=bool)
    if with_defect and folder in _DRAW:
        alpha, colour = _DRAW[folder](part, np.random.default_rng(defect_seq), size)
        mask = alpha > 0
        # np.where, not blending everywhere, so pixels outside the mask stay bit-identical.
        image = np.where(mask[..., None], _paint(image, alpha[..., None], colour), image)
    pixels = np.clip((image * gain + noise) * 255 + 0.5, 0, 255).astype(np.uint8)
    return pixels, mask


def _prepare(category_dir: Path) -> None:
    if category_dir.exists():
        if not category_dir.is_dir():
            raise EfficientADError(f"cannot write a dataset to {category_dir}: it is a file")
        if (category_dir / _MARKER).is_file():
            # Stale images from an earlier, larger run would otherwise be mixed into the new one.
            shutil.rmtree(category_dir)
        elif any(category_dir.iterdir()):
            raise EfficientADError(
                f"{category_dir} already exists and was not written by efficientad; "
                "choose another folder or category name"
            )
    category_dir.mkdir(parents=True, exist_ok=True)
    (category_dir / _MARKER).write_text("written by efficientad.synthetic.make_dataset; safe to delete\n")


def make_dataset(
    root: Path,
    category: str = "widget",
    n_train: int = 60,
    n_test_good: int = 15,
    n_test_defect: int = 15,
    size: int = 256,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset in the MVTec AD layout and return its category folder.

    Layout under ``root/category``: ``train/good/000.png ...``, ``test/good/``, one
    ``test/<defect>/`` folder per defect type in :data:`DEFECT_TYPES` (the ``n_test_defect``
    images are shared out among them in turn) and ``ground_truth/<defect>/<stem>_mask.png`` with
    0/255 masks the size of the images. Images are ``size`` x ``size`` RGB PNGs. The same
    arguments always give the same files. A category folder written earlier by this function is
    replaced; any other non-empty one raises :class:`EfficientADError`.
    """
    if not category or Path(category).name != category or category in (".", ".."):
        raise EfficientADError(f"category must be a plain folder name, got {category!r}")
    if n_train < 1:
        raise EfficientADError(f"n_train must be at least 1, got {n_train}")
    if n_test_good < 0 or n_test_defect < 0:
        raise EfficientADError("n_test_good and n_test_defect must not be negative")
    if size < 64:
        raise EfficientADError(f"size must be at least 64 pixels so defects stay visible, got {size}")
    if seed < 0:
        raise EfficientADError(f"seed must not be negative, got {seed}")

    category_dir = Path(root) / category
    _prepare(category_dir)
    counts = {"train": n_train, "good": n_test_good}
    for k, defect in enumerate(DEFECT_TYPES):
        counts[defect] = n_test_defect // len(DEFECT_TYPES) + (k < n_test_defect % len(DEFECT_TYPES))

    for folder, count in counts.items():
        if count == 0:
            continue
        image_dir = category_dir / ("train/good" if folder == "train" else f"test/{folder}")
        image_dir.mkdir(parents=True)
        mask_dir = category_dir / "ground_truth" / folder
        if folder in _DRAW:
            mask_dir.mkdir(parents=True)
        width = max(3, len(str(count - 1)))
        for index in range(count):
            pixels, mask = _sample(seed, folder, index, size)
            stem = f"{index:0{width}d}"
            # Low compression: the sensor noise barely compresses anyway, and it keeps this fast.
            Image.fromarray(pixels).save(image_dir / f"{stem}.png", compress_level=1)
            if folder in _DRAW:
                Image.fromarray(mask.astype(np.uint8) * 255).save(mask_dir / f"{stem}_mask.png", compress_level=1)
    return category_dir
