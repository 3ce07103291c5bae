"""The public estimator: ``EfficientAD(...).fit(good_images)``, ``.predict(images)``, ``.save``/``.load``.

Configuration (:class:`~efficientad.config.TrainConfig`) goes into the constructor and is validated
there; learned state (networks, normalisation constants, threshold) exists only after
:meth:`EfficientAD.fit` or :meth:`EfficientAD.load`. Prediction is the deployed path,
:class:`~efficientad.deploy.inferencer.Inferencer`, over the model in memory.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .config import PREDICT_BATCH_SIZE, TrainConfig, make_config
from .data.images import ImageInput, list_images, read_images, split_validation, unreadable
from .deploy.inferencer import Inferencer, Prediction
from .device import check_precision, resolve_device
from .errors import EfficientADError
from .files import write_run_record
from .model import EfficientADModel, load_model, save_model, tensors_sha256
from .training.calibrate import calibrate
from .training.checkpoint import Checkpointing, check_resumable, check_same_config, fingerprint, read_checkpoint
from .training.curves import plot_training_curve
from .training.penalty import PenaltyImages, PenaltySource
from .training.teacher import Teacher, resolve_teacher
from .training.train import train_networks

# The training metadata that a run's train.json repeats from the model file, for people and scripts.
RUN_RECORD_KEYS = (
    "config", "inference_precision", "teacher_source", "threshold", "n_train_images", "n_validation_images",
    "skipped_images", "training", "calibration",
)


class EfficientAD:
    """EfficientAD anomaly detector (Batzner, Heckler, König, WACV 2024).

    ``EfficientAD(model_size="m", steps=10_000, ...)``: any :class:`~efficientad.config.TrainConfig`
    field by name (the defaults are the paper's), or a whole ``config``. ``device`` is where it
    trains and predicts (``None``: CUDA when available); ``progress`` shows progress bars.
    """

    def __init__(
        self,
        config: TrainConfig | None = None,
        *,
        device: str | torch.device | None = "cpu",
        progress: bool = True,
        **settings: Any,
    ):
        self.config = make_config(TrainConfig, config, settings)
        self.device = resolve_device(device)
        self.progress = progress
        self.model_: EfficientADModel | None = None
        self.threshold_: float | None = None
        self.metadata_: dict[str, Any] = {}
        self._inferencer: Inferencer | None = None

    # ----------------------------------------------------------------------------------- training
    def fit(
        self,
        images: Sequence[ImageInput] | str | os.PathLike,
        validation_images: Sequence[ImageInput] | str | os.PathLike | None = None,
        *,
        teacher: Teacher | None = None,
        penalty: PenaltySource | None = None,
        checkpoint: str | os.PathLike | None = None,
        resume: bool = False,
        checkpoint_notes: dict[str, Any] | None = None,
    ) -> EfficientAD:
        """Train on normal images (paths, arrays or a folder).

        Without ``validation_images``, a seeded ``validation_fraction`` of ``images`` is held out to
        measure the map quantiles and the threshold; the networks never see them. Their losses during
        training are the learning curve, ``metadata_["training"]["curve"]``.

        ``checkpoint``: a file where the run saves itself every ``checkpoint_every`` seconds
        (atomically; with ``checkpoint_notes``, facts for whoever resumes it). ``resume=True``
        continues the run saved there, bit for bit on the same machine, with this detector's
        configuration, which must be the checkpoint's (:meth:`from_checkpoint`), and the same images
        and teacher, or it is refused. The file is left in place: remove it once the model is saved.

        ``teacher`` and ``penalty`` let many trainings share one load of what the config names:
        the :class:`~efficientad.training.teacher.Teacher` that ``resolve_teacher(config.teacher,
        config.model_size)`` returns, and the images of ``config.penalty_images`` prepared at
        ``config.image_size`` (:class:`~efficientad.training.penalty.PenaltyImages` or a uint8
        (N, 3, H, W) tensor). Given, they are used as they are: the teacher file and the penalty
        folder are not read, and need not exist on this machine.
        """
        started = time.perf_counter()
        config = self.config
        # Cheap checks first: a bad setting should fail before minutes of image loading.
        check_precision(config.precision, self.device)
        saved = None
        if resume:
            if checkpoint is None:
                raise EfficientADError("resume=True needs the checkpoint file to resume from")
            saved = read_checkpoint(checkpoint)
            check_same_config(saved, config.as_dict(), checkpoint)
        if penalty is not None:
            _check_penalty(penalty, config)
        elif config.penalty_images is not None and not Path(config.penalty_images).is_dir():
            raise EfficientADError(f"penalty_images folder not found: {config.penalty_images}")
        if teacher is None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                teacher = resolve_teacher(config.teacher, config.model_size, self.progress)
            for warning in caught:
                warnings.warn(str(warning.message), stacklevel=2)
        # Every image is read before any failure is raised, so that all unreadable ones are named at once.
        train, skipped = read_images(self._as_list(images), config.image_size, self.progress, "Loading training images")
        validation = None
        if validation_images is not None:
            validation, failed = read_images(self._as_list(validation_images), config.image_size, self.progress, "Loading validation images")
            skipped += failed
        if skipped:
            message = unreadable(skipped, len(train) + len(validation or ()) + len(skipped))
            if not config.skip_bad_images:
                raise EfficientADError(f"{message}; skip_bad_images=True (--skip-bad-images) trains without them")
            warnings.warn(f"{message}; training without them", stacklevel=2)
        if validation is None:
            train, validation = split_validation(train, config.validation_fraction, config.seed)
        for what, tensors in (("training", train), ("validation", validation)):
            if not tensors:
                raise EfficientADError(f"no readable {what} images")
        train_tensor, validation_tensor = torch.stack(train), torch.stack(validation)
        if penalty is None and config.penalty_images is not None:
            penalty = PenaltyImages(config.penalty_images, config.image_size, self.progress)

        torch.manual_seed(config.seed)
        model = EfficientADModel(config.model_size, config.image_size)
        try:
            model.teacher.load_state_dict(teacher.network.state_dict())
        except RuntimeError:
            raise EfficientADError(f"the given teacher ({teacher.source}) is not a PDN-{config.model_size} teacher") from None
        model.to(self.device)

        checkpointing = None
        if checkpoint is not None:
            identity = {
                "config": config.as_dict(),
                "data": {"training": fingerprint(train_tensor), "validation": fingerprint(validation_tensor)},
                "teacher_sha256": tensors_sha256(teacher.network.state_dict()),
                "notes": checkpoint_notes or {},
            }
            if saved is not None:
                check_resumable(saved, identity, checkpoint)
            checkpointing = Checkpointing(Path(checkpoint), config.checkpoint_every, identity, saved)
        history = train_networks(
            model, train_tensor, config, penalty, self.progress,
            validation_images=validation_tensor, checkpoint=checkpointing, started=started,
        )
        calibration = calibrate(model, validation_tensor, config)
        self.model_ = model
        self.threshold_ = calibration["threshold"]
        self._inferencer = None
        self.metadata_ = {
            "config": config.as_dict(),
            "inference_precision": config.precision,
            "teacher_source": teacher.source,
            "threshold": self.threshold_,
            "n_train_images": len(train),
            "n_validation_images": len(validation),
            "skipped_images": skipped,
            "n_penalty_images": 0 if penalty is None else len(penalty),
            "training": {**history, "total_seconds": history["seconds_before_resume"] + time.perf_counter() - started},
            "calibration": {k: v for k, v in calibration.items() if k != "validation_scores"},
            "validation_scores": calibration["validation_scores"],
        }
        return self

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str | torch.device | None = "cpu", progress: bool = True) -> EfficientAD:
        """An untrained detector with the configuration of a training checkpoint:
        ``.fit(images, checkpoint=path, resume=True)`` continues that run."""
        stored = read_checkpoint(path)["config"]
        return cls(make_config(TrainConfig, None, stored), device=device, progress=progress)

    def to(self, device: str | torch.device | None) -> EfficientAD:
        """Move the model (trained or loaded) to ``device``, where it then predicts; returns self."""
        self.device = resolve_device(device)
        if self.model_ is not None:
            self.model_.to(self.device)
        self._inferencer = None  # built for the old device
        return self

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
        if self._inferencer is not None:
            self._inferencer.threshold = self.threshold_

    @property
    def inferencer(self) -> Inferencer:
        """The deployed prediction path over this model, in the precision it was calibrated in."""
        if self._inferencer is None:
            self._inferencer = Inferencer.from_model(self.model, {**self.metadata_, "threshold": self.threshold_}, device=self.device)
        return self._inferencer

    def predict(self, images: Sequence[ImageInput] | ImageInput, batch_size: int = PREDICT_BATCH_SIZE) -> list[Prediction]:
        """Score images (paths, PIL images or arrays); see :class:`~efficientad.deploy.inferencer.Prediction`."""
        return self.inferencer.predict(images, batch_size)

    # --------------------------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write one model file (weights, normalisation, threshold, config, versions)."""
        return save_model(self.model, path, {**self.metadata_, "threshold": self.threshold_})

    def save_run(self, folder: str | os.PathLike, record: dict[str, Any]) -> Path:
        """Write ``folder/model.pt``, its learning curve ``folder/training_curve.png`` (when training
        recorded one) and its run record ``folder/train.json`` (``record``, the training metadata and
        the model's ``model_tensor_sha256``); returns the model file's path.

        The old train.json and curve are removed before the model file is replaced and the new ones
        written after it, so that however a run is stopped, a train.json on disk describes the
        model.pt beside it (the checksum proves it).
        """
        folder = Path(folder)
        record_path, curve_path = folder / "train.json", folder / "training_curve.png"
        record_path.unlink(missing_ok=True)
        curve_path.unlink(missing_ok=True)
        model_path = self.save(folder / "model.pt")
        training = self.metadata_.get("training") or {}
        if training.get("curve"):
            plot_training_curve(training, curve_path)
        kept = {key: self.metadata_.get(key) for key in RUN_RECORD_KEYS}
        checksum = tensors_sha256(self.model.state_dict())
        write_run_record(record_path, {**record, **kept, "model_file": str(model_path), "model_tensor_sha256": checksum})
        return model_path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = "cpu", progress: bool = False) -> EfficientAD:
        """Read a model file written by :meth:`save` (safe: ``weights_only=True``), with its whole configuration."""
        model, metadata = load_model(path)
        stored = dict(metadata.get("config") or {})
        # Files from before a setting existed keep that setting's default; settings since removed are dropped.
        config = make_config(TrainConfig, None, {key: stored[key] for key in TrainConfig.__dataclass_fields__ if key in stored})
        detector = cls(config, device=device, progress=progress)
        detector.model_ = model.to(detector.device)
        detector.threshold_ = metadata.get("threshold")
        detector.metadata_ = metadata
        return detector


def _check_penalty(penalty: PenaltySource, config: TrainConfig) -> None:
    """Refuse given penalty images that the config would not record, or prepared at another size."""
    if config.penalty_images is None:
        raise EfficientADError("penalty images were given but penalty_images is None: name their folder in the config")
    if len(penalty) == 0:
        raise EfficientADError(f"no penalty images given for {config.penalty_images}")
    size = tuple(penalty[0].shape[-2:])
    if size != config.image_size:
        raise EfficientADError(f"the given penalty images are {size[0]}x{size[1]}, image_size is {config.image_size[0]}x{config.image_size[1]}")
