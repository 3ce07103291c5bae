"""Score images with a deployed model: an ONNX, TorchScript or OpenVINO export, or a ``model.pt``.

:class:`Inferencer` needs only the file: the image size, input dtype and threshold travel inside it
(see :mod:`efficientad.export`). Nothing here imports the training code.

    inferencer = Inferencer.load("bottle.onnx")
    prediction = inferencer.predict("image.png")[0]
    prediction.score, prediction.is_anomalous, prediction.anomaly_map  # map at the image's own size
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import ImageInput, read_image, resize_to_tensor
from .errors import EfficientADError
from .export import TORCHSCRIPT_EXTRA_FILE, detect_format, inference_metadata, parse_metadata
from .inference import InferenceModel, InferenceOutput, OnnxRuntimeSession, OpenVinoSession, TorchSession, check_batch
from .model import load_model


@dataclass
class Prediction:
    """One image's result. Maps are float32 arrays at the image's original size.

    ``anomaly_map`` is the combined map; ``local_map`` (teacher vs student: small defects) and
    ``global_map`` (autoencoder vs student: logical anomalies) say which branch fired. On the
    normalised scale 0 is typical of normal images and 0.1 is their rare extreme. ``score`` is the
    combined map's maximum: at the original size from ``EfficientAD.predict``, at the model's
    output size (its image size unless exported otherwise) from :class:`Inferencer`; the two agree
    to interpolation error.
    """

    score: float
    anomaly_map: np.ndarray
    local_map: np.ndarray
    global_map: np.ndarray
    local_score: float
    global_score: float
    is_anomalous: bool | None


def _resize(map_: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if map_.shape == size:
        return map_
    tensor = torch.from_numpy(np.ascontiguousarray(map_))[None, None]
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()


class Inferencer:
    """A loaded model of any supported format, ready to score images.

    Build it with :meth:`load`. ``threshold`` (from the file, may be overridden) decides
    ``is_anomalous``; ``metadata`` is the JSON embedded at export time.
    """

    def __init__(self, session: TorchSession | OnnxRuntimeSession | OpenVinoSession, metadata: dict[str, Any], format: str):
        self.session = session
        self.metadata = metadata
        self.format = format
        self.image_size: tuple[int, int] = tuple(metadata["image_size"])
        self.input_dtype: str = metadata["input_dtype"]
        self.threshold: float | None = metadata.get("threshold")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        precision: str = "fp32",
        device: str = "cpu",
        threads: int | None = None,
    ) -> Inferencer:
        """Open ``path``, telling the format by its content.

        ``precision``: fp32 everywhere; bf16 for ``model.pt`` (CPU with bf16, or CUDA) and OpenVINO;
        fp16 for ``model.pt`` on CUDA and OpenVINO. ONNX and TorchScript files run as exported.
        """
        format = detect_format(path)
        if format in ("onnx", "torchscript") and precision != "fp32":
            raise EfficientADError(f"{format} files run in the precision they were exported in; use precision='fp32'")
        if format == "native":
            model, model_metadata = load_model(path)
            module = InferenceModel(model)
            metadata = inference_metadata(module, model_metadata.get("threshold"), model_metadata)
            return cls(TorchSession(module, device, precision, threads=threads), metadata, format)
        if format == "torchscript":
            extra = {TORCHSCRIPT_EXTRA_FILE: ""}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: see export.py
                    module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            except (RuntimeError, ValueError) as error:
                raise EfficientADError(f"cannot read TorchScript file {path}: {str(error).splitlines()[0]}") from None
            metadata = parse_metadata(extra[TORCHSCRIPT_EXTRA_FILE], path)
            return cls(TorchSession(module, device, precision, threads=threads), metadata, format)
        if format == "onnx":
            session = OnnxRuntimeSession(path, threads, device)
        else:
            if str(device) != "cpu":
                raise EfficientADError("the OpenVINO backend here runs on the CPU only")
            session = OpenVinoSession(path, precision, threads)
        return cls(session, parse_metadata(session.metadata_text, path), format)

    def run(self, images: np.ndarray | torch.Tensor) -> InferenceOutput:
        """Score a ready batch: (N, 3, H, W) at the model's image size, in its ``input_dtype``."""
        return self.session.run(check_batch(images, self.image_size, self.input_dtype))

    def predict(self, images: Sequence[ImageInput] | ImageInput, batch_size: int = 8) -> list[Prediction]:
        """Score images (paths, PIL images or HxW(xC) arrays); maps come back at each image's size."""
        if isinstance(images, (str, os.PathLike, np.ndarray)) or not isinstance(images, Sequence):
            images = [images]
        if batch_size < 1:
            raise EfficientADError(f"batch_size must be >= 1, got {batch_size}")
        predictions: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            pictures = [read_image(source) for source in images[start : start + batch_size]]
            batch = torch.stack([resize_to_tensor(picture, self.image_size) for picture in pictures]).numpy()
            if self.input_dtype == "float32":
                batch = batch.astype(np.float32) / np.float32(255.0)
            output = self.session.run(batch)
            for i, picture in enumerate(pictures):
                size = (picture.height, picture.width)
                score = float(output.score[i])
                predictions.append(
                    Prediction(
                        score=score,
                        anomaly_map=_resize(output.anomaly_map[i, 0], size),
                        local_map=_resize(output.local_map[i, 0], size),
                        global_map=_resize(output.global_map[i, 0], size),
                        local_score=float(output.local_map[i].max()),
                        global_score=float(output.global_map[i].max()),
                        is_anomalous=None if self.threshold is None else score > self.threshold,
                    )
                )
        return predictions
