"""The penalty images: ImageNet-like pictures on which the student's output is kept small.

Prepared as the reference reproduction does: resized to twice the image size, centre-cropped to the
image size (a random grayscale, p=0.3, is drawn per training step). Each is kept only at the crop's
size, 3*H*W bytes (196 KB at 256x256); a folder whose crops would need more than
``memory_limit_bytes`` is read from disk per step instead, so that memory does not grow with it.
"""

from __future__ import annotations

import os
from typing import Protocol

import torch
from PIL import Image
from tqdm import tqdm

from ..data.images import list_images, read_image, resize_to_tensor

# 1 GiB holds about 5,400 crops at 256x256; beyond that, one image is decoded per step (a few ms).
DEFAULT_MEMORY_LIMIT_BYTES = 1 << 30


class PenaltySource(Protocol):
    """Anything that gives uint8 (3, H, W) penalty images by index: PenaltyImages or a uint8 tensor."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> torch.Tensor: ...


def prepare(image: Image.Image, image_size: tuple[int, int]) -> torch.Tensor:
    """Resize to twice ``image_size`` and keep the centre crop of ``image_size``: uint8 (3, H, W)."""
    height, width = image_size
    image = image.resize((2 * width, 2 * height), Image.BILINEAR)
    top, left = height // 2, width // 2
    return resize_to_tensor(image.crop((left, top, left + width, top + height)), image_size)


class PenaltyImages:
    """The images of a folder (searched recursively), prepared for the penalty loss."""

    def __init__(
        self,
        folder: str | os.PathLike,
        image_size: tuple[int, int],
        progress: bool = True,
        memory_limit_bytes: int = DEFAULT_MEMORY_LIMIT_BYTES,
    ):
        self.paths = list_images(folder, recursive=True)
        self.image_size = tuple(image_size)
        height, width = self.image_size
        self.in_memory = len(self.paths) * 3 * height * width <= memory_limit_bytes
        self.images: torch.Tensor | None = None
        if self.in_memory:
            # Filled in place: stacking a list would hold every crop twice at the peak.
            self.images = torch.empty((len(self.paths), 3, height, width), dtype=torch.uint8)
            for index, path in enumerate(tqdm(self.paths, desc="Loading penalty images", disable=not progress, unit="img")):
                self.images[index] = self._read(index)

    def _read(self, index: int) -> torch.Tensor:
        return prepare(read_image(self.paths[index]), self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.images[index] if self.images is not None else self._read(index)
