"""Reproduce the paper's tables: train and evaluate every category of a dataset collection.

Each category runs in a process of its own (``python -m efficientad.benchmark JOB.json``), so that
its memory is returned when it ends and a crash stays with that category. A category is finished when
its folder holds a ``metrics.json`` from a run that exited cleanly; running the benchmark again skips
finished categories, which makes an interrupted run resumable.

Our metrics are kept as fractions, as in each category's ``metrics.json``; the published values in
``paper_results.json`` are percent and are converted when they are put beside ours.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import EfficientADError

COLLECTIONS = {"mvtec_ad": "mvtec", "loco": "loco", "visa": "visa", "folder": "folder"}
SOURCE_MARKS = {"paper": "P", "reproduction": "R"}
# A category run with other values of these is not comparable with this run, so it is not reused.
COMPARED_SETTINGS = (
    "model_size",
    "image_size",
    "teacher",
    "penalty_images",
    "steps",
    "batch_size",
    "precision",
    "seed",
    "false_positive_rate",
)
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


def _check_collection(collection: str) -> None:
    if collection not in COLLECTIONS:
        raise EfficientADError(f"unknown collection {collection!r} (expected one of: {', '.join(COLLECTIONS)})")


def find_categories(collection: str, root: str | os.PathLike, requested: Sequence[str] | None = None) -> list[str]:
    """The categories to run, in the paper's order.

    Without ``requested``: every category of the collection that has a folder under ``root`` (for
    ``folder``: every sub-folder). Requested names must have a folder under ``root``; a folder whose
    layout is broken is still returned, so that its run fails and is reported with the others.
    """
    _check_collection(collection)
    root = Path(root)
    if not root.is_dir():
        raise EfficientADError(f"dataset root not found: {root}")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    known = known_categories(collection)
    if requested is not None:
        names = list(dict.fromkeys(name.strip() for name in requested if name.strip()))
        if not names:
            raise EfficientADError("--categories is empty")
        missing = [name for name in names if name not in folders]
        if missing:
            raise EfficientADError(
                f"no folder for {', '.join(missing)} in {root} (folders there: {', '.join(folders) or 'none'})"
            )
        return sorted(names, key=lambda name: known.index(name) if name in known else len(known))
    categories = [name for name in known if name in folders] if known else folders
    if not categories:
        expected = f" (expected some of: {', '.join(known)})" if known else ""
        raise EfficientADError(
            f"no {collection_title(collection)} category folders in {root}{expected}; "
            "name them with --categories, or use --collection folder"
        )
    return categories


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


# --------------------------------------------------------------------------------- one category
def _last_error(log_path: Path) -> str:
    """The line of a failed run's log that says why: its ``error:`` line, else its last line."""
    try:
        lines = [line.strip() for line in log_path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log written"
    errors = [line for line in lines if line.startswith("error: ")]
    if errors:
        return errors[-1][len("error: ") :]
    return lines[-1] if lines else "no output"


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The package must be importable by the child even when it is run from a source checkout.
    package_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent, env.get("PYTHONPATH")]))
    # Progress bars go to a log file: a few updates a minute keep it readable with `tail -f`.
    env.setdefault("TQDM_MININTERVAL", "10")
    return env


def _latest_status(log_path: Path) -> str:
    """The last progress-bar state or line of a log, which tqdm separates by carriage returns."""
    try:
        with open(log_path, "rb") as log:
            log.seek(max(0, log_path.stat().st_size - 4096))
            tail = log.read().decode(errors="replace")
    except OSError:
        return ""
    pieces = [piece.strip() for piece in tail.replace("\r", "\n").split("\n") if piece.strip()]
    return pieces[-1] if pieces else ""


