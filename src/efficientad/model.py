"""EfficientAD as one torch module, THE map formula, and the model file that stores it.

:class:`EfficientADModel` holds the frozen teacher, the student, the autoencoder and everything
learned besides weights (the teacher's per-channel mean/std and the four map quantiles) as buffers,
so ``state_dict()`` is the whole learned state.

Anomaly maps, as in the paper (section 3.4 and the reference reproduction), each step written once
here and used by calibration, prediction and the fused deployment module alike:

- raw maps (:meth:`EfficientADModel.raw_maps`): local = channel mean of
  ``(teacher_norm - student[:, :384])**2``, global = channel mean of ``(autoencoder - student[:, 384:])**2``
- :func:`normalize_maps`: each mapped linearly so that its validation quantile q0.9 -> 0 and
  q0.995 -> 0.1 (:class:`MapQuantiles`), and combined = their mean
- :func:`pad_maps`: padded by 4 pixels per side (the unpadded PDNs' lost border), and
  :func:`resize_maps` bilinearly to a size; :func:`to_image_grid` does both
- :func:`image_scores`: the image score is the combined map's maximum at the model's image size.
  Maps shown at an image's own size (the padded maps resized straight to it, as the reference
  does) are for display and pixel metrics; the score, and so the threshold calibrated on it, never
  depends on the size of the uploaded image.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .data.images import IMAGENET_MEAN, IMAGENET_STD
from .errors import EfficientADError, first_line
from .files import atomic_save, versions
from .networks import TEACHER_CHANNELS, autoencoder, check_image_size, pdn, pdn_output_side

MODEL_FORMAT = "efficientad-model"
MODEL_FORMAT_VERSION = 1
# Unpadded PDNs lose 4 pixels of border per side at the 1/4 grid; padding restores that grid.
MAP_PADDING = 4
# The normalised value of a map's upper quantile: 0 is typical of normal images, 0.1 their rare extreme.
NORMALIZED_HIGH = 0.1


class MapQuantiles(NamedTuple):
    """The validation quantiles that normalise the two maps (q0.9 -> 0, q0.995 -> 0.1)."""

    local_start: float
    local_end: float
    global_start: float
    global_end: float


def map_scale(quantiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-map ``gain`` and ``offset``, each (1, 2, 1, 1), with ``gain * raw + offset`` the normalised map.

    ``0.1 * (raw - start) / (end - start)`` written as one multiply-add, computed in float64 so that
    folding it into a deployed graph loses nothing.
    """
    q = MapQuantiles(*quantiles.double().unbind())
    gain = torch.stack([NORMALIZED_HIGH / (q.local_end - q.local_start), NORMALIZED_HIGH / (q.global_end - q.global_start)])
    offset = -torch.stack([q.local_start, q.global_start]) * gain
    if not torch.isfinite(gain).all() or (gain <= 0).any():
        raise EfficientADError("the model's map quantiles are degenerate (q0.995 <= q0.9)")
    return gain.float().view(1, 2, 1, 1), offset.float().view(1, 2, 1, 1)


