"""Deployment files: write a fused model as ONNX, TorchScript or OpenVINO IR, and open them again.

Each exported file is the whole inference path of :class:`~efficientad.deploy.fused.FusedModel`
(normalisation, three networks, maps, resize, score) and carries, as embedded JSON, what a runtime
needs besides the graph: image size, input dtype, threshold, inference precision, output names and
the training metadata. ONNX keeps it in ``metadata_props``, TorchScript in an extra file of its
archive, OpenVINO in the model's ``rt_info``.

A format is one entry of :data:`FORMATS`: a writer and an opener. Adding one means an entry here, its
name in :data:`efficientad.choices.EXPORT_FORMATS` and, for a new runtime, a session class.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from .. import __version__
from ..choices import EXPORT_FORMATS, INPUT_DTYPES, check_choice
from ..config import INT8_MAX_AU_PRO_DROP, INT8_MAX_AUROC_DROP, INT8_MAX_SCORE_ERROR, INT8_MAX_SPREAD_CHANGE
from ..errors import EfficientADError, first_line
from ..files import atomic_write
from ..model import EfficientADModel, check_format, load_model
from .fused import FusedModel
from ..device import cpu_supports_bf16, int8_kernels_have_vnni
from .graphs import INPUT_NAME, METADATA_KEY, OUTPUT_NAMES, example_input, onnx_bytes, openvino_model, require_openvino
from .runtimes import OPENVINO_PRECISIONS, OnnxRuntimeSession, OpenVinoSession, TorchSession

METADATA_FORMAT = "efficientad-inference"
METADATA_FORMAT_VERSION = 1
TORCHSCRIPT_EXTRA_FILE = "efficientad.json"
# Training-run fields too bulky or too internal to travel with a deployed model.
_DROPPED_FIELDS = ("state_dict", "validation_scores")
# An export whose scores differ from the fused model's by more than this (relative) is refused.
EXPORT_TOLERANCE = 1e-4

Session = TorchSession | OnnxRuntimeSession | OpenVinoSession


def inference_metadata(module: FusedModel, threshold: float | None, model_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
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
        "inference_precision": trained.get("inference_precision", "fp32"),
        "model": json.loads(json.dumps(trained, default=str)),
    }


def parse_metadata(text: str | None, path: str | os.PathLike) -> dict[str, Any]:
    """Decode and check embedded metadata text (``None`` when the file has none)."""
    if not text:
        raise EfficientADError(f"{path} was not exported by efficientad (no '{METADATA_KEY}' metadata)")
    try:
        metadata = json.loads(text)
    except json.JSONDecodeError:
        raise EfficientADError(f"{path} has unreadable '{METADATA_KEY}' metadata") from None
    check_format(metadata, path, METADATA_FORMAT, METADATA_FORMAT_VERSION, f"was not exported by efficientad (no '{METADATA_KEY}' metadata)")
    return metadata


# ------------------------------------------------------------------------------------------ writers
def _write_onnx(module: FusedModel, path: Path, metadata: dict[str, Any]) -> Path:
    content = onnx_bytes(module, metadata)
    return atomic_write(path, lambda target: Path(target).write_bytes(content))


def _write_torchscript(module: FusedModel, path: Path, metadata: dict[str, Any]) -> Path:
    extra = {TORCHSCRIPT_EXTRA_FILE: json.dumps(metadata)}
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.export, but it is still what C++ and older
        # deployments load; the warning would only alarm users who asked for it.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(module.float().eval(), (example_input(module),), check_trace=False)
        return atomic_write(path, lambda target: torch.jit.save(traced, target, _extra_files=extra))


def _write_openvino(module: FusedModel, path: Path, metadata: dict[str, Any]) -> Path:
    return save_openvino(openvino_model(module), path, metadata)


def save_openvino(graph, path: Path, metadata: dict[str, Any]) -> Path:
    """Write an ``openvino.Model`` as IR: ``path`` (.xml) and the weights beside it (.bin), kept in float32.

    The runtime picks the compute precision; weights compressed to fp16 would lose accuracy on every device.
    """
    ov = require_openvino()
    if path.suffix != ".xml":
        raise EfficientADError(f"an OpenVINO model is written as NAME.xml (+ NAME.bin), got {path}")
    graph.set_rt_info(json.dumps(metadata), METADATA_KEY)
    # Loaders open the .xml and read the .bin beside it: the old .xml goes first and the new one comes
    # last, so that however the export is stopped, an .xml on disk has its own .bin. OpenVINO insists on
    # writing NAME.xml, so the pair is staged in the system's temporary folder and copied in from there.
    path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        staged = Path(folder) / "model.xml"
        ov.save_model(graph, str(staged), compress_to_fp16=False)
        for source, target in ((staged.with_suffix(".bin"), path.with_suffix(".bin")), (staged, path)):
            atomic_write(target, lambda temporary: shutil.copyfile(source, temporary))
    return path


# ------------------------------------------------------------------------------------------ openers
def auto_cpu_precision(offered: Sequence[str]) -> str:
    """``auto``'s float choice on a CPU: bf16 where it is offered and native here (never emulated), else fp32."""
    return "bf16" if "bf16" in offered and cpu_supports_bf16() else "fp32"


