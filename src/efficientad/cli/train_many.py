"""``efficientad train-many``: train (and evaluate) every row of a manifest as Ray tasks."""

from __future__ import annotations

import argparse
import textwrap
from dataclasses import fields

from ..choices import DATASET_FORMATS
from ..config import TrainConfig
from .options import add_training_options, positive, show_warnings, training_settings

DESCRIPTION = f"""\
Train one EfficientAD model per manifest row, each as a Ray task: on this machine (a local Ray is
started), or unchanged on a Ray cluster with --address or $RAY_ADDRESS. Every row is checked before
anything starts, and all problems are reported at once with their row numbers (from 1, header not
counted). Each row writes DIR/NAME/model.pt and train.json and, where its data has a test split with
good and defective images, DIR/NAME/metrics.json (as `efficientad eval` computes it). DIR/results.csv
and DIR/results.md list every row: status (done, skipped, failed, cancelled), seconds, image AUROC,
AU-PRO, threshold, Ray node, error; DIR/train_many.json, the run record, comes last.

A rerun skips the rows that finished (model.pt, a train.json with its checksum and the row's config,
and metrics.json where due); a failing row is reported and does not stop the others (exit code 1);
Ctrl-C cancels the rows still running and keeps what finished. Teacher weights and penalty images
are loaded once and shared through Ray's object store.

manifest columns (CSV with a header, or a YAML list of mappings):
  name        output folder DIR/NAME (letters, digits, . _ -), unique
  data        dataset root; relative paths are relative to the manifest's folder
  category    category folder name, e.g. bottle
  format      dataset layout: {', '.join(DATASET_FORMATS)} (default: mvtec)
  any other   a training setting for this row, by its TrainConfig name (empty cells keep the options
              below, else the paper's defaults; image_size is N or HxW):
{textwrap.fill(', '.join(f.name for f in fields(TrainConfig)), 100, initial_indent=' ' * 14, subsequent_indent=' ' * 14)}

example (runs.csv):
  name,data,category,format,steps,model_size,teacher
  bottle,mvtec_ad,bottle,mvtec,70000,s,small
  fryum,visa,fryum,visa,70000,m,medium
  bottle_quick,mvtec_ad,bottle,mvtec,1000,s,teacher_small_r18.pth

  efficientad train-many runs.csv --out runs --penalty-images imagenet_samples
  efficientad train-many runs.csv --out runs --address ray://head:10001 --device cuda

On a cluster, every node needs efficientad installed and the data at the same paths; the output
folder and the teacher and penalty files are read and written only where this command runs.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-many",
        help="train many models from a manifest (CSV/YAML), in parallel on Ray (this machine or a cluster)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", metavar="MANIFEST", help="CSV or YAML file, one row per model (columns above)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: DIR/NAME per row, results files")
    parser.add_argument(
        "--address",
        help="Ray cluster to run on, e.g. ray://head:10001 (Ray Client) or auto "
        "(default: $RAY_ADDRESS, else a local Ray on this machine)",
    )
    parser.add_argument(
        "--cpus-per-model",
        type=positive(int),
        metavar="N",
        help="CPU cores, and so torch threads, per row; with --device cuda each row takes one GPU and N cores "
        "(default: the cluster's cores / the rows to train, at most one node's; 1 with --device cuda)",
    )
    add_training_options(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..fleet import train_many
    from ..fleet.results import counts

    show_warnings()
    settings = training_settings(args)
    device = settings.pop("device")
    results = train_many(
        args.manifest, args.out, settings=settings, device=device, address=args.address, cpus_per_model=args.cpus_per_model
    )
    summary = counts(results)
    print(f"{len(results)} rows: {', '.join(f'{n} {status}' for status, n in summary.items())}; wrote {args.out}/results.md")
    return 1 if summary.get("failed") else 0
