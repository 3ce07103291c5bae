"""Where int8 loses EfficientAD's accuracy, and what keeps it: a study with NNCF on OpenVINO.

    python benchmarks/int8_study.py --model bottle.pt [--category bottle] [--json benchmarks/results/int8_study.json]

For one trained model it quantises the fused graph (NNCF post-training quantisation, OpenVINO IR)
in several ways and reports, for each, the batch-1 latency, the largest map difference to fp32 and
the image AUROC on the category's test set (read for this report only: every choice below is made
from normal images):

* ``all ops``: NNCF's default scope, which also quantises the map arithmetic after the networks
  (squared differences, means, padding, resize);
* ``networks only``: the map arithmetic kept in float, only the three networks quantised;
* ``sensitivity``: networks only, with one layer (or layer group) at a time kept in float, ranked by
  the score error it leaves on the model's own held-out validation images (normal images only);
* ``accuracy control``: ``nncf.quantize_with_accuracy_control`` with that same defect-free metric
  (1 - mean |score_int8 - score_fp32| on the validation images), reverting layers to float until
  the error is below ``--max-score-error``.

The validation images are the model's own held-out split, rebuilt from its training record (seed
and fraction); calibration uses its training images.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data" / "mvtec_ad"
# Everything that is not one of the three networks: the map arithmetic, which int8 must not touch.
OUTSIDE_NETWORKS = r"^/(?!teacher_trunk|student_trunk|autoencoder|local_head|global_head).*"
LAYERS = {
    "teacher first conv": [r"^/teacher_trunk/teacher_trunk\.0/.*"],
    "teacher middle conv": [r"^/teacher_trunk/teacher_trunk\.3/.*"],
    "teacher last conv": [r"^/teacher_trunk/teacher_trunk\.6/.*"],
    "student first conv": [r"^/student_trunk/student_trunk\.0/.*"],
    "student middle conv": [r"^/student_trunk/student_trunk\.3/.*"],
    "student last conv": [r"^/student_trunk/student_trunk\.6/.*"],
    "local head": [r"^/local_head/.*"],
    "global head": [r"^/global_head/.*"],
    "autoencoder encoder": [r"^/autoencoder/autoencoder\.([0-9]|10)/.*"],
    "autoencoder decoder": [r"^/autoencoder/autoencoder\.(1[1-9]|2[0-9]|3[0-9])/.*"],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model.pt trained on --category")
    parser.add_argument("--data", default=str(SHARED_DATA))
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--format", default="mvtec")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--max-score-error", type=float, default=0.01, help="accuracy control's bound (scores: 0.1 = normal images' rare extreme)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "int8_study.json")
    args = parser.parse_args()

    import nncf
    import openvino as ov

    from efficientad.data.datasets import load_split
    from efficientad.data.images import load_images, split_validation, to_float
    from efficientad.deploy.fused import FusedModel
    from efficientad.deploy.graphs import openvino_model
    from efficientad.deploy.speed import system_info
    from efficientad.evaluation.metrics import image_auroc
    from efficientad.model import load_model

    model, metadata = load_model(args.model)
    config = metadata["config"]
    size = tuple(model.image_size)
    split = load_split(args.format, args.data, args.category)
    if split.validation:
        train, validation = split.train, split.validation
    else:
        train, validation = split_validation(split.train, config["validation_fraction"], config["seed"])
    pick = np.linspace(0, len(train) - 1, min(args.calibration_images, len(train))).round().astype(int)
    calibration = [batch[None] for batch in to_float(load_images([train[i] for i in pick], size)).numpy()]
    held_out = [batch[None] for batch in to_float(load_images(validation, size)).numpy()]
    test = [batch[None] for batch in to_float(load_images([s.path for s in split.test], size)).numpy()]
    labels = split.labels

    core = ov.Core()
    fp32 = openvino_model(FusedModel(model))

    def compiled(graph, hint: str = "f32"):
        return core.compile_model(graph, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": args.threads})

    def scores(runner, images) -> np.ndarray:
        return np.array([float(runner(x)[0][0]) for x in images])

    def maps(runner, images) -> np.ndarray:
        return np.stack([runner(x)[1][0, 0] for x in images])

    def latency_ms(runner) -> float:
        for _ in range(5):
            runner(test[0])
        times = []
        for _ in range(30):
            start = time.perf_counter()
            runner(test[0])
            times.append(time.perf_counter() - start)
        return round(float(np.median(times)) * 1000, 1)

    reference = compiled(fp32)
    reference_validation, reference_test = scores(reference, held_out), scores(reference, test)
    reference_maps = maps(reference, test)

    def report(label: str, graph, seconds: float, hint: str = "f32") -> dict:
        runner = compiled(graph, hint)
        validation_error = np.abs(scores(runner, held_out) - reference_validation)
        test_scores = scores(runner, test)
        row = {
            "variant": label,
            "latency_ms": latency_ms(runner),
            "validation_score_error_mean": round(float(validation_error.mean()), 5),
            "validation_score_error_max": round(float(validation_error.max()), 5),
            "test_max_map_difference": round(float(np.abs(maps(runner, test) - reference_maps).max()), 4),
            "test_image_auroc": round(image_auroc(labels, test_scores), 4),
            "seconds_to_make": round(seconds, 1),
        }
        print(json.dumps(row), flush=True)
        return row

    def quantize(extra_ignored: list[str] | None, networks_only: bool = True):
        patterns = ([OUTSIDE_NETWORKS] if networks_only else []) + (extra_ignored or [])
        scope = nncf.IgnoredScope(patterns=patterns, validate=False) if patterns else None
        return nncf.quantize(fp32, nncf.Dataset(calibration), subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED, ignored_scope=scope)

    rows = [report("fp32", fp32, 0.0), report("bf16 (where native)", fp32, 0.0, "bf16")]
    for label, ignored, networks_only in (("int8, all ops", None, False), ("int8, networks only", None, True)):
        start = time.perf_counter()
        graph = quantize(ignored, networks_only)
        rows.append(report(label, graph, time.perf_counter() - start))
    sensitivity = []
    for layer, patterns in LAYERS.items():
        start = time.perf_counter()
        sensitivity.append({"kept_in_float": layer, **report(f"int8, networks only, {layer} in float", quantize(patterns), time.perf_counter() - start)})

    def agreement(runner, images) -> tuple[float, list[float]]:
        # A metric NNCF can maximise without defect images: 1 - the score error against fp32 per image.
        per_image = [1.0 - abs(float(runner(x)[0][0]) - float(r)) for x, r in zip(images, reference_validation)]
        return float(np.mean(per_image)), per_image

    start = time.perf_counter()
    controlled = nncf.quantize_with_accuracy_control(
        fp32, nncf.Dataset(calibration), nncf.Dataset(held_out), validation_fn=agreement,
        max_drop=args.max_score_error, drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calibration),
        preset=nncf.QuantizationPreset.MIXED, ignored_scope=nncf.IgnoredScope(patterns=[OUTSIDE_NETWORKS], validate=False),
    )
    seconds = time.perf_counter() - start
    rows.append(report(f"int8, accuracy control (score error <= {args.max_score_error})", controlled, seconds))
    rows.append(report(f"int8, accuracy control, float layers in bf16", controlled, seconds, "bf16"))
    kept = sorted(op.get_friendly_name() for op in controlled.get_ordered_ops()
                  if op.get_type_name() == "Convolution" and op.input_value(0).get_node().get_type_name() != "FakeQuantize")

    result = {
        "model": str(args.model),
        "category": args.category,
        "n_calibration_images": len(calibration),
        "n_validation_images": len(held_out),
        "n_test_images": len(test),
        "variants": rows,
        "sensitivity": sorted(sensitivity, key=lambda row: row["validation_score_error_mean"]),
        "accuracy_control_convolutions_kept_in_float": kept,
        "system": system_info(threads=args.threads),
        "nncf": nncf.__version__,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