def normalize_maps(raw: torch.Tensor, gain: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Raw (local, global) maps (N, 2, h, w) to normalised (combined, local, global) maps (N, 3, h, w)."""
    maps = raw.float() * gain + offset
    return torch.cat([maps.mean(dim=1, keepdim=True), maps], dim=1)


def pad_maps(maps: torch.Tensor) -> torch.Tensor:
    """Feature-grid maps padded by 4 pixels per side: (h, w) -> (h + 8, w + 8), 64x64 at 256x256."""
    return F.pad(maps, (MAP_PADDING,) * 4)


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) maps to ``size``, as the reference reproduction resizes them."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)


def to_image_grid(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pad feature-grid maps by 4 pixels per side and resize them bilinearly to ``size``."""
    return resize_maps(pad_maps(maps), size)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Scores (N,): the maximum of the combined map (channel 0) at the model's image size."""
    return maps[:, 0].amax(dim=(1, 2))


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) for tensors of any size.

    ``torch.quantile`` refuses inputs above 2**24 elements; a top-k over the upper tail finds the
    same two order statistics without sorting everything.
    """
    flat = values.reshape(-1)
    position = q * (flat.numel() - 1)
    below = int(math.floor(position))
    # Descending, so the last two entries are the order statistics at ``below`` and ``below + 1``.
    tail = torch.topk(flat, k=flat.numel() - below, largest=True, sorted=True).values
    low = tail[-1]
    high = tail[-2] if len(tail) > 1 else low
    return low + (high - low) * (position - below)


def measure_map_quantiles(raw: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """The four map quantiles (:class:`MapQuantiles` order) of raw (N, 2, h, w) maps of held-out normal images.

    Refuses maps that are not finite (training diverged) or have no spread (constant training images),
    either of which would turn every later score into inf or NaN.
    """
    if not torch.isfinite(raw).all():
        raise EfficientADError(
            "calibration failed: the held-out images' anomaly maps are not finite (training diverged); "
            "train again with precision='fp32' or a lower learning_rate"
        )
    q = [quantile(raw[:, 0], low), quantile(raw[:, 0], high), quantile(raw[:, 1], low), quantile(raw[:, 1], high)]
    for branch, start, end in (("local", q[0], q[1]), ("global", q[2], q[3])):
        # float32 maps: a spread below their resolution would turn every later score into inf or NaN.
        if not end - start > 1e-6 * max(float(abs(end)), 1e-30):
            raise EfficientADError(
                f"calibration failed: the held-out images' {branch} map has no spread (its {high} quantile equals its "
                f"{low} quantile), so no threshold can be measured; the training images are constant or nearly so: "
                "train on varied photos of good parts"
            )
    return torch.stack(q).float()


def decision_threshold(validation_scores: torch.Tensor, false_positive_rate: float) -> float:
    """The score that ``false_positive_rate`` of the held-out normal images exceed."""
    return float(torch.quantile(validation_scores.double(), 1.0 - false_positive_rate))


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
    def padded_map_size(self) -> tuple[int, int]:
        """The side lengths of the padded maps: the feature grid plus 4 pixels per side."""
        height, width = self.feature_size
        return height + 2 * MAP_PADDING, width + 2 * MAP_PADDING

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

    def raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised (local, global) maps at the feature grid, (N, 2, h, w)."""
        x = self.normalize_input(images)
        teacher = self.teacher_features(x)
        student = self.student(x)
        reconstruction = self.autoencoder(x)
        local = (teacher - student[:, :TEACHER_CHANNELS]).pow(2).mean(dim=1, keepdim=True)
        global_ = (reconstruction - student[:, TEACHER_CHANNELS:]).pow(2).mean(dim=1, keepdim=True)
        return torch.cat([local, global_], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised (combined, local, global) maps at the model's image size, (N, 3, H, W).

        The plain, unfused transcription of the method; deployment runs
        :class:`~efficientad.deploy.fused.FusedModel`, which computes the same.
        """
        if not self.is_calibrated:
            raise EfficientADError("the model has no map quantiles yet: train (fit) it before predicting")
        gain, offset = map_scale(self.map_quantiles)
        return to_image_grid(normalize_maps(self.raw_maps(images), gain, offset), self.image_size)


def tensors_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes: what a flipped byte in a model file changes."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_model(model: EfficientADModel, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write the model file: weights, normalisation constants, config and versions in one dict.

    Only tensors, numbers, strings, lists and dicts go in, so it loads with ``weights_only=True``.
    What the file describes of itself (format, sizes, weights, their checksum, versions) is computed
    here and wins over ``metadata``, which may be a loaded file's own.
    """
    if not model.is_calibrated:
        raise EfficientADError("refusing to save a model without map quantiles (it was not trained)")
    state_dict = {key: value.detach().cpu() for key, value in model.state_dict().items()}
    content = {
        **metadata,
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        "model_size": model.model_size,
        "image_size": list(model.image_size),
        "state_dict": state_dict,
        "tensor_sha256": tensors_sha256(state_dict),
        "versions": versions(),
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
        raise EfficientADError(f"cannot read model file {path} (corrupt or not a model file): {first_line(error)}") from None
    check_format(
        content, path, MODEL_FORMAT, MODEL_FORMAT_VERSION,
        "is not an efficientad model file (a teacher or another checkpoint?)",
    )
    stored_digest = content.get("tensor_sha256")  # absent from files written before it existed
    if stored_digest is not None and (not isinstance(content.get("state_dict"), dict) or tensors_sha256(content["state_dict"]) != stored_digest):
        raise EfficientADError(f"model file {path} is corrupt: its weights do not match the SHA-256 stored with them")
    try:
        model = EfficientADModel(content["model_size"], tuple(content["image_size"]))
        model.load_state_dict(content["state_dict"])
    except (KeyError, RuntimeError, ValueError) as error:
        detail = " ".join(str(error).split())[:300]
        raise EfficientADError(f"model file {path} is incomplete or inconsistent: {detail}") from None
    threshold = content.get("threshold")
    if not model.is_calibrated or (threshold is not None and not math.isfinite(threshold)):
        raise EfficientADError(f"model file {path} holds non-finite map quantiles or threshold: retrain the model")
    metadata = {key: value for key, value in content.items() if key != "state_dict"}
    return model.eval(), metadata
