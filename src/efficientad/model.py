"""EfficientAD as one torch module, and the model file that stores it.

:class:`EfficientADModel` holds the frozen teacher, the student, the autoencoder and everything
learned besides weights (the teacher's per-channel mean/std and the four map quantiles) as buffers,
so ``state_dict()`` is the whole learned state.

Anomaly maps, as in the paper (section 3.4 and the reference reproduction):

- local map  = channel mean of ``(teacher_norm - student[:, :384])**2``
- global map = channel mean of ``(autoencoder - student[:, 384:])**2``
- each mapped linearly so that its validation quantile q0.9 -> 0 and q0.995 -> 0.1
- combined   = their mean, padded by 4 pixels per side, resized bilinearly to the image size;
  the image score is the combined map's maximum.
"""

from __future__ import annotations

import os
import platform
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .data import IMAGENET_MEAN, IMAGENET_STD
from .errors import EfficientADError
from .networks import TEACHER_CHANNELS, autoencoder, check_image_size, pdn, pdn_output_side

MODEL_FORMAT = "efficientad-model"
MODEL_FORMAT_VERSION = 1
# Unpadded PDNs lose 4 pixels of border per side at the 1/4 grid; padding restores that grid.
MAP_PADDING = 4


class EfficientADModel(nn.Module):
    """Teacher, student and autoencoder with the normalisation constants learned around them.

    Input: float images in [0, 1], shape (N, 3, H, W) at ``image_size``. ImageNet normalisation
    happens inside, so callers and exported graphs never repeat it.
    """

    def __init__(self, model_size: str = "s", image_size: tuple[int, int] = (256, 256)):
        super().__init__()
        self.model_size = model_size
        self.image_size = check_image_size(image_size)
        self.teacher = pdn(model_size, TEACHER_CHANNELS)
        self.student = pdn(model_size, 2 * TEACHER_CHANNELS)
        self.autoencoder = autoencoder(self.image_size, TEACHER_CHANNELS, self.feature_size)
        self.register_buffer("input_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("teacher_mean", torch.zeros(1, TEACHER_CHANNELS, 1, 1))
        self.register_buffer("teacher_std", torch.ones(1, TEACHER_CHANNELS, 1, 1))
        # q_local_start, q_local_end, q_global_start, q_global_end; NaN until calibrated.
        self.register_buffer("map_quantiles", torch.full((4,), float("nan")))
        self.teacher.requires_grad_(False).eval()

    @property
    def feature_size(self) -> tuple[int, int]:
        height, width = self.image_size
        return pdn_output_side(self.model_size, height), pdn_output_side(self.model_size, width)

    @property
    def is_calibrated(self) -> bool:
        return bool(torch.isfinite(self.map_quantiles).all())

    def train(self, mode: bool = True) -> EfficientADModel:
        super().train(mode)
        self.teacher.eval()  # frozen: never in training mode
        return self

    def normalize_input(self, images: torch.Tensor) -> torch.Tensor:
        return (images - self.input_mean) / self.input_std

    def teacher_features(self, normalized_images: torch.Tensor) -> torch.Tensor:
        return (self.teacher(normalized_images) - self.teacher_mean) / self.teacher_std

    def raw_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Un-normalised (local, global) maps at the feature grid, each (N, 1, h, w)."""
        x = self.normalize_input(images)
        teacher = self.teacher_features(x)
        student = self.student(x)
        reconstruction = self.autoencoder(x)
        local = (teacher - student[:, :TEACHER_CHANNELS]).pow(2).mean(dim=1, keepdim=True)
        global_ = (reconstruction - student[:, TEACHER_CHANNELS:]).pow(2).mean(dim=1, keepdim=True)
        return local, global_

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised (combined, local, global) maps at the feature grid, each (N, 1, h, w)."""
        if not self.is_calibrated:
            raise EfficientADError("the model has no map quantiles yet: train (fit) it before predicting")
        local, global_ = self.raw_maps(images)
        q = self.map_quantiles
        local = 0.1 * (local - q[0]) / (q[1] - q[0])
        global_ = 0.1 * (global_ - q[2]) / (q[3] - q[2])
        return 0.5 * local + 0.5 * global_, local, global_


def to_image_grid(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pad feature-grid maps by 4 pixels per side and resize them bilinearly to ``size``."""
    padded = F.pad(maps, (MAP_PADDING,) * 4)
    return F.interpolate(padded, size=tuple(size), mode="bilinear", align_corners=False)


def versions() -> dict[str, str]:
    import numpy
    import torchvision

    return {
        "efficientad": __version__,
        "torch": str(torch.__version__),  # TorchVersion would not load with weights_only=True
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
    }


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Let ``write`` fill a temporary file beside ``path``, then rename it: no partial file on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates owner-only files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` without ever leaving a partial file at ``path``."""
    return atomic_write(path, lambda temporary: torch.save(obj, temporary))


def save_model(model: EfficientADModel, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write the model file: weights, normalisation constants, config and versions in one dict.

    Only tensors, numbers, strings, lists and dicts go in, so it loads with ``weights_only=True``.
    """
    if not model.is_calibrated:
        raise EfficientADError("refusing to save a model without map quantiles (it was not trained)")
    content = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model_size": model.model_size,
        "image_size": list(model.image_size),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "versions": versions(),
        **metadata,
    }
    return atomic_save(content, path)


def check_format(content: Any, path: str | os.PathLike, expected: str, newest_version: int, not_ours: str) -> None:
    """Refuse content that is not of the ``expected`` format or that a newer efficientad wrote."""
    if not isinstance(content, dict) or content.get("format") != expected:
        raise EfficientADError(f"{path} {not_ours}")
    if content.get("format_version", 0) > newest_version:
        raise EfficientADError(
            f"{path} was written by a newer efficientad (format {content['format_version']}, "
            f"this one reads up to {newest_version}); upgrade efficientad"
        )


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[EfficientADModel, dict[str, Any]]:
    """Read a model file; returns the model (in eval mode) and the file's other fields."""
    path = Path(path)
    if not path.is_file():
        raise EfficientADError(f"model file not found: {path}")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for truncated, corrupt or pickled-code files
        raise EfficientADError(f"cannot read model file {path} (corrupt or not a model file): {str(error).splitlines()[0]}") from None
    check_format(
        content, path, MODEL_FORMAT, MODEL_FORMAT_VERSION,
        "is not an efficientad model file (a teacher or another checkpoint?)",
    )
    try:
        model = EfficientADModel(content["model_size"], tuple(content["image_size"]))
        model.load_state_dict(content["state_dict"])
    except (KeyError, RuntimeError, ValueError) as error:
        detail = " ".join(str(error).split())[:300]
        raise EfficientADError(f"model file {path} is incomplete or inconsistent: {detail}") from None
    metadata = {key: value for key, value in content.items() if key != "state_dict"}
    return model.eval(), metadata
