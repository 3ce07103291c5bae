"""Teacher pretraining: distil a patch description network (PDN) from a pretrained backbone.

The paper's teacher is a PDN trained to reproduce, at 256x256 input, the features a WideResNet-101
computes at 512x512. :class:`DistillationTarget` computes those features exactly as the reference
reproduction does (layer2 and layer3, each 3x3 patch flattened and average-pooled to 1024 values,
layer3 brought to layer2's grid, the pair pooled to 384 channels); :func:`pretrain_teacher` runs the
distillation with checkpoints, resume, a wall-clock budget and held-out validation.

Randomness: every sample's image choice and augmentation derive from ``(seed, stream, sample
index)`` alone, so a checkpoint's step fixes the data stream's position and a resumed run draws
exactly the batches an uninterrupted one would have.
"""

from __future__ import annotations

import copy
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..choices import BACKBONES, check_choice
from ..config import PretrainConfig, make_config
from ..data.images import IMAGENET_MEAN, IMAGENET_STD, list_images, read_image, resize_to_tensor
from ..device import autocast as precision_autocast
from ..device import resolve_device
from ..errors import EfficientADError, first_line
from ..files import atomic_save, versions, write_run_record
from ..model import tensors_sha256
from ..networks import TEACHER_CHANNELS, pdn, pdn_output_side
from .target_stats import ChannelSums, StatisticsCache, accumulate, default_cache, statistics_key

# A sample's two views of one image: at the backbone's side and at the PDN's.
Views = tuple[torch.Tensor, torch.Tensor]

TEACHER_FORMAT = "efficientad-teacher"
TEACHER_FORMAT_VERSION = 1
CHECKPOINT_FORMAT = "efficientad-pretrain-checkpoint"

# Everything a forward pass up to layer3 touches; layer4 and fc are dropped to save compute.
BACKBONE_MODULES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
# The reference reproduction pools every layer's flattened 3x3 patches to this many values.
LAYER_DIMENSION = 1024
PATCH_SIZE = 3

# Crops keep at least half the image: ImageNet-style photos stay recognisable while a small folder
# still yields many distinct views.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

# Seeds mix in one of these so that the split, the statistics pass and training draw independently.
_SPLIT_STREAM, _TRAIN_STREAM, _STATISTICS_STREAM = 0, 1, 2
# Under a time budget the target-statistics pass stops at this share of it, so that training gets
# the rest; it still measures at least MIN_STATISTICS_SAMPLES (all, if fewer are asked for), as
# fewer would leave the standardisation noisy.
STATISTICS_BUDGET_SHARE = 0.25
MIN_STATISTICS_SAMPLES = 64
# A run estimated to take longer than this without a time budget is told how to bound it.
_LONG_RUN_SECONDS = 3600


# --------------------------------------------------------------------------------------------------
# The distillation target


