"""``efficientad serve --ray``: the same HTTP API on Ray Serve, on a local Ray or on a cluster.

Every replica runs the FastAPI app of ``efficientad serve`` (:class:`Replica` builds it inside the
replica), so uploads, checks, deadlines and answers are the same code as in one process; Ray's
HTTP proxy spreads requests over the replicas. Serving a folder (``--models``), each replica keeps
at most ``max_loaded`` models through Ray Serve's model multiplexing (:class:`RayModels`).

Ray's proxy, not uvicorn with :mod:`efficientad.server`, owns the sockets, so of the guards
against slow clients only these carry over: the keep-alive timeout (its ``keep_alive_timeout_s``),
and an end-to-end deadline per request (its ``request_timeout_s``, answered 408; Ray lets a client
lift it with the ``x-request-timeout-seconds`` header, so it is no defence against a hostile
client). The header deadline and the connection cap do not apply. Size, pixel and body-time
limits and the pending limit apply in each replica; the proxy queues at most ``max_pending``
requests waiting for a replica and answers 503 beyond.

Ray is imported only here, and only when used: the base install has no Ray (see :func:`require_ray`).
"""

from __future__ import annotations

import math
import signal
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from .errors import EfficientADError, first_line
from .serve import create_app
from .serve_many import ModelFolder, ModelSlot, create_models_app, not_found

APP_NAME = "efficientad"
# Requests a replica takes beyond max_pending predictions, so that /health and /models answer while it is full.
CONTROL_REQUESTS = 8


def require_ray() -> tuple[Any, Any]:
    """The ``ray`` and ``ray.serve`` modules, or a one-line error that says how to install them."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise EfficientADError('serving on Ray needs Ray Serve, which is not installed: pip install "efficientad[ray]"') from None
    return ray, serve


class RayModels(ModelFolder):
    """A replica's models, kept by Ray Serve's model multiplexing: at most ``max_loaded``, least recently used out first.

    Ray routes a request to a replica that already has its model when the request carries the
    header ``serve_multiplexed_model_id`` (set it to the name in the URL); without it, a replica
    loads whichever models it is asked for. An evicted model's memory and thread go once the
    requests using it are answered and nothing refers to it any more.
    """

    def __init__(self, folder: str, **options: Any):
        super().__init__(folder, **options)
        _, serve = require_ray()
        self._slots: weakref.WeakValueDictionary[str, ModelSlot] = weakref.WeakValueDictionary()

        async def load_slot(name: str) -> ModelSlot:
            path = self.path(name)
            if path is None:
                raise not_found(name)
            slot = ModelSlot(name, self)
            await slot.current(path)
            self._slots[name] = slot
            return slot

        self._cached = serve.multiplexed(max_num_models_per_replica=self.max_loaded)(load_slot)

    async def slot(self, name: str) -> ModelSlot:
        return await self._cached(name)

    def resident(self, name: str) -> ModelSlot | None:
        return self._slots.get(name)


class Replica:
    """One Ray Serve replica; Ray calls :meth:`__serve_build_asgi_app__` in the replica to get its app.

    ``target`` is a model file (``many`` false: :func:`~efficientad.serve.create_app`) or a folder
    of models (:func:`~efficientad.serve_many.create_models_app`); ``options`` go to the app,
    ``folder_options`` (``max_loaded``, ``device``, ``precision``) to :class:`RayModels`. torch
    runs ``threads`` threads: as many as the CPUs Ray reserved for the replica, so that replicas
    on one machine do not fight over its cores.
    """

    def __init__(self, target: str, many: bool, options: dict[str, Any], folder_options: dict[str, Any], threads: int = 1):
        self.target = target
        self.many = many
        self.options = options
        self.folder_options = folder_options
        self.threads = threads

    def __serve_build_asgi_app__(self) -> FastAPI:
        import torch

        torch.set_num_threads(self.threads)
        if self.many:
            return create_models_app(RayModels(self.target, **self.folder_options), **self.options)
        return create_app(self.target, **self.options)


@dataclass
class Scaling:
    """How many replicas: ``replicas`` of them, or between ``min_replicas`` and ``max_replicas`` by load (Ray's autoscaling)."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0

    def deployment_options(self, max_pending: int, device: str) -> dict[str, Any]:
        actor: dict[str, Any] = {"num_cpus": self.cpus_per_replica}
        if device.startswith("cuda"):
            actor["num_gpus"] = 1
        options: dict[str, Any] = {
            "name": APP_NAME,
            "ray_actor_options": actor,
            "max_ongoing_requests": max_pending + CONTROL_REQUESTS,
            "max_queued_requests": max_pending,
        }
        if self.min_replicas is None and self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            low = self.min_replicas or 1
            high = self.max_replicas or low
            if low > high:
                raise EfficientADError(f"min_replicas ({low}) must not exceed max_replicas ({high})")
            options["autoscaling_config"] = {"min_replicas": low, "max_replicas": high}
        return options


def deploy(
    target: str | Path,
    *,
    many: bool,
    options: dict[str, Any],
    folder_options: dict[str, Any] | None = None,
    scaling: Scaling | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    keep_alive_timeout: float,
    request_timeout: float,
    device: str = "cpu",
) -> str:
    """Run the app on the Ray Serve of the Ray this process is connected to; returns its URL.

    ``target`` must be readable at the same path on every node that runs a replica.
    """
    _, serve = require_ray()
    from ray.serve.config import HTTPOptions

    scaling = scaling or Scaling()
    deployment = serve.deployment(serve.ingress()(Replica), **scaling.deployment_options(options.get("max_pending", 64), device))
    serve.start(
        http_options=HTTPOptions(
            host=host, port=port, keep_alive_timeout_s=math.ceil(keep_alive_timeout), request_timeout_s=request_timeout
        )
    )
    try:
        threads = max(1, math.floor(scaling.cpus_per_replica))
        serve.run(deployment.bind(str(target), many, options, folder_options or {}, threads), name=APP_NAME, route_prefix="/")
    except RuntimeError as error:  # the replicas' own error ends Ray's message, after its traceback
        lines = str(error).strip().splitlines() or [type(error).__name__]
        raise EfficientADError(f"Ray Serve could not start the app: {lines[-1]}") from None
    return f"http://{host}:{port}"


def wait_until_stopped() -> None:
    """Block until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve_until_stopped(target: str | Path, *, address: str | None = None, **deploy_options: Any) -> None:
    """Connect to Ray (``address``; else ``RAY_ADDRESS``; else a new local Ray), deploy, serve until stopped, undeploy.

    A Ray this process started is shut down at the end; on a cluster only this app is deleted.
    """
    ray, serve = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address)
    try:
        url = deploy(target, **deploy_options)
        print(f"efficientad serve --ray: {target} on Ray Serve at {url} (Ctrl-C stops it)", flush=True)
        wait_until_stopped()
    finally:
        try:
            serve.delete(APP_NAME)
        except Exception as error:  # stopping: say why the app may outlive us, and go on
            print(f"efficientad serve --ray: could not delete the app: {first_line(error)}", flush=True)
        if started:
            ray.shutdown()
