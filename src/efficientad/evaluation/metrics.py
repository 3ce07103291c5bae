"""Anomaly-detection metrics as plain functions over numpy arrays.

Conventions shared by every function here:

* higher scores mean "more anomalous";
* image ``labels`` are 0 (good) or 1 (anomalous);
* ``masks`` are ground-truth maps where any value > 0 marks a defective pixel, and ``maps`` are the
  anomaly maps, both of shape (N, H, W) (a single (H, W) pair is accepted too);
* curves are computed exactly, at every distinct score, by sorting all scores once as the official
  MVTec AD evaluation does, never on a coarse grid of thresholds.

Every bad input raises :class:`EfficientADError` with a one-line message.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

from ..errors import EfficientADError

# The official MVTec AD evaluation labels ground-truth regions with a 3x3 all-ones structuring
# element, so diagonal neighbours belong to the same region (8-connectivity).
_REGION_STRUCTURE = np.ones((3, 3), dtype=bool)


def _image_inputs(labels: Sequence, scores: Sequence) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or scores.ndim != 1 or len(labels) != len(scores):
        raise EfficientADError(
            f"labels and scores must be 1-D and of equal length, got shapes {labels.shape} and {scores.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise EfficientADError(f"labels must be 0 (good) or 1 (anomalous), got values {np.unique(labels).tolist()}")
    if not np.isfinite(scores).all():
        raise EfficientADError("scores contain NaN or infinite values")
    n_anomalous = int(labels.sum())
    if n_anomalous == 0 or n_anomalous == len(labels):
        raise EfficientADError(
            f"need at least one good and one anomalous image, got {len(labels) - n_anomalous} good"
            f" and {n_anomalous} anomalous"
        )
    return labels.astype(bool), scores


def _as_maps(maps: Sequence, what: str = "anomaly maps") -> np.ndarray:
    try:
        maps = np.asarray(maps)
    except ValueError:
        raise EfficientADError(f"{what} must all have the same shape") from None
    if maps.ndim == 2:
        maps = maps[np.newaxis]
    if maps.ndim != 3 or maps.dtype == object:
        raise EfficientADError(f"{what} must be (N, H, W) or (H, W) arrays of one shape, got shape {maps.shape}")
    if not (np.issubdtype(maps.dtype, np.number) or maps.dtype == bool):
        raise EfficientADError(f"{what} must be numeric, got dtype {maps.dtype}")
    if not np.isfinite(maps).all():
        raise EfficientADError(f"{what} contain NaN or infinite values")
    return maps


def _pixel_inputs(masks: Sequence, maps: Sequence) -> tuple[np.ndarray, np.ndarray]:
    maps = _as_maps(maps)
    masks = _as_maps(masks, "ground-truth masks") > 0
    if masks.shape != maps.shape:
        raise EfficientADError(f"ground-truth masks {masks.shape} and anomaly maps {maps.shape} differ in shape")
    return masks, maps


def image_auroc(labels: Sequence, scores: Sequence) -> float:
    """Area under the image-level ROC curve (true vs. false positive rate over all thresholds).

    Identical to :func:`sklearn.metrics.roc_auc_score`: the probability that a random anomalous
    image scores higher than a random good one, ties counting one half.
    """
    labels, scores = _image_inputs(labels, scores)
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks: Sequence, maps: Sequence) -> float:
    """Area under the pixel-level ROC curve, pooling every pixel of every image into one set."""
    masks, maps = _pixel_inputs(masks, maps)
    n_defective = int(masks.sum())
    if n_defective == 0 or n_defective == masks.size:
        raise EfficientADError(
            f"pixel AUROC needs defective and defect-free pixels, got {n_defective} of {masks.size} defective"
        )
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def f1_max(labels: Sequence, scores: Sequence) -> float:
    """Best image-level F1 score over all thresholds.

    F1 = 2 * precision * recall / (precision + recall) at each point of the precision-recall curve
    (every distinct score taken as the threshold, "score >= threshold" meaning anomalous); a point
    with precision + recall = 0 counts as F1 = 0.
    """
    labels, scores = _image_inputs(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    total = precision + recall
    f1 = np.divide(2.0 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return float(f1.max())


def _overlap_curve(
    negative_scores: np.ndarray, region_scores: list[np.ndarray], region_steps: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False positive rate and mean region overlap at every distinct threshold.

    ``region_steps[k]`` holds how much each pixel of region k, taken in order of decreasing score,
    adds to that region's overlap, so the curve follows from one sort and two cumulative sums.
    A pixel lying in several regions simply appears in each of them.
    """
    n_negative, n_regions = negative_scores.size, len(region_scores)
    scores = np.concatenate([negative_scores, *region_scores])
    is_negative = np.zeros(scores.size, dtype=bool)
    is_negative[:n_negative] = True
    steps = np.concatenate([np.zeros(n_negative), *region_steps]) / n_regions
    order = np.argsort(scores, kind="stable")[::-1]
    scores = scores[order]
    false_positive_rate = np.cumsum(is_negative[order]) / n_negative
    overlap = np.cumsum(steps[order])
    # All pixels sharing one score switch together: keep only the point after the last of them.
    last_of_score = np.append(scores[1:] != scores[:-1], True)
    overlap = np.minimum(overlap[last_of_score], 1.0)
    # Once every pixel is positive each region is fully found; pin the end against rounding drift.
    overlap[-1] = 1.0
    return (
        np.concatenate([[0.0], false_positive_rate[last_of_score]]),
        np.concatenate([[0.0], overlap]),
        np.concatenate([[np.inf], scores[last_of_score].astype(np.float64)]),
    )


