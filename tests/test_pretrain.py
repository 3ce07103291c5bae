import json
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

from efficientad.cli import main
from efficientad.cli.pretrain import TIME_BUDGET_HELP
from efficientad.errors import EfficientADError
from efficientad.model import tensors_sha256
from efficientad.training import pretrain as pretrain_module
from efficientad.training import target_stats
from efficientad.training.pretrain import (
    BACKBONES,
    MIN_STATISTICS_SAMPLES,
    STATISTICS_BUDGET_SHARE,
    DistillationTarget,
    checkpoint_path,
    load_backbone,
    pretrain_teacher,
)

# Tiny settings: 32x32 PDN input (64x64 for the backbone, an 8x8 target grid), random resnet18.
TINY = dict(
    backbone="resnet18",
    backbone_weights=None,
    image_size=32,
    batch_size=4,
    normalization_images=16,
    validate_every=5,
    device="cpu",
    workers=0,
    progress=False,
)


def _smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    channels = [
        np.sin(x * rng.uniform(2, 12) + rng.uniform(0, 6)) * 0.5 + 0.5,
        y ** rng.uniform(0.5, 2),
        np.cos((x + y) * rng.uniform(2, 9)) * 0.5 + 0.5,
    ]
    return (np.stack(channels, axis=-1) * 255).astype(np.uint8)


@pytest.fixture(autouse=True, scope="module")
def user_cache(tmp_path_factory) -> Path:
    """The user cache folder, where target statistics go by default, in a temporary folder."""
    folder = tmp_path_factory.mktemp("user_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EFFICIENTAD_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Eight small images of mixed sizes and formats, some in a sub-folder."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "more").mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        image = Image.fromarray(_smooth_image(rng, 40 + 4 * i, 48))
        image.save(folder / ("more" if i % 2 else ".") / f"{i}.{'jpg' if i % 3 == 0 else 'png'}")
    return folder


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory) -> Path:
    """A full torchvision resnet18 state_dict (random weights, layer4 and fc included)."""
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------ target


@pytest.mark.parametrize("name", list(BACKBONES))
def test_channel_bookkeeping(name):
    target = DistillationTarget(name, weights=None)
    assert not hasattr(target.backbone, "layer4") and not hasattr(target.backbone, "fc")
    for layer, channels in zip(("layer2", "layer3"), BACKBONES[name]):
        last_norm = [m for m in getattr(target.backbone, layer)[-1].modules() if isinstance(m, nn.BatchNorm2d)][-1]
        assert last_norm.num_features == channels
        index, weight = getattr(target, f"{layer}_index"), getattr(target, f"{layer}_weight")
        assert weight.shape[0] == 1024 and int(index.max()) < channels
        # Every pooled value is an average: its weights sum to one.
        torch.testing.assert_close(weight.sum(dim=(1, 2, 3)), torch.ones(1024))


# The wide backbones differ only inside their blocks; a forward pass of them is slow on two cores.
@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_target_shape(name):
    target = DistillationTarget(name, weights=None)
    images = torch.randn(2, 3, 32, 32)
    layer2, layer3 = target.backbone(images)
    assert (layer2.shape[1:], layer3.shape[1:]) == ((BACKBONES[name][0], 4, 4), (BACKBONES[name][1], 2, 2))
    assert target(images).shape == (2, 384, 4, 4)


def _reference_embedding(layer2: torch.Tensor, layer3: torch.Tensor) -> torch.Tensor:
    """The reference reproduction's steps, literally: unfold 3x3 patches, resize layer3's patch maps,
    pool each location's flattened patch to 1024, concatenate the layers and pool to 384."""
    batch, _, height, width = layer2.shape

    def patch_maps(features):
        channels, h, w = features.shape[1:]
        return F.unfold(features, kernel_size=3, padding=1).view(batch, channels * 9, h, w)

    maps = [patch_maps(layer2), F.interpolate(patch_maps(layer3), size=(height, width), mode="bilinear")]
    pooled = [
        F.adaptive_avg_pool1d(m.permute(0, 2, 3, 1).reshape(-1, 1, m.shape[1]), 1024).squeeze(1) for m in maps
    ]
    vectors = F.adaptive_avg_pool1d(torch.cat(pooled, dim=1).unsqueeze(1), 384).squeeze(1)
    return vectors.view(batch, height, width, 384).permute(0, 3, 1, 2)


