"""Reading images from disk into the tensors the networks take.

Every image goes through :func:`read_image`, so that an unreadable file fails in one place with a
message that names it, and odd formats (grayscale, RGBA, 16-bit, palette) become plain RGB.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ..errors import EfficientADError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = str | os.PathLike | Image.Image | np.ndarray


def list_images(folder: str | os.PathLike, recursive: bool = False) -> list[Path]:
    """Sorted image files in ``folder``; raises if the folder is missing or holds no image."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EfficientADError(f"image folder not found: {folder}")
    pattern = "**/*" if recursive else "*"
    paths = sorted(p for p in folder.glob(pattern) if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise EfficientADError(
            f"no images in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)}{', recursively' if recursive else ''})"
        )
    return paths


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # Scale high-bit-depth images by their dtype's range, not by clipping at 255.
        array = np.asarray(image)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            scale = max(float(array.max()), 1.0)
        array = np.clip(array.astype(np.float64) / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become black, the colour they have in most viewers' exports.
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def read_image(source: ImageInput) -> Image.Image:
    """Open an image path, PIL image or HxW(x3/4) array as an RGB PIL image.

    Raises :class:`EfficientADError` naming the file when it is missing, truncated or not an image.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, np.ndarray):
        array = source
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise EfficientADError(f"an image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}")
        if array.dtype != np.uint8:
            if np.issubdtype(array.dtype, np.floating):
                array = np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8)
            else:
                array = (array.astype(np.float64) / max(float(np.iinfo(array.dtype).max), 1.0) * 255.0 + 0.5).astype(np.uint8)
        return _to_rgb(Image.fromarray(array))
    path = Path(source)
    if not path.is_file():
        raise EfficientADError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except Image.DecompressionBombError as error:
        raise EfficientADError(f"image too large to decode safely {path}: {error}") from None
    except UnidentifiedImageError:
        raise EfficientADError(f"not an image file (or an unsupported format): {path}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise EfficientADError(f"corrupt or truncated image {path}: {error}") from None


def resize_to_tensor(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize an RGB image to ``size`` (height, width) and return it as a uint8 CHW tensor.

    Bilinear with antialiasing, as torchvision's ``Resize`` does on PIL images in the reference.
    """
    height, width = size
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def read_images(
    sources: Iterable[ImageInput], size: tuple[int, int], progress: bool = False, desc: str = "Loading images"
) -> tuple[list[torch.Tensor], list[dict[str, str]]]:
    """Decode and resize every image that can be read, and go on past those that cannot.

    Returns the uint8 CHW tensors and, per unreadable source, ``{"image": its path (or position),
    "error": why}``, so that a folder with several bad files is reported in one go.
    """
    from tqdm import tqdm

    tensors, failures = [], []
    for index, source in enumerate(tqdm(list(sources), desc=desc, disable=not progress, unit="img")):
        try:
            tensors.append(resize_to_tensor(read_image(source), size))
        except EfficientADError as error:
            name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else f"#{index} ({type(source).__name__})"
            failures.append({"image": name, "error": str(error)})
    return tensors, failures


def unreadable(failures: Sequence[dict[str, str]], total: int, shown: int = 20) -> str:
    """One line: how many of ``total`` images cannot be read, and why, for the first ``shown`` of them."""
    more = f"; and {len(failures) - shown} more" if len(failures) > shown else ""
    return f"{len(failures)} of {total} images cannot be read: " + "; ".join(f["error"] for f in failures[:shown]) + more


def load_images(
    sources: Iterable[ImageInput], size: tuple[int, int], progress: bool = False, desc: str = "Loading images"
) -> torch.Tensor:
    """Decode and resize images into one uint8 tensor of shape (N, 3, H, W); every unreadable one is named."""
    sources = list(sources)
    tensors, failures = read_images(sources, size, progress, desc)
    if failures:
        raise EfficientADError(unreadable(failures, len(sources)))
    if not tensors:
        raise EfficientADError("no images given")
    return torch.stack(tensors)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to a new float32 tensor in [0, 1] (the input is never changed); the networks normalise themselves."""
    return images.to(torch.float32, copy=True).div_(255.0)


def split_validation(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded random split into (train, validation), the validation part being ``fraction`` of it.

    Like the reference reproduction, the training part is ``int((1 - fraction) * n)`` items.
    """
    if not 0.0 < fraction < 1.0:
        raise EfficientADError(f"validation fraction must be in (0, 1), got {fraction}")
    n = len(items)
    n_train = int(round((1.0 - fraction) * n, 6))
    if n_train < 1 or n - n_train < 1:
        raise EfficientADError(
            f"need at least 2 training images to hold out {fraction:.0%} for validation, got {n}"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [items[i] for i in order[:n_train]], [items[i] for i in order[n_train:]]