def _area_up_to(fpr: np.ndarray, y: np.ndarray, integration_limit: float) -> float:
    """Trapezoid area under (fpr, y) from 0 to the limit, divided by the limit.

    When no curve point lies exactly at the limit, the point there is interpolated linearly between
    its neighbours, as the official MVTec AD evaluation does.
    """
    if not 0.0 < integration_limit <= 1.0:
        raise EfficientADError(f"integration_limit must be in (0, 1], got {integration_limit}")
    n_inside = int(np.searchsorted(fpr, integration_limit, side="right"))
    x, v = fpr[:n_inside], y[:n_inside]
    area = float(np.sum((x[1:] - x[:-1]) * (v[1:] + v[:-1]) / 2.0))
    if x[-1] < integration_limit:
        x_next, v_next = fpr[n_inside], y[n_inside]
        v_limit = v[-1] + (v_next - v[-1]) * (integration_limit - x[-1]) / (x_next - x[-1])
        area += (integration_limit - x[-1]) * (v[-1] + v_limit) / 2.0
    return area / integration_limit


def pro_curve(masks: Sequence, maps: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-region-overlap curve as defined by the official MVTec AD evaluation.

    Regions are the connected components (8-connectivity) of each image's ground-truth mask. At a
    threshold t, a pixel is predicted anomalous when its score is >= t; PRO(t) is the mean over all
    regions of all images of the fraction of the region's pixels predicted anomalous, and FPR(t) is
    the fraction of all defect-free pixels (of good and defective images alike) predicted anomalous.
    Images without defects contribute only defect-free pixels.

    Returns ``(fpr, pro, thresholds)``, ascending in FPR, one point per distinct score plus a first
    point (0, 0) at threshold +inf; the last point is (1, 1).
    """
    masks, maps = _pixel_inputs(masks, maps)
    region_scores, region_steps = [], []
    for mask, anomaly_map in zip(masks, maps):
        labelled, n_regions = ndimage.label(mask, structure=_REGION_STRUCTURE)
        if n_regions == 0:
            continue
        region_ids = labelled[mask]
        sizes = np.bincount(region_ids)[1:]
        by_region = anomaly_map[mask][np.argsort(region_ids, kind="stable")]
        for scores in np.split(by_region, np.cumsum(sizes)[:-1]):
            region_scores.append(scores)
            region_steps.append(np.full(scores.size, 1.0 / scores.size))
    if not region_scores:
        raise EfficientADError("the PRO curve needs at least one defective pixel in the ground-truth masks")
    negative_scores = maps[~masks]
    if negative_scores.size == 0:
        raise EfficientADError("the PRO curve needs at least one defect-free pixel in the ground-truth masks")
    return _overlap_curve(negative_scores, region_scores, region_steps)


def au_pro(masks: Sequence, maps: Sequence, integration_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve (see :func:`pro_curve`) up to ``integration_limit`` FPR.

    The trapezoid rule integrates PRO over FPR from 0 to the limit, interpolating the curve's point at
    exactly the limit, and the result is divided by the limit so that a perfect detector scores 1.
    """
    fpr, pro, _ = pro_curve(masks, maps)
    return _area_up_to(fpr, pro, integration_limit)


def spro_curve(
    masks_per_image: Sequence[Sequence[np.ndarray]],
    maps: Sequence,
    saturation_thresholds: Sequence[Sequence[float]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Saturated per-region-overlap curve as defined by the official MVTec LOCO AD evaluation.

    ``masks_per_image[i]`` lists image i's defects, one boolean (H, W) array each (empty for good
    images); unlike :func:`pro_curve`, one defect is one region even when it has several connected
    components, and defects may overlap. ``saturation_thresholds[i][k]`` is the number of true
    positive pixels (at the maps' resolution) at which defect k of image i counts as fully detected;
    a value above the defect's area is capped at the area, as in the official code, and ``None``
    uses every defect's own area (plain overlap).

    At a threshold t (score >= t is anomalous), sPRO(t) is the mean over all defects of
    min(1, true positive pixels / saturation threshold), and FPR(t) the fraction of all pixels
    outside every defect (of all images given) that are predicted anomalous.

    Returns ``(fpr, spro, thresholds)`` in the same form as :func:`pro_curve`.
    """
    maps = _as_maps(maps)
    if len(masks_per_image) != len(maps):
        raise EfficientADError(f"got defect masks for {len(masks_per_image)} images but {len(maps)} anomaly maps")
    if saturation_thresholds is not None and len(saturation_thresholds) != len(maps):
        raise EfficientADError(
            f"got saturation thresholds for {len(saturation_thresholds)} images but {len(maps)} anomaly maps"
        )
    region_scores, region_steps, negative_scores = [], [], []
    for i, (regions, anomaly_map) in enumerate(zip(masks_per_image, maps)):
        if saturation_thresholds is not None and len(saturation_thresholds[i]) != len(regions):
            raise EfficientADError(
                f"image {i} has {len(regions)} defect masks but {len(saturation_thresholds[i])} saturation thresholds"
            )
        defective = np.zeros(anomaly_map.shape, dtype=bool)
        for k, region in enumerate(regions):
            region = np.asarray(region) > 0
            if region.shape != anomaly_map.shape:
                raise EfficientADError(
                    f"defect mask {k} of image {i} has shape {region.shape}, its anomaly map {anomaly_map.shape}"
                )
            area = int(region.sum())
            if area == 0:
                raise EfficientADError(
                    f"defect mask {k} of image {i} is empty (evaluate at the ground truth's resolution)"
                )
            saturation = area if saturation_thresholds is None else float(saturation_thresholds[i][k])
            if not saturation > 0:
                raise EfficientADError(f"saturation threshold of defect {k} of image {i} must be > 0, got {saturation}")
            saturation = min(saturation, area)
            rank = np.arange(1, area + 1)
            region_scores.append(np.sort(anomaly_map[region])[::-1])
            region_steps.append(np.minimum(rank / saturation, 1.0) - np.minimum((rank - 1) / saturation, 1.0))
            defective |= region
        negative_scores.append(anomaly_map[~defective])
    if not region_scores:
        raise EfficientADError("the sPRO curve needs at least one defect mask")
    negative_scores = np.concatenate(negative_scores)
    if negative_scores.size == 0:
        raise EfficientADError("the sPRO curve needs at least one defect-free pixel")
    return _overlap_curve(negative_scores, region_scores, region_steps)


def au_spro(
    masks_per_image: Sequence[Sequence[np.ndarray]],
    maps: Sequence,
    saturation_thresholds: Sequence[Sequence[float]] | None = None,
    integration_limit: float = 0.05,
) -> float:
    """Normalised area under the sPRO curve (see :func:`spro_curve`) up to ``integration_limit`` FPR.

    Integrated like :func:`au_pro`; MVTec LOCO AD reports it at an FPR limit of 0.05.
    """
    fpr, spro, _ = spro_curve(masks_per_image, maps, saturation_thresholds)
    return _area_up_to(fpr, spro, integration_limit)


def _pixel_level(masks: Sequence | None, maps: Sequence | None) -> bool:
    if (masks is None) != (maps is None):
        raise EfficientADError("ground-truth masks and anomaly maps must be given together")
    return masks is not None


def _thin(x: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most ``max_points`` curve points spread evenly along x, ends included."""
    if len(x) <= max_points:
        return np.arange(len(x))
    # Both sides of each target keep the bottom and the top of vertical jumps.
    targets = np.linspace(x[0], x[-1], max(max_points // 2, 2))
    indices = np.concatenate(
        [np.searchsorted(x, targets, side="left"), np.searchsorted(x, targets, side="right") - 1, [0, len(x) - 1]]
    )
    return np.unique(np.clip(indices, 0, len(x) - 1))


def plot_curves(
    labels: Sequence,
    scores: Sequence,
    masks: Sequence | None = None,
    maps: Sequence | None = None,
    max_points: int = 1000,
) -> dict[str, dict[str, list[float]]]:
    """Curve points for plots, as JSON-ready lists.

    ``"image_roc"``: image-level ``fpr``/``tpr``; ``"pro"`` (only when masks and maps are given):
    ``fpr``/``pro`` of :func:`pro_curve`. Curves longer than ``max_points`` are thinned to at most
    that many of their own points, spread evenly along the FPR axis.
    """
    labels, scores = _image_inputs(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores)
    keep = _thin(fpr, max_points)
    curves = {"image_roc": {"fpr": fpr[keep].tolist(), "tpr": tpr[keep].tolist()}}
    if _pixel_level(masks, maps):
        fpr, pro, _ = pro_curve(masks, maps)
        keep = _thin(fpr, max_points)
        curves["pro"] = {"fpr": fpr[keep].tolist(), "pro": pro[keep].tolist()}
    return curves


def metrics_by_type(
    types: Sequence[str],
    labels: Sequence,
    scores: Sequence,
    masks: Sequence | None = None,
    maps: Sequence | None = None,
    integration_limit: float = 0.3,
) -> dict[str, dict[str, float]]:
    """Metrics overall and per defect type, as ``{"overall": {...}, "<type>": {...}, ...}``.

    Each defect type is evaluated on all good images (label 0) plus the anomalous images of that
    type, so every entry compares the type against the same good images. Each entry holds
    ``image_auroc`` and ``f1_max``, and, when masks and maps are given and the entry's masks hold
    defective pixels, ``pixel_auroc`` and ``au_pro`` (integrated up to ``integration_limit``).
    """
    labels_array, scores_array = _image_inputs(labels, scores)
    types = [str(t) for t in types]
    if len(types) != len(labels_array):
        raise EfficientADError(f"got {len(types)} defect types for {len(labels_array)} images")
    pixel_level = _pixel_level(masks, maps)
    if pixel_level:
        masks, maps = _pixel_inputs(masks, maps)
        if len(maps) != len(labels_array):
            raise EfficientADError(f"got {len(maps)} anomaly maps for {len(labels_array)} images")
    good = ~labels_array
    groups = {"overall": np.ones(len(types), dtype=bool)}
    for defect_type in sorted({t for t, anomalous in zip(types, labels_array) if anomalous}):
        groups[defect_type] = good | (labels_array & (np.asarray(types) == defect_type))
    results = {}
    for name, chosen in groups.items():
        entry = {
            "image_auroc": image_auroc(labels_array[chosen], scores_array[chosen]),
            "f1_max": f1_max(labels_array[chosen], scores_array[chosen]),
        }
        if pixel_level and masks[chosen].any():
            entry["pixel_auroc"] = pixel_auroc(masks[chosen], maps[chosen])
            entry["au_pro"] = au_pro(masks[chosen], maps[chosen], integration_limit)
        results[name] = entry
    return results
