"""Accuracy and speed of every precision x runtime, int8 included, for trained models: one table.

    python benchmarks/precision_table.py --model bottle=runs/bottle_s0/model.pt --model bottle=runs/bottle_s1/model.pt \\
        --model fryum=runs/fryum_s0/model.pt --model fryum=runs/fryum_s1/model.pt --avx2 [--json benchmarks/results/precision_table.json]

For each model (trained on ../shared's MVTec AD bottle or VisA fryum) it makes the int8 export that
``efficientad export --precision int8`` makes (or reuses MODEL.int8.xml beside it when it was made
from that model by this version's export), then scores the category's test set with every runtime
and precision:

* torch fp32 / bf16, ONNX Runtime fp32, OpenVINO fp32 / bf16: the model file as ``predict`` runs it;
* OpenVINO int8: the int8 export (networks int8, the layers its acceptance test needed and the map
  arithmetic float);
* ONNX Runtime int8: ONNX Runtime's static quantisation (QDQ, per-channel weights) of every
  convolution of the same graph as the export's (teacher and student heads apart), without
  accuracy control; torch int8 and ONNX Runtime bf16 do not exist on the CPU and are listed as such.

Image AUROC and AU-PRO (maps at the model's 256x256, the test masks resized to it) come from the test
set, which decides nothing here: the export's choices are made on normal images only. Speed:
batch-1 latency and batch-8 throughput, measured in interleaved rounds (every session once per
round, in turn), so that ratios between sessions are not skewed by the machine's drift. With
``--avx2`` a child process limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``: no AVX-512, VNNI, bf16 or
AMX kernels) repeats the OpenVINO and torch timings and the int8 export's test-set accuracy (AVX2
int8 kernels round differently: vpmaddubsw saturates), an estimate for AVX2-only CPUs. When anomalib
is importable, its EfficientAD-S exported to OpenVINO (fp32, as anomalib exports it) is timed in
the same rounds. The report goes beside the JSON as NAME.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
CATEGORIES = {"bottle": ("mvtec", SHARED / "mvtec_ad"), "fryum": ("visa", SHARED / "visa")}
MISSING = {
    ("torch", "int8"): "PyTorch has no int8 CPU path for these convolutions outside torch.compile/ao; use OpenVINO",
    ("onnxruntime", "bf16"): "ONNX Runtime's CPU provider has no bf16 convolutions",
}
CELLS = [("torch", "fp32"), ("torch", "bf16"), ("torch", "int8"), ("onnxruntime", "fp32"), ("onnxruntime", "bf16"),
         ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]  # fmt: skip
ANOMALIB = "anomalib 2.7 EfficientAD-S, OpenVINO fp32"


def interleaved_speed(sessions: dict, rounds: int, runs: int, batch_size: int = 8) -> dict:
    """Batch-1 latency (median over all rounds' runs) and batch-``batch_size`` throughput of each session.

    Every round runs each session ``runs`` times at batch 1 and 3 times at ``batch_size``, in turn
    (the order reversed every other round), after one warm-up round.
    """
    rng = np.random.default_rng(0)
    single = rng.random((1, 3, 256, 256), dtype=np.float32)
    many = rng.random((batch_size, 3, 256, 256), dtype=np.float32)
    latency: dict[str, list[float]] = {name: [] for name in sessions}
    batch: dict[str, list[float]] = {name: [] for name in sessions}
    for round_ in range(rounds + 1):
        names = list(sessions) if round_ % 2 else list(reversed(sessions))
        for name in names:
            run = sessions[name]
            for count, images, into in ((runs, single, latency), (3, many, batch)):
                for _ in range(count):
                    started = time.perf_counter()
                    run(images)
                    if round_:  # the first round warms up
                        into[name].append(time.perf_counter() - started)
    return {
        name: {
            "latency_ms": round(1e3 * statistics.median(latency[name]), 1),
            "latency_p90_ms": round(1e3 * float(np.quantile(latency[name], 0.9)), 1),
            "images_per_s_batch8": round(batch_size / statistics.median(batch[name]), 2),
            "rounds": rounds,
            "runs_per_round": runs,
        }
        for name in sessions
    }


def kernels(session) -> list[str]:
    """The oneDNN kernels an OpenVINO session's convolutions run (which ISA, which precision)."""
    request = session._request((1, 3, 256, 256))
    runtime = request.get_compiled_model().get_runtime_model()
    return sorted({op.get_rt_info()["primitiveType"].astype(str) for op in runtime.get_ordered_ops() if op.get_rt_info()["layerType"].astype(str) == "Convolution"})


def anomalib_runner(threads: int):
    """anomalib's EfficientAD-S (random weights: speed only) exported to OpenVINO as anomalib exports it."""
    import openvino as ov
    import torch
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    model = EfficientAdModel(teacher_out_channels=384, model_size="small").eval()

    class Deployed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, images):
            output = self.model(images)
            return output.pred_score, output.anomaly_map

    with torch.no_grad():
        graph = ov.convert_model(Deployed().eval(), example_input=torch.rand(1, 3, 256, 256))
    core = ov.Core()
    requests = {}

    def run(images):
        shape = images.shape
        if shape not in requests:
            reshaped = graph.clone()
            reshaped.reshape({0: list(shape)})
            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
            requests[shape] = core.compile_model(reshaped, "CPU", config).create_infer_request()
        requests[shape].infer({0: images})

    return run


