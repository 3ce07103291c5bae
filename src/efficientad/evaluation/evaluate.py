"""Score a trained detector on a dataset's test split with the official metrics.

Only the test images are read: the detector is used as trained, with its own threshold (set on
held-out good training images), so nothing here is tuned on the test set. Pixel metrics are
computed at the resolution of the ground truth, i.e. at each image's original size.
"""

from __future__ import annotations

import csv
import heapq
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..config import PREDICT_BATCH_SIZE
from ..data.datasets import DefectSpec, Sample, Split, load_defects_config, read_loco_regions, read_mask
from ..errors import EfficientADError
from ..files import atomic_write, atomic_write_text
from .metrics import au_pro, au_spro, f1_max, image_auroc, pixel_auroc, plot_curves

AU_PRO_LIMIT = 0.3
AU_SPRO_LIMIT = 0.05
LOCO_SUBSETS = {"logical": "logical_anomalies", "structural": "structural_anomalies"}
N_EXAMPLES = 4


class ScoredImage(Protocol):
    score: float
    anomaly_map: Any  # np.ndarray at the image's own size


class Predictor(Protocol):
    """What :func:`evaluate` scores with: an ``EfficientAD``, an ``Inferencer`` or anything alike."""

    threshold: float | None

    def predict(self, images: Sequence[Any], batch_size: int = PREDICT_BATCH_SIZE) -> Sequence[ScoredImage]: ...


@dataclass
class _PixelData:
    """Maps and ground truth of the images that take part in pixel metrics.

    Maps go into one float32 array allocated once, so that full-resolution test sets cost
    5 bytes per pixel (map and boolean mask) and are never copied while being collected.
    """

    capacity: int
    indices: list[int] = field(default_factory=list)
    maps: np.ndarray | None = None
    masks: np.ndarray | None = None
    regions: list[list[np.ndarray]] = field(default_factory=list)
    saturations: list[list[float]] = field(default_factory=list)
    unusable: str | None = None

    def add(self, index: int, sample: Sample, anomaly_map: np.ndarray, mask: np.ndarray) -> None:
        if self.unusable is not None:
            return
        if self.maps is None:
            self.maps = np.empty((self.capacity, *anomaly_map.shape), dtype=np.float32)
            self.masks = np.empty((self.capacity, *anomaly_map.shape), dtype=bool)
        elif anomaly_map.shape != self.maps.shape[1:]:
            # The metric functions pool pixels of equally sized images only.
            self.unusable = (
                f"test images differ in size ({sample.path} is {anomaly_map.shape[0]}x{anomaly_map.shape[1]},"
                f" earlier ones {self.maps.shape[1]}x{self.maps.shape[2]}): pixel metrics skipped"
            )
            self.maps = self.masks = None
            return
        row = len(self.indices)
        self.maps[row] = anomaly_map
        self.masks[row] = mask
        self.indices.append(index)


class _Extremes:
    """The defective images scored lowest and the good ones scored highest, with their maps.

    Kept while scoring, so that the report needs neither every map nor a second pass.
    """

    def __init__(self, size: int):
        self.size = size
        self.heaps: dict[int, list] = {0: [], 1: []}

    def offer(self, index: int, label: int, score: float, anomaly_map: np.ndarray) -> None:
        # heapq drops the smallest key: the highest-scored defective, the lowest-scored good image,
        # and among equal scores the later image.
        entry = (-score if label == 1 else score, -index, anomaly_map)
        heap = self.heaps[label]
        if len(heap) < self.size:
            heapq.heappush(heap, entry)
        elif entry[:2] > heap[0][:2]:
            heapq.heapreplace(heap, entry)

    def chosen(self, label: int) -> list[tuple[int, np.ndarray]]:
        """``(test index, anomaly map)``, most striking first."""
        ranked = sorted(self.heaps[label], key=lambda entry: entry[:2], reverse=True)
        return [(-negative_index, anomaly_map) for _, negative_index, anomaly_map in ranked]


