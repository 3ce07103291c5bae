"""``efficientad serve``: every endpoint, every kind of bad upload, and agreement with ``predict``."""

from __future__ import annotations

import contextlib
import io
import json
import select
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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

    from efficientad.server import GuardedH11Protocol

    _, path = trained
    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.append(self.config))
    args = build_parser().parse_args(
        ["serve", "--model", str(path), "--port", "8123", "--threshold", "0.5", "--max-pending", "4", "--max-connections", "9",
         "--header-timeout", "2.5", "--keep-alive-timeout", "3"]
    )
    assert args.handler(args) == 0
    (config,) = served
    assert (config.host, config.port, config.log_level) == ("127.0.0.1", 8123, "info")
    assert (config.limit_concurrency, config.timeout_keep_alive) == (9, 3.0)
    assert config.http.func is GuardedH11Protocol and config.http.keywords == {"header_timeout": 2.5}
    assert config.app.state.threshold == 0.5
    assert "threshold 0.5000" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--max-pending", "--max-connections", "--header-timeout", "--body-timeout", "--max-upload-mb"])
@pytest.mark.parametrize("value", ["0", "-1", "abc"])
def test_cli_serve_refuses_bad_limits_before_loading(option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--model", "missing.pt", option, value])
    assert exit_.value.code == 2
    assert option in capsys.readouterr().err


@contextlib.contextmanager
def running(app, **settings):
    """``app`` served by uvicorn on a free loopback port, as ``efficientad serve`` runs it, in a thread; yields the port."""
    import socket

    import uvicorn

    from efficientad.server import server_config

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(server_config(app, host="127.0.0.1", port=port, log_level="error", **settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_server(tiny):
    """The app on a live server with the CLI's defaults; yields (base URL, app)."""
    app = serve.create_app(tiny.path)
    with running(app) as port:
        yield f"http://127.0.0.1:{port}", app


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


def raw_request(path: str, body: bytes = b"", method: str = "POST") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    return head + body


def read_health(connection: socket.socket) -> bytes:
    """One whole ``/health`` answer (headers and JSON body), leaving the connection open."""
    connection.settimeout(5)
    received = b""
    while not received.endswith(b"}"):
        received += connection.recv(65536)
    return received


def read_answer(connection: socket.socket, timeout: float) -> bytes | None:
    """Everything the server sends until it closes the connection; None if it is still open after ``timeout``."""
    connection.settimeout(timeout)
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except socket.timeout:
        return None
    return received


def test_slow_and_idle_clients_are_cut_off_while_others_are_served(tiny, sample):
    """Sockets that send nothing, or headers or a body a byte at a time, are closed at their deadlines."""
    import httpx

    _, data = sample
    app = serve.create_app(tiny.path, body_timeout=1.5)
    with running(app, header_timeout=1.0) as port:
        url = f"http://127.0.0.1:{port}"
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        slow_headers = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        slow_bodies = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        for connection in slow_bodies:
            connection.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n")
        started = time.monotonic()
        request = raw_request("/predict", data)
        answers: dict[socket.socket, bytes] = {}
        for i in range(10):  # a byte every 0.25 s from each slow client, while others are served
            readable, _, _ = select.select(slow_headers + slow_bodies, [], [], 0)
            for connection in readable:  # answered: read it before a write could turn the close into a reset
                answers.setdefault(connection, read_answer(connection, 3))
            for connection in slow_headers + slow_bodies:
                if connection not in answers:
                    connection.sendall(request[i : i + 1] if connection in slow_headers else b"x")
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            time.sleep(0.25)
        assert httpx.post(f"{url}/predict", content=data, timeout=30).status_code == 200
        for connection in idle + slow_headers + slow_bodies:
            answers.setdefault(connection, read_answer(connection, 3))
        elapsed = time.monotonic() - started
        for connection in idle + slow_headers + slow_bodies:
            connection.close()
    answers = {
        "idle": [answers[c] for c in idle],
        "headers": [answers[c] for c in slow_headers],
        "bodies": [answers[c] for c in slow_bodies],
    }
    # Idle sockets are closed without a word; partial requests get 408 and are closed.
    assert answers["idle"] == [b""] * 40
    assert all(a.startswith(b"HTTP/1.1 408 ") and b"headers not received within 1 s" in a for a in answers["headers"])
    assert all(a.startswith(b"HTTP/1.1 408 ") and b"not received in time" in a for a in answers["bodies"])
    # Every slow client was cut off at its deadline, not left to run into the test's own timeouts.
    assert elapsed < 10


def test_a_new_request_on_a_kept_alive_connection_gets_the_header_deadline_too(tiny):
    app = serve.create_app(tiny.path)
    with running(app, header_timeout=1.0, keep_alive_timeout=5.0) as port, socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(raw_request("/health", method="GET"))
        assert read_health(connection).startswith(b"HTTP/1.1 200 ")
        connection.sendall(b"GET /health HTTP/1.1\r\n")  # ... and the rest never comes
        started = time.monotonic()
        answer = read_answer(connection, 5)
        assert answer.startswith(b"HTTP/1.1 408 ") and 0.8 < time.monotonic() - started < 4


def test_idle_kept_alive_connections_are_closed(tiny):
    app = serve.create_app(tiny.path)
    with running(app, keep_alive_timeout=0.5) as port, socket.create_connection(("127.0.0.1", port)) as connection:
        connection.sendall(raw_request("/health", method="GET"))
        assert read_health(connection).startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert read_answer(connection, 5) == b""
        assert time.monotonic() - started < 3


def test_clients_over_the_pending_limit_get_a_readable_503_and_health_answers(tiny, sample):
    import httpx

    _, data = sample
    app = serve.create_app(tiny.path, max_pending=2, body_timeout=4.0)
    with running(app) as port:
        url = f"http://127.0.0.1:{port}"
        holders = [socket.create_connection(("127.0.0.1", port)) for _ in range(2)]
        for connection in holders:  # two uploads that never finish hold both slots
            connection.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\nxx")
        time.sleep(0.3)
        big = data * 20  # a body well past the socket buffers: unread, it would turn the 503 into a reset
        busy = httpx.post(f"{url}/predict", content=big, timeout=10)
        assert busy.status_code == 503
        assert "server busy: 2 predictions in progress" in busy.json()["detail"]
        assert busy.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
        for connection in holders:
            connection.close()
        time.sleep(0.3)  # the server notices the closed uploads and frees their slots
        assert httpx.post(f"{url}/predict", content=data, timeout=30).status_code == 200


def flat_png(side: int) -> bytes:
    """A flat-grey square PNG: a few hundred KB that decode to side² pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_decoding_keeps_only_what_the_request_needs(tiny):
    """A large upload leaves the model's input and a display-sized copy; its full-size pixels are freed."""
    inferencer = Inferencer.load(tiny.path)
    data = flat_png(3000)
    opened = serve.open_image(data, max_pixels=10**8)
    upload = serve.decode_upload(opened, inferencer.image_size, keep_display=True)
    assert (upload.width, upload.height) == (3000, 3000)
    assert upload.model_input.shape == (256, 256, 3)
    assert upload.display.width * upload.display.height <= 4e6
    with pytest.raises(ValueError, match="closed image"):
        opened.getpixel((0, 0))
    # The score is the one the library gives the full image: the model input is resized the same way.
    (ours,) = inferencer.predict(upload.model_input)
    (library,) = inferencer.predict(Image.open(io.BytesIO(data)))
    assert ours.score == library.score


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's peak memory from /proc")
def test_server_memory_is_bounded_by_pixels_not_by_requests(tiny, tmp_path):
    """Eight 36-megapixel heat-map requests at once: the server's peak grows by what two decodes need."""
    import subprocess
    import sys

    import httpx

    def peak_mb(pid: int) -> float:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (tmp_path / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "efficientad", "serve", "--model", str(tiny.path), "--port", str(port), "--log-level", "warning"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        before = peak_mb(server.pid)
        data = flat_png(6000)
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda _: httpx.post(f"{url}/predict?heatmap=png", content=data, timeout=120), range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert {a.headers["x-image-width"] for a in answers} == {"6000"}
        grown = peak_mb(server.pid) - before
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    # One decode of 36 MP costs about 290 MB (Pillow's 4 bytes a pixel, plus an RGB copy); two decode at once.
    # Holding every request's full-size image, as the server once did, took over 8 GB here.
    assert grown < 1000, f"peak grew by {grown:.0f} MB"
