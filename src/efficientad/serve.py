"""HTTP serving: :func:`create_app` builds a FastAPI app that scores uploaded images with one model.

The model is an :class:`~efficientad.deploy.inferencer.Inferencer`: a ``model.pt`` or an ONNX,
TorchScript or OpenVINO export, scored by the same path as ``efficientad predict``. Nothing here
imports the training code.

Endpoints: ``POST /predict`` (an image as the multipart field ``file`` or as the raw request body;
``?heatmap=png`` returns the heat-map overlay instead of JSON), ``GET /health``, ``GET /model``,
``GET /`` (a page to drop an image on) and FastAPI's ``/docs`` and ``/openapi.json``.

The model is loaded once and runs on one dedicated worker thread: requests never race on its
state, they queue in arrival order, and the event loop stays free to accept, read and reject other
uploads while an image is scored. Uploads are checked cheaply before they are decoded: byte size
while the body streams in, then the format and pixel count from the image header, so a
decompression bomb is refused without being decompressed.

The decision threshold: an image is anomalous when its score (the maximum of its combined anomaly
map) is above it. By default it is the one stored in the model file, which training sets to the
(1 - false_positive_rate) quantile of held-out good images' scores (false_positive_rate is 1 % unless
training said otherwise), so about that fraction of good images is flagged. ``threshold=`` overrides
it for this server; scores are on the normalised scale where 0 is typical of good images and 0.1 is
their rare extreme.
"""

from __future__ import annotations

import asyncio
import copy
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from . import __version__
from .config import SERVE_MAX_MEGAPIXELS, SERVE_MAX_UPLOAD_MB
from .data.images import read_image
from .deploy.inferencer import Inferencer, Prediction
from .errors import EfficientADError
from .visualize import display_range, overlay

# Formats Pillow decodes itself; others (EPS through Ghostscript, for one) would hand uploads to
# external programs, which a server open to uploads should not do.
ALLOWED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")
# Leading bytes of those formats: an upload that starts like one but does not open is corrupt, not foreign.
SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
UPLOAD_FIELD = "file"
# How often a queued request checks whether its client is still there.
DISCONNECT_POLL_SECONDS = 0.05
# nginx's status for a request whose client closed the connection before the answer.
CLIENT_CLOSED_REQUEST = 499


class PredictResponse(BaseModel):
    """What ``POST /predict`` answers for one image."""

    score: float = Field(description="image anomaly score: the maximum of the combined anomaly map")
    is_anomalous: bool | None = Field(description="score > threshold; null when the model has no threshold")
    threshold: float | None = Field(description="the decision threshold in use (the model file's unless overridden)")
    local_score: float = Field(description="maximum of the local (teacher vs student) map: small defects")
    global_score: float = Field(description="maximum of the global (autoencoder vs student) map: logical anomalies")
    latency_ms: float = Field(description="server time from the upload's arrival to the answer: decoding, queueing, inference")
    width: int = Field(description="the uploaded image's width in pixels")
    height: int = Field(description="the uploaded image's height in pixels")


