"""The public estimator: ``EfficientAD(...).fit(good_images)``, ``.predict(images)``, ``.save``/``.load``.

Configuration goes into the constructor and is validated there; learned state (networks,
normalisation constants, threshold) exists only after :meth:`EfficientAD.fit` or :meth:`EfficientAD.load`.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import ImageInput, list_images, load_images, read_image, resize_to_tensor, split_validation, to_float
from .errors import EfficientADError
from .inferencer import Prediction
from .model import EfficientADModel, load_model, save_model, to_image_grid
from .networks import PDN_SPECS, check_image_size
from .teacher import resolve_teacher
from .train import TrainConfig, autocast, calibrate, train_networks


def _image_size(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    if len(value) != 2:
        raise EfficientADError(f"image_size must be N or (height, width), got {value!r}")
    return check_image_size(tuple(value))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A checked torch device; ``None`` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise EfficientADError(f"device must be cpu or cuda[:N], got {device!r}") from None
    if parsed.type not in ("cpu", "cuda"):
        raise EfficientADError(f"device must be cpu or cuda[:N], got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise EfficientADError("device 'cuda' requested but no CUDA GPU is available; use --device cpu")
    return parsed


def load_penalty_images(folder: str | os.PathLike, image_size: tuple[int, int], progress: bool = True) -> torch.Tensor:
    """Penalty images as the paper prepares them: resized to twice the image size, centre-cropped.

    The random grayscale (p=0.3) is drawn per training step.
    """
    height, width = image_size
    big = load_images(list_images(folder, recursive=True), (2 * height, 2 * width), progress, "Loading penalty images")
    top, left = height // 2, width // 2
    return big[:, :, top : top + height, left : left + width].contiguous()


class EfficientAD:
    """EfficientAD anomaly detector (Batzner, Heckler, König, WACV 2024).

    Parameters are the paper's defaults; see ``TrainConfig`` for the training ones.
    ``teacher`` is ``"small"``/``"medium"`` (official weights, downloaded once), ``None`` (the
    official one for ``model_size``), ``"random"`` (testing only: warns) or a path to a teacher file.
    ``penalty_images`` is a folder of ImageNet-like images; ``None`` turns the penalty off.
    """

    def __init__(
        self,
        model_size: str = "s",
        image_size: int | Sequence[int] = 256,
        teacher: str | os.PathLike | None = None,
        steps: int = 70_000,
        batch_size: int = 1,
        learning_rate: float = 1e-4,
        weight_decay: float = 1e-5,
        penalty_images: str | os.PathLike | None = None,
        validation_fraction: float = 0.1,
        false_positive_rate: float = 0.01,
        precision: str = "fp32",
        channels_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        progress: bool = True,
    ):
        if model_size not in PDN_SPECS:
            raise EfficientADError(f"model_size must be one of {sorted(PDN_SPECS)}, got {model_size!r}")
        if not 0.0 < validation_fraction < 1.0:
            raise EfficientADError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
        if penalty_images is not None and not Path(penalty_images).is_dir():
            raise EfficientADError(f"penalty image folder not found: {penalty_images}")
        self.model_size = model_size
        self.image_size = _image_size(image_size)
        self.teacher = teacher
        self.penalty_images = penalty_images
        self.validation_fraction = validation_fraction
        self.device = resolve_device(device)
        self.progress = progress
        self.config = TrainConfig(
            steps=steps,
            batch_size=batch_size,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            false_positive_rate=false_positive_rate,
            precision=precision,
            channels_last=channels_last,
            seed=seed,
        )
        if precision == "fp16" and self.device.type != "cuda":
            raise EfficientADError("precision fp16 needs --device cuda; on the CPU use bf16 or fp32")
        self.model_: EfficientADModel | None = None
        self.threshold_: float | None = None
        self.metadata_: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------- training
    def fit(
        self,
        images: Sequence[ImageInput] | str | os.PathLike,
        validation_images: Sequence[ImageInput] | str | os.PathLike | None = None,
    ) -> EfficientAD:
        """Train on normal images (paths, arrays or a folder).

        Without ``validation_images``, a seeded ``validation_fraction`` of ``images`` is held out to
        measure the map quantiles and the threshold; the networks never see them.
        """
        started = time.perf_counter()
        images = self._as_list(images)
        if validation_images is None:
            train_items, validation_items = split_validation(images, self.validation_fraction, self.config.seed)
        else:
            train_items, validation_items = images, self._as_list(validation_images)
        train_tensor = load_images(train_items, self.image_size, self.progress, "Loading training images")
        validation_tensor = load_images(validation_items, self.image_size, self.progress, "Loading validation images")
        penalty = None
        if self.penalty_images is not None:
            penalty = load_penalty_images(self.penalty_images, self.image_size, self.progress)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            teacher, teacher_source = resolve_teacher(self.teacher, self.model_size, self.progress)
        for warning in caught:
            warnings.warn(str(warning.message), stacklevel=2)
        torch.manual_seed(self.config.seed)
        model = EfficientADModel(self.model_size, self.image_size)
        model.teacher.load_state_dict(teacher.state_dict())
        model.to(self.device)

        history = train_networks(model, train_tensor, self.config, penalty, self.progress)
        calibration = calibrate(model, validation_tensor, self.config)
        self.model_ = model
        self.threshold_ = calibration["threshold"]
        self.metadata_ = {
            "config": self.get_config(),
            "teacher_source": teacher_source,
            "threshold": self.threshold_,
            "n_train_images": len(train_items),
            "n_validation_images": len(validation_items),
            "training": {**history, "total_seconds": time.perf_counter() - started},
            "calibration": {k: v for k, v in calibration.items() if k != "validation_scores"},
            "validation_scores": calibration["validation_scores"],
        }
        return self

    def get_config(self) -> dict[str, Any]:
        return {
            "model_size": self.model_size,
            "image_size": list(self.image_size),
            "teacher": None if self.teacher is None else str(self.teacher),
            "penalty_images": None if self.penalty_images is None else str(self.penalty_images),
            "validation_fraction": self.validation_fraction,
            "device": str(self.device),
            **self.config.as_dict(),
        }

    @staticmethod
    def _as_list(images: Sequence[ImageInput] | str | os.PathLike) -> list[ImageInput]:
        if isinstance(images, (str, os.PathLike)):
            return list(list_images(images))
        images = list(images)
        if not images:
            raise EfficientADError("no images given")
        return images

    # ---------------------------------------------------------------------------------- inference
    @property
    def model(self) -> EfficientADModel:
        if self.model_ is None:
            raise EfficientADError("this EfficientAD is not trained yet: call fit() or EfficientAD.load()")
        return self.model_

    @property
    def threshold(self) -> float | None:
        return self.threshold_

    @threshold.setter
    def threshold(self, value: float | None) -> None:
        self.threshold_ = None if value is None else float(value)

    @torch.no_grad()
    def predict(self, images: Sequence[ImageInput] | ImageInput, batch_size: int = 8) -> list[Prediction]:
        """Score images (paths, PIL images or arrays); maps come back at each image's own size."""
        if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        model = self.model
        predictions: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            pictures = [read_image(source) for source in images[start : start + batch_size]]
            batch = torch.stack([resize_to_tensor(picture, model.image_size) for picture in pictures])
            with autocast(self.device, self.config.precision if self.device.type == "cuda" else "fp32"):
                combined, local, global_ = model(to_float(batch.to(self.device)))
            for i, picture in enumerate(pictures):
                size = (picture.height, picture.width)
                maps = [to_image_grid(m[i : i + 1].float(), size)[0, 0].cpu().numpy() for m in (combined, local, global_)]
                score = float(maps[0].max())
                predictions.append(
                    Prediction(
                        score=score,
                        anomaly_map=maps[0],
                        local_map=maps[1],
                        global_map=maps[2],
                        local_score=float(maps[1].max()),
                        global_score=float(maps[2].max()),
                        is_anomalous=None if self.threshold_ is None else score > self.threshold_,
                    )
                )
        return predictions

    # --------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write one model file (weights, normalisation, threshold, config, versions)."""
        return save_model(self.model, path, {**self.metadata_, "threshold": self.threshold_})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> EfficientAD:
        """Read a model file written by :meth:`save` (safe: ``weights_only=True``)."""
        device = resolve_device(device)
        model, metadata = load_model(path, map_location=device)
        config = dict(metadata.get("config") or {})
        detector = cls(
            model_size=model.model_size,
            image_size=model.image_size,
            teacher=config.get("teacher"),
            device=device,
            progress=False,
            **{k: config[k] for k in ("steps", "batch_size", "seed") if k in config},
        )
        detector.model_ = model.to(device)
        detector.threshold_ = metadata.get("threshold")
        detector.metadata_ = metadata
        return detector