class _FixedFeatures(nn.Module):
    def __init__(self, layer2: torch.Tensor, layer3: torch.Tensor) -> None:
        super().__init__()
        self.features = layer2, layer3

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_target_equals_the_reference_computation(name):
    channels2, channels3 = BACKBONES[name]
    generator = torch.Generator().manual_seed(0)
    # float32: CPU grouped convolutions in float64 take seconds.
    layer2 = torch.rand(2, channels2, 6, 6, generator=generator)
    layer3 = torch.rand(2, channels3, 3, 3, generator=generator)
    target = DistillationTarget(name, weights=None)
    target.backbone = _FixedFeatures(layer2, layer3)
    torch.testing.assert_close(target(torch.empty(0)), _reference_embedding(layer2, layer3))


def test_layer3_of_wide_resnets_is_a_plain_3x3_average():
    layer3 = torch.rand(1, 1024, 5, 5)
    target = DistillationTarget("resnet50", weights=None)
    expected = F.avg_pool2d(layer3, 3, stride=1, padding=1, count_include_pad=True)
    torch.testing.assert_close(target._pool_patches(layer3, "layer3"), expected)


# --------------------------------------------------------------------------------- backbone weights


def test_backbone_weights_load_ignoring_layers_after_layer3(resnet18_weights):
    state = torch.load(resnet18_weights, weights_only=True)
    backbone = load_backbone("resnet18", resnet18_weights)
    torch.testing.assert_close(backbone.layer3[1].conv2.weight, state["layer3.1.conv2.weight"])
    assert not any(p.requires_grad for p in backbone.parameters()) and not backbone.training


def test_missing_layers_are_named(resnet18_weights, tmp_path):
    state = torch.load(resnet18_weights, weights_only=True)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("layer3.")}, partial)
    with pytest.raises(EfficientADError, match=r"lack \d+ resnet18 key\(s\) up to layer3: layer3\.0\.conv1\.weight"):
        load_backbone("resnet18", partial)


