"""``efficientad predict``: score images with a trained model; write scores.csv and heat-map overlays."""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from .options import add_inference_options, load_inferencer

COLUMNS = ("path", "score", "is_anomalous", "local_score", "global_score", "overlay")
THRESHOLD_HELP = (
    "decision threshold on the image score (default: the model's own, the score that 1%% of its held-out "
    "good validation images exceed, or the --false-positive-rate chosen at training)"
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="score images or folders with a trained model",
        description="Score images with a model file. Writes DIR/scores.csv (path, score, is_anomalous, "
        "local and global scores, overlay file), DIR/overlays/*.png (heat maps over the images) and "
        "DIR/predict.json. Unreadable files and empty folders are reported and skipped; the exit code is then 1. "
        "Rows go to DIR/scores.partial.csv as images are scored, which becomes DIR/scores.csv at the end; "
        "predict.json, written last, marks a finished run. So an interrupted run leaves scores.partial.csv "
        "with the rows it scored, whole overlays, and no scores.csv or predict.json of an earlier run.",
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threshold", type=float, default=None, help=THRESHOLD_HELP)
    add_inference_options(parser)
    parser.add_argument("--no-overlays", action="store_true", help="write scores only")
    parser.set_defaults(handler=run)


def expand_inputs(inputs: list[str], exclude: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """(image, overlay name) pairs for every input, and (input, error) for folders without images.

    Overlays mirror each image's path below the folder it was found in, so ``test/crack/000.png`` and
    ``test/good/000.png`` stay apart; the output folder itself is never searched (re-runs).
    """
    from ..data.images import list_images
    from ..errors import EfficientADError

    exclude = exclude.resolve()
    found, failures = [], []
    for item in inputs:
        path = Path(item)
        if not path.is_dir():
            found.append((path, Path(path.stem)))
            continue
        try:
            images = [p for p in list_images(path, recursive=True) if exclude not in p.resolve().parents]
        except EfficientADError as error:
            failures.append((item, str(error)))
            continue
        found.extend((image, Path(path.name) / image.relative_to(path).with_suffix("")) for image in images)
    return found, failures


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data.images import read_image
    from ..errors import EfficientADError
    from ..files import atomic_write, atomic_write_text, check_output_folder, write_run_record
    from ..visualize import display_range, heat_map

    out = check_output_folder(args.out, subfolders=("overlays",))
    detector = load_inferencer(args)
    if args.threshold is not None:
        detector.threshold = args.threshold
    items, failures = expand_inputs(args.inputs, out)
    for item, error in failures:
        print(f"skipped: {error}", file=sys.stderr)
    vmax = display_range(detector.threshold)

    # The earlier run's results go before any overlay changes: what is left then belongs to this run.
    for name in ("predict.json", "scores.csv"):
        (out / name).unlink(missing_ok=True)
    partial = out / "scores.partial.csv"
    atomic_write_text(partial, ",".join(COLUMNS) + "\r\n")  # never an empty file, not even for a moment
    n_scored = n_anomalous = 0
    used_names: set[Path] = set()
    # Rows are written as they come, so an interrupted run keeps what it scored.
    with open(partial, "a", newline="") as file, tqdm(total=len(items), desc="Predicting", unit="img") as bar:
        writer = csv.writer(file)
        for start in range(0, len(items), args.batch_size):
            batch = items[start : start + args.batch_size]
            readable = []
            for path, name in batch:
                try:
                    readable.append((path, name, read_image(path)))
                except EfficientADError as error:
                    failures.append((str(path), str(error)))
                    tqdm.write(f"skipped: {error}", file=sys.stderr)
            predictions = detector.predict([image for _, _, image in readable], batch_size=args.batch_size) if readable else []
            for (path, name, image), p in zip(readable, predictions):
                overlay_file = ""
                if not args.no_overlays:
                    while name in used_names:
                        name = name.with_name(name.name + "_")
                    used_names.add(name)
                    target = out / "overlays" / name.with_suffix(".png")
                    atomic_write(target, lambda temporary: heat_map(image, p, vmax).save(temporary, format="PNG"))
                    overlay_file = str(target.relative_to(out))
                flag = "" if p.is_anomalous is None else int(p.is_anomalous)
                writer.writerow([str(path), f"{p.score:.6f}", flag, f"{p.local_score:.6f}", f"{p.global_score:.6f}", overlay_file])
                n_scored += 1
                n_anomalous += bool(p.is_anomalous)
            file.flush()
            bar.update(len(batch))
    os.replace(partial, out / "scores.csv")

    write_run_record(
        out / "predict.json",
        {
            "model": str(args.model),
            "precision": detector.precision,
            "precision_choice": detector.reason or None,
            "threshold": detector.threshold,
            "n_images": n_scored,
            "n_anomalous": n_anomalous,
            "failed": [{"input": str(item), "error": error} for item, error in failures],
        },
    )
    threshold = "none" if detector.threshold is None else f"{detector.threshold:.4f}"
    print(
        f"{n_scored} images scored, {n_anomalous} anomalous (threshold {threshold}), "
        f"{len(failures)} skipped; wrote {out / 'scores.csv'}"
    )
    return 1 if failures else 0