def run_category(
    job: dict[str, Any],
    folder: Path,
    heartbeat: Callable[[str], None] | None = None,
    interval: float = 60.0,
) -> tuple[bool, str | None, float]:
    """Train and evaluate one category in a child process; returns (finished, error, seconds).

    The child's output goes to ``folder/log.txt``; every ``interval`` seconds ``heartbeat`` gets
    its latest progress line. A run that fails after evaluation wrote its ``metrics.json`` (e.g.
    in the report) loses that file, so that a resumed benchmark retries it.
    """
    folder.mkdir(parents=True, exist_ok=True)
    job_path = folder / "job.json"
    job_path.write_text(json.dumps(job, indent=2) + "\n")
    log_path = folder / "log.txt"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "efficientad.benchmark", str(job_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_environment(),
        )
        try:
            code, shown = None, ""
            while code is None:
                try:
                    code = process.wait(timeout=interval)
                except subprocess.TimeoutExpired:
                    status = _latest_status(log_path)
                    if heartbeat is not None and status and status != shown:
                        heartbeat(status)
                        shown = status
        except BaseException:
            # Interrupted or stopped (see the CLI's SIGTERM handler): the child must not outlive us.
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    seconds = time.perf_counter() - started
    if code == 0 and (folder / "metrics.json").is_file():
        return True, None, seconds
    (folder / "metrics.json").unlink(missing_ok=True)
    if code < 0:
        error = f"killed by signal {-code} (out of memory?); see {log_path}"
    elif code == 0:
        error = f"finished without writing metrics.json; see {log_path}"
    else:
        error = _last_error(log_path)
    return False, error, seconds


def _train_and_evaluate(job: dict[str, Any]) -> None:
    # A malformed job fails here, before the slow imports below.
    out, data = Path(job["out"]), {key: job[key] for key in ("root", "category", "format")}
    settings = {**job["detector"], "progress": True}

    from .datasets import load_split
    from .detector import EfficientAD
    from .evaluate import evaluate
    from .runlog import write_run_record

    split = load_split(data["format"], data["root"], data["category"])
    detector = EfficientAD(**settings)
    detector.fit(split.train, split.validation)
    model_path = detector.save(out / "model.pt")
    meta = detector.metadata_
    kept = ("config", "teacher_source", "threshold", "n_train_images", "n_validation_images", "training", "calibration")
    write_run_record(
        out / "train.json",
        {
            "data": data,
            **{key: meta[key] for key in kept},
            "model_file": str(model_path),
        },
    )
    evaluate(detector, split, out, progress=True, write_maps=job["write_maps"], write_report=job["write_report"])


def _worker_main(argv: Sequence[str]) -> int:
    """Entry point of the child process: ``python -m efficientad.benchmark JOB.json``."""
    if len(argv) != 1:
        print("usage: python -m efficientad.benchmark JOB.json (written by `efficientad benchmark`)", file=sys.stderr)
        return 2
    try:
        job = json.loads(Path(argv[0]).read_text())
        _train_and_evaluate(job)
    except EfficientADError as error:
        print(f"error: {error}", flush=True)
        return 2
    return 0


# ---------------------------------------------------------------------------- whole collection
def format_duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3 h 05 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    from .teacher import OFFICIAL_BY_SIZE

    comparable = {key: config[key] for key in COMPARED_SETTINGS if key in config}
    # No teacher named means the official one of the model size: the same weights as naming it.
    if comparable.get("teacher") in (None, "official") and config.get("model_size") in OFFICIAL_BY_SIZE:
        comparable["teacher"] = OFFICIAL_BY_SIZE[config["model_size"]]
    return comparable


