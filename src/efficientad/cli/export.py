"""``efficientad export``: write a trained model as ONNX, TorchScript or OpenVINO IR, or as int8 OpenVINO IR."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..choices import DATASET_FORMATS, EXPORT_FORMATS, EXPORT_PRECISIONS, INPUT_DTYPES
from ..config import INT8_CALIBRATION_IMAGES, INT8_MAX_AU_PRO_DROP, INT8_MAX_AUROC_DROP, INT8_MAX_SCORE_ERROR, INT8_MAX_SPREAD_CHANGE, QAT_LEARNING_RATE
from .options import positive


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a trained model to ONNX, TorchScript or OpenVINO (also int8)",
        description="Export the whole inference path (normalisation, networks, maps, resize, score) of a model "
        "file. The exported file embeds the image size, input dtype and threshold; load it with "
        "efficientad.Inferencer (or serve it with `efficientad serve --model FILE`). Input: 'images' (N, 3, H, W) RGB; outputs: score (N,), anomaly_map, "
        "local_map, global_map (N, 1, h, w), see --output-size. "
        "--precision int8 quantises the networks with NNCF (OpenVINO IR), keeping in float the layers that "
        "accuracy needs, judged on the model's held-out good images against synthetic defects pasted into them "
        "(image AUROC and AU-PRO against fp32; --data/--category: the data it was trained on; no defect images "
        "are used). It measures the map "
        "quantiles and threshold again on the int8 model, writes MODEL.int8.xml beside the model by default "
        "(where `--precision auto` finds it) and its calibration record as .json beside it. It takes a few minutes.",
    )
    parser.add_argument("--model", required=True, help="model file written by `efficientad train`")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default=None, help="export format (required for fp32; int8 is always openvino)")
    parser.add_argument("--out", default=None, help="output file (OpenVINO: NAME.xml, with NAME.bin beside it); int8 default: MODEL.int8.xml beside --model")
    parser.add_argument("--precision", choices=EXPORT_PRECISIONS, default="fp32", help="fp32 (any format) or int8 (OpenVINO) (default: %(default)s)")
    parser.add_argument("--threshold", type=float, default=None, help="decision threshold to embed (default: the model's own; int8: measured on the int8 model)")
    parser.add_argument(
        "--input-dtype",
        choices=INPUT_DTYPES,
        default="float32",
        help="float32 (default) takes images in [0, 1]; uint8 takes raw bytes and folds the /255 into the graph (fp32 only)",
    )
    parser.add_argument("--output-size", type=int, nargs=2, default=None, metavar=("H", "W"), help="size of the map outputs (default: the padded feature grid, 64x64 for 256x256 images, which a bilinear resize "
        "to the image's size turns into the reference's map; the score is always taken at the model's image size; fp32 only)")
    int8 = parser.add_argument_group("int8 (--precision int8)")
    int8.add_argument("--data", default=None, help="dataset root the model was trained on")
    int8.add_argument("--category", default=None, help="category folder name under --data")
    int8.add_argument("--layout", choices=DATASET_FORMATS, default="mvtec", help="dataset layout of --data, as train's (default: %(default)s)")
    int8.add_argument("--calibration-images", type=positive(int), default=INT8_CALIBRATION_IMAGES, help="training images that set the int8 ranges (default: %(default)s)")
    int8.add_argument(
        "--max-auroc-drop", type=positive(float), default=INT8_MAX_AUROC_DROP,
        help="acceptance test: how much lower than fp32's the image AUROC of the held-out good images against "
        "their synthetic defects may be (default: %(default)s)",
    )
    int8.add_argument(
        "--max-au-pro-drop", type=positive(float), default=INT8_MAX_AU_PRO_DROP,
        help="acceptance test: the same for the AU-PRO of the synthetic defects' masks (default: %(default)s)",
    )
    int8.add_argument(
        "--max-score-error", type=positive(float), default=INT8_MAX_SCORE_ERROR,
        help="acceptance test: largest mean score difference to fp32 of the held-out good images, on which the "
        "threshold is measured (0.1 is a good image's rare extreme) (default: %(default)s)",
    )
    int8.add_argument(
        "--max-spread-change", type=positive(float), default=INT8_MAX_SPREAD_CHANGE,
        help="acceptance test: how much (relative) each map's quantile spread on the held-out good images may "
        "change; it weighs the teacher-student and autoencoder maps in the combined one (default: %(default)s)",
    )
    int8.add_argument(
        "--qat-steps", type=positive(int, allow_zero=True), default=0,
        help="first fine-tune the student and autoencoder for this many steps on the training images with int8 "
        "rounding simulated, towards the model's own fp32 maps (quantisation-aware training; a step costs about "
        "2.5 training steps), then quantise them; the model file is not changed. With full-range weights 200 passed "
        "where post-training quantisation alone failed; with today's half-range weights post-training passed alone on bottle "
        "and 200 steps failed (README, 'Precision') (default: %(default)s, off)",
    )
    int8.add_argument("--qat-learning-rate", type=positive(float), default=QAT_LEARNING_RATE, help="its learning rate (default: %(default)g)")
    int8.add_argument(
        "--penalty-images", metavar="DIR", default=None,
        help="its penalty images (default: the folder the model was trained with, if it is there; else no penalty)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import EfficientADError
    from ..files import check_output_folder

    if args.precision == "int8":
        return run_int8(args)
    if args.format is None:
        raise EfficientADError("--format is required (onnx, torchscript or openvino)")
    if args.out is None:
        raise EfficientADError("--out is required for an fp32 export")
    if args.data is not None or args.category is not None or args.qat_steps or args.penalty_images is not None:
        raise EfficientADError("--data, --category, --qat-steps and --penalty-images are for --precision int8")
    from ..deploy.formats import export_model

    check_output_folder(Path(args.out).parent)
    path = export_model(
        args.model,
        args.format,
        args.out,
        threshold=args.threshold,
        output_size=None if args.output_size is None else tuple(args.output_size),
        input_dtype=args.input_dtype,
    )
    print(f"wrote {path} (checked: it reproduces the model's scores)")
    return 0


def run_int8(args: argparse.Namespace) -> int:
    from ..errors import EfficientADError
    from ..files import check_output_folder, write_run_record

    if args.format not in (None, "openvino"):
        raise EfficientADError("int8 models are written as OpenVINO IR: use --format openvino (or leave it out)")
    if args.data is None or args.category is None:
        raise EfficientADError("--precision int8 needs --data and --category: the data the model was trained on")
    if args.input_dtype != "float32" or args.output_size is not None:
        raise EfficientADError("--input-dtype uint8 and --output-size are for fp32 exports")
    from ..deploy.formats import export_int8
    from ..deploy.inferencer import int8_path
    from ..deploy.quantize import quantization_images, require_nncf
    from ..model import load_model

    require_nncf()
    out = Path(args.out) if args.out is not None else int8_path(args.model)
    check_output_folder(out.parent)
    model, metadata = load_model(args.model)
    calibration, validation = quantization_images(metadata, args.data, args.category, args.layout, args.calibration_images)
    fine_tuned = quantization_aware_fine_tuning(args, model, metadata, calibration) if args.qat_steps else None
    print(f"quantising with {len(calibration)} calibration and {len(validation)} held-out images (a few minutes)", file=sys.stderr)
    path, record = export_int8(
        model, out, calibration, validation, threshold=args.threshold, model_metadata=metadata,
        max_auroc_drop=args.max_auroc_drop, max_au_pro_drop=args.max_au_pro_drop, max_score_error=args.max_score_error,
        max_spread_change=args.max_spread_change, fine_tuned=fine_tuned, on_trial=print_trial,
    )  # fmt: skip
    record_path = path.with_suffix(".json")
    write_run_record(record_path, {"model": str(args.model), "model_tensor_sha256": metadata.get("tensor_sha256"), "out": str(path), "data": str(Path(args.data) / args.category), **record})
    acceptance = record["acceptance"]
    fp32, int8 = acceptance["fp32"], acceptance["int8"]
    kept = ", ".join(record["kept_in_float"]) or "none"
    print(
        f"wrote {path} and {record_path.name}: layers kept in float: {kept} ({len(record['float_convolutions'])} of "
        f"{record['n_convolutions']} convolutions); held-out vs synthetic defects, fp32 -> int8: image AUROC "
        f"{fp32['image_auroc']:.4f} -> {int8['image_auroc']:.4f}, AU-PRO {fp32['au_pro']:.4f} -> {int8['au_pro']:.4f}; "
        f"held-out score error {int8['validation_score_error_mean']:.4f}, map spreads {int8['map_spread_change']['local']:+.0%} "
        f"(local) {int8['map_spread_change']['global']:+.0%} (global); acceptance test (drops <= {acceptance['max_image_auroc_drop']} "
        f"and {acceptance['max_au_pro_drop']}, error <= {acceptance['max_score_error']}, spreads within "
        f"{acceptance['max_map_spread_change']:.0%}) {'passed' if record['accepted'] else 'FAILED'}; "
        f"threshold {record['threshold']:.4f}; {record['seconds']:.0f} s"
    )
    if not record["accepted"]:
        advice = "" if args.qat_steps else "; --qat-steps 200 fine-tunes the networks for int8 first"
        print(
            "no int8 quantisation passed the acceptance test; written is the one closest to passing. Precision 'auto' "
            "will not use it (fp32 instead); '--precision int8' still runs it, and looser --max-* bounds accept it "
            f"knowingly{advice}",
            file=sys.stderr,
        )
    return 0


def print_trial(trial: dict) -> None:
    """One line per quantisation tried, as it is measured: what stayed float, the acceptance figures, the verdict."""
    kept = ", ".join(trial["kept_in_float"]) or "nothing"
    spreads = trial["map_spread_change"]
    verdict = "passed" if trial["passed"] else f"failed (shortfall {trial['shortfall']:.2f})"
    print(
        f"  in float: {kept}: image AUROC drop {trial['image_auroc_drop']:+.4f}, AU-PRO drop {trial['au_pro_drop']:+.4f}, "
        f"score error {trial['validation_score_error_mean']:.4f}, map spreads {spreads['local']:+.0%} / {spreads['global']:+.0%}: "
        f"{verdict}",
        file=sys.stderr,
    )


def quantization_aware_fine_tuning(args: argparse.Namespace, model, metadata: dict, calibration):
    """``--qat-steps``: the model's networks fine-tuned under int8 rounding, on its own training images and penalty images."""
    from ..data.images import load_images
    from ..deploy.quantize import held_out_split
    from ..training.penalty import PenaltyImages
    from ..training.quantization_aware import fine_tune_for_int8

    config = metadata.get("config") or {}
    penalty_folder = args.penalty_images or config.get("penalty_images")
    if args.penalty_images is None and penalty_folder is not None and not Path(penalty_folder).is_dir():
        print(f"note: the model's penalty images ({penalty_folder}) are not here; fine-tuning without the penalty (--penalty-images DIR gives them)", file=sys.stderr)
        penalty_folder = None
    train_paths, _ = held_out_split(metadata, args.data, args.category, args.layout)
    images = load_images(train_paths, tuple(model.image_size), progress=True, desc="Loading training images")
    penalty = None if penalty_folder is None else PenaltyImages(penalty_folder, tuple(model.image_size))
    seconds_per_step = (metadata.get("training") or {}).get("median_step_seconds")
    # A step runs three images through the fp32 and the rounded networks: 2.5 training steps on a 2-core Xeon.
    estimate = f" (about {args.qat_steps * seconds_per_step * 2.5 / 60:.0f} min, from the model's training steps)" if seconds_per_step else ""
    print(f"quantisation-aware fine-tuning: {args.qat_steps} steps{estimate}", file=sys.stderr)
    return fine_tune_for_int8(
        model, images, calibration, steps=args.qat_steps, learning_rate=args.qat_learning_rate, penalty_images=penalty, seed=config.get("seed", 0)
    )
