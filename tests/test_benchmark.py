import json
import shutil

import pytest

from efficientad.collection.runner import find_categories, run_benchmark, run_category
from efficientad.collection.report import format_duration, render_markdown
from efficientad.cli import main
from efficientad.errors import EfficientADError
from efficientad.collection.paper import load_references, reference_for, summarize_metrics
from efficientad.data.synthetic import make_dataset

from .conftest import SHARED, requires_shared

FAST = ["--teacher", "random", "--steps", "2", "--no-report"]
SETTINGS = {"teacher": "random", "steps": 2}


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """Two MVTec AD category names: bottle is intact, cable lacks train/good."""
    root = tmp_path_factory.mktemp("mvtec")
    for name in ("bottle", "cable"):
        make_dataset(root, name, n_train=5, n_test_good=2, n_test_defect=2, size=256)
    shutil.rmtree(root / "cable" / "train" / "good")
    return root


@pytest.fixture(scope="module")
def first_run(collection, tmp_path_factory):
    """One benchmark run (the only one that trains), with its outputs read right after it."""
    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as patch:
        # The child processes share two cores with the test run.
        patch.setenv("OMP_NUM_THREADS", "1")
        code = main(["benchmark", "--collection", "mvtec_ad", "--root", str(collection), "--out", str(out), *FAST])
    results = json.loads((out / "results.json").read_text())
    return out, code, results, (out / "results.md").read_text()


@pytest.mark.slow  # the collection run trains in child processes
def test_run_trains_evaluates_and_reports_every_category(first_run):
    out, code, results, _ = first_run
    assert code == 1  # one category failed
    assert list(results["categories"]) == ["bottle", "cable"]
    bottle = results["categories"]["bottle"]
    assert bottle["status"] == "done", bottle["error"]
    # The collection's table holds exactly what the category's own evaluation wrote.
    assert bottle["metrics"]["image_auroc"] == json.loads((out / "bottle" / "metrics.json").read_text())["image_auroc"]
    assert bottle["metrics"]["au_pro"] is not None
    assert bottle["seconds"] > 0 and bottle["seconds_per_step"] > 0
    assert bottle["reference"]["image_auroc"] == {"value": 0.9992, "source": "reproduction"}
    for name in ("model.pt", "train.json", "metrics.json", "scores.csv", "log.txt"):
        assert (out / "bottle" / name).is_file()
    assert results["counts"] == {"done": 1, "resumed": 0, "failed": 1, "pending": 0, "total": 2}
    assert results["mean"]["image_auroc"] == bottle["metrics"]["image_auroc"]
    assert results["mean"]["complete"] is False
    assert results["reference_mean"]["paper"]["image_auroc"] == 0.988
    assert results["config"]["steps"] == 2 and results["model"] == "EfficientAD-S"
    assert (out / "auroc.png").stat().st_size > 1000


@pytest.mark.slow  # the collection run trains in child processes
def test_broken_category_is_reported_and_does_not_stop_the_others(first_run):
    _, _, results, markdown = first_run
    cable = results["categories"]["cable"]
    assert cable["status"] == "failed" and cable["metrics"] is None
    assert "train" in cable["error"] and "not found" in cable["error"]
    assert "| cable |" in markdown and "failed: expected MVTec AD layout" in markdown


@pytest.mark.slow  # the collection run trains in child processes
def test_markdown_puts_the_published_numbers_beside_ours(first_run):
    _, _, results, markdown = first_run
    ours = 100 * results["categories"]["bottle"]["metrics"]["image_auroc"]
    row = next(line for line in markdown.splitlines() if line.startswith("| bottle |"))
    assert f"| {ours:.1f} | 99.9 R | {ours - 99.92:+.1f} |" in row
    assert "| Image AUROC |" in markdown and "| 98.8 |" in markdown  # the paper's mean
    assert "not comparable with the published means" in markdown
    assert "arXiv:2303.14535" in markdown and "nelson1425/EfficientAD" in markdown


@pytest.mark.slow  # the collection run trains in child processes
def test_resume_skips_finished_categories(first_run, collection, capsys):
    out = first_run[0]
    model = out / "bottle" / "model.pt"
    before = model.stat().st_mtime_ns
    capsys.readouterr()
    arguments = ["--collection", "mvtec_ad", "--root", str(collection), "--out", str(out), "--categories", "bottle"]
    code = main(["benchmark", *arguments, *FAST])
    printed = capsys.readouterr().out
    assert code == 0
    assert "finished earlier, skipped" in printed and "training and evaluating" not in printed
    assert model.stat().st_mtime_ns == before
    results = json.loads((out / "results.json").read_text())
    assert results["categories"]["bottle"]["status"] == "resumed"
    assert results["categories"]["bottle"]["seconds"] == first_run[2]["categories"]["bottle"]["seconds"]


@pytest.mark.slow  # the collection run trains in child processes
def test_resume_refuses_results_trained_with_other_settings(first_run, collection):
    with pytest.raises(EfficientADError, match=r"other settings.*steps 2 there, 3 now.*force=True"):
        run_benchmark("mvtec_ad", collection, first_run[0], {**SETTINGS, "steps": 3}, categories=["bottle"])


