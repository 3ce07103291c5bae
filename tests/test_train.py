import math

import numpy as np
import pytest
import torch

from efficientad.config import TrainConfig
from efficientad.model import EfficientADModel, map_scale, normalize_maps, quantile
from efficientad.training.calibrate import calibrate
from efficientad.training.losses import hard_feature_loss
from efficientad.training.train import (
    augment_for_autoencoder,
    fit_teacher_normalization,
    penalty_image,
    train_networks,
    training_step,
)


def brute_force_hard_loss(distance: torch.Tensor, q: float) -> torch.Tensor:
    values = sorted(distance.flatten().tolist())
    position = q * (len(values) - 1)
    low, high = values[math.floor(position)], values[math.ceil(position)]
    threshold = low + (high - low) * (position - math.floor(position))
    kept = [v for v in values if v >= threshold]
    return torch.tensor(sum(kept) / len(kept))


@pytest.mark.parametrize("q", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("shape", [(1, 4, 5, 5), (2, 3, 7, 7), (3, 1000)])
def test_hard_loss_equals_brute_force(q, shape):
    distance = torch.rand(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose(hard_feature_loss(distance, q), brute_force_hard_loss(distance, q).double())


def test_hard_loss_keeps_ties_at_the_threshold():
    distance = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0])
    # q0.5 is 2.0 and every element equal to it counts.
    assert hard_feature_loss(distance, 0.5) == 2.0


