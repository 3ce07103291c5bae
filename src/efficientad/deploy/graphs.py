"""The fused model as other runtimes' graphs: ONNX (also int8-quantised) and OpenVINO, in memory.

Writing them to files, with the metadata a deployment needs, is :mod:`efficientad.deploy.formats`'s job.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import EfficientADError
from .fused import FusedModel

METADATA_KEY = "efficientad"
INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "anomaly_map", "local_map", "global_map")
ONNX_OPSET = 17


def example_input(module: FusedModel, batch_size: int = 1) -> torch.Tensor:
    shape = (batch_size, 3, *module.image_size)
    if module.input_dtype == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    return torch.rand(shape)


def onnx_bytes(module: FusedModel, metadata: dict[str, Any] | None = None) -> bytes:
    """The module as an ONNX model (batch dimension dynamic), with ``metadata`` embedded."""
    import onnx

    module = module.float().eval()
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in (INPUT_NAME, *OUTPUT_NAMES)}
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of one that needs onnxscript.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example_input(module),),
            buffer,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=axes,
            opset_version=ONNX_OPSET,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    if metadata is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(metadata)
    proto.producer_name, proto.producer_version = "efficientad", __version__
    return proto.SerializeToString()


def require_openvino():
    """Import OpenVINO or say how to install it."""
    try:
        import openvino
    except ImportError:
        raise EfficientADError("OpenVINO is not installed: pip install 'efficientad[openvino]'") from None
    return openvino


def openvino_model(module_or_onnx: FusedModel | bytes, metadata: dict[str, Any] | None = None):
    """An in-memory ``openvino.Model`` converted from the module's ONNX graph."""
    ov = require_openvino()
    content = module_or_onnx if isinstance(module_or_onnx, bytes) else onnx_bytes(module_or_onnx)
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "model.onnx"
        source.write_bytes(content)
        # Core.read_model rather than openvino.convert_model: the same ONNX front end, without the
        # telemetry process that convert_model forks (which crashes when forked from a threaded process).
        converted = ov.Core().read_model(str(source))
    if metadata is not None:
        converted.set_rt_info(json.dumps(metadata), METADATA_KEY)
    return converted


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