def test_a_crashing_child_is_contained_and_leaves_no_finished_marker(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "metrics.json").write_text("{}")
    finished, error, seconds = run_category({}, folder)  # the child fails reading the job
    assert not finished and "KeyError" in error and seconds > 0
    assert not (folder / "metrics.json").exists() and (folder / "log.txt").is_file()


def test_bad_requests_fail_before_any_training(collection, tmp_path):
    with pytest.raises(EfficientADError, match="no folder for screw"):
        run_benchmark("mvtec_ad", collection, tmp_path, SETTINGS, categories=["bottle", "screw"])
    with pytest.raises(EfficientADError, match="inside the dataset root"):
        run_benchmark("mvtec_ad", collection, collection / "results", SETTINGS)
    with pytest.raises(EfficientADError, match="collection must be one of"):
        run_benchmark("mvtec", collection, tmp_path, SETTINGS)
    with pytest.raises(EfficientADError, match="image_size"):
        run_benchmark("mvtec_ad", collection, tmp_path, {**SETTINGS, "image_size": 64})


def test_find_categories(tmp_path):
    for name in ("zipper", "bottle", "my_part", ".hidden"):
        (tmp_path / name).mkdir()
    assert find_categories("mvtec_ad", tmp_path) == ["bottle", "zipper"]  # the paper's order
    assert find_categories("folder", tmp_path) == ["bottle", "my_part", "zipper"]
    assert find_categories("mvtec_ad", tmp_path, ["my_part", " zipper", "zipper"]) == ["zipper", "my_part"]
    with pytest.raises(EfficientADError, match="no MVTec LOCO AD category folders"):
        find_categories("loco", tmp_path)


@requires_shared("data")
def test_find_categories_in_the_shared_data():
    assert find_categories("mvtec_ad", SHARED / "data" / "mvtec_ad") == ["bottle"]
    assert find_categories("visa", SHARED / "data" / "visa") == ["fryum"]  # not split_csv


def test_published_numbers_are_consistent():
    data = load_references()
    counts = {"mvtec_ad": 15, "loco": 5, "visa": 12}
    for name, collection in data["collections"].items():
        assert len(set(collection["categories"])) == counts[name]
        for size in ("s", "m"):
            for source, published in collection["results"][size].items():
                assert source in data["sources"]
                tables = [published["mean"], *published.get("categories", {}).values()]
                assert all(0 < v <= 100 for table in tables for v in table.values())
                assert set(published.get("categories", {})) <= set(collection["categories"])
    reproduction = data["collections"]["mvtec_ad"]["results"]["s"]["reproduction"]
    for metric in ("image_auroc", "au_pro"):
        values = [entry[metric] for entry in reproduction["categories"].values()]
        assert len(values) == 15
        assert sum(values) / 15 == pytest.approx(reproduction["mean"][metric], abs=0.01)
    assert reference_for("mvtec_ad", "s", "image_auroc").source == "paper"
    assert reference_for("mvtec_ad", "s", "image_auroc", "cable").value == 93.52
    assert reference_for("visa", "m", "image_auroc").value == 98.1
    assert reference_for("visa", "s", "image_auroc", "fryum") is None


def test_loco_image_auroc_is_the_mean_of_logical_and_structural():
    metrics = {
        "image_auroc": 0.8,
        "au_spro": 0.5,
        "per_type": {"logical_anomalies": {"image_auroc": 0.7}, "structural_anomalies": {"image_auroc": 0.95}},
    }
    summary = summarize_metrics("loco", metrics)
    assert summary["image_auroc"] == pytest.approx(0.825)
    assert summary["image_auroc_pooled"] == 0.8 and summary["au_spro"] == 0.5
    assert summarize_metrics("mvtec_ad", metrics)["image_auroc"] == 0.8


def test_markdown_without_published_numbers():
    results = {
        "collection": "folder",
        "title": "custom folders",
        "model": "EfficientAD-M",
        "config": {"model_size": "m", "steps": 10, "teacher": None, "image_size": [256, 256], "batch_size": 1,
                   "precision": "fp32", "seed": 0, "penalty_images": None, "device": "cpu"},
        "counts": {"done": 1, "resumed": 0, "failed": 0, "pending": 0, "total": 1},
        "mean": {"image_auroc": 0.9, "au_pro": None, "n_categories": 1, "complete": False},
        "reference_mean": {},
        "categories": {"part": {"status": "done", "metrics": {"image_auroc": 0.9, "au_pro": None}, "reference": {},
                                "seconds": 5.0, "error": None}},
        "sources": load_references()["sources"],
    }
    markdown = render_markdown(results)
    assert "| part | 90.0 | – | 5 s | done |" in markdown and "Published" not in markdown


def test_format_duration():
    assert [format_duration(s) for s in (4.4, 300, 3 * 3600 + 5 * 60)] == ["4 s", "5 min", "3 h 05 min"]


def test_heartbeat_shows_the_latest_progress_bar_state(tmp_path):
    from efficientad.collection.runner import _latest_status

    log = tmp_path / "log.txt"
    log.write_text("Loading: 100%\nTraining:  10%| 7/70\rTraining:  20%| 14/70\r")
    assert _latest_status(log) == "Training:  20%| 14/70"
    assert _latest_status(tmp_path / "missing.txt") == ""
