import csv
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from efficientad.cli import main
from efficientad.cli.demo import DEMO_TIME_BUDGET_MINUTES
from efficientad.data.datasets import load_split
from efficientad.deploy.inferencer import Inferencer
from efficientad.device import channels_last_is_faster
from efficientad.evaluation.metrics import image_auroc
from efficientad.data.synthetic import make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, "part", n_train=8, n_test_good=2, n_test_defect=2, size=256)
    return root


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["train", "--data", str(dataset), "--category", "part", "--teacher", "random", "--steps", "2", "--out", str(out)])
    assert code == 0
    return out


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for command in ("train", "predict", "demo"):
        assert command in text


def test_train_writes_model_and_record(trained):
    assert (trained / "model.pt").is_file()
    record = json.loads((trained / "train.json").read_text())
    assert record["config"]["steps"] == 2 and record["config"]["model_size"] == "s"
    assert record["teacher_source"] == "random"
    assert record["n_train_images"] + record["n_validation_images"] == 8
    assert record["training"]["seconds_per_step"] > 0
    assert set(record["training"]["final_losses"]) == {"total", "hard", "penalty", "ae", "stae"}
    assert "torch" in record["versions"]
    # The record names the model it describes: the checksum of the tensors in the model.pt beside it.
    assert record["model_tensor_sha256"] == torch.load(trained / "model.pt", weights_only=True)["tensor_sha256"]
    assert record["skipped_images"] == []


def test_a_train_stopped_after_the_model_leaves_no_older_record(trained, dataset, tmp_path, monkeypatch, capsys):
    from efficientad.detector import EfficientAD

    def fit_from_the_trained_model(self, *args, **kwargs):
        trained_model = EfficientAD.load(trained / "model.pt")
        self.model_, self.threshold_, self.metadata_ = trained_model.model_, trained_model.threshold_, trained_model.metadata_
        return self

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for a kill between the new model.pt and its train.json

    out = tmp_path / "run"
    out.mkdir()
    (out / "train.json").write_text('{"describes": "an older model.pt"}')
    (out / ".model.pt.abcdefgh.tmp").write_bytes(b"left by a run killed while writing")
    monkeypatch.setattr(EfficientAD, "fit", fit_from_the_trained_model)
    monkeypatch.setattr("efficientad.files.versions", killed)  # the run record's first step; the model file's is done
    code = main(["train", "--data", str(dataset), "--category", "part", "--teacher", "random", "--out", str(out)])
    assert code == 130
    # The new model and its curve, written before the record; no record of an older model.
    assert sorted(path.name for path in out.iterdir()) == ["model.pt", "training_curve.png"]
    assert "removed 1 temporary file(s)" in capsys.readouterr().err


