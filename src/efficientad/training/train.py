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

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from tqdm import tqdm

from ..config import EARLY_STOP_RULE, MEASURED_STEPS, WARMUP_STEPS, TrainConfig
from ..data.images import to_float
from ..device import autocast
from ..errors import EfficientADError
from ..model import EfficientADModel
from ..networks import TEACHER_CHANNELS
from .checkpoint import Checkpointing, restore_rng, rng_state
from .curves import ValidationSet
from .losses import hard_feature_loss
from .penalty import PenaltySource
from .schedule import Plan, budget_plan, estimate, flattened, learning_rate

# Above this, per-image teacher features are recomputed each step instead of kept in memory.
TEACHER_CACHE_LIMIT_BYTES = 4 << 30


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


def make_optimizer(model: EfficientADModel, config: TrainConfig) -> torch.optim.Adam:
    """Adam over student and autoencoder; each step's learning rate comes from :func:`~.schedule.learning_rate`."""
    parameters = list(model.student.parameters()) + list(model.autoencoder.parameters())
    return torch.optim.Adam(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)


@dataclass
class RunState:
    """What a training run has done so far: all of it goes into a checkpoint."""

    plan: Plan
    step: int = 0  # steps done
    curve: list[dict[str, Any]] = field(default_factory=list)
    # Training losses summed since the last curve point, and the last step's, on the device (no sync per step).
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    summed_steps: int = 0
    last: dict[str, torch.Tensor] = field(default_factory=dict)
    seconds_before: float = 0.0  # spent by the sessions before a resume

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        self.last = {name: value.detach() for name, value in losses.items()}
        self.sums = {name: self.sums.get(name, 0.0) + value for name, value in self.last.items()}
        self.summed_steps += 1
        self.step += 1

    def saved(self) -> dict[str, Any]:
        def floats(values: dict[str, torch.Tensor]) -> dict[str, float]:
            return {name: float(value) for name, value in values.items()}

        return {
            "plan": asdict(self.plan), "step": self.step, "curve": self.curve, "sums": floats(self.sums),
            "summed_steps": self.summed_steps, "last": floats(self.last),
        }

    @classmethod
    def restored(cls, saved: dict[str, Any], device: torch.device) -> RunState:
        def tensors(values: dict[str, float]) -> dict[str, torch.Tensor]:
            return {name: torch.tensor(value, device=device) for name, value in values.items()}

        return cls(
            Plan(**saved["plan"]), saved["step"], saved["curve"], tensors(saved["sums"]), saved["summed_steps"],
            tensors(saved["last"]), saved["seconds"],
        )


