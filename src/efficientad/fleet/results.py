"""What ``train-many`` keeps per row: which rows are finished, and ``results.csv`` / ``results.md``.

A row is finished when its folder holds a ``model.pt``, a ``train.json`` that describes it (its
``model_tensor_sha256``, its config and data equal to the row's) and, where the row has a test split,
a ``metrics.json``. Each is written after the one before it and removed before it changes
(:meth:`EfficientAD.save_run <efficientad.EfficientAD.save_run>`), so any interruption leaves a row
either finished or retrained by the next run.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..collection.report import format_duration
from ..errors import EfficientADError
from ..files import atomic_write_text
from .manifest import Row

# done: trained now; skipped: finished by an earlier run; failed: see error; pending: still running
# when the results were written; cancelled: not finished because the run was stopped.
STATUSES = ("done", "skipped", "failed", "pending", "cancelled")


@dataclass
class RowResult:
    """One manifest row's outcome; ``node`` is the Ray node that trained it, ``threads`` its torch threads."""

    row: int
    name: str
    status: str
    seconds: float | None = None
    image_auroc: float | None = None
    au_pro: float | None = None
    threshold: float | None = None
    node: str | None = None
    threads: int | None = None
    error: str | None = None


COLUMNS = tuple(field.name for field in fields(RowResult))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def record_of(row: Row, seconds: float, node: str, threads: int) -> dict[str, Any]:
    """What ``train-many`` adds to a row's train.json, beside the training metadata."""
    return {"data": row.data_record(), "train_many": {"row": row.number, "name": row.name, "seconds": seconds, "node": node, "threads": threads}}


def finished(row: Row, folder: Path) -> RowResult | None:
    """The row's result from an earlier run (status ``skipped``), or None when it must be trained."""
    from ..model import load_model

    record = _read_json(folder / "train.json")
    if record is None or record.get("config") != row.config.as_dict() or record.get("data") != row.data_record():
        return None
    metrics = _read_json(folder / "metrics.json")
    if row.evaluates and metrics is None:
        return None
    try:
        _, stored = load_model(folder / "model.pt")  # checks the tensors against the file's own SHA-256
    except EfficientADError:
        return None
    if stored.get("tensor_sha256") != record.get("model_tensor_sha256"):
        return None
    earlier = record.get("train_many") or {}
    return RowResult(
        row.number, row.name, "skipped", earlier.get("seconds"), *_scores(metrics), record.get("threshold"),
        earlier.get("node"), earlier.get("threads"),
    )


def _scores(metrics: dict[str, Any] | None) -> tuple[float | None, float | None]:
    return (None, None) if metrics is None else (metrics.get("image_auroc"), metrics.get("au_pro"))


def done(row: Row, seconds: float, metrics: dict[str, Any] | None, threshold: float | None, node: str, threads: int) -> RowResult:
    return RowResult(row.number, row.name, "done", seconds, *_scores(metrics), threshold, node, threads)


def counts(results: list[RowResult]) -> dict[str, int]:
    statuses = [result.status for result in results]
    return {status: statuses.count(status) for status in STATUSES if status in statuses}


def write_results(out: Path, results: list[RowResult]) -> None:
    """``results.csv`` (one line per row, every field) and ``results.md`` (the same for people)."""
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(COLUMNS)
    for result in results:
        writer.writerow(["" if value is None else value for value in asdict(result).values()])
    atomic_write_text(out / "results.csv", table.getvalue())
    atomic_write_text(out / "results.md", render_markdown(results))


def _cell(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def render_markdown(results: list[RowResult]) -> str:
    summary = ", ".join(f"{count} {status}" for status, count in counts(results).items())
    lines = [
        "# efficientad train-many",
        "",
        f"{len(results)} rows: {summary}.",
        "",
        "| Row | Name | Status | Time | Image AUROC | AU-PRO | Threshold | Node | Error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        took = "–" if r.seconds is None else format_duration(r.seconds)
        error = (r.error or "").replace("|", "\\|")
        node = (r.node or "–")[:12]  # Ray node ids are 56 hex digits; a prefix tells them apart
        lines.append(
            f"| {r.row} | {r.name} | {r.status} | {took} | {_cell(r.image_auroc)} | {_cell(r.au_pro)} | {_cell(r.threshold, 4)} | {node} | {error} |"
        )
    return "\n".join(lines) + "\n"
