"""Inference speed and reduced-precision accuracy, measured the paper's way.

Latency: batch 1, median and 90th percentile over ``runs`` timed forwards after ``warmup`` untimed
ones, each covering the whole path (input on the host -> score and maps on the host). Throughput:
batch ``batch_size``, images per second at the median batch time.

Alongside each wall-clock time the process CPU time is recorded: on a machine shared with other
work, ``cpu_ms / threads`` close to the wall time says the run had its cores, and a much larger
wall time says it waited for them. Load averages before and after go into the result too.

Accuracy of a backend/precision is its difference to the float32 PyTorch path on real test images:
max absolute difference of scores and maps, and the image AUROC of each.

Why int8 is measured here but offered nowhere else: both maps are squared differences between two
networks (teacher and student, autoencoder and student), small for normal images by training.
Static post-training quantisation (int8 weights per channel, uint8 activations per tensor) adds
independent rounding noise to each network's features, and their difference carries all of it: on
MVTec AD bottle the local map moved by up to 0.43 (0.1 is a normal image's 99.5th percentile) and the
image AUROC fell by 0.05 (ONNX Runtime) to 0.08 (OpenVINO). Leaving the output convolutions in float
did not help (the noise comes from the trunks), nor did percentile calibration. bf16 rounds each
value relative to its own magnitude; int8 rounds all values of a tensor to one absolute step, set by
its largest activations and coarse for the many small ones. bf16 stayed within 0.005 AUROC.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import EfficientADError
from .export import onnx_bytes, openvino_model, require_openvino
from .inference import (
    InferenceModel,
    InferenceOutput,
    OnnxRuntimeSession,
    OpenVinoSession,
    TorchSession,
    default_threads,
)
from .model import EfficientADModel, load_model, versions

BACKENDS = ("torch", "onnxruntime", "openvino")
# Which precisions each backend offers here; int8 is static post-training quantisation (QDQ).
SUPPORTED = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "fp16", "int8"),
}


def random_model(model_size: str = "s", image_size: tuple[int, int] = (256, 256), seed: int = 0) -> EfficientADModel:
    """An untrained model with plausible constants: for timing only, its scores mean nothing."""
    torch.manual_seed(seed)
    model = EfficientADModel(model_size, image_size).eval()
    model.map_quantiles.copy_(torch.tensor([0.0, 1.0, 0.0, 1.0]))
    return model


def quantize_int8(model_onnx: bytes, calibration: Sequence[np.ndarray]) -> bytes:
    """Static int8 quantisation of every convolution (weights per channel, activations per tensor).

    ``calibration`` holds input batches of normal images; their activation ranges set the scales.
    The maps' squares, means and resize stay in float32.
    """
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not calibration:
        raise EfficientADError("int8 quantisation needs calibration images")
    input_name = onnx.load_from_string(model_onnx).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {input_name: batch}

    with tempfile.TemporaryDirectory() as folder:
        source, target = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        source.write_bytes(model_onnx)
        root_logger, level = logging.getLogger(), logging.getLogger().level
        # onnxruntime.quantization logs advice about pre-processing on the root logger at WARNING.
        root_logger.setLevel(logging.ERROR)
        try:
            quantize_static(
                str(source),
                str(target),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["Conv"],
                calibrate_method=CalibrationMethod.MinMax,
            )
        finally:
            root_logger.setLevel(level)
        return target.read_bytes()


def make_session(
    module: InferenceModel,
    backend: str,
    precision: str = "fp32",
    device: str = "cpu",
    threads: int | None = None,
    compile: bool = False,
    calibration: Sequence[np.ndarray] = (),
    cuda_graphs: bool = False,
):
    """A session that runs ``module`` with ``backend`` at ``precision`` (see :data:`SUPPORTED`)."""
    if backend not in BACKENDS:
        raise EfficientADError(f"unknown backend {backend!r} (expected one of: {', '.join(BACKENDS)})")
    if precision not in SUPPORTED[backend]:
        raise EfficientADError(f"backend {backend} offers precisions {', '.join(SUPPORTED[backend])}, not {precision}")
    if (compile or cuda_graphs) and backend != "torch":
        raise EfficientADError("--compile and --cuda-graphs apply to the torch backend only")
    if backend == "torch":
        return TorchSession(module, device, precision, compile=compile, cuda_graphs=cuda_graphs, threads=threads)
    if backend == "openvino":
        require_openvino()
        if device != "cpu":
            raise EfficientADError("the OpenVINO backend here runs on the CPU only")
    graph = onnx_bytes(module)
    if precision == "int8":
        graph = quantize_int8(graph, calibration)
    if backend == "onnxruntime":
        return OnnxRuntimeSession(graph, threads, device)
    # int8: the quantised convolutions run in int8 whatever the hint; f32 keeps the rest exact.
    return OpenVinoSession(openvino_model(graph), "fp32" if precision == "int8" else precision, threads)


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
    if on_cuda:
        # Inputs already on the GPU: the paper's timing, without the host-to-device copy.
        single = torch.from_numpy(batch(1)).to(device)
        run_one = lambda images=single: session.run_tensors(images)  # noqa: E731
    else:
        single = batch(1)
        run_one = lambda images=single: session.run(images)  # noqa: E731
    load_before = os.getloadavg()
    started = time.perf_counter()
    for _ in range(max(1, warmup)):
        run_one()
    synchronize()
    first_calls_s = time.perf_counter() - started
    latency = _timed(run_one, runs, synchronize)
    result: dict[str, Any] = {"latency_batch1": latency, "warmup_runs": warmup, "warmup_seconds": first_calls_s}
    if batch_size > 1:
        images = torch.from_numpy(batch(batch_size)).to(device) if on_cuda else batch(batch_size)
        run_many = (lambda: session.run_tensors(images)) if on_cuda else (lambda: session.run(images))
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


def run_all(session, images: np.ndarray, batch_size: int = 8) -> InferenceOutput:
    """Run ``images`` (N, 3, H, W) through a session in batches; concatenated host outputs."""
    parts = [session.run(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    return InferenceOutput(*(np.concatenate(column) for column in zip(*parts)))


def compare(output: InferenceOutput, reference: InferenceOutput, labels: Sequence[int]) -> dict[str, Any]:
    """Differences of ``output`` to ``reference`` (the float32 path) and both image AUROCs."""
    from .metrics import image_auroc

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
    precision: str = "fp32",
    device: str = "cpu",
    batch_size: int = 8,
    runs: int = 50,
    warmup: int = 10,
    compile: bool = False,
    threads: int | None = None,
    image_size: tuple[int, int] = (256, 256),
    calibration: Sequence[np.ndarray] = (),
    test_set: tuple[np.ndarray, Sequence[int]] | None = None,
    reference: InferenceOutput | None = None,
    cuda_graphs: bool = False,
) -> dict[str, Any]:
    """Time one backend/precision; random weights unless ``model_path`` is given.

    int8 needs ``calibration`` batches; without them random images stand in (fine for timing, not
    for accuracy). ``test_set`` (float32 images at the model's size, labels) adds an ``accuracy``
    entry comparing the session with float32 PyTorch, whose outputs ``reference`` may supply.
    Returns a JSON-serialisable dict (configuration, system, timings).
    """
    if model_path is not None:
        model, _ = load_model(model_path)
        model_size, image_size = model.model_size, model.image_size
    else:
        model = random_model(model_size, tuple(image_size))
    module = InferenceModel(model)
    if precision == "int8" and not calibration:
        rng = np.random.default_rng(0)
        calibration = [rng.random((1, 3, *module.image_size), dtype=np.float32) for _ in range(4)]
    threads = threads or default_threads()
    session = make_session(module, backend, precision, device, threads, compile, calibration, cuda_graphs)
    speed = measure_speed(session, (3, *module.image_size), module.input_dtype, runs, warmup, batch_size)
    accuracy = None
    if test_set is not None:
        images, labels = test_set
        if reference is None:
            reference = run_all(TorchSession(module, "cpu", "fp32", threads=threads), images)
        accuracy = compare(run_all(session, images), reference, labels)
    result = {
        "model_size": model_size,
        "model": None if model_path is None else str(model_path),
        "image_size": list(module.image_size),
        "backend": backend,
        "precision": precision,
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
    from .data import load_images, to_float
    from .datasets import load_split

    split = load_split(format, root, category)
    images = to_float(load_images([sample.path for sample in split.test], image_size)).numpy()
    return images, split.labels, [str(sample.path) for sample in split.test]


def load_calibration_set(root: str | os.PathLike, category: str, image_size: tuple[int, int], count: int = 16, format: str = "mvtec") -> list[np.ndarray]:
    """``count`` evenly spaced training (good) images of a category, one float32 batch of 1 each."""
    from .data import load_images, to_float
    from .datasets import load_split

    train = load_split(format, root, category).train
    chosen = [train[i] for i in np.linspace(0, len(train) - 1, min(count, len(train))).round().astype(int)]
    images = to_float(load_images(chosen, image_size)).numpy()
    return [images[i : i + 1] for i in range(len(images))]