def test_unreadable_training_images_are_all_named_or_skipped(dataset, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(dataset, root)
    train = root / "part" / "train" / "good"
    (train / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (train / "empty.png").write_bytes(b"")
    args = ["train", "--data", str(root), "--category", "part", "--teacher", "random", "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "2 of 10 images cannot be read" in error and "broken.png" in error and "empty.png" in error
    assert "--skip-bad-images" in error
    assert not (tmp_path / "refused" / "model.pt").exists()

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main([*args, "--skip-bad-images", "--out", str(tmp_path / "run")]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "cannot be read" in line]
    assert len(warning) == 1 and warning[0].startswith("WARNING: 2 of 10 images") and warning[0].endswith("training without them")
    record = json.loads((tmp_path / "run" / "train.json").read_text())
    assert sorted(Path(skipped["image"]).name for skipped in record["skipped_images"]) == ["broken.png", "empty.png"]
    assert record["n_train_images"] + record["n_validation_images"] == 8 and record["config"]["skip_bad_images"]
    assert torch.load(tmp_path / "run" / "model.pt", weights_only=True)["skipped_images"] == record["skipped_images"]


def test_predict_writes_scores_and_overlays(trained, dataset, tmp_path, capsys):
    out = tmp_path / "pred"
    code = main(["predict", "--model", str(trained / "model.pt"), str(dataset / "part" / "test"), "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == 4
    assert {"path", "score", "is_anomalous", "local_score", "global_score"} <= set(rows[0])
    overlays = sorted((out / "overlays").rglob("*.png"))
    assert len(overlays) == 4
    assert sorted(str(out / r["overlay"]) for r in rows) == [str(p) for p in overlays]
    assert "4 images scored" in capsys.readouterr().out


def test_predict_skips_empty_folders_and_its_own_output(trained, dataset, tmp_path):
    (tmp_path / "empty").mkdir()
    first = tmp_path / "inputs"
    (first / "x").mkdir(parents=True)
    good = next((dataset / "part" / "test" / "good").glob("*.png"))
    Image.open(good).save(first / "x" / "a.png")
    out = first / "results"
    assert main(["predict", "--model", str(trained / "model.pt"), str(first), "--out", str(out)]) == 0
    # A re-run into the same output below the input folder must not score the previous overlays.
    code = main(["predict", "--model", str(trained / "model.pt"), str(first), str(tmp_path / "empty"), "--out", str(out)])
    assert code == 1
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [Path(r["path"]).name for r in rows] == ["a.png"]


def test_predict_skips_unreadable_files_and_fails_at_the_end(trained, dataset, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = next((dataset / "part" / "test" / "good").glob("*.png"))
    Image.open(good).save(folder / "ok.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code = main(["predict", "--model", str(trained / "model.pt"), str(folder), "--out", str(tmp_path / "o")])
    assert code == 1
    rows = list(csv.DictReader(open(tmp_path / "o" / "scores.csv")))
    assert [Path(r["path"]).name for r in rows] == ["ok.png"]
    err = capsys.readouterr().err
    assert "broken.png" in err


def test_an_interrupted_predict_leaves_only_whole_files_of_its_own(trained, dataset, tmp_path, monkeypatch):
    out = tmp_path / "pred"
    args = ["predict", "--model", str(trained / "model.pt"), str(dataset / "part" / "test"), "--out", str(out), "--batch-size", "1"]
    assert main(args) == 0
    real_save = Image.Image.save
    saved = []

    def killed_at_the_third_overlay(self, fp, *rest, **options):
        saved.append(fp)
        if len(saved) == 3:
            open(fp, "wb").close()  # the file is open, nothing written yet
            raise KeyboardInterrupt
        return real_save(self, fp, *rest, **options)

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", killed_at_the_third_overlay)
        assert main(args) == 130
    files = [path for path in out.rglob("*") if path.is_file()]
    assert all(path.stat().st_size > 0 for path in files) and not [path for path in files if path.suffix == ".tmp"]
    # No record or scores of the earlier run beside this run's overlays; this run's rows are kept.
    assert not (out / "predict.json").exists() and not (out / "scores.csv").exists()
    assert len(list(csv.DictReader(open(out / "scores.partial.csv")))) == 2

    assert main(args) == 0
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert len(rows) == json.loads((out / "predict.json").read_text())["n_images"] == 4
    assert not (out / "scores.partial.csv").exists()


def test_threshold_override(trained, dataset, tmp_path):
    out = tmp_path / "t"
    main(["predict", "--model", str(trained / "model.pt"), str(dataset / "part" / "test"), "--out", str(out), "--threshold=-1e9", "--no-overlays"])
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert all(r["is_anomalous"] == "1" for r in rows)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["train", "--data", "/nonexistent", "--category", "x", "--out", "o", "--teacher", "random"], "not found"),
        (["train", "--data", ".", "--category", "x", "--out", "o", "--teacher", "/no/teacher.pth"], "not found"),
        (["predict", "--model", "/no/model.pt", "x.png", "--out", "o"], "model file not found"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_failed_training_leaves_no_model_file(dataset, tmp_path, capsys):
    (tmp_path / "teacher.pth").write_bytes(b"junk")
    out = tmp_path / "run"
    code = main(["train", "--data", str(dataset), "--category", "part", "--teacher", str(tmp_path / "teacher.pth"), "--steps", "1", "--out", str(out)])
    assert code == 2
    assert not (out / "model.pt").exists()


def test_wrong_image_size_is_refused(dataset, capsys):
    code = main(["train", "--data", str(dataset), "--category", "part", "--teacher", "random", "--image-size", "128", "--out", "o"])
    assert code == 2
    assert "at least 256" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--teacher", "random", "--precision", "fp32"])
    assert code == 0
    out = capsys.readouterr().out
    assert "image AUROC" in out
    record = json.loads((tmp_path / "demo" / "demo.json").read_text())
    # The reported AUROC is the saved model's on the generated test set.
    split = load_split("mvtec", tmp_path / "demo" / "data", "widget")
    scores = [p.score for p in Inferencer.load(tmp_path / "demo" / "model.pt").predict([s.path for s in split.test])]
    assert record["metrics"]["image_auroc"] == pytest.approx(image_auroc(split.labels, scores), abs=1e-9)
    assert len(list((tmp_path / "demo" / "overlays").glob("*.png"))) == record["n_test"]
    # The demo trains on the fast schedule within its time budget; here the 2 steps end it first.
    assert record["config"]["schedule"] == "fast" and record["config"]["time_budget"] == 60 * DEMO_TIME_BUDGET_MINUTES
    assert record["training"]["stopped_by"] == "steps" and record["wall_seconds"] > 0
    assert f"time budget: {DEMO_TIME_BUDGET_MINUTES:g} min for loading and training (fast schedule" in out
    # Channels-last where it makes fp32 steps faster on this CPU, and said so.
    channels_last = channels_last_is_faster("fp32", torch.device("cpu"))
    assert record["config"]["channels_last"] is channels_last and ("fp32 channels-last on cpu" in out) is channels_last


def test_a_third_image_size_value_is_refused(dataset, tmp_path, capsys):
    args = ["train", "--data", str(dataset), "--category", "part", "--out", str(tmp_path), "--image-size", "256", "256", "256"]
    assert main(args) == 2
    assert "--image-size takes N or H W, got 3 values" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "predict", "eval", "serve", "export", "bench", "pretrain", "benchmark", "demo"])
def test_help_states_each_default_once(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert text.count("(default:") == len(re.findall(r"\(default:[^)]*\)", text))
    assert not re.search(r"\(default:[^)]*\) \(default:", text)


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_bad_output_folder_fails_before_training(where, dataset, tmp_path, monkeypatch, capsys):
    from efficientad.detector import EfficientAD

    monkeypatch.setattr(EfficientAD, "fit", lambda *args, **kwargs: pytest.fail("training started"))
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    out = blocker if where == "a file" else blocker / "run"
    assert main(["train", "--data", str(dataset), "--category", "part", "--teacher", "random", "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("efficientad train: error:") and str(out) in error and "\n" not in error


def test_an_os_error_is_one_line_that_names_the_path(trained, monkeypatch, capsys, tmp_path):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "out" / "scores.csv"))

    monkeypatch.setattr("efficientad.cli.predict.csv.writer", full_disk)
    assert main(["predict", "--model", str(trained / "model.pt"), str(trained), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"efficientad predict: error: No space left on device: {tmp_path / 'out' / 'scores.csv'}"
