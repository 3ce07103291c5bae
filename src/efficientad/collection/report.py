"""What `efficientad benchmark` writes for people: the Markdown table and the AUROC chart."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .paper import METRIC_TITLES, SOURCE_MARKS, known_categories, localization_metric, references


def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 05 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _delta(ours: float | None, reference: float | None) -> str:
    if ours is None or reference is None:
        return ""
    return f"{100 * (ours - reference):+.1f}"


def render_markdown(results: dict[str, Any]) -> str:
    """The results as Markdown: collection means beside the published ones, then one row per category."""
    collection = results["collection"]
    metrics = ("image_auroc", localization_metric(collection))
    config = results["config"]
    counts = results["counts"]
    mean = results["mean"]
    lines = [
        f"# {results['model']} on {results['title']}",
        "",
        f"{counts['done'] + counts['resumed']} of {counts['total']} categories finished"
        + (f", {counts['failed']} failed" if counts["failed"] else "")
        + (f", {counts['pending']} not run yet" if counts["pending"] else "")
        + ". "
        + f"{config['steps']:,} steps, teacher {config['teacher'] or 'official'}, image size "
        + "x".join(str(side) for side in config["image_size"])
        + f", batch size {config['batch_size']}, {config['precision']}, seed {config['seed']}, "
        + f"penalty images {config['penalty_images'] or 'none'}, device {config['device']}.",
        "",
        "## Means",
        "",
    ]
    published = {
        source: values
        for source, values in results["reference_mean"].items()
        if any(value is not None for value in values.values())
    }
    header = ["Metric", "Ours"]
    for source in published:
        header += [f"{source.capitalize()} ({SOURCE_MARKS[source]})", "Δ"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for metric in metrics:
        row = [METRIC_TITLES[metric], _percent(mean.get(metric))]
        for values in published.values():
            row += [_percent(values.get(metric)), _delta(mean.get(metric), values.get(metric))]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    known = known_categories(collection)
    if known and not mean["complete"]:
        lines += [
            f"Means over {mean['n_categories']} of the {len(known)} {results['title']} categories: "
            "not comparable with the published means, which cover all of them.",
            "",
        ]

    lines += ["## Per category", ""]
    with_published = bool(published) or any(entry["reference"] for entry in results["categories"].values())
    header = ["Category"]
    for metric in metrics:
        header += [METRIC_TITLES[metric], "Published", "Δ"] if with_published else [METRIC_TITLES[metric]]
    header += ["Time", "Status"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results["categories"].items():
        ours = entry["metrics"] or {}
        row = [name]
        for metric in metrics:
            reference = entry["reference"].get(metric)
            shown = f"{_percent(reference['value'])} {SOURCE_MARKS[reference['source']]}" if reference else ""
            row.append(_percent(ours.get(metric)))
            if with_published:
                row += [shown, _delta(ours.get(metric), reference and reference["value"])]
        status = entry["status"]
        if status == "failed":
            status = "failed: " + str(entry["error"]).replace("|", "\\|").replace("\n", " ")
        row += [format_duration(entry["seconds"]) if entry["seconds"] is not None else "", status]
        lines.append("| " + " | ".join(row) + " |")
    if with_published:
        lines += ["", "Values in percent; Δ is ours minus the published value, in points. Published values:"]
        for source, described in results["sources"].items():
            lines.append(
                f"- {SOURCE_MARKS[source]}: {described['kind']}: {described['citation']}; "
                f"{described['where']} ({described['url']})"
            )
        for source, tables in references(collection, config["model_size"]).items():
            if tables.get("note"):
                lines.append(f"- Note on {SOURCE_MARKS[source]}: {tables['note']}.")
    else:
        lines += ["", "Values in percent."]
    if collection == "loco":
        lines += [
            "",
            "On MVTec LOCO AD a category's image AUROC is the mean of its AUROC on logical and on "
            "structural anomalies, as the official evaluation reports it.",
        ]
    return "\n".join(lines) + "\n"


def plot_auroc(results: dict[str, Any], path: Path) -> Path:
    """Bar chart of the per-category image AUROC, with the published values as markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["categories"])
    ours = [((e["metrics"] or {}).get("image_auroc")) for e in results["categories"].values()]
    published = [(e["reference"].get("image_auroc") or {}).get("value") for e in results["categories"].values()]
    positions = range(len(names))
    figure, axes = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 3.5), 4.0))
    axes.bar(positions, [100 * v if v is not None else 0 for v in ours], color="#4c72b0", label="ours")
    marked = [(i, 100 * v) for i, v in enumerate(published) if v is not None]
    if marked:
        axes.scatter(*zip(*marked), marker="_", s=300, color="black", linewidths=2, label="published", zorder=3)
    mean = results["mean"].get("image_auroc")
    if mean is not None:
        axes.axhline(100 * mean, color="#4c72b0", linestyle="--", linewidth=1, label=f"our mean {100 * mean:.1f}")
    paper = results["reference_mean"].get("paper", {}).get("image_auroc")
    if paper is not None:
        axes.axhline(100 * paper, color="black", linestyle=":", linewidth=1, label=f"paper mean {100 * paper:.1f}")
    shown = [100 * v for v in ours + published if v is not None] + ([100 * mean] if mean is not None else [])
    low = min(shown, default=50.0)
    axes.set_ylim(max(0.0, math.floor(low / 5) * 5 - 5), 100.5)
    statuses = [entry["status"] for entry in results["categories"].values()]
    labels = [name if value is not None else f"{name}\n({status})" for name, value, status in zip(names, ours, statuses)]
    axes.set_xticks(list(positions), labels, rotation=45, ha="right", fontsize=8)
    axes.set_ylabel("image AUROC (%)")
    axes.set_title(f"{results['model']} on {results['title']}")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
