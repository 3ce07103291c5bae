"""train-many: the manifest's checks (fast, no Ray), sharing a loaded teacher, and runs on a real local Ray."""

from __future__ import annotations

import csv
import json
import logging
import re
import shutil
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from efficientad.cli import main
from efficientad.data.synthetic import make_dataset
from efficientad.errors import EfficientADError
from efficientad.fleet import read_manifest, train_many
from efficientad.fleet.manifest import convert
from efficientad.fleet.run import INSTALL_HINT

FIELDS = "name,data,category,format,steps,seed,teacher,penalty_images\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two MVTec-style categories, one whose training images are all unreadable, a folder layout
    without a test split, a few penalty images and a teacher file: every kind of row."""
    root = tmp_path_factory.mktemp("fleet_data")
    for seed, category in enumerate(("part", "other", "broken")):
        make_dataset(root / "mvtec", category, n_train=8, n_test_good=2, n_test_defect=2, size=256, seed=seed)
    for image in (root / "mvtec" / "broken" / "train" / "good").iterdir():
        image.write_bytes(b"not an image")  # found by the layout check, unreadable only when training reads it
    shutil.copytree(root / "mvtec" / "part" / "train" / "good", root / "plain" / "flat" / "train")
    (root / "penalty").mkdir()
    for index in range(3):
        Image.fromarray((np.random.default_rng(index).random((300, 300, 3)) * 255).astype(np.uint8)).save(root / "penalty" / f"{index}.png")
    from efficientad.training.teacher import resolve_teacher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(resolve_teacher("random", "s").network.state_dict(), root / "teacher.pth")
    return root


def write_manifest(data, text: str, name: str = "runs.csv"):
    path = data / name
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------ manifest (fast)
def test_every_bad_row_is_named_at_once(data):
    manifest = write_manifest(
        data,
        "name,data,category,format,steps,image_size,stepz\n"
        "a,mvtec,part,mvtec,2,256,\n"
        "b,missing,part,mvtec,2,,\n"
        "a,mvtec,part,,many,100,\n"
        "c,mvtec,nothing,mvtec,-1,,\n"
        "d/e,mvtec,part,tiff,2,,\n",
        "bad.csv",
    )
    with pytest.raises(EfficientADError) as caught:
        read_manifest(manifest)
    message = str(caught.value)
    assert "\n" not in message and "nothing started" in message
    assert "unknown column 'stepz'" in message
    assert re.search(r"row 2 \(b\): dataset root not found: .*missing", message)
    assert "row 3 (a): steps must be an integer, got 'many'; image_size must be at least 256" in message
    assert "row 3: name 'a' is taken by row 1" in message
    assert "row 4 (c): steps must be an integer >= 1, got -1" in message and "nothing not found" in message
    assert "row 5 (d/e): name 'd/e' must be a folder name" in message and "format must be one of" in message
    assert "row 1" not in message.replace("taken by row 1", "")


def test_columns_are_read_by_their_trainconfig_type(data):
    manifest = write_manifest(
        data,
        "- {name: y, data: mvtec, category: part, image_size: [256, 320], channels_last: yes, cache_teacher: null, teacher: random}\n"
        "- {name: z, data: mvtec, category: part, Learning-Rate: '2e-4', teacher: teacher.pth, penalty_images: penalty}\n",
        "runs.yaml",
    )
    y, z = read_manifest(manifest, {"steps": 3})
    assert (y.config.image_size, y.config.channels_last, y.config.cache_teacher, y.config.steps) == ((256, 320), True, None, 3)
    assert y.evaluates and y.data == data / "mvtec" and y.config.teacher == "random"
    # Paths are made absolute from the manifest's folder: Ray workers start elsewhere.
    assert (z.config.learning_rate, z.config.teacher, z.config.penalty_images) == (2e-4, str(data / "teacher.pth"), str(data / "penalty"))
    assert convert("256x320", tuple[int, int]) == (256, 320) and convert("off", bool) is False
    for text, kind in (("1.5", int), ("maybe", bool), ("1 2 3", tuple[int, int])):
        with pytest.raises(ValueError, match="must be"):
            convert(text, kind)


def test_a_folder_without_a_test_split_is_trained_but_not_evaluated(data):
    (row,) = read_manifest([{"name": "flat", "data": str(data / "plain"), "category": "flat", "format": "folder"}])
    assert not row.evaluates


def test_without_ray_the_command_says_how_to_install_it(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets on a base install
    manifest = write_manifest(data, FIELDS + "a,mvtec,part,mvtec,2,,random,\n", "one.csv")
    assert main(["train-many", str(manifest), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"efficientad train-many: error: {INSTALL_HINT}"
    assert not (tmp_path / "out" / "results.csv").exists()


def test_help_explains_the_manifest_and_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        main(["train-many", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "manifest columns" in text and "example (runs.csv)" in text and "skip_bad_images" in text
    assert "(default: None)" not in text
    assert text.count("(default:") == len(re.findall(r"\(default:[^)]*\)", text))


def test_a_given_teacher_and_penalty_images_are_used_without_reading_their_files(random_images, tmp_path):
    from efficientad.detector import EfficientAD
    from efficientad.training.teacher import resolve_teacher

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        teacher = resolve_teacher("random", "s")
    penalty = torch.zeros((3, 3, 256, 256), dtype=torch.uint8)
    detector = EfficientAD(teacher=str(tmp_path / "gone.pth"), penalty_images=str(tmp_path / "gone"), steps=1, progress=False)
    detector.fit(random_images, teacher=teacher, penalty=penalty)
    assert detector.metadata_["teacher_source"] == "random" and detector.metadata_["n_penalty_images"] == 3
    with pytest.raises(EfficientADError, match="penalty images are 128x128, image_size is 256x256"):
        detector.fit(random_images, teacher=teacher, penalty=penalty[..., :128, :128])


# ------------------------------------------------------------------------------ real Ray (slow)
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def results_csv(out) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


ROWS = (
    "a,mvtec,part,mvtec,,,,\n"
    "b,mvtec,other,mvtec,,1,teacher.pth,penalty\n"
    "flat,plain,flat,folder,,,,\n"
    "broken,mvtec,broken,mvtec,,,,\n"
)


@pytest.mark.slow  # four trainings on a local Ray, then reruns
def test_rows_train_in_parallel_share_loads_skip_when_finished_and_fail_alone(data, local_ray, tmp_path, monkeypatch, capsys):
    import efficientad.training.teacher as teacher_module

    loads = []
    resolve = teacher_module.resolve_teacher
    monkeypatch.setattr(teacher_module, "resolve_teacher", lambda spec, *args: loads.append(spec) or resolve(spec, *args))
    manifest = write_manifest(data, FIELDS + ROWS)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = train_many(manifest, out, settings={"teacher": "random", "steps": 2}, progress=False)

    assert [(r.name, r.status) for r in results] == [("a", "done"), ("b", "done"), ("flat", "done"), ("broken", "failed")]
    assert sorted(loads) == sorted(["random", str(data / "teacher.pth")])  # one load per distinct teacher
    assert results[3].error.startswith("8 of 8 images cannot be read")
    for result in results[:3]:
        folder = out / result.name
        record = json.loads((folder / "train.json").read_text())
        assert (folder / "model.pt").is_file() and record["model_tensor_sha256"]
        assert result.threads == 1 and record["train_many"]["threads"] == 1  # 2 CPUs / 4 rows, at least 1
        assert result.node and result.seconds > 0
    assert json.loads((out / "b" / "train.json").read_text())["teacher_source"] == str(data / "teacher.pth")
    assert (out / "a" / "metrics.json").is_file() and not (out / "flat" / "metrics.json").exists()
    assert results[0].image_auroc is not None and results[2].image_auroc is None
    table = results_csv(out)
    assert table["broken"]["status"] == "failed" and "cannot be read" in table["broken"]["error"]
    assert float(table["a"]["threshold"]) == pytest.approx(results[0].threshold)
    assert "| broken | failed |" in (out / "results.md").read_text()
    record = json.loads((out / "train_many.json").read_text())
    assert record["complete"] and record["counts"] == {"done": 3, "failed": 1}

    # Rerun from the command line: finished rows are skipped; a changed row and a row whose record
    # no longer matches its model are trained again.
    write_manifest(data, FIELDS + ROWS.replace("a,mvtec,part,mvtec,,", "a,mvtec,part,mvtec,3,"))
    train_json = out / "b" / "train.json"
    train_json.write_text(train_json.read_text().replace(record_sha(train_json), "0" * 64))
    loads.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train-many", str(manifest), "--out", str(out), "--teacher", "random", "--steps", "2"])
    assert code == 1  # the broken row failed again
    assert "4 rows: 2 done, 1 skipped, 1 failed" in capsys.readouterr().out
    table = results_csv(out)
    assert {name: row["status"] for name, row in table.items()} == {"a": "done", "b": "done", "flat": "skipped", "broken": "failed"}
    assert json.loads((out / "a" / "train.json").read_text())["config"]["steps"] == 3


def record_sha(path) -> str:
    return json.loads(path.read_text())["model_tensor_sha256"]


@pytest.mark.slow  # trainings on a local Ray, stopped after the first
def test_ctrl_c_cancels_the_rest_and_keeps_what_finished(data, local_ray, tmp_path, monkeypatch):
    import efficientad.fleet.run as module

    write_results = module.write_results

    def write_then_interrupt(out, results):
        write_results(out, results)
        if any(result.status == "pending" for result in results):  # written after a row, others running
            raise KeyboardInterrupt  # as if Ctrl-C came right after the first row finished

    monkeypatch.setattr(module, "write_results", write_then_interrupt)
    manifest = write_manifest(data, FIELDS + ROWS, "stop.csv")
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_many(manifest, out, settings={"teacher": "random", "steps": 2}, progress=False)
    table = results_csv(out)
    finished = [name for name, row in table.items() if row["status"] != "cancelled"]
    assert len(finished) == 1 and table[finished[0]]["status"] in ("done", "failed")
    for name, row in table.items():
        assert (out / name / "model.pt").exists() == (row["status"] == "done")
    record = json.loads((out / "train_many.json").read_text())
    assert not record["complete"] and record["counts"]["cancelled"] == 3
    assert local_ray.is_initialized()  # a Ray the caller started is left to the caller
