"""One image score everywhere: calibration, EfficientAD.predict, every runtime and the HTTP server agree.

The score is the maximum of the combined map at the model's image size, so it does not depend on the
size of the image, and a threshold calibrated on held-out images keeps its false-positive rate.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from efficientad.deploy.inferencer import Inferencer
from efficientad.detector import EfficientAD
from efficientad.device import cpu_supports_bf16
from efficientad.errors import EfficientADError
from efficientad.model import MODEL_FORMAT
from efficientad.serve import create_app

from .conftest import fit_quietly, png_bytes

HAVE_BF16 = cpu_supports_bf16()


def smooth_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A large photo-like image: smooth shading plus fine texture, so that resizing changes its pixels."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    base = np.stack([np.sin(6 * x + c) * np.cos(5 * y - c) for c in (0.0, 1.0, 2.0)], axis=-1)
    texture = rng.normal(0, 0.15, (height, width, 3))
    return (np.clip(0.5 + 0.35 * base + texture, 0, 1) * 255).astype(np.uint8)


def test_a_validation_image_scores_exactly_its_threshold():
    """10 copies of one 1024x1024 photo: the held-out copy sets the threshold, and the photo scores it."""
    photo = smooth_photo(1024, 1024)
    detector = fit_quietly(EfficientAD(teacher="random", steps=1, progress=False), [photo] * 10)
    assert detector.metadata_["n_validation_images"] == 1
    (prediction,) = detector.predict(photo)
    assert prediction.score == pytest.approx(detector.threshold, rel=1e-3)
    assert prediction.score == pytest.approx(detector.metadata_["validation_scores"][0], rel=1e-6)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.load's deprecation notice
def test_every_path_gives_the_same_score_for_a_large_image(tiny, tiny_exports):
    image = smooth_photo(768, 1024, seed=1)
    (expected,) = tiny.detector.predict(image)
    scores = {"EfficientAD.predict": expected.score}
    for format, path in tiny_exports.items():
        (prediction,) = Inferencer.load(path).predict(image)
        scores[f"Inferencer {format}"] = prediction.score
        assert prediction.anomaly_map.shape == (768, 1024)
    with TestClient(create_app(tiny.path)) as client:
        response = client.post("/predict", content=png_bytes(image))
    assert response.status_code == 200
    scores["HTTP /predict"] = response.json()["score"]
    for name, score in scores.items():
        assert score == pytest.approx(expected.score, rel=1e-4), name


def test_validation_scores_are_what_predict_gives_the_validation_images(tiny):
    validation = tiny.split.validation or []
    if not validation:  # held out by fit from the training images with the detector's seed
        from efficientad.data.images import split_validation

        _, validation = split_validation(tiny.split.train, tiny.detector.config.validation_fraction, tiny.detector.config.seed)
    scores = [p.score for p in tiny.detector.predict(validation)]
    np.testing.assert_allclose(scores, tiny.detector.metadata_["validation_scores"], rtol=1e-6)


def test_load_restores_the_whole_configuration(tiny):
    loaded = EfficientAD.load(tiny.path)
    assert loaded.config == tiny.detector.config
    assert loaded.inferencer.precision == "fp32"


@pytest.mark.skipif(not HAVE_BF16, reason="this CPU has no native bf16 (AVX-512 BF16 or AMX)")
def test_a_bf16_model_calibrates_saves_loads_and_predicts_in_bf16(tiny, tmp_path):
    detector = fit_quietly(
        EfficientAD(teacher="random", steps=1, precision="bf16", channels_last=True, progress=False),
        tiny.split.train,
        tiny.split.validation,
    )
    path = detector.save(tmp_path / "model.pt")
    loaded = EfficientAD.load(path)
    assert loaded.config == detector.config and loaded.config.precision == "bf16"
    deployed = Inferencer.load(path)
    assert detector.inferencer.precision == loaded.inferencer.precision == deployed.precision == "bf16"
    images = [sample.path for sample in tiny.split.test]
    for a, b, c in zip(detector.predict(images), loaded.predict(images), deployed.predict(images)):
        assert a.score == b.score == c.score
        np.testing.assert_array_equal(a.anomaly_map, c.anomaly_map)
    # Calibrated in bf16: the held-out images score in prediction exactly what calibration measured.
    from efficientad.data.images import split_validation

    _, validation = split_validation(tiny.split.train, detector.config.validation_fraction, detector.config.seed)
    validation = tiny.split.validation or validation
    np.testing.assert_allclose([p.score for p in loaded.predict(validation)], detector.metadata_["validation_scores"], rtol=1e-6)


def test_bf16_training_on_a_cpu_without_native_bf16_fails_at_once(monkeypatch, tiny):
    monkeypatch.setattr("efficientad.device.cpu_supports_bf16", lambda: False)
    detector = EfficientAD(teacher="no/such/teacher.pth", precision="bf16", progress=False)
    # Refused before the teacher or any image is read: the message names the fix.
    with pytest.raises(EfficientADError, match="no native bf16.*use precision 'fp32'"):
        detector.fit(tiny.split.train)


def test_a_bf16_model_predicts_in_fp32_where_bf16_is_not_native(monkeypatch, tiny, tmp_path):
    content = torch.load(tiny.path, weights_only=True)
    assert content["format"] == MODEL_FORMAT
    content["inference_precision"] = "bf16"
    path = tmp_path / "bf16.pt"
    torch.save(content, path)
    monkeypatch.setattr("efficientad.device.cpu_supports_bf16", lambda: False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inferencer = Inferencer.load(path)
    assert inferencer.precision == "fp32"
    assert any("predicting in fp32 instead of the model's bf16" in str(w.message) for w in caught)
    with pytest.raises(EfficientADError, match="no native bf16"):
        Inferencer.load(path, precision="bf16")
