"""HTTP serving: :func:`create_app` builds a FastAPI app that scores uploaded images with one model.

The model is an :class:`~efficientad.deploy.inferencer.Inferencer`: a ``model.pt`` or an ONNX,
TorchScript or OpenVINO export, scored by the same path as ``efficientad predict``. Nothing here
imports the training code.

Endpoints: ``POST /predict`` (an image as the multipart field ``file`` or as the raw request body;
``?heatmap=png`` returns the heat-map overlay instead of JSON), ``GET /health``, ``GET /model``,
``GET /`` (a page to drop an image on) and FastAPI's ``/docs`` and ``/openapi.json``.

The path of one request exists once, in :class:`PredictPipeline`, and every endpoint that scores
an upload goes through it: this app's ``/predict``, the many-models app's
``/models/{name}/predict`` (:mod:`efficientad.serve_many`) and both on Ray Serve
(:mod:`efficientad.serve_ray`). A :class:`ServedModel` is one model and its own thread: requests
never race on its state, they queue in arrival order, and the event loop stays free to accept,
read and reject other uploads while an image is scored. Uploads are checked cheaply before they
are decoded: byte size while the body streams in, then the format and pixel count from the image
header, so a decompression bomb is refused without being decompressed.

Bounds, so that no client can take the server from the others: a body must arrive within
``body_timeout`` (408, connection closed; headers have their own deadline, see
:mod:`efficientad.server`); at most ``max_pending`` predictions are in progress, the rest get a
readable 503 (their body is read and dropped first, so the answer is not lost to a connection
reset) while ``/health`` keeps answering; uploads are decoded on :data:`DECODE_THREADS` threads
and each request then keeps only the model's input and, for a heat map, a display copy of at
most ``OVERLAY_MAX_MEGAPIXELS``, so memory follows the number of decoding threads, not the
number of large requests.

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
import ctypes
import io
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from . import __version__
from .config import SERVE_BODY_TIMEOUT, SERVE_MAX_MEGAPIXELS, SERVE_MAX_PENDING, SERVE_MAX_UPLOAD_MB
from .data.images import read_image, resize_to_tensor
from .deploy.inferencer import Inferencer, Prediction
from .errors import EfficientADError, check_count
from .visualize import display_range, heat_map, shrink_for_display

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
# Threads that decode uploads and draw heat maps. Each decoding thread holds up to one image at
# full size (about 7 bytes a pixel while it converts): this bounds decoding memory to about
# DECODE_THREADS x max_megapixels x 7 MB however many large uploads arrive at once.
DECODE_THREADS = 2
# Decodes above this many pixels give their memory back to the system at once.
RELEASE_AFTER_PIXELS = 4_000_000

try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.malloc_trim  # glibc only
except (OSError, AttributeError):
    _libc = None


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


async def read_body(request: Request, limit: int, deadline: float) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes.

    A declared Content-Length is checked before anything is read; chunked bodies are counted as
    they stream in, so an oversized upload never sits in memory whole. A body still incomplete at
    ``deadline`` (``time.monotonic()``) gets 408 and its connection is closed: a client trickling
    bytes cannot hold a request slot for longer than that.
    """
    too_large = _reject(413, f"upload larger than this server's limit of {limit / 1e6:g} MB")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), timeout=max(deadline - time.monotonic(), 0.0))
        except StopAsyncIteration:
            return b"".join(chunks)
        except asyncio.TimeoutError:
            raise HTTPException(408, "upload not received in time", headers={"Connection": "close"}) from None
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)


async def drain_body(request: Request, limit: int, deadline: float) -> None:
    """Read and drop the body, so that a refusal reaches the client instead of a connection reset.

    Closing a socket with unread bytes makes the kernel reset it, and the client may never see the
    answer. Bodies beyond ``limit`` or ``deadline`` are left unread: the connection closes then.
    """
    try:
        await read_body(request, limit, deadline)
    except HTTPException:
        pass


