"""Quantisation-aware fine-tuning before int8: the paper's losses through the deployed networks, with int8 rounding."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from efficientad.data.images import load_images, to_float
from efficientad.deploy.fused import FusedModel
from efficientad.deploy.quantize import held_out_split, input_quantization_range, network_scopes, quantization_images
from efficientad.errors import EfficientADError
from efficientad.model import load_model
from efficientad.training.quantization_aware import (
    FROZEN,
    FakeQuantizedConv,
    add_fake_quantization,
    distillation_losses,
    fine_tune_for_int8,
    measure_ranges,
    remove_fake_quantization,
)

PENALTY = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


def test_fake_quantized_conv_rounds_input_to_int8_and_weights_to_half_the_int8_range_and_trains_the_conv_itself():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    wrapped = FakeQuantizedConv(conv)
    x = torch.relu(torch.randn(2, 4, 9, 9))
    output = wrapped(x)  # the first call measures the ranges
    rounded_input = wrapped.input_quantizer(x)
    rounded_weight = wrapped.weight_quantizer(conv.weight)
    assert len(torch.unique(rounded_input)) <= 256 and not torch.equal(rounded_input, x)
    # Weights as the export quantises them: per output channel, on steps of its largest weight / 64, at most 64 steps from zero.
    steps = rounded_weight.detach() / (conv.weight.detach().abs().amax(dim=(1, 2, 3), keepdim=True) / 64)
    torch.testing.assert_close(steps, steps.round(), atol=1e-4, rtol=0)
    assert steps.abs().amax() == pytest.approx(64, abs=1e-3) and all(len(torch.unique(channel)) <= 129 for channel in rounded_weight)
    torch.testing.assert_close(output, conv._conv_forward(rounded_input, rounded_weight, conv.bias))
    # Rounding moves the output a little, not a lot.
    error = (output - conv(x)).abs().max() / conv(x).abs().max()
    assert 0 < error < 0.05
    # Gradients pass the rounding and land on the wrapped convolution's own weights.
    before = conv.weight.detach().clone()
    optimizer = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    wrapped(x).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(conv.weight, before)


def test_fake_quantization_wraps_every_network_convolution_and_comes_off_again(tiny):
    model = load_model(tiny.path)[0]
    reference = FusedModel(model, fuse_local_head=False)
    module = copy.deepcopy(reference)
    convolutions = [layer for layer in module.modules() if isinstance(layer, nn.Conv2d)]
    wrapped = add_fake_quantization(module)
    assert [layer.conv for layer in wrapped] == convolutions and len(wrapped) == 23
    image = to_float(load_images(tiny.split.train[:1], tuple(model.image_size)))
    for layer in wrapped:
        layer.input_quantizer.disable_fake_quant()
        layer.weight_quantizer.disable_fake_quant()
    with torch.no_grad():
        for got, expected in zip(module.differences(image), reference.differences(image)):
            torch.testing.assert_close(got, expected)
    remove_fake_quantization(module)
    assert [layer for layer in module.modules() if isinstance(layer, nn.Conv2d)] == convolutions
    assert not any(isinstance(layer, FakeQuantizedConv) for layer in module.modules())


def test_ranges_round_the_networks_input_on_the_export_grid_and_the_rest_as_measured(tiny):
    model, metadata = load_model(tiny.path)
    module = FusedModel(model, fuse_local_head=False)
    calibration, _ = quantization_images(metadata, tiny.root, tiny.category, count=2)
    wrapped = add_fake_quantization(module)
    measure_ranges(module, wrapped, [torch.from_numpy(image) for image in calibration])
    start, end = input_quantization_range(module)
    inputs = [getattr(module, name)[0].input_quantizer for name in ("teacher_trunk", "student_trunk", "autoencoder")]
    for quantizer in inputs:
        # What int8 will represent: 256 levels from start to end (zero among them), as the export's input quantiser.
        scale, zero_point = float(quantizer.scale), int(quantizer.zero_point)
        assert -zero_point * scale == pytest.approx(start, rel=1e-6) and (255 - zero_point) * scale == pytest.approx(end, rel=1e-6)
    for layer in wrapped:
        assert not layer.input_quantizer.observer_enabled and layer.input_quantizer.fake_quant_enabled
    # The other convolutions' inputs keep the ranges measured on the calibration images.
    inner = [layer.input_quantizer for layer in wrapped if layer.input_quantizer not in inputs]
    assert inner and all(float(quantizer.scale) != pytest.approx((end - start) / 255) for quantizer in inner)


def _rounding_error(module: FusedModel, reference: FusedModel, calibration, images: torch.Tensor) -> float:
    rounded = copy.deepcopy(module)
    measure_ranges(rounded, add_fake_quantization(rounded), [torch.from_numpy(image) for image in calibration])
    with torch.no_grad():
        return float(distillation_losses(rounded, reference, images)["total"])


def test_fine_tuning_brings_the_rounded_maps_towards_fp32_and_leaves_the_model_and_teacher_alone(tiny):
    model, metadata = load_model(tiny.path)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    images = load_images(tiny.split.train, tuple(model.image_size))
    calibration, _ = quantization_images(metadata, tiny.root, tiny.category, count=4)
    # This random-teacher model's differences are tiny: at the default rate (bottle's) Adam's first steps overshoot them.
    tuned = fine_tune_for_int8(model, images, calibration, steps=4, learning_rate=1e-6, penalty_images=PENALTY, progress=False)

    reference = FusedModel(model, fuse_local_head=False)
    on = to_float(images[:4])
    assert _rounding_error(tuned.module, reference, calibration, on) < _rounding_error(reference, reference, calibration, on)
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name]), f"the model's {name} changed"
    for network in network_scopes(reference):
        same = all(torch.equal(a, b) for a, b in zip(getattr(reference, network).parameters(), getattr(tuned.module, network).parameters()))
        assert same == (network in FROZEN), network
    # Plain convolutions again, calibrated as the model, without gradients: ready for post-training quantisation.
    assert not any(isinstance(layer, FakeQuantizedConv) for layer in tuned.module.modules())
    assert not any(parameter.requires_grad for parameter in tuned.module.parameters())
    assert torch.equal(tuned.module.map_gain, reference.map_gain) and torch.equal(tuned.module.map_offset, reference.map_offset)
    record = tuned.record
    assert record["steps"] == 4 and record["penalty"] is True and record["n_training_images"] == len(images)
    assert set(record["losses_first_1_steps"]) == {"total", "local", "global"}

    with pytest.raises(EfficientADError, match="uint8"):
        fine_tune_for_int8(model, to_float(images), calibration, steps=1, progress=False)
    with pytest.raises(EfficientADError, match="steps must be an integer >= 1"):
        fine_tune_for_int8(model, images, calibration, steps=0, progress=False)


@pytest.mark.slow
def test_export_with_qat_steps_quantises_the_fine_tuned_networks(tmp_path):
    """``export --precision int8 --qat-steps N``: the record says what the fine-tuning did, and the
    file runs with the quantiles and threshold measured on it."""
    pytest.importorskip("nncf")
    from efficientad.data.datasets import load_split
    from efficientad.data.synthetic import make_dataset
    from efficientad.deploy.inferencer import Inferencer
    from efficientad.detector import EfficientAD

    from .conftest import fit_quietly

    root = tmp_path / "data"
    make_dataset(root, "part", n_train=20, n_test_good=2, n_test_defect=2, size=256)
    split = load_split("mvtec", root, "part")
    model_path = fit_quietly(EfficientAD(teacher="random", steps=2, progress=False), split.train).save(tmp_path / "model.pt")
    out = tmp_path / "tuned.int8.xml"
    # In a child process, as in test_int8: NNCF's quantisation and later forks of the same process do not mix.
    command = [sys.executable, "-m", "efficientad", "export", "--model", str(model_path), "--precision", "int8", "--out", str(out),
               "--data", str(root), "--category", "part", "--qat-steps", "2", "--penalty-images", str(root / "part" / "train"),
               "--max-auroc-drop", "1", "--max-au-pro-drop", "1", "--max-score-error", "10", "--max-spread-change", "100"]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "quantisation-aware fine-tuning: 2 steps" in completed.stderr
    record = json.loads(out.with_suffix(".json").read_text())
    fine_tuning = record["quantization_aware_fine_tuning"]
    train_paths, _ = held_out_split(load_model(model_path)[1], root, "part")
    assert fine_tuning["steps"] == 2 and fine_tuning["penalty"] is True and fine_tuning["n_training_images"] == len(train_paths)
    assert "after quantisation-aware fine-tuning" in record["tool"]
    inferencer = Inferencer.load(out)
    _, validation = quantization_images(load_model(model_path)[1], root, "part")
    scores = np.concatenate([inferencer.run(image).score for image in validation])
    np.testing.assert_allclose(scores, record["validation_scores"], rtol=1e-5)
