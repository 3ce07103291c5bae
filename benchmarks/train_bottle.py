"""Train EfficientAD-S on MVTec AD bottle with the shared offline teacher; report image AUROC and speed.

    python benchmarks/train_bottle.py --steps 1000 [--precision bf16] [--json out.json] [--save-model m.pt]

Uses ../shared (beside the repo): data/mvtec_ad/bottle, weights/teacher_small_r18.pth and
data/imagenet_samples for the penalty. That teacher is far weaker than the paper's WideResNet-101
distillate, so compare settings with it, not absolute numbers with the paper.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from efficientad.choices import PRECISIONS

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-penalty", action="store_true", help="train without the ImageNet penalty")
    parser.add_argument("--teacher", default=str(SHARED / "weights" / "teacher_small_r18.pth"))
    parser.add_argument("--data", default=str(SHARED / "data" / "mvtec_ad"))
    parser.add_argument("--json", default=None, help="where to write the result (default: print only)")
    parser.add_argument("--save-model", default=None, help="also save the trained model file here")
    args = parser.parse_args(argv)

    from efficientad.data.datasets import load_split
    from efficientad.detector import EfficientAD
    from efficientad.evaluation.metrics import image_auroc
    from efficientad.deploy.speed import system_info
    from efficientad.files import write_run_record

    if not Path(args.data, "bottle").is_dir():
        print(f"skipped: {Path(args.data, 'bottle')} not found (needs ../shared beside the repo)")
        return 0
    split = load_split("mvtec", args.data, "bottle")
    penalty = None if args.no_penalty else str(SHARED / "data" / "imagenet_samples")
    detector = EfficientAD(
        teacher=args.teacher, steps=args.steps, precision=args.precision, device=args.device, seed=args.seed, penalty_images=penalty
    )
    started = time.perf_counter()
    detector.fit(split.train, split.validation)
    predictions = detector.predict([s.path for s in split.test])
    result = {
        "benchmark": "train_bottle",
        "steps": args.steps,
        "precision": args.precision,
        "device": args.device,
        "penalty": penalty is not None,
        "teacher": args.teacher,
        "image_auroc": image_auroc([s.label for s in split.test], [p.score for p in predictions]),
        "seconds_per_step": detector.metadata_["training"]["seconds_per_step"],
        "median_step_seconds": detector.metadata_["training"]["median_step_seconds"],
        "total_seconds": time.perf_counter() - started,
        "final_losses": detector.metadata_["training"]["final_losses"],
        "system": system_info(args.device),
    }
    if args.save_model:
        detector.save(args.save_model)
    print(json.dumps(result, indent=2))
    if args.json:
        write_run_record(args.json, result)  # adds the command line and package versions
    return 0


if __name__ == "__main__":
    sys.exit(main())
