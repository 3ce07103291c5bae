"""Resumable training: a run's whole state in one file, written atomically every few minutes.

A checkpoint holds everything the next step depends on: the weights (with the teacher's
normalisation), Adam's moments, the GradScaler, the plan (steps, learning-rate drop), the global
torch RNG (the autoencoder's dropout), the generator that draws the data order, augmentations and
penalty images, the data order and the position in it; and the learning curve so far. A run resumed
from it takes exactly the steps the uninterrupted run would have taken, bit for bit, on the same
machine with the same thread count (the teacher's features of the training images are recomputed,
not stored). It also records what the run must be resumed with: the configuration, a checksum of
the training and validation images and of the teacher, which :func:`check_resumable` compares.
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import TrainConfig
from ..errors import EfficientADError, first_line
from ..files import atomic_save

# Where `efficientad train` keeps the checkpoint of a run, in its output folder.
CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "efficientad-train-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1


def fingerprint(images: torch.Tensor) -> dict[str, Any]:
    """The number of uint8 images (N, 3, H, W) and a SHA-256 of their pixels: which data a run trained on."""
    return {"images": len(images), "sha256": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()}


@dataclass
class Checkpointing:
    """Where and how often a training run saves itself, what identifies the run, and the checkpoint it resumes."""

    path: Path
    every: float  # seconds; 0: never
    identity: dict[str, Any]  # config, data and teacher checksums, the caller's notes
    resume: dict[str, Any] | None = None

    def write(self, state: dict[str, Any]) -> None:
        atomic_save({"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION, **self.identity, **state}, self.path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint written by training (safe: ``weights_only=True``); refuses other files by name."""
    path = Path(path)
    if not path.is_file():
        raise EfficientADError(f"no checkpoint to resume from: {path} (a run removes it when it finishes)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch.load raises many types for foreign or damaged files
        raise EfficientADError(f"could not read checkpoint {path}: {first_line(error)}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise EfficientADError(f"not a training checkpoint: {path}")
    if checkpoint.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise EfficientADError(
            f"checkpoint {path} has format version {checkpoint.get('format_version')}, this efficientad reads {CHECKPOINT_FORMAT_VERSION}"
        )
    return checkpoint


def check_same_config(checkpoint: dict[str, Any], config: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse to resume with settings other than the checkpoint's, naming each one that differs.

    A setting newer than the checkpoint (absent from it) counts as its default, which the run had.
    """
    saved = {**{field.name: field.default for field in fields(TrainConfig)}, **checkpoint["config"]}
    differing = [f"{name}={saved.get(name)!r} (this run: {value!r})" for name, value in config.items() if saved.get(name) != value]
    if differing:
        raise EfficientADError(f"checkpoint {path} was written with {', '.join(differing)}: resume with its settings")


def check_resumable(checkpoint: dict[str, Any], identity: dict[str, Any], path: str | os.PathLike) -> None:
    """Refuse to resume on other images or another teacher than the checkpoint's."""
    for what in ("training", "validation"):
        saved, given = checkpoint["data"][what], identity["data"][what]
        if saved != given:
            same_number = saved["images"] == given["images"]
            detail = "the same number, other pixels" if same_number else f"{saved['images']} images, now {given['images']}"
            raise EfficientADError(f"checkpoint {path} was trained on other {what} images ({detail}): resume with the same data")
    if checkpoint["teacher_sha256"] != identity["teacher_sha256"]:
        raise EfficientADError(f"checkpoint {path} was trained with another teacher: resume with the same teacher")


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random number generator a step may draw from, as tensors and plain values."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "generator": generator.get_state(),
        # numpy's and Python's are not drawn from today; kept so that an augmentation that does stays resumable.
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss],
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    generator.set_state(state["generator"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
