"""Fixtures and helpers shared by the tests: one tiny trained model for the whole session, image makers."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(2)


def requires_shared(*parts: str):
    """Mark a test ``shared`` and skip it when ../shared (real data and weights beside the repo) is absent."""
    path = SHARED.joinpath(*parts)
    skip = pytest.mark.skipif(not path.exists(), reason=f"needs {path} (the read-only shared assets beside the repo)")

    def decorate(test):
        return pytest.mark.shared(skip(test))

    return decorate


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def noise_images(count: int = 10, size: tuple[int, int] = (256, 256), seed: int = 0) -> list[np.ndarray]:
    """Noise images, enough to exercise every code path (not to learn anything)."""
    rng = np.random.default_rng(seed)
    return [(rng.random((*size, 3)) * 255).astype(np.uint8) for _ in range(count)]


def fit_quietly(detector, *args):
    """``detector.fit(*args)`` without the random teacher's "testing only" warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return detector.fit(*args)


@pytest.fixture
def random_images():
    return noise_images()


@dataclass
class TinyModel:
    """A model trained two steps with a random teacher on a synthetic set: every code path, no learning."""

    root: Path
    category: str
    split: object
    detector: object
    path: Path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TinyModel:
    from efficientad.data.datasets import load_split
    from efficientad.data.synthetic import make_dataset
    from efficientad.detector import EfficientAD

    root = tmp_path_factory.mktemp("tiny_data")
    make_dataset(root, "part", n_train=8, n_test_good=3, n_test_defect=3, size=256)
    split = load_split("mvtec", root, "part")
    detector = fit_quietly(EfficientAD(teacher="random", steps=2, progress=False), split.train, split.validation)
    path = detector.save(tmp_path_factory.mktemp("tiny_model") / "model.pt")
    return TinyModel(root, "part", split, detector, path)


@pytest.fixture(scope="session")
def tiny_exports(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny model file and its ONNX, TorchScript and OpenVINO exports, by format name."""
    from efficientad.deploy.formats import export_model

    folder = tmp_path_factory.mktemp("tiny_exports")
    paths = {"native": tiny.path}
    for format, name in (("onnx", "model.onnx"), ("torchscript", "model.ts"), ("openvino", "model.xml")):
        paths[format] = export_model(tiny.path, format, folder / name)
    return paths
