"""Time to a good model: the schedule on a time budget, the learning curve, early stopping, resumable runs.

The loop tests replace the training step by a cheap one (a loss on one student weight) and, where
time matters, the loop's clock by one that each step advances by a fixed amount: the budget's
arithmetic is then exact, and the tests take seconds. The resume test trains for real.
"""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from efficientad.cli import build_parser, main
from efficientad.cli.options import training_settings
from efficientad.config import SCHEDULE_SETTINGS, TrainConfig, make_config
from efficientad.errors import EfficientADError
from efficientad.training.checkpoint import check_same_config
from efficientad.data.synthetic import make_dataset
from efficientad.model import EfficientADModel, quantile
from efficientad.training import train as train_module
from efficientad.training.curves import ValidationSet
from efficientad.training.losses import hard_feature_loss
from efficientad.training.schedule import Plan, budget_plan, flattened, learning_rate
from efficientad.training.train import train_networks


def _images(count: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(count, 3, 256, 256, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def _model() -> EfficientADModel:
    torch.manual_seed(0)
    return EfficientADModel("s", (256, 256))


# ------------------------------------------------------------------------------------------ schedule
def test_the_papers_schedule_drops_the_learning_rate_tenfold_at_95_percent():
    config = TrainConfig(steps=100)
    plan = Plan.of(config, config.steps)
    rates = [learning_rate(config, plan, step) for step in range(100)]
    assert rates[:95] == [1e-4] * 95
    assert rates[95:] == pytest.approx([1e-5] * 5)
    assert plan.validate_every == 5  # twenty curve points by default


def test_a_budget_plans_the_steps_that_fit_with_their_validations():
    config = TrainConfig(steps=70_000)
    # 600 s left at 0.5 s/step: about 1,200 steps, so a validation every 60 steps; at 0.1 s each, 0.50167 s/step.
    plan = budget_plan(config, done=11, seconds_left=600.0, step_seconds=0.5, validation_seconds=0.1)
    assert plan.steps == 11 + int(600.0 / (0.5 + 0.1 / 60))
    assert plan.drop_step == int(0.95 * plan.steps) and plan.validate_every == plan.steps // 20
    # Validations of 2 s would take 5% of the time only every 80 steps: 0.525 s/step.
    plan = budget_plan(config, done=11, seconds_left=600.0, step_seconds=0.5, validation_seconds=2.0)
    assert plan.validate_every == 80 and plan.steps == 11 + int(600.0 / 0.525)
    # --steps caps the plan; a spent budget plans no more steps.
    assert budget_plan(TrainConfig(steps=500), 11, 600.0, 0.5, 2.0).steps == 500
    assert budget_plan(config, 11, -5.0, 0.5, 2.0).steps == 11


@pytest.mark.parametrize(
    ("totals", "step", "stops"),
    [
        ([10.0, 9.0, 8.0, 7.0, 6.0], 50, False),  # still falling
        ([10.0, 9.0, 9.0, 8.95, 8.99], 50, True),  # best of the last three is only 0.6% below 9.0
        ([10.0, 9.0, 9.0, 8.95, 8.99], 19, False),  # before 20% of the 100 planned steps
        ([10.0, 9.0, 8.85, 9.5, 9.5], 50, False),  # 8.85 is 1.7% below 9.0
        ([10.0, 10.0, 10.0], 50, False),  # three validations only: nothing before them to compare with
    ],
)
def test_early_stop_rule(totals, step, stops):
    assert flattened(totals, step, Plan.of(TrainConfig(steps=100), 100)) is stops


# --------------------------------------------------------------------------------- learning curve
def test_validation_losses_are_the_training_losses_on_held_out_images_and_the_raw_map_spreads():
    model, images = _model(), _images(2, seed=4)
    config = TrainConfig(steps=1)
    got = ValidationSet(model, images, config, cache=False).losses(model)
    cached = ValidationSet(model, images, config, cache=True).losses(model)
    assert model.training  # the mode it was in; validation itself ran in eval mode (no dropout)

    model.eval()
    with torch.no_grad():
        x = model.normalize_input(images.float() / 255)
        teacher, student, reconstruction = model.teacher_features(x), model.student(x), model.autoencoder(x)
        raw = model.raw_maps(images.float() / 255)
    hard = np.mean([float(hard_feature_loss((t - s[:384]).pow(2))) for t, s in zip(teacher, student)])
    expected = {
        "hard": hard,
        "ae": float((teacher - reconstruction).pow(2).mean()),
        "stae": float((reconstruction - student[:, 384:]).pow(2).mean()),
        "local_spread": float(quantile(raw[:, 0], 0.995) - quantile(raw[:, 0], 0.9)),
        "global_spread": float(quantile(raw[:, 1], 0.995) - quantile(raw[:, 1], 0.9)),
    }
    expected["total"] = expected["hard"] + expected["ae"] + expected["stae"]
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-4), name
        assert cached[name] == pytest.approx(got[name], rel=1e-6), name


# ------------------------------------------------------------------------------- the loop, cheaply
class Clock:
    """The loop's ``time``: it moves only when a step runs."""

    def __init__(self, now: float = 0.0):
        self.now = now

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def cheap_steps(monkeypatch):
    """Steps that cost nothing and take ``clock.seconds_per_step`` on the loop's clock; records each step's learning rate."""
    clock = Clock()
    clock.seconds_per_step = [10.0]
    rates = []

    def step(model, *args):
        clock.now += clock.seconds_per_step[min(len(rates), len(clock.seconds_per_step) - 1)]
        loss = model.student[0].weight.pow(2).mean()
        zero = torch.zeros(())
        return {"total": loss, "hard": loss, "penalty": zero, "ae": zero, "stae": zero}

    def recording_optimizer(model, config):
        optimizer = make_optimizer(model, config)
        step_once = optimizer.step
        optimizer.step = lambda *args, **kwargs: (rates.append(optimizer.param_groups[0]["lr"]), step_once(*args, **kwargs))[1]
        return optimizer

    make_optimizer = train_module.make_optimizer
    monkeypatch.setattr(train_module, "time", clock)
    monkeypatch.setattr(train_module, "training_step", step)
    monkeypatch.setattr(train_module, "make_optimizer", recording_optimizer)
    clock.rates = rates
    return clock


def test_a_time_budget_lays_the_schedule_on_the_steps_that_fit(cheap_steps, capsys):
    # 50 s went to loading before training; 11 timed steps of 10 s leave 140 s of the 300: 14 more steps.
    cheap_steps.now = 50.0
    history = train_networks(_model(), _images(3), TrainConfig(steps=1000, time_budget=300.0), progress=True, started=0.0)
    assert (history["planned_steps"], history["steps_done"], history["stopped_by"]) == (25, 25, "time_budget")
    assert history["measured_step_seconds"] == 10.0 and history["lr_drop_step"] == int(0.95 * 25)
    assert cheap_steps.rates[:23] == [1e-4] * 23 and cheap_steps.rates[23:] == pytest.approx([1e-5] * 2)
    said = capsys.readouterr().err
    assert "25 of 1,000 steps fit" in said and "14 more steps at 10.000 s/step" in said


def test_steps_end_a_budgeted_run_when_they_come_first(cheap_steps):
    history = train_networks(_model(), _images(3), TrainConfig(steps=15, time_budget=10_000.0), progress=False)
    assert (history["planned_steps"], history["steps_done"], history["stopped_by"]) == (15, 15, "steps")
    assert cheap_steps.rates[14] == pytest.approx(1e-5) and cheap_steps.rates[13] == 1e-4


def test_a_run_whose_steps_got_slower_than_measured_is_replanned_and_still_drops_its_learning_rate(cheap_steps):
    cheap_steps.seconds_per_step = [10.0] * 11 + [20.0]  # 110 s for the timed steps, then 20 s each
    history = train_networks(_model(), _images(3), TrainConfig(steps=1000, time_budget=300.0), progress=False, started=0.0)
    # Planned at 10 s/step: 11 + 19 steps, dropping at step 28, which at 20 s/step would come after the
    # budget (the old behaviour: 21 steps done, none at the low rate). Replanned on the latest steps,
    # 9 steps of 20 s fit: 20 in all, the last at x0.1, ending within the 300 s.
    assert (history["planned_steps"], history["steps_done"], history["stopped_by"]) == (20, 20, "time_budget")
    # The last plan, at step 18, took the mean of the 10 latest steps: 3 of 10 s and 7 of 20 s.
    assert history["lr_drop_step"] == int(0.95 * 20) and history["measured_step_seconds"] == pytest.approx(17.0)
    assert cheap_steps.rates[:19] == [1e-4] * 19 and cheap_steps.rates[19:] == pytest.approx([1e-5])
    assert cheap_steps.now == 110.0 + 9 * 20.0


def test_a_long_run_without_a_budget_says_how_long_and_suggests_one(cheap_steps, capsys):
    train_networks(_model(), _images(3), TrainConfig(steps=400), progress=True)
    said = capsys.readouterr().err
    assert "about 65 min for 389 more steps at 10.000 s/step on this machine" in said and "--time-budget" in said


def test_early_stop_ends_training_when_the_validation_loss_is_flat(cheap_steps):
    # A learning rate of 1e-12 leaves the model as it is: the validation loss is flat from the start.
    config = TrainConfig(steps=40, validate_every=2, early_stop=True, learning_rate=1e-12)
    history = train_networks(_model(), _images(3), config, progress=False, validation_images=_images(1, seed=1))
    # Validations at steps 2, 4, 6, 8; at step 8 (20% of 40) the last three did not improve on the first.
    assert (history["steps_done"], history["stopped_by"]) == (8, "early_stop")
    assert [point["step"] for point in history["curve"]] == [2, 4, 6, 8]
    assert history["early_stop_rule"].startswith("once 20% of the planned steps are done")


def test_time_budget_is_given_in_minutes_on_the_command_line():
    args = build_parser().parse_args(["train", "--data", "d", "--category", "c", "--out", "o", "--time-budget", "2.5", "--early-stop"])
    settings = training_settings(args)
    assert settings["time_budget"] == 150.0 and settings["early_stop"] is True
    demo = build_parser().parse_args(["demo", "--time-budget", "3"])
    assert demo.time_budget == 3.0


# --------------------------------------------------------------------------------------- schedules
SCHEDULED = ("steps", "batch_size", "learning_rate")


def test_a_schedule_sets_steps_batch_size_and_learning_rate_unless_they_are_given():
    assert [getattr(TrainConfig(), name) for name in SCHEDULED] == [70_000, 1, 1e-4]  # the paper's
    fast = TrainConfig(schedule="fast")
    assert [getattr(fast, name) for name in SCHEDULED] == [SCHEDULE_SETTINGS["fast"][name] for name in SCHEDULED]
    assert fast.learning_rate != 1e-4 and fast.steps < 70_000
    given = TrainConfig(schedule="fast", steps=10)
    assert (given.steps, given.learning_rate) == (10, fast.learning_rate)
    # Another schedule over a config: that schedule's values, but for those given with it.
    assert [getattr(make_config(TrainConfig, fast, {"schedule": "paper"}), name) for name in SCHEDULED] == [70_000, 1, 1e-4]
    assert make_config(TrainConfig, fast, {"schedule": "paper", "steps": 5}).steps == 5
    # Other settings leave the schedule's values, and those given before, alone.
    assert make_config(TrainConfig, given, {"seed": 3}).steps == 10
    with pytest.raises(EfficientADError, match="schedule must be one of 'paper', 'fast'"):
        TrainConfig(schedule="slow")


def test_schedule_on_the_command_line_and_in_help(capsys):
    args = build_parser().parse_args(["train", "--data", "d", "--category", "c", "--out", "o", "--schedule", "fast", "--steps", "7"])
    assert {"schedule": "fast", "steps": 7}.items() <= training_settings(args).items()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    fast = SCHEDULE_SETTINGS["fast"]
    assert f"the schedule's: paper 70,000, fast {fast['steps']:,}" in shown
    assert f"paper 0.0001, fast {fast['learning_rate']:g}" in shown


def test_a_checkpoint_older_than_a_setting_resumes_with_its_default():
    config = TrainConfig(steps=4).as_dict()
    older = {"config": {name: value for name, value in config.items() if name != "schedule"}}
    check_same_config(older, config, "old.pt")  # no "schedule" in it: the paper's, which it ran
    with pytest.raises(EfficientADError, match="schedule='paper' \\(this run: 'fast'\\)"):
        check_same_config(older, TrainConfig(schedule="fast", steps=4, batch_size=1, learning_rate=1e-4).as_dict(), "old.pt")


# ------------------------------------------------------------------------------------ resumed runs
@pytest.mark.slow  # 8 real steps and 3 runs' image loading and calibration: about 30 s on 2 cores
def test_a_stopped_run_resumed_gives_the_model_of_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    make_dataset(data, "part", n_train=8, n_test_good=2, n_test_defect=1)
    # 4 steps on 7 images with penalty images: the data order wraps, dropout and augmentations draw,
    # and the learning rate drops at the last step, all after the resume.
    common = ["--category", "part", "--teacher", "random", "--steps", "4", "--penalty-images", str(data / "part" / "test" / "good")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random teacher's "testing only"
        _stop_and_resume(data, common, tmp_path, monkeypatch, capsys)
    whole, resumed = (json.loads((tmp_path / name / "train.json").read_text()) for name in ("whole", "stopped"))
    assert resumed["model_tensor_sha256"] == whole["model_tensor_sha256"]
    assert resumed["training"]["resumed_from_step"] == 2 and resumed["training"]["steps_done"] == 4
    assert [point["step"] for point in resumed["training"]["curve"]] == [1, 2, 3, 4]
    stopped = tmp_path / "stopped"
    assert not (stopped / "checkpoint.pt").exists() and (stopped / "training_curve.png").is_file()


def _stop_and_resume(data, common, tmp_path, monkeypatch, capsys):
    """Train whole; train again, killed at the third step; resume that run (after two refused resumes)."""
    assert main(["train", "--data", str(data), *common, "--out", str(tmp_path / "whole")]) == 0

    real_step, calls = train_module.training_step, []

    def stopped_at_the_third_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stands for a kill
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_step", stopped_at_the_third_step)
    stopped = tmp_path / "stopped"
    assert main(["train", "--data", str(data), *common, "--out", str(stopped), "--checkpoint-every", "1e-9"]) == 130
    assert (stopped / "checkpoint.pt").is_file() and not (stopped / "model.pt").exists()
    monkeypatch.setattr(train_module, "training_step", real_step)
    capsys.readouterr()

    assert main(["train", "--resume", str(stopped), "--steps", "5"]) == 2
    assert "drop --steps" in capsys.readouterr().err
    changed = tmp_path / "changed"
    shutil.copytree(data, changed)
    first = sorted((changed / "part" / "train" / "good").iterdir())[0]
    Image.fromarray(255 - np.asarray(Image.open(first))).save(first)
    assert main(["train", "--resume", str(stopped), "--data", str(changed)]) == 2
    assert "was trained on other" in capsys.readouterr().err

    assert main(["train", "--resume", str(stopped)]) == 0