def test_misshaped_layers_are_named(resnet18_weights, tmp_path):
    state = torch.load(resnet18_weights, weights_only=True)
    state["layer2.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(EfficientADError, match=r"do not fit resnet18: layer2\.0\.conv1\.weight \(3, 3, 3, 3\)"):
        load_backbone("resnet18", broken)


def test_weights_of_another_backbone_are_refused(resnet18_weights):
    with pytest.raises(EfficientADError, match="lack .* resnet50 key"):
        load_backbone("resnet50", resnet18_weights)


def test_unreadable_weights_are_refused(tmp_path):
    with pytest.raises(EfficientADError, match="backbone weights not found"):
        load_backbone("resnet18", tmp_path / "absent.pth")
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(EfficientADError, match="not a torchvision state_dict"):
        load_backbone("resnet18", tmp_path / "list.pth")


def test_imagenet_weights_offline_fail_clearly(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(EfficientADError, match="could not download the ImageNet weights of resnet18"):
        load_backbone("resnet18", "imagenet")


# ---------------------------------------------------------------------------------------- training


def test_a_few_steps_reduce_the_loss(images, tmp_path):
    result = pretrain_teacher(images, tmp_path / "teacher.pth", steps=10, learning_rate=1e-3, checkpoint_every=0, **TINY)
    train = [loss for _, loss in result.losses["train"]]
    # One held-out image of a random backbone is too noisy to judge progress by; it is only logged.
    assert [step for step, _ in result.losses["validation"]] == [5, 10]
    assert train[-1] < 0.8 * train[0]
    assert result.steps == 10 and result.stopped_by == "steps"
    assert result.validation_loss == result.losses["validation"][-1][1]
    assert not checkpoint_path(tmp_path / "teacher.pth").exists()


@pytest.mark.slow
def test_resume_continues_from_the_saved_step_as_if_uninterrupted(images, tmp_path):
    out = tmp_path / "resumed" / "teacher.pth"
    first = pretrain_teacher(images, out, steps=4, checkpoint_every=2, **TINY)
    assert first.steps == 4 and torch.load(checkpoint_path(out), weights_only=True)["step"] == 4
    resumed = pretrain_teacher(images, out, steps=6, checkpoint_every=2, resume=True, **TINY)
    assert (resumed.start_step, resumed.steps) == (4, 6)
    assert [step for step, _ in resumed.losses["train"]] == [4, 5, 6]
    straight = pretrain_teacher(images, tmp_path / "straight" / "teacher.pth", steps=6, checkpoint_every=0, **TINY)
    resumed_state = torch.load(out, weights_only=True)["state_dict"]
    straight_state = torch.load(straight.out, weights_only=True)["state_dict"]
    for key, value in straight_state.items():
        torch.testing.assert_close(resumed_state[key], value)
    assert json.loads((out.parent / "pretrain.json").read_text())["start_step"] == 4


def test_resume_needs_a_matching_checkpoint(images, tmp_path):
    out = tmp_path / "teacher.pth"
    with pytest.raises(EfficientADError, match="no checkpoint to resume from"):
        pretrain_teacher(images, out, steps=2, resume=True, **TINY)
    pretrain_teacher(images, out, steps=1, checkpoint_every=1, **TINY)
    with pytest.raises(EfficientADError, match="has batch_size=4, this run 2"):
        pretrain_teacher(images, out, steps=2, resume=True, **{**TINY, "batch_size": 2})


def test_a_budget_spent_before_the_first_step_is_refused(images, tmp_path):
    cache = tmp_path / "stats"
    refusal = r"spent before the first training step .* give a larger --time-budget"
    with pytest.raises(EfficientADError, match=refusal):
        pretrain_teacher(images, tmp_path / "teacher.pth", steps=1000, time_budget=1e-6, stats_cache=cache, **TINY)
    assert not (tmp_path / "teacher.pth").exists()
    # The statistics it measured are not lost: the next run reuses them.
    assert [path.name.rsplit("-", 1)[1] for path in cache.iterdir()] == [f"{TINY['normalization_images']}.pt"]


def test_bf16_autocast_trains(images, tmp_path):
    result = pretrain_teacher(images, tmp_path / "teacher.pth", steps=2, precision="bf16", checkpoint_every=0, **TINY)
    assert np.isfinite(result.validation_loss)


def test_a_failed_write_leaves_no_partial_file(images, tmp_path, monkeypatch):
    out = tmp_path / "teacher.pth"
    out.write_bytes(b"previous teacher")

    def failing_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain_teacher(images, out, steps=1, checkpoint_every=0, **TINY)
    assert out.read_bytes() == b"previous teacher"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.pth"]


def test_unreadable_images_fail_in_one_line_from_a_worker(images, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in sorted(images.rglob("*.png"))[:3]:
        (folder / path.name).write_bytes(path.read_bytes())
    # Named to sort first, so that the seeded split keeps it for training (read by the worker).
    (folder / "0broken.png").write_bytes(b"not a png")
    settings = {**TINY, "workers": 1, "normalization_images": 64}
    with pytest.raises(EfficientADError, match=r"^not an image file .*0broken\.png$"):
        pretrain_teacher(folder, tmp_path / "teacher.pth", steps=1, validation_images=1, **settings)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"image_size": 40}, "image_size must be a multiple of 16"),
        ({"backbone": "vgg16"}, "backbone must be one of"),
        ({"model_size": "l"}, "model_size must be one of"),
        ({"grayscale": 1.5}, "grayscale must be a probability"),
        ({"time_budget": 0}, "time_budget must be positive"),
        ({"device": "tpu"}, "device must be 'cpu' or 'cuda"),
    ],
)
def test_bad_arguments_are_named(images, tmp_path, override, message):
    with pytest.raises(EfficientADError, match=message):
        pretrain_teacher(images, tmp_path / "teacher.pth", **{**TINY, **override})


