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
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ..choices import BACKEND_PRECISIONS, BACKENDS, MAP_KINDS, check_choice
from ..config import PREDICT_BATCH_SIZE
from ..data.images import ImageInput, read_image, resize_to_tensor
from ..device import resolve_device, usable_precision
from ..errors import EfficientADError
from ..model import EfficientADModel, load_model, resize_maps
from .formats import Session, detect_format, inference_metadata, open_export
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


class Inferencer:
    """A loaded model of any supported format, ready to score images.

    Build it with :meth:`load` (a file) or :meth:`from_model` (a model in memory). ``threshold``
    (from the file; may be overridden by assigning it) decides ``is_anomalous``; ``metadata`` is
    the JSON embedded at export time; ``precision`` is the arithmetic its session runs.
    """

    def __init__(self, session: Session, metadata: dict[str, Any], format: str, precision: str = "fp32"):
        self.session = session
        self.metadata = metadata
        self.format = format
        self.precision = precision
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

        ``precision=None`` runs the precision the model was calibrated in where this machine runs
        it natively (else fp32, with a warning). A ``model.pt`` runs on any ``backend``; an export
        runs on its own runtime, in the precision it was exported in (OpenVINO: any it offers).
        """
        format = detect_format(path)
        if format == "native":
            model, model_metadata = load_model(path)
            return cls.from_model(model, model_metadata, backend=backend or "torch", precision=precision, device=device, threads=threads)
        if backend is not None and backend != FORMAT_BACKENDS[format]:
            raise EfficientADError(f"a {format} file runs on the {FORMAT_BACKENDS[format]} backend, not {backend!r}")
        precision = precision or "fp32"
        session, metadata = open_export(path, format, precision, device, threads)
        return cls(session, metadata, format, precision)

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
        """An inferencer for a model in memory; ``model_metadata`` is what its model file holds besides weights."""
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
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise EfficientADError(f"batch_size must be an integer >= 1, got {batch_size!r}")
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
