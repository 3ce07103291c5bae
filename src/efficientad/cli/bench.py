"""``efficientad bench``: inference latency and throughput of one backend and precision."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..choices import BACKEND_PRECISIONS, BACKENDS, MODEL_SIZES
from ..config import BENCH_BATCH_SIZE, BENCH_RUNS, BENCH_WARMUP, TrainConfig, default
from .options import add_device_option, image_size


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="measure inference latency/throughput of a backend and precision",
        description="Latency at batch 1 (median and p90 over --runs after --warmup) and throughput at "
        "--batch-size, the paper's protocol, for the whole path (normalisation to score and maps). Without "
        "--model the weights are random (speed does not depend on them). With --data and --category "
        "(and --model) it also measures the accuracy change against float32 PyTorch on that test set. "
        "The process CPU time and load average are recorded beside wall times, to spot a busy machine.",
    )
    parser.add_argument(
        "--model-size", choices=MODEL_SIZES, default=default(TrainConfig, "model_size"), help="EfficientAD-S or -M, without --model (default: %(default)s)"
    )
    parser.add_argument("--model", default=None, help="model file, or an export of one (an int8 one too) (default: random weights)")
    parser.add_argument(
        "--image-size", type=int, nargs="+", default=list(default(TrainConfig, "image_size")), metavar="N", help="N or H W, without --model (default: %(default)s)"
    )
    parser.add_argument("--backend", choices=BACKENDS, default=BACKENDS[0], help="(default: %(default)s)")
    parser.add_argument(
        "--precision",
        choices=["auto", *sorted({p for precisions in BACKEND_PRECISIONS.values() for p in precisions})],
        default="auto",
        help="auto: what predict and serve would run (bf16 where native, else the model's accepted int8 export, "
        "else fp32). torch: fp32, bf16, fp16 (CUDA); onnxruntime: fp32, int8; openvino: all four. The int8 of a "
        "model.pt here quantises every convolution without accuracy control (calibrated on --data's training "
        "images), to measure speed: it cost 5-8 image AUROC points on MVTec AD bottle; the int8 that keeps "
        "accuracy is `efficientad export --precision int8` (default: %(default)s)",
    )
    add_device_option(parser)
    parser.add_argument("--batch-size", type=int, default=BENCH_BATCH_SIZE, help="batch size of the throughput measurement (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=BENCH_RUNS, help="timed batch-1 forwards (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=BENCH_WARMUP, help="untimed forwards first (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: every usable core)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the torch backend (minutes to compile)")
    parser.add_argument("--cuda-graphs", action="store_true", help="replay CUDA graphs (torch backend on CUDA)")
    parser.add_argument("--data", default=None, metavar="ROOT", help="MVTec AD style dataset root, for accuracy and int8 calibration")
    parser.add_argument("--category", default=None, help="category under --data")
    parser.add_argument("--json", default=None, metavar="OUT", help="write the result as JSON here")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..config import parse_image_size
    from ..deploy.speed import bench, load_calibration_set, load_test_set
    from ..errors import EfficientADError
    from ..model import load_model

    if (args.data is None) != (args.category is None):
        raise EfficientADError("--data and --category go together")
    if args.data is not None and args.model is None:
        raise EfficientADError("accuracy on --data needs a trained --model")
    size = parse_image_size(image_size(args.image_size))
    calibration, test_set = [], None
    if args.data is not None:
        from ..deploy.formats import detect_format

        if detect_format(args.model) == "native":
            size = load_model(args.model)[0].image_size
        if args.precision == "int8":
            calibration = load_calibration_set(args.data, args.category, size)
        images, labels, _ = load_test_set(args.data, args.category, size)
        test_set = (images, labels)
    result = bench(
        args.model_size,
        args.model,
        args.backend,
        args.precision,
        args.device,
        args.batch_size,
        args.runs,
        args.warmup,
        args.compile,
        args.threads,
        size,
        calibration,
        test_set,
        cuda_graphs=args.cuda_graphs,
    )
    if test_set is not None:
        result["accuracy"]["data"] = str(Path(args.data) / args.category)
    latency, throughput = result["latency_batch1"], result["throughput"]
    if result["precision_choice"]:
        print(f"precision: {result['precision_choice']}")
    print(
        f"{result['backend']} {result['precision']} ({result['effective_precision']}) on {args.device}, {result['system']['threads']} threads: "
        f"batch 1 median {latency['median_ms']:.1f} ms, p90 {latency['p90_ms']:.1f} ms; "
        f"batch {throughput['batch_size']}: {throughput['images_per_s']:.1f} images/s"
    )
    if "accuracy" in result:
        accuracy = result["accuracy"]
        print(
            f"accuracy vs fp32: image AUROC {accuracy['image_auroc']:.4f} ({accuracy['image_auroc_change']:+.4f}), "
            f"max |map diff| {accuracy['max_abs_diff_anomaly_map']:.2e}"
        )
    if args.json is not None:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