def test_one_image_is_too_few(images, tmp_path):
    folder = tmp_path / "one"
    folder.mkdir()
    (folder / "0.jpg").write_bytes((images / "0.jpg").read_bytes())
    with pytest.raises(EfficientADError, match="need at least 2 images"):
        pretrain_teacher(folder, tmp_path / "teacher.pth", **TINY)


# ------------------------------------------------------------------- target statistics: budget, cache


@pytest.fixture
def clock(monkeypatch) -> list[float]:
    """Pretraining's clock, advanced one second by each pass of the target (one batch), and only by it.

    Budgets then count batches: deterministic on a busy machine, and seconds of budget cost milliseconds.
    """
    now = [0.0]
    forward = DistillationTarget.forward

    def timed_forward(self, images):
        now[0] += 1.0
        return forward(self, images)

    monkeypatch.setattr(DistillationTarget, "forward", timed_forward)
    monkeypatch.setattr(pretrain_module, "monotonic", lambda: now[0])
    return now


@pytest.fixture
def added_batches(monkeypatch) -> list[int]:
    """The sizes of the batches the statistics pass measures, in order."""
    sizes = []
    add = target_stats.ChannelSums.add

    def counted_add(self, features):
        sizes.append(len(features))
        add(self, features)

    monkeypatch.setattr(target_stats.ChannelSums, "add", counted_add)
    return sizes


