"""Options shared by several commands. Defaults come from :mod:`efficientad.config`, never restated here.

Training options default to ``None`` and only what the user set is passed on, so the library's
defaults (the paper's) apply; the help texts show them.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any

from ..choices import INFERENCE_PRECISIONS, MODEL_SIZES, PRECISIONS, SCHEDULES
from ..config import EARLY_STOP_RULE, MEASURED_STEPS, SCHEDULE_SETTINGS, VALIDATION_SHARE, WARMUP_STEPS, TrainConfig, default


def image_size(value: list[int]) -> int | tuple[int, int]:
    """``--image-size N`` or ``H W``; a third value is refused, not ignored."""
    from ..errors import EfficientADError

    if len(value) not in (1, 2):
        raise EfficientADError(f"--image-size takes N or H W, got {len(value)} values: {' '.join(map(str, value))}")
    return value[0] if len(value) == 1 else (value[0], value[1])


def add_device_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")


def add_training_options(parser: argparse.ArgumentParser, steps_help: str | None = None) -> None:
    def shown(name: str) -> str:
        def text(value: Any) -> str:
            return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)

        if name in SCHEDULE_SETTINGS["paper"]:
            return "the schedule's: " + ", ".join(f"{schedule} {text(SCHEDULE_SETTINGS[schedule][name])}" for schedule in SCHEDULES)
        return text(default(TrainConfig, name))

    group = parser.add_argument_group("training (defaults are the paper's)")
    group.add_argument("--model-size", choices=MODEL_SIZES, help=f"EfficientAD-S or -M (default: {shown('model_size')})")
    group.add_argument(
        "--teacher",
        metavar="small|medium|random|PATH",
        help="teacher weights: 'small'/'medium' download the official ones (SHA-256 pinned, cached), "
        "PATH loads a local file (reference, anomalib or `efficientad pretrain` layout), 'random' is "
        "for testing only (default: the official teacher of --model-size)",
    )
    group.add_argument(
        "--penalty-images",
        metavar="DIR",
        help="folder of ImageNet-like images for the student's penalty loss (default: none, the penalty is off)",
    )
    group.add_argument(
        "--schedule",
        choices=SCHEDULES,
        help="paper: the paper's steps, batch size and learning rate; fast: a higher learning rate and far fewer "
        "steps, chosen by measuring image AUROC per CPU-minute (README, 'Training time'); both drop the learning "
        "rate x0.1 at 95%% of the steps "
        f"(default: {default(TrainConfig, 'schedule')}); --steps, --batch-size and --learning-rate override either",
    )
    group.add_argument(
        "--steps", type=int, help=steps_help or f"training steps; with --time-budget, at most this many (default: {shown('steps')})"
    )
    add_time_budget_option(group)
    group.add_argument(
        "--validate-every",
        type=int,
        metavar="N",
        help="steps between the learning curve's points: losses and map spreads on the held-out good images, "
        "in train.json and training_curve.png (default: a twentieth of the planned steps, or fewer "
        f"points where validating would take over {100 * VALIDATION_SHARE:.0f}%% of the training time)",
    )
    group.add_argument(
        "--early-stop",
        action="store_true",
        default=None,
        help="stop when the learning curve has flattened: " + EARLY_STOP_RULE.replace("%", "%%"),
    )
    group.add_argument("--batch-size", type=int, help=f"images per step (default: {shown('batch_size')})")
    group.add_argument("--learning-rate", type=float, help=f"Adam learning rate (default: {shown('learning_rate')})")
    group.add_argument("--image-size", type=int, nargs="+", metavar="N", help=f"N or H W (default: {shown('image_size')})")
    group.add_argument(
        "--precision",
        choices=PRECISIONS,
        help="arithmetic of training, calibration and later prediction; bf16 needs a CPU with native bf16 "
        f"(AVX-512 BF16/AMX) or a GPU, fp16 a GPU (default: {shown('precision')})",
    )
    group.add_argument(
        "--channels-last",
        action="store_true",
        default=None,
        help="channels-last memory layout for the convolutions (faster with bf16 on AVX-512 CPUs)",
    )
    group.add_argument(
        "--skip-bad-images",
        action="store_true",
        default=None,
        help="train on the readable images when some cannot be read (they are named in a warning and "
        "recorded in the model); without it, training stops and lists every unreadable image",
    )
    add_device_option(group)
    group.add_argument("--seed", type=int, help=f"seed for the split, sampling and init (default: {shown('seed')})")
    group.add_argument(
        "--false-positive-rate",
        type=float,
        help="the decision threshold lets this fraction of held-out good images through "
        f"(default: {shown('false_positive_rate')})",
    )


def add_time_budget_option(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--time-budget",
        type=positive(float),
        metavar="MINUTES",
        help="train for this wall-clock time from the start of image loading (teacher statistics count too; "
        f"calibration and saving follow): the step time is measured over the first {WARMUP_STEPS + MEASURED_STEPS} "
        f"steps, which always run, and the learning-rate drop is placed at {100 * default(TrainConfig, 'lr_drop_fraction'):.0f}%% "
        f"of the steps that fit, re-estimated from the latest {MEASURED_STEPS} steps until it comes; "
        "--steps still caps them (default: none, --steps decide)",
    )


def time_budget_seconds(args: argparse.Namespace) -> dict[str, float]:
    """``{"time_budget": seconds}`` for a ``--time-budget`` in minutes, or nothing when it was not given."""

    return {} if args.time_budget is None else {"time_budget": 60.0 * args.time_budget}


TRAINING_OPTIONS = (
    "model_size", "teacher", "penalty_images", "schedule", "steps", "batch_size", "learning_rate",
    "precision", "channels_last", "skip_bad_images", "validate_every", "early_stop", "seed", "false_positive_rate",
)


def training_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The ``TrainConfig`` fields the user set, plus ``device``: ``EfficientAD(**training_settings(args))``."""
    settings = {name: getattr(args, name) for name in TRAINING_OPTIONS if getattr(args, name) is not None}
    if args.image_size is not None:
        settings["image_size"] = image_size(args.image_size)
    return {**settings, **time_budget_seconds(args), "device": args.device}


