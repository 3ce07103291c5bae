import csv
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from efficientad.cli import main
from efficientad.data.datasets import Split, load_folder_split, load_split, read_mask
from efficientad.deploy.inferencer import Prediction
from efficientad.deploy.speed import system_info
from efficientad.errors import EfficientADError
from efficientad.evaluation.evaluate import evaluate
from efficientad.data.synthetic import make_dataset

METRIC_KEYS = ("image_auroc", "pixel_auroc", "au_pro", "f1_max")
SPRO_KEYS = ("au_spro_logical", "au_spro_structural", "au_spro")
# Smaller than the model's 256x256 input, so maps at the original size differ from the model's.
SIZE = 128


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """The session's tiny model, evaluated on a set of smaller images than it was trained on."""
    root = tmp_path_factory.mktemp("data")
    make_dataset(root, n_train=4, n_test_good=3, n_test_defect=3, size=SIZE)
    return tiny.detector, load_split("mvtec", root, "widget"), tiny.path


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    detector, split, _ = trained
    out = tmp_path_factory.mktemp("eval")
    # One image per pass, as the test below predicts them, so the maps match bit for bit.
    metrics = evaluate(detector, split, out, progress=False, batch_size=1)
    return metrics, out


class Oracle:
    """A stand-in detector whose map is the ground truth itself: every metric must be 1."""

    threshold = 0.5

    def __init__(self, truth: dict[Path, np.ndarray]):
        self.truth = truth

    def predict(self, images, batch_size=8):
        predictions = []
        for path in images:
            anomaly_map = self.truth[path].astype(np.float32)
            score = float(anomaly_map.max())
            predictions.append(Prediction(score, score, score, score > 0.5, np.stack([anomaly_map] * 3), anomaly_map.shape))
        return predictions


def oracle_for(split: Split) -> Oracle:
    truth = {}
    for sample in split.test:
        with Image.open(sample.path) as image:
            truth[sample.path] = read_mask(sample.mask_paths, size=(image.height, image.width))
    return Oracle(truth)


def test_metrics_are_the_scores_and_maps_that_were_written(trained, evaluated):
    """image and pixel AUROC recomputed with scikit-learn from scores.csv and the TIFF maps."""
    from sklearn.metrics import roc_auc_score

    _, split, _ = trained
    metrics, out = evaluated
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert (metrics["n_test"], metrics["n_good"], metrics["n_defective"]) == (6, 3, 3)
    with open(out / "scores.csv") as file:
        rows = list(csv.DictReader(file))
    labels, scores = [int(row["label"]) for row in rows], [float(row["score"]) for row in rows]
    assert metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    maps = [tifffile.imread(out / "anomaly_maps" / s.defect_type / f"{s.path.stem}.tiff") for s in split.test]
    masks = [read_mask(s.mask_paths, size=m.shape) if s.label else np.zeros(m.shape, bool) for s, m in zip(split.test, maps)]
    pixel_auroc = roc_auc_score(np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps]))
    assert metrics["pixel_auroc"] == pytest.approx(pixel_auroc, abs=1e-6)
    assert set(metrics["per_type"]) == {"scratch", "stain", "worn"}
    for defect_type, entry in metrics["per_type"].items():
        assert entry["n_defective"] == 1
        subset = [(label, score) for row, label, score in zip(rows, labels, scores) if row["defect_type"] in ("good", defect_type)]
        assert entry["image_auroc"] == pytest.approx(roc_auc_score(*zip(*subset)), abs=1e-6)
    assert metrics["pixel_level"] == {"n_images": 6, "skipped_without_mask": [], "note": None}
    assert not any(key.startswith("au_spro") for key in metrics)
    assert set(metrics["at_threshold"]) == {"defective_flagged", "good_flagged"}


def test_maps_are_float32_tiffs_at_the_original_size_equal_to_predict(trained, evaluated):
    detector, split, _ = trained
    _, out = evaluated
    for sample in split.test:
        stored = tifffile.imread(out / "anomaly_maps" / sample.defect_type / f"{sample.path.stem}.tiff")
        assert stored.dtype == np.float32 and stored.shape == (SIZE, SIZE)
    for sample in (split.test[0], split.test[-1]):
        (prediction,) = detector.predict([sample.path])
        stored = tifffile.imread(out / "anomaly_maps" / sample.defect_type / f"{sample.path.stem}.tiff")
        np.testing.assert_array_equal(stored, prediction.anomaly_map)
    scores = (out / "scores.csv").read_text().splitlines()
    assert scores[0].startswith("path,defect_type,label,score") and len(scores) == 7


def test_report_is_one_self_contained_page(evaluated):
    metrics, out = evaluated
    page = (out / "report.html").read_text()
    assert "<table>" in page and "all types" in page and "stain" in page
    assert f"{metrics['image_auroc']:.3f}" in page
    # Three plots, a colour scale, and two pictures (image and heat map) per example shown.
    assert len(re.findall(r'src="data:image/png;base64,', page)) == 3 + 1 + 2 * 6
    assert not re.search(r'(src|href)="(?!data:)', page)
    for heading in ("Defective images scored lowest", "Good images scored highest"):
        assert heading in page


