"""The published EfficientAD results, and which of our metrics they correspond to.

``paper_results.json`` holds the paper's values and the reference reproduction's, in percent and
with their sources; a value that was not published is absent, never estimated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

# How a value's source is marked in tables: the paper itself or the reference reproduction.
SOURCE_MARKS = {"paper": "P", "reproduction": "R"}
METRIC_TITLES = {"image_auroc": "Image AUROC", "au_pro": "AU-PRO", "au_spro": "AU-sPRO"}


@cache
def load_references() -> dict[str, Any]:
    """The published results shipped as ``paper_results.json`` (values in percent, sources named)."""
    text = resources.files(__package__).joinpath("paper_results.json").read_text(encoding="utf-8")
    return json.loads(text)


def localization_metric(collection: str) -> str:
    """The pixel-level metric the paper reports for ``collection``: AU-sPRO on LOCO, else AU-PRO."""
    return "au_spro" if collection == "loco" else "au_pro"


def collection_title(collection: str) -> str:
    entry = load_references()["collections"].get(collection)
    return entry["title"] if entry else "custom folders"


def known_categories(collection: str) -> list[str]:
    """The categories the paper evaluates for ``collection`` (empty for ``folder``)."""
    entry = load_references()["collections"].get(collection)
    return list(entry["categories"]) if entry else []


@dataclass(frozen=True)
class Reference:
    """A published value in percent and where it comes from (a key of ``paper_results.json``'s sources)."""

    value: float
    source: str


def references(collection: str, model_size: str) -> dict[str, dict[str, Any]]:
    """``{source: {"mean": {...}, "categories": {...}}}`` for one collection and model size."""
    entry = load_references()["collections"].get(collection)
    return entry["results"].get(model_size, {}) if entry else {}


def reference_for(collection: str, model_size: str, metric: str, category: str | None = None) -> Reference | None:
    """The published value of ``metric`` for ``category`` (the collection mean when None).

    The paper's own value wins over the reference reproduction's.
    """
    for source, published in references(collection, model_size).items():
        table = published.get("mean", {}) if category is None else published.get("categories", {}).get(category, {})
        if table.get(metric) is not None:
            return Reference(float(table[metric]), source)
    return None


def summarize_metrics(collection: str, metrics: dict[str, Any]) -> dict[str, float | None]:
    """The numbers of one category's ``metrics.json`` that the paper's tables report.

    On MVTec LOCO AD the image AUROC of a category is the mean of its AUROC on logical and on
    structural anomalies (each against all good test images), as the official LOCO evaluation
    reports it; the AUROC over all test images together is kept as ``image_auroc_pooled``.
    """
    keys = ("image_auroc", "pixel_auroc", "au_pro", "f1_max")
    summary = {key: metrics.get(key) for key in keys}
    if collection == "loco":
        per_type = metrics.get("per_type", {})
        subsets = {name: per_type.get(f"{name}_anomalies", {}).get("image_auroc") for name in ("logical", "structural")}
        summary["image_auroc_pooled"] = summary["image_auroc"]
        for name, value in subsets.items():
            summary[f"image_auroc_{name}"] = value
        if all(value is not None for value in subsets.values()):
            summary["image_auroc"] = sum(subsets.values()) / 2
        for key in ("au_spro", "au_spro_logical", "au_spro_structural"):
            summary[key] = metrics.get(key)
    return summary