def train_networks(
    model: EfficientADModel,
    images: torch.Tensor,
    config: TrainConfig,
    penalty_images: PenaltySource | None = None,
    progress: bool = True,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    *,
    validation_images: torch.Tensor | None = None,
    checkpoint: Checkpointing | None = None,
    started: float | None = None,
) -> dict:
    """Train student and autoencoder on uint8 images (N, 3, H, W); returns the run's history.

    ``penalty_images`` give uint8 (3, H, W) images already resized to 2x and centre-cropped
    (:class:`~efficientad.training.penalty.PenaltyImages`, or a uint8 tensor); ``None`` turns the
    penalty off. ``on_step(step, losses)`` is called every step with float losses
    (it forces a device sync, so leave it unset for speed).

    ``validation_images`` (held-out normal uint8 images) give the learning curve, every
    ``validate_every`` steps, after the timed first steps and at the end, which ``early_stop``
    reads. ``config.time_budget`` counts from ``started`` (a ``time.perf_counter()`` value;
    default: now), so that the caller's work before training counts too; the schedule is laid out
    on it after the first steps, and again after each step on the latest steps' time until the
    learning rate drops (:mod:`~efficientad.training.schedule`). ``checkpoint`` saves the
    run every ``checkpoint.every`` seconds, and continues the one in ``checkpoint.resume``.
    """
    started = time.perf_counter() if started is None else started
    device = model.teacher_mean.device
    if images.shape[-2:] != model.image_size:
        raise EfficientADError(f"training images are {tuple(images.shape[-2:])}, the model expects {model.image_size}")
    if config.early_stop and validation_images is None:
        raise EfficientADError("early_stop needs held-out validation images: its rule reads their losses")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images = images.to(device)

    cache = config.cache_teacher
    if cache is None:
        held_out = 0 if validation_images is None else len(validation_images)
        cache = teacher_cache_bytes(model, len(images) + held_out) <= TEACHER_CACHE_LIMIT_BYTES
    cached_features = fit_teacher_normalization(model, images, config.precision, keep_features=cache, progress=progress)
    validation = None if validation_images is None else ValidationSet(model, validation_images, config, cache)

    optimizer = make_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    order = torch.randperm(len(images), generator=generator)
    cursor = 0
    run = RunState(Plan.of(config, config.steps))
    resume = None if checkpoint is None else checkpoint.resume
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scaler.load_state_dict(resume["scaler"])
        restore_rng(resume["rng"], generator, device)
        order, cursor = resume["order"], resume["cursor"]
        run = RunState.restored(resume, device)
    start_step = run.step
    model.train()
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    networks = StepNetworks.of(model)
    if config.compile:
        networks = StepNetworks(torch.compile(networks.trunk), networks.head, torch.compile(networks.autoencoder))

    def elapsed() -> float:
        return run.seconds_before + time.perf_counter() - started

    def validate() -> float:
        """Add a curve point; returns the seconds it took."""
        tic = time.perf_counter()
        train_means = {name: float(total) / run.summed_steps for name, total in run.sums.items()}
        run.curve.append({"step": run.step, "seconds": elapsed(), "train": train_means, "validation": validation.losses(model)})
        run.sums, run.summed_steps = {}, 0
        return time.perf_counter() - tic

    stopped_by = None
    timed = WARMUP_STEPS + MEASURED_STEPS  # the first steps of a session, timed one by one
    step_seconds = []
    validation_seconds = 0.0
    last_checkpoint = loop_started = time.perf_counter()
    bar = tqdm(total=run.plan.steps, initial=run.step, desc="Training", unit="step", disable=not progress, dynamic_ncols=True)
    while run.step < run.plan.steps:
        # The timed first steps run whatever the budget: the plan needs them.
        if config.time_budget is not None and run.plan.step_seconds is not None and elapsed() >= config.time_budget:
            stopped_by = "time_budget"
            break
        tic = time.perf_counter()
        # Cycle through shuffled epochs like the reference's infinite data loader.
        if cursor + config.batch_size > len(order):
            order = torch.cat([order[cursor:], torch.randperm(len(images), generator=generator)])
            cursor = 0
        index = order[cursor : cursor + config.batch_size]
        cursor += config.batch_size
        losses = training_step(model, images, index, cached_features, penalty_images, generator, config, networks)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, run.plan, run.step)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(losses["total"]).backward()
        scaler.step(optimizer)
        scaler.update()
        run.add(losses)
        # Steps are timed apart from validations and checkpoints; the timed ones after the device finished them.
        step_seconds.append((_synchronized(device) if len(step_seconds) < timed else time.perf_counter()) - tic)
        bar.update(1)
        if on_step is not None or run.step % 25 == 0:
            step_losses = {name: float(value) for name, value in run.last.items()}
            bar.set_postfix(loss=f"{step_losses['total']:.4f}", refresh=False)
            if on_step is not None:
                on_step(run.step - 1, step_losses)
        if run.plan.step_seconds is None and len(step_seconds) == timed:
            step_time = statistics.mean(step_seconds[WARMUP_STEPS:])
            validation_seconds = 0.0 if validation is None else validate()
            if config.time_budget is None:
                run.plan = Plan.of(config, config.steps, step_time, validation_seconds)
            else:
                run.plan = budget_plan(config, run.step, config.time_budget - elapsed(), step_time, validation_seconds)
                bar.total = run.plan.steps
            if progress and run.plan.steps > run.step:
                tqdm.write(estimate(config, run.plan, run.step, validation_seconds), file=sys.stderr)
        # Counted from the last point, not as multiples: a replanned interval must not bunch validations.
        elif validation is not None and run.step - (run.curve[-1]["step"] if run.curve else 0) >= run.plan.validate_every:
            validation_seconds = validate()
            point = run.curve[-1]
            bar.set_postfix(loss=f"{point['train']['total']:.4f}", validation=f"{point['validation']['total']:.4f}", refresh=False)
            if config.early_stop and flattened([point["validation"]["total"] for point in run.curve], run.step, run.plan):
                stopped_by = "early_stop"
                break
        elif config.time_budget is not None and run.plan.step_seconds is not None and run.step < run.plan.drop_step:
            # Until the learning rate drops, the budget's plan follows the latest steps: laid out once on the
            # first ones, a machine that slowed down would reach the budget before the drop (the demo did).
            recent = statistics.mean(step_seconds[-MEASURED_STEPS:])
            run.plan = budget_plan(config, run.step, config.time_budget - elapsed(), recent, validation_seconds)
            bar.total = run.plan.steps
        if checkpoint is not None and checkpoint.every and time.perf_counter() - last_checkpoint >= checkpoint.every:
            checkpoint.write(
                {
                    **run.saved(), "seconds": elapsed(), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng_state(generator, device), "order": order, "cursor": cursor,
                }
            )
            last_checkpoint = time.perf_counter()
    seconds = _synchronized(device) - loop_started
    bar.close()
    if validation is not None and run.summed_steps:
        validate()
    model.to(memory_format=torch.contiguous_format).eval()
    if stopped_by is None:
        stopped_by = "steps" if run.plan.steps == config.steps else "time_budget"
    return {
        "final_losses": {name: float(value) for name, value in run.last.items()},
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(1, len(step_seconds)),
        "median_step_seconds": statistics.median(step_seconds) if step_seconds else None,
        "teacher_cached": bool(cache),
        "penalty": penalty_images is not None,
        "steps_done": run.step,
        "planned_steps": run.plan.steps,
        "stopped_by": stopped_by,
        "time_budget": config.time_budget,
        "measured_step_seconds": run.plan.step_seconds,
        "lr_drop_step": run.plan.drop_step,
        "validate_every": run.plan.validate_every,
        "early_stop_rule": EARLY_STOP_RULE if config.early_stop else None,
        "resumed_from_step": start_step if resume is not None else None,
        "seconds_before_resume": run.seconds_before,
        "curve": run.curve,
    }


def _synchronized(device: torch.device) -> float:
    """``time.perf_counter()`` once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


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
