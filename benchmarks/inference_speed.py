"""Inference speed of every backend and precision on this machine, and their accuracy on real data.

    python benchmarks/inference_speed.py --model bottle.pt            # writes benchmarks/results/inference_cpu.json

Each configuration is timed with ``efficientad.deploy.speed`` (batch-1 latency: median/p90 over --runs;
throughput at --batch-size). With --model, every configuration also scores the test images of
--category and reports its image AUROC and its largest score/map differences to float32 PyTorch.
The summary names the fastest configuration whose AUROC stays within --auroc-tolerance of float32.
Close other work first: the JSON records load averages and CPU times so a busy run can be told apart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

from efficientad.choices import MODEL_SIZES

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "mvtec_ad"
CPU_CONFIGS = (
    "torch:fp32",
    "torch:bf16",
    "onnxruntime:fp32",
    "onnxruntime:int8",
    "openvino:fp32",
    "openvino:bf16",
    "openvino:int8",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="trained model file (default: random weights, timing only)")
    parser.add_argument("--model-size", choices=MODEL_SIZES, default="s", help="without --model")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="MVTec AD root (default: %(default)s)")
    parser.add_argument("--category", default="bottle")
    parser.add_argument("--configs", default=",".join(CPU_CONFIGS), help="comma-separated BACKEND:PRECISION[:compile] (default: %(default)s)")
    parser.add_argument("--compile", action="store_true", help="also time torch:bf16 with torch.compile (minutes to compile)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="default: every usable core")
    parser.add_argument("--auroc-tolerance", type=float, default=0.005)
    parser.add_argument("--target-ms", type=float, default=125.0, help="latency goal reported in the summary")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "inference_cpu.json"))
    return parser.parse_args(argv)


def summarize(results: list[dict], tolerance: float, target_ms: float) -> dict:
    """The fastest configuration overall and the fastest that keeps the AUROC within ``tolerance``."""
    timed = [r for r in results if "latency_batch1" in r]
    if not timed:
        return {}

    def label(result: dict) -> str:
        return f"{result['backend']}:{result['precision']}" + (":compile" if result.get("compile") else "")

    fastest = min(timed, key=lambda r: r["latency_batch1"]["median_ms"])
    summary = {"fastest": label(fastest), "fastest_median_ms": fastest["latency_batch1"]["median_ms"]}
    accurate = [r for r in timed if "accuracy" in r and abs(r["accuracy"]["image_auroc_change"]) <= tolerance]
    if accurate:
        best = min(accurate, key=lambda r: r["latency_batch1"]["median_ms"])
        summary.update(
            fastest_within_auroc_tolerance=label(best),
            its_median_ms=best["latency_batch1"]["median_ms"],
            its_image_auroc_change=best["accuracy"]["image_auroc_change"],
            meets_target=best["latency_batch1"]["median_ms"] <= target_ms,
        )
    summary.update(auroc_tolerance=tolerance, target_ms=target_ms)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from efficientad.deploy.speed import bench, load_calibration_set, load_test_set, run_all, system_info
    from efficientad.deploy.fused import FusedModel
    from efficientad.deploy.runtimes import TorchSession
    from efficientad.device import default_threads
    from efficientad.model import load_model

    threads = args.threads or default_threads()
    configs = [c for c in args.configs.split(",") if c]
    if args.compile:
        configs.append("torch:bf16:compile")
    test_set = reference = None
    calibration = []
    if args.model is not None:
        model, _ = load_model(args.model)
        root = Path(args.data)
        print(f"loading {root / args.category} test images ...", flush=True)
        images, labels, _ = load_test_set(root, args.category, model.image_size)
        test_set = (images, labels)
        calibration = load_calibration_set(root, args.category, model.image_size)
        print("float32 reference outputs ...", flush=True)
        reference = run_all(TorchSession(FusedModel(model), threads=threads), images)

    results = []
    for config in configs:
        backend, precision, *flags = config.split(":")
        print(f"== {config}", flush=True)
        started = time.perf_counter()
        try:
            result = bench(
                args.model_size,
                args.model,
                backend,
                precision,
                args.device,
                args.batch_size,
                args.runs,
                args.warmup,
                compile="compile" in flags,
                threads=threads,
                calibration=calibration,
                test_set=test_set,
                reference=reference,
            )
        except Exception as error:  # one failing backend (missing package, unsupported op) must not end the run
            print(f"   failed: {error}", flush=True)
            results.append({"config": config, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()})
            continue
        result.pop("system")
        result["config"] = config
        result["seconds"] = time.perf_counter() - started
        latency = result["latency_batch1"]
        line = f"   median {latency['median_ms']:.1f} ms (p90 {latency['p90_ms']:.1f}, cpu {latency['cpu_median_ms']:.1f}), {result['throughput']['images_per_s']:.2f} img/s"
        if "accuracy" in result:
            accuracy = result["accuracy"]
            line += f"; AUROC {accuracy['image_auroc']:.4f} ({accuracy['image_auroc_change']:+.4f}), max |map diff| {accuracy['max_abs_diff_anomaly_map']:.2e}"
        print(line, flush=True)
        results.append(result)

    output = {
        "command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": args.model,
        "data": None if args.model is None else str(Path(args.data) / args.category),
        "system": system_info(args.device, threads),
        "settings": {"runs": args.runs, "warmup": args.warmup, "batch_size": args.batch_size},
        "summary": summarize(results, args.auroc_tolerance, args.target_ms),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps(output["summary"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
