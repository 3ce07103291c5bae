"""The learning curve: losses on held-out normal images during training, and its plot.

No defect images are needed: the held-out normal images that calibration uses give, every
``validate_every`` steps, the losses that training minimises (the hard student-teacher loss, the
autoencoder's and the student's imitation of it) and the spread q0.995 - q0.9 of the two raw maps,
which calibration turns into the 0 -> 0.1 scale. When they stop falling, more steps buy little.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..config import PREDICT_BATCH_SIZE, STOP_REASONS, TrainConfig
from ..data.images import to_float
from ..device import autocast
from ..files import atomic_write
from ..model import EfficientADModel, quantile
from ..networks import TEACHER_CHANNELS
from .losses import hard_feature_loss

VALIDATION_LOSSES = ("hard", "ae", "stae")


class ValidationSet:
    """Held-out normal uint8 images (N, 3, H, W) on the model's device, with their teacher features
    when ``cache`` (the teacher is frozen and its normalisation fixed before training, so they never change)."""

    def __init__(self, model: EfficientADModel, images: torch.Tensor, config: TrainConfig, cache: bool):
        device = model.teacher_mean.device
        self.images = images.to(device)
        self.config = config
        self.batches = [slice(start, start + PREDICT_BATCH_SIZE) for start in range(0, len(images), PREDICT_BATCH_SIZE)]
        self.teacher = None
        if cache:
            with torch.no_grad():
                self.teacher = torch.cat([self._teacher(model, part) for part in self.batches])

    def _teacher(self, model: EfficientADModel, part: slice) -> torch.Tensor:
        with autocast(self.images.device, self.config.precision):
            return model.teacher_features(model.normalize_input(to_float(self.images[part]))).float()

    @torch.no_grad()
    def losses(self, model: EfficientADModel) -> dict[str, float]:
        """Mean losses per image (no penalty, no augmentation), their total, and the maps' quantile spreads.

        In eval mode (no dropout) and the training precision; the model's mode is restored after.
        """
        was_training = model.training
        model.eval()
        sums = dict.fromkeys(VALIDATION_LOSSES, 0.0)
        maps = []
        for part in self.batches:
            teacher = self._teacher(model, part) if self.teacher is None else self.teacher[part]
            with autocast(self.images.device, self.config.precision):
                x = model.normalize_input(to_float(self.images[part]))
                student = model.student(x).float()
                reconstruction = model.autoencoder(x).float()
            distance = (teacher - student[:, :TEACHER_CHANNELS]).pow(2)
            imitation = (reconstruction - student[:, TEACHER_CHANNELS:]).pow(2)
            sums["hard"] += sum(float(hard_feature_loss(one, self.config.hard_loss_quantile)) for one in distance)
            sums["ae"] += float((teacher - reconstruction).pow(2).mean(dim=(1, 2, 3)).sum())
            sums["stae"] += float(imitation.mean(dim=(1, 2, 3)).sum())
            # The raw (local, global) maps of EfficientADModel.raw_maps, from the features already at hand.
            maps.append(torch.stack([distance.mean(dim=1), imitation.mean(dim=1)], dim=1).cpu())
        model.train(was_training)
        result = {name: value / len(self.images) for name, value in sums.items()}
        result["total"] = sum(result[name] for name in VALIDATION_LOSSES)
        raw = torch.cat(maps)
        low, high = self.config.map_quantile_low, self.config.map_quantile_high
        for index, branch in enumerate(("local", "global")):
            result[f"{branch}_spread"] = float(quantile(raw[:, index], high) - quantile(raw[:, index], low))
        return result


def plot_training_curve(training: dict, path: str | os.PathLike) -> Path:
    """Draw ``training["curve"]`` (losses and map spreads against steps) as a PNG at ``path``, atomically."""
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no display (Agg renders it)

    curve = training["curve"]
    steps = [point["step"] for point in curve]
    figure = Figure(figsize=(10, 4))
    losses, spreads = figure.subplots(1, 2)
    losses.plot(steps, [point["train"]["total"] for point in curve], color="#999999", label="training total (mean since last point)")
    losses.plot(steps, [point["validation"]["total"] for point in curve], color="black", marker=".", label="validation total")
    for name, colour in zip(VALIDATION_LOSSES, ("#3b6ea5", "#c44e52", "#55a868")):
        losses.plot(steps, [point["validation"][name] for point in curve], color=colour, linestyle="--", label=f"validation {name}")
    losses.set_yscale("log")
    losses.set_ylabel("loss")
    for branch, colour in (("local", "#3b6ea5"), ("global", "#c44e52")):
        spreads.plot(steps, [point["validation"][f"{branch}_spread"] for point in curve], color=colour, marker=".", label=branch)
    spreads.set_yscale("log")  # the two maps' scales differ by orders of magnitude
    spreads.set_ylabel("raw map spread, q0.995 - q0.9")
    for axes, title in ((losses, "Losses on held-out normal images"), (spreads, "Map quantile spread (held-out images)")):
        axes.set_title(title, fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if training.get("lr_drop_step", steps[-1] + 1) <= steps[-1]:
            axes.axvline(training["lr_drop_step"], color="#999999", linestyle=":", label="learning rate x0.1")
        axes.legend(fontsize=7)
    figure.suptitle(f"{training['steps_done']:,} steps: {STOP_REASONS[training['stopped_by']]}", fontsize=10)
    figure.tight_layout()
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))
