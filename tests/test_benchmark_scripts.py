"""The one-command benchmarks run end to end on tiny inputs and write the JSON they promise."""

import json
import subprocess
import sys
from pathlib import Path

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
        "--budget", "5",
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
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
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
