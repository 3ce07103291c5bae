"""Accuracy and speed of every precision x runtime, int8 included, for trained models: one table.

    python benchmarks/precision_table.py --model bottle=runs/bottle_s0/model.pt --model bottle=runs/bottle_s1/model.pt \\
        --model fryum=runs/fryum_s0/model.pt --model fryum=runs/fryum_s1/model.pt [--json benchmarks/results/precision_table.json]

For each model (trained on ../shared's MVTec AD bottle or VisA fryum) it makes the int8 export that
``efficientad export --precision int8`` makes (or reuses MODEL.int8.xml beside it when it was made
from that model), then scores the category's test set with every runtime and precision:

* torch fp32 / bf16, ONNX Runtime fp32, OpenVINO fp32 / bf16: the model file as ``predict`` runs it;
* OpenVINO int8: the int8 export (networks int8, accuracy-controlled layers and map arithmetic float);
* ONNX Runtime int8: every convolution quantised without accuracy control (what ``bench`` times), for
  comparison; torch int8 and ONNX Runtime bf16 do not exist on the CPU and are listed as such.

Image AUROC and AU-PRO (maps at the model's 256x256, the test masks resized to it) come from the test
set, which decides nothing here. Speed: batch-1 latency (median) and batch-8 throughput. With
``--avx2`` the OpenVINO and torch timings are repeated in a child process limited to AVX2
(``ONEDNN_MAX_CPU_ISA=AVX2``: no AVX-512, VNNI, bf16 or AMX kernels), an estimate for AVX2-only CPUs.
When anomalib is importable, its EfficientAD-S exported to OpenVINO is timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
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
         ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"), ("openvino", "int8")]


LOCK: Path | None = None


def timing(session, runs: int, warmup: int) -> dict:
    """Batch-1 latency and batch-8 throughput, holding --lock meanwhile (other jobs that take it wait)."""
    import fcntl

    from efficientad.deploy.speed import measure_speed

    with open(LOCK, "a") if LOCK else open(os.devnull) as handle:
        if LOCK:
            fcntl.flock(handle, fcntl.LOCK_EX)
        speed = measure_speed(session, (3, 256, 256), "float32", runs, warmup, 8)
    return {"latency_ms": round(speed["latency_batch1"]["median_ms"], 1), "images_per_s_batch8": round(speed["throughput"]["images_per_s"], 2)}


def kernels(session) -> list[str]:
    """The oneDNN kernels an OpenVINO session's convolutions run (which ISA, which precision)."""
    request = session._request((1, 3, 256, 256))
    runtime = request.get_compiled_model().get_runtime_model()
    return sorted({op.get_rt_info()["primitiveType"].astype(str) for op in runtime.get_ordered_ops() if op.get_rt_info()["layerType"].astype(str) == "Convolution"})


def anomalib_session(threads: int):
    """anomalib's EfficientAD-S (random weights: speed only) exported to OpenVINO as anomalib exports it."""
    import torch
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel
    from efficientad.deploy.runtimes import OpenVinoSession
    import openvino as ov

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

    class Session(OpenVinoSession):
        def run(self, images):
            images = np.ascontiguousarray(images)
            request = self._request(tuple(images.shape))
            request.infer({0: images})
            return [request.get_output_tensor(i).data.copy() for i in range(2)]

    return Session(graph, "fp32", threads)


