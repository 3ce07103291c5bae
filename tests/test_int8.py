"""int8 export with accuracy control, and the precision that ``auto`` chooses."""

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from efficientad.cli import main
from efficientad.deploy.fused import FusedModel
from efficientad.deploy.inferencer import Inferencer, int8_path
from efficientad.deploy.quantize import (
    IMAGE_GROUPS,
    AcceptanceBounds,
    Measured,
    Trial,
    _range_with_zero,
    acceptance_check,
    input_range,
    layer_groups,
    outside_networks,
    quantization_images,
    raw_maps_of,
    search_float_layers,
    synthetic_defects,
)
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
    # A random-weight model agrees with nothing: the bounds are loose so that it passes and auto can use it.
    # In a child process: after NNCF's quantisation, a later fork (DataLoader workers in other tests) of
    # the same process crashed; a user's export is a process of its own too.
    command = [sys.executable, "-m", "efficientad", "export", "--model", str(model_path), "--precision", "int8",
               "--data", str(root), "--category", "part", "--max-auroc-drop", "1", "--max-au-pro-drop", "1",
               "--max-score-error", "10", "--max-spread-change", "100"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "acceptance test (drops <= 1.0 and 1.0, error <= 10.0, spreads within 10000%) passed" in completed.stdout
    # Each quantisation tried is reported as it is measured: here one, all int8.
    assert re.search(r"^  in float: nothing: image AUROC drop [+-]\d\.\d{4}, .*: passed$", completed.stderr, re.MULTILINE)
    return model_path, root, detector


def test_int8_export_writes_the_model_and_its_calibration_record(int8_run):
    model_path, _, detector = int8_run
    xml = int8_path(model_path)
    assert xml == model_path.with_name("model.int8.xml") and xml.with_suffix(".bin").is_file()
    record = json.loads(xml.with_suffix(".json").read_text())
    assert record["precision"] == "int8" and record["accepted"] is True
    assert record["n_validation_images"] == 2 and record["n_synthetic_defect_images"] == 6  # three per held-out image
    assert record["n_calibration_images"] == 18  # every training image: fewer than 64
    # Passed at the first trial (all int8), so nothing was kept in float and only the networks' convolutions are int8.
    assert record["kept_in_float"] == [] and record["float_convolutions"] == [] and len(record["trials"]) == 1
    assert record["n_convolutions"] == 23  # teacher and student heads apart: 3 + 3 trunk, 3 heads, 14 autoencoder
    acceptance = record["acceptance"]
    assert 0.0 <= acceptance["fp32"]["image_auroc"] <= 1.0 and 0.0 <= acceptance["int8"]["au_pro"] <= 1.0
    assert acceptance["int8"]["image_auroc_drop"] == pytest.approx(acceptance["fp32"]["image_auroc"] - acceptance["int8"]["image_auroc"])
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


def _weight_levels(graph) -> list[int]:
    """The largest int8 weight level of each convolution of an int8 OpenVINO graph whose weights are int8."""
    levels = []
    for op in graph.get_ordered_ops():
        if op.get_type_name() == "Convolution":
            node = op.input_value(1).get_node()
            while node.get_type_name() != "Constant":
                node = node.input_value(0).get_node()
            if node.get_data().dtype == np.int8:
                levels.append(int(np.abs(node.get_data().astype(np.int32)).max()))
    return levels


def test_int8_weights_use_half_the_range_so_that_cpus_without_vnni_do_not_saturate(int8_run, monkeypatch, tmp_path):
    import openvino as ov

    model_path, _, _ = int8_run
    graph = ov.Core().read_model(str(int8_path(model_path)))
    # Every convolution's weights: the largest of each output channel at level 63 or 64 of 127, none beyond.
    levels = _weight_levels(graph)
    assert len(levels) == 23 and set(levels) <= {63, 64}
    embedded = json.loads(graph.get_rt_info("efficientad").astype(str))
    assert embedded["int8"]["weights_half_range"] is True

    # An export from before (full-range weights past the first convolutions) is not chosen where the
    # int8 kernels have no VNNI, and says why when opened; with VNNI it is.
    monkeypatch.setattr("efficientad.deploy.inferencer.cpu_supports_bf16", lambda: False)
    monkeypatch.setattr("efficientad.deploy.formats.cpu_supports_bf16", lambda: False)
    older = tmp_path / "model.pt"
    shutil.copy(model_path, older)
    del embedded["int8"]["weights_half_range"]
    graph.set_rt_info(json.dumps(embedded), "efficientad")
    ov.save_model(graph, str(int8_path(older)), compress_to_fp16=False)
    monkeypatch.setattr("efficientad.deploy.formats.int8_kernels_have_vnni", lambda: False)
    assert Inferencer.load(model_path, precision="auto").precision == "int8"
    fallback = Inferencer.load(older, precision="auto")
    assert fallback.precision == "fp32" and "full-range int8 weights, which this CPU's int8 kernels (no VNNI) saturate" in fallback.reason
    with pytest.warns(UserWarning, match="full-range int8 weights"):
        Inferencer.load(int8_path(older))
    monkeypatch.setattr("efficientad.deploy.formats.int8_kernels_have_vnni", lambda: True)
    assert Inferencer.load(older, precision="auto").precision == "int8"


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


def test_synthetic_defects_change_one_patch_of_each_copy_and_say_where():
    rng = np.random.default_rng(0)
    images = [rng.random((1, 3, 64, 64), dtype=np.float32) for _ in range(4)]
    defects = synthetic_defects(images, per_image=2)
    assert len(defects.images) == len(defects.masks) == 8
    for index, (changed, mask) in enumerate(zip(defects.images, defects.masks)):
        image = images[index // 2]
        assert changed.shape == image.shape and mask.shape == (64, 64) and changed.min() >= 0 and changed.max() <= 1
        rows, columns = np.nonzero(mask)
        # One rectangle, away from the border, of at most a quarter of each side; nothing changed outside it.
        assert rows.min() >= 64 // 8 and rows.max() - rows.min() < 16 and columns.max() - columns.min() < 16
        assert mask.sum() == (rows.max() - rows.min() + 1) * (columns.max() - columns.min() + 1)
        np.testing.assert_array_equal(changed[0][:, ~mask], image[0][:, ~mask])
        assert np.any(changed[0][:, mask] != image[0][:, mask])
    again = synthetic_defects(images, per_image=2)  # seeded: the same every time
    np.testing.assert_array_equal(again.images[3], defects.images[3])
    np.testing.assert_array_equal(again.masks[3], defects.masks[3])


def _measured(auroc: float, au_pro: float, scores, quantiles=(0.3, 0.5, 0.04, 0.12)) -> Measured:
    return Measured(None, torch.tensor(quantiles, dtype=torch.float64), np.asarray(scores, dtype=np.float64), auroc, au_pro)


def test_acceptance_check_bounds_the_drops_the_held_out_score_error_and_the_map_spreads():
    reference = _measured(0.95, 0.80, [0.1, 0.2, 1.0])
    bounds = AcceptanceBounds(max_auroc_drop=0.005, max_au_pro_drop=0.01, max_score_error=0.01, max_spread_change=0.15)
    same = acceptance_check(reference, reference, 2, bounds)
    assert same["passed"] and same["shortfall"] == 0.0 and same["image_auroc_drop"] == 0.0
    # Better than fp32 passes; only the normal images' scores count for the score error (the third is a defect).
    better = acceptance_check(reference, _measured(0.99, 0.90, [0.105, 0.2, 0.5]), 2, bounds)
    assert better["passed"] and better["validation_score_error_mean"] == pytest.approx(0.0025)
    # An AU-PRO 0.03 lower is 2 bounds too far; an AUROC 0.0075 lower half a bound.
    worse = acceptance_check(reference, _measured(0.9425, 0.77, [0.1, 0.2, 1.0]), 2, bounds)
    assert not worse["passed"] and worse["shortfall"] == pytest.approx(0.5 + 2.0)
    # The local map's spread 0.2 -> 0.26 (+30%: one bound too far); the global map's 0.08 -> 0.072 (-10%: within).
    widened = acceptance_check(reference, _measured(0.95, 0.80, [0.1, 0.2, 1.0], (0.3, 0.56, 0.04, 0.112)), 2, bounds)
    assert widened["map_spread_change"] == pytest.approx({"local": 0.3, "global": -0.1})
    assert not widened["passed"] and widened["shortfall"] == pytest.approx(1.0)


def test_float_layer_search_keeps_the_groups_that_recover_most_until_it_passes():
    # Each group in float takes its share off a shortfall of 0.75 (binary fractions: exact sums).
    recovers = {"teacher_head": 0.5, "student_trunk.3": 0.125, "autoencoder decoder": 0.25, "global_head": 0.0}
    tried = []

    def trial(kept):
        tried.append(list(kept))
        shortfall = max(0.0, 0.75 - sum(recovers[name] for name in kept))
        return Trial(None, {"shortfall": shortfall, "passed": shortfall == 0.0})

    kept, outcome = search_float_layers(list(recovers), trial)
    assert kept == ["teacher_head", "autoencoder decoder"] and outcome.check["passed"]
    # All int8, each group alone, then the two best together (the best alone is not tried again).
    assert tried == [[], ["teacher_head"], ["student_trunk.3"], ["autoencoder decoder"], ["global_head"], ["teacher_head", "autoencoder decoder"]]

    # A group that passes alone ends the search: no other can keep fewer in float.
    tried.clear()
    recovers["student_trunk.3"] = 0.75
    kept, outcome = search_float_layers(list(recovers), trial)
    assert kept == ["student_trunk.3"] and outcome.check["passed"] and tried == [[], ["teacher_head"], ["student_trunk.3"]]
    recovers["student_trunk.3"] = 0.125

    passing = []
    kept, outcome = search_float_layers(list(recovers), lambda kept: passing.append(kept) or Trial(None, {"shortfall": 0.0, "passed": True}))
    assert kept == [] and passing == [[]]  # all int8 passed: nothing else is tried

    # Only fp32 (every group in float) would pass: it is not tried, and the closest trial comes back, failed.
    tried.clear()
    recovers["global_head"] = -0.25  # keeping it in float makes things worse
    kept, outcome = search_float_layers(list(recovers), lambda kept: trial(kept) if len(kept) < len(recovers) else pytest.fail("fp32 tried"))
    assert kept == ["teacher_head", "autoencoder decoder"] and outcome.check["passed"]
    recovers.update({"teacher_head": 0.25, "autoencoder decoder": 0.125, "student_trunk.3": 0.0625})
    tried.clear()
    kept, outcome = search_float_layers(list(recovers), trial)
    assert len(tried) == 1 + 4 + 2 and all(len(kept) < 4 for kept in tried)
    assert kept == ["teacher_head", "autoencoder decoder", "student_trunk.3"] and not outcome.check["passed"]
    assert outcome.check["shortfall"] == 0.75 - 0.4375


def test_layer_groups_name_every_network_convolution_once(tiny):
    module = FusedModel(load_model(tiny.path)[0], fuse_local_head=False)
    groups = layer_groups(module)
    assert list(groups)[:4] == ["teacher_trunk.0", "teacher_trunk.3", "teacher_trunk.6", "student_trunk.0"]
    assert {"teacher_head", "student_local_head", "global_head", "autoencoder encoder", "autoencoder decoder"} <= set(groups)
    assert set(IMAGE_GROUPS) <= set(groups)

    onnx_names = [f"/{name.split('.')[0]}/{name}/Conv" if "." in name else f"/{name}/Conv" for name, layer in module.named_modules() if isinstance(layer, torch.nn.Conv2d)]
    for node in onnx_names:
        assert sum(bool(re.match(pattern, node)) for pattern in groups.values()) == 1, node


def test_the_networks_input_is_quantised_over_every_colour_an_image_can_have(int8_run):
    """NNCF measures the input's range on good images only; the export widens it so that a defect of
    another colour is not clipped before the networks see it, and keeps zero exactly representable."""
    import openvino as ov

    model_path, _, _ = int8_run
    module = FusedModel(load_model(model_path)[0], fuse_local_head=False)
    low, high = input_range(module)
    assert (low, high) == pytest.approx((-0.485, 1 - 0.406), abs=1e-6)  # ImageNet's mean colour
    graph = ov.Core().read_model(str(int8_path(model_path)))
    outside = re.compile(outside_networks(module))
    inputs = [op for op in graph.get_ordered_ops() if op.get_type_name() == "FakeQuantize" and outside.match(op.input_value(0).get_node().get_friendly_name())]
    assert len(inputs) == 1  # one quantiser feeds the three networks' first convolutions
    start, end = (float(inputs[0].input_value(index).get_node().get_data().flatten()[0]) for index in (1, 2))
    assert start <= low and end >= high and (end - start) < 1.01 * (high - low)
    step = (end - start) / 255
    assert -start / step == pytest.approx(round(-start / step), abs=1e-3)


QUANTISE_WITH_THE_IMAGE_GROUPS_IN_FLOAT = '''
import json, sys
import numpy as np
from efficientad.deploy.fused import FusedModel
from efficientad.deploy.graphs import openvino_model
from efficientad.deploy.quantize import IMAGE_GROUPS, float_convolutions, post_training_int8
from efficientad.model import load_model

module = FusedModel(load_model(sys.argv[1])[0], fuse_local_head=False)
calibration = [np.random.default_rng(0).random((1, 3, 256, 256), dtype=np.float32)]
print(json.dumps(float_convolutions(post_training_int8(openvino_model(module), module, calibration, IMAGE_GROUPS))))
'''


def test_every_convolution_that_reads_the_image_can_stay_float(int8_run):
    """The float-layer search may keep all three first convolutions in float: then no quantiser reads the
    image, and there is no input range to widen (this once aborted an export after 47 minutes)."""
    model_path, _, _ = int8_run
    command = [sys.executable, "-c", QUANTISE_WITH_THE_IMAGE_GROUPS_IN_FLOAT, str(model_path)]  # NNCF in a child process, as above
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    names = json.loads(completed.stdout.strip().splitlines()[-1])
    groups = layer_groups(FusedModel(load_model(model_path)[0], fuse_local_head=False))
    # Float: the three first convolutions (and the rest of the autoencoder's encoder, their group), nothing else.
    assert names and all(any(re.match(groups[group], name) for group in IMAGE_GROUPS) for name in names)
    for first in ("/teacher_trunk/teacher_trunk.0/", "/student_trunk/student_trunk.0/", "/autoencoder/autoencoder.0/"):
        assert any(first in name for name in names), first


@pytest.mark.parametrize("low, high", [(-0.485, 0.594), (-1.0, 0.001), (-0.1, 3.0)])
def test_range_with_zero_covers_the_range_with_zero_on_the_grid(low, high):
    start, end = _range_with_zero(low, high)
    assert start <= low and end >= high and end - start < 1.02 * (high - low)
    step = (end - start) / 255
    assert -start / step == pytest.approx(round(-start / step), abs=1e-6)
