"""The settings of training and of teacher pretraining, with their defaults, in one place each.

Free of torch: the CLI shows these defaults in ``--help`` and passes on only what the user set, so
no default is written twice. The defaults are the paper's unless a comment says otherwise.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, TypeVar

from .choices import BACKBONES, MODEL_SIZES, PRECISIONS, PRETRAIN_PRECISIONS, SCHEDULES, check_choice
from .errors import EfficientADError, check_count

Config = TypeVar("Config", "TrainConfig", "PretrainConfig")


def parse_image_size(value: int | Sequence[int]) -> tuple[int, int]:
    """``N`` or ``(height, width)`` as a tuple of two positive ints; anything else is refused."""
    if isinstance(value, bool):
        raise EfficientADError(f"image_size must be N or (height, width), got {value!r}")
    if isinstance(value, int):
        value = (value, value)
    try:
        size = tuple(int(side) for side in value)
    except (TypeError, ValueError):
        raise EfficientADError(f"image_size must be N or (height, width), got {value!r}") from None
    if len(size) != 2 or min(size) < 1:
        raise EfficientADError(f"image_size must be N or (height, width) of positive ints, got {value!r}")
    return size


def _check_positive(config: Any, *names: str, minimum: int = 1) -> None:
    for name in names:
        check_count(name, getattr(config, name), minimum)


def _check_fraction(name: str, value: float, low: float = 0.0, high: float = 1.0) -> None:
    if not low < value < high:
        raise EfficientADError(f"{name} must be in ({low:g}, {high:g}), got {value!r}")


def _check_optimizer(config: Any) -> None:
    """Adam's settings, shared by training and pretraining."""
    if config.learning_rate <= 0 or config.weight_decay < 0:
        raise EfficientADError(
            f"learning_rate must be > 0 and weight_decay >= 0, got {config.learning_rate} and {config.weight_decay}"
        )