def speed_only(args) -> int:
    """The child process of --avx2: time OpenVINO fp32/int8, torch fp32 and anomalib on this ISA."""
    from efficientad.deploy.fused import FusedModel
    from efficientad.deploy.inferencer import Inferencer, int8_path
    from efficientad.deploy.runtimes import make_session
    from efficientad.model import load_model

    rows = {}
    for path in dict.fromkeys(path for _, path in args.model):
        module = FusedModel(load_model(path)[0])
        for precision, session in (("fp32", make_session(module, "openvino", "fp32", threads=args.threads)), ("int8", Inferencer.load(int8_path(path), threads=args.threads).session)):
            rows[f"{path} openvino {precision}"] = {**timing(session, args.runs, args.warmup), "kernels": kernels(session)}
        rows[f"{path} torch fp32"] = timing(make_session(module, "torch", "fp32", threads=args.threads), args.runs, args.warmup)
    try:
        rows["anomalib openvino fp32"] = timing(anomalib_session(args.threads), args.runs, args.warmup)
    except ImportError as error:
        rows["anomalib openvino fp32"] = {"missing": str(error)}
    print(json.dumps(rows))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, type=lambda text: tuple(text.split("=", 1)), metavar="CATEGORY=MODEL.pt")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--avx2", action="store_true", help="also time on the AVX2 code path (child process)")
    parser.add_argument("--speed-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "precision_table.json")
    parser.add_argument("--lock", type=Path, default=None, help="hold this lock file (flock) while timing, so that jobs taking it wait")
    args = parser.parse_args()
    global LOCK
    LOCK = args.lock
    if args.speed_only:
        return speed_only(args)

    import torch

    from efficientad.data.datasets import load_split, read_mask
    from efficientad.deploy.formats import export_int8, read_openvino_metadata
    from efficientad.deploy.fused import FusedModel
    from efficientad.deploy.inferencer import Inferencer, int8_path
    from efficientad.deploy.quantize import quantization_images
    from efficientad.deploy.runtimes import make_session
    from efficientad.deploy.speed import run_all, system_info
    from efficientad.device import cpu_supports_bf16
    from efficientad.evaluation.metrics import au_pro, image_auroc
    from efficientad.model import load_model, resize_maps

    torch.set_num_threads(args.threads)
    timed_floats: set[str] = set()
    results = []
    for category, path in args.model:
        layout, root = CATEGORIES[category]
        model, metadata = load_model(path)
        calibration, validation = quantization_images(metadata, root, category, layout)
        xml = int8_path(path)
        reused = xml.is_file() and read_openvino_metadata(xml).get("model", {}).get("tensor_sha256") == metadata["tensor_sha256"]
        if reused:
            record = json.loads(xml.with_suffix(".json").read_text())
        else:
            started = time.perf_counter()
            _, record = export_int8(model, xml, calibration, validation, model_metadata=metadata, threads=args.threads)
            record["seconds"] = round(time.perf_counter() - started, 1)
            xml.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
        split = load_split(layout, root, category)
        from efficientad.data.images import load_images, to_float

        images = to_float(load_images([s.path for s in split.test], model.image_size)).numpy()
        masks = np.stack([read_mask(s.mask_paths, model.image_size) if s.mask_paths else np.zeros(model.image_size, bool) for s in split.test])
        labels = split.labels
        module = FusedModel(model)
        row = {"category": category, "model": str(path), "int8": {k: v for k, v in record.items() if k != "validation_scores"}, "cells": {}}
        for backend, precision in CELLS:
            key = f"{backend} {precision}"
            if (backend, precision) in MISSING:
                row["cells"][key] = {"missing": MISSING[(backend, precision)]}
                continue
            if precision == "bf16" and not cpu_supports_bf16():
                row["cells"][key] = {"missing": "this CPU has no native bf16"}
                continue
            if (backend, precision) == ("openvino", "int8"):
                session = Inferencer.load(xml, threads=args.threads).session
            else:
                session = make_session(module, backend, precision, "cpu", args.threads, calibration=calibration)
            output = run_all(session, images)
            maps = resize_maps(torch.from_numpy(output.anomaly_map), model.image_size)[:, 0].numpy()
            cell = {"image_auroc": round(image_auroc(labels, output.score), 4), "au_pro": round(float(au_pro(masks, maps)), 4)}
            # Float speed does not depend on the weights: timed once per category; int8 per model (its float layers differ).
            if precision == "int8" or f"{category} {key}" not in timed_floats:
                cell.update(timing(session, args.runs, args.warmup))
                if backend == "openvino":
                    cell["kernels"] = kernels(session)
                timed_floats.add(f"{category} {key}")
            row["cells"][key] = cell
            print(category, path, key, cell, flush=True)
        results.append(row)
        # Written as it goes: a stopped run keeps the models it finished.
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"benchmark": "precision_table", "partial": True, "models": results}, indent=2) + "\n")

    result = {"benchmark": "precision_table", "models": results, "system": system_info(threads=args.threads)}
    try:
        result["anomalib_openvino_fp32"] = timing(anomalib_session(args.threads), args.runs, args.warmup)
    except ImportError as error:
        result["anomalib_openvino_fp32"] = {"missing": f"anomalib is not importable here: {error}"}
    if args.avx2:
        command = [sys.executable, __file__, "--speed-only", "--runs", str(args.runs), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        command += ["--lock", str(args.lock)] if args.lock else []
        command += [item for category, path in args.model for item in ("--model", f"{category}={path}")]
        child = subprocess.run(command, env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}, capture_output=True, text=True, check=True)
        result["avx2_code_path"] = json.loads(child.stdout.strip().splitlines()[-1])
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
