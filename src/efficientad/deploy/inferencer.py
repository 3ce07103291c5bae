"""Score images with a deployed model: a ``model.pt``, or an ONNX, TorchScript or OpenVINO export.

:class:`Inferencer` is the one path from image to :class:`Prediction`: ``EfficientAD.predict``,
``efficientad predict``, ``eval`` and ``serve`` all go through it. It needs only the file: the
image size, input dtype, threshold and inference precision travel inside it. Nothing here imports
the training code.

    inferencer = Inferencer.load("bottle.onnx")
    prediction = inferencer.predict("image.png")[0]
    prediction.score, prediction.is_anomalous, prediction.anomaly_map  # map at the image's own size
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ..choices import BACKEND_PRECISIONS, BACKENDS, INFERENCE_PRECISIONS, MAP_KINDS, check_choice
from ..config import PREDICT_BATCH_SIZE
from ..data.images import ImageInput, read_image, resize_to_tensor
from ..device import cpu_supports_bf16, resolve_device, usable_precision
from ..errors import EfficientADError, check_count
from ..model import EfficientADModel, load_model, resize_maps
from .formats import Session, auto_cpu_precision, detect_format, inference_metadata, open_export, read_openvino_metadata, saturates_here
from .graphs import require_openvino
from .fused import FusedModel
from .runtimes import InferenceOutput, check_batch, make_session

# The runtime that runs each exported format.
FORMAT_BACKENDS = {"onnx": "onnxruntime", "torchscript": "torch", "openvino": "openvino"}


def _resize(map_: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if map_.shape == size:
        return map_
    return resize_maps(torch.from_numpy(np.ascontiguousarray(map_))[None, None], size)[0, 0].numpy()


@dataclass(eq=False)
class Prediction:
    """One image's result.

    ``score`` is the maximum of the combined map at the model's image size: the number the
    threshold was calibrated on, whatever the size of the image. ``local_score`` (teacher vs
    student: small defects) and ``global_score`` (autoencoder vs student: logical anomalies) are
    their branches' maxima at the model's image size, like ``score``. On the normalised scale 0 is
    typical of normal images and 0.1 is their rare extreme.

    ``anomaly_map`` (combined), ``local_map`` and ``global_map`` are float32 arrays at the image's
    own size (``image_size``, height and width), for pixel metrics; each is computed on first use
    from ``maps``, the model's output grid, so a 36-megapixel image costs no full-size maps unless
    they are asked for. :meth:`map_at` resizes to any other size, e.g. a smaller display.
    """

    score: float
    local_score: float
    global_score: float
    is_anomalous: bool | None
    maps: np.ndarray  # (3, h, w): combined, local and global, at the model's output resolution
    image_size: tuple[int, int]

    def map_at(self, size: tuple[int, int], kind: str = "anomaly") -> np.ndarray:
        """The ``kind`` map ('anomaly', 'local' or 'global') resized straight from the model's grid to ``size``."""
        check_choice("kind", kind, MAP_KINDS)
        return _resize(self.maps[MAP_KINDS.index(kind)], tuple(size))

    @cached_property
    def anomaly_map(self) -> np.ndarray:
        return self.map_at(self.image_size)

    @cached_property
    def local_map(self) -> np.ndarray:
        return self.map_at(self.image_size, "local")

    @cached_property
    def global_map(self) -> np.ndarray:
        return self.map_at(self.image_size, "global")


