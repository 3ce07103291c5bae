"""``train_networks(on_step=...)`` as a snapshot hook: it sees the model right after each step, and
benchmarks/learning_curves.py's scoring through it changes nothing of the training.

The steps here are cheap stand-ins (a loss on one student weight) that draw from torch's global
generator as the real step's dropout does, so scoring that moved that generator would show.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from efficientad.config import TrainConfig
from efficientad.model import EfficientADModel
from efficientad.training import train as train_module
from efficientad.training.train import train_networks

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _images(count: int = 2) -> torch.Tensor:
    return (torch.rand(count, 3, 256, 256, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


def _random_step(model, *args):
    weight = model.student[0].weight
    loss = (weight * torch.rand_like(weight)).pow(2).mean()
    zero = torch.zeros(())
    return {"total": loss, "hard": loss, "penalty": zero, "ae": zero, "stae": zero}


@pytest.fixture
def cheap_steps(monkeypatch):
    monkeypatch.setattr(train_module, "training_step", _random_step)


def _trained(steps: int, on_step=None) -> EfficientADModel:
    torch.manual_seed(0)
    model = EfficientADModel("s", (256, 256))
    train_networks(model, _images(), TrainConfig(steps=steps), progress=False, on_step=on_step)
    return model


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    # Exactly equal; NaN matches NaN (an uncalibrated model's map quantiles are NaN).
    return a.keys() == b.keys() and all(torch.allclose(a[name], b[name], rtol=0, atol=0, equal_nan=True) for name in a)


def test_on_step_sees_the_model_after_exactly_that_many_steps(cheap_steps, monkeypatch):
    # Without the learning-rate drop, the first k steps of a run are a k-step run, which gives the expected model.
    monkeypatch.setattr(train_module, "learning_rate", lambda config, plan, step: config.learning_rate)
    calls, seen = [], {}

    def on_step(step: int, losses: dict[str, float]) -> None:
        calls.append(step)
        seen[step + 1] = copy.deepcopy(model.state_dict())  # on_step gets the 0-based index of the step just taken

    torch.manual_seed(0)
    model = EfficientADModel("s", (256, 256))
    train_networks(model, _images(), TrainConfig(steps=4), progress=False, on_step=on_step)
    assert calls == [0, 1, 2, 3]
    for steps in (1, 3):
        assert _same(seen[steps], _trained(steps).state_dict()), steps
    assert not _same(seen[1], seen[3])
    assert _same(seen[4], model.state_dict())


def _learning_curves_module():
    spec = importlib.util.spec_from_file_location("learning_curves", BENCHMARKS / "learning_curves.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_scoring_snapshots_as_the_benchmark_does_leaves_training_bit_identical(cheap_steps, tiny):
    learning_curves = _learning_curves_module()
    config = TrainConfig(steps=4, validate_every=2)
    train, validation = learning_curves.held_out(tiny.split, config)

    torch.manual_seed(0)
    scored = EfficientADModel("s", (256, 256))
    history, points = learning_curves.train_with_snapshots(
        scored, train, validation, config, None, (2, 4),
        lambda snapshot: learning_curves.score_snapshot(snapshot, validation, tiny.split, config),
    )  # fmt: skip
    torch.manual_seed(0)
    plain = EfficientADModel("s", (256, 256))
    plain_history = train_networks(plain, train, config, progress=False, validation_images=validation)

    assert [point["step"] for point in points] == [2, 4]
    assert all(0.0 <= point["image_auroc"] <= 1.0 and point["eval_seconds"] > 0 for point in points)
    assert [point["lr_dropped"] for point in points] == [False, True]  # the drop is at step 3 of 4
    assert _same(scored.state_dict(), plain.state_dict())
    # The learning curve too, but for its wall-clock seconds.
    assert [point["validation"] for point in history["curve"]] == [point["validation"] for point in plain_history["curve"]]


def test_a_learning_curve_run_stopped_mid_way_resumes_from_its_checkpoint_bit_for_bit(cheap_steps, tiny, tmp_path):
    """A 5,000-step curve outlasts a working session on a CPU without bf16: it must survive a stop."""
    from efficientad.training.checkpoint import Checkpointing, read_checkpoint

    learning_curves = _learning_curves_module()
    config = TrainConfig(steps=4, validate_every=2)
    train, validation = learning_curves.held_out(tiny.split, config)

    def score(snapshot):
        return learning_curves.score_snapshot(snapshot, validation, tiny.split, config)

    def run(checkpoint=None, score=score):
        torch.manual_seed(0)
        model = EfficientADModel("s", (256, 256))
        history, points = learning_curves.train_with_snapshots(model, train, validation, config, None, (2, 4), score, checkpoint=checkpoint)
        return model, points

    whole, whole_points = run()

    path = tmp_path / "run.pt"
    calls = []

    def stopped_at_the_last_point(snapshot):
        calls.append(1)
        if len(calls) == 2:  # the point at step 4: the session ends before it
            raise KeyboardInterrupt
        return score(snapshot)

    with pytest.raises(KeyboardInterrupt):
        run(Checkpointing(path, 1e-9, {}), stopped_at_the_last_point)  # saves after every step
    saved = read_checkpoint(path)
    assert saved["step"] == 3 and [point["step"] for point in saved["benchmark_points"]] == [2]

    before = dict(saved["benchmark_points"][0])
    resumed, points = run(Checkpointing(path, 1e-9, {}, saved))
    assert _same(resumed.state_dict(), whole.state_dict())
    assert [point["step"] for point in points] == [2, 4]
    assert [point["image_auroc"] for point in points] == [point["image_auroc"] for point in whole_points]
    assert {key: points[0][key] for key in before} == before  # the point made before the stop is kept, not redone
    assert 0 < points[0]["seconds"] < points[1]["seconds"]