def _float_precision(precision: str | None, path: Path, offered: tuple[str, ...]) -> str:
    """The precision a float export runs in: ``auto`` is bf16 where offered and native here, ``None`` fp32."""
    if precision is None:
        return "fp32"
    if precision == "int8":
        raise EfficientADError(f"{path} is a float export; make an int8 one with `efficientad export --precision int8`")
    if precision == "auto":
        return auto_cpu_precision(offered)
    if precision not in offered:
        raise EfficientADError(f"{path} runs in {' or '.join(offered)}, not {precision}")
    return precision


def _open_onnx(path: Path, precision: str | None, device: str, threads: int | None) -> tuple[Session, dict[str, Any], str]:
    precision = _float_precision(precision, path, ("fp32",))
    session = OnnxRuntimeSession(path, threads, device)
    return session, parse_metadata(session.metadata_text, path), precision


def _open_torchscript(path: Path, precision: str | None, device: str, threads: int | None) -> tuple[Session, dict[str, Any], str]:
    precision = _float_precision(precision, path, ("fp32",))
    extra = {TORCHSCRIPT_EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: see the writer
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except (RuntimeError, ValueError) as error:
        raise EfficientADError(f"cannot read TorchScript file {path}: {first_line(error)}") from None
    metadata = parse_metadata(extra[TORCHSCRIPT_EXTRA_FILE], path)
    return TorchSession(module, device, precision, threads=threads), metadata, precision


def read_openvino_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata embedded in an OpenVINO export, read without compiling it."""
    return parse_metadata(OpenVinoSession(path, None).metadata_text, path)


def saturates_here(metadata: dict[str, Any]) -> bool:
    """Whether an int8 export's weights use the full int8 range (exports before half-range weights), on a CPU without VNNI."""
    return not metadata.get("int8", {}).get("weights_half_range") and not int8_kernels_have_vnni()


def _open_openvino(path: Path, precision: str | None, device: str, threads: int | None) -> tuple[Session, dict[str, Any], str]:
    if str(device) != "cpu":
        raise EfficientADError("the OpenVINO backend here runs on the CPU only")
    session = OpenVinoSession(path, None, threads)  # the precision is set below, before anything compiles
    metadata = parse_metadata(session.metadata_text, path)
    if metadata["inference_precision"] == "int8":
        if precision not in (None, "auto", "int8"):
            raise EfficientADError(f"{path} is an int8 model: it runs in int8 (precision 'int8' or 'auto'), not {precision}")
        if saturates_here(metadata):
            warnings.warn(
                f"{path} has full-range int8 weights, which this CPU's int8 kernels (no VNNI) saturate: it may score "
                "below its acceptance test (bottle: image AUROC -0.017); export it again",
                stacklevel=3,
            )
        # Its float layers in float32: the arithmetic its quantiles and threshold were measured in.
        session.set_precision("fp32")
        return session, metadata, "int8"
    precision = _float_precision(precision, path, tuple(OPENVINO_PRECISIONS))
    session.set_precision(precision)
    return session, metadata, precision


class ExportFormat(NamedTuple):
    write: Callable[[FusedModel, Path, dict[str, Any]], Path]
    # (path, precision (None, "auto" or one the file runs in), device, threads) -> session, metadata, precision
    open: Callable[[Path, str, str, int | None], tuple[Session, dict[str, Any], str]]


FORMATS: dict[str, ExportFormat] = {
    "onnx": ExportFormat(_write_onnx, _open_onnx),
    "torchscript": ExportFormat(_write_torchscript, _open_torchscript),
    "openvino": ExportFormat(_write_openvino, _open_openvino),
}


def detect_format(path: str | os.PathLike) -> str:
    """``"onnx"``, ``"torchscript"``, ``"openvino"`` or ``"native"`` (a ``model.pt`` file), by content."""
    path = Path(path)
    if not path.is_file():
        raise EfficientADError(f"model file not found: {path}")
    if path.suffix == ".xml":
        return "openvino"
    if path.suffix == ".onnx":
        return "onnx"
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


def open_export(
    path: str | os.PathLike, format: str, precision: str | None = None, device: str = "cpu", threads: int | None = None
) -> tuple[Session, dict[str, Any], str]:
    """A session for an exported file, its embedded metadata and the precision it runs in.

    ``precision=None``: as exported (int8 or fp32). ``"auto"``: an int8 file runs in int8; a float
    OpenVINO file in bf16 where this CPU has it natively, else fp32; ONNX and TorchScript files in fp32.
    """
    check_choice("format", format, EXPORT_FORMATS)
    return FORMATS[format].open(Path(path), precision, str(device), threads)


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
    padded feature grid (64x64 at 256x256; resize it bilinearly to your image, as the Inferencer does); ``input_dtype`` ``"uint8"`` makes the graph take raw bytes in [0, 255].
    The written file is opened again and must give the fused model's scores (relative
    :data:`EXPORT_TOLERANCE`) on a random image, else the export is refused and removed.
    """
    check_choice("format", format, EXPORT_FORMATS)
    check_choice("input_dtype", input_dtype, INPUT_DTYPES)
    if format == "openvino":
        require_openvino()
    if isinstance(model, EfficientADModel):
        metadata_in = dict(model_metadata or {})
    else:
        model, metadata_in = load_model(model)
    if threshold is None:
        threshold = metadata_in.get("threshold")
    module = FusedModel(model, output_size=output_size, input_dtype=input_dtype)
    metadata = inference_metadata(module, threshold, metadata_in)
    path = FORMATS[format].write(module, Path(out), metadata)
    _verify(module, path, format)
    return path


def _verify(module: FusedModel, path: Path, format: str) -> None:
    images = example_input(module)
    with torch.no_grad():
        expected = module(images)[0].numpy()
    images = images.numpy()
    exported, _, _ = open_export(path, format, "fp32")
    got = exported.run(images).score
    error = float(np.max(np.abs(got - expected) / np.maximum(np.abs(expected), 1e-6)))
    if not error <= EXPORT_TOLERANCE:
        for written in (path, path.with_suffix(".bin")) if format == "openvino" else (path,):
            written.unlink(missing_ok=True)
        raise EfficientADError(f"the {format} export gave scores {error:.2e} away from the model's (relative); nothing was written")


def export_int8(
    model: str | os.PathLike | EfficientADModel,
    out: str | os.PathLike,
    calibration: Sequence[np.ndarray],
    validation: Sequence[np.ndarray],
    *,
    threshold: float | None = None,
    model_metadata: dict[str, Any] | None = None,
    max_auroc_drop: float = INT8_MAX_AUROC_DROP,
    max_au_pro_drop: float = INT8_MAX_AU_PRO_DROP,
    max_score_error: float = INT8_MAX_SCORE_ERROR,
    max_spread_change: float = INT8_MAX_SPREAD_CHANGE,
    threads: int | None = None,
    fine_tuned: tuple[FusedModel, dict[str, Any]] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Quantise a model to int8 (:func:`~efficientad.deploy.quantize.quantize_int8`) and write it as OpenVINO IR.

    ``calibration`` and ``validation`` are the model's training and held-out normal images, float32
    (1, 3, H, W) batches (see :func:`~efficientad.deploy.quantize.quantization_images`). The file embeds
    the threshold measured on the int8 model (unless ``threshold`` is given) and the calibration
    record, which is also returned; it is written whether or not it passed its acceptance test
    (``record["accepted"]``), and ``precision="auto"`` uses it only if it passed. ``fine_tuned``: the
    networks after quantisation-aware fine-tuning, with its record, to quantise instead; ``on_trial``:
    called with each quantisation tried, as it is measured.
    """
    from .quantize import quantize_int8

    out = Path(out)
    if out.suffix != ".xml":
        raise EfficientADError(f"an int8 model is written as OpenVINO IR, NAME.xml (+ NAME.bin), got {out}")
    if isinstance(model, EfficientADModel):
        metadata_in = dict(model_metadata or {})
    else:
        model, metadata_in = load_model(model)
    config = metadata_in.get("config", {})
    result = quantize_int8(
        model,
        calibration,
        validation,
        quantile_levels=(config.get("map_quantile_low", 0.9), config.get("map_quantile_high", 0.995)),
        false_positive_rate=config.get("false_positive_rate", 0.01),
        max_auroc_drop=max_auroc_drop,
        max_au_pro_drop=max_au_pro_drop,
        max_score_error=max_score_error,
        max_spread_change=max_spread_change,
        expected_validation_scores=metadata_in.get("validation_scores"),
        threads=threads,
        fine_tuned=fine_tuned,
        on_trial=on_trial,
    )
    module = FusedModel(model)
    metadata = inference_metadata(module, result.threshold if threshold is None else threshold, {**metadata_in, "inference_precision": "int8"})
    metadata["int8"] = {key: value for key, value in result.record.items() if key not in _DROPPED_FIELDS}
    path = save_openvino(result.model, out, metadata)
    # The file must run as the model in memory did: the same scores on the first validation image.
    expected = OpenVinoSession(result.model, "fp32", threads).run(validation[0]).score
    got = open_export(path, "openvino", "int8", threads=threads)[0].run(validation[0]).score
    if not np.allclose(got, expected, rtol=EXPORT_TOLERANCE, atol=1e-6):
        for written in (path, path.with_suffix(".bin")):
            written.unlink(missing_ok=True)
        raise EfficientADError(f"the written int8 model scores {got} where the quantised one scored {expected}; nothing was written")
    return path, result.record
