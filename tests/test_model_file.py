import warnings

import numpy as np
import pytest
import torch

from efficientad.data.images import read_image, resize_to_tensor, to_float
from efficientad.deploy.inferencer import Inferencer
from efficientad.detector import EfficientAD
from efficientad.errors import EfficientADError
from efficientad.model import load_model

from .conftest import fit_quietly, noise_images


@pytest.fixture(scope="module")
def trained(tiny):
    return tiny.detector, tiny.path, noise_images(4)


def test_round_trip_gives_identical_scores_and_maps(trained):
    detector, path, images = trained
    loaded = EfficientAD.load(path)
    before, after = detector.predict(images[:3]), loaded.predict(images[:3])
    for a, b in zip(before, after):
        assert a.score == b.score
        np.testing.assert_array_equal(a.anomaly_map, b.anomaly_map)
    assert loaded.threshold == detector.threshold
    assert loaded.metadata_["config"]["steps"] == 2


def test_a_loaded_model_saved_again_describes_its_new_weights(trained, tmp_path):
    """A loaded file's metadata carries its old checksum and versions: saving changed weights with it
    must not write them back (the file would then be refused as corrupt)."""
    from efficientad.model import save_model

    _, path, _ = trained
    model, metadata = load_model(path)
    metadata["versions"] = {"torch": "0.0"}
    with torch.no_grad():
        model.student[0].weight.mul_(1.01)
    reloaded, stored = load_model(save_model(model, tmp_path / "changed.pt", metadata))
    torch.testing.assert_close(reloaded.student[0].weight, model.student[0].weight)
    assert stored["tensor_sha256"] != metadata["tensor_sha256"] and stored["versions"]["torch"] == torch.__version__


def test_model_file_loads_with_weights_only(trained):
    _, path, _ = trained
    content = torch.load(path, weights_only=True)
    assert content["format"] == "efficientad-model"
    assert content["image_size"] == [256, 256]
    assert {"teacher_mean", "teacher_std", "map_quantiles"} <= {k for k in content["state_dict"]}
    assert content["versions"]["torch"] == torch.__version__


def test_maps_come_back_at_the_original_size(trained):
    detector, _, _ = trained
    image = (np.random.default_rng(1).random((300, 410, 3)) * 255).astype(np.uint8)
    (prediction,) = detector.predict(image)
    assert prediction.anomaly_map.shape == (300, 410)
    assert prediction.local_map.shape == prediction.global_map.shape == (300, 410)
    # The score is the plain (unfused) path's maximum at the model's 256x256, not the resized map's.
    with torch.no_grad():
        plain = detector.model(to_float(resize_to_tensor(read_image(image), (256, 256))[None]))
    assert prediction.score == pytest.approx(float(plain[0, 0].max()), rel=1e-5)


def test_the_verdict_follows_the_threshold(tiny):
    inferencer = Inferencer.load(tiny.path)
    image = tiny.split.test[-1].path
    score = inferencer.predict(image)[0].score
    assert score > 0
    inferencer.threshold = score
    assert inferencer.predict(image)[0].is_anomalous is False  # above the threshold, not at it
    inferencer.threshold = score * (1 - 1e-4)
    assert inferencer.predict(image)[0].is_anomalous is True
    inferencer.threshold = None
    assert inferencer.predict(image)[0].is_anomalous is None


def test_truncated_file_is_refused(trained, tmp_path):
    _, path, _ = trained
    broken = tmp_path / "broken.pt"
    broken.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(EfficientADError, match="cannot read model file"):
        load_model(broken)


def test_teacher_file_is_not_a_model(tmp_path):
    path = tmp_path / "teacher.pth"
    torch.save({"0.weight": torch.zeros(1)}, path)
    with pytest.raises(EfficientADError, match="not an efficientad model file"):
        load_model(path)


def _bump_a_weight(content: dict) -> None:
    content["state_dict"]["student.0.weight"].view(-1)[0] += 1e-3  # what one flipped byte would do


@pytest.mark.parametrize(
    "change, message",
    [
        ({"format_version": 99}, "newer efficientad"),
        ({"model_size": "m"}, "incomplete or inconsistent"),
        ({"threshold": float("nan")}, "non-finite map quantiles or threshold"),
        (_bump_a_weight, "changed.pt is corrupt: its weights do not match the SHA-256"),
    ],
)
def test_a_changed_model_file_is_refused(trained, tmp_path, change, message):
    content = torch.load(trained[1], weights_only=True)
    change(content) if callable(change) else content.update(change)
    changed = tmp_path / "changed.pt"
    torch.save(content, changed)
    with pytest.raises(EfficientADError, match=message):
        load_model(changed)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "efficientad-model", "payload": warnings.WarningMessage}, path)
    with pytest.raises(EfficientADError, match="cannot read model file .*pickled objects other than tensors") as error:
        load_model(path)
    assert "weights_only" not in str(error.value) and "\n" not in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(EfficientADError, match="model file not found"):
        EfficientAD.load(tmp_path / "nope.pt")


def test_untrained_detector_cannot_predict_or_save(tmp_path):
    detector = EfficientAD(teacher="random")
    with pytest.raises(EfficientADError, match="not trained"):
        detector.predict(np.zeros((256, 256, 3), np.uint8))
    with pytest.raises(EfficientADError, match="not trained"):
        detector.save(tmp_path / "m.pt")
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("kind", ["model", "teacher"])
def test_an_empty_file_gives_a_one_line_error(kind, tmp_path):
    """A full disk or an interrupted copy leaves 0-byte files; they must not end in an IndexError."""
    from efficientad.training.teacher import load_teacher_file

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(EfficientADError, match=f"cannot read {kind} file .*empty.pt") as error:
        load_model(empty) if kind == "model" else load_teacher_file(empty, "s")
    assert "\n" not in str(error.value)


def test_a_bad_teacher_is_reported_before_any_image_is_read(tmp_path):
    detector = EfficientAD(teacher=str(tmp_path / "missing.pth"), progress=False)
    with pytest.raises(EfficientADError, match="missing.pth"):
        detector.fit([tmp_path / "not-an-image.png"] * 4)


def test_constant_training_images_are_refused_at_calibration():
    flat = [np.full((8, 8, 3), 128, np.uint8) for _ in range(5)]  # 4 to train on, 1 held out
    with pytest.raises(EfficientADError, match="no spread.*constant or nearly so"):
        fit_quietly(EfficientAD(teacher="random", steps=1, progress=False), flat)
