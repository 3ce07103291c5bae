"""Reproduce the paper's tables: train and evaluate every category of a dataset collection.

Each category runs in a process of its own (``python -m efficientad.collection.runner JOB.json``), so that
its memory is returned when it ends and a crash stays with that category. A category is finished when
its folder holds a ``metrics.json`` from a run that exited cleanly; running the benchmark again skips
finished categories, which makes an interrupted run resumable.

Our metrics are kept as fractions, as in each category's ``metrics.json``; the published values in
``paper_results.json`` (see :mod:`efficientad.collection.paper`) are percent and are converted when they are
put beside ours. :mod:`efficientad.collection.report` renders the results.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .report import format_duration, plot_auroc, render_markdown
from ..choices import COLLECTIONS, check_choice
from ..errors import EfficientADError
from .paper import (
    METRIC_TITLES,
    SOURCE_MARKS,
    collection_title,
    known_categories,
    load_references,
    localization_metric,
    reference_for,
    references,
    summarize_metrics,
)

# A category run with other values of these is not comparable with this run, so it is not reused.
COMPARED_SETTINGS = (
    "model_size",
    "image_size",
    "teacher",
    "penalty_images",
    "schedule",
    "steps",
    "batch_size",
    "learning_rate",
    "precision",
    "seed",
    "false_positive_rate",
)


def _check_collection(collection: str) -> None:
    check_choice("collection", collection, COLLECTIONS)


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
            raise EfficientADError("categories is empty")
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
            "name them in categories, or use the 'folder' collection"
        )
    return categories


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
    package_parent = str(Path(__file__).resolve().parents[2])
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
            [sys.executable, "-m", "efficientad.collection.runner", str(job_path)],
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

    from ..data.datasets import load_split
    from ..detector import EfficientAD
    from ..evaluation.evaluate import evaluate

    split = load_split(data["format"], data["root"], data["category"])
    detector = EfficientAD(**settings)
    detector.fit(split.train, split.validation)
    detector.save_run(out, {"data": data})
    evaluate(detector, split, out, progress=True, write_maps=job["write_maps"], write_report=job["write_report"])


def _worker_main(argv: Sequence[str]) -> int:
    """Entry point of the child process: ``python -m efficientad.collection.runner JOB.json``."""
    if len(argv) != 1:
        print("usage: python -m efficientad.collection.runner JOB.json (written by `efficientad benchmark`)", file=sys.stderr)
        return 2
    try:
        job = json.loads(Path(argv[0]).read_text())
        _train_and_evaluate(job)
    except EfficientADError as error:
        print(f"error: {error}", flush=True)
        return 2
    return 0


# ---------------------------------------------------------------------------- whole collection
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    from ..training.teacher import OFFICIAL_BY_SIZE

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
            "retrain them (force=True) or choose another output folder"
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
    from ..data.datasets import load_split
    from ..detector import EfficientAD
    from ..files import check_output_folder

    _check_collection(collection)
    root, out = Path(root).resolve(), Path(out).resolve()
    if out == root or root in out.parents:
        raise EfficientADError(f"output folder {out} lies inside the dataset root {root}: choose a folder outside it")
    check_output_folder(out)
    expected = {**EfficientAD(**detector).config.as_dict(), "device": str(detector.get("device") or "cpu")}
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
        log(f"finished earlier, skipped (force=True retrains them): {', '.join(finished_before)}")
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
    from ..files import write_run_record

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


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