def test_perfect_maps_score_one_and_maskless_images_are_skipped(tmp_path):
    make_dataset(tmp_path, n_train=1, n_test_good=2, n_test_defect=3, size=64)
    split = load_split("mvtec", tmp_path, "widget")
    oracle = oracle_for(split)
    metrics = evaluate(oracle, split, progress=False)
    assert all(metrics[key] == 1.0 for key in METRIC_KEYS)

    maskless = split.test[2]
    split.test[2] = replace(maskless, mask_paths=())
    metrics = evaluate(oracle, split, tmp_path / "out", progress=False, write_maps=False, write_report=False)
    assert metrics["pixel_level"]["skipped_without_mask"] == [str(maskless.path)]
    assert metrics["pixel_level"]["n_images"] == 4
    assert metrics["per_type"][maskless.defect_type]["pixel_auroc"] is None
    assert metrics["pixel_auroc"] == 1.0
    assert not (tmp_path / "out" / "anomaly_maps").exists() and not (tmp_path / "out" / "report.html").exists()


def test_images_of_different_sizes_skip_pixel_metrics_with_a_note(tmp_path):
    for name, size in (("good/a.png", (40, 30)), ("good/b.png", (40, 30)), ("dent/c.png", (50, 30))):
        path = tmp_path / "test" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size).save(path)
    mask = np.zeros((30, 50), np.uint8)
    mask[5:9, 5:9] = 255
    (tmp_path / "masks").mkdir()
    Image.fromarray(mask).save(tmp_path / "masks" / "c.png")
    test = tmp_path / "test"
    split = load_folder_split(test / "good", test / "good", {"dent": test / "dent"}, tmp_path / "masks")
    metrics = evaluate(oracle_for(split), split, progress=False)
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] is None and metrics["au_pro"] is None
    assert "differ in size" in metrics["pixel_level"]["note"]


def make_loco(root: Path) -> Path:
    base = root / "box"
    height, width = 48, 64
    for folder in ("train/good", "validation/good", "test/good", "test/logical_anomalies", "test/structural_anomalies"):
        (base / folder).mkdir(parents=True)
        pixels = np.random.default_rng(len(folder)).integers(0, 255, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(base / folder / "000.png")
    for defect_type, value, box in (("logical_anomalies", 1, (4, 20, 4, 20)), ("structural_anomalies", 2, (30, 40, 40, 60))):
        mask = np.zeros((height, width), np.uint8)
        mask[box[0] : box[1], box[2] : box[3]] = value
        (base / "ground_truth" / defect_type / "000").mkdir(parents=True)
        Image.fromarray(mask).save(base / "ground_truth" / defect_type / "000" / "000.png")
    config = [
        {"defect_name": "missing", "pixel_value": 1, "saturation_threshold": 0.5, "relative_saturation": True},
        {"defect_name": "dent", "pixel_value": 2, "saturation_threshold": 20, "relative_saturation": False},
    ]
    (base / "defects_config.json").write_text(json.dumps(config))
    return root


def test_loco_gives_spro_per_subset_and_their_mean(trained, tmp_path):
    detector, _, _ = trained
    split = load_split("loco", make_loco(tmp_path), "box")
    metrics = evaluate(detector, split, tmp_path / "out", progress=False)
    assert metrics["au_spro"] == pytest.approx((metrics["au_spro_logical"] + metrics["au_spro_structural"]) / 2)
    assert metrics["per_type"]["logical_anomalies"]["au_spro"] == metrics["au_spro_logical"]
    assert metrics["integration_limits"] == {"au_pro": 0.3, "au_spro": 0.05}
    assert tifffile.imread(tmp_path / "out" / "anomaly_maps" / "logical_anomalies" / "000.tiff").shape == (48, 64)
    assert "AU-sPRO" in (tmp_path / "out" / "report.html").read_text()

    perfect = evaluate(oracle_for(split), split, progress=False)
    assert all(perfect[key] == 1.0 for key in SPRO_KEYS)


def test_bad_arguments_are_refused(trained):
    detector, split, _ = trained
    with pytest.raises(EfficientADError, match="batch_size must be a positive integer"):
        evaluate(detector, split, batch_size=0)
    only_good = replace(split, test=[s for s in split.test if s.label == 0])
    with pytest.raises(EfficientADError, match="needs good and defective test images; 'widget' has 3 good and 0"):
        evaluate(detector, only_good)


def test_cli_eval_end_to_end(trained, tmp_path, capsys, monkeypatch):
    _, _, model_path = trained
    for name in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")  # read when torch was imported: here only the record names it
    make_dataset(tmp_path / "data", n_train=1, n_test_good=1, n_test_defect=1, size=SIZE)
    out = tmp_path / "out"
    data = tmp_path / "data"
    code = main(["eval", "--model", str(model_path), "--data", str(data), "--category", "widget", "--out", str(out), "--no-maps"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "image AUROC" in printed and "AU-PRO" in printed and str(out / "report.html") in printed
    record = json.loads((out / "eval.json").read_text())
    assert record["metrics"] == json.loads((out / "metrics.json").read_text())
    assert record["model"] == str(model_path) and record["data"]["category"] == "widget"
    assert record["system"]["instruction_set_cap"] == {"ATEN_CPU_CAPABILITY": "avx2"} and record["system"]["cpu_flags"] == system_info()["cpu_flags"]
    assert (out / "report.html").is_file() and not (out / "anomaly_maps").exists()


@pytest.mark.parametrize("option", ["--layout", "--format"])  # --format: train's and eval's older spelling
def test_cli_eval_names_the_missing_layout(option, trained, tmp_path, capsys):
    _, split, model_path = trained
    data = split.test[0].path.parents[3]
    arguments = ["--data", str(data), "--category", "widget", option, "loco", "--out", str(tmp_path)]
    code = main(["eval", "--model", str(model_path), *arguments])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert re.fullmatch(r"efficientad eval: error: expected MVTec LOCO AD layout: .*validation/good not found", error)
