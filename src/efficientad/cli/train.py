"""``efficientad train``: fit EfficientAD on a category's good images and write DIR/model.pt."""

from __future__ import annotations

import argparse

from ..choices import DATASET_FORMATS
from .options import add_training_options, show_warnings, training_settings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train on a dataset category's good images",
        description="Train EfficientAD on the good training images of one category. Writes DIR/model.pt "
        "(everything needed to predict) and then DIR/train.json (config, versions, timings, final losses, "
        "skipped images, and the model's tensor SHA-256: a train.json always describes the model.pt beside it).",
    )
    parser.add_argument("--data", required=True, help="dataset root (the folder holding the category folders)")
    parser.add_argument("--category", required=True, help="category folder name, e.g. bottle")
    parser.add_argument("--format", choices=DATASET_FORMATS, default="mvtec", help="dataset layout (default: mvtec)")
    parser.add_argument("--out", required=True, help="output folder")
    add_training_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data.datasets import load_split
    from ..detector import EfficientAD
    from ..files import check_output_folder

    show_warnings()
    out = check_output_folder(args.out)
    detector = EfficientAD(**training_settings(args))
    split = load_split(args.format, args.data, args.category)
    detector.fit(split.train, split.validation)
    model_path = detector.save_run(out, {"data": {"root": str(args.data), "category": args.category, "format": args.format}})
    training = detector.metadata_["training"]
    print(
        f"trained {detector.config.steps:,} steps in {training['train_seconds']:.0f} s "
        f"({training['seconds_per_step']:.3f} s/step); threshold {detector.threshold:.4f}; wrote {model_path}"
    )
    return 0
