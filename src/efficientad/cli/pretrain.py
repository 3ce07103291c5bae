"""``efficientad pretrain``: distil a teacher PDN from a torchvision backbone."""

from __future__ import annotations

import argparse

from ..backbones import BACKBONES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` sub-command."""
    parser = subparsers.add_parser(
        "pretrain",
        help="distil a teacher network from a pretrained backbone",
        description=(
            "Teacher pretraining as in the EfficientAD paper: a PDN learns to reproduce a backbone's "
            "layer2+layer3 patch features (at twice its input size) on the images of a folder. "
            "Writes OUT (a teacher for `efficientad train --teacher OUT`), OUT.ckpt and pretrain.json."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--images", required=True, metavar="DIR", help="folder of images, searched recursively")
    parser.add_argument("--out", required=True, metavar="PATH", help="teacher file to write, e.g. teacher.pth")
    parser.add_argument("--backbone", default="wide_resnet101_2", choices=list(BACKBONES), help="torchvision backbone")
    parser.add_argument(
        "--backbone-weights",
        required=True,
        metavar="PATH|imagenet",
        help="torchvision state_dict of the backbone (layers after layer3 may be missing), "
        "or 'imagenet' to download torchvision's weights",
    )
    parser.add_argument("--model-size", default="s", choices=["s", "m"], help="PDN size of the teacher")
    parser.add_argument("--steps", type=int, default=60_000, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    parser.add_argument("--weight-decay", type=float, default=1e-5, help="Adam weight decay")
    parser.add_argument("--grayscale", type=float, default=0.1, metavar="P", help="probability of a grayscale sample")
    parser.add_argument("--image-size", type=int, default=256, help="PDN input side; the backbone sees twice that")
    parser.add_argument(
        "--normalization-images", type=int, default=10_000, metavar="N", help="samples measuring the target's mean/std"
    )
    parser.add_argument("--validation-images", type=int, default=32, metavar="N", help="images held out, at most")
    parser.add_argument("--validate-every", type=int, default=1000, metavar="N", help="steps between validations")
    parser.add_argument(
        "--checkpoint-every", type=int, default=1000, metavar="N", help="steps between saves of OUT.ckpt (0: none)"
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    parser.add_argument(
        "--time-budget", type=float, default=None, metavar="SECONDS", help="stop after this wall-clock time"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed for the split, sampling, augmentation and init")
    parser.add_argument("--device", default=None, help="cpu or cuda; None: cuda when available")
    parser.add_argument("--bf16", action="store_true", help="run forward passes under bfloat16 autocast")
    parser.add_argument("--workers", type=int, default=None, help="image loading processes; None: CPUs-1, max 8")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``efficientad pretrain`` with parsed arguments; returns the exit code."""
    from ..pretrain import pretrain_teacher

    result = pretrain_teacher(
        args.images,
        args.out,
        backbone=args.backbone,
        backbone_weights=args.backbone_weights,
        model_size=args.model_size,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        grayscale=args.grayscale,
        image_size=args.image_size,
        normalization_images=args.normalization_images,
        validation_images=args.validation_images,
        validate_every=args.validate_every,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        time_budget=args.time_budget,
        seed=args.seed,
        device=args.device,
        bf16=args.bf16,
        workers=args.workers,
        progress=not args.quiet,
    )
    stopped = " (time budget reached)" if result.stopped_by == "time_budget" else ""
    print(
        f"wrote {result.out}: {result.steps} steps{stopped}, validation loss {result.validation_loss:.4f}, "
        f"{result.seconds:.0f} s"
    )
    return 0
