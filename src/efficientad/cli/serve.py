"""``efficientad serve``: an HTTP server (JSON API and a web page) around one model or a folder of them, in one process or on Ray Serve."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from ..choices import INFERENCE_PRECISIONS
from ..config import (
    SERVE_BODY_TIMEOUT,
    SERVE_HEADER_TIMEOUT,
    SERVE_KEEP_ALIVE_TIMEOUT,
    SERVE_MAX_CONNECTIONS,
    SERVE_MAX_LOADED,
    SERVE_MAX_MEGAPIXELS,
    SERVE_MAX_PENDING,
    SERVE_MAX_UPLOAD_MB,
    SERVE_RAY_REQUEST_TIMEOUT,
)
from .options import PRECISION_HELP, positive

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a model over HTTP: JSON API, heat maps and a drag-and-drop page",
        description="Serve a model file over HTTP. POST /predict takes an image (multipart field 'file', "
        "or the raw body) and answers JSON {score, is_anomalous, threshold, local_score, global_score, "
        "latency_ms, width, height}; POST /predict?heatmap=png answers the heat-map overlay as a PNG with "
        "the scores in X-* headers. GET /health, GET /model (config, threshold, training record), "
        "GET / (a page to drop images on), GET /docs (the OpenAPI documentation). "
        "An image is anomalous when its score is above the decision threshold. By default that is the "
        "threshold stored in the model file: the (1 - FPR) quantile of the scores of the good images held "
        "out during training, FPR being the training's --false-positive-rate (1% unless set otherwise), so "
        "about that fraction of good images is flagged. --threshold overrides it; scores are on a scale "
        "where 0 is typical of good images and 0.1 is their rare extreme. "
        "With --models DIR every model in DIR is served by name: POST /models/NAME/predict (the same "
        "request and answers as /predict), GET /models (each name's file, format, image size, threshold, "
        "whether it is loaded), GET /models/NAME, GET /health. A model is DIR/NAME/model.pt (what "
        "`train --out DIR/NAME` writes), else DIR/NAME.pt, .onnx, .ts or .xml; models load on first use, "
        "at most --max-loaded stay in memory (least recently used out first), and a file replaced on disk "
        "is loaded again on its next request. "
        "With --ray the same API runs on Ray Serve (a local Ray, or a cluster: --address or RAY_ADDRESS).",
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="model file written by `efficientad train`, or an ONNX/TorchScript/OpenVINO export of one")
    which.add_argument("--models", metavar="DIR", help="serve every model in DIR by name (see above)")
    parser.add_argument(
        "--max-loaded", type=positive(int), default=SERVE_MAX_LOADED,
        help="with --models: models in memory at once (per replica with --ray) (default: %(default)s)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface) (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--precision", choices=INFERENCE_PRECISIONS, default="auto", help=PRECISION_HELP)
    parser.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="decision threshold: scores above it are anomalous; None: the model file's (see above)",
    )
    parser.add_argument("--max-upload-mb", type=positive(float), default=SERVE_MAX_UPLOAD_MB, help="larger uploads get 413 (default: %(default)s)")
    parser.add_argument(
        "--max-megapixels",
        type=positive(float),
        default=SERVE_MAX_MEGAPIXELS,
        help="images with more pixels get 413 (checked from the header: decompression bombs are not decoded) (default: %(default)s)",
    )
    # Limits on what clients may hold; each must be > 0.
    limits = (
        ("--max-pending", int, SERVE_MAX_PENDING, "predictions in progress at once (receiving, decoding, queued, running); "
         "more get 503 with Retry-After, /health still answers; bounds upload memory to about this x --max-upload-mb"),
        ("--max-connections", int, SERVE_MAX_CONNECTIONS, "open connections at once; more get 503 before their request is read"),
        ("--header-timeout", float, SERVE_HEADER_TIMEOUT, "seconds a client has to send a request's headers, from connecting "
         "or from the request's first byte on a kept-alive connection; then 408 and the connection is closed"),
        ("--body-timeout", float, SERVE_BODY_TIMEOUT, "seconds an upload's body has to arrive after its headers; then 408 "
         "and the connection is closed (raise it for large uploads over slow links)"),
        ("--keep-alive-timeout", float, SERVE_KEEP_ALIVE_TIMEOUT, "seconds an idle kept-alive connection stays open between requests"),
    )
    for flag, kind, default, text in limits:
        parser.add_argument(flag, type=positive(kind), default=default, help=f"{text} (default: %(default)s)")
    parser.add_argument(
        "--show-details", action="store_true", help="GET /model shows full paths and library versions (default: file names only)"
    )
    parser.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="server log level (default: %(default)s)")
    ray = parser.add_argument_group(
        "Ray Serve",
        "--ray serves the same API from Ray Serve replicas. Ray's proxy reads the requests there, so "
        "--header-timeout and --max-connections do not apply; --keep-alive-timeout and --request-timeout "
        "become its keep_alive_timeout_s and request_timeout_s; the upload limits, --body-timeout and "
        "--max-pending apply in each replica. Model paths must be readable at the same place on every node.",
    )
    ray.add_argument("--ray", action="store_true", help='serve on Ray Serve (needs pip install "efficientad[ray]")')
    ray.add_argument("--replicas", type=positive(int), help="replicas (default: 1)")
    ray.add_argument("--min-replicas", type=positive(int), help="autoscale between --min-replicas and --max-replicas by load, instead of --replicas")
    ray.add_argument("--max-replicas", type=positive(int), help="see --min-replicas")
    ray.add_argument("--address", help="Ray cluster to deploy to, e.g. ray://head:10001 or auto (default: RAY_ADDRESS, else a new local Ray)")
    ray.add_argument("--cpus-per-replica", type=positive(float), help="CPUs Ray reserves for each replica; torch uses as many threads (default: 1)")
    ray.add_argument(
        "--request-timeout", type=positive(float),
        help=f"seconds Ray's proxy gives a whole request (upload, queue, inference, answer) before 408 (default: {SERVE_RAY_REQUEST_TIMEOUT:g})",
    )
    parser.set_defaults(handler=run)


RAY_ONLY = ("replicas", "min_replicas", "max_replicas", "address", "cpus_per_replica", "request_timeout")


def run(args: argparse.Namespace) -> int:
    from ..errors import EfficientADError

    if not 0 <= args.port <= 65535:
        raise EfficientADError(f"--port must be in 0..65535, got {args.port}")
    if args.models is not None and args.threshold is not None:
        raise EfficientADError("--threshold is for one model (--model); with --models each model's own threshold is used")
    misplaced = [f"--{name.replace('_', '-')}" for name in RAY_ONLY if getattr(args, name) is not None]
    if misplaced and not args.ray:
        raise EfficientADError(f"{', '.join(misplaced)} only apply with --ray")
    if args.replicas is not None and (args.min_replicas is not None or args.max_replicas is not None):
        raise EfficientADError("give --replicas, or --min-replicas/--max-replicas for autoscaling, not both")
    limits = {
        "show_details": args.show_details,
        "max_upload_mb": args.max_upload_mb,
        "max_megapixels": args.max_megapixels,
        "max_pending": args.max_pending,
        "body_timeout": args.body_timeout,
    }
    if not _is_loopback(args.host):
        print("NOTE: listening beyond this machine; the server has no authentication, put it behind one", flush=True)
    if args.ray:
        return _run_on_ray(args, limits)
    import uvicorn

    from ..server import server_config

    app = _models_app(args, limits) if args.models is not None else _model_app(args, limits)
    config = server_config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        header_timeout=args.header_timeout,
        keep_alive_timeout=args.keep_alive_timeout,
        max_connections=args.max_connections,
    )
    uvicorn.Server(config).run()
    return 0


def _model_app(args: argparse.Namespace, limits: dict):
    from ..serve import create_app

    app = create_app(args.model, device=args.device, precision=args.precision, threshold=args.threshold, **limits)
    threshold = app.state.threshold
    shown = "none (no verdicts)" if threshold is None else f"{threshold:.4f}"
    inferencer = app.state.inferencer
    print(f"efficientad serve: {args.model}, precision {inferencer.reason or inferencer.precision}, threshold {shown}; page http://{args.host}:{args.port}/, API docs /docs", flush=True)
    return app


def _models_app(args: argparse.Namespace, limits: dict):
    from ..serve_many import ModelRegistry, create_models_app, model_files

    registry = ModelRegistry(args.models, max_loaded=args.max_loaded, device=args.device, precision=args.precision)
    app = create_models_app(registry, **limits)
    print(
        f"efficientad serve: {len(model_files(registry.folder))} models in {args.models} (at most {args.max_loaded} in memory); "
        f"http://{args.host}:{args.port}/models, POST /models/NAME/predict, API docs /docs",
        flush=True,
    )
    return app


def _run_on_ray(args: argparse.Namespace, limits: dict) -> int:
    import os

    from ..errors import EfficientADError
    from ..serve_ray import Scaling, require_ray, serve_until_stopped

    require_ray()
    target = Path(args.models if args.models is not None else args.model).resolve()
    if args.address is None and not os.environ.get("RAY_ADDRESS") and not target.exists():
        raise EfficientADError(f"{'model folder' if args.models is not None else 'model file'} not found: {target}")
    many = args.models is not None
    options = limits if many else {**limits, "device": args.device, "precision": args.precision, "threshold": args.threshold}
    print(
        "NOTE: on Ray Serve, Ray's proxy reads the requests: --header-timeout and --max-connections do not apply there; "
        "--keep-alive-timeout and --request-timeout are its keep_alive_timeout_s and request_timeout_s",
        flush=True,
    )
    serve_until_stopped(
        target,
        address=args.address,
        many=many,
        options=options,
        folder_options={"max_loaded": args.max_loaded, "device": args.device, "precision": args.precision},
        scaling=Scaling(
            replicas=args.replicas or 1,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            cpus_per_replica=args.cpus_per_replica or 1.0,
        ),
        host=args.host,
        port=args.port,
        keep_alive_timeout=args.keep_alive_timeout,
        request_timeout=args.request_timeout or SERVE_RAY_REQUEST_TIMEOUT,
        device=args.device,
    )
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