# What a training schedule sets: the fields of TrainConfig that default to None and take the
# schedule's value. "paper" is the paper's; "fast" was chosen by measurement (README, "Training
# time"; benchmarks/learning_curves.py): the best image AUROC per CPU-minute among those tried.
SCHEDULE_SETTINGS: dict[str, dict[str, Any]] = {
    "paper": {"steps": 70_000, "batch_size": 1, "learning_rate": 1e-4},
    "fast": {"steps": 1_250, "batch_size": 1, "learning_rate": 2e-3},
}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what :meth:`EfficientAD.fit <efficientad.EfficientAD.fit>` learns.

    - ``teacher``: ``"small"``/``"medium"`` (official weights, downloaded once), ``None`` (the
      official one for ``model_size``), ``"random"`` (testing only: warns) or a teacher file path.
    - ``penalty_images``: a folder of ImageNet-like images; ``None`` turns the penalty off.
    - ``precision``: of training, and of calibration and prediction after it, so that the stored
      threshold is measured with the arithmetic that later applies it.
    - ``cache_teacher``: keep the teacher's features of the training images in memory; ``None``
      decides by their size. ``compile``: ``torch.compile`` the student trunk and the autoencoder.
    - ``skip_bad_images``: train on the readable images when some cannot be read (with a warning
      naming them; the model records them as ``skipped_images``) instead of refusing to train.
    - ``time_budget``: wall-clock seconds for the whole of ``fit`` up to calibration (image loading
      and teacher statistics count); the paper's schedule is laid out on the steps that fit, measured
      on the first steps, and ``steps`` stays an upper bound. ``None``: ``steps`` alone decide.
    - ``validate_every``: steps between the validation losses of the learning curve (``None``:
      a twentieth of the planned steps, fewer points where they would cost over 5% of the training
      time). ``early_stop``: end training when that curve has flattened (the rule:
      :data:`efficientad.training.schedule.EARLY_STOP_RULE`).
    - ``checkpoint_every``: seconds between checkpoints when ``fit`` is given a checkpoint file
      (0: none); they do not change what is learned.
    """

    model_size: str = "s"
    image_size: tuple[int, int] = (256, 256)
    teacher: str | None = None
    penalty_images: str | None = None
    schedule: str = "paper"
    steps: int | None = None  # None: the schedule's (the paper's: 70,000)
    batch_size: int | None = None  # the paper's: 1
    learning_rate: float | None = None  # the paper's: 1e-4
    weight_decay: float = 1e-5
    lr_drop_fraction: float = 0.95
    hard_loss_quantile: float = 0.999
    map_quantile_low: float = 0.9
    map_quantile_high: float = 0.995
    validation_fraction: float = 0.1
    false_positive_rate: float = 0.01
    precision: str = "fp32"
    channels_last: bool = False
    compile: bool = False
    cache_teacher: bool | None = None
    skip_bad_images: bool = False
    time_budget: float | None = None
    validate_every: int | None = None
    early_stop: bool = False
    checkpoint_every: float = 600.0
    seed: int = 0

    def __post_init__(self) -> None:
        from .networks import check_image_size  # deferred: torch, which --help need not import

        check_choice("model_size", self.model_size, MODEL_SIZES)
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("schedule", self.schedule, SCHEDULES)
        for name, value in SCHEDULE_SETTINGS[self.schedule].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        object.__setattr__(self, "image_size", check_image_size(parse_image_size(self.image_size)))
        for name in ("teacher", "penalty_images"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, os.fspath(value))
        _check_positive(self, "steps", "batch_size")
        _check_positive(self, "seed", minimum=0)
        for name in ("lr_drop_fraction", "validation_fraction", "false_positive_rate", "hard_loss_quantile", "map_quantile_low", "map_quantile_high"):
            _check_fraction(name, getattr(self, name))
        if self.map_quantile_low >= self.map_quantile_high:
            raise EfficientADError(
                f"map_quantile_low must be below map_quantile_high, got {self.map_quantile_low} and {self.map_quantile_high}"
            )
        _check_optimizer(self)
        if self.validate_every is not None:
            _check_positive(self, "validate_every")
        if self.time_budget is not None and not self.time_budget > 0:
            raise EfficientADError(f"time_budget must be positive seconds or None, got {self.time_budget!r}")
        if not self.checkpoint_every >= 0:
            raise EfficientADError(f"checkpoint_every must be seconds >= 0 (0: no checkpoints), got {self.checkpoint_every!r}")

    def as_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["image_size"] = list(self.image_size)
        return values


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that decides what :func:`~efficientad.training.pretrain.pretrain_teacher` learns.

    The defaults are the paper's and its reference reproduction's; ``grayscale`` is the probability
    of a grayscale sample, ``normalization_images`` the samples that measure the target's mean and
    std, ``time_budget`` wall-clock seconds after which training stops and still writes a teacher.
    ``backbone_weights`` is a torchvision state_dict file, ``"imagenet"`` (downloaded) or ``None``
    (random, for tests). ``workers``: image loading processes, ``None`` for CPUs - 1 (at most 8).
    """

    backbone: str = "wide_resnet101_2"
    backbone_weights: str | None = "imagenet"
    model_size: str = "s"
    steps: int = 60_000
    batch_size: int = 16
    learning_rate: float = 1e-4
    weight_decay: float = 1e-5
    grayscale: float = 0.1
    image_size: int = 256
    normalization_images: int = 10_000
    validation_images: int = 32
    validate_every: int = 1000
    checkpoint_every: int = 1000
    time_budget: float | None = None
    precision: str = "fp32"
    workers: int | None = None
    seed: int = 42

    def __post_init__(self) -> None:
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("model_size", self.model_size, MODEL_SIZES)
        check_choice("precision", self.precision, PRETRAIN_PRECISIONS)
        if self.backbone_weights is not None:
            object.__setattr__(self, "backbone_weights", os.fspath(self.backbone_weights))
        _check_positive(self, "steps", "batch_size", "normalization_images", "validation_images", "validate_every")
        _check_positive(self, "checkpoint_every", "seed", minimum=0)
        if self.workers is not None:
            _check_positive(self, "workers", minimum=0)
        _check_optimizer(self)
        if not 0.0 <= self.grayscale <= 1.0:
            raise EfficientADError(f"grayscale must be a probability in [0, 1], got {self.grayscale}")
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 32 or self.image_size % 16:
            raise EfficientADError(f"image_size must be a multiple of 16 and at least 32, got {self.image_size!r}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise EfficientADError(f"time_budget must be positive seconds, got {self.time_budget}")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_config(cls: type[Config], base: Config | None = None, overrides: Mapping[str, Any] | None = None) -> Config:
    """``base`` (default: ``cls()``'s defaults) with ``overrides``; an unknown name is refused by name."""
    overrides = dict(overrides or {})
    known = {field.name for field in fields(cls)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise EfficientADError(f"unknown {cls.__name__} parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    if base is None:
        return cls(**overrides)
    if cls is TrainConfig and "schedule" in overrides:
        # Another schedule's values, but for those given now: the base's came from its own schedule.
        overrides = {**{name: None for name in SCHEDULE_SETTINGS[base.schedule]}, **overrides}
    return replace(base, **overrides)


def default(cls: type, name: str, schedule: str = "paper") -> Any:
    """A field's default, for help texts that must not restate it (a schedule's field: that schedule's)."""
    value = next(field.default for field in fields(cls) if field.name == name)
    if cls is TrainConfig and value is None and name in SCHEDULE_SETTINGS[schedule]:
        return SCHEDULE_SETTINGS[schedule][name]
    return value


# Defaults of prediction and serving, read by the library and shown by the CLI.
PREDICT_BATCH_SIZE = 8
# Heat-map overlays larger than this are drawn at reduced size: the maps come from a 64x64 grid,
# so more pixels show no more of the map, and memory stays bounded whatever the photo's size.
OVERLAY_MAX_MEGAPIXELS = 4.0
SERVE_MAX_UPLOAD_MB = 20.0
SERVE_MAX_MEGAPIXELS = 40.0
# Predictions in progress at once; bounds a server's upload memory to about this x the upload limit.
SERVE_MAX_PENDING = 64
# Deadlines on slow clients (seconds): a request's headers from connecting (or from its first byte
# on a kept-alive connection), its body from its headers, and an idle kept-alive connection.
SERVE_HEADER_TIMEOUT = 10.0
SERVE_BODY_TIMEOUT = 30.0
SERVE_KEEP_ALIVE_TIMEOUT = 5.0
# Open connections beyond this get 503 before any request is read.
SERVE_MAX_CONNECTIONS = 1000
# Models in memory at once when serving a folder of them (`serve --models`); per replica on Ray Serve.
SERVE_MAX_LOADED = 8
# Ray Serve's end-to-end deadline for a request (reading, queueing, inference, answer), in seconds.
SERVE_RAY_REQUEST_TIMEOUT = 60.0
# int8 export: training images that set the activation ranges, and its acceptance test against fp32
# on the held-out normal images and their synthetic defects: how much lower the image AUROC and the
# AU-PRO may be (the bounds issue 16 sets on the test set), and the largest mean score difference of
# the held-out images (so that the threshold keeps its meaning), and how much each map's quantile
# spread on them may change (relative; it weighs the two maps in the combined one).
INT8_CALIBRATION_IMAGES = 64
INT8_MAX_AUROC_DROP = 0.005
INT8_MAX_AU_PRO_DROP = 0.01
INT8_MAX_SCORE_ERROR = 0.01
INT8_MAX_SPREAD_CHANGE = 0.15
# Quantisation-aware fine-tuning before int8 (export --qat-steps): the paper's final learning rate.
QAT_LEARNING_RATE = 1e-5
# The speed protocol: timed batch-1 runs after untimed warm-up runs, throughput at this batch size.
BENCH_RUNS = 50
BENCH_WARMUP = 10
BENCH_BATCH_SIZE = 8

# How long training runs (training/schedule.py): timed first steps, learning-curve points, early stop.
# The first step pays for allocations (and compilation); the ones after it are timed.
WARMUP_STEPS = 1
MEASURED_STEPS = 10
# When validate_every is None: this many learning-curve points per run, fewer where validating would
# take more than this share of the training time (many held-out images, a short run).
VALIDATIONS_PER_RUN = 20
VALIDATION_SHARE = 0.05
# Runs estimated to take longer than this, without a budget, get the advice to set one.
LONG_RUN_SECONDS = 3600.0
EARLY_STOP_PATIENCE = 3
EARLY_STOP_MIN_IMPROVEMENT = 0.01
EARLY_STOP_AFTER = 0.2
# Why a run ended (its history's "stopped_by"), in words.
STOP_REASONS = {"steps": "all steps done", "time_budget": "time budget reached", "early_stop": "early stop, validation loss flat"}
# Stopping is stopping: the learning-rate drop is not run first, calibration follows at once.
EARLY_STOP_RULE = (
    f"once {EARLY_STOP_AFTER:.0%} of the planned steps are done, training ends at the first validation after "
    f"which none of the last {EARLY_STOP_PATIENCE} lowered the best total validation loss before them by more "
    f"than {EARLY_STOP_MIN_IMPROVEMENT:.0%} (the learning rate is not dropped first; calibration follows)"
)
