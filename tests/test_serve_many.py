"""Many models behind one endpoint (`serve --models`), and the same API on Ray Serve (`serve --ray`)."""

from __future__ import annotations

import io
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from efficientad import serve, serve_ray
from efficientad.cli import main
from efficientad.deploy.inferencer import Inferencer
from efficientad.files import atomic_write
from efficientad.serve_many import ModelRegistry, create_models_app, model_files

from .conftest import png_bytes
from .test_serve import png_header_only

OTHER_THRESHOLD = 0.25


def write_model(tiny, path: Path, **changes) -> Path:
    """The tiny model's file with ``changes`` to its fields, written as efficientad writes files (beside, then renamed)."""
    content = torch.load(tiny.path, weights_only=True)
    content.update(changes)
    return atomic_write(path, lambda temporary: torch.save(content, temporary))


@pytest.fixture(scope="module")
def folder(tiny, tmp_path_factory) -> Path:
    """a/model.pt (the tiny model), b/model.pt (the same weights, another threshold), c.pt directly in the folder."""
    root = tmp_path_factory.mktemp("models")
    (root / "a").mkdir()
    shutil.copy(tiny.path, root / "a" / "model.pt")
    write_model(tiny, root / "b" / "model.pt", threshold=OTHER_THRESHOLD)
    shutil.copy(tiny.path, root / "c.pt")
    (root / "notes.txt").write_text("not a model")
    return root


@pytest.fixture(scope="module")
def many(folder):
    with TestClient(create_models_app(folder, max_upload_mb=1.0, max_megapixels=1.0)) as client:
        yield client


@pytest.fixture(scope="module")
def image():
    array = (np.random.default_rng(11).random((120, 180, 3)) * 255).astype(np.uint8)
    return png_bytes(array)