def _statistics_of(out: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The run record's ``target_statistics`` and the mean and std that the run trained with."""
    record = json.loads((out.parent / "pretrain.json").read_text())["target_statistics"]
    checkpoint = torch.load(checkpoint_path(out), weights_only=True)
    return record, checkpoint["channel_mean"], checkpoint["channel_std"]


def test_statistics_are_reused_by_a_run_with_the_same_inputs(images, tmp_path, added_batches, capsys):
    cache = tmp_path / "stats"
    pretrain_teacher(images, tmp_path / "first" / "teacher.pth", steps=1, stats_cache=cache, **TINY)
    first, first_mean, first_std = _statistics_of(tmp_path / "first" / "teacher.pth")
    assert (first["source"], first["samples"], first["computed_samples"]) == ("computed", 16, 16)
    assert sum(added_batches) == 16 and Path(first["saved_to"]).parent == cache
    capsys.readouterr()

    added_batches.clear()
    result = pretrain_teacher(images, tmp_path / "second" / "teacher.pth", steps=1, stats_cache=cache, **TINY)
    second, second_mean, second_std = _statistics_of(result.out)
    assert added_batches == []  # not one target pass spent on statistics
    assert (second["source"], second["computed_samples"], second["reused_from"]) == ("reused", 0, first["saved_to"])
    assert torch.equal(second_mean, first_mean) and torch.equal(second_std, first_std)
    assert result.target_statistics == second
    assert f"target statistics: reused (16 samples, {first['saved_to']})" in capsys.readouterr().err


def _copy_images(images: Path, folder: Path) -> Path:
    for path in images.rglob("*.*"):
        (folder / path.relative_to(images)).parent.mkdir(parents=True, exist_ok=True)
        (folder / path.relative_to(images)).write_bytes(path.read_bytes())
    return folder


@pytest.mark.parametrize("change", ["an image", "the seed", "the grayscale probability"])
def test_statistics_are_measured_again_when_their_inputs_change(images, tmp_path, added_batches, change):
    folder = _copy_images(images, tmp_path / "images")
    cache = tmp_path / "stats"
    pretrain_teacher(folder, tmp_path / "first" / "teacher.pth", steps=1, stats_cache=cache, **TINY)
    settings = dict(TINY)
    if change == "an image":
        Image.fromarray(_smooth_image(np.random.default_rng(1), 60, 48)).save(folder / "more" / "7.png")
    elif change == "the seed":
        settings["seed"] = 7
    else:
        settings["grayscale"] = 0.5
    added_batches.clear()
    pretrain_teacher(folder, tmp_path / "second" / "teacher.pth", steps=1, stats_cache=cache, **settings)
    second, *_ = _statistics_of(tmp_path / "second" / "teacher.pth")
    assert second["source"] == "computed" and sum(added_batches) == 16
    assert len(list(cache.iterdir())) == 2


def test_a_budget_cuts_the_statistics_pass_and_a_later_run_continues_it(
    images, tmp_path, clock, capsys, monkeypatch
):
    # A lower minimum lets a budget of a few training steps cut the pass.
    minimum, requested, budget = 4, 64, 16.0
    monkeypatch.setattr(pretrain_module, "MIN_STATISTICS_SAMPLES", minimum)
    cache = tmp_path / "stats"
    settings = {**TINY, "normalization_images": requested, "stats_cache": cache}
    cut = pretrain_teacher(images, tmp_path / "cut" / "teacher.pth", steps=1000, time_budget=budget, **settings)
    record, *_ = _statistics_of(cut.out)
    samples = record["samples"]
    # The pass ended at the budget's share (this clock: a second per batch of 4 samples), leaving
    # the rest of the budget to training, which used it and wrote a teacher.
    assert minimum < samples < requested and samples % 4 == 0
    assert (record["stopped_by"], record["computed_samples"]) == ("time_budget", samples)
    assert record["saved_to"] == str(next(cache.glob(f"*-{samples}.pt")))
    assert f"stopped at {samples} of {requested} samples" in capsys.readouterr().err
    assert cut.stopped_by == "time_budget" and cut.steps > 0 and clock[0] >= budget
    teacher = torch.load(cut.out, weights_only=True)
    assert teacher["steps"] == cut.steps and np.isfinite(teacher["validation_loss"])

    continued = pretrain_teacher(images, tmp_path / "continued" / "teacher.pth", steps=1, **settings)
    record, mean, std = _statistics_of(continued.out)
    assert (record["source"], record["reused_samples"], record["samples"]) == ("continued", samples, requested)
    assert record["reused_from"] == str(next(cache.glob(f"*-{samples}.pt")))
    assert record["computed_samples"] == requested - samples
    # Continuing a cut pass measures what one uninterrupted pass over all the samples measures.
    straight_out = tmp_path / "straight" / "teacher.pth"
    pretrain_teacher(images, straight_out, steps=1, **{**settings, "stats_cache": False})
    record, straight_mean, straight_std = _statistics_of(straight_out)
    assert record["source"] == "computed" and record["saved_to"] is None
    torch.testing.assert_close(mean, straight_mean)
    torch.testing.assert_close(std, straight_std)


def test_the_statistics_pass_measures_a_minimum_of_samples_however_short_the_budget(images, tmp_path, clock):
    settings = {**TINY, "normalization_images": 256, "stats_cache": tmp_path / "stats"}
    with pytest.raises(EfficientADError, match=f"measuring {MIN_STATISTICS_SAMPLES} target-statistics samples"):
        pretrain_teacher(images, tmp_path / "teacher.pth", steps=10, time_budget=4.0, **settings)


def test_a_damaged_cache_file_is_ignored(images, tmp_path):
    cache = tmp_path / "stats"
    pretrain_teacher(images, tmp_path / "first" / "teacher.pth", steps=1, stats_cache=cache, **TINY)
    saved = next(cache.iterdir())
    saved.write_bytes(b"half a file")
    with pytest.warns(UserWarning, match=f"ignoring cached target statistics {re.escape(str(saved))}"):
        pretrain_teacher(images, tmp_path / "second" / "teacher.pth", steps=1, stats_cache=cache, **TINY)
    assert _statistics_of(tmp_path / "second" / "teacher.pth")[0]["source"] == "computed"
    assert torch.load(saved, weights_only=True)["samples"] == 16  # written anew


def test_backbone_weights_count_by_content(resnet18_weights, tmp_path):
    copy = tmp_path / "copy.pth"
    copy.write_bytes(resnet18_weights.read_bytes())
    assert target_stats.weights_identity(copy) == target_stats.weights_identity(resnet18_weights)
    state = torch.load(resnet18_weights, weights_only=True)
    state["layer1.0.conv1.weight"] += 1
    torch.save(state, copy)
    assert target_stats.weights_identity(copy) != target_stats.weights_identity(resnet18_weights)
    assert target_stats.weights_identity("imagenet") != target_stats.weights_identity(None)


def test_the_estimate_is_printed_before_the_statistics_pass(images, tmp_path, capsys):
    result = pretrain_teacher(images, tmp_path / "teacher.pth", steps=3, stats_cache=False, **TINY)
    printed = capsys.readouterr().err
    line = json.loads((tmp_path / "pretrain.json").read_text())["estimate"]["line"]
    assert printed.startswith(line + "\n")
    pattern = r"target statistics: about \d+ s for 16 samples; training: about \d+ s for 3 steps at \S+ s/step"
    assert re.fullmatch(pattern, line) and result.steps == 3


def test_the_estimate_says_what_a_budget_leaves_and_suggests_one_for_long_runs():
    estimate = pretrain_module._estimate_line
    long = estimate("target statistics: about 58 min for 10000 samples", 3500, 23, 60_000, 0.45, None, 5)
    assert long.endswith(
        "training: about 7.5 h for 60000 steps at 0.45 s/step; over an hour: --time-budget SECONDS bounds the run "
        f"(the statistics pass gets at most {STATISTICS_BUDGET_SHARE:.0%} of it)"
    )
    short = estimate("target statistics: about 20 s for 64 samples", 20, 20, 100, 0.45, None, 5)
    assert short == "target statistics: about 20 s for 64 samples; training: about 45 s for 100 steps at 0.45 s/step"
    budgeted = estimate("statistics", 3500, 23, 60_000, 0.5, 3600.0, 0.0)
    # A quarter of the hour for statistics, the other 45 minutes for 5400 steps of 0.5 s.
    assert budgeted.endswith("the time budget (60 min) ends it sooner: about 15 min of statistics and 5400 steps")
    # Its minimum of samples, the statistics pass measures whatever the budget.
    short_budget = estimate("statistics", 3500, 60, 60_000, 0.5, 120.0, 0.0)
    assert short_budget.endswith("the time budget (2 min) ends it sooner: about 60 s of statistics and 120 steps")


# ------------------------------------------------------------------------------------------- CLI


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["pretrain", "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    options = ("--backbone-weights", "--images", "--model-size", "--time-budget", "--resume", "--out", "--stats-cache")
    for option in options:
        assert option in text
    # The help states the budget rule in words, not from the constants (which would import torch).
    assert (STATISTICS_BUDGET_SHARE, MIN_STATISTICS_SAMPLES) == (0.25, 64)
    assert "a quarter of it (after at least 64 samples)" in TIME_BUDGET_HELP


def _cli_pretrain(images: Path, weights: Path, out: Path, *options: str) -> int:
    return main(
        [
            "pretrain", "--backbone", "resnet18", "--backbone-weights", str(weights),
            "--images", str(images), "--model-size", "s", "--steps", "3", "--batch-size", "2",
            "--image-size", "32", "--normalization-images", "4", "--device", "cpu", "--workers", "0",
            "--seed", "1", "--quiet", "--out", str(out), *options,
        ]
    )  # fmt: skip


@pytest.fixture(scope="module")
def cli_teacher(images, resnet18_weights, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "teacher.pth"
    assert _cli_pretrain(images, resnet18_weights, out) == 0
    return out


def test_cli_writes_a_teacher_and_a_run_record(cli_teacher, user_cache):
    teacher = torch.load(cli_teacher, weights_only=True)
    assert teacher["format"] == "efficientad-teacher" and teacher["format_version"] == 1
    assert (teacher["model_size"], teacher["backbone"], teacher["steps"]) == ("s", "resnet18", 3)
    assert sorted(teacher["state_dict"]) == [f"{i}.{kind}" for i in (0, 3, 6, 8) for kind in ("bias", "weight")]
    assert teacher["state_dict"]["8.weight"].shape == (384, 256, 4, 4)
    assert isinstance(teacher["validation_loss"], float) and set(teacher["versions"]) >= {"torch", "efficientad"}
    record = json.loads((cli_teacher.parent / "pretrain.json").read_text())
    assert record["config"]["backbone"] == "resnet18" and record["config"]["seed"] == 1
    assert record["steps"] == 3 and record["seconds"] > 0 and record["losses"]["validation"][-1][0] == 3
    assert record["teacher_tensor_sha256"] == tensors_sha256(teacher["state_dict"])  # the teacher it describes
    # Cached in the user cache folder by default.
    assert record["target_statistics"]["cache"] == str(user_cache / "target_stats")
    assert Path(record["target_statistics"]["saved_to"]).is_file()


def test_cli_says_where_the_statistics_came_from(cli_teacher, images, resnet18_weights, tmp_path, capsys):
    saved_to = json.loads((cli_teacher.parent / "pretrain.json").read_text())["target_statistics"]["saved_to"]
    assert _cli_pretrain(images, resnet18_weights, tmp_path / "again.pth") == 0
    assert f"target statistics of 4 samples reused from {saved_to}" in capsys.readouterr().out
    assert _cli_pretrain(images, resnet18_weights, tmp_path / "anew.pth", "--no-stats-cache") == 0
    assert capsys.readouterr().out.endswith("; target statistics measured on 4 samples\n")


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    absent = str(tmp_path / "absent")
    code = main(["pretrain", "--backbone-weights", "imagenet", "--images", absent, "--out", str(tmp_path / "t.pth")])
    assert code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "image folder not found" in error


def test_teacher_loads_through_the_teacher_loader(cli_teacher):
    from efficientad.training.teacher import load_teacher_file, resolve_teacher

    state = torch.load(cli_teacher, weights_only=True)["state_dict"]
    teacher = load_teacher_file(cli_teacher, "s")
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, state[key])
    assert resolve_teacher(str(cli_teacher), "s")[1] == str(cli_teacher.resolve())
    with pytest.raises(EfficientADError, match="PDN-s"):
        load_teacher_file(cli_teacher, "m")


@pytest.mark.slow
def test_teacher_trains_a_detector_through_the_cli(cli_teacher, tmp_path):
    from efficientad.data.synthetic import make_dataset

    make_dataset(tmp_path / "data", "widget", n_train=10, n_test_good=1, n_test_defect=1, size=256)
    out = tmp_path / "run"
    code = main(
        [
            "train", "--data", str(tmp_path / "data"), "--category", "widget", "--out", str(out),
            "--teacher", str(cli_teacher), "--steps", "2",
        ]
    )  # fmt: skip
    assert code == 0 and (out / "model.pt").is_file()
    assert json.loads((out / "train.json").read_text())["teacher_source"] == str(cli_teacher.resolve())
