"""Does `efficientad pretrain` give a useful teacher within a wall-clock budget?

Distils a PDN-small from the offline ResNet-18 (stem..layer3) on the ImageNet samples for
``--budget`` seconds, then trains EfficientAD-S on MVTec AD bottle for ``--train-steps`` steps with
that teacher, with a random teacher and with the shared ResNet-18 teacher, and reports each one's
image AUROC. Paths default to ``../shared`` beside the repository.

    python benchmarks/pretrain_teacher.py --budget 3600 --train-steps 1000 --bf16 \
        --train-precision bf16 --channels-last --work-dir runs/pretrain --json pretrain.json

``--reuse-teacher runs/pretrain/teacher.pth --seed 1`` repeats the comparison with another training
seed without distilling again.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from efficientad.choices import PRETRAIN_PRECISIONS
from efficientad.data.datasets import load_split
from efficientad.detector import EfficientAD
from efficientad.evaluation.metrics import image_auroc
from efficientad.files import versions
from efficientad.training.pretrain import pretrain_teacher

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=3600, help="pretraining wall-clock seconds")
    parser.add_argument("--train-steps", type=int, required=True, help="EfficientAD training steps per teacher")
    parser.add_argument("--json", required=True, help="where to write the results")
    parser.add_argument("--images", default=str(SHARED / "data" / "imagenet_samples"), help="distillation images")
    parser.add_argument(
        "--backbone-weights",
        default=str(SHARED / "weights" / "resnet18-imagenet-layers1to3.pth"),
        help="resnet18 state_dict up to layer3",
    )
    parser.add_argument("--shared-teacher", default=str(SHARED / "weights" / "teacher_small_r18.pth"))
    parser.add_argument("--mvtec", default=str(SHARED / "data" / "mvtec_ad"), help="MVTec AD root")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--batch-size", type=int, default=8, help="pretraining batch size")
    parser.add_argument("--normalization-images", type=int, default=256, help="samples for the target statistics")
    parser.add_argument("--validate-every", type=int, default=100)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast while pretraining")
    parser.add_argument(
        "--train-precision",
        choices=PRETRAIN_PRECISIONS,
        default="fp32",
        help="EfficientAD training precision, the same for all three teachers",
    )
    parser.add_argument("--channels-last", action="store_true", help="channels-last EfficientAD training")
    parser.add_argument("--seed", type=int, default=0, help="EfficientAD training seed, the same for all three teachers")
    parser.add_argument(
        "--reuse-teacher",
        default=None,
        help="skip pretraining and compare this teacher (written by an earlier run) instead",
    )
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--work-dir", default=None, help="keep the teacher here (default: a temporary folder)")
    return parser.parse_args()


def evaluate(teacher: str, split, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    detector = EfficientAD(
        model_size="s",
        teacher=teacher,
        steps=args.train_steps,
        precision=args.train_precision,
        channels_last=args.channels_last,
        seed=args.seed,
        device=args.device,
        progress=False,
    )
    detector.fit(split.train)
    fitted = time.perf_counter()
    scores = [prediction.score for prediction in detector.predict([sample.path for sample in split.test])]
    return {
        "image_auroc": image_auroc(split.labels, scores),
        "fit_seconds": fitted - started,
        "predict_seconds": time.perf_counter() - fitted,
    }


def main() -> None:
    args = parse_args()
    split = load_split("mvtec", args.mvtec, args.category)
    with tempfile.TemporaryDirectory() as temporary:
        if args.reuse_teacher:
            out = Path(args.reuse_teacher)
            pretraining = {"reused": str(out)}
        else:
            out = Path(args.work_dir or temporary) / "teacher.pth"
            pretrained = pretrain_teacher(
                args.images,
                out,
                backbone="resnet18",
                backbone_weights=args.backbone_weights,
                model_size="s",
                # The paper's count: on a CPU the budget ends the run long before it.
                steps=60_000,
                batch_size=args.batch_size,
                normalization_images=args.normalization_images,
                validate_every=args.validate_every,
                checkpoint_every=0,
                time_budget=args.budget,
                device=args.device,
                precision="bf16" if args.bf16 else "fp32",
                workers=args.workers,
            )
            pretraining = {
                "steps": pretrained.steps,
                "seconds": pretrained.seconds,
                "validation_loss": pretrained.validation_loss,
                "losses": pretrained.losses,
            }
        report = {
            "benchmark": "pretrain_teacher",
            "args": vars(args),
            "pretraining": pretraining,
            "category": args.category,
            "train_steps": args.train_steps,
            "seed": args.seed,
            "results": {},
            "versions": versions(),
        }
        results = report["results"]
        for name, teacher in (
            ("pretrained", str(out)),
            ("random", "random"),
            ("shared_teacher_small_r18", args.shared_teacher),
        ):
            results[name] = evaluate(teacher, split, args)
            # Written after every teacher so that an interrupted run keeps the hour of pretraining.
            Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    for name, result in results.items():
        print(f"{name:>26}: image AUROC {result['image_auroc']:.4f} ({result['fit_seconds']:.0f} s to fit)")


if __name__ == "__main__":
    main()
