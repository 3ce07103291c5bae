"""Options shared by the commands that train (train, demo, benchmark)."""

from __future__ import annotations

import argparse
import warnings
from typing import Any

FORMATS = ("mvtec", "loco", "visa", "folder")


def add_training_options(parser: argparse.ArgumentParser, steps: int = 70_000) -> None:
    group = parser.add_argument_group("training (defaults are the paper's)")
    group.add_argument("--model-size", choices=("s", "m"), default="s", help="EfficientAD-S or -M (default: s)")
    group.add_argument(
        "--teacher",
        default=None,
        metavar="small|medium|random|PATH",
        help="teacher weights: 'small'/'medium' download the official ones (SHA-256 pinned, cached), "
        "PATH loads a local file (reference, anomalib or `efficientad pretrain` layout), 'random' is "
        "for testing only. Default: the official teacher of --model-size",
    )
    group.add_argument(
        "--penalty-images",
        default=None,
        metavar="DIR",
        help="folder of ImageNet-like images for the student's penalty loss; without it the penalty is off",
    )
    group.add_argument("--steps", type=int, default=steps, help=f"training steps (default: {steps:,})")
    group.add_argument("--batch-size", type=int, default=1, help="images per step (default: 1)")
    group.add_argument("--image-size", type=int, nargs="+", default=[256], metavar="N", help="N or H W (default: 256)")
    group.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="(default: fp32)")
    group.add_argument(
        "--channels-last",
        action="store_true",
        help="channels-last memory layout for the convolutions (faster with bf16 on AVX-512 CPUs)",
    )
    group.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    group.add_argument("--seed", type=int, default=0, help="seed for the split, sampling and init (default: 0)")
    group.add_argument(
        "--false-positive-rate",
        type=float,
        default=0.01,
        help="the default decision threshold lets this fraction of held-out good images through (default: 0.01)",
    )


def detector_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    image_size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size[:2])
    return {
        "model_size": args.model_size,
        "image_size": image_size,
        "teacher": args.teacher,
        "penalty_images": args.penalty_images,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "channels_last": args.channels_last,
        "device": args.device,
        "seed": args.seed,
        "false_positive_rate": args.false_positive_rate,
    }


def show_warnings() -> None:
    """Print library warnings as one visible line each, not as Python's two-line source dump."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"WARNING: {message}", flush=True)

    warnings.showwarning = show