async def upload_bytes(request: Request, limit: int, deadline: float) -> bytes:
    """The uploaded image's bytes: the multipart field ``file``, or else the whole body."""
    body = await read_body(request, limit, deadline)
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


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Read an upload's header (not its pixels), or raise an HTTP 4xx that says what is wrong.

    Empty -> 400; not an image in an allowed format -> 415; more than ``max_pixels`` pixels -> 413
    (from the header, before decompressing: a decompression bomb is never decoded); unreadable header -> 422.
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
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise _reject(
            413,
            f"image is {width}x{height} ({width * height / 1e6:.3g} megapixels); "
            f"this server accepts at most {max_pixels / 1e6:g} megapixels",
        )
    return image


@dataclass
class Upload:
    """What a request keeps of its image while it waits for the model: never the full-size pixels.

    ``model_input`` is the image resized to the model's input size exactly as
    :meth:`Inferencer.predict` would resize the original, so the score is the one ``efficientad
    predict`` gives the same file; ``display`` is a copy of at most ``OVERLAY_MAX_MEGAPIXELS`` for
    the heat map, kept only when one was asked for.
    """

    model_input: np.ndarray
    display: Image.Image | None
    width: int
    height: int


def decode_upload(image: Image.Image, model_size: tuple[int, int], keep_display: bool) -> Upload:
    """Decode an opened upload (see :func:`open_image`) and reduce it to what the request needs; 422 if corrupt."""
    width, height = image.size
    try:
        image.load()
        picture = read_image(image)
    except (OSError, SyntaxError, ValueError) as error:
        raise _reject(422, f"corrupt or truncated image: {error}") from None
    finally:
        # close(), unlike leaving a `with` block, frees the decoded pixels even while the caller
        # still holds the image object.
        image.close()
    model_input = resize_to_tensor(picture, model_size).permute(1, 2, 0).numpy()
    upload = Upload(model_input, shrink_for_display(picture) if keep_display else None, width, height)
    del picture
    if width * height > RELEASE_AFTER_PIXELS:
        release_freed_memory()
    return upload


def release_freed_memory() -> None:
    """Hand memory freed by a large decode back to the system (glibc keeps it otherwise; elsewhere a no-op).

    Without it a server's resident size stays at its largest request's peak (+280 MB for one
    36-megapixel image) long after the request.
    """
    if _libc is not None:
        _libc.malloc_trim(0)


def render_overlay(upload: Upload, prediction: Prediction, threshold: float | None) -> bytes:
    """The heat map over the upload's display copy as PNG bytes, coloured on the scale ``efficientad predict`` uses."""
    buffer = io.BytesIO()
    heat_map(upload.display, prediction, display_range(threshold)).save(buffer, format="PNG")
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
        "precision_choice": inferencer.reason or None,
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


class ServedModel:
    """One loaded model and the one thread that runs it.

    Its predictions run one at a time on that thread, in arrival order, so requests never race on
    the model's state and the event loop stays free to accept, read and reject other uploads. A
    request holds a :meth:`lease` while it uses the model: :meth:`close` (a model evicted or
    replaced by a newer file) ends the thread only once the requests already using it are answered.
    Leases and :meth:`close` belong to the event loop's thread.
    """

    def __init__(self, inferencer: Inferencer):
        self.inferencer = inferencer
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="efficientad-model")
        self._leases = 0
        self._closed = False

    @property
    def threshold(self) -> float | None:
        return self.inferencer.threshold

    @property
    def image_size(self) -> tuple[int, int]:
        return self.inferencer.image_size

    async def infer(self, image: Image.Image | np.ndarray, request: Request | None = None) -> Prediction | None:
        """Score ``image`` on the model's thread; ``None`` when the client left before its turn came.

        Requests queue for the model's thread; one whose client has given up is skipped rather than
        computed, so abandoned requests do not delay the clients still waiting.
        """
        gone = threading.Event()
        inferencer = self.inferencer

        def job() -> Prediction | None:
            if gone.is_set():
                return None
            (prediction,) = inferencer.predict(image)
            return prediction

        future = asyncio.get_running_loop().run_in_executor(self._worker, job)
        while request is not None and not future.done():
            await asyncio.wait({future}, timeout=DISCONNECT_POLL_SECONDS)
            if not future.done() and await request.is_disconnected():
                gone.set()
                break
        return await future

    async def warm_up(self) -> None:
        """One prediction on a blank image: the first forward pass pays for lazy initialisation, before a client does."""
        height, width = self.image_size
        await self.infer(Image.new("RGB", (width, height)))

    @contextmanager
    def lease(self) -> Iterator[ServedModel]:
        self._leases += 1
        try:
            yield self
        finally:
            self._leases -= 1
            if self._closed and not self._leases:
                self._worker.shutdown(wait=False)

    def close(self) -> None:
        """End the model's thread once no request holds a lease; the model's memory goes with the last reference."""
        self._closed = True
        if not self._leases:
            self._worker.shutdown(wait=False)


