"""Every list of allowed values, in one place, free of torch so that the CLI can offer them cheaply.

Library code validates against these with :func:`check_choice`; the CLI passes them to argparse.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import EfficientADError

MODEL_SIZES = ("s", "m")
# Arithmetic of the convolutions; fp16 exists on CUDA only, bf16 on CUDA and on CPUs with native bf16.
PRECISIONS = ("fp32", "bf16", "fp16")
# Pretraining's autocast; fp16 autocast of a backbone distillation was never tried.
PRETRAIN_PRECISIONS = ("fp32", "bf16")
# Training schedules (config.SCHEDULE_SETTINGS): the paper's, and a faster one found by measurement.
SCHEDULES = ("paper", "fast")
DATASET_FORMATS = ("mvtec", "loco", "visa", "folder")
# A collection benchmark's name -> the dataset layout of its categories.
COLLECTIONS = {"mvtec_ad": "mvtec", "loco": "loco", "visa": "visa", "folder": "folder"}
BACKENDS = ("torch", "onnxruntime", "openvino")
# What a deployed model may run in: "auto" picks bf16 where the CPU has it natively, else the
# model's int8 export where it passed its acceptance test, else fp32 (deploy/inferencer.py);
# int8 is an OpenVINO export made by `efficientad export --precision int8` (deploy/quantize.py).
INFERENCE_PRECISIONS = ("auto", *PRECISIONS, "int8")
EXPORT_PRECISIONS = ("fp32", "int8")
# Which precisions each runtime offers to `efficientad bench`; its int8 quantises every convolution
# of the networks without accuracy control (for speed; deployments use an int8 export).
BACKEND_PRECISIONS = {
    "torch": ("fp32", "bf16", "fp16"),
    "onnxruntime": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "fp16", "int8"),
}
EXPORT_FORMATS = ("onnx", "torchscript", "openvino")
# What ``Inferencer.load`` tells apart: the exports plus the native model file.
MODEL_FORMATS = ("native", *EXPORT_FORMATS)
INPUT_DTYPES = ("float32", "uint8")
# The maps a prediction carries: combined, teacher vs student (local), autoencoder vs student (global).
MAP_KINDS = ("anomaly", "local", "global")
# Backbones a teacher can be distilled from: torchvision names and their layer2/layer3 widths.
BACKBONES: dict[str, tuple[int, int]] = {
    "wide_resnet101_2": (512, 1024),
    "wide_resnet50_2": (512, 1024),
    "resnet18": (128, 256),
    "resnet50": (512, 1024),
}


def check_choice(name: str, value: object, allowed: Iterable[object]) -> None:
    """Raise :class:`EfficientADError` naming the parameter unless ``value`` is one of ``allowed``."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise EfficientADError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