def evaluate(
    detector: Predictor,
    split: Split,
    out_dir: str | os.PathLike | None = None,
    *,
    progress: bool = True,
    write_maps: bool = True,
    write_report: bool = True,
    batch_size: int = PREDICT_BATCH_SIZE,
) -> dict[str, Any]:
    """Run ``detector`` over ``split.test`` and compute image- and pixel-level metrics.

    Returns the metrics: ``image_auroc``, ``f1_max``, ``pixel_auroc`` and ``au_pro`` (FPR limit
    0.3) overall, the same per defect type under ``per_type`` (each type against all good test
    images), counts, and the detector's hit rates at its own threshold. For the ``loco`` format
    it adds ``au_spro_logical`` and ``au_spro_structural`` (each subset together with the good
    test images, FPR limit 0.05) and ``au_spro``, their mean. Defective images without mask files
    are left out of pixel metrics and listed under ``pixel_level``; pixel metrics are ``None``
    when none can be computed.

    With ``out_dir``, writes ``anomaly_maps/<type>/<stem>.tiff`` (float32, original size;
    ``write_maps``), ``scores.csv``, ``report.html`` (``write_report``) and, last, ``metrics.json``
    there, each whole or not at all; an earlier metrics.json is removed first.
    """
    from tqdm import tqdm

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise EfficientADError(f"batch_size must be a positive integer, got {batch_size!r}")
    test = list(split.test)
    labels = np.array([sample.label for sample in test], dtype=int)
    n_defective = int(labels.sum())
    if n_defective == 0 or n_defective == len(test):
        raise EfficientADError(
            f"evaluation needs good and defective test images; {split.category!r} has"
            f" {len(test) - n_defective} good and {n_defective} defective"
        )
    out = None if out_dir is None else Path(out_dir)
    if out is not None:
        if out.exists() and not out.is_dir():
            raise EfficientADError(f"output folder is a file: {out}")
        out.mkdir(parents=True, exist_ok=True)
        # metrics.json is written last and marks a finished evaluation (`efficientad benchmark` resumes on it).
        (out / "metrics.json").unlink(missing_ok=True)
    map_names = _map_names(test) if out is not None and write_maps else None
    defects = _loco_defects(split) if split.format == "loco" else None

    has_truth = [sample.label == 0 or bool(sample.mask_paths) for sample in test]
    pixels = _PixelData(capacity=sum(has_truth))
    extremes = _Extremes(N_EXAMPLES)
    scores = np.empty(len(test))
    records = []
    with tqdm(total=len(test), desc="Evaluating", unit="img", disable=not progress) as bar:
        for start in range(0, len(test), batch_size):
            batch = test[start : start + batch_size]
            predictions = detector.predict([sample.path for sample in batch], batch_size=batch_size)
            for offset, (sample, prediction) in enumerate(zip(batch, predictions)):
                index = start + offset
                scores[index] = prediction.score
                extremes.offer(index, sample.label, prediction.score, prediction.anomaly_map)
                # Scalars only: keeping whole predictions would hold three maps per test image.
                records.append(
                    (sample, prediction.score, prediction.is_anomalous, prediction.local_score, prediction.global_score)
                )
                if map_names is not None:
                    _write_map(out / "anomaly_maps" / map_names[index], prediction.anomaly_map)
                if has_truth[index]:
                    shape = prediction.anomaly_map.shape
                    if defects is None:
                        mask = read_mask(sample.mask_paths, size=shape)
                    else:
                        regions = read_loco_regions(sample, defects, size=shape)
                        pixels.regions.append([region.mask for region in regions])
                        pixels.saturations.append([region.saturation for region in regions])
                        mask = np.logical_or.reduce([r.mask for r in regions]) if regions else np.zeros(shape, bool)
                    pixels.add(index, sample, prediction.anomaly_map, mask)
            bar.update(len(batch))

    metrics, curves = _compute_metrics(split, test, labels, scores, pixels, detector.threshold)
    if out is not None:
        _write_scores(out / "scores.csv", records)
        if write_report:
            _write_report(out / "report.html", detector.threshold, split, labels, scores, metrics, curves, extremes)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics


def _map_names(test: Sequence[Sample]) -> list[str]:
    """``<type>/<stem>.tiff`` per test image: the names the official MVTec AD and LOCO evaluation
    scripts read below ``<category>/test/``.

    Stems shared within one type (``a.png`` and ``a.jpg``) keep their extension to stay apart.
    """
    stems: dict[tuple[str, str], int] = {}
    for sample in test:
        key = (sample.defect_type, sample.path.stem)
        stems[key] = stems.get(key, 0) + 1
    names = []
    for sample in test:
        folder = sample.defect_type.replace("/", "_").replace(os.sep, "_")
        stem = sample.path.stem if stems[(sample.defect_type, sample.path.stem)] == 1 else sample.path.name
        names.append(f"{folder}/{stem}.tiff")
    return names


def _write_map(path: Path, anomaly_map: np.ndarray) -> None:
    import tifffile

    atomic_write(path, lambda temporary: tifffile.imwrite(temporary, np.ascontiguousarray(anomaly_map, dtype=np.float32)))


def _loco_defects(split: Split) -> dict[int, DefectSpec]:
    # LOCO test images lie in ROOT/CATEGORY/test/<type>/, which is where the config is looked up.
    category_dir = split.test[0].path.parents[2]
    return load_defects_config(category_dir.parent, category_dir.name)


