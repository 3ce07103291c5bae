"""``efficientad eval``: official metrics of a trained model on a dataset's test split, with an HTML report."""

from __future__ import annotations

import argparse

from ..choices import DATASET_FORMATS
from .options import add_inference_options, load_inferencer

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
        "(one self-contained page) and, last, DIR/eval.json, which marks a finished run. Only test images "
        "are read; the model's own threshold is used as is.",
    )
    parser.add_argument("--data", required=True, help="dataset root (the folder holding the category folders)")
    parser.add_argument("--category", required=True, help="category folder name, e.g. bottle")
    parser.add_argument(
        "--layout", "--format", dest="format", choices=DATASET_FORMATS, default="mvtec",
        help="dataset layout, as train's (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder")
    add_inference_options(parser)
    parser.add_argument("--no-maps", action="store_true", help="do not write the anomaly maps as TIFF files")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..data.datasets import load_split
    from ..deploy.speed import system_info
    from ..evaluation.evaluate import evaluate
    from ..files import check_output_folder, write_run_record

    out = check_output_folder(args.out, subfolders=("anomaly_maps",))
    split = load_split(args.format, args.data, args.category)
    detector = load_inferencer(args)
    (out / "eval.json").unlink(missing_ok=True)  # the record of a finished evaluation, written last
    metrics = evaluate(detector, split, out, write_maps=not args.no_maps, batch_size=args.batch_size)
    write_run_record(
        out / "eval.json",
        {
            "model": str(args.model),
            "precision": detector.precision,
            "precision_choice": detector.reason or None,
            "data": {"root": str(args.data), "category": args.category, "format": args.format},
            "metrics": metrics,
            # The machine's kernels decide the arithmetic (int8 without VNNI differs), so the figures name it.
            "system": system_info(),
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