@pytest.mark.parametrize("q", [0.0, 0.1, 0.9, 0.995, 0.999, 1.0])
def test_quantile_equals_torch_quantile(q):
    values = torch.randn(10_001, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(quantile(values, q), torch.quantile(values, q))


@pytest.mark.slow
def test_hard_loss_runs_beyond_torch_quantile_limit():
    distance = torch.rand(2**25, generator=torch.Generator().manual_seed(0))
    # torch.quantile refused inputs this large in the torch releases the paper's code ran on.
    threshold = np.quantile(distance.numpy().astype(np.float64), 0.999)
    assert float(quantile(distance, 0.999)) == pytest.approx(threshold, abs=1e-6)
    expected = distance[distance >= float(quantile(distance, 0.999))].double().mean()
    assert float(hard_feature_loss(distance, 0.999)) == pytest.approx(float(expected), rel=1e-6)


def test_autoencoder_augmentation_is_one_jitter_in_range():
    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = augment_for_autoencoder(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.equal(out, images)
    # Brightness by f in [0.8, 1.2] scales pixels; contrast and saturation keep the gray mean near.
    ratio = out.mean() / images.mean()
    assert 0.75 < float(ratio) < 1.25


def test_penalty_image_is_sometimes_gray():
    penalty = (torch.rand(4, 3, 8, 8) * 255).to(torch.uint8)
    generator = torch.Generator().manual_seed(0)
    grays = 0
    for _ in range(200):
        image = penalty_image(penalty, generator, torch.device("cpu"))
        assert image.shape == (1, 3, 8, 8)
        grays += bool(torch.allclose(image[:, 0], image[:, 1]) and torch.allclose(image[:, 1], image[:, 2]))
    assert 35 < grays < 85  # p = 0.3


def _tiny_setup(steps=2, **config):
    torch.manual_seed(0)
    model = EfficientADModel("s", (256, 256))
    images = (torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    return model, images, TrainConfig(steps=steps, **config)


def _loss_history(steps, **config):
    """Each step's losses from a tiny seeded run, and the trained model."""
    model, images, config = _tiny_setup(steps=steps, **config)
    losses = []
    train_networks(model, images, config, progress=False, on_step=lambda step, step_losses: losses.append(step_losses))
    return losses, model


@pytest.mark.slow
def test_penalty_off_and_on():
    model, images, config = _tiny_setup()
    off = train_networks(model, images, config, penalty_images=None, progress=False)
    assert off["final_losses"]["penalty"] == 0.0 and not off["penalty"]
    model, images, config = _tiny_setup()
    on = train_networks(model, images, config, penalty_images=images, progress=False)
    assert on["final_losses"]["penalty"] > 0.0 and on["penalty"]


@pytest.mark.slow
def test_cached_teacher_gives_the_same_losses_as_the_plain_path():
    histories = [_loss_history(3, cache_teacher=cache)[0] for cache in (True, False)]
    assert histories[0][0]["total"] > 0
    for cached, plain in zip(*histories):
        for name in cached:
            assert cached[name] == pytest.approx(plain[name], rel=1e-5, abs=1e-6), name


def test_batched_student_equals_separate_calls():
    model = EfficientADModel("s", (256, 256))
    a, b = torch.rand(1, 3, 256, 256), torch.rand(1, 3, 256, 256)
    with torch.no_grad():
        together = model.student(torch.cat([a, b]))
        apart = torch.cat([model.student(a), model.student(b)])
    assert torch.allclose(together, apart, atol=1e-5)


@pytest.mark.slow
def test_batch_size_above_one_trains():
    model, images, config = _tiny_setup(steps=2, batch_size=2)
    result = train_networks(model, images, config, progress=False)
    assert np.isfinite(result["final_losses"]["total"])


@pytest.mark.slow
def test_training_step_only_updates_student_and_autoencoder():
    model, images, config = _tiny_setup()
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    train_networks(model, images, config, progress=False)
    for key, value in model.teacher.state_dict().items():
        assert torch.equal(value, teacher_before[key])
    assert not model.teacher.training


def test_calibration_maps_quantiles_to_0_and_0_1():
    model = EfficientADModel("s", (256, 256)).eval()
    validation = (torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(2)) * 255).to(torch.uint8)
    result = calibrate(model, validation, TrainConfig(steps=1))
    images = validation.float() / 255
    with torch.no_grad():
        maps = normalize_maps(model.raw_maps(images), *map_scale(model.map_quantiles))
    for branch in (1, 2):
        assert float(torch.quantile(maps[:, branch].flatten(), 0.9)) == pytest.approx(0.0, abs=1e-5)
        assert float(torch.quantile(maps[:, branch].flatten(), 0.995)) == pytest.approx(0.1, abs=1e-5)
    # Scores are the plain path's maxima at the model's image size; the threshold their 99% quantile.
    with torch.no_grad():
        plain_scores = model(images)[:, 0].amax(dim=(1, 2))
    np.testing.assert_allclose(result["validation_scores"], plain_scores.numpy(), rtol=1e-5)
    assert result["threshold"] == pytest.approx(float(np.quantile(result["validation_scores"], 0.99)), rel=1e-12)


@pytest.mark.slow  # about 8 s for S and 25 s for M on 2 cores
@pytest.mark.parametrize("model_size", ["s", "m"])
def test_training_step_equals_the_papers_losses_written_plainly(model_size):
    """The optimised step (cached teacher, one trunk pass, half heads) against algorithm 1 verbatim:
    the same losses and the same gradients for every trained parameter (fp32, relative 1e-4)."""
    torch.manual_seed(0)
    model = EfficientADModel(model_size, (256, 256)).eval()  # eval: dropout off, so both sides are deterministic
    images = (torch.rand(2, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    penalty = (torch.rand(3, 3, 256, 256, generator=torch.Generator().manual_seed(1)) * 255).to(torch.uint8)
    config = TrainConfig(steps=1, batch_size=2)
    cached = fit_teacher_normalization(model, images, keep_features=True)
    index = torch.tensor([1, 0])
    trained = [*model.student.parameters(), *model.autoencoder.parameters()]
    got = training_step(model, images, index, cached, penalty, torch.Generator().manual_seed(5), config)
    got_gradients = torch.autograd.grad(got["total"], trained)

    generator = torch.Generator().manual_seed(5)
    clean = images[index].float() / 255
    augmented = augment_for_autoencoder(clean, generator)
    penalty_input = penalty_image(penalty, generator, torch.device("cpu"))
    with torch.no_grad():
        teacher_clean = model.teacher_features(model.normalize_input(clean))
        teacher_augmented = model.teacher_features(model.normalize_input(augmented))
    student_clean = model.student(model.normalize_input(clean))[:, :384]
    distance = (teacher_clean - student_clean) ** 2
    loss_hard = distance[distance >= torch.quantile(distance, 0.999)].mean()
    loss_penalty = (model.student(model.normalize_input(penalty_input))[:, :384] ** 2).mean()
    reconstruction = model.autoencoder(model.normalize_input(augmented))
    loss_ae = ((teacher_augmented - reconstruction) ** 2).mean()
    loss_stae = ((reconstruction - model.student(model.normalize_input(augmented))[:, 384:]) ** 2).mean()
    expected = {"hard": loss_hard, "penalty": loss_penalty, "ae": loss_ae, "stae": loss_stae}
    expected["total"] = sum(expected.values())
    for name, value in expected.items():
        assert float(got[name].detach()) == pytest.approx(float(value.detach()), rel=1e-4), name
    expected_gradients = torch.autograd.grad(expected["total"], trained)
    for parameter, want, have in zip(trained, expected_gradients, got_gradients):
        assert want.norm() > 0
        assert float((have - want).norm() / want.norm()) < 1e-4, tuple(parameter.shape)


@pytest.mark.slow
def test_channels_last_gives_the_same_losses():
    histories = []
    for channels_last in (False, True):
        losses, model = _loss_history(2, channels_last=channels_last)
        histories.append(losses)
        assert model.student[0].weight.is_contiguous()  # saved models keep the plain layout
    for a, b in zip(*histories):
        assert a["total"] == pytest.approx(b["total"], rel=1e-4)