def _image_entry(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    return {"image_auroc": image_auroc(labels, scores), "f1_max": f1_max(labels, scores)}


def _pixel_entry(pixels: _PixelData, in_group: np.ndarray) -> dict[str, float | None]:
    # Indexing copies every map, so the whole set is passed as it is whenever it is the group.
    masks, maps = (pixels.masks, pixels.maps) if in_group.all() else (pixels.masks[in_group], pixels.maps[in_group])
    if not masks.any():
        return {"pixel_auroc": None, "au_pro": None}
    return {"pixel_auroc": pixel_auroc(masks, maps), "au_pro": float(au_pro(masks, maps, AU_PRO_LIMIT))}


def _spro(pixels: _PixelData, in_group: np.ndarray) -> float | None:
    rows = np.flatnonzero(in_group)
    if not any(pixels.regions[row] for row in rows):
        return None
    area = au_spro(
        [pixels.regions[row] for row in rows],
        pixels.maps if in_group.all() else pixels.maps[rows],
        [pixels.saturations[row] for row in rows],
        AU_SPRO_LIMIT,
    )
    return float(area)


def _compute_metrics(
    split: Split,
    test: Sequence[Sample],
    labels: np.ndarray,
    scores: np.ndarray,
    pixels: _PixelData,
    threshold: float | None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    types = np.array([sample.defect_type for sample in test])
    good = labels == 0
    defect_types = sorted({str(t) for t in types[~good]})
    note = pixels.unusable
    if note is None and not any(sample.mask_paths for sample in test):
        note = "no defective test image has a ground-truth mask: pixel metrics skipped"
    pixel_rows = np.asarray(pixels.indices, dtype=int) if note is None else None

    def group(defect_type: str | None) -> np.ndarray:
        return np.ones(len(test), bool) if defect_type is None else good | (types == defect_type)

    def entry(defect_type: str | None) -> dict[str, Any]:
        chosen = group(defect_type)
        result: dict[str, Any] = {**_image_entry(labels[chosen], scores[chosen]), "pixel_auroc": None, "au_pro": None}
        if pixel_rows is not None:
            result.update(_pixel_entry(pixels, chosen[pixel_rows]))
        return result

    overall = entry(None)
    per_type = {}
    for defect_type in defect_types:
        # With one defect type its group is the whole test set: reuse instead of recomputing.
        metrics_of_type = overall if len(defect_types) == 1 else entry(defect_type)
        per_type[defect_type] = {"n_defective": int((types == defect_type).sum()), **metrics_of_type}

    metrics: dict[str, Any] = {
        "format": split.format,
        "category": split.category,
        **{key: overall[key] for key in ("image_auroc", "pixel_auroc", "au_pro", "f1_max")},
    }
    if split.format == "loco":
        subsets = {}
        for name, defect_type in LOCO_SUBSETS.items():
            value = None
            if pixel_rows is not None and defect_type in per_type:
                value = per_type[defect_type]["au_spro"] = _spro(pixels, group(defect_type)[pixel_rows])
            metrics[f"au_spro_{name}"] = subsets[name] = value
        present = [value for value in subsets.values() if value is not None]
        metrics["au_spro"] = float(np.mean(present)) if present else None
    metrics["per_type"] = per_type
    metrics.update(
        n_test=len(test),
        n_good=int(good.sum()),
        n_defective=int((~good).sum()),
        pixel_level={
            "n_images": 0 if pixel_rows is None else len(pixel_rows),
            "skipped_without_mask": [str(s.path) for s in test if s.label == 1 and not s.mask_paths],
            "note": note,
        },
        integration_limits={"au_pro": AU_PRO_LIMIT, **({"au_spro": AU_SPRO_LIMIT} if split.format == "loco" else {})},
        threshold=threshold,
        at_threshold=None
        if threshold is None
        else {
            "defective_flagged": float((scores[~good] > threshold).mean()),
            "good_flagged": float((scores[good] > threshold).mean()),
        },
    )
    curves = {"image_roc": plot_curves(labels, scores)["image_roc"]}
    if overall["au_pro"] is not None:
        curves["pro"] = plot_curves(labels[pixel_rows], scores[pixel_rows], pixels.masks, pixels.maps)["pro"]
    return metrics, curves


def _write_scores(path: Path, records: Sequence[tuple]) -> None:
    def write(temporary: str) -> None:
        with open(temporary, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["path", "defect_type", "label", "score", "is_anomalous", "local_score", "global_score"])
            for sample, score, is_anomalous, local, global_ in records:
                flag = "" if is_anomalous is None else int(is_anomalous)
                writer.writerow(
                    [str(sample.path), sample.defect_type, sample.label, f"{score:.6f}", flag, f"{local:.6f}", f"{global_:.6f}"]
                )

    atomic_write(path, write)


def _write_report(
    path: Path,
    threshold: float | None,
    split: Split,
    labels: np.ndarray,
    scores: np.ndarray,
    metrics: dict[str, Any],
    curves: dict[str, Any],
    extremes: _Extremes,
) -> None:
    from ..data.images import read_image
    from .html_report import Example, write_report

    def example(index: int, anomaly_map: np.ndarray) -> Example:
        sample = split.test[index]
        mask = read_mask(sample.mask_paths, size=anomaly_map.shape) if sample.mask_paths else None
        return Example(sample.path, sample.defect_type, float(scores[index]), read_image(sample.path), anomaly_map, mask)

    write_report(
        path,
        title=f"EfficientAD evaluation: {split.category} ({split.format})",
        metrics=metrics,
        labels=labels,
        scores=scores,
        curves=curves,
        threshold=threshold,
        worst_defective=[example(i, m) for i, m in extremes.chosen(1)],
        best_good=[example(i, m) for i, m in extremes.chosen(0)],
    )