def _reject(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length is checked before anything is read; chunked bodies are counted as
    they stream in, so an oversized upload never sits in memory whole.
    """
    too_large = _reject(413, f"upload larger than this server's limit of {limit / 1e6:g} MB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def upload_bytes(request: Request, limit: int) -> bytes:
    """The uploaded image's bytes: the multipart field ``file``, or else the whole body."""
    body = await read_body(request, limit)
    if not request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return body
    sent = False

    async def replay() -> dict[str, Any]:
        # The body was read once, under the size limit; hand the same bytes to the form parser.
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async with Request(request.scope, replay).form(max_files=1, max_fields=16) as form:
        upload = form.get(UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            raise _reject(400, f"multipart upload without an image in the field '{UPLOAD_FIELD}'")
        return await upload.read()


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode upload bytes into an RGB image, or raise an HTTP 4xx that says what is wrong.

    Empty -> 400; not an image in an allowed format -> 415; more than ``max_pixels`` pixels -> 413
    (checked from the header, before decompressing); corrupt or truncated -> 422.
    """
    if not data:
        raise _reject(400, f"empty upload: send the image as the request body or as the multipart field '{UPLOAD_FIELD}'")
    try:
        image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except UnidentifiedImageError:
        claimed = next((name for magic, name in SIGNATURES.items() if data.startswith(magic)), None)
        if claimed is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            claimed = "WEBP"
        if claimed is not None:
            raise _reject(422, f"corrupt {claimed} image: its header cannot be read") from None
        raise _reject(415, f"not an image, or not one of the accepted formats ({', '.join(ALLOWED_FORMATS)})") from None
    except Image.DecompressionBombError as error:
        raise _reject(413, f"image has too many pixels: {error}") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise _reject(422, f"corrupt image: {error}") from None
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise _reject(
                413,
                f"image is {width}x{height} ({width * height / 1e6:.3g} megapixels); "
                f"this server accepts at most {max_pixels / 1e6:g} megapixels",
            )
        try:
            image.load()
            return read_image(image)
        except (OSError, SyntaxError, ValueError) as error:
            raise _reject(422, f"corrupt or truncated image: {error}") from None


def render_overlay(image: Image.Image, prediction: Prediction, threshold: float | None) -> bytes:
    """The heat map over the image as PNG bytes, coloured on the scale ``efficientad predict`` uses."""
    buffer = io.BytesIO()
    overlay(image, prediction.anomaly_map, display_range(threshold)).save(buffer, format="PNG")
    return buffer.getvalue()


def score_headers(result: PredictResponse) -> dict[str, str]:
    """The JSON answer's fields as ``X-...`` response headers, for the ``?heatmap=png`` answer.

    Floats are written in full (``repr``), so a client reads back exactly the JSON's value.
    """

    def text(value: float | bool | None) -> str:
        if value is None:
            return "none"
        if isinstance(value, bool):
            return "true" if value else "false"
        return repr(value)

    return {
        "X-Anomaly-Score": text(result.score),
        "X-Is-Anomalous": text(result.is_anomalous),
        "X-Threshold": text(result.threshold),
        "X-Local-Score": text(result.local_score),
        "X-Global-Score": text(result.global_score),
        "X-Latency-Ms": text(result.latency_ms),
        "X-Image-Width": str(result.width),
        "X-Image-Height": str(result.height),
    }


def _file_name(value: Any) -> Any:
    """A path's last part; other values as they are."""
    return Path(value).name if isinstance(value, str) and ("/" in value or "\\" in value) else value


def model_info(inferencer: Inferencer, threshold: float | None, overridden: bool, details: bool = False) -> dict[str, Any]:
    """What ``GET /model`` answers: the model's configuration, threshold and training record.

    Paths (teacher, penalty images) are cut to their file names, and library versions left out, unless
    ``details``: a server's folders and exact versions help an attacker more than a user.
    """
    trained = inferencer.metadata.get("model") or {}
    config = trained.get("config") or {}
    training = trained.get("training") or {}
    if not details:
        config = {key: _file_name(value) for key, value in config.items()}
    info = {
        "model_size": inferencer.metadata.get("model_size"),
        "image_size": list(inferencer.image_size),
        "file_format": inferencer.format,
        "precision": inferencer.precision,
        "threshold": threshold,
        "threshold_source": "override" if overridden else "model file",
        "model_file_threshold": inferencer.metadata.get("threshold"),
        "false_positive_rate": config.get("false_positive_rate"),
        "teacher_source": trained.get("teacher_source") if details else _file_name(trained.get("teacher_source")),
        "training_seconds": training.get("total_seconds"),
        "n_train_images": trained.get("n_train_images"),
        "n_validation_images": trained.get("n_validation_images"),
        "metrics": trained.get("metrics"),
        "config": config,
        "calibration": trained.get("calibration"),
        "device": str(getattr(inferencer.session, "device", "cpu")),
    }
    if details:
        info.update(versions=trained.get("versions"), server_version=__version__)
    return info


def index_page() -> str:
    """The drag-and-drop page shipped in the package's ``static`` folder."""
    return resources.files("efficientad").joinpath("static", "index.html").read_text(encoding="utf-8")


def create_app(
    model: str | os.PathLike | Inferencer,
    *,
    device: str = "cpu",
    precision: str | None = None,
    threshold: float | None = None,
    show_details: bool = False,
    max_upload_mb: float = SERVE_MAX_UPLOAD_MB,
    max_megapixels: float = SERVE_MAX_MEGAPIXELS,
) -> FastAPI:
    """Build the serving app around one model.

    ``model`` is a model file (``model.pt`` or an export; loaded now, onto ``device``, in
    ``precision``, by default the one it was calibrated in) or an :class:`Inferencer`, used as it is
    (``device`` and ``precision`` are then ignored, and its own threshold is left untouched).
    ``threshold`` overrides the model's decision threshold for this app (see the module docstring
    for what that threshold is). ``show_details`` lets ``GET /model`` show full paths and library
    versions. Uploads over ``max_upload_mb`` megabytes or ``max_megapixels``
    million pixels are refused with 413.
    """
    if max_upload_mb <= 0:
        raise EfficientADError(f"max_upload_mb must be > 0, got {max_upload_mb}")
    if max_megapixels <= 0:
        raise EfficientADError(f"max_megapixels must be > 0, got {max_megapixels}")
    if isinstance(model, Inferencer):
        # A shallow copy shares the loaded session; its threshold is this app's alone.
        inferencer = copy.copy(model)
    elif not isinstance(model, (str, os.PathLike)):
        raise EfficientADError(
            f"model must be a model file or an Inferencer, got {type(model).__name__} (an EfficientAD serves as its .inferencer)"
        )
    else:
        inferencer = Inferencer.load(model, precision=precision, device=device)
    if threshold is not None:
        inferencer.threshold = float(threshold)
    decision_threshold = inferencer.threshold
    max_bytes = int(max_upload_mb * 1e6)
    max_pixels = int(max_megapixels * 1e6)
    page = index_page()
    # One thread owns the model: inference is serialised without a lock held across awaits.
    worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="efficientad-model")
    started_at = time.time()

    async def infer(image: Image.Image, request: Request | None = None) -> Prediction | None:
        """Score ``image`` on the model's thread; ``None`` when the client left before its turn came.

        Requests queue for the one model thread; one whose client has given up is skipped rather
        than computed, so abandoned requests do not delay the clients still waiting.
        """
        gone = threading.Event()

        def job() -> Prediction | None:
            if gone.is_set():
                return None
            (prediction,) = inferencer.predict(image)
            return prediction

        future = asyncio.get_running_loop().run_in_executor(worker, job)
        while request is not None and not future.done():
            await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
            if not future.done() and await request.is_disconnected():
                gone.set()
                break
        return await future

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # The first forward pass pays for lazy initialisation; pay it before the first client does.
        height, width = inferencer.image_size
        await infer(Image.new("RGB", (width, height)))
        yield

    app = FastAPI(
        title="EfficientAD",
        version=__version__,
        description="Visual anomaly detection with EfficientAD: upload an image, get its anomaly score, "
        "verdict and heat map. The verdict compares the score with the decision threshold (see GET /model).",
        lifespan=lifespan,
    )
    app.state.inferencer = inferencer
    app.state.threshold = decision_threshold

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health", summary="liveness: the model is loaded and the server answers")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "uptime_seconds": round(time.time() - started_at, 3)}

    @app.get("/model", summary="the model: configuration, image size, threshold, teacher, training record")
    async def describe_model() -> dict[str, Any]:
        return model_info(inferencer, decision_threshold, threshold is not None, show_details)

    @app.post(
        "/predict",
        summary="score one image",
        response_model=PredictResponse,
        responses={
            200: {"content": {"image/png": {}}, "description": "JSON, or with ?heatmap=png the overlay (scores in X-* headers)"},
            400: {"description": "empty upload, or multipart without the field 'file'"},
            413: {"description": "upload over the size limit, or image over the pixel limit"},
            415: {"description": "not an image in an accepted format"},
            422: {"description": "corrupt or truncated image, or a bad query parameter"},
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {UPLOAD_FIELD: {"type": "string", "format": "binary"}},
                            "required": [UPLOAD_FIELD],
                        }
                    },
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                    "image/*": {"schema": {"type": "string", "format": "binary"}},
                },
            }
        },
    )
    async def predict(
        request: Request,
        heatmap: Literal["png"] | None = Query(None, description="'png': answer with the heat-map overlay as a PNG"),
    ):
        data = await upload_bytes(request, max_bytes)
        arrived = time.perf_counter()
        image = await run_in_threadpool(decode_image, data, max_pixels)
        prediction = await infer(image, request)
        if prediction is None:  # nobody is left to read an answer; the status is for the access log
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        result = PredictResponse(
            score=prediction.score,
            is_anomalous=prediction.is_anomalous,
            threshold=decision_threshold,
            local_score=prediction.local_score,
            global_score=prediction.global_score,
            latency_ms=round((time.perf_counter() - arrived) * 1000.0, 3),
            width=image.width,
            height=image.height,
        )
        if heatmap is None:
            return result
        png = await run_in_threadpool(render_overlay, image, prediction, decision_threshold)
        return Response(png, media_type="image/png", headers=score_headers(result))

    return app
