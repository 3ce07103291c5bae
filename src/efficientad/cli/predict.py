"""``efficientad predict``: score images with a trained model; write scores.csv and heat-map overlays."""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict",
        help="score images or folders with a trained model",
        description="Score images with a model file. Writes DIR/scores.csv (path, score, is_anomalous, "
        "local and global scores), DIR/overlays/*.png (heat maps over the images) and DIR/predict.json. "
        "Unreadable files are reported and skipped; the exit code is then 1.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files and/or folders (searched recursively)")
    parser.add_argument("--model", required=True, help="model file written by `efficientad train`")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold (default: the model's own)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--no-overlays", action="store_true", help="write scores only")
    parser.set_defaults(handler=run)


def expand_inputs(inputs: list[str]) -> list[Path]:
    from ..data import list_images

    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        paths.extend(list_images(path, recursive=True) if path.is_dir() else [path])
    return paths


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..data import read_image
    from ..detector import EfficientAD
    from ..errors import EfficientADError
    from ..runlog import write_run_record
    from ..visualize import display_range, overlay

    if args.batch_size < 1:
        raise EfficientADError(f"--batch-size must be >= 1, got {args.batch_size}")
    detector = EfficientAD.load(args.model, device=args.device)
    if args.threshold is not None:
        detector.threshold = args.threshold
    paths = expand_inputs(args.inputs)
    out = Path(args.out)
    overlay_dir = out / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    vmax = display_range(detector.threshold)

    rows, failures, used_names = [], [], set()
    with tqdm(total=len(paths), desc="Predicting", unit="img") as bar:
        for start in range(0, len(paths), args.batch_size):
            readable = []
            for path in paths[start : start + args.batch_size]:
                try:
                    readable.append((path, read_image(path)))
                except EfficientADError as error:
                    failures.append((path, str(error)))
                    tqdm.write(f"skipped: {error}", file=sys.stderr)
            predictions = detector.predict([image for _, image in readable], batch_size=args.batch_size) if readable else []
            for (path, image), prediction in zip(readable, predictions):
                rows.append((path, prediction))
                if not args.no_overlays:
                    name = path.stem
                    while name in used_names:
                        name += "_"
                    used_names.add(name)
                    overlay(image, prediction.anomaly_map, vmax).save(overlay_dir / f"{name}.png")
            bar.update(len(paths[start : start + args.batch_size]))

    with open(out / "scores.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "score", "is_anomalous", "local_score", "global_score"])
        for path, p in rows:
            writer.writerow([str(path), f"{p.score:.6f}", "" if p.is_anomalous is None else int(p.is_anomalous), f"{p.local_score:.6f}", f"{p.global_score:.6f}"])
    anomalous = sum(bool(p.is_anomalous) for _, p in rows)
    write_run_record(
        out / "predict.json",
        {
            "model": str(args.model),
            "threshold": detector.threshold,
            "n_images": len(rows),
            "n_anomalous": anomalous,
            "failed": [{"path": str(path), "error": error} for path, error in failures],
        },
    )
    threshold = "none" if detector.threshold is None else f"{detector.threshold:.4f}"
    print(f"{len(rows)} images scored, {anomalous} anomalous (threshold {threshold}), {len(failures)} unreadable; wrote {out / 'scores.csv'}")
    return 1 if failures else 0