def int8_path(model_path: str | os.PathLike) -> Path:
    """Where ``efficientad export --precision int8`` puts a model's int8 export by default, and ``auto`` looks."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.int8.xml")


def int8_export_of(model_path: str | os.PathLike, model_metadata: dict[str, Any]) -> tuple[Path | None, str]:
    """The accepted int8 export of this model beside its file, or None and why there is none."""
    path = int8_path(model_path)
    if not path.is_file():
        return None, f"no int8 export ({path.name}; make one with `efficientad export --precision int8`)"
    try:
        require_openvino()
        metadata = read_openvino_metadata(path)
    except EfficientADError as error:
        return None, f"{path.name} is unusable: {error}"
    if metadata.get("inference_precision") != "int8" or metadata.get("model", {}).get("tensor_sha256") != model_metadata.get("tensor_sha256"):
        return None, f"{path.name} is not an int8 export of this model (export it again)"
    if not metadata.get("int8", {}).get("accepted"):
        return None, f"{path.name} failed its acceptance test (see its record)"
    if saturates_here(metadata):
        return None, f"{path.name} has full-range int8 weights, which this CPU's int8 kernels (no VNNI) saturate: export it again"
    return path, f"{path.name} passed its acceptance test"


def _why(precision: str) -> str:
    return {
        "bf16": "bf16 (this CPU has native bf16)",
        "fp32": "fp32 (this CPU has no native bf16)",
        "int8": "int8 (an int8 export)",
    }.get(precision, precision)


class Inferencer:
    """A loaded model of any supported format, ready to score images.

    Build it with :meth:`load` (a file) or :meth:`from_model` (a model in memory). ``threshold``
    (from the file; may be overridden by assigning it) decides ``is_anomalous``; ``metadata`` is
    the JSON embedded at export time; ``precision`` is the arithmetic its session runs.
    """

    def __init__(self, session: Session, metadata: dict[str, Any], format: str, precision: str = "fp32", reason: str = ""):
        self.session = session
        self.metadata = metadata
        self.format = format
        self.precision = precision
        # Why this precision, when it was chosen rather than asked for ("auto").
        self.reason = reason
        self.image_size: tuple[int, int] = tuple(metadata["image_size"])
        self.input_dtype: str = metadata["input_dtype"]
        self.threshold: float | None = metadata.get("threshold")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        backend: str | None = None,
        precision: str | None = None,
        device: str = "cpu",
        threads: int | None = None,
    ) -> Inferencer:
        """Open ``path``, telling the format by its content.

        ``precision``:

        - ``None``: the precision the model was calibrated in, where this machine runs it natively
          (else fp32, with a warning), so that its validation images score exactly what calibration
          measured; an export runs in the precision it was exported in (fp32 or int8).
        - ``"auto"``: the fastest that keeps accuracy here. On a CPU: bf16 where the CPU has it natively;
          else the model's int8 export (``model.int8.xml`` beside ``model.pt``, made by ``efficientad
          export --precision int8`` from this very model) where it passed its acceptance test; else
          fp32. On a GPU, as ``None``. :attr:`reason` says what was chosen and why.
        - ``"fp32"``, ``"bf16"``, ``"fp16"``, ``"int8"``: that one, or an error that says why not.

        A ``model.pt`` runs on any ``backend``; an export runs on its own runtime.
        """
        check_choice("precision", precision, (None, *INFERENCE_PRECISIONS))
        format = detect_format(path)
        if format != "native":
            if backend is not None and backend != FORMAT_BACKENDS[format]:
                raise EfficientADError(f"a {format} file runs on the {FORMAT_BACKENDS[format]} backend, not {backend!r}")
            session, metadata, chosen = open_export(path, format, precision, device, threads)
            reason = ""
            if precision == "auto":
                reason = f"auto: {_why(chosen)}" if format == "openvino" else f"auto: fp32 (what {FORMAT_BACKENDS[format]} runs {format} files in)"
            return cls(session, metadata, format, chosen, reason)
        model, model_metadata = load_model(path)
        on_cpu = resolve_device(device).type == "cpu"
        if precision == "int8" or (precision == "auto" and on_cpu and backend in (None, "openvino") and not cpu_supports_bf16()):
            int8, why_not = int8_export_of(path, model_metadata)
            if int8 is not None and on_cpu:
                inferencer = cls.load(int8, precision="int8", threads=threads)
                if precision == "auto":
                    inferencer.reason = f"auto: int8 ({int8.name} passed its acceptance test; this CPU has no native bf16)"
                return inferencer
            if precision == "int8":
                raise EfficientADError(f"no int8 model for {path}: {why_not if on_cpu else 'int8 runs on the CPU'}")
        reason = ""
        if precision == "auto":
            if on_cpu:
                precision = auto_cpu_precision(BACKEND_PRECISIONS[backend or "torch"])
                reason = f"auto: {_why(precision)}"
                if precision == "fp32" and backend in (None, "openvino"):
                    reason += f"; {int8_export_of(path, model_metadata)[1]}"
            else:
                precision = None
        inferencer = cls.from_model(model, model_metadata, backend=backend or "torch", precision=precision, device=device, threads=threads)
        inferencer.reason = reason
        return inferencer

    @classmethod
    def from_model(
        cls,
        model: EfficientADModel,
        model_metadata: dict[str, Any],
        *,
        backend: str = "torch",
        precision: str | None = None,
        device: str | torch.device = "cpu",
        threads: int | None = None,
    ) -> Inferencer:
        """An inferencer for a model in memory; ``model_metadata`` is what its model file holds besides weights.

        ``precision=None`` is the model's calibration precision where native here (see :meth:`load`).
        """
        check_choice("backend", backend, BACKENDS)
        if precision is None:
            stored = model_metadata.get("inference_precision", "fp32")
            precision = stored if stored in BACKEND_PRECISIONS[backend] else "fp32"
            precision = usable_precision(precision, resolve_device(device))
        module = FusedModel(model)
        session = make_session(module, backend, precision, device, threads)
        metadata = inference_metadata(module, model_metadata.get("threshold"), {**model_metadata, "inference_precision": precision})
        return cls(session, metadata, "native", precision)

    def run(self, images: np.ndarray | torch.Tensor) -> InferenceOutput:
        """Score a ready batch: (N, 3, H, W) at the model's image size, in its ``input_dtype``."""
        return self.session.run(check_batch(images, self.image_size, self.input_dtype))

    def predict(self, images: Sequence[ImageInput] | ImageInput, batch_size: int = PREDICT_BATCH_SIZE) -> list[Prediction]:
        """Score images (paths, PIL images or HxW(xC) arrays); maps come back at each image's size."""
        if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        check_count("batch_size", batch_size)
        predictions: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            pictures = [read_image(source) for source in images[start : start + batch_size]]
            batch = torch.stack([resize_to_tensor(picture, self.image_size) for picture in pictures]).numpy()
            if self.input_dtype == "float32":
                batch = batch.astype(np.float32) / np.float32(255.0)
            output = self.session.run(batch)
            predictions += [self._prediction(output, i, (picture.height, picture.width)) for i, picture in enumerate(pictures)]
        return predictions

    def _prediction(self, output: InferenceOutput, i: int, size: tuple[int, int]) -> Prediction:
        score = float(output.score[i])
        return Prediction(
            score=score,
            local_score=float(_resize(output.local_map[i, 0], self.image_size).max()),
            global_score=float(_resize(output.global_map[i, 0], self.image_size).max()),
            is_anomalous=None if self.threshold is None else score > self.threshold,
            maps=np.stack([output.anomaly_map[i, 0], output.local_map[i, 0], output.global_map[i, 0]]),
            image_size=size,
        )