def test_set(category: str, image_size):
    """The category's test images (float32 in [0, 1]), masks at ``image_size`` and labels."""
    from efficientad.data.datasets import load_split, read_mask
    from efficientad.data.images import load_images, to_float

    layout, root = CATEGORIES[category]
    split = load_split(layout, root, category)
    images = to_float(load_images([s.path for s in split.test], image_size)).numpy()
    masks = np.stack([read_mask(s.mask_paths, image_size) if s.mask_paths else np.zeros(image_size, bool) for s in split.test])
    return images, masks, split.labels


def accuracy(session, images, masks, labels, image_size) -> dict:
    import torch

    from efficientad.deploy.speed import run_all
    from efficientad.evaluation.metrics import au_pro, image_auroc
    from efficientad.model import resize_maps

    output = run_all(session, images)
    maps = resize_maps(torch.from_numpy(output.anomaly_map), image_size)[:, 0].numpy()
    return {"image_auroc": round(image_auroc(labels, output.score), 4), "au_pro": round(float(au_pro(masks, maps)), 4)}


def avx2_child(args) -> int:
    """The child process of --avx2: the int8 exports' test-set accuracy and every timing, on this ISA."""
    from efficientad.deploy.fused import FusedModel
    from efficientad.deploy.inferencer import Inferencer, int8_path
    from efficientad.deploy.runtimes import make_session
    from efficientad.model import load_model

    result: dict = {"int8_accuracy": {}, "kernels": {}}
    sessions = {}
    for category, path in args.model:
        int8 = Inferencer.load(int8_path(path), threads=args.threads).session
        images, masks, labels = test_set(category, (256, 256))
        result["int8_accuracy"][path] = accuracy(int8, images, masks, labels, (256, 256))
        sessions[f"{path} openvino int8"] = int8.run
        result["kernels"][f"{path} openvino int8"] = kernels(int8)
        print(path, result["int8_accuracy"][path], file=sys.stderr, flush=True)
    module = FusedModel(load_model(args.model[0][1])[0])  # float speed does not depend on the weights
    fp32 = make_session(module, "openvino", "fp32", threads=args.threads)
    sessions["openvino fp32"] = fp32.run
    result["kernels"]["openvino fp32"] = kernels(fp32)
    sessions["torch fp32"] = make_session(module, "torch", "fp32", threads=args.threads).run
    try:
        sessions[ANOMALIB] = anomalib_runner(args.threads)
    except ImportError as error:
        result["anomalib"] = f"anomalib is not importable here: {error}"
    result["speed"] = interleaved_speed(sessions, args.rounds, args.runs)
    print(json.dumps(result))
    return 0