def _check_reusable(folder: Path, category: str, expected: dict[str, Any]) -> None:
    """Refuse to mix a finished category trained with other settings into this run's means."""
    record = _read_json(folder / "train.json")
    there, now = _comparable((record or {}).get("config") or {}), _comparable(expected)
    changed = [f"{key} {value!r} there, {now.get(key)!r} now" for key, value in there.items() if value != now.get(key)]
    if changed:
        raise EfficientADError(
            f"{folder} holds {category} results trained with other settings ({'; '.join(changed)}); "
            "use --force to retrain, or another --out"
        )


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _entry(
    collection: str,
    model_size: str,
    category: str,
    status: str,
    folder: Path,
    seconds: float | None,
    error: str | None,
) -> dict[str, Any]:
    metrics = _read_json(folder / "metrics.json") if status != "failed" else None
    training = ((_read_json(folder / "train.json") or {}).get("training") or {}) if status != "failed" else {}
    reference = {}
    for metric in ("image_auroc", localization_metric(collection)):
        found = reference_for(collection, model_size, metric, category)
        if found is not None:
            reference[metric] = {"value": round(found.value / 100, 6), "source": found.source}
    return {
        "status": status,
        "metrics": summarize_metrics(collection, metrics) if metrics else None,
        "reference": reference,
        "seconds": seconds,
        "seconds_per_step": training.get("seconds_per_step"),
        "error": error,
        "folder": str(folder),
    }


