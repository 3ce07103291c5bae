"""``efficientad train``: fit EfficientAD on a category's good images and write DIR/model.pt."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import FORMATS, add_training_options, detector_kwargs, show_warnings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train on a dataset category's good images",
        description="Train EfficientAD on the good training images of one category. Writes DIR/model.pt "
        "(everything needed to predict) and DIR/train.json (config, versions, timings, final losses).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", required=True, help="dataset root (the folder holding the category folders)")
    parser.add_argument("--category", required=True, help="category folder name, e.g. bottle")
    parser.add_argument("--format", choices=FORMATS, default="mvtec", help="dataset layout")
    parser.add_argument("--out", required=True, help="output folder")
    add_training_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..datasets import load_split
    from ..detector import EfficientAD
    from ..runlog import write_run_record

    show_warnings()
    split = load_split(args.format, args.data, args.category)
    detector = EfficientAD(**detector_kwargs(args))
    detector.fit(split.train, split.validation)
    out = Path(args.out)
    model_path = detector.save(out / "model.pt")
    meta = detector.metadata_
    write_run_record(
        out / "train.json",
        {
            "data": {"root": str(args.data), "category": args.category, "format": args.format},
            **{key: meta[key] for key in ("config", "teacher_source", "threshold", "n_train_images", "n_validation_images", "training", "calibration")},
            "model_file": str(model_path),
        },
    )
    training = meta["training"]
    print(
        f"trained {args.steps} steps in {training['train_seconds']:.0f} s "
        f"({training['seconds_per_step']:.3f} s/step); threshold {detector.threshold:.4f}; wrote {model_path}"
    )
    return 0