def int8_export(path: str, category: str, threads: int) -> dict:
    """The model's int8 export beside it, made now unless this version's export made it from this very model."""
    from efficientad.deploy.formats import export_int8, read_openvino_metadata
    from efficientad.deploy.inferencer import int8_path
    from efficientad.deploy.quantize import quantization_images
    from efficientad.files import write_run_record
    from efficientad.model import load_model

    model, metadata = load_model(path)
    xml = int8_path(path)
    if xml.is_file():
        embedded = read_openvino_metadata(xml)
        # Half-range weights: the newest of the export's changes that an older export lacks.
        if embedded.get("model", {}).get("tensor_sha256") == metadata["tensor_sha256"] and embedded.get("int8", {}).get("weights_half_range"):
            return json.loads(xml.with_suffix(".json").read_text())
    layout, root = CATEGORIES[category]
    calibration, validation = quantization_images(metadata, root, category, layout)
    _, record = export_int8(model, xml, calibration, validation, model_metadata=metadata, threads=threads)
    write_run_record(xml.with_suffix(".json"), {"model": str(path), "model_tensor_sha256": metadata["tensor_sha256"], **record})
    return record


def report(result: dict) -> str:
    """The tables: accuracy per model and cell, int8 against fp32, and speed against anomalib."""
    lines = [
        "# Every precision x runtime: accuracy on the test set, and speed",
        "",
        f"`{' '.join(result.get('command', []))}` (benchmarks/precision_table.py). CPU: {result['system']['cpu']}, "
        f"flags {', '.join(result['system']['cpu_flags'])}; {result['system']['threads']} threads.",
        "",
        "## Accuracy (image AUROC / AU-PRO; test set, read for this report only)",
        "",
        "| model | " + " | ".join(f"{b} {p}" for b, p in CELLS if (b, p) not in MISSING) + " | int8 export: layers kept in float | int8 - fp32 (OpenVINO) |",
        "|---|" + "---|" * (len(CELLS) - len(MISSING)) + "---|---|",
    ]
    for row in result["models"]:
        cells = row["cells"]
        text = []
        for backend, precision in CELLS:
            if (backend, precision) in MISSING:
                continue
            cell = cells[f"{backend} {precision}"]
            text.append(cell["missing"] if "missing" in cell else f"{cell['image_auroc']:.4f} / {cell['au_pro']:.4f}")
        fp32, int8 = cells["openvino fp32"], cells["openvino int8"]
        delta = f"{int8['image_auroc'] - fp32['image_auroc']:+.4f} / {int8['au_pro'] - fp32['au_pro']:+.4f}"
        kept = ", ".join(row["int8"]["kept_in_float"]) or "none"
        lines.append(f"| {row['category']} {Path(row['model']).parent.name} | " + " | ".join(text) + f" | {kept} | {delta} |")
    avx2 = result.get("avx2_code_path")
    if avx2:
        lines += ["", "int8 export on the AVX2 code path (image AUROC / AU-PRO): " + "; ".join(
            f"{Path(path).parent.name} {cell['image_auroc']:.4f} / {cell['au_pro']:.4f}" for path, cell in avx2["int8_accuracy"].items()
        ) + "."]  # fmt: skip
    for label, speed in (("this CPU", result["speed"]), ("AVX2 code path", (avx2 or {}).get("speed"))):
        if not speed:
            continue
        peer = speed.get(ANOMALIB, {}).get("latency_ms")
        lines += [
            "",
            f"## Speed, {label} (batch-1 latency, median; batch-8 throughput)",
            "",
            "| session | latency ms | / anomalib's | images/s at batch 8 |",
            "|---|---:|---:|---:|",
        ]
        for name, cell in speed.items():
            ratio = f"{cell['latency_ms'] / peer:.2f}" if peer else "-"
            lines.append(f"| {name} | {cell['latency_ms']:.1f} | {ratio} | {cell['images_per_s_batch8']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, type=lambda text: tuple(text.split("=", 1)), metavar="CATEGORY=MODEL.pt")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=10, help="batch-1 runs per session and round (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--avx2", action="store_true", help="also measure on the AVX2 code path (child process)")
    parser.add_argument("--avx2-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "precision_table.json")
    args = parser.parse_args()
    for category, _ in args.model:
        if category not in CATEGORIES:
            parser.error(f"unknown category {category!r}: give {', '.join(CATEGORIES)}")
    if args.avx2_child:
        return avx2_child(args)

    import torch

    from efficientad.deploy.fused import FusedModel
    from efficientad.deploy.inferencer import Inferencer, int8_path
    from efficientad.deploy.quantize import quantization_images
    from efficientad.deploy.runtimes import make_session
    from efficientad.deploy.speed import system_info
    from efficientad.device import cpu_supports_bf16
    from efficientad.files import write_run_record, atomic_write_text
    from efficientad.model import load_model

    torch.set_num_threads(args.threads)
    result = {"benchmark": "precision_table", "models": [], "system": system_info(threads=args.threads)}
    sessions = {}
    for category, path in args.model:
        record = int8_export(path, category, args.threads)
        model, metadata = load_model(path)
        layout, root = CATEGORIES[category]
        calibration, _ = quantization_images(metadata, root, category, layout)
        images, masks, labels = test_set(category, model.image_size)
        module = FusedModel(model)
        row = {"category": category, "model": str(path), "int8": {k: v for k, v in record.items() if k not in ("validation_scores", "trials")}, "cells": {}}
        for backend, precision in CELLS:
            key = f"{backend} {precision}"
            if (backend, precision) in MISSING:
                row["cells"][key] = {"missing": MISSING[(backend, precision)]}
                continue
            if precision == "bf16" and not cpu_supports_bf16():
                row["cells"][key] = {"missing": "this CPU has no native bf16"}
                continue
            if (backend, precision) == ("openvino", "int8"):
                session = Inferencer.load(int8_path(path), threads=args.threads).session
            elif precision == "int8":
                session = make_session(FusedModel(model, fuse_local_head=False), backend, precision, "cpu", args.threads, calibration=calibration)
            else:
                session = make_session(module, backend, precision, "cpu", args.threads)
            row["cells"][key] = accuracy(session, images, masks, labels, model.image_size)
            print(category, path, key, row["cells"][key], file=sys.stderr, flush=True)
            # Float speed does not depend on the weights: timed for the first model only; int8 for each.
            if precision == "int8" or len(result["models"]) == 0:
                sessions[f"{key}" if precision != "int8" else f"{path} {key}"] = session.run
        result["models"].append(row)
        write_run_record(args.json, {**result, "partial": True})  # a stopped run keeps the models it finished
    try:
        sessions[ANOMALIB] = anomalib_runner(args.threads)
    except ImportError as error:
        result["anomalib"] = f"anomalib is not importable here: {error}"
    result["speed"] = interleaved_speed(sessions, args.rounds, args.runs)
    if args.avx2:
        command = [sys.executable, __file__, "--avx2-child", "--rounds", str(args.rounds), "--runs", str(args.runs), "--threads", str(args.threads)]
        command += [item for category, path in args.model for item in ("--model", f"{category}={path}")]
        child = subprocess.run(command, env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, capture_output=True, text=True)
        if child.returncode != 0:
            raise SystemExit(f"the AVX2 child failed:\n{child.stderr[-3000:]}")
        result["avx2_code_path"] = json.loads(child.stdout.strip().splitlines()[-1])
    write_run_record(args.json, result)
    atomic_write_text(args.json.with_suffix(".md"), report(json.loads(args.json.read_text())))
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
