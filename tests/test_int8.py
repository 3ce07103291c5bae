"""int8 export with accuracy control, and the precision that ``auto`` chooses."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from efficientad.cli import main
from efficientad.deploy.fused import FusedModel
from efficientad.deploy.inferencer import Inferencer, int8_path
from efficientad.deploy.quantize import quantization_images, raw_maps_of, synthetic_defects
from efficientad.deploy.runtimes import TorchSession
from efficientad.errors import EfficientADError
from efficientad.model import decision_threshold, load_model

from .conftest import fit_quietly

pytest.importorskip("nncf")
pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory):
    """A tiny model with enough held-out images (2) for an int8 export, and that export (made by the CLI)."""
    from efficientad.data.datasets import load_split
    from efficientad.data.synthetic import make_dataset
    from efficientad.detector import EfficientAD

    root = tmp_path_factory.mktemp("int8_data")
    make_dataset(root, "part", n_train=20, n_test_good=2, n_test_defect=2, size=256)
    split = load_split("mvtec", root, "part")
    detector = fit_quietly(EfficientAD(teacher="random", steps=2, progress=False), split.train)
    folder = tmp_path_factory.mktemp("int8_model")
    model_path = detector.save(folder / "model.pt")
    # A random-weight model agrees with nothing: the bound is loose so that it passes and auto can use it.
    # In a child process: after NNCF's quantisation, a later fork (DataLoader workers in other tests) of
    # the same process crashed; a user's export is a process of its own too.
    command = [sys.executable, "-m", "efficientad", "export", "--model", str(model_path), "--precision", "int8",
               "--data", str(root), "--category", "part", "--max-score-error", "10"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "acceptance test (<= 10.0) passed" in completed.stdout
    return model_path, root, detector


def test_int8_export_writes_the_model_and_its_calibration_record(int8_run):
    model_path, _, detector = int8_run
    xml = int8_path(model_path)
    assert xml == model_path.with_name("model.int8.xml") and xml.with_suffix(".bin").is_file()
    record = json.loads(xml.with_suffix(".json").read_text())
    assert record["precision"] == "int8" and record["accepted"] is True
    assert record["n_validation_images"] == record["n_synthetic_defect_images"] == 2
    assert record["n_calibration_images"] == 18  # every training image: fewer than 64
    assert 0 <= len(record["kept_in_float"]) <= record["n_convolutions"]
    assert all(name.startswith(("/teacher_trunk", "/student_trunk", "/autoencoder", "/local_head", "/global_head")) for name in record["kept_in_float"])
    assert record["model_tensor_sha256"] == load_model(model_path)[1]["tensor_sha256"]
    inferencer = Inferencer.load(xml)
    assert inferencer.precision == "int8" and inferencer.format == "openvino"
    assert inferencer.threshold == pytest.approx(record["threshold"])
    assert inferencer.metadata["int8"]["kept_in_float"] == record["kept_in_float"]


def test_int8_threshold_is_measured_on_the_int8_model(int8_run):
    """The held-out images score in prediction exactly what the int8 calibration measured, and the
    threshold is their quantile: the threshold applies to the scores it was calibrated on."""
    model_path, root, _ = int8_run
    model, metadata = load_model(model_path)
    _, validation = quantization_images(metadata, root, "part")
    inferencer = Inferencer.load(int8_path(model_path))
    scores = np.concatenate([inferencer.run(image).score for image in validation])
    record = inferencer.metadata["int8"]
    full_record = json.loads(int8_path(model_path).with_suffix(".json").read_text())
    np.testing.assert_allclose(scores, full_record["validation_scores"], rtol=1e-5)
    expected = decision_threshold(torch.tensor(scores, dtype=torch.float64), metadata["config"]["false_positive_rate"])
    assert record["threshold"] == pytest.approx(expected, rel=1e-5)


def test_auto_chooses_bf16_then_an_accepted_int8_export_then_fp32(int8_run, monkeypatch, tmp_path):
    model_path, _, _ = int8_run
    monkeypatch.setattr("efficientad.deploy.inferencer.cpu_supports_bf16", lambda: False)
    monkeypatch.setattr("efficientad.deploy.formats.cpu_supports_bf16", lambda: False)
    chosen = Inferencer.load(model_path, precision="auto")
    assert chosen.precision == "int8" and "passed its acceptance test" in chosen.reason
    # The library's default stays the calibration precision, which keeps scores exactly as calibrated.
    assert Inferencer.load(model_path).precision == "fp32"
    assert Inferencer.load(model_path, precision="auto", backend="onnxruntime").precision == "fp32"

    # A failed acceptance test, or an export of another model, is never chosen.
    other = tmp_path / "model.pt"
    shutil.copy(model_path, other)
    import openvino as ov

    graph = ov.Core().read_model(str(int8_path(model_path)))
    embedded = json.loads(graph.get_rt_info("efficientad").astype(str))
    embedded["int8"]["accepted"] = False
    graph.set_rt_info(json.dumps(embedded), "efficientad")
    ov.save_model(graph, str(int8_path(other)), compress_to_fp16=False)
    fallback = Inferencer.load(other, precision="auto")
    assert fallback.precision == "fp32" and "failed its acceptance test" in fallback.reason
    with pytest.raises(EfficientADError, match="failed its acceptance test"):
        Inferencer.load(other, precision="int8")

    monkeypatch.setattr("efficientad.deploy.inferencer.cpu_supports_bf16", lambda: True)
    monkeypatch.setattr("efficientad.deploy.formats.cpu_supports_bf16", lambda: True)
    monkeypatch.setattr("efficientad.device.cpu_supports_bf16", lambda: True)
    native = Inferencer.load(model_path, precision="auto")
    assert native.precision == "bf16" and "native bf16" in native.reason


def test_precisions_a_file_cannot_run_are_refused(int8_run, tiny, tiny_exports):
    model_path, _, _ = int8_run
    with pytest.raises(EfficientADError, match="int8 model: it runs in int8"):
        Inferencer.load(int8_path(model_path), precision="fp32")
    with pytest.raises(EfficientADError, match="float export; make an int8 one"):
        Inferencer.load(tiny_exports["openvino"], precision="int8")
    with pytest.raises(EfficientADError, match=r"no int8 export \(model.int8.xml; make one with `efficientad export --precision int8`"):
        Inferencer.load(tiny.path, precision="int8")


def test_int8_export_refuses_data_the_model_was_not_calibrated_on(int8_run, tiny, capsys):
    model_path, _, _ = int8_run
    # The session's tiny dataset: another set of images, and another number of them held out.
    code = main(["export", "--model", str(model_path), "--precision", "int8", "--data", str(tiny.root), "--category", tiny.category, "--out", str(model_path.parent / "other.xml")])
    assert code == 2
    assert "the model was calibrated on 2" in capsys.readouterr().err
    assert not (model_path.parent / "other.xml").exists()


def test_int8_export_cli_errors(int8_run, capsys):
    model_path, root, _ = int8_run
    assert main(["export", "--model", str(model_path), "--precision", "int8"]) == 2
    assert "needs --data and --category" in capsys.readouterr().err
    assert main(["export", "--model", str(model_path), "--precision", "int8", "--format", "onnx", "--data", str(root), "--category", "part"]) == 2
    assert "written as OpenVINO IR" in capsys.readouterr().err
    assert main(["export", "--model", str(model_path), "--out", "x.onnx"]) == 2
    assert "--format is required" in capsys.readouterr().err


def test_raw_maps_are_recovered_from_a_graphs_outputs(tiny):
    model = load_model(tiny.path)[0]
    module = FusedModel(model)
    images = torch.rand(2, 3, 256, 256)
    output = TorchSession(module, "cpu", "fp32").run(images)
    with torch.no_grad():
        expected = module.raw_maps(images)
    torch.testing.assert_close(raw_maps_of(output, module), expected, rtol=1e-4, atol=1e-6)


def test_synthetic_defects_change_one_patch_of_each_image():
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, 64, 64), dtype=np.float32) for _ in range(4)]
    defective = synthetic_defects(images)
    assert [d.shape for d in defective] == [i.shape for i in images]
    for image, changed in zip(images, defective):
        rows, columns = np.nonzero(np.any(image[0] != changed[0], axis=0))
        assert rows.size > 0 and changed.min() >= 0 and changed.max() <= 1
        # One rectangle, away from the border, of at most a quarter of each side.
        assert rows.min() >= 64 // 8 and rows.max() - rows.min() < 16 and columns.max() - columns.min() < 16
    np.testing.assert_array_equal(synthetic_defects(images)[0], defective[0])  # seeded: the same every time