class _Trunk(nn.Module):
    """A torchvision ResNet cut after layer3, keeping torchvision's module (and state_dict) names."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        for name in BACKBONE_MODULES:
            setattr(self, name, getattr(network, name))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        layer2 = self.layer2(self.layer1(x))
        return layer2, self.layer3(layer2)


def _read_state_dict(weights: str | os.PathLike, name: str) -> dict[str, torch.Tensor]:
    if str(weights) == "imagenet":
        from torchvision.models import get_model_weights

        # IMAGENET1K_V1 is what the paper and its reference reproduction distil from.
        try:
            return get_model_weights(name)["IMAGENET1K_V1"].get_state_dict(progress=True)
        except OSError as error:
            raise EfficientADError(
                f"could not download the ImageNet weights of {name} ({error}); "
                "pass a local torchvision state_dict file as the backbone weights instead"
            ) from None
    path = Path(weights)
    if not path.is_file():
        raise EfficientADError(f"backbone weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for foreign or corrupt files
        raise EfficientADError(f"could not read backbone weights {path}: {first_line(error)}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EfficientADError(f"backbone weights {path} are not a torchvision state_dict (a dict of tensors)")
    return state


def _list_keys(keys: Sequence[str], limit: int = 6) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_backbone(name: str = "wide_resnet101_2", weights: str | os.PathLike | None = "imagenet") -> nn.Module:
    """Build a torchvision backbone truncated after layer3, frozen and in eval mode.

    ``weights`` is a path to a torchvision ``state_dict`` (keys after layer3 may be absent and are
    ignored), ``"imagenet"`` to download torchvision's ImageNet weights, or ``None`` for random
    weights (for tests). Its forward returns the (layer2, layer3) feature maps.
    """
    check_choice("backbone", name, BACKBONES)
    import torchvision  # deferred: importing it costs a second that `efficientad --help` should not pay

    trunk = _Trunk(getattr(torchvision.models, name)(weights=None))
    if weights is not None:
        state = _read_state_dict(weights, name)
        expected = trunk.state_dict()
        # BN's step counter is never read in eval mode, so files may omit it.
        missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
        misshaped = [
            f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
            for k, v in expected.items()
            if k in state and state[k].shape != v.shape
        ]
        source = "ImageNet weights" if str(weights) == "imagenet" else f"backbone weights {weights}"
        if missing:
            raise EfficientADError(f"{source} lack {len(missing)} {name} key(s) up to layer3: {_list_keys(missing)}")
        if misshaped:
            raise EfficientADError(f"{source} do not fit {name}: {_list_keys(misshaped)}")
        trunk.load_state_dict({k: state[k] for k in expected if k in state}, strict=False)
    trunk.requires_grad_(False)
    return trunk.eval()


def _patch_pooling(channels: int, dimension: int = LAYER_DIMENSION) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel indices and 3x3 weights of a grouped convolution that average-pools flattened patches.

    The reference flattens each 3x3 patch of a ``channels``-channel map to ``channels * 9`` values
    (channel-major) and adaptive-average-pools them to ``dimension``. Each pooled value is a short
    window of that vector, touching at most ``span`` consecutive channels, so it is one group of a
    convolution over those channels. Returns ``index`` (dimension * span channel indices to gather)
    and ``weight`` (dimension, span, 3, 3).
    """
    length = channels * PATCH_SIZE**2
    starts = [o * length // dimension for o in range(dimension)]
    ends = [-(-(o + 1) * length // dimension) for o in range(dimension)]
    first = [start // PATCH_SIZE**2 for start in starts]
    span = max((end - 1) // PATCH_SIZE**2 - c + 1 for end, c in zip(ends, first))
    weight = torch.zeros(dimension, span, PATCH_SIZE**2, dtype=torch.float64)
    for o, (start, end, c) in enumerate(zip(starts, ends, first)):
        for j in range(start, end):
            weight[o, j // PATCH_SIZE**2 - c, j % PATCH_SIZE**2] += 1.0 / (end - start)
    # Windows near the end may span fewer channels; their unused slots point at a valid channel
    # with zero weight.
    index = (torch.tensor(first)[:, None] + torch.arange(span)).clamp_(max=channels - 1)
    return index.flatten(), weight.view(dimension, span, PATCH_SIZE, PATCH_SIZE).float()


class DistillationTarget(nn.Module):
    """The features a teacher PDN learns to reproduce (unstandardised).

    Input: ImageNet-normalised images at twice the PDN's input side (512x512 for the paper's 256).
    Output: ``out_channels`` maps on layer2's grid (1/8 of the input side; 64x64 at 512x512).

    For the 1024-channel layer3 of the ResNet-50 family the patch pooling is exactly a 3x3 average
    pooling (stride 1, zero padding 1); for other widths each pooled value averages a window of the
    flattened patch, as in the reference reproduction.
    """

    def __init__(
        self,
        backbone: str = "wide_resnet101_2",
        weights: str | os.PathLike | None = "imagenet",
        out_channels: int = TEACHER_CHANNELS,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.out_channels = out_channels
        self.backbone = load_backbone(backbone, weights)
        for layer, channels in zip(("layer2", "layer3"), BACKBONES[backbone]):
            index, weight = _patch_pooling(channels)
            self.register_buffer(f"{layer}_index", index, persistent=False)
            self.register_buffer(f"{layer}_weight", weight, persistent=False)

    def _pool_patches(self, features: torch.Tensor, layer: str) -> torch.Tensor:
        index, weight = getattr(self, f"{layer}_index"), getattr(self, f"{layer}_weight")
        gathered = features.index_select(1, index)
        return F.conv2d(gathered, weight.to(gathered.dtype), padding=PATCH_SIZE // 2, groups=weight.shape[0])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        layer2, layer3 = self.backbone(images)
        layer2 = self._pool_patches(layer2, "layer2")
        # Pooling patches and bilinear resizing are both linear per map, so pooling at layer3's
        # coarser grid first equals the reference's resize-then-pool at a quarter of the cost.
        layer3 = F.interpolate(
            self._pool_patches(layer3, "layer3"), size=layer2.shape[-2:], mode="bilinear", align_corners=False
        )
        features = torch.cat([layer2, layer3], dim=1).unsqueeze(1)
        return F.adaptive_avg_pool3d(features, (self.out_channels, *layer2.shape[-2:])).squeeze(1)


# --------------------------------------------------------------------------------------------------
# Data


def _random_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    width, height = image.size
    for _ in range(10):
        area = width * height * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        crop_width, crop_height = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            left = int(rng.integers(0, width - crop_width + 1))
            top = int(rng.integers(0, height - crop_height + 1))
            return image.crop((left, top, left + crop_width, top + crop_height))
    return image


class _DistillationImages(Dataset):
    """Pairs of uint8 views (backbone side, PDN side) of one image, indexed by sample number.

    Augmented streams cycle through seeded shuffles of the images, one per epoch, and draw a random
    resized crop, a horizontal flip and (with probability ``grayscale``) a grayscale conversion,
    shared by both views. Plain streams read image ``n`` whole.
    """

    def __init__(
        self, paths: Sequence[Path], sides: tuple[int, int], seed: int, stream: int, augment: bool, grayscale: float
    ) -> None:
        self.paths, self.sides, self.seed, self.stream = list(paths), sides, seed, stream
        self.augment, self.grayscale = augment, grayscale
        self._epoch, self._order = -1, np.arange(0)

    def _path(self, n: int) -> Path:
        if not self.augment:
            return self.paths[n]
        epoch, position = divmod(n, len(self.paths))
        if epoch != self._epoch:
            self._epoch = epoch
            self._order = np.random.default_rng([self.seed, self.stream, 0, epoch]).permutation(len(self.paths))
        return self.paths[self._order[position]]

    def __getitem__(self, n: int) -> Views | str:
        try:
            image = read_image(self._path(n))
        except EfficientADError as error:
            # Returned, not raised: a worker process would re-raise it wrapped in a traceback.
            return str(error)
        if self.augment:
            rng = np.random.default_rng([self.seed, self.stream, 1, n])
            image = _random_crop(image, rng)
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            if rng.random() < self.grayscale:
                image = image.convert("L").convert("RGB")
        return tuple(resize_to_tensor(image, (side, side)) for side in self.sides)


def _collate(items: list[Views | str]) -> Views | str:
    for item in items:
        if isinstance(item, str):
            return item
    return tuple(torch.stack(views) for views in zip(*items))


def _batches(
    dataset: _DistillationImages, samples: range, batch_size: int, workers: int, device: torch.device
) -> Iterator[Views]:
    """ImageNet-normalised float batches of (backbone view, PDN view) on ``device``."""
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=samples,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    for batch in loader:
        if isinstance(batch, str):
            raise EfficientADError(batch)
        yield tuple((view.to(device, non_blocking=True).float() / 255.0 - mean) / std for view in batch)


# --------------------------------------------------------------------------------------------------
# Training


def checkpoint_path(out: str | os.PathLike) -> Path:
    """Where :func:`pretrain_teacher` keeps the checkpoint for output ``out``: ``OUT.ckpt``."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


@dataclass
class PretrainResult:
    """What a pretraining run produced."""

    out: Path
    steps: int  # total optimisation steps of the teacher, including those before a resume
    start_step: int  # the step this run resumed from (0 for a fresh run)
    validation_loss: float
    seconds: float  # wall-clock seconds of this run
    stopped_by: str  # "steps" or "time_budget"
    losses: dict[str, list[list[float]]] = field(default_factory=dict)  # "train"/"validation": [step, loss]
    target_statistics: dict[str, Any] = field(default_factory=dict)  # as in pretrain.json: source, samples, files


# Settings a resumed run must share with its checkpoint: they fix the data stream and the model.
_RESUME_KEYS = ("backbone", "model_size", "image_size", "batch_size", "seed", "grayscale", "learning_rate", "weight_decay")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise EfficientADError(message)


def _split(paths: list[Path], validation_images: int, seed: int) -> tuple[list[Path], list[Path]]:
    _check(len(paths) >= 2, f"need at least 2 images (one is held out for validation), found {len(paths)}")
    held_out = min(validation_images, max(1, len(paths) // 10))
    order = np.random.default_rng([seed, _SPLIT_STREAM]).permutation(len(paths))
    validation = sorted(order[:held_out].tolist())
    training = sorted(order[held_out:].tolist())
    return [paths[i] for i in training], [paths[i] for i in validation]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure_step(
    target: DistillationTarget,
    teacher: nn.Module,
    batch_size: int,
    sides: tuple[int, int],
    autocast: Callable[[], Any],
    device: torch.device,
) -> tuple[float, float]:
    """Seconds of the target on one batch and of a whole training step, timed on a copy of the teacher.

    Random pixels cost what photos cost and leave the data streams and the teacher untouched. A
    first step of one image pays for what a first call costs (CUDA's start, kernel selection), so
    that the timed one is typical at little more than a step's cost.
    """
    probe = copy.deepcopy(teacher)
    optimizer = torch.optim.Adam(probe.parameters())
    # A generator of its own leaves torch's global random state as the run seeded it.
    generator = torch.Generator().manual_seed(0)
    backbone_view, pdn_view = (torch.rand(batch_size, 3, side, side, generator=generator).to(device) for side in sides)
    for images in (1, batch_size):
        began = monotonic()
        with autocast():
            expected = target(backbone_view[:images]).float()
        _synchronize(device)
        targeted = monotonic()
        with autocast():
            loss = F.mse_loss(probe(pdn_view[:images]).float(), expected)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        _synchronize(device)
        stepped = monotonic()
    return targeted - began, stepped - began


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _estimate_line(
    statistics: str,
    statistics_seconds: float,
    minimum_seconds: float,
    steps: int,
    step_seconds: float,
    time_budget: float | None,
    elapsed: float,
) -> str:
    """What the run is about to cost, from times measured on this machine, and what a budget leaves of it.

    ``statistics`` says what the statistics pass will do ("about 58 min for 10000 samples", or where
    they come from); ``statistics_seconds`` and ``minimum_seconds`` the estimated seconds of the
    whole pass and of its minimum of samples; ``elapsed`` the seconds already spent.
    """
    training_seconds = steps * step_seconds
    line = f"{statistics}; training: about {_duration(training_seconds)} for {steps} steps at {step_seconds:.3g} s/step"
    if time_budget is None:
        if statistics_seconds + training_seconds > _LONG_RUN_SECONDS:
            line += (
                f"; over an hour: --time-budget SECONDS bounds the run (the statistics pass gets at most "
                f"{STATISTICS_BUDGET_SHARE:.0%} of it)"
            )
        return line
    left = time_budget - elapsed
    if statistics_seconds + training_seconds > left:
        share = max(minimum_seconds, STATISTICS_BUDGET_SHARE * time_budget - elapsed)
        statistics_share = min(statistics_seconds, share)
        steps_within = max(0, int((left - statistics_share) / step_seconds))
        within = f"about {_duration(statistics_share)} of statistics and " if statistics_seconds else ""
        line += f"; the time budget ({_duration(time_budget)}) ends it sooner: {within}{min(steps, steps_within)} steps"
    return line


def _target_statistics(
    target: DistillationTarget,
    batches: Iterable[Views],
    sums: ChannelSums,
    count: int,
    cache: StatisticsCache | None,
    reused_from: Path | None,
    deadline: float | None,
    autocast: Callable[[], Any],
    progress: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Complete ``sums`` (from the cache, or empty) to ``count`` samples unless ``deadline`` passes first.

    Returns the per-channel mean and std, shaped (1, C, 1, 1), and what the run record says of them.
    New sums go to the cache, a pass cut short too: a later run continues from it.
    """
    began, reused = monotonic(), sums.samples
    minimum = min(MIN_STATISTICS_SAMPLES, count)

    def stop(samples: int) -> bool:
        return deadline is not None and samples >= minimum and monotonic() >= deadline

    accumulate(target, batches, sums, count, autocast, stop, progress)
    computed = sums.samples - reused
    saved_to = cache.save(sums) if computed and cache is not None else None
    if sums.samples < count:
        kept = f"; cached in {saved_to}, a later run continues from them" if saved_to else ""
        print(
            f"target statistics: stopped at {sums.samples} of {count} samples, their {STATISTICS_BUDGET_SHARE:.0%} "
            f"of the time budget spent; training with these{kept}",
            file=sys.stderr,
            flush=True,
        )
    mean, std = sums.mean_std()
    record = {
        "source": "reused" if not computed else "continued" if reused else "computed",
        "requested": count,
        "samples": sums.samples,
        "reused_samples": reused,
        "computed_samples": computed,
        "reused_from": str(reused_from) if reused else None,
        "saved_to": str(saved_to) if saved_to else None,
        "stopped_by": "time_budget" if sums.samples < count else "samples",
        "seconds": monotonic() - began,
        "cache": str(cache.folder) if cache else None,
    }
    return mean, std, record


def _statistics_cache(
    stats_cache: str | os.PathLike | bool, config: PretrainConfig, paths: Sequence[Path]
) -> StatisticsCache | None:
    if stats_cache is False:
        return None
    return StatisticsCache(default_cache() if stats_cache is True else stats_cache, statistics_key(config, paths))


def _statistics_plan(
    sums: ChannelSums | None, count: int, batch_size: int, target_seconds: float, found: Path | None
) -> tuple[str, float, float]:
    """What the estimate says of the statistics pass (``sums`` None: they come from the checkpoint).

    With the estimated seconds of the pass and of its minimum of samples.
    """
    if sums is None:
        return "target statistics: from the checkpoint", 0.0, 0.0
    if sums.samples == count:
        return f"target statistics: reused ({count} samples, {found})", 0.0, 0.0

    def seconds(samples: int) -> float:
        return math.ceil(max(0, samples - sums.samples) / batch_size) * target_seconds

    left = count - sums.samples
    continued = f" (continuing from {sums.samples} cached in {found})" if sums.samples else ""
    plan = f"target statistics: about {_duration(seconds(count))} for {left} samples{continued}"
    return plan, seconds(count), seconds(min(MIN_STATISTICS_SAMPLES, count))


@torch.no_grad()
def _validation_loss(
    teacher: nn.Module,
    target: DistillationTarget,
    batches: Iterable[Views],
    mean: torch.Tensor,
    std: torch.Tensor,
    autocast: Callable[[], Any],
) -> float:
    total, count = 0.0, 0
    for backbone_view, pdn_view in batches:
        with autocast():
            expected = (target(backbone_view).float() - mean) / std
            total += F.mse_loss(teacher(pdn_view).float(), expected, reduction="sum").item()
        count += expected.numel()
    return total / count


def pretrain_teacher(
    images: str | os.PathLike,
    out: str | os.PathLike,
    config: PretrainConfig | None = None,
    *,
    device: str | None = None,
    resume: bool = False,
    progress: bool = True,
    stats_cache: str | os.PathLike | bool = True,
    **settings: Any,
) -> PretrainResult:
    """Distil a teacher PDN from a backbone on the images of a folder and write it to ``out``.

    The PDN (``model_size`` "s" or "m", padding on) sees ``image_size`` squares and learns with MSE
    the standardised :class:`DistillationTarget` of the same view at twice that side. The target's
    per-channel mean and std come from a first pass over ``normalization_images`` augmented samples.
    Images are read recursively from ``images``; a seeded few are held out and their loss logged
    every ``validate_every`` steps. Settings are a :class:`~efficientad.config.PretrainConfig`
    (``config``) and/or its fields by name.

    A checkpoint (model, optimizer, step, target statistics, losses) goes to ``OUT.ckpt`` every
    ``checkpoint_every`` steps and at the end (0: never); ``resume=True`` continues from it.
    ``precision='bf16'`` runs the forward passes under bfloat16 autocast.

    Before the statistics pass, one target pass and one training step are timed on a batch of random
    pixels and an estimate of both phases is printed to stderr. ``time_budget`` (seconds of this whole
    run) ends the statistics pass at :data:`STATISTICS_BUDGET_SHARE` of it (after at least
    :data:`MIN_STATISTICS_SAMPLES` samples) and training at its end, still writing a valid teacher;
    a fresh run whose budget is spent before its first training step is refused instead.

    The statistics are cached (see :class:`~efficientad.training.target_stats.StatisticsCache`) in
    ``stats_cache``: a folder, ``True`` for ``target_stats`` in the user cache folder
    (``$EFFICIENTAD_CACHE``, else ``~/.cache/efficientad``), ``False`` for no cache. A run with the
    same backbone, weights, training images, image size, grayscale probability, seed and precision
    reuses them, or continues a shorter pass, even one a budget cut short.

    ``out`` is written atomically: a dict loadable with ``torch.load(weights_only=True)`` holding
    ``format``, ``format_version``, ``model_size``, ``state_dict`` (the PDN's, with
    ``nn.Sequential`` index keys), ``backbone``, ``steps``, ``validation_loss`` and ``versions``.
    ``pretrain.json`` beside it records the settings, versions, seconds, losses, the estimate and
    where the target statistics came from (``target_statistics``: computed, reused or continued).
    """
    started = monotonic()
    out = Path(out)
    config = make_config(PretrainConfig, config, settings)
    backbone, backbone_weights, model_size = config.backbone, config.backbone_weights, config.model_size
    steps, batch_size, seed, image_size = config.steps, config.batch_size, config.seed, config.image_size
    validate_every, checkpoint_every, time_budget = config.validate_every, config.checkpoint_every, config.time_budget
    _check(not out.is_dir(), f"out is a directory, expected a file path: {out}")
    torch_device = resolve_device(device)
    workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if config.workers is None else config.workers
    checkpoint_file = checkpoint_path(out)
    _check(not resume or checkpoint_file.is_file(), f"no checkpoint to resume from: {checkpoint_file}")
    out.parent.mkdir(parents=True, exist_ok=True)

    record = {"images": str(images), "out": str(out), **config.as_dict(), "device": str(torch_device), "workers": workers}
    checkpoint = None
    if resume:
        try:
            checkpoint = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
        except Exception as error:  # torch.load raises many types for foreign or corrupt files
            detail = first_line(error)
            raise EfficientADError(f"could not read checkpoint {checkpoint_file}: {detail}") from None
        _check(
            isinstance(checkpoint, dict) and checkpoint.get("format") == CHECKPOINT_FORMAT,
            f"not a pretraining checkpoint: {checkpoint_file}",
        )
        for key in _RESUME_KEYS:
            saved = checkpoint["config"].get(key)
            _check(saved == record[key], f"checkpoint {checkpoint_file} has {key}={saved!r}, this run {record[key]!r}")

    training_paths, validation_paths = _split(list_images(images, recursive=True), config.validation_images, seed)
    # Seeded before the target so that a randomly initialised backbone is reproducible too.
    torch.manual_seed(seed)
    target = DistillationTarget(backbone, backbone_weights).to(torch_device)
    grid = pdn_output_side(model_size, image_size, padding=True)
    _check(grid == image_size // 4, f"image_size {image_size} gives a {grid}x{grid} PDN output, not {image_size // 4}")
    sides = (2 * image_size, image_size)

    def autocast() -> torch.autocast:
        return precision_autocast(torch_device, config.precision)

    def stream(samples: range, kind: int) -> Iterator[Views]:
        dataset = _DistillationImages(training_paths, sides, seed, kind, augment=True, grayscale=config.grayscale)
        return _batches(dataset, samples, batch_size, workers, torch_device)

    validation = _DistillationImages(validation_paths, sides, seed, _SPLIT_STREAM, augment=False, grayscale=0.0)

    teacher = pdn(model_size, TEACHER_CHANNELS, padding=True).to(torch_device)
    optimizer = torch.optim.Adam(teacher.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    if checkpoint is not None:
        teacher.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        mean, std = checkpoint["channel_mean"].to(torch_device), checkpoint["channel_std"].to(torch_device)
        start_step, losses = checkpoint["step"], checkpoint["losses"]
        previous_seconds = checkpoint["seconds"]
        statistics = {**checkpoint.get("target_statistics", {}), "source": "checkpoint"}
        sums = cache = found = None
    else:
        start_step, losses, previous_seconds = 0, {"train": [], "validation": []}, 0.0
        cache = _statistics_cache(stats_cache, config, training_paths)
        sums, found = cache.load(config.normalization_images) if cache else (ChannelSums(), None)

    target_seconds, step_seconds = _measure_step(target, teacher, batch_size, sides, autocast, torch_device)
    plan, statistics_seconds, minimum_seconds = _statistics_plan(
        sums, config.normalization_images, batch_size, target_seconds, found
    )
    elapsed = monotonic() - started
    estimate = _estimate_line(
        plan, statistics_seconds, minimum_seconds, steps - start_step, step_seconds, time_budget, elapsed
    )
    print(estimate, file=sys.stderr, flush=True)
    if sums is not None:
        deadline = None if time_budget is None else started + STATISTICS_BUDGET_SHARE * time_budget
        batches = stream(range(sums.samples, config.normalization_images), _STATISTICS_STREAM)
        mean, std, statistics = _target_statistics(
            target, batches, sums, config.normalization_images, cache, found, deadline, autocast, progress
        )
        mean, std = mean.to(torch_device), std.to(torch_device)
        elapsed = monotonic() - started
        if time_budget is not None and elapsed >= time_budget:
            # The minimum of samples (or setting up) outlasted the budget: a teacher of no steps would
            # look like a result but be the random initialisation.
            saved_to = statistics["saved_to"]
            kept = f"; its samples are cached in {saved_to} for the next run" if saved_to else ""
            enough = max(elapsed / STATISTICS_BUDGET_SHARE, elapsed + 100 * step_seconds)
            raise EfficientADError(
                f"time budget of {time_budget:g} s spent before the first training step ({elapsed:.0f} s, "
                f"{statistics['seconds']:.0f} s of them measuring {statistics['samples']} target-statistics "
                f"samples{kept}); give a larger --time-budget, e.g. {math.ceil(enough)}"
            )

    def save_checkpoint(step: int) -> None:
        atomic_save(
            {
                "format": CHECKPOINT_FORMAT,
                "step": step,
                "model": teacher.state_dict(),
                "optimizer": optimizer.state_dict(),
                "channel_mean": mean.cpu(),
                "channel_std": std.cpu(),
                "target_statistics": statistics,
                "losses": losses,
                "seconds": previous_seconds + monotonic() - started,
                "config": record,
            },
            checkpoint_file,
        )

    def validate(step: int) -> float:
        batches = _batches(validation, range(len(validation_paths)), batch_size, 0, torch_device)
        loss = _validation_loss(teacher, target, batches, mean, std, autocast)
        losses["validation"].append([step, loss])
        return loss

    step, stopped_by = start_step, "steps"
    interval_loss, interval_steps = 0.0, 0
    with tqdm(total=steps, initial=start_step, desc="Pretraining", unit="step", disable=not progress) as bar:
        for backbone_view, pdn_view in stream(range(start_step * batch_size, steps * batch_size), _TRAIN_STREAM):
            if time_budget is not None and monotonic() - started >= time_budget:
                stopped_by = "time_budget"
                break
            with autocast():
                expected = (target(backbone_view).float() - mean) / std
                loss = F.mse_loss(teacher(pdn_view).float(), expected)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_value = loss.item()
            interval_loss, interval_steps = interval_loss + loss_value, interval_steps + 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}")
            if step % validate_every == 0:
                losses["train"].append([step, interval_loss / interval_steps])
                interval_loss, interval_steps = 0.0, 0
                bar.set_postfix(loss=f"{loss_value:.4f}", validation=f"{validate(step):.4f}")
            if checkpoint_every and step % checkpoint_every == 0:
                save_checkpoint(step)
    if interval_steps:
        losses["train"].append([step, interval_loss / interval_steps])
    if not losses["validation"] or losses["validation"][-1][0] != step:
        validate(step)
    validation_loss = losses["validation"][-1][1]
    if checkpoint_every:
        save_checkpoint(step)

    # pretrain.json goes before the teacher file is replaced and comes back after it, so that any
    # pretrain.json on disk describes the teacher beside it (teacher_tensor_sha256 proves which).
    record_path = out.parent / "pretrain.json"
    record_path.unlink(missing_ok=True)
    state_dict = {k: v.detach().cpu().float().clone() for k, v in teacher.state_dict().items()}
    atomic_save(
        {
            "format": TEACHER_FORMAT,
            "format_version": TEACHER_FORMAT_VERSION,
            "model_size": model_size,
            "state_dict": state_dict,
            "backbone": backbone,
            "steps": step,
            "validation_loss": validation_loss,
            "versions": versions(),
        },
        out,
    )
    seconds = monotonic() - started
    report = {
        "config": record,
        "steps": step,
        "start_step": start_step,
        "stopped_by": stopped_by,
        "seconds": seconds,
        "total_seconds": previous_seconds + seconds,
        "training_images": len(training_paths),
        "validation_images": len(validation_paths),
        "validation_loss": validation_loss,
        "losses": losses,
        "target_statistics": statistics,
        "estimate": {
            "line": estimate,
            "target_seconds_per_batch": target_seconds,
            "step_seconds": step_seconds,
            "statistics_seconds": statistics_seconds,
            "training_seconds": (steps - start_step) * step_seconds,
        },
        "teacher_file": str(out),
        "teacher_tensor_sha256": tensors_sha256(state_dict),
    }
    write_run_record(record_path, report)
    return PretrainResult(out, step, start_step, validation_loss, seconds, stopped_by, losses, statistics)
