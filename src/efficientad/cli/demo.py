"""``efficientad demo``: the whole method end to end on a generated inspection set, on the CPU, in minutes."""

from __future__ import annotations

import argparse

from ..choices import PRECISIONS, SCHEDULES
from .options import positive

# The demo's wall time on a 2-core CPU without native bf16 (fp32), the slowest it is meant for, is to
# stay within 3 minutes: loading and training get this budget; start-up, generating the images,
# scoring and overlays took another 0.5 minute on a slow 2-core Xeon (README, "Set up").
DEMO_TIME_BUDGET_MINUTES = 2.3
DEMO_SCHEDULE = "fast"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="generate a synthetic inspection set, train briefly, report image AUROC",
        description="Generate a synthetic inspection set (textured parts; test parts with drawn scratches "
        "and stains, with masks), train EfficientAD-S on its good images for a few minutes on the CPU, "
        "score the test set and write overlays. Uses the official teacher when it is cached or can be "
        "downloaded, else --teacher PATH, else a random teacher (lower accuracy, said so).",
    )
    parser.add_argument("--out", default="efficientad-demo", help="output folder (default: %(default)s)")
    parser.add_argument(
        "--time-budget", type=positive(float), default=DEMO_TIME_BUDGET_MINUTES, metavar="MINUTES",
        help="wall-clock minutes for loading and training; scoring the test set and drawing overlays follow "
        "(default: %(default)g)",
    )  # fmt: skip
    parser.add_argument("--steps", type=positive(int), default=None, help="at most this many steps (default: the schedule's)")
    parser.add_argument(
        "--schedule", choices=SCHEDULES, default=DEMO_SCHEDULE,
        help="training schedule, see `efficientad train --help` (default: %(default)s)",
    )  # fmt: skip
    parser.add_argument("--teacher", default=None, metavar="PATH|small|random", help="teacher (default: official if reachable)")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="training precision (default: bf16 with channels-last where the CPU has native bf16, else fp32)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for data and training (default: %(default)s)")
    parser.set_defaults(handler=run)


def choose_teacher(requested: str | None) -> str:
    from ..errors import EfficientADError
    from ..training.teacher import fetch_official

    if requested is not None:
        return requested
    try:
        return str(fetch_official("small"))
    except EfficientADError as error:
        print(f"NOTE: {error}")
        print("NOTE: continuing with a RANDOM teacher: the demo still works, but accuracy is lower than with a pretrained one.")
        return "random"


def run(args: argparse.Namespace) -> int:
    import time
    import warnings

    from ..data.datasets import load_split
    from ..data.images import read_image
    from ..data.synthetic import make_dataset
    from ..detector import EfficientAD
    from ..device import channels_last_is_faster, cpu_supports_bf16, resolve_device
    from ..evaluation.metrics import image_auroc
    from ..files import atomic_write, check_output_folder, write_run_record
    from ..training.curves import plot_training_curve
    from ..config import STOP_REASONS
    from ..visualize import display_range, heat_map

    started = time.perf_counter()
    out = check_output_folder(args.out, subfolders=("overlays",))
    (out / "demo.json").unlink(missing_ok=True)  # the record of a finished demo, written last
    category_dir = make_dataset(out / "data", seed=args.seed)
    print(f"generated a synthetic inspection set in {category_dir}")
    split = load_split("mvtec", category_dir.parent, category_dir.name)
    teacher = choose_teacher(args.teacher)
    precision = args.precision or ("bf16" if args.device == "cpu" and cpu_supports_bf16() else "fp32")
    channels_last = channels_last_is_faster(precision, resolve_device(args.device))
    steps = {} if args.steps is None else {"steps": args.steps}
    detector = EfficientAD(
        teacher=teacher, schedule=args.schedule, precision=precision, channels_last=channels_last,
        device=args.device, seed=args.seed, time_budget=60.0 * args.time_budget, **steps,
    )
    config = detector.config
    print(
        f"time budget: {args.time_budget:g} min for loading and training ({config.schedule} schedule: batch {config.batch_size}, "
        f"learning rate {config.learning_rate:g}, at most {config.steps:,} steps; {precision}{' channels-last' if channels_last else ''} on {args.device})"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-teacher case was announced above
        detector.fit(split.train, split.validation)
    model_path = detector.save(out / "model.pt")
    training = detector.metadata_["training"]
    plot_training_curve(training, out / "training_curve.png")

    predictions = detector.predict([sample.path for sample in split.test])
    labels = [sample.label for sample in split.test]
    scores = [p.score for p in predictions]
    auroc = image_auroc(labels, scores)
    overlay_dir = out / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)
    vmax = display_range(detector.threshold)
    for sample, prediction in zip(split.test, predictions):
        atomic_write(
            overlay_dir / f"{sample.defect_type}_{sample.path.stem}.png",
            lambda temporary: heat_map(read_image(sample.path), prediction, vmax).save(temporary, format="PNG"),
        )
    flagged = sum(bool(p.is_anomalous) for p in predictions)
    wall_seconds = time.perf_counter() - started
    write_run_record(
        out / "demo.json",
        {
            "teacher": detector.metadata_["teacher_source"],
            "config": detector.config.as_dict(),
            "training": detector.metadata_["training"],
            "metrics": {"image_auroc": auroc},
            "n_test": len(labels),
            "n_flagged": flagged,
            "wall_seconds": wall_seconds,
        },
    )
    print(
        f"trained {training['steps_done']:,} steps in {training['total_seconds']:.0f} s "
        f"({STOP_REASONS[training['stopped_by']]}; learning curve: {out / 'training_curve.png'})"
    )
    print(f"image AUROC on {len(labels)} test images: {auroc:.3f} (1.0 = perfect, 0.5 = chance)")
    print(f"{flagged} of {len(labels)} test images flagged anomalous at threshold {detector.threshold:.4f}")
    print(f"model: {model_path}\noverlays: {overlay_dir}/")
    print(f"demo done in {wall_seconds / 60:.1f} min")
    return 0
