"""``efficientad serve``: an HTTP server (JSON API and a web page) around one trained model."""

from __future__ import annotations

import argparse
import ipaddress

from ..choices import PRECISIONS
from ..config import (
    SERVE_BODY_TIMEOUT,
    SERVE_HEADER_TIMEOUT,
    SERVE_KEEP_ALIVE_TIMEOUT,
    SERVE_MAX_CONNECTIONS,
    SERVE_MAX_MEGAPIXELS,
    SERVE_MAX_PENDING,
    SERVE_MAX_UPLOAD_MB,
)
from .options import positive

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
        "where 0 is typical of good images and 0.1 is their rare extreme.",
    )
    parser.add_argument("--model", required=True, help="model file written by `efficientad train`, or an ONNX/TorchScript/OpenVINO export of one")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface) (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument(
        "--precision", choices=PRECISIONS, help="default: the model's calibration precision where this machine runs it natively, else fp32"
    )
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
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..errors import EfficientADError
    from ..serve import create_app
    from ..server import server_config

    if not 0 <= args.port <= 65535:
        raise EfficientADError(f"--port must be in 0..65535, got {args.port}")
    app = create_app(
        args.model,
        device=args.device,
        precision=args.precision,
        threshold=args.threshold,
        show_details=args.show_details,
        max_upload_mb=args.max_upload_mb,
        max_megapixels=args.max_megapixels,
        max_pending=args.max_pending,
        body_timeout=args.body_timeout,
    )
    threshold = app.state.threshold
    shown = "none (no verdicts)" if threshold is None else f"{threshold:.4f}"
    print(f"efficientad serve: {args.model}, threshold {shown}; page http://{args.host}:{args.port}/, API docs /docs", flush=True)
    if not _is_loopback(args.host):
        print("NOTE: listening beyond this machine; the server has no authentication, put it behind one", flush=True)
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


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
