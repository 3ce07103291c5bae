"""A one-file HTML evaluation report: every image is inlined, so it can be mailed or archived as is."""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..files import atomic_write_text
from ..visualize import display_range, heat_colors, overlay

THUMBNAIL_SIZE = 260
GOOD_COLOUR, DEFECT_COLOUR = "#2a9d4b", "#d1495b"
MASK_COLOUR = (255, 255, 255)

COLUMNS = (
    ("image_auroc", "Image AUROC"),
    ("f1_max", "F1-max"),
    ("pixel_auroc", "Pixel AUROC"),
    ("au_pro", "AU-PRO"),
    ("au_spro", "AU-sPRO"),
)

STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2530; margin: 0; background: #f4f6f8; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 19px; margin: 32px 0 8px; border-bottom: 1px solid #d5dbe1; padding-bottom: 4px; }
.meta { color: #5b6672; margin: 0 0 16px; }
.summary { background: #fff; border-left: 4px solid #3b6ea5; padding: 10px 16px; margin: 12px 0; }
table { border-collapse: collapse; background: #fff; margin: 8px 0; }
th, td { padding: 6px 14px; border-bottom: 1px solid #e3e7eb; text-align: right; }
th:first-child, td:first-child { text-align: left; } thead th { background: #e9edf1; }
tr.overall td { font-weight: 600; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots img { background: #fff; border: 1px solid #d5dbe1; }
.examples { display: flex; flex-wrap: wrap; gap: 14px; }
figure { margin: 0; background: #fff; border: 1px solid #d5dbe1; padding: 8px; }
figure .pair { display: flex; gap: 4px; } figcaption { font-size: 13px; margin-top: 6px; max-width: 650px; }
.missed { color: #b02a3b; font-weight: 600; } .caught { color: #2a7a42; font-weight: 600; }
dl { background: #fff; padding: 8px 16px; } dt { font-weight: 600; margin-top: 6px; } dd { margin-left: 16px; }
.note { color: #8a5a00; }
"""

GLOSSARY = (
    (
        "Image AUROC",
        "chance that a randomly picked defective image scores higher than a randomly picked good one "
        "(1.0 = always, 0.5 = coin toss). Independent of any threshold.",
    ),
    (
        "F1-max",
        "best balance of precision and recall reachable with any single threshold on this test set "
        "(an upper bound: the model's own threshold was not chosen here).",
    ),
    ("Pixel AUROC", "the same as image AUROC, but for single pixels: defect pixels against defect-free ones."),
    (
        "AU-PRO",
        "how much of each defect region is marked, averaged over regions so small defects count as much "
        "as large ones, while at most 30% of defect-free pixels are marked. Normalised to 1.0 = perfect.",
    ),
    (
        "AU-sPRO",
        "MVTec LOCO AD's variant of AU-PRO for logical and structural anomalies: a defect counts as "
        "found once enough of it is marked; up to 5% of defect-free pixels marked.",
    ),
)


@dataclass
class Example:
    """A test image shown with its heat map; ``mask`` is its ground truth (None when it has none)."""

    path: Path
    defect_type: str
    score: float
    image: Image.Image
    anomaly_map: np.ndarray
    mask: np.ndarray | None = None


def write_report(
    path: str | os.PathLike,
    *,
    title: str,
    metrics: dict[str, Any],
    labels: Sequence[int],
    scores: Sequence[float],
    curves: dict[str, dict[str, list[float]]],
    threshold: float | None,
    worst_defective: Sequence[Example],
    best_good: Sequence[Example],
) -> Path:
    """Write the report for the metrics of :func:`efficientad.evaluate.evaluate`.

    ``curves`` holds ``image_roc`` (and ``pro`` when pixel metrics exist) as returned by
    :func:`efficientad.metrics.plot_curves`; ``worst_defective`` are the defective images the model
    scored lowest, ``best_good`` the good ones it scored highest.
    """
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=float)
    vmax = display_range(threshold)
    plots = [_roc_plot(curves["image_roc"], metrics)]
    if "pro" in curves:
        plots.append(_pro_plot(curves["pro"], metrics))
    plots.append(_histogram(labels, scores, threshold))
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f'<p class="meta">{metrics["n_test"]} test images ({metrics["n_good"]} good, {metrics["n_defective"]} defective)'
        f" &middot; written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
        _summary(metrics, threshold),
        "<h2>Metrics</h2>",
        _table(metrics),
        _notes(metrics),
        "<h2>Curves and score distribution</h2>",
        '<div class="plots">' + "".join(f'<img alt="{alt}" src="{src}">' for alt, src in plots) + "</div>",
        "<h2>Defective images scored lowest (hardest to catch)</h2>",
        _examples(worst_defective, threshold, vmax, "No defective images."),
        "<h2>Good images scored highest (likeliest false alarms)</h2>",
        _examples(best_good, threshold, vmax, "No good images."),
        "<h2>How to read this</h2>",
        _legend(vmax, threshold),
        "<dl>" + "".join(f"<dt>{name}</dt><dd>{text}</dd>" for name, text in GLOSSARY) + "</dl>",
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><main>{''.join(parts)}</main></body></html>\n"
    )
    return atomic_write_text(path, page)


def _number(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.3f}"


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _summary(metrics: dict[str, Any], threshold: float | None) -> str:
    lines = [
        f"Image AUROC <b>{_number(metrics['image_auroc'])}</b>: a randomly picked defective image scores above a "
        f"randomly picked good one {_percent(metrics['image_auroc'])} of the time."
    ]
    flagged = metrics.get("at_threshold")
    if threshold is None or flagged is None:
        lines.append("The model has no decision threshold, so no images are flagged.")
    else:
        lines.append(
            f"At the model's threshold <b>{threshold:.4f}</b> (set on held-out good training images, not on this "
            f"test set) it flags <b>{_percent(flagged['defective_flagged'])}</b> of the defective images and "
            f"<b>{_percent(flagged['good_flagged'])}</b> of the good ones (false alarms)."
        )
    return '<div class="summary">' + "<br>".join(lines) + "</div>"


def _table(metrics: dict[str, Any]) -> str:
    columns = [(key, name) for key, name in COLUMNS if key != "au_spro" or "au_spro" in metrics]
    head = "<tr><th>Defect type</th><th>Defective images</th>" + "".join(f"<th>{name}</th>" for _, name in columns) + "</tr>"
    rows = [
        '<tr class="overall"><td>all types</td>'
        f"<td>{metrics['n_defective']}</td>" + "".join(f"<td>{_number(metrics.get(key))}</td>" for key, _ in columns) + "</tr>"
    ]
    for defect_type, entry in metrics["per_type"].items():
        rows.append(
            f"<tr><td>{html.escape(defect_type)}</td><td>{entry['n_defective']}</td>"
            + "".join(f"<td>{_number(entry.get(key))}</td>" for key, _ in columns)
            + "</tr>"
        )
    caption = (
        f"Every row compares its defective images with all {metrics['n_good']} good test images. "
        "AU-PRO is integrated up to a false positive rate of 0.3"
        + (", AU-sPRO up to 0.05 (all types: mean of the logical and structural rows)." if "au_spro" in metrics else ".")
    )
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table><p class=\"meta\">{caption}</p>"


def _notes(metrics: dict[str, Any]) -> str:
    pixel_level = metrics["pixel_level"]
    notes = []
    if pixel_level["note"]:
        notes.append(html.escape(pixel_level["note"]))
    skipped = pixel_level["skipped_without_mask"]
    if skipped:
        names = ", ".join(html.escape(Path(p).name) for p in skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        notes.append(f"{len(skipped)} defective images have no ground-truth mask and are left out of pixel metrics: {names}")
    return "".join(f'<p class="note">Note: {note}</p>' for note in notes)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return _data_url(buffer.getvalue())


def _new_axes(title: str, xlabel: str, ylabel: str):
    # A bare Figure, not pyplot: no global state and no display needed (Agg renders the PNG).
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.7, 3.3))
    axes = figure.subplots()
    axes.set_title(title, fontsize=10)
    axes.set_xlabel(xlabel, fontsize=9)
    axes.set_ylabel(ylabel, fontsize=9)
    axes.grid(alpha=0.3)
    return figure, axes


def _roc_plot(curve: dict[str, list[float]], metrics: dict[str, Any]) -> tuple[str, str]:
    figure, axes = _new_axes("Image-level ROC", "false alarm rate (good images flagged)", "detection rate (defective flagged)")
    axes.plot(curve["fpr"], curve["tpr"], color="#3b6ea5", label=f"AUROC {metrics['image_auroc']:.3f}")
    axes.plot([0, 1], [0, 1], color="#999999", linestyle=":", label="chance")
    flagged = metrics.get("at_threshold")
    if flagged is not None:
        axes.plot(flagged["good_flagged"], flagged["defective_flagged"], "o", color="black", label="model's threshold")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right", fontsize=8)
    return "image-level ROC curve", _figure_png(figure)


def _pro_plot(curve: dict[str, list[float]], metrics: dict[str, Any]) -> tuple[str, str]:
    limit = metrics["integration_limits"]["au_pro"]
    figure, axes = _new_axes(
        "Per-region overlap (PRO)", "false positive rate (defect-free pixels)", "mean overlap per defect region"
    )
    fpr, pro = np.asarray(curve["fpr"]), np.asarray(curve["pro"])
    axes.plot(fpr, pro, color="#3b6ea5", label=f"AU-PRO {metrics['au_pro']:.3f} (FPR up to {limit})")
    inside = fpr <= limit
    axes.fill_between(fpr[inside], pro[inside], color="#3b6ea5", alpha=0.15)
    axes.axvline(limit, color="#999999", linestyle=":")
    axes.set_xlim(0, min(1.0, 2 * limit))
    axes.set_ylim(0, 1.02)
    axes.legend(loc="lower right", fontsize=8)
    return "PRO curve", _figure_png(figure)


def _histogram(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> tuple[str, str]:
    from matplotlib.ticker import MaxNLocator

    figure, axes = _new_axes("Image scores", "anomaly score (maximum of the map)", "images")
    values = scores if threshold is None else np.append(scores, threshold)
    bins = np.linspace(values.min(), values.max(), 31) if np.ptp(values) > 0 else 10
    axes.hist(scores[labels == 0], bins=bins, color=GOOD_COLOUR, alpha=0.6, label=f"good ({int((labels == 0).sum())})")
    axes.hist(scores[labels == 1], bins=bins, color=DEFECT_COLOUR, alpha=0.6, label=f"defective ({int((labels == 1).sum())})")
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4f}")
    axes.yaxis.set_major_locator(MaxNLocator(integer=True))
    axes.legend(fontsize=8)
    return "score histogram", _figure_png(figure)


def _image_png(image: Image.Image, thumbnail: bool = True) -> str:
    if thumbnail:
        image = image.copy()
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return _data_url(buffer.getvalue())


def _outlined(picture: Image.Image, mask: np.ndarray) -> Image.Image:
    """Draw the ground truth's outline, thick enough to survive the downscaling to a thumbnail."""
    from scipy import ndimage

    width = max(1, round(max(mask.shape) / THUMBNAIL_SIZE))
    edge = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=1)
    pixels = np.array(picture)
    pixels[edge] = MASK_COLOUR
    return Image.fromarray(pixels)


def _examples(examples: Sequence[Example], threshold: float | None, vmax: float, empty: str) -> str:
    if not examples:
        return f"<p>{empty}</p>"
    figures = []
    for example in examples:
        heat = overlay(example.image, example.anomaly_map, vmax)
        if example.mask is not None and example.mask.shape == example.anomaly_map.shape:
            heat = _outlined(heat, example.mask)
        verdict = ""
        if threshold is not None:
            flagged = example.score > threshold
            wrong = flagged == (example.defect_type == "good")
            text = "flagged" if flagged else "not flagged"
            verdict = f' &middot; <span class="{"missed" if wrong else "caught"}">{text}</span>'
        name = html.escape(f"{example.defect_type}/{example.path.name}")
        figures.append(
            f'<figure><div class="pair"><img alt="{name}" src="{_image_png(example.image)}">'
            f'<img alt="{name} heat map" src="{_image_png(heat)}"></div>'
            f'<figcaption title="{html.escape(str(example.path))}"><b>{name}</b> &middot; score {example.score:.4f}{verdict}'
            "</figcaption></figure>"
        )
    return '<div class="examples">' + "".join(figures) + "</div>"


def _legend(vmax: float, threshold: float | None) -> str:
    gradient = np.tile(np.linspace(0.0, vmax, 256, dtype=np.float32), (14, 1))
    source = _image_png(Image.fromarray(heat_colors(gradient, vmax)), thumbnail=False)
    middle = "" if threshold is None else f", the decision threshold ({threshold:.4f}) is in the middle"
    return (
        "<p>Each example shows the image and its anomaly map over it. Heat-map colours: "
        f'<span style="white-space:nowrap">0 <img alt="colour scale" src="{source}" style="vertical-align:middle">'
        f" {vmax:.3f}</span> &mdash; blue is typical of good parts{middle}, red is {vmax:.3f} or more. "
        "White outlines mark the ground-truth defect regions.</p>"
    )
