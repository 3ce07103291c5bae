"""``efficientad train``: fit EfficientAD on a category's good images and write DIR/model.pt."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..choices import DATASET_FORMATS
from ..config import TrainConfig, default
from .options import add_training_options, show_warnings, training_settings

DEFAULT_FORMAT = "mvtec"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train on a dataset category's good images",
        description="Train EfficientAD on the good training images of one category. Writes DIR/model.pt "
        "(everything needed to predict), DIR/training_curve.png (losses on the held-out good images "
        "against steps) and then DIR/train.json (config, versions, timings, the learning curve, planned and "
        "done steps and why training stopped, skipped images, and the model's tensor SHA-256: a train.json "
        "always describes the model.pt beside it). While it trains, DIR/checkpoint.pt holds the run "
        "(removed when it finishes): `efficientad train --resume DIR` continues a run that was stopped.",
    )
    parser.add_argument("--data", help="dataset root (the folder holding the category folders)")
    parser.add_argument("--category", help="category folder name, e.g. bottle")
    parser.add_argument(
        "--layout", "--format", dest="format", choices=DATASET_FORMATS,
        help=f"dataset layout, as export's --layout (default: {DEFAULT_FORMAT})",
    )  # fmt: skip
    parser.add_argument("--out", help="output folder")
    parser.add_argument(
        "--checkpoint-every",
        type=float,
        metavar="MINUTES",
        help="save the run to OUT/checkpoint.pt this often, so that a killed run loses at most this much; "
        f"0: never (default: {default(TrainConfig, 'checkpoint_every') / 60:g})",
    )
    parser.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run stopped in DIR from DIR/checkpoint.pt, with its settings and data (bit for bit "
        "on the same machine); --data, --category and --layout name the same images elsewhere, --device "
        "another device; other training options are refused. A time budget counts the stopped run's time too",
    )
    add_training_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import EfficientADError

    show_warnings()
    given = {"root": args.data and str(args.data), "category": args.category, "format": args.format}
    settings = training_settings(args)
    if args.checkpoint_every is not None:
        if args.checkpoint_every < 0:
            raise EfficientADError(f"--checkpoint-every must be minutes >= 0, got {args.checkpoint_every:g}")
        settings["checkpoint_every"] = 60.0 * args.checkpoint_every
    if args.resume is None:
        _train(*_new_run(args, settings, given), resume=False)
    else:
        _train(*_resumed_run(args, settings, given), resume=True)
    return 0


def _new_run(args: argparse.Namespace, settings: dict, given: dict):
    """The detector, data and output folder of a new run."""
    from ..detector import EfficientAD
    from ..errors import EfficientADError
    from ..files import check_output_folder
    from ..training.checkpoint import CHECKPOINT_NAME

    missing = [flag for flag, value in (("--data", args.data), ("--category", args.category), ("--out", args.out)) if not value]
    if missing:
        raise EfficientADError(f"{', '.join(missing)} required (or --resume DIR, to continue a stopped run)")
    out = check_output_folder(args.out)
    if (out / CHECKPOINT_NAME).exists():
        print(
            f"NOTE: {out / CHECKPOINT_NAME} holds a stopped run (`efficientad train --resume {out}` continues it); "
            "this new run replaces it",
            file=sys.stderr,
        )
    return EfficientAD(**settings), {**given, "format": args.format or DEFAULT_FORMAT}, out


def _resumed_run(args: argparse.Namespace, settings: dict, given: dict):
    """The detector, data and output folder of the run stopped in ``--resume DIR``."""
    from ..detector import EfficientAD
    from ..errors import EfficientADError
    from ..files import check_output_folder
    from ..training.checkpoint import CHECKPOINT_NAME, read_checkpoint

    refused = [f"--{name.replace('_', '-')}" for name in settings if name != "device"] + (["--out"] if args.out else [])
    if refused:
        raise EfficientADError(f"--resume continues with the settings of its checkpoint: drop {', '.join(refused)}")
    checkpoint = Path(args.resume) / CHECKPOINT_NAME
    saved = read_checkpoint(checkpoint)["notes"]["data"]
    out = check_output_folder(args.resume)
    data = {key: value or saved[key] for key, value in given.items()}
    return EfficientAD.from_checkpoint(checkpoint, device=args.device), data, out


def _train(detector, data: dict[str, str], out: Path, resume: bool) -> None:
    from ..data.datasets import load_split
    from ..training.checkpoint import CHECKPOINT_NAME
    from ..config import STOP_REASONS

    checkpoint = out / CHECKPOINT_NAME
    split = load_split(data["format"], data["root"], data["category"])
    detector.fit(split.train, split.validation, checkpoint=checkpoint, resume=resume, checkpoint_notes={"data": data})
    model_path = detector.save_run(out, {"data": data})
    # The model and its record supersede the checkpoint; left behind, it would let --resume redo a finished run.
    checkpoint.unlink(missing_ok=True)
    training = detector.metadata_["training"]
    print(
        f"trained {training['steps_done']:,} steps ({STOP_REASONS[training['stopped_by']]}) in "
        f"{training['train_seconds']:.0f} s ({training['seconds_per_step']:.3f} s/step); threshold {detector.threshold:.4f}; "
        f"wrote {model_path}"
    )
