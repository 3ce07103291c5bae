"""Many models behind one endpoint: every model under a folder, by name, loaded on first use.

:func:`create_models_app` serves ``POST /models/{name}/predict`` (the same request, checks,
deadlines and answers as the one-model ``/predict``: both go through
:class:`~efficientad.serve.PredictPipeline`), ``GET /models`` (every name with its file, format,
image size and threshold, and whether it is in memory), ``GET /models/{name}`` (what the
one-model ``GET /model`` says) and ``GET /health``.

The folder's layout, read on each request (a model added later is served; one removed answers 404)::

    DIR/NAME/model.pt              what `efficientad train --out DIR/NAME` and `train-many` write
    DIR/NAME.pt, .onnx, .ts, .xml  a model file or an export directly in DIR, named by its stem

A name is looked up in that order, so a folder's ``model.pt`` wins over ``NAME.pt`` beside it;
``GET /models`` shows which file serves each name. Names are letters, digits, ``.``, ``_`` and
``-``, starting with a letter or a digit: no path, and no hidden or temporary file
(``.NAME.XXXXXXXX.tmp`` while one is written), is ever a model.

A model is loaded on its first request; at most ``max_loaded`` are in memory, the least recently
used is evicted first (its memory goes once the requests already using it are answered), and an
evicted model is loaded again when it is asked for. A file replaced on disk is loaded again on
its next request; see :class:`ModelSlot` for how a file is never read half-replaced.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections import Counter, OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from .config import SERVE_MAX_LOADED
from .deploy.formats import detect_format
from .deploy.inferencer import Inferencer
from .errors import EfficientADError, check_count, first_line
from .model import MODEL_FORMAT, MODEL_FORMAT_VERSION, check_format
from .serve import PREDICT_ROUTE, Heatmap, PredictPipeline, ServedModel, base_app, model_info

logger = logging.getLogger(__name__)

MODEL_FILE = "model.pt"
# Suffixes of a model file or export standing directly in the folder, in the order a name is looked up.
MODEL_SUFFIXES = (".pt", ".onnx", ".ts", ".xml")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# A file that changes during every one of this many loads in a row is not being replaced atomically.
LOAD_ATTEMPTS = 3


def model_file(folder: Path, name: str) -> Path | None:
    """The file that serves ``name`` in ``folder`` now, or ``None``."""
    if not NAME.fullmatch(name):
        return None
    for candidate in (folder / name / MODEL_FILE, *(folder / f"{name}{suffix}" for suffix in MODEL_SUFFIXES)):
        if candidate.is_file():
            return candidate
    return None


def model_files(folder: Path) -> dict[str, Path]:
    """Every model in ``folder``, by name, in name order."""
    names = set()
    with os.scandir(folder) as entries:
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            names.add(entry.name if entry.is_dir() else stem if suffix in MODEL_SUFFIXES else "")
    return {name: path for name in sorted(names) if (path := model_file(folder, name)) is not None}


@dataclass(frozen=True)
class FileStamp:
    """One version of a model file: a file replaced (a new inode) or rewritten (size, time) stamps differently."""

    path: Path
    files: tuple[tuple[int, int, int, int], ...]  # (device, inode, size, mtime in ns) of the file and, for OpenVINO, its .bin

    @classmethod
    def of(cls, path: Path) -> FileStamp | None:
        """The stamp of ``path`` now; ``None`` when it is gone."""
        files = (path, path.with_suffix(".bin")) if path.suffix == ".xml" else (path,)
        try:
            stats = [os.stat(file) for file in files]
        except OSError:
            return None
        return cls(path, tuple((s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns) for s in stats))


def not_found(name: str) -> HTTPException:
    return HTTPException(404, f"no model named '{name}' on this server; GET /models lists the models it has")


def describe_file(path: Path) -> dict[str, Any]:
    """Format, and for a ``model.pt`` its model size, image size and threshold, without loading its weights.

    The tensors of a ``model.pt`` are memory-mapped, not read. An export's metadata sits inside
    its graph, so for exports only the format is told here; the rest once the model is loaded.
    """
    description: dict[str, Any] = {"file_format": detect_format(path), "model_size": None, "image_size": None, "threshold": None}
    if description["file_format"] != "native":
        return description
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for truncated, corrupt or pickled-code files
        raise EfficientADError(f"cannot read model file {path.name}: {first_line(error)}") from None
    check_format(content, path.name, MODEL_FORMAT, MODEL_FORMAT_VERSION, "is not an efficientad model file")
    image_size = content.get("image_size")
    return description | {
        "model_size": content.get("model_size"),
        "image_size": None if image_size is None else list(image_size),
        "threshold": content.get("threshold"),
    }


def describe_loaded(inferencer: Inferencer) -> dict[str, Any]:
    """What :func:`describe_file` tells, from a loaded model."""
    return {
        "file_format": inferencer.format,
        "model_size": inferencer.metadata.get("model_size"),
        "image_size": list(inferencer.image_size),
        "threshold": inferencer.threshold,
    }


class ModelSlot:
    """One name's model in memory: loaded on first use, and again when its file changes on disk.

    Each request stats the file (inode, size, modification time: microseconds). A load stamps the
    file before and after reading it and reads it again when they differ, so a model is never a
    mix of two versions; a file replaced atomically (written beside and renamed, as efficientad
    writes every file) is read whole, old or new. A new version that does not load leaves the old
    one serving, with a warning, and is not tried again until the file changes again.
    """

    def __init__(self, name: str, folder: ModelFolder):
        self.name = name
        self.folder = folder
        self.served: ServedModel | None = None
        self.stamp: FileStamp | None = None
        self._failed: tuple[FileStamp, str] | None = None
        # One load at a time per name: the requests that arrive meanwhile wait for it, not load it again.
        self._lock = asyncio.Lock()

    async def current(self, path: Path) -> ServedModel:
        """The model as the file at ``path`` holds it now: 404 when the file is gone, 503 when it cannot be loaded."""
        stamp = FileStamp.of(path)
        if self.served is not None and stamp == self.stamp:
            return self.served
        async with self._lock:
            stamp = FileStamp.of(path)
            if stamp is None:
                raise not_found(self.name)
            if self.served is not None and stamp == self.stamp:
                return self.served
            if self._failed is not None and self._failed[0] == stamp:
                if self.served is not None:
                    return self.served
                raise HTTPException(503, self._failed[1])
            try:
                inferencer, stamp = await run_in_threadpool(self._load, path)
            except EfficientADError as error:
                # Clients see file names relative to the folder, never the server's paths.
                message = f"model '{self.name}' cannot be loaded: " + str(error).replace(f"{self.folder.folder}{os.sep}", "")
                self._failed = (stamp, message)
                if self.served is None:
                    raise HTTPException(503, message) from None
                logger.warning("%s; serving the version loaded before", message)
                return self.served
            served = ServedModel(inferencer)
            await served.warm_up()
            self.folder.loads[self.name] += 1
            replaced, self.served, self.stamp, self._failed = self.served, served, stamp, None
            if replaced is not None:
                replaced.close()
            return served

    def _load(self, path: Path) -> tuple[Inferencer, FileStamp]:
        for _ in range(LOAD_ATTEMPTS):
            before = FileStamp.of(path)
            if before is None:
                raise EfficientADError(f"{path.name} was removed")
            try:
                inferencer, error = self.folder.open(path), None
            except EfficientADError as failure:
                inferencer, error = None, failure
            if FileStamp.of(path) == before:
                if error is not None:
                    raise error
                return inferencer, before
        raise EfficientADError(f"{path.name} changed during each of {LOAD_ATTEMPTS} reads: replace it atomically (write beside it, then rename)")

    def failure(self, stamp: FileStamp | None) -> str | None:
        """Why the version of the file stamped ``stamp`` could not be loaded, if it could not."""
        return self._failed[1] if self._failed is not None and self._failed[0] == stamp else None

    def close(self) -> None:
        if self.served is not None:
            self.served.close()
        self.served = self.stamp = None


class ModelFolder:
    """The models under one folder by name: which file serves a name, and its :class:`ModelSlot` once used.

    Subclasses decide which slots stay in memory (:meth:`slot`, :meth:`resident`, :meth:`forget`):
    :class:`ModelRegistry` in one process, Ray Serve's model multiplexing on each replica
    (:mod:`efficientad.serve_ray`). ``loads`` counts the loads of each name in this process.
    """

    def __init__(self, folder: str | os.PathLike, *, max_loaded: int = SERVE_MAX_LOADED, device: str = "cpu", precision: str | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EfficientADError(f"model folder not found: {self.folder}")
        check_count("max_loaded", max_loaded)
        self.max_loaded = max_loaded
        self.device = device
        self.precision = precision
        self.loads: Counter[str] = Counter()
        self._described: dict[str, tuple[FileStamp | None, dict[str, Any]]] = {}

    def path(self, name: str) -> Path | None:
        """The file that serves ``name`` now; ``None`` (and its model let go) when there is none."""
        path = model_file(self.folder, name)
        if path is None:
            self.forget(name)
        return path

    def open(self, path: Path) -> Inferencer:
        """Load the file at ``path`` (on a worker thread)."""
        return Inferencer.load(path, device=self.device, precision=self.precision)

    async def model(self, name: str) -> ServedModel:
        """The model called ``name``, loaded if it is not in memory or its file has changed; 404 if there is none."""
        path = self.path(name)
        if path is None:
            raise not_found(name)
        slot = await self.slot(name)
        return await slot.current(path)

    async def slot(self, name: str) -> ModelSlot:
        raise NotImplementedError

    def resident(self, name: str) -> ModelSlot | None:
        """The slot of ``name`` if it is in memory here."""
        raise NotImplementedError

    def forget(self, name: str) -> None:
        """Drop the slot of a name whose file is gone."""

    def close(self) -> None:
        """Let go of every model (at shutdown)."""

    def listing(self) -> list[dict[str, Any]]:
        """``GET /models``: each name with its file (relative to the folder), format, model size, image size and threshold.

        Told from the loaded copy when it is the file's current version, else from the file
        (:func:`describe_file`, read once per version); ``loaded`` says whether a version is in
        memory, ``error`` why the file's current version could not be loaded or read.
        """
        rows = []
        for name, path in model_files(self.folder).items():
            stamp, slot = FileStamp.of(path), self.resident(name)
            served = slot.served if slot is not None else None
            if served is not None and slot.stamp == stamp:
                description = describe_loaded(served.inferencer)
            else:
                cached = self._described.get(name)
                if cached is None or cached[0] != stamp:
                    try:
                        cached = (stamp, describe_file(path))
                    except EfficientADError as error:
                        cached = (stamp, {"error": str(error)})
                    self._described[name] = cached
                description = cached[1]
            failure = slot.failure(stamp) if slot is not None else None
            rows.append({"name": name, "file": path.relative_to(self.folder).as_posix(), **description,
                         "loaded": served is not None, "loads": self.loads[name], **({"error": failure} if failure else {})})
        return rows


class ModelRegistry(ModelFolder):
    """The models of one process: at most ``max_loaded`` in memory, the least recently used evicted first."""

    def __init__(self, folder: str | os.PathLike, **options: Any):
        super().__init__(folder, **options)
        self._slots: OrderedDict[str, ModelSlot] = OrderedDict()

    async def slot(self, name: str) -> ModelSlot:
        slot = self._slots.get(name)
        if slot is None:
            # Room is made before the new model loads, so memory holds max_loaded models, not one more.
            while len(self._slots) >= self.max_loaded:
                self._slots.popitem(last=False)[1].close()
            slot = self._slots[name] = ModelSlot(name, self)
        self._slots.move_to_end(name)
        return slot

    def resident(self, name: str) -> ModelSlot | None:
        return self._slots.get(name)

    def forget(self, name: str) -> None:
        slot = self._slots.pop(name, None)
        if slot is not None:
            slot.close()

    def close(self) -> None:
        while self._slots:
            self._slots.popitem()[1].close()


def create_models_app(models: str | os.PathLike | ModelFolder, *, show_details: bool = False, **limits: Any) -> FastAPI:
    """Build the app that serves every model under a folder by name.

    ``models`` is the folder (served by a :class:`ModelRegistry` with its defaults) or a
    :class:`ModelFolder` (a :class:`ModelRegistry` with its own ``max_loaded``, device and
    precision, or Ray Serve's). ``show_details`` means what it means for
    :func:`efficientad.serve.create_app`; ``limits`` are those of
    :class:`~efficientad.serve.PredictPipeline` (upload size and pixels, pending predictions, body
    deadline), the same as ``create_app``'s, and ``max_pending`` counts every model's predictions together.
    """
    pipeline = PredictPipeline(**limits)
    folder = models if isinstance(models, ModelFolder) else ModelRegistry(models)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        folder.close()

    app = base_app(
        "Visual anomaly detection with EfficientAD, many models by name: upload an image to "
        "/models/{name}/predict, get its anomaly score, verdict and heat map. GET /models lists the models.",
        lifespan,
    )
    app.state.models = folder

    @app.get("/models", summary="every model by name: file, format, image size, threshold, whether it is loaded")
    async def list_models() -> dict[str, Any]:
        return {"max_loaded": folder.max_loaded, "models": await run_in_threadpool(folder.listing)}

    @app.get("/models/{name}", summary="one model: configuration, image size, threshold, training record (loads it)")
    async def describe_model(name: str) -> dict[str, Any]:
        served = await folder.model(name)
        return {"name": name, **model_info(served.inferencer, served.threshold, False, show_details)}

    route = {**PREDICT_ROUTE, "responses": {**PREDICT_ROUTE["responses"], 404: {"description": "no model of that name"}}}

    @app.post("/models/{name}/predict", **route)
    async def predict(name: str, request: Request, heatmap: Heatmap = None):
        if folder.path(name) is None:
            await pipeline.refuse(request, 404, not_found(name).detail)
        return await pipeline.predict(request, heatmap, lambda: folder.model(name))

    return app
