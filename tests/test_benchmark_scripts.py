"""The one-command benchmarks run end to end on tiny inputs and write the JSON they promise."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from efficientad.data.synthetic import make_dataset

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


pytestmark = pytest.mark.slow  # runs the benchmark script: pretraining and three trainings

@pytest.fixture(scope="module")
def tiny_inputs(tmp_path_factory) -> dict[str, Path]:
    import torchvision

    root = tmp_path_factory.mktemp("pretrain_benchmark")
    category = make_dataset(root / "mvtec", "widget", n_train=5, n_test_good=2, n_test_defect=2, size=256)
    weights = root / "resnet18.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return {"root": root, "mvtec": root / "mvtec", "images": category / "train", "weights": weights}


def _run_pretrain_benchmark(inputs: dict[str, Path], json_path: Path, *extra: str) -> dict:
    command = [
        sys.executable,
        str(BENCHMARKS / "pretrain_teacher.py"),
        "--budget", "40",  # the statistics pass and the estimate take a few seconds of it first
        "--train-steps", "2",
        "--images", str(inputs["images"]),
        "--backbone-weights", str(inputs["weights"]),
        "--shared-teacher", "random",  # stands in for ../shared's teacher file
        "--mvtec", str(inputs["mvtec"]),
        "--category", "widget",
        "--batch-size", "2",
        "--normalization-images", "4",
        "--validate-every", "1",
        "--json", str(json_path),
        *extra,
    ]  # fmt: skip
    # Its own statistics cache: nothing is left in the user's.
    environment = {**os.environ, "EFFICIENTAD_CACHE": str(json_path.parent / "cache")}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return json.loads(json_path.read_text())


def test_pretrain_benchmark_compares_three_teachers_and_can_reuse_one(tiny_inputs):
    work = tiny_inputs["root"] / "work"
    first = _run_pretrain_benchmark(tiny_inputs, tiny_inputs["root"] / "first.json", "--work-dir", str(work))
    assert first["pretraining"]["steps"] >= 1
    assert set(first["results"]) == {"pretrained", "random", "shared_teacher_small_r18"}
    for result in first["results"].values():
        assert result["fit_seconds"] > 0
    teacher = work / "teacher.pth"
    assert teacher.is_file()

    again = _run_pretrain_benchmark(
        tiny_inputs, tiny_inputs["root"] / "again.json", "--reuse-teacher", str(teacher), "--seed", "1"
    )
    assert again["pretraining"] == {"reused": str(teacher)} and again["seed"] == 1
    assert set(again["results"]) == set(first["results"])


def test_fault_injection_kills_runs_and_finds_the_invariants_kept(tmp_path):
    json_path = tmp_path / "fault_injection.json"
    command = [sys.executable, str(BENCHMARKS / "fault_injection.py"), "--rounds", "2", "--seed", "1", "--json", str(json_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    result = json.loads(json_path.read_text())
    assert result["violations"] == [] and result["final_runs_succeeded"] and len(result["round_details"]) == 2


def test_serve_attacks_measures_lockout_memory_and_refusals(tmp_path):
    out = tmp_path / "attacks.json"
    subprocess.run(
        [sys.executable, str(BENCHMARKS / "serve_attacks.py"), "--idle", "8", "--slow", "4", "--hold", "3", "--max-pending", "4", "--json", str(out)],
        check=True, cwd=BENCHMARKS, capture_output=True, timeout=600,
    )
    result = json.loads(out.read_text())
    lockout = result["lockout"]
    answered, asked = map(int, lockout["health_answered_200"].split("/"))
    assert asked > 0 and answered == asked
    assert result["over_pending_limit"]["requests"] == 8
    assert set(result["over_pending_limit"]["answers"]) <= {"200", "503"}  # never a reset
    assert result["memory_mb"]["after_eight_36mp_heatmaps_at_once"]["answers"] == [200] * 8
    assert result["predict_64mp_with_overlay"]["returncode"] == 0
    assert result["healthy_at_end"]


def _side_by_side_command(inputs: dict[str, Path], json_path: Path, *extra: str) -> list[str]:
    return [sys.executable, str(BENCHMARKS / "anomalib_side_by_side.py"), "--steps", "2", "--data", str(inputs["mvtec"]),
            "--teacher", str(inputs["teacher"]), "--penalty-images", str(inputs["penalty"]), "--json", str(json_path), *extra]  # fmt: skip


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory) -> dict:
    """bottle-like data, a teacher in the reference layout, penalty images, and the script run once over seeds 0 and 1."""
    from PIL import Image

    from efficientad.networks import pdn

    root = tmp_path_factory.mktemp("side_by_side")
    make_dataset(root / "mvtec", "bottle", n_train=6, n_test_good=2, n_test_defect=2, size=256)
    penalty = root / "imagenet"
    penalty.mkdir()
    for index in range(3):
        Image.fromarray(np.random.default_rng(index).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(penalty / f"{index}.jpg")
    teacher = root / "teacher.pth"
    torch.save(pdn("s").state_dict(), teacher)  # the reference layout: nn.Sequential convolutions 0, 3, 6, 8
    inputs = {"root": root, "mvtec": root / "mvtec", "penalty": penalty, "teacher": teacher}
    json_path = root / "side.json"
    completed = subprocess.run(_side_by_side_command(inputs, json_path, "--seeds", "0", "1"), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    return {**inputs, "json": json_path, "result": json.loads(json_path.read_text())}


def test_anomalib_side_by_side_runs_ours_over_seeds_and_maps_the_teacher_to_anomalib_names(side_by_side):
    """Where anomalib is absent (as in CI) only our runs are made, and the report says so."""
    teacher = side_by_side["teacher"]
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from anomalib_side_by_side import anomalib_teacher_state
    finally:
        sys.path.remove(str(BENCHMARKS))
    renamed = anomalib_teacher_state(teacher)
    assert sorted(renamed) == sorted(f"conv{i}.{kind}" for i in range(1, 5) for kind in ("weight", "bias"))
    assert torch.equal(renamed["conv4.weight"], torch.load(teacher, weights_only=True)["8.weight"])

    result = side_by_side["result"]
    runs = [run for run in result["runs"] if run["tool"] == "efficientad"]
    assert [(run["steps"], run["seed"]) for run in runs] == [(2, 0), (2, 1)]
    assert all(0.0 <= run["image_auroc"] <= 1.0 and len(run["scores"]) == 4 for run in runs)
    (summary,) = result["summary"]
    assert summary["efficientad"]["mean"] == pytest.approx(np.mean([run["image_auroc"] for run in runs]))
    if result["anomalib"] is not None:  # anomalib is not installed: nothing of it is claimed
        assert "anomalib" not in summary and "not importable" in result["anomalib"]
    assert "| 2 |" in side_by_side["json"].with_suffix(".md").read_text()


def test_anomalib_side_by_side_takes_our_side_from_a_train_run_trained_alike(side_by_side, tmp_path):
    """`efficientad train` with the script's settings gives the model the script trains; another setting is refused by name."""
    from efficientad.cli import main

    run = tmp_path / "run"
    inputs = ["--data", str(side_by_side["mvtec"]), "--category", "bottle", "--teacher", str(side_by_side["teacher"])]
    settings = ["--penalty-images", str(side_by_side["penalty"]), "--steps", "2", "--seed", "0", "--precision", "fp32"]
    assert main(["train", *inputs, *settings, "--out", str(run)]) == 0
    json_path = tmp_path / "reused.json"
    completed = subprocess.run(_side_by_side_command(side_by_side, json_path, "--seeds", "0", "--ours-runs", str(run)), capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-2000:]
    (reused,) = [r for r in json.loads(json_path.read_text())["runs"] if r["tool"] == "efficientad"]
    (trained,) = [r for r in side_by_side["result"]["runs"] if r["tool"] == "efficientad" and r["seed"] == 0]
    assert reused["reused_run"] == str(run)
    np.testing.assert_allclose(reused["scores"], trained["scores"], rtol=1e-4)
    assert reused["image_auroc"] == trained["image_auroc"]
    assert f"`efficientad train` run {run.name}" in json_path.with_suffix(".md").read_text()

    record = json.loads((run / "train.json").read_text())
    record["config"]["learning_rate"] = 1e-3
    (run / "train.json").write_text(json.dumps(record))
    completed = subprocess.run(_side_by_side_command(side_by_side, tmp_path / "refused.json", "--seeds", "0", "--ours-runs", str(run)), capture_output=True, text=True, timeout=600)
    assert completed.returncode != 0 and "was not trained as this script trains: learning_rate 0.001 (here 0.0001)" in completed.stderr
    assert not (tmp_path / "refused.json").exists()
