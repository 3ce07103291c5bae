"""``efficientad serve``: every endpoint, every kind of bad upload, and agreement with ``predict``."""

from __future__ import annotations

import io
import json
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from efficientad import serve
from efficientad.cli import build_parser
from efficientad.deploy.inferencer import Inferencer
from efficientad.detector import EfficientAD
from efficientad.errors import EfficientADError

from .conftest import png_bytes


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but carries a few bytes: a decompression bomb's header."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def trained(tiny):
    return Inferencer.load(tiny.path), tiny.path


@pytest.fixture(scope="module")
def client(trained):
    detector, _ = trained
    with TestClient(serve.create_app(detector, max_upload_mb=1.0, max_megapixels=1.0)) as client:
        yield client


@pytest.fixture(scope="module")
def sample():
    """A non-square image (so width and height cannot be confused) and its PNG encoding."""
    array = (np.random.default_rng(7).random((200, 300, 3)) * 255).astype(np.uint8)
    return array, png_bytes(array)


def test_health(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_model_describes_the_model_file(client, trained):
    detector, _ = trained
    info = client.get("/model").json()
    assert info["image_size"] == [256, 256]
    assert info["model_size"] == "s"
    assert info["threshold"] == detector.threshold == info["model_file_threshold"]
    assert info["threshold_source"] == "model file"
    assert info["false_positive_rate"] == 0.01
    assert info["teacher_source"] == "random"
    assert info["training_seconds"] > 0
    assert info["config"]["steps"] == 2
    assert "metrics" in info
    assert "versions" not in info and "server_version" not in info


def test_model_shows_paths_and_versions_only_when_asked(tiny, tmp_path):
    content = torch.load(tiny.path, weights_only=True)
    content["teacher_source"] = "/srv/plant-7/teachers/teacher.pth"
    content["config"]["penalty_images"] = "/srv/plant-7/imagenet"
    path = tmp_path / "model.pt"
    torch.save(content, path)
    with TestClient(serve.create_app(path)) as client:
        info = client.get("/model").json()
    assert info["teacher_source"] == "teacher.pth" and info["config"]["penalty_images"] == "imagenet"
    assert "/srv" not in json.dumps(info)
    with TestClient(serve.create_app(path, show_details=True)) as client:
        info = client.get("/model").json()
    assert info["teacher_source"] == "/srv/plant-7/teachers/teacher.pth" and info["versions"]["torch"]


@pytest.mark.parametrize("as_multipart", [True, False], ids=["multipart", "raw"])
def test_predict_matches_the_library(client, trained, sample, as_multipart):
    detector, _ = trained
    array, data = sample
    if as_multipart:
        response = client.post("/predict", files={"file": ("part.png", data, "image/png")})
    else:
        response = client.post("/predict", content=data, headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    result = response.json()
    (expected,) = detector.predict(array)
    assert result["score"] == expected.score
    assert result["local_score"] == expected.local_score
    assert result["global_score"] == expected.global_score
    assert result["threshold"] == detector.threshold
    assert result["is_anomalous"] == expected.is_anomalous
    assert (result["width"], result["height"]) == (300, 200)
    assert result["latency_ms"] > 0


def test_heatmap_png_carries_the_scores_in_headers(client, trained, sample):
    detector, _ = trained
    array, data = sample
    response = client.post("/predict?heatmap=png", files={"file": ("part.png", data, "image/png")})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (300, 200)
    (expected,) = detector.predict(array)
    assert float(response.headers["x-anomaly-score"]) == expected.score
    assert response.headers["x-is-anomalous"] == str(expected.is_anomalous).lower()
    assert (response.headers["x-image-width"], response.headers["x-image-height"]) == ("300", "200")


def test_unknown_heatmap_format_is_refused(client, sample):
    response = client.post("/predict?heatmap=jpeg", content=sample[1])
    assert response.status_code == 422


def test_threshold_override_leaves_the_detector_alone(trained, sample):
    detector, path = trained
    with TestClient(serve.create_app(path, threshold=-1.0)) as client:
        result = client.post("/predict", content=sample[1]).json()
        info = client.get("/model").json()
    assert result["threshold"] == -1.0 and result["is_anomalous"] is True
    assert info["threshold"] == -1.0 and info["threshold_source"] == "override"
    assert info["model_file_threshold"] == detector.threshold


@pytest.mark.slow
def test_concurrent_requests_all_get_their_own_answer(client, trained):
    detector, _ = trained
    rng = np.random.default_rng(3)
    arrays = [(rng.random((64 + 16 * i, 96, 3)) * 255).astype(np.uint8) for i in range(4)]
    expected = [p.score for p in detector.predict(arrays, batch_size=1)]
    with ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda a: client.post("/predict", content=png_bytes(a)), arrays))
    assert [r.json()["score"] for r in responses] == expected
    assert [r.json()["height"] for r in responses] == [a.shape[0] for a in arrays]


def test_server_answers_while_the_model_is_busy(client, sample, monkeypatch):
    detector = client.app.state.inferencer
    busy, release = threading.Event(), threading.Event()
    predict = detector.predict

    def blocked_predict(*args, **kwargs):
        busy.set()
        release.wait(timeout=30)
        return predict(*args, **kwargs)

    monkeypatch.setattr(detector, "predict", blocked_predict)
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(client.post, "/predict", content=sample[1])
        assert busy.wait(timeout=30)
        assert client.get("/health").status_code == 200
        assert client.post("/predict", content=b"not an image").status_code == 415
        assert not pending.done()  # both answers came while inference was still blocked
        release.set()
        assert pending.result(timeout=60).status_code == 200