def test_the_folder_layout_and_its_order(tmp_path):
    for name in ("x/model.pt", "x.pt", "y.onnx", "z.xml", "z.bin", ".hidden.pt", ".x.pt.abcdefgh.tmp", "w/other.pt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    found = {name: path.relative_to(tmp_path).as_posix() for name, path in model_files(tmp_path).items()}
    # A folder's model.pt wins over NAME.pt; hidden and temporary files and folders without model.pt are not models.
    assert found == {"x": "x/model.pt", "y": "y.onnx", "z": "z.xml"}


def test_two_models_by_name_answer_as_their_own_servers(many, folder, image):
    for name in ("a", "b", "c"):
        path = folder / name / "model.pt" if name != "c" else folder / "c.pt"
        with TestClient(serve.create_app(path)) as alone:
            expected = alone.post("/predict", content=image).json()
            expected_png = alone.post("/predict?heatmap=png", content=image)
        for multipart in (False, True):
            if multipart:
                response = many.post(f"/models/{name}/predict", files={"file": ("part.png", image, "image/png")})
            else:
                response = many.post(f"/models/{name}/predict", content=image)
            assert response.status_code == 200, response.text
            got = response.json()
            assert {k: v for k, v in got.items() if k != "latency_ms"} == {k: v for k, v in expected.items() if k != "latency_ms"}
        heat = many.post(f"/models/{name}/predict?heatmap=png", content=image)
        assert heat.headers["content-type"] == "image/png" and heat.content == expected_png.content
        assert heat.headers["x-anomaly-score"] == expected_png.headers["x-anomaly-score"]
    assert many.post("/models/b/predict", content=image).json()["threshold"] == OTHER_THRESHOLD


def test_models_lists_every_name_from_the_files(folder, tiny):
    registry = ModelRegistry(folder)
    with TestClient(create_models_app(registry)) as client:
        listing = client.get("/models").json()
        assert listing["max_loaded"] == 8
        rows = {row["name"]: row for row in listing["models"]}
        assert list(rows) == ["a", "b", "c"]
        threshold = Inferencer.load(tiny.path).threshold
        assert rows["a"] == {
            "name": "a", "file": "a/model.pt", "file_format": "native", "model_size": "s", "image_size": [256, 256],
            "threshold": threshold, "loaded": False, "loads": 0,
        }
        assert rows["b"]["threshold"] == OTHER_THRESHOLD and rows["c"]["file"] == "c.pt"
        assert registry.loads == {}  # listing read the files' headers, it loaded nothing
        info = client.get("/models/b").json()
        assert info["name"] == "b" and info["threshold"] == OTHER_THRESHOLD and info["config"]["steps"] == 2
        assert "versions" not in info
        rows = {row["name"]: row for row in client.get("/models").json()["models"]}
        assert rows["b"]["loaded"] and rows["b"]["loads"] == 1 and not rows["a"]["loaded"]


@pytest.mark.parametrize("name", ["nope", ".hidden", "a.pt", "notes"])
def test_unknown_names_get_404(many, image, name):
    response = many.post(f"/models/{name}/predict", content=image)
    assert response.status_code == 404
    assert response.json()["detail"] == f"no model named '{name}' on this server; GET /models lists the models it has"
    assert many.get(f"/models/{name}").status_code == 404
    assert many.get("/health").status_code == 200


@pytest.mark.parametrize(
    "make_body",
    [lambda png: b"", lambda png: b"just some text\n", lambda png: png[:200], lambda png: png_header_only(1200, 1000), lambda png: png * 40],
    ids=["empty", "text", "truncated", "over-pixel-limit", "over-size-limit"],
)
def test_bad_uploads_get_the_answers_of_the_one_model_server(many, folder, image, make_body):
    body = make_body(image)
    with TestClient(serve.create_app(folder / "a" / "model.pt", max_upload_mb=1.0, max_megapixels=1.0)) as alone:
        expected = alone.post("/predict", content=body)
    response = many.post("/models/a/predict", content=body)
    assert 400 <= expected.status_code < 500
    assert (response.status_code, response.json()) == (expected.status_code, expected.json())


def model_threads() -> int:
    return sum(thread.name.startswith("efficientad-model") for thread in threading.enumerate())


def test_the_least_recently_used_model_is_evicted_and_loaded_again(folder, image):
    registry = ModelRegistry(folder, max_loaded=2)
    threads = model_threads()
    with TestClient(create_models_app(registry)) as client:
        for name in ("a", "b", "a", "c", "b", "b"):
            assert client.post(f"/models/{name}/predict", content=image).status_code == 200
        # a, b; a is used again; c evicts b (the least recently used); b evicts a.
        assert registry.loads == {"a": 1, "b": 2, "c": 1}
        loaded = {row["name"] for row in client.get("/models").json()["models"] if row["loaded"]}
        assert loaded == {"b", "c"}
        deadline = time.monotonic() + 5
        while model_threads() > threads + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert model_threads() <= threads + 2  # the evicted models' threads have ended


def test_a_model_replaced_on_disk_is_loaded_again(tiny, tmp_path, image):
    path = write_model(tiny, tmp_path / "part" / "model.pt", threshold=0.5)
    registry = ModelRegistry(tmp_path)
    with TestClient(create_models_app(registry)) as client:

        def served_threshold() -> float:
            response = client.post("/models/part/predict", content=image)
            assert response.status_code == 200, response.text
            return response.json()["threshold"]

        assert served_threshold() == 0.5
        write_model(tiny, path, threshold=0.75)
        assert served_threshold() == 0.75 and registry.loads["part"] == 2
        assert client.get("/models").json()["models"][0]["threshold"] == 0.75
        assert served_threshold() == 0.75 and registry.loads["part"] == 2  # unchanged: not loaded again

        # A damaged replacement is not served: the version loaded before stays, and is listed as what is on disk.
        data = path.read_bytes()
        atomic_write(path, lambda temporary: Path(temporary).write_bytes(data[: len(data) // 2]))
        assert served_threshold() == 0.75
        (row,) = client.get("/models").json()["models"]
        assert row["loaded"] and row["error"].startswith("model 'part' cannot be loaded: ") and str(tmp_path) not in row["error"]
        write_model(tiny, path, threshold=0.5)
        assert served_threshold() == 0.5 and registry.loads["part"] == 3


def test_a_file_replaced_while_it_is_read_is_read_again(tiny, tmp_path, image, monkeypatch):
    path = write_model(tiny, tmp_path / "part" / "model.pt", threshold=0.5)
    registry = ModelRegistry(tmp_path)
    read, open_model = [], registry.open

    def replaced_during_the_first_read(file: Path) -> Inferencer:
        inferencer = open_model(file)
        read.append(inferencer.threshold)
        if len(read) == 1:
            write_model(tiny, path, threshold=0.75)
        return inferencer

    monkeypatch.setattr(registry, "open", replaced_during_the_first_read)
    with TestClient(create_models_app(registry)) as client:
        assert client.post("/models/part/predict", content=image).json()["threshold"] == 0.75
    assert read == [0.5, 0.75] and registry.loads["part"] == 1


def test_a_model_added_later_is_served_and_a_removed_one_is_404(tiny, tmp_path, image):
    with TestClient(create_models_app(tmp_path)) as client:
        assert client.get("/models").json()["models"] == []
        assert client.post("/models/new/predict", content=image).status_code == 404
        shutil.copy(tiny.path, tmp_path / "new.pt")
        assert client.post("/models/new/predict", content=image).status_code == 200
        (tmp_path / "new.pt").unlink()
        assert client.post("/models/new/predict", content=image).status_code == 404
        assert client.app.state.models.resident("new") is None


def test_a_model_that_cannot_be_loaded_is_a_503_that_says_why(tmp_path, image):
    (tmp_path / "broken.pt").write_bytes(b"not a model")
    with TestClient(create_models_app(tmp_path)) as client:
        response = client.post("/models/broken/predict", content=image)
        detail = response.json()["detail"]
        assert response.status_code == 503 and detail.startswith("model 'broken' cannot be loaded: ") and str(tmp_path) not in detail
        assert client.get("/models").json()["models"][0]["error"] == detail


def test_cli_serve_models_starts_uvicorn_with_the_options(monkeypatch, folder, capsys):
    import uvicorn

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: served.append(self.config))
    assert main(["serve", "--models", str(folder), "--max-loaded", "3", "--port", "8124", "--max-pending", "5"]) == 0
    (config,) = served
    assert config.app.state.models.max_loaded == 3 and config.port == 8124
    assert "3 models in" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--threshold", "0.5"], "--threshold is for one model"),
        (["--replicas", "2"], "--replicas only apply with --ray"),
        (["--ray", "--replicas", "2", "--max-replicas", "3"], "not both"),
    ],
)
def test_cli_serve_models_refuses_options_that_do_not_apply(folder, extra, message, capsys):
    assert main(["serve", "--models", str(folder), *extra]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_serve_ray_without_ray_says_how_to_install_it(tiny, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    assert main(["serve", "--ray", "--model", str(tiny.path)]) == 2
    error = capsys.readouterr().err
    assert 'pip install "efficientad[ray]"' in error and error.count("\n") == 1


# ------------------------------------------------------------------------------------ Ray Serve
@pytest.fixture(scope="module")
def ray_port():
    """A real local Ray, started small; the port its HTTP proxy listens on (one per Ray session)."""
    ray = pytest.importorskip("ray")
    from ray import serve as ray_serve

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    try:
        yield port
    finally:
        ray_serve.shutdown()
        ray.shutdown()


def serve_on_ray(monkeypatch, port: int, arguments: list[str], check) -> None:
    """Run ``efficientad serve --ray ARGUMENTS``; ``check(url)`` runs while it serves, instead of waiting for Ctrl-C."""
    monkeypatch.setattr(serve_ray, "wait_until_stopped", lambda: check(f"http://127.0.0.1:{port}"))
    assert main(["serve", "--ray", "--port", str(port), "--log-level", "warning", *arguments]) == 0


def ray_test(test):
    """Slow (a real local Ray); Ray's own pydantic models warn on import, nothing for this project to act on."""
    return pytest.mark.slow(pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")(test))


@ray_test
def test_serve_on_ray_answers_like_one_process(ray_port, monkeypatch, tiny, image, capsys):
    import httpx

    (expected,) = Inferencer.load(tiny.path).predict(Image.open(io.BytesIO(image)))

    def check(url: str) -> None:
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        response = httpx.post(f"{url}/predict", content=image, timeout=60)
        assert response.status_code == 200, response.text
        # A replica runs torch on its own CPU count of threads: sums in another order, the same score to float precision.
        assert response.json()["score"] == pytest.approx(expected.score, rel=1e-5) and response.json()["width"] == 180
        corrupt = httpx.post(f"{url}/predict", content=image[:200], timeout=30)
        assert corrupt.status_code == 422 and "corrupt" in corrupt.json()["detail"]
        assert httpx.post(f"{url}/predict", content=b"text", timeout=30).status_code == 415

    serve_on_ray(monkeypatch, ray_port, ["--model", str(tiny.path), "--replicas", "1"], check)
    assert "on Ray Serve at" in capsys.readouterr().out


@ray_test
def test_serve_many_on_ray_multiplexes_models_by_name(ray_port, monkeypatch, folder, image):
    import httpx

    def check(url: str) -> None:
        scores = {}
        for name in ("a", "b", "a"):  # one model per replica: b evicts a, which is then loaded again
            response = httpx.post(f"{url}/models/{name}/predict", content=image, timeout=60)
            assert response.status_code == 200, response.text
            scores.setdefault(name, set()).add((response.json()["score"], response.json()["threshold"]))
        assert len(scores["a"]) == 1 and scores["b"] == {(next(iter(scores["a"]))[0], OTHER_THRESHOLD)}
        unknown = httpx.post(f"{url}/models/nope/predict", content=image, timeout=30)
        assert unknown.status_code == 404 and "no model named 'nope'" in unknown.json()["detail"]
        rows = {row["name"]: row for row in httpx.get(f"{url}/models", timeout=30).json()["models"]}
        assert (rows["a"]["loads"], rows["b"]["loads"]) == (2, 1)
        assert httpx.post(f"{url}/models/a/predict", content=image[:200], timeout=30).status_code == 422

    serve_on_ray(monkeypatch, ray_port, ["--models", str(folder), "--max-loaded", "1", "--replicas", "1"], check)