class PredictPipeline:
    """The one path from an uploaded image to its answer, shared by every endpoint that scores one.

    The body is read under the size limit and the body deadline, the image's header is checked,
    the image is decoded on :data:`DECODE_THREADS` threads and reduced to what the request needs,
    the model scores it on its own thread, and the answer is JSON or the heat map. At most
    ``max_pending`` predictions are in progress in the process, whatever model they are for; more
    get a readable 503 while ``/health`` keeps answering.
    """

    def __init__(
        self,
        *,
        max_upload_mb: float = SERVE_MAX_UPLOAD_MB,
        max_megapixels: float = SERVE_MAX_MEGAPIXELS,
        max_pending: int = SERVE_MAX_PENDING,
        body_timeout: float = SERVE_BODY_TIMEOUT,
    ):
        if max_upload_mb <= 0:
            raise EfficientADError(f"max_upload_mb must be > 0, got {max_upload_mb}")
        if max_megapixels <= 0:
            raise EfficientADError(f"max_megapixels must be > 0, got {max_megapixels}")
        check_count("max_pending", max_pending)
        if not body_timeout > 0:
            raise EfficientADError(f"body_timeout must be > 0, got {body_timeout}")
        self.max_bytes = int(max_upload_mb * 1e6)
        self.max_pixels = int(max_megapixels * 1e6)
        self.max_pending = max_pending
        self.body_timeout = body_timeout
        self.decoder = ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="efficientad-decode")
        # Predictions in progress; only the event loop's thread touches it.
        self.pending = 0

    async def refuse(self, request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> NoReturn:
        """Answer ``status`` with ``message`` once the body is read and dropped (see :func:`drain_body`)."""
        await drain_body(request, self.max_bytes, time.monotonic() + self.body_timeout)
        raise HTTPException(status, message, headers=headers)

    async def predict(
        self, request: Request, heatmap: str | None, model: Callable[[], Awaitable[ServedModel]]
    ) -> Response | PredictResponse:
        """Answer one upload; ``model`` gives the model to score it with, once the upload has passed its checks."""
        if self.pending >= self.max_pending:
            await self.refuse(
                request,
                503,
                f"server busy: {self.max_pending} predictions in progress; retry shortly",
                headers={"Retry-After": "1", "Connection": "close"},
            )
        self.pending += 1
        try:
            return await self._answer(request, heatmap, model)
        finally:
            self.pending -= 1

    async def _answer(self, request: Request, heatmap: str | None, model: Callable[[], Awaitable[ServedModel]]) -> Response | PredictResponse:
        data = await upload_bytes(request, self.max_bytes, time.monotonic() + self.body_timeout)
        arrived = time.perf_counter()
        opened = await run_in_threadpool(open_image, data, self.max_pixels)
        del data
        served = await model()
        loop = asyncio.get_running_loop()
        with served.lease():
            upload = await loop.run_in_executor(self.decoder, decode_upload, opened, served.image_size, heatmap is not None)
            del opened
            prediction = await served.infer(upload.model_input, request)
            threshold = served.threshold
        if prediction is None:  # nobody is left to read an answer; the status is for the access log
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        result = PredictResponse(
            score=prediction.score,
            is_anomalous=prediction.is_anomalous,
            threshold=threshold,
            local_score=prediction.local_score,
            global_score=prediction.global_score,
            latency_ms=round((time.perf_counter() - arrived) * 1000.0, 3),
            width=upload.width,
            height=upload.height,
        )
        if heatmap is None:
            return result
        png = await loop.run_in_executor(self.decoder, render_overlay, upload, prediction, threshold)
        return Response(png, media_type="image/png", headers=score_headers(result))


# The query parameter and route description of every endpoint that scores an upload.
Heatmap = Annotated[Literal["png"] | None, Query(description="'png': answer with the heat-map overlay as a PNG")]
PREDICT_ROUTE: dict[str, Any] = {
    "summary": "score one image",
    "response_model": PredictResponse,
    "responses": {
        200: {"content": {"image/png": {}}, "description": "JSON, or with ?heatmap=png the overlay (scores in X-* headers)"},
        400: {"description": "empty upload, or multipart without the field 'file'"},
        408: {"description": "the upload's body did not arrive within the server's body timeout"},
        413: {"description": "upload over the size limit, or image over the pixel limit"},
        415: {"description": "not an image in an accepted format"},
        422: {"description": "corrupt or truncated image, or a bad query parameter"},
        503: {"description": "too many predictions in progress: retry after the Retry-After seconds"},
    },
    "openapi_extra": {
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
}


def base_app(description: str, lifespan: Callable[[FastAPI], Any]) -> FastAPI:
    """A FastAPI app with the title, version and ``GET /health`` that every serving app shares."""
    app = FastAPI(title="EfficientAD", version=__version__, description=description, lifespan=lifespan)
    started_at = time.time()

    @app.get("/health", summary="liveness: the server answers (serving one model: that model is loaded)")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "uptime_seconds": round(time.time() - started_at, 3)}

    return app


def create_app(
    model: str | os.PathLike | Inferencer,
    *,
    device: str = "cpu",
    precision: str | None = None,
    threshold: float | None = None,
    show_details: bool = False,
    max_upload_mb: float = SERVE_MAX_UPLOAD_MB,
    max_megapixels: float = SERVE_MAX_MEGAPIXELS,
    max_pending: int = SERVE_MAX_PENDING,
    body_timeout: float = SERVE_BODY_TIMEOUT,
) -> FastAPI:
    """Build the serving app around one model.

    ``model`` is a model file (``model.pt`` or an export; loaded now, onto ``device``, in
    ``precision``: see :meth:`Inferencer.load`) or an :class:`Inferencer`, used as it is
    (``device`` and ``precision`` are then ignored, and its own threshold is left untouched).
    ``threshold`` overrides the model's decision threshold for this app (see the module docstring
    for what that threshold is). ``show_details`` lets ``GET /model`` show full paths and library
    versions. Uploads over ``max_upload_mb`` megabytes or ``max_megapixels``
    million pixels are refused with 413; one whose body has not arrived ``body_timeout`` seconds
    after its headers gets 408. At most ``max_pending`` predictions are in progress at once
    (receiving, decoding, queued or running); more get 503 with ``Retry-After``, while ``/health``
    keeps answering.

    Memory per request is bounded by pixels, not only by bytes: uploads are decoded by
    :data:`DECODE_THREADS` threads, and a request then keeps only the image at the model's input
    size (plus a display copy of at most ``OVERLAY_MAX_MEGAPIXELS`` for a heat map).
    """
    pipeline = PredictPipeline(max_upload_mb=max_upload_mb, max_megapixels=max_megapixels, max_pending=max_pending, body_timeout=body_timeout)
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
    served = ServedModel(inferencer)
    page = index_page()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await served.warm_up()
        yield
        served.close()

    async def the_model() -> ServedModel:
        return served

    app = base_app(
        "Visual anomaly detection with EfficientAD: upload an image, get its anomaly score, "
        "verdict and heat map. The verdict compares the score with the decision threshold (see GET /model).",
        lifespan,
    )
    app.state.inferencer = inferencer
    app.state.threshold = inferencer.threshold

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/model", summary="the model: configuration, image size, threshold, teacher, training record")
    async def describe_model() -> dict[str, Any]:
        return model_info(inferencer, inferencer.threshold, threshold is not None, show_details)

    @app.post("/predict", **PREDICT_ROUTE)
    async def predict(request: Request, heatmap: Heatmap = None):
        return await pipeline.predict(request, heatmap, the_model)

    return app