def test_model_without_threshold_gives_no_verdict(trained, sample, monkeypatch):
    detector, _ = trained
    monkeypatch.setattr(detector, "threshold", None)
    with TestClient(serve.create_app(detector)) as client:
        result = client.post("/predict", content=sample[1]).json()
        headers = client.post("/predict?heatmap=png", content=sample[1]).headers
    assert result["threshold"] is None and result["is_anomalous"] is None
    assert headers["x-is-anomalous"] == headers["x-threshold"] == "none"


@pytest.mark.parametrize(
    ("make_body", "status", "message"),
    [
        (lambda png: b"", 400, "empty upload"),
        (lambda png: b"just some text\n", 415, "not an image"),
        (lambda png: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", 415, "not an image"),
        (lambda png: png[:200], 422, "corrupt"),
        (lambda png: png[:16] + b"\x00" * 40 + png[56:], 422, "corrupt"),
        (lambda png: png_header_only(1200, 1000), 413, "megapixels"),
        (lambda png: png_header_only(100_000, 100_000), 413, "pixels"),
        (lambda png: png * 12, 413, "upload larger than"),
    ],
    ids=["empty", "text", "eps", "truncated", "bad-header", "over-pixel-limit", "bomb", "over-size-limit"],
)
@pytest.mark.parametrize("as_multipart", [True, False], ids=["multipart", "raw"])
def test_bad_uploads_get_a_clear_4xx(client, sample, make_body, status, message, as_multipart):
    body = make_body(sample[1])
    if as_multipart:
        response = client.post("/predict", files={"file": ("upload.png", body, "image/png")})
    else:
        response = client.post("/predict", content=body)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert client.get("/health").status_code == 200


def test_oversized_chunked_upload_is_cut_off(client, sample):
    chunks = iter([sample[1]] * 12)  # no Content-Length: the limit must hold while streaming
    response = client.post("/predict", content=chunks)
    assert response.status_code == 413
    assert client.post("/predict", content=sample[1]).status_code == 200


@pytest.mark.parametrize(
    ("files", "data"),
    [({"image": ("a.png", b"x", "image/png")}, None), ({"other": ("a.png", b"x", "image/png")}, {"file": "not a file"})],
    ids=["wrong-field", "text-field"],
)
def test_multipart_without_a_file_field(client, files, data):
    response = client.post("/predict", files=files, data=data)
    assert response.status_code == 400
    assert "field 'file'" in response.json()["detail"]


@pytest.mark.parametrize(("method", "path"), [("GET", "/predict"), ("POST", "/health"), ("DELETE", "/model")])
def test_wrong_method(client, method, path):
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.json()["detail"] == "Method Not Allowed"


def test_page_and_docs(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'type="file"' in page.text and "predict?heatmap=png" in page.text
    assert client.get("/docs").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/health", "/model"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/predict"]["post"]["requestBody"]["content"]


def test_create_app_refuses_bad_arguments(tmp_path, trained):
    with pytest.raises(EfficientADError, match="model file not found"):
        serve.create_app(tmp_path / "missing.pt")
    with pytest.raises(EfficientADError, match="max_upload_mb"):
        serve.create_app(trained[0], max_upload_mb=0)
    with pytest.raises(EfficientADError, match="Inferencer"):
        serve.create_app(EfficientAD(progress=False))


def test_cli_serve_starts_uvicorn_with_the_options(monkeypatch, trained, capsys):
    import uvicorn

    _, path = trained
    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    args = build_parser().parse_args(["serve", "--model", str(path), "--port", "8123", "--threshold", "0.5", "--max-pending", "4"])
    assert args.handler(args) == 0
    ((app, kwargs),) = calls
    assert kwargs == {"host": "127.0.0.1", "port": 8123, "log_level": "info", "limit_concurrency": 4}
    assert app.state.threshold == 0.5
    assert "threshold 0.5000" in capsys.readouterr().out


@pytest.fixture
def live_server(tiny):
    """The app served by uvicorn on a free loopback port, in a thread; yields (base URL, app)."""
    import socket

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = serve.create_app(tiny.path)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=10)


def test_requests_whose_clients_gave_up_are_not_computed(live_server, sample, monkeypatch):
    import httpx

    url, app = live_server
    inferencer = app.state.inferencer
    predict, calls = inferencer.predict, []

    def slow_predict(*args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.5)
        return predict(*args, **kwargs)

    monkeypatch.setattr(inferencer, "predict", slow_predict)
    _, data = sample
    started = time.monotonic()
    assert httpx.post(f"{url}/predict", content=data, timeout=30).status_code == 200
    alone = time.monotonic() - started  # one request with the model to itself, on this machine
    calls.clear()

    def give_up() -> None:
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/predict", content=data, timeout=0.3)

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda _: give_up(), range(6)))
    time.sleep(0.2)  # the server notices the closed connections within its poll interval
    started = time.monotonic()
    response = httpx.post(f"{url}/predict", content=data, timeout=30)
    waited = time.monotonic() - started
    assert response.status_code == 200
    # At most the request already running when they gave up was computed, besides the last one;
    # computing all six would have kept the last client waiting six times as long as one request.
    assert len(calls) <= 2, f"{len(calls)} computed"
    assert waited < 3 * alone, f"the last client waited {waited:.1f} s, one request alone takes {alone:.1f} s"
