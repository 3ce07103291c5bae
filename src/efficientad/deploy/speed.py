"""Inference speed and reduced-precision accuracy, measured the paper's way.

Latency: batch 1, median and 90th percentile over ``runs`` timed forwards after ``warmup`` untimed
ones, each covering the whole path (input on the host -> score and maps on the host). Throughput:
batch ``batch_size``, images per second at the median batch time.

Alongside each wall-clock time the process CPU time is recorded: on a machine shared with other
work, ``cpu_ms / threads`` close to the wall time says the run had its cores, and a much larger
wall time says it waited for them. Load averages before and after go into the result too.

Accuracy of a backend/precision is its difference to the float32 PyTorch path on real test images:
max absolute difference of scores and maps, and the image AUROC of each.

The int8 of ``bench --precision int8`` on a ``model.pt`` quantises every convolution, with activation
ranges from normal images and no accuracy control: it times int8, and its accuracy shows why
deployments use the int8 export instead (:mod:`efficientad.deploy.quantize`). Both maps are squared
differences between two networks, small for normal images by training; int8 rounding noise in each
network's features adds to their difference, and activations beyond the normal images' ranges (the
defects) are clipped. On MVTec AD bottle this plain int8 lost 0.05 (ONNX Runtime) to 0.08 (OpenVINO)
image AUROC.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..config import BENCH_BATCH_SIZE, BENCH_RUNS, BENCH_WARMUP
from ..device import ISA_CAPS, default_threads
from ..errors import EfficientADError
from ..files import versions
from ..model import EfficientADModel, load_model
from .fused import FusedModel
from ..choices import BACKEND_PRECISIONS
from .formats import auto_cpu_precision, detect_format
from .inferencer import FORMAT_BACKENDS, Inferencer
from .runtimes import InferenceOutput, OpenVinoSession, TorchSession, make_session


def random_model(model_size: str = "s", image_size: tuple[int, int] = (256, 256), seed: int = 0) -> EfficientADModel:
    """An untrained model with plausible constants: for timing only, its scores mean nothing."""
    torch.manual_seed(seed)
    model = EfficientADModel(model_size, image_size).eval()
    model.map_quantiles.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    return model


def _timed(run: Callable[[], Any], runs: int, synchronize: Callable[[], None]) -> dict[str, Any]:
    wall, cpu = [], []
    for _ in range(runs):
        start_cpu, start = time.process_time(), time.perf_counter()
        run()
        synchronize()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    ordered = sorted(wall)
    return {
        "median_ms": 1e3 * statistics.median(wall),
        "p90_ms": 1e3 * ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)],
        "mean_ms": 1e3 * statistics.fmean(wall),
        "min_ms": 1e3 * ordered[0],
        "cpu_median_ms": 1e3 * statistics.median(cpu),
        "runs": runs,
    }


def measure_speed(session, input_shape: tuple[int, ...], input_dtype: str, runs: int, warmup: int, batch_size: int) -> dict[str, Any]:
    """Latency at batch 1 and throughput at ``batch_size``, on random input of the graph's dtype."""
    if runs < 1 or warmup < 0 or batch_size < 1:
        raise EfficientADError(f"need runs >= 1, warmup >= 0 and batch size >= 1; got {runs}, {warmup}, {batch_size}")
    rng = np.random.default_rng(0)

    def batch(n: int) -> np.ndarray:
        if input_dtype == "uint8":
            return rng.integers(0, 256, (n, *input_shape), dtype=np.uint8)
        return rng.random((n, *input_shape), dtype=np.float32)

    device = getattr(session, "device", None)
    on_cuda = isinstance(device, torch.device) and device.type == "cuda"
    synchronize = torch.cuda.synchronize if on_cuda else (lambda: None)
    # Host to host, like the reference benchmark: the copies in and out are part of a deployment's latency.
    single = batch(1)
    run_one = lambda: session.run(single)  # noqa: E731
    load_before = os.getloadavg()
    started = time.perf_counter()
    for _ in range(max(1, warmup)):
        run_one()
    synchronize()
    first_calls_s = time.perf_counter() - started
    latency = _timed(run_one, runs, synchronize)
    result: dict[str, Any] = {"latency_batch1": latency, "warmup_runs": warmup, "warmup_seconds": first_calls_s}
    if on_cuda:
        # The second figure: input already on the GPU, outputs left there (the GPU's own share).
        on_device = torch.from_numpy(single).to(device)
        result["latency_batch1_device_only"] = _timed(lambda: session.run_tensors(on_device), runs, synchronize)
    if batch_size > 1:
        images = batch(batch_size)
        run_many = lambda: session.run(images)  # noqa: E731
        for _ in range(max(1, min(warmup, 3))):
            run_many()
        batches = max(3, math.ceil(runs / batch_size))
        timing = _timed(run_many, batches, synchronize)
        result["throughput"] = {"batch_size": batch_size, "images_per_s": batch_size / (timing["median_ms"] / 1e3), **timing}
    else:
        result["throughput"] = {"batch_size": 1, "images_per_s": 1e3 / latency["median_ms"]}
    result["load_average_before"] = list(load_before)
    result["load_average_after"] = list(os.getloadavg())
    return result


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8", "amx_tile")
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def system_info(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    """Machine, thread count and library versions, for reading a benchmark result later."""
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
        "cpu_count": os.cpu_count(),
        "usable_cores": default_threads(),
        "threads": threads or default_threads(),
        "platform": platform.platform(),
        "versions": versions(),
    }
    # A capped instruction set (e.g. the AVX2 code path measured on an AVX-512 CPU) changes every figure.
    capped = {name: os.environ[name] for name in ISA_CAPS if os.environ.get(name)}
    if capped:
        info["instruction_set_cap"] = capped
    for name in ("onnxruntime", "openvino", "onnx"):
        try:
            info["versions"][name] = __import__(name).__version__
        except ImportError:
            info["versions"][name] = None
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["versions"]["cuda"] = torch.version.cuda
        info["versions"]["cudnn"] = torch.backends.cudnn.version()
    return info


