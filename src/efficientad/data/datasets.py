"""Dataset layouts: which files are training, validation and test images, as plain records.

Nothing here decodes images; only :func:`read_mask` and :func:`read_loco_regions` read ground-truth
masks, on request. Supported layouts (``format`` of :func:`load_split`):

* ``mvtec`` (MVTec AD): ``ROOT/CATEGORY/train/good``, ``test/<type>``, and
  ``ground_truth/<type>/<stem>_mask.png``.
* ``loco`` (MVTec LOCO AD): ``train/good``, ``validation/good``, ``test/<type>`` with types
  ``good``, ``logical_anomalies`` and ``structural_anomalies``, one folder of masks per defective
  image in ``ground_truth/<type>/<stem>/NNN.png`` (one file per defect), and
  ``defects_config.json``.
* ``visa`` (VisA, raw layout): ``ROOT/CATEGORY/Data/...`` split by the official one-class list
  ``ROOT/split_csv/1cls.csv``.
* ``folder`` (your own images): see :func:`load_folder_split`.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .images import IMAGE_EXTENSIONS, list_images
from ..choices import DATASET_FORMATS, check_choice
from ..errors import EfficientADError

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Sample:
    """One test image: ``label`` 0 (good) or 1 (anomalous), its defect type (``"good"`` for good
    images) and its ground-truth mask files (empty for good images and where no mask exists)."""

    path: Path
    label: int
    defect_type: str
    mask_paths: tuple[Path, ...] = ()


@dataclass
class Split:
    """The images of one category. ``validation`` is None when the layout has no validation set:
    the caller then holds out part of ``train`` itself."""

    format: str
    category: str
    train: list[Path]
    validation: list[Path] | None
    test: list[Sample]

    @property
    def labels(self) -> list[int]:
        """The test labels, in test order."""
        return [sample.label for sample in self.test]

    @property
    def defect_types(self) -> list[str]:
        """The test defect types, in test order."""
        return [sample.defect_type for sample in self.test]


@dataclass(frozen=True)
class DefectSpec:
    """One entry of MVTec LOCO AD's ``defects_config.json``.

    ``pixel_value`` is the value that marks this defect in its mask files. The defect counts as
    fully detected once ``saturation_threshold`` pixels of it are found, or, when
    ``relative_saturation`` is true, that fraction of its area.
    """

    name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool

    def saturation_pixels(self, area: int, pixel_scale: float = 1.0) -> float:
        """Saturation threshold in pixels for a defect of ``area`` pixels.

        As in the official evaluation, a relative threshold is ``int(fraction * area)`` and an
        absolute one is capped at the area. ``pixel_scale`` (pixels of the evaluated mask per pixel
        of the original image) converts absolute thresholds for resized masks. The result is at
        least one pixel, where the official code would divide by zero.
        """
        if self.relative_saturation:
            return float(max(int(self.saturation_threshold * area), 1))
        return float(max(min(self.saturation_threshold * pixel_scale, area), 1.0))


@dataclass(frozen=True)
class LocoRegion:
    """One defect of an MVTec LOCO AD image: its boolean mask, its spec and its saturation
    threshold in pixels of ``mask``."""

    mask: np.ndarray
    defect: DefectSpec
    saturation: float


def load_split(format: str, root: PathLike, category: str) -> Split:
    """The train/validation/test files of ``category`` in the dataset at ``root``.

    ``format`` is one of :data:`efficientad.choices.DATASET_FORMATS`; the module docstring describes each layout. Raises
    :class:`EfficientADError` naming the expected path when the layout does not match.
    """
    check_choice("format", format, DATASET_FORMATS)
    loader = {"mvtec": _load_mvtec, "loco": _load_loco, "visa": _load_visa, "folder": _load_folder}[format]
    root = Path(root)
    if not root.is_dir():
        raise EfficientADError(f"dataset root not found: {root}")
    return loader(root, category)


def _require_dir(path: Path, layout: str) -> Path:
    if not path.is_dir():
        raise EfficientADError(f"expected {layout} layout: {path} not found")
    return path


def _category_dir(root: Path, category: str, layout: str) -> Path:
    path = root / category
    if not path.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        listed = ", ".join(found[:20]) + (", ..." if len(found) > 20 else "")
        raise EfficientADError(f"expected {layout} layout: {path} not found (folders in {root}: {listed or 'none'})")
    return path


def _type_dirs(test_dir: Path) -> list[Path]:
    """Sub-folders of a test folder, ``good`` first, the defect types after it in name order."""
    folders = sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise EfficientADError(f"no defect-type folders in {test_dir}")
    return sorted(folders, key=lambda p: (p.name != "good", p.name))


def _test_samples(test_dir: Path, layout: str, masks_of: Callable[[str, Path], tuple[Path, ...]]) -> list[Sample]:
    """Samples of ``test/<type>/*`` folders; ``masks_of(defect_type, image)`` finds a defect's masks."""
    test = []
    for type_dir in _type_dirs(_require_dir(test_dir, layout)):
        for path in list_images(type_dir):
            if type_dir.name == "good":
                test.append(Sample(path, 0, "good"))
            else:
                test.append(Sample(path, 1, type_dir.name, masks_of(type_dir.name, path)))
    return test


def _load_mvtec(root: Path, category: str) -> Split:
    base = _category_dir(root, category, "MVTec AD")
    train = list_images(_require_dir(base / "train" / "good", "MVTec AD"))

    def masks_of(defect_type: str, path: Path) -> tuple[Path, ...]:
        mask = base / "ground_truth" / defect_type / f"{path.stem}_mask.png"
        return (mask,) if mask.is_file() else ()

    return Split("mvtec", category, train, None, _test_samples(base / "test", "MVTec AD", masks_of))


def _load_loco(root: Path, category: str) -> Split:
    base = _category_dir(root, category, "MVTec LOCO AD")
    train = list_images(_require_dir(base / "train" / "good", "MVTec LOCO AD"))
    validation = list_images(_require_dir(base / "validation" / "good", "MVTec LOCO AD"))

    def masks_of(defect_type: str, path: Path) -> tuple[Path, ...]:
        # One folder per test image, one file per defect in it.
        mask_dir = base / "ground_truth" / defect_type / path.stem
        return tuple(sorted(mask_dir.glob("*.png"))) if mask_dir.is_dir() else ()

    return Split("loco", category, train, validation, _test_samples(base / "test", "MVTec LOCO AD", masks_of))


def load_defects_config(root: PathLike, category: str) -> dict[int, DefectSpec]:
    """MVTec LOCO AD's ``ROOT/CATEGORY/defects_config.json`` as ``{pixel_value: DefectSpec}``."""
    path = Path(root) / category / "defects_config.json"
    if not path.is_file():
        raise EfficientADError(f"expected MVTec LOCO AD layout: {path} not found")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EfficientADError(f"cannot read {path}: {error}") from None
    if not isinstance(entries, list) or not entries:
        raise EfficientADError(f"{path} must hold a non-empty JSON list of defect entries")
    specs: dict[int, DefectSpec] = {}
    for i, entry in enumerate(entries):
        try:
            spec = DefectSpec(
                name=str(entry["defect_name"]),
                pixel_value=int(entry["pixel_value"]),
                saturation_threshold=float(entry["saturation_threshold"]),
                relative_saturation=bool(entry["relative_saturation"]),
            )
        except (KeyError, TypeError, ValueError):
            raise EfficientADError(
                f"{path}: entry {i} needs defect_name, pixel_value, saturation_threshold and relative_saturation"
            ) from None
        if not 1 <= spec.pixel_value <= 255 or spec.pixel_value in specs:
            raise EfficientADError(f"{path}: entry {i} has an invalid or repeated pixel_value {spec.pixel_value}")
        limit = 1.0 if spec.relative_saturation else np.inf
        if not 0.0 < spec.saturation_threshold <= limit:
            raise EfficientADError(
                f"{path}: entry {i} has saturation_threshold {spec.saturation_threshold}, expected"
                f" {'a fraction in (0, 1]' if spec.relative_saturation else 'a positive pixel count'}"
            )
        specs[spec.pixel_value] = spec
    return specs


def _load_visa(root: Path, category: str) -> Split:
    csv_path = root / "split_csv" / "1cls.csv"
    if not csv_path.is_file():
        raise EfficientADError(f"expected VisA layout: {csv_path} not found")
    try:
        with csv_path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise EfficientADError(f"cannot read {csv_path}: {error}") from None
    columns = {"object", "split", "label", "image", "mask"}
    if not rows or not columns <= set(rows[0]):
        raise EfficientADError(f"{csv_path} must have the columns {', '.join(sorted(columns))}")
    rows = [row for row in rows if row["object"] == category]
    if not rows:
        raise EfficientADError(f"no rows for object {category!r} in {csv_path}")

    def existing(relative: str) -> Path:
        path = root / relative.strip()
        if not path.is_file():
            raise EfficientADError(f"expected VisA layout: {path} (listed in {csv_path}) not found")
        return path

    train, test = [], []
    for row in rows:
        split, label = row["split"].strip(), row["label"].strip()
        if split not in ("train", "test") or label not in ("normal", "anomaly"):
            raise EfficientADError(f"{csv_path}: unexpected split {split!r} or label {label!r} for {row['image']}")
        image = existing(row["image"])
        if split == "train":
            train.append(image)
        elif label == "normal":
            test.append(Sample(image, 0, "good"))
        else:
            mask = row["mask"].strip()
            test.append(Sample(image, 1, "anomaly", (existing(mask),) if mask else ()))
    if not train:
        raise EfficientADError(f"no training images for object {category!r} in {csv_path}")
    return Split("visa", category, train, None, test)


def _first_dir(*candidates: Path) -> Path | None:
    return next((path for path in candidates if path.is_dir()), None)


def _load_folder(root: Path, category: str) -> Split:
    base = _category_dir(root, category, "folder")
    train = base / "train"
    if not train.is_dir():
        raise EfficientADError(f"expected folder layout: {train} not found (images in it or in train/good)")
    test = base / "test"
    defect_dirs = {}
    if test.is_dir():
        defect_dirs = {p.name: p for p in _type_dirs(test) if p.name != "good"}
    return load_folder_split(
        train_dir=_first_dir(train / "good") or train,
        test_good_dir=_first_dir(test / "good"),
        test_defect_dirs=defect_dirs,
        mask_dir=_first_dir(base / "ground_truth", base / "masks"),
        validation_dir=_first_dir(base / "validation" / "good", base / "validation"),
        category=category,
    )


def _mask_index(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}


def load_folder_split(
    train_dir: PathLike,
    test_good_dir: PathLike | None = None,
    test_defect_dirs: PathLike | Mapping[str, PathLike] | None = None,
    mask_dir: PathLike | None = None,
    validation_dir: PathLike | None = None,
    category: str = "custom",
) -> Split:
    """A split from your own folders of images (not searched recursively).

    ``test_defect_dirs`` is either a mapping ``{defect type: folder}`` or one folder whose
    sub-folders are the defect types (a folder without sub-folders is one type named after it).
    Masks are looked up by the image's file stem in ``mask_dir/<type>/`` and then ``mask_dir/``,
    as ``<stem>_mask.<ext>`` or ``<stem>.<ext>``; a defective image without one gets no mask.

    ``load_split("folder", ROOT, CATEGORY)`` reads the same from the convention
    ``ROOT/CATEGORY/train[/good]``, ``test/good``, ``test/<type>``, masks in
    ``ground_truth/`` or ``masks/`` and an optional ``validation[/good]``; without a validation
    folder, ``validation`` is None.
    """
    train = list_images(train_dir)
    validation = list_images(validation_dir) if validation_dir is not None else None
    test = [Sample(path, 0, "good") for path in list_images(test_good_dir)] if test_good_dir is not None else []
    if test_defect_dirs is None:
        defect_dirs: dict[str, Path] = {}
    elif isinstance(test_defect_dirs, Mapping):
        defect_dirs = {str(name): Path(folder) for name, folder in test_defect_dirs.items()}
    else:
        folder = Path(test_defect_dirs)
        if not folder.is_dir():
            raise EfficientADError(f"defect image folder not found: {folder}")
        defect_dirs = {p.name: p for p in sorted(folder.iterdir()) if p.is_dir() and not p.name.startswith(".")}
        defect_dirs = defect_dirs or {folder.name: folder}
    if "good" in defect_dirs:
        raise EfficientADError("a defect type cannot be named 'good' (pass good test images as test_good_dir)")
    shared_masks = _mask_index(Path(mask_dir)) if mask_dir is not None else {}
    for defect_type, folder in sorted(defect_dirs.items()):
        type_masks = _mask_index(Path(mask_dir) / defect_type) if mask_dir is not None else {}
        for path in list_images(folder):
            mask = next(
                (
                    index[name]
                    for index in (type_masks, shared_masks)
                    for name in (f"{path.stem}_mask", path.stem)
                    if name in index
                ),
                None,
            )
            test.append(Sample(path, 1, defect_type, (mask,) if mask is not None else ()))
    return Split("folder", category, train, validation, test)


def _mask_values(path: Path) -> np.ndarray:
    """A mask file's raw values as a 2-D array; colour masks keep their largest channel."""
    if not path.is_file():
        raise EfficientADError(f"mask not found: {path}")
    try:
        with Image.open(path) as image:
            if image.mode in ("RGBA", "LA", "PA"):
                # An opaque alpha channel would otherwise mark every pixel as defective.
                image = image.convert("RGB")
            values = np.array(image)
    except UnidentifiedImageError:
        raise EfficientADError(f"not an image file (or an unsupported format): {path}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise EfficientADError(f"corrupt or truncated mask {path}: {error}") from None
    return values.max(axis=2) if values.ndim == 3 else values


def _resized(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or mask.shape == tuple(size):
        return mask
    height, width = size
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    return np.asarray(image) > 0


def read_mask(paths: PathLike | Sequence[PathLike], size: tuple[int, int] | None = None) -> np.ndarray:
    """The union of the given mask files as a boolean (H, W) array (any value > 0 is a defect).

    With ``size`` = (height, width) every mask is resized there by nearest neighbour, and no paths
    give an all-false mask of that size (a good image); without it the masks must share one size.
    """
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not paths:
        if size is None:
            raise EfficientADError("read_mask needs a size when given no mask files")
        return np.zeros(tuple(size), dtype=bool)
    union = None
    for path in map(Path, paths):
        mask = _resized(_mask_values(path) > 0, size)
        if union is None:
            union = mask
        elif mask.shape != union.shape:
            raise EfficientADError(f"mask {path} has shape {mask.shape}, the masks before it {union.shape}")
        else:
            union |= mask
    return union


def read_loco_regions(
    sample: Sample, defects: Mapping[int, DefectSpec], size: tuple[int, int] | None = None
) -> list[LocoRegion]:
    """The defects of an MVTec LOCO AD test image, one :class:`LocoRegion` per mask file.

    Each mask file holds one defect, marked by its ``pixel_value`` from ``defects``
    (:func:`load_defects_config`). With ``size`` the masks are resized by nearest neighbour and
    absolute saturation thresholds scaled by the change in pixel count.
    """
    regions = []
    for path in sample.mask_paths:
        values = _mask_values(Path(path))
        ids = np.unique(values[values > 0])
        if len(ids) != 1:
            raise EfficientADError(f"LOCO mask {path} must mark exactly one defect value, found {ids.tolist()}")
        defect = defects.get(int(ids[0]))
        if defect is None:
            raise EfficientADError(f"pixel value {int(ids[0])} of {path} is not in defects_config.json")
        mask = _resized(values > 0, size)
        area = int(mask.sum())
        regions.append(LocoRegion(mask, defect, defect.saturation_pixels(area, mask.size / values.size)))
    return regions
