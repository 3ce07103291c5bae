"""``efficientad benchmark``: train and evaluate every category of a collection; compare with the paper."""

from __future__ import annotations

import argparse
import signal

from ..choices import COLLECTIONS
from .options import add_training_options, show_warnings, training_settings


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "benchmark",
        help="train and evaluate every category of MVTec AD, MVTec LOCO AD or VisA; compare with the paper",
        description="Train and evaluate each category of a dataset collection in turn, each in a fresh "
        "process, and write OUT/results.json, OUT/results.md (our numbers beside the published ones) and "
        "OUT/auroc.png. Each category's model, metrics and log go to OUT/CATEGORY/. Resumable: categories "
        "with a finished OUT/CATEGORY/metrics.json are skipped unless --force. A failing category is "
        "reported and the others still run; the exit code is 1 when any failed.",
    )
    parser.add_argument(
        "--collection",
        required=True,
        choices=tuple(COLLECTIONS),
        help="mvtec_ad, loco (MVTec LOCO AD) and visa (raw layout, ROOT/split_csv/1cls.csv) have published "
        "results; folder runs every sub-folder of --root in the folder layout",
    )
    parser.add_argument("--root", required=True, help="folder holding the category folders")
    parser.add_argument(
        "--categories",
        default=None,
        metavar="A,B,...",
        help="comma-separated categories; none given: every category of the collection found under --root",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--force", action="store_true", help="retrain categories that finished earlier")
    parser.add_argument(
        "--write-maps",
        action="store_true",
        help="also write every test image's anomaly map as TIFF (gigabytes for a whole collection)",
    )
    parser.add_argument("--no-report", action="store_true", help="skip each category's report.html")
    add_training_options(parser)
    parser.set_defaults(handler=run)


def _stop(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    from ..collection.runner import run_benchmark

    show_warnings()
    # A scheduler's or `timeout`'s SIGTERM then unwinds like Ctrl-C, which stops the running category.
    signal.signal(signal.SIGTERM, _stop)
    results = run_benchmark(
        args.collection,
        args.root,
        args.out,
        training_settings(args),
        categories=None if args.categories is None else args.categories.split(","),
        force=args.force,
        write_maps=args.write_maps,
        write_report=not args.no_report,
        log=lambda line: print(line, flush=True),
    )
    counts = results["counts"]
    image_auroc = results["mean"]["image_auroc"]
    print(
        f"{counts['done'] + counts['resumed']} of {counts['total']} categories finished, {counts['failed']} failed"
        + ("" if image_auroc is None else f"; mean image AUROC {100 * image_auroc:.1f}")
        + f"; wrote {args.out}/results.md"
    )
    return 1 if counts["failed"] else 0
