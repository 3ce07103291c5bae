"""Export a trained model for deployment: ONNX, TorchScript or OpenVINO IR.

Each exported file is the whole inference path of :class:`~efficientad.inference.InferenceModel`
(normalisation, three networks, maps, resize, score) and carries, as embedded JSON, what a runtime
needs besides the graph: image size, input dtype, threshold, output names and the training metadata.
ONNX keeps it in ``metadata_props``, TorchScript in an extra file of its archive, OpenVINO in the
model's ``rt_info``; :class:`~efficientad.inferencer.Inferencer` reads any of them.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import EfficientADError
from .inference import INPUT_DTYPES, InferenceModel
from .model import EfficientADModel, atomic_write, check_format, load_model

EXPORT_FORMATS = ("onnx", "torchscript", "openvino")
METADATA_KEY = "efficientad"
METADATA_FORMAT = "efficientad-inference"
METADATA_FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAMES = ("score", "anomaly_map", "local_map", "global_map")
ONNX_OPSET = 17
TORCHSCRIPT_EXTRA_FILE = "efficientad.json"
# Training-run fields too bulky or too internal to travel with a deployed model.
_DROPPED_FIELDS = ("state_dict", "validation_scores")


def inference_metadata(module: InferenceModel, threshold: float | None, model_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON-serialisable description embedded in every exported file."""
    trained = {k: v for k, v in (model_metadata or {}).items() if k not in _DROPPED_FIELDS}
    return {
        "format": METADATA_FORMAT,
        "format_version": METADATA_FORMAT_VERSION,
        "efficientad_version": __version__,
        "model_size": module.model_size,
        "image_size": list(module.image_size),
        "output_size": list(module.output_size),
        "input_name": INPUT_NAME,
        "input_dtype": module.input_dtype,
        "input_range": [0, 255] if module.input_dtype == "uint8" else [0.0, 1.0],
        "input_layout": "NCHW, RGB",
        "output_names": list(OUTPUT_NAMES),
        "threshold": None if threshold is None else float(threshold),
        "model": json.loads(json.dumps(trained, default=str)),
    }


def _example_input(module: InferenceModel, batch_size: int = 1) -> torch.Tensor:
    shape = (batch_size, 3, *module.image_size)
    if module.input_dtype == "uint8":
        return torch.randint(0, 256, shape, dtype=torch.uint8)
    return torch.rand(shape)


def onnx_bytes(module: InferenceModel, metadata: dict[str, Any] | None = None) -> bytes:
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
            (_example_input(module),),
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


def export_onnx(module: InferenceModel, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write an ONNX file; input ``images`` (N, 3, H, W), outputs as :data:`OUTPUT_NAMES`."""
    content = onnx_bytes(module, metadata)
    return atomic_write(path, lambda target: Path(target).write_bytes(content))


def export_torchscript(module: InferenceModel, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write a traced TorchScript archive with the metadata as its ``efficientad.json`` extra file."""
    module = module.float().eval()
    extra = {TORCHSCRIPT_EXTRA_FILE: json.dumps(metadata)}
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is still what C++ and older
        # deployments load; the warning would only alarm users who asked for it.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module, (_example_input(module),), check_trace=False)
        return atomic_write(path, lambda target: torch.jit.save(traced, target, _extra_files=extra))


def require_openvino():
    """Import OpenVINO or say how to install it."""
    try:
        import openvino
    except ImportError:
        raise EfficientADError("OpenVINO is not installed: pip install 'efficientad[openvino]'") from None
    return openvino


def openvino_model(module_or_onnx: InferenceModel | bytes, metadata: dict[str, Any] | None = None):
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


def export_openvino(module: InferenceModel, path: str | os.PathLike, metadata: dict[str, Any]) -> Path:
    """Write OpenVINO IR: ``path`` (.xml) and the weights beside it (.bin), kept in float32.

    The runtime picks the compute precision (bf16 on CPUs that have it, see
    :class:`~efficientad.inference.OpenVinoSession`); weights compressed to fp16 would lose
    accuracy for every device.
    """
    ov = require_openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise EfficientADError(f"an OpenVINO model is written as NAME.xml (+ NAME.bin), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(openvino_model(module, metadata), str(path), compress_to_fp16=False)
    return path


def export_model(
    model: str | os.PathLike | EfficientADModel,
    format: str,
    out: str | os.PathLike,
    threshold: float | None = None,
    output_size: tuple[int, int] | None = None,
    input_dtype: str = "float32",
    model_metadata: dict[str, Any] | None = None,
) -> Path:
    """Export a model file (or a loaded :class:`EfficientADModel`) to ``format`` at ``out``.

    The threshold defaults to the model file's; ``output_size`` (height, width) of the maps to the
    model's image size; ``input_dtype`` ``"uint8"`` makes the graph take raw bytes in [0, 255].
    """
    if format not in EXPORT_FORMATS:
        raise EfficientADError(f"unknown export format {format!r} (expected one of: {', '.join(EXPORT_FORMATS)})")
    if input_dtype not in INPUT_DTYPES:
        raise EfficientADError(f"input_dtype must be one of {INPUT_DTYPES}, got {input_dtype!r}")
    if format == "openvino":
        require_openvino()
    if isinstance(model, EfficientADModel):
        metadata_in = dict(model_metadata or {})
    else:
        model, metadata_in = load_model(model)
    if threshold is None:
        threshold = metadata_in.get("threshold")
    module = InferenceModel(model, output_size=output_size, input_dtype=input_dtype)
    metadata = inference_metadata(module, threshold, metadata_in)
    writer = {"onnx": export_onnx, "torchscript": export_torchscript, "openvino": export_openvino}[format]
    return writer(module, out, metadata)


def detect_format(path: str | os.PathLike) -> str:
    """``"onnx"``, ``"torchscript"``, ``"openvino"`` or ``"native"`` (a ``model.pt`` file), by content."""
    path = Path(path)
    if not path.is_file():
        raise EfficientADError(f"model file not found: {path}")
    if path.suffix == ".xml":
        return "openvino"
    if path.suffix == ".onnx":
        return "onnx"
    import zipfile

    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        # torch.save archives hold data.pkl; TorchScript archives hold code/ and constants.pkl too.
        if any(name.endswith(f"extra/{TORCHSCRIPT_EXTRA_FILE}") or "/code/" in name for name in names):
            return "torchscript"
        return "native"
    with open(path, "rb") as file:
        head = file.read(64)
    if head.lstrip().startswith(b"<?xml"):
        return "openvino"
    return "onnx"


def check_metadata(metadata: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Validate embedded metadata read from ``path``; returns it."""
    check_format(metadata, path, METADATA_FORMAT, METADATA_FORMAT_VERSION, f"was not exported by efficientad (no '{METADATA_KEY}' metadata)")
    return metadata


def parse_metadata(text: str | None, path: str | os.PathLike) -> dict[str, Any]:
    """Decode embedded metadata text (``None`` when the file has none)."""
    if not text:
        raise EfficientADError(f"{path} was not exported by efficientad (no '{METADATA_KEY}' metadata)")
    try:
        return check_metadata(json.loads(text), path)
    except json.JSONDecodeError:
        raise EfficientADError(f"{path} has unreadable '{METADATA_KEY}' metadata") from None
