"""Training: the paper's losses and loop (algorithm 1 of the paper's supplement), then calibration.

One step, as the paper writes it::

    L_hard  = mean of (T(I) - S_st(I))**2 over the elements at or above their 0.999 quantile
    L_pen   = mean of S_st(P)**2 for one penalty image P          (off without penalty images)
    L_AE    = mean of (T(I') - A(I'))**2 for the augmented image I'
    L_STAE  = mean of (A(I') - S_ae(I'))**2
    L       = L_hard + L_pen + L_AE + L_STAE,  Adam(lr 1e-4, weight decay 1e-5), lr x0.1 at 95%

Work the method does not need is skipped, without changing what is computed: the frozen teacher's
features of the clean training images are computed once and reused every step, the student's
trunk runs once per step on the clean, augmented and penalty images together (it has no batch-norm,
so this equals separate calls), and its last convolution computes only the half of the output
channels that each loss reads.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from tqdm import tqdm

from ..config import TrainConfig
from ..data.images import to_float
from ..device import autocast
from ..errors import EfficientADError
from ..model import EfficientADModel
from ..networks import TEACHER_CHANNELS
from .penalty import PenaltySource

# Above this, per-image teacher features are recomputed each step instead of kept in memory.
TEACHER_CACHE_LIMIT_BYTES = 4 << 30


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


def hard_feature_loss(distance: torch.Tensor, q: float = 0.999) -> torch.Tensor:
    """Mean of the squared errors at or above their ``q`` quantile (the paper's L_hard)."""
    threshold = quantile(distance.detach(), q)
    return distance[distance >= threshold].mean()


def augment_for_autoencoder(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random choice of brightness, contrast or saturation jitter, factor in [0.8, 1.2], per image."""
    adjusters = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
    out = []
    for image in images:
        choice = int(torch.randint(len(adjusters), (1,), generator=generator))
        factor = 0.8 + 0.4 * float(torch.rand((), generator=generator))
        out.append(adjusters[choice](image, factor))
    return torch.stack(out)


def penalty_image(penalty_images: PenaltySource, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """One random penalty image as floats (1, 3, H, W), turned gray with probability 0.3 (the paper's P)."""
    index = int(torch.randint(len(penalty_images), (1,), generator=generator))
    image = to_float(penalty_images[index].unsqueeze(0).to(device))
    if float(torch.rand((), generator=generator)) < 0.3:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    return image


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def fit_teacher_normalization(
    model: EfficientADModel, images: torch.Tensor, precision: str = "fp32", keep_features: bool = False, progress: bool = False
) -> torch.Tensor | None:
    """Set the teacher's per-channel mean/std over ``images``; optionally return its normalised features.

    Mean and variance are taken over all images and positions, as in the reference reproduction.
    """
    device = model.teacher_mean.device
    total = torch.zeros(TEACHER_CHANNELS, dtype=torch.float64, device=device)
    total_sq = torch.zeros_like(total)
    count = 0
    kept = []
    for part in tqdm(list(_batches(len(images), 8)), desc="Teacher statistics", disable=not progress, leave=False):
        with autocast(device, precision):
            features = model.teacher(model.normalize_input(to_float(images[part].to(device)))).float()
        total += features.sum(dim=(0, 2, 3), dtype=torch.float64)
        total_sq += features.double().pow(2).sum(dim=(0, 2, 3))
        count += features.shape[0] * features.shape[2] * features.shape[3]
        if keep_features:
            kept.append(features)
    mean = total / count
    std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    model.teacher_mean.copy_(mean.float().view(1, -1, 1, 1))
    model.teacher_std.copy_(std.float().view(1, -1, 1, 1))
    if not keep_features:
        return None
    features = torch.cat(kept)
    return features.sub_(model.teacher_mean).div_(model.teacher_std)


def teacher_cache_bytes(model: EfficientADModel, n_images: int) -> int:
    height, width = model.feature_size
    return n_images * TEACHER_CHANNELS * height * width * 4


class StepNetworks(NamedTuple):
    """The student split into trunk and last conv, and the autoencoder: what a step runs (maybe compiled)."""

    trunk: torch.nn.Module
    head: torch.nn.Conv2d
    autoencoder: torch.nn.Module

    @classmethod
    def of(cls, model: EfficientADModel) -> StepNetworks:
        return cls(model.student[:-1], model.student[-1], model.autoencoder)


def make_optimizer(model: EfficientADModel, config: TrainConfig):
    """Adam over student and autoencoder; the learning rate drops tenfold after 95% of the steps."""
    parameters = list(model.student.parameters()) + list(model.autoencoder.parameters())
    optimizer = torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=max(1, int(config.lr_drop_fraction * config.steps)), gamma=0.1
    )
    return optimizer, scheduler


def train_networks(
    model: EfficientADModel,
    images: torch.Tensor,
    config: TrainConfig,
    penalty_images: PenaltySource | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> dict:
    """Train student and autoencoder on uint8 images (N, 3, H, W); returns losses and timings.

    ``penalty_images`` give uint8 (3, H, W) images already resized to 2x and centre-cropped
    (:class:`~efficientad.training.penalty.PenaltyImages`, or a uint8 tensor); ``None`` turns the
    penalty off. ``on_step(step, losses)`` is called every step with float losses
    (it forces a device sync, so leave it unset for speed).
    """
    device = model.teacher_mean.device
    if images.shape[-2:] != model.image_size:
        raise EfficientADError(f"training images are {tuple(images.shape[-2:])}, the model expects {model.image_size}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images = images.to(device)

    cache = config.cache_teacher
    if cache is None:
        cache = teacher_cache_bytes(model, len(images)) <= TEACHER_CACHE_LIMIT_BYTES
    cached_features = fit_teacher_normalization(model, images, config.precision, keep_features=cache, progress=progress)

    optimizer, scheduler = make_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    model.train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    networks = StepNetworks.of(model)
    if config.compile:
        networks = StepNetworks(torch.compile(networks.trunk), networks.head, torch.compile(networks.autoencoder))

    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    step_seconds = []
    last = {}
    bar = tqdm(range(config.steps), desc="Training", unit="step", disable=not progress, dynamic_ncols=True)
    started = time.perf_counter()
    for step in bar:
        tic = time.perf_counter()
        # Cycle through shuffled epochs like the reference's infinite data loader.
        if cursor + config.batch_size > len(order):
            order = torch.cat([order[cursor:], torch.randperm(len(images), generator=generator)])
            cursor = 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        losses = training_step(model, images, index, cached_features, penalty_images, generator, config, networks)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step_seconds.append(time.perf_counter() - tic)
        if on_step is not None or step % 25 == 0 or step == config.steps - 1:
            last = {name: float(value.detach()) for name, value in losses.items()}
            bar.set_postfix(loss=f"{last['total']:.4f}", refresh=False)
            if on_step is not None:
                on_step(step, last)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    model.to(memory_format=torch.contiguous_format).eval()
    return {
        "final_losses": last,
        "train_seconds": seconds,
        "seconds_per_step": seconds / config.steps,
        "median_step_seconds": statistics.median(step_seconds),
        "teacher_cached": bool(cache),
        "penalty": penalty_images is not None,
    }


def training_step(
    model: EfficientADModel,
    images: torch.Tensor,
    index: torch.Tensor,
    cached_features: torch.Tensor | None,
    penalty_images: PenaltySource | None,
    generator: torch.Generator,
    config: TrainConfig,
    networks: StepNetworks | None = None,
) -> dict[str, torch.Tensor]:
    """The losses of one step (not yet back-propagated)."""
    if networks is None:
        networks = StepNetworks.of(model)
    device = images.device
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    clean = to_float(images[index.to(device)]).contiguous(memory_format=memory_format)
    augmented = augment_for_autoencoder(clean, generator).contiguous(memory_format=memory_format)
    x_clean = model.normalize_input(clean)
    x_augmented = model.normalize_input(augmented)
    batch = len(index)
    with torch.no_grad(), autocast(device, config.precision):
        if cached_features is None:
            both = model.teacher_features(torch.cat([x_clean, x_augmented])).float()
            teacher_clean, teacher_augmented = both[:batch], both[batch:]
        else:
            teacher_clean = cached_features[index.to(cached_features.device)]
            teacher_augmented = model.teacher_features(x_augmented).float()
    penalty = []
    if penalty_images is not None:
        penalty = [model.normalize_input(penalty_image(penalty_images, generator, device)).contiguous(memory_format=memory_format)]
    first_half_inputs = torch.cat([x_clean, *penalty])
    with autocast(device, config.precision):
        # One trunk pass for all images; the last conv computes only the channel half each loss reads.
        trunk = networks.trunk(torch.cat([first_half_inputs, x_augmented]))
        first_half = _conv_channels(networks.head, trunk[: len(first_half_inputs)], slice(0, TEACHER_CHANNELS)).float()
        student_augmented = _conv_channels(networks.head, trunk[len(first_half_inputs) :], slice(TEACHER_CHANNELS, None)).float()
        reconstruction = networks.autoencoder(x_augmented).float()
    student_clean, student_penalty = first_half[:batch], first_half[batch:]

    loss_hard = hard_feature_loss((teacher_clean - student_clean).pow(2), config.hard_loss_quantile)
    loss_penalty = student_penalty.pow(2).mean() if penalty else torch.zeros((), device=device)
    loss_ae = (teacher_augmented - reconstruction).pow(2).mean()
    loss_stae = (reconstruction - student_augmented).pow(2).mean()
    total = loss_hard + loss_penalty + loss_ae + loss_stae
    return {"total": total, "hard": loss_hard, "penalty": loss_penalty, "ae": loss_ae, "stae": loss_stae}


def _conv_channels(conv: torch.nn.Conv2d, x: torch.Tensor, channels: slice) -> torch.Tensor:
    """``conv(x)[:, channels]`` without computing the other output channels."""
    return F.conv2d(x, conv.weight[channels], conv.bias[channels], conv.stride, conv.padding)