def show_warnings() -> None:
    """Print library warnings as one visible line each, on a line of their own (not onto a progress bar)."""

    def show(message, category, filename, lineno, file=None, line=None):
        from tqdm import tqdm

        tqdm.write(f"WARNING: {message}", file=sys.stderr)

    warnings.showwarning = show


PRECISION_HELP = (
    "auto: on a CPU, bf16 where it has native bf16 (AVX-512 BF16/AMX), else the model's int8 export "
    "(MODEL.int8.xml beside it, from `efficientad export --precision int8`) if it passed its acceptance "
    "test, else fp32; on a GPU, the precision the model was calibrated in. Or name one (default: %(default)s)"
)


def add_inference_options(parser: argparse.ArgumentParser) -> None:
    """--model, --backend, --precision, --device and --batch-size of the commands that score images."""
    from ..choices import BACKENDS
    from ..config import PREDICT_BATCH_SIZE

    parser.add_argument("--model", required=True, help="model file written by `efficientad train`, or an export of one")
    parser.add_argument(
        "--backend", choices=BACKENDS, help="runtime for a model.pt (default: torch; an export runs on its own runtime)"
    )
    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto", help=PRECISION_HELP)
    add_device_option(parser)
    parser.add_argument("--batch-size", type=int, default=PREDICT_BATCH_SIZE, help="images per forward pass (default: %(default)s)")


def load_inferencer(args: argparse.Namespace):
    """The :class:`~efficientad.deploy.inferencer.Inferencer` that ``add_inference_options`` describes."""
    from ..deploy.inferencer import Inferencer
    from ..errors import EfficientADError

    if args.batch_size < 1:
        raise EfficientADError(f"--batch-size must be >= 1, got {args.batch_size}")
    inferencer = Inferencer.load(args.model, backend=args.backend, precision=args.precision, device=args.device)
    say_precision(inferencer)
    return inferencer


def say_precision(inferencer) -> None:
    """Name the precision an inferencer runs in, and why when it was chosen."""
    print(f"precision: {inferencer.reason or inferencer.precision}", file=sys.stderr, flush=True)


def positive(cast: type[int] | type[float], allow_zero: bool = False):
    """An argparse ``type`` that reads a number with ``cast`` and refuses negatives and, unless ``allow_zero``, zero."""

    def parse(text: str) -> int | float:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (value >= 0 if allow_zero else value > 0):
            raise argparse.ArgumentTypeError(f"must be {'>=' if allow_zero else '>'} 0, got {text}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type in its own messages
    return parse
