"""``efficientad eval``: official metrics of a trained model on a dataset's test split, with an HTML report."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import FORMATS

SUMMARY_KEYS = (
    ("image_auroc", "image AUROC"),
    ("pixel_auroc", "pixel AUROC"),
    ("au_pro", "AU-PRO"),
    ("f1_max", "F1-max"),
    ("au_spro", "AU-sPRO"),
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="measure a trained model on a dataset category's test images",
        description="Score the test images of one category with a model file and compute image AUROC, "
        "F1-max, pixel AUROC and AU-PRO (and AU-sPRO for MVTec LOCO AD) at the ground truth's resolution. "
        "Writes DIR/metrics.json, DIR/scores.csv, DIR/anomaly_maps/<type>/<name>.tiff, DIR/report.html "
        "(one self-contained page) and DIR/eval.json. Only test images are read; the model's own "
        "threshold is used as is.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="model file written by `efficientad train`")
    parser.add_argument("--data", required=True, help="dataset root (the folder holding the category folders)")
    parser.add_argument("--category", required=True, help="category folder name, e.g. bottle")
    parser.add_argument("--format", choices=FORMATS, default="mvtec", help="dataset layout")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--no-maps", action="store_true", help="do not write the anomaly maps as TIFF files")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..datasets import load_split
    from ..detector import EfficientAD
    from ..errors import EfficientADError
    from ..evaluate import evaluate
    from ..runlog import write_run_record

    if args.batch_size < 1:
        raise EfficientADError(f"--batch-size must be >= 1, got {args.batch_size}")
    split = load_split(args.format, args.data, args.category)
    detector = EfficientAD.load(args.model, device=args.device)
    out = Path(args.out)
    metrics = evaluate(detector, split, out, write_maps=not args.no_maps, batch_size=args.batch_size)
    write_run_record(
        out / "eval.json",
        {
            "model": str(args.model),
            "data": {"root": str(args.data), "category": args.category, "format": args.format},
            "metrics": metrics,
        },
    )
    summary = ", ".join(
        f"{name} {metrics[key]:.3f}" for key, name in SUMMARY_KEYS if metrics.get(key) is not None
    )
    print(f"{args.category} ({metrics['n_good']} good, {metrics['n_defective']} defective test images): {summary}")
    note = metrics["pixel_level"]["note"]
    skipped = len(metrics["pixel_level"]["skipped_without_mask"])
    if note:
        print(f"NOTE: {note}")
    if skipped:
        print(f"NOTE: {skipped} defective images without a mask are left out of pixel metrics")
    print(f"metrics: {out / 'metrics.json'}\nreport:  {out / 'report.html'}")
    return 0