def summarize(
    collection: str,
    model_size: str,
    entries: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Means of the finished categories, and whether they cover the whole collection."""
    finished = {name: e for name, e in entries.items() if e["metrics"]}
    metrics = ("image_auroc", localization_metric(collection))
    mean: dict[str, Any] = {m: _mean([e["metrics"].get(m) for e in finished.values()]) for m in metrics}
    known = known_categories(collection)
    mean["n_categories"] = len(finished)
    mean["complete"] = bool(known) and set(known) <= set(finished)
    published = {}
    for source, tables in references(collection, model_size).items():
        values = {m: tables.get("mean", {}).get(m) for m in metrics}
        published[source] = {m: (None if v is None else round(v / 100, 6)) for m, v in values.items()}
    return {"mean": mean, "reference_mean": published}


def run_benchmark(
    collection: str,
    root: str | os.PathLike,
    out: str | os.PathLike,
    detector: dict[str, Any],
    categories: Sequence[str] | None = None,
    force: bool = False,
    write_maps: bool = False,
    write_report: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train and evaluate every category in turn and write ``out/results.{json,md}`` and ``out/auroc.png``.

    ``detector`` holds :class:`~efficientad.detector.EfficientAD` keyword arguments; they are
    validated here, before the first category starts. Returns the content of ``results.json``.
    """
    from .datasets import load_split
    from .detector import EfficientAD

    _check_collection(collection)
    root, out = Path(root).resolve(), Path(out).resolve()
    if out == root or root in out.parents:
        raise EfficientADError(f"--out {out} lies inside the dataset root {root}: choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise EfficientADError(f"--out {out} is a file, not a folder")
    expected = EfficientAD(**detector).get_config()
    names = find_categories(collection, root, categories)
    model_size = expected["model_size"]
    finished_before = [] if force else [name for name in names if (out / name / "metrics.json").is_file()]
    for name in finished_before:
        _check_reusable(out / name, name, expected)

    title = collection_title(collection)
    log(
        f"benchmark: EfficientAD-{model_size.upper()} on {title}, categories {', '.join(names)};"
        f" {expected['steps']:,} steps on {expected['device']} -> {out}"
    )
    if finished_before:
        log(f"finished earlier, skipped (use --force to retrain): {', '.join(finished_before)}")
    previous = (_read_json(out / "results.json") or {}).get("categories", {})
    entries: dict[str, dict[str, Any]] = {}
    for name in finished_before:
        folder = out / name
        seconds = (previous.get(name) or {}).get("seconds")
        if seconds is None:
            seconds = (((_read_json(folder / "train.json") or {}).get("training")) or {}).get("total_seconds")
        entries[name] = _entry(collection, model_size, name, "resumed", folder, seconds, None)
    to_run = [name for name in names if name not in finished_before]
    earlier = [e["seconds"] for e in entries.values() if e["seconds"] is not None]
    if to_run and earlier:
        log(f"ETA from the categories finished earlier: {format_duration(len(to_run) * _mean(earlier))}")
    finished_seconds: list[float] = []
    failed_seconds: list[float] = []
    for index, name in enumerate(to_run, start=1):
        folder = out / name
        if force:
            (folder / "metrics.json").unlink(missing_ok=True)
        log(f"[{index}/{len(to_run)}] {name}: training and evaluating (log: {folder / 'log.txt'})")
        job = {
            "format": COLLECTIONS[collection],
            "root": str(root),
            "category": name,
            "out": str(folder),
            "detector": detector,
            "write_maps": write_maps,
            "write_report": write_report,
        }
        try:
            # A broken layout is reported at once, without the start-up cost of a child process.
            load_split(job["format"], job["root"], name)
        except EfficientADError as problem:
            ok, error, seconds = False, str(problem), None
        else:
            ok, error, seconds = run_category(job, folder, heartbeat=lambda status: log(f"    {name}: {status}"))
            (finished_seconds if ok else failed_seconds).append(seconds)
        entries[name] = _entry(collection, model_size, name, "done" if ok else "failed", folder, seconds, error)
        log(f"[{index}/{len(to_run)}] {name}: {_describe(collection, entries[name])}")
        remaining = len(to_run) - index
        if remaining:
            # Failures end early, so they would make the estimate too short while anything succeeded.
            typical = _mean(finished_seconds or failed_seconds)
            if typical is not None:
                log(f"ETA for the {remaining} remaining: {format_duration(remaining * typical)}")
            # Written after every category, so that an interrupted run keeps what it finished.
            write_results(collection, out, root, expected, _in_order(names, entries))
    return write_results(collection, out, root, expected, _in_order(names, entries))


def _in_order(names: Sequence[str], entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The entries in category order, with a ``pending`` one for each category not run yet."""
    pending = {
        "status": "pending",
        "metrics": None,
        "reference": {},
        "seconds": None,
        "seconds_per_step": None,
        "error": None,
    }
    return {name: entries.get(name, pending) for name in names}


def _describe(collection: str, entry: dict[str, Any]) -> str:
    if entry["status"] == "failed":
        after = "" if entry["seconds"] is None else f" after {format_duration(entry['seconds'])}"
        return f"FAILED{after}: {entry['error']}"
    took = format_duration(entry["seconds"] or 0)
    parts = []
    for metric in ("image_auroc", localization_metric(collection)):
        value = entry["metrics"].get(metric)
        if value is None:
            continue
        text = f"{METRIC_TITLES[metric]} {100 * value:.1f}"
        reference = entry["reference"].get(metric)
        if reference:
            delta = 100 * (value - reference["value"])
            text += f" ({SOURCE_MARKS[reference['source']]} {100 * reference['value']:.1f}, {delta:+.1f})"
        parts.append(text)
    speed = f", {entry['seconds_per_step']:.4f} s/step" if entry.get("seconds_per_step") else ""
    return f"done in {took}{speed}: {'; '.join(parts) or 'no metrics'}"


# ------------------------------------------------------------------------------------- outputs
def write_results(
    collection: str,
    out: Path,
    root: Path,
    config: dict[str, Any],
    entries: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and ``auroc.png`` for the categories in ``entries``."""
    from .runlog import write_run_record

    model_size = config["model_size"]
    statuses = [entry["status"] for entry in entries.values()]
    counts = {status: statuses.count(status) for status in ("done", "resumed", "failed", "pending")}
    results = {
        "collection": collection,
        "title": collection_title(collection),
        "format": COLLECTIONS[collection],
        "root": str(root),
        "model": f"EfficientAD-{model_size.upper()}",
        "config": config,
        "units": "fractions (0-1), as in each category's metrics.json; published percent values converted",
        "counts": {**counts, "total": len(entries)},
        "categories": entries,
        **summarize(collection, model_size, entries),
        "sources": load_references()["sources"],
    }
    record = write_run_record(out / "results.json", results)
    results = json.loads(record.read_text())
    (out / "results.md").write_text(render_markdown(results))
    plot_auroc(results, out / "auroc.png")
    return results


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


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
