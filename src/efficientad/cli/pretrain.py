"""``efficientad pretrain``: distil a teacher PDN from a torchvision backbone."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..choices import BACKBONES, MODEL_SIZES, PRETRAIN_PRECISIONS
from ..config import PretrainConfig, default

# The share and minimum are STATISTICS_BUDGET_SHARE and MIN_STATISTICS_SAMPLES of training.pretrain,
# not imported: that would load torch for `--help`.
TIME_BUDGET_HELP = (
    "stop after this wall-clock time, target-statistics pass included; that pass stops at a quarter of it "
    "(after at least 64 samples), training at its end (default: none)"
)
# (flag, PretrainConfig field, type, metavar, help); each help gets the field's default appended
# unless the field's default is None, whose meaning the help says itself.
SETTINGS = (
    ("--model-size", "model_size", str, None, "PDN size of the teacher"),
    ("--steps", "steps", int, "N", "optimisation steps"),
    ("--batch-size", "batch_size", int, "N", "images per step"),
    ("--learning-rate", "learning_rate", float, "LR", "Adam learning rate"),
    ("--weight-decay", "weight_decay", float, "WD", "Adam weight decay"),
    ("--grayscale", "grayscale", float, "P", "probability of a grayscale sample"),
    ("--image-size", "image_size", int, "N", "PDN input side; the backbone sees twice that"),
    ("--normalization-images", "normalization_images", int, "N", "samples measuring the target's mean/std"),
    ("--validation-images", "validation_images", int, "N", "images held out, at most"),
    ("--validate-every", "validate_every", int, "N", "steps between validations"),
    ("--checkpoint-every", "checkpoint_every", int, "N", "steps between saves of OUT.ckpt (0: none)"),
    ("--time-budget", "time_budget", float, "SECONDS", TIME_BUDGET_HELP),
    ("--precision", "precision", str, None, "fp32, or bf16 autocast for the forward passes"),
    ("--workers", "workers", int, "N", "image loading processes (default: CPUs-1, at most 8)"),
    ("--seed", "seed", int, "N", "seed for the split, sampling, augmentation and init"),
)
CHOICES = {"model_size": MODEL_SIZES, "precision": PRETRAIN_PRECISIONS}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` sub-command."""
    parser = subparsers.add_parser(
        "pretrain",
        help="distil a teacher network from a pretrained backbone",
        description=(
            "Teacher pretraining as in the EfficientAD paper: a PDN learns to reproduce a backbone's "
            "layer2+layer3 patch features (at twice its input size) on the images of a folder. "
            "Writes OUT (a teacher for `efficientad train --teacher OUT`), OUT.ckpt and pretrain.json. "
            "Before the target-statistics pass it prints how long that pass and training will take here."
        ),
    )
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
    parser.add_argument("--out", required=True, metavar="PATH", help="teacher file to write, e.g. teacher.pth")
    parser.add_argument(
        "--backbone", choices=list(BACKBONES), help=f"torchvision backbone (default: {default(PretrainConfig, 'backbone')})"
    )
    parser.add_argument(
        "--backbone-weights",
        required=True,
        metavar="PATH|imagenet",
        help="torchvision state_dict of the backbone (layers after layer3 may be missing), "
        "or 'imagenet' to download torchvision's weights",
    )
    for flag, name, kind, metavar, text in SETTINGS:
        parser.add_argument(
            flag, dest=name, type=kind, metavar=metavar, choices=CHOICES.get(name),
            help=text if default(PretrainConfig, name) is None else f"{text} (default: {default(PretrainConfig, name)})",
        )
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument(
        "--stats-cache",
        metavar="DIR",
        help="folder caching the target statistics, reused by runs with the same backbone, weights, training "
        "images (paths, sizes, times), image size, grayscale, seed and precision; a run asking for more samples "
        "continues from a shorter (or budget-cut) pass (default: target_stats in $EFFICIENTAD_CACHE, else "
        "~/.cache/efficientad)",
    )
    cache.add_argument(
        "--no-stats-cache", action="store_true", help="always measure the target statistics and cache nothing"
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def _statistics_origin(statistics: dict) -> str:
    """Where the target statistics of a run came from, in words, from its ``target_statistics`` record."""
    source, samples = statistics["source"], statistics.get("samples")
    if source == "checkpoint":
        return "target statistics from the checkpoint"
    if statistics["stopped_by"] == "time_budget":
        samples = f"{samples} (of {statistics['requested']}: time budget)"
    if source == "reused":
        return f"target statistics of {samples} samples reused from {statistics['reused_from']}"
    continued = ""
    if source == "continued":
        continued = f", continuing {statistics['reused_samples']} from {statistics['reused_from']}"
    cached = f", cached in {statistics['saved_to']}" if statistics["saved_to"] else ""
    return f"target statistics measured on {samples} samples{continued}{cached}"


def run(args: argparse.Namespace) -> int:
    """Run ``efficientad pretrain`` with parsed arguments; returns the exit code."""
    from ..files import check_output_folder
    from ..training.pretrain import pretrain_teacher

    check_output_folder(Path(args.out).parent)
    names = ("backbone", "backbone_weights", *(name for _, name, *_ in SETTINGS))
    settings = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    stats_cache = False if args.no_stats_cache else args.stats_cache or True
    result = pretrain_teacher(
        args.images, args.out, device=args.device, resume=args.resume, progress=not args.quiet, stats_cache=stats_cache,
        **settings,
    )  # fmt: skip
    stopped = " (time budget reached)" if result.stopped_by == "time_budget" else ""
    print(
        f"wrote {result.out}: {result.steps} steps{stopped}, validation loss {result.validation_loss:.4f}, "
        f"{result.seconds:.0f} s; {_statistics_origin(result.target_statistics)}"
    )
    return 0