def run_all(session, images: np.ndarray, batch_size: int = BENCH_BATCH_SIZE) -> InferenceOutput:
    """Run ``images`` (N, 3, H, W) through a session in batches; concatenated host outputs."""
    parts = [session.run(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return InferenceOutput(*(np.concatenate(column) for column in zip(*parts)))


def compare(output: InferenceOutput, reference: InferenceOutput, labels: Sequence[int]) -> dict[str, Any]:
    """Differences of ``output`` to ``reference`` (the float32 path) and both image AUROCs."""
    from ..evaluation.metrics import image_auroc

    result = {
        f"max_abs_diff_{name}": float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
        for name, a, b in zip(InferenceOutput._fields, output, reference)
    }
    result["reference_map_max"] = float(np.max(np.abs(reference.anomaly_map)))
    auroc, reference_auroc = image_auroc(labels, output.score), image_auroc(labels, reference.score)
    result.update(image_auroc=auroc, reference_image_auroc=reference_auroc, image_auroc_change=auroc - reference_auroc)
    return result


def bench(
    model_size: str = "s",
    model_path: str | os.PathLike | None = None,
    backend: str = "torch",
    precision: str = "auto",
    device: str = "cpu",
    batch_size: int = BENCH_BATCH_SIZE,
    runs: int = BENCH_RUNS,
    warmup: int = BENCH_WARMUP,
    compile: bool = False,
    threads: int | None = None,
    image_size: tuple[int, int] = (256, 256),
    calibration: Sequence[np.ndarray] = (),
    test_set: tuple[np.ndarray, Sequence[int]] | None = None,
    reference: InferenceOutput | None = None,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Time one backend/precision; random weights unless ``model_path`` is given.

    ``precision="auto"`` (and any export given as ``model_path``) times what a deployment would run:
    :meth:`Inferencer.load <efficientad.deploy.inferencer.Inferencer.load>`'s choice.

    int8 needs ``calibration`` batches; without them random images stand in (fine for timing, not
    for accuracy). ``test_set`` (float32 images at the model's size, labels) adds an ``accuracy``
    entry comparing the session with float32 PyTorch, whose outputs ``reference`` may supply.
    Returns a JSON-serialisable dict (configuration, system, timings).
    """
    choice = ""
    threads = threads or default_threads()
    file_format = None if model_path is None else detect_format(model_path)
    if model_path is not None and (precision == "auto" or file_format != "native"):
        # What a deployment runs: the file's own runtime, or auto's choice (which may be an int8 export).
        inferencer = Inferencer.load(model_path, backend=backend if file_format == "native" else None, precision=precision, device=device, threads=threads)
        session, precision, choice = inferencer.session, inferencer.precision, inferencer.reason
        backend = backend if inferencer.format == "native" else FORMAT_BACKENDS[inferencer.format]
        image_shape, input_dtype = (3, *inferencer.image_size), inferencer.input_dtype
        model_size = inferencer.metadata["model_size"]
        # The float32 reference of accuracy, read again only when accuracy is asked for: the model file itself.
        module = FusedModel(load_model(model_path)[0]) if test_set is not None and reference is None and file_format == "native" else None
    else:
        if model_path is not None:
            model, _ = load_model(model_path)
            model_size, image_size = model.model_size, model.image_size
        else:
            model = random_model(model_size, tuple(image_size))
        module = FusedModel(model)
        if precision == "auto":
            precision = auto_cpu_precision(BACKEND_PRECISIONS[backend]) if str(device) == "cpu" else "fp32"
            choice = f"auto: {precision} ({'native bf16' if precision == 'bf16' else 'no native bf16'} on this CPU; no int8 model without --model)"
        if precision == "int8" and not calibration:
            rng = np.random.default_rng(0)
            calibration = [rng.random((1, 3, *module.image_size), dtype=np.float32) for _ in range(4)]
        session = make_session(module, backend, precision, device, threads, compile=compile, cuda_graphs=cuda_graphs, calibration=calibration)
        image_shape, input_dtype = (3, *module.image_size), module.input_dtype
    speed = measure_speed(session, image_shape, input_dtype, runs, warmup, batch_size)
    accuracy = None
    if test_set is not None:
        images, labels = test_set
        if reference is None and module is None:
            raise EfficientADError("accuracy against float32 needs the model.pt (or a reference), not only an export")
        if reference is None:
            reference = run_all(TorchSession(module, "cpu", "fp32", threads=threads), images)
        accuracy = compare(run_all(session, images), reference, labels)
    result = {
        "model_size": model_size,
        "model": None if model_path is None else str(model_path),
        "image_size": list(image_shape[1:]),
        "backend": backend,
        "precision": precision,
        "precision_choice": choice or None,
        # OpenVINO may compute in another precision than asked (its own default, or what the CPU has).
        "effective_precision": session.inference_precision if isinstance(session, OpenVinoSession) and precision != "int8" else precision,
        "device": device,
        "compile": compile,
        "cuda_graphs": cuda_graphs,
        "system": system_info(device, threads),
        **speed,
    }
    if accuracy is not None:
        result["accuracy"] = accuracy
    return result


def load_test_set(root: str | os.PathLike, category: str, image_size: tuple[int, int], format: str = "mvtec") -> tuple[np.ndarray, list[int], list[str]]:
    """A category's test images as one float32 [0, 1] batch at ``image_size``, their labels and paths."""
    from ..data.datasets import load_split
    from ..data.images import load_images, to_float

    split = load_split(format, root, category)
    images = to_float(load_images([sample.path for sample in split.test], image_size)).numpy()
    return images, split.labels, [str(sample.path) for sample in split.test]


def load_calibration_set(root: str | os.PathLike, category: str, image_size: tuple[int, int], count: int = 16, format: str = "mvtec") -> list[np.ndarray]:
    """``count`` evenly spaced training (good) images of a category, one float32 batch of 1 each."""
    from ..data.datasets import load_split
    from ..data.images import load_images, to_float

    train = load_split(format, root, category).train
    chosen = [train[i] for i in np.linspace(0, len(train) - 1, min(count, len(train))).round().astype(int)]
    images = to_float(load_images(chosen, image_size)).numpy()
    return [images[i : i + 1] for i in range(len(images))]
