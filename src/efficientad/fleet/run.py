"""``train_many``: train and evaluate every row of a manifest as Ray tasks, on this machine or a cluster.

The driver (this process) checks the manifest, loads each distinct teacher and penalty set once into
Ray's object store, and starts one task per unfinished row. A task only computes: it trains on its
row's data, evaluates where there is a test split, and returns the detector and metrics; the driver
writes every file. So the output folder need only exist where the driver runs, and an interrupted
run leaves nothing half-written. The data (and, past ~5,400 penalty images, the penalty folder) must
be at the same paths on every node.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..collection.report import format_duration
from ..errors import EfficientADError, check_count, first_line
from ..files import atomic_write_text, check_output_folder, write_run_record
from .manifest import Row, read_manifest
from .results import RowResult, counts, done, finished, record_of, write_results

if TYPE_CHECKING:
    import numpy as np

    from ..detector import EfficientAD
    from ..training.penalty import PenaltySource
    from ..training.teacher import Teacher

DEVICES = ("cpu", "cuda")
INSTALL_HINT = 'train-many runs on Ray, which is not installed: pip install "efficientad[ray]"'


def import_ray():
    """The ``ray`` module, or one line saying how to install it (Ray is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise EfficientADError(INSTALL_HINT) from None
    return ray


# ------------------------------------------------------------------------------------- the task
@dataclass
class Trained:
    """What a task sends back: the trained detector (on the CPU) and its row's metrics."""

    detector: EfficientAD
    metrics: dict[str, Any] | None
    seconds: float
    node: str
    threads: int
    warnings: list[str]


def train_row(row: Row, device: str, teacher: Teacher, penalty: PenaltySource | np.ndarray | None) -> Trained:
    """Train and evaluate one row; runs in a Ray worker with the teacher and penalty from the object store."""
    import numpy as np
    import ray
    import torch

    from ..data.datasets import load_split
    from ..detector import EfficientAD
    from ..evaluation.evaluate import evaluate

    started = time.perf_counter()
    context = ray.get_runtime_context()
    # Ray reserved these CPUs for this task; more threads would slow the tasks beside it.
    threads = max(1, int(context.get_assigned_resources().get("CPU", 1)))
    torch.set_num_threads(threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if isinstance(penalty, np.ndarray):
            # A read-only view of the object store, shared by the tasks of a node; training only reads it.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                penalty = torch.from_numpy(penalty)
        split = load_split(row.format, row.data, row.category)
        detector = EfficientAD(row.config, device=device, progress=False)
        detector.fit(split.train, split.validation, teacher=teacher, penalty=penalty)
        metrics = evaluate(detector, split, progress=False) if row.evaluates else None
    # The driver unpickles it, and may have no GPU.
    detector.to("cpu")
    return Trained(detector, metrics, time.perf_counter() - started, context.get_node_id(), threads, [str(w.message) for w in caught])


# ----------------------------------------------------------------------------------- the driver
def train_many(
    manifest: str | os.PathLike | Sequence[Mapping[str, Any]],
    out: str | os.PathLike,
    *,
    settings: Mapping[str, Any] | None = None,
    device: str = "cpu",
    address: str | None = None,
    cpus_per_model: int | None = None,
    progress: bool = True,
) -> list[RowResult]:
    """Train (and evaluate) every manifest row into ``out/<name>/``; returns one result per row.

    ``settings``: TrainConfig fields for every row, under each row's own cells. ``device``: ``cpu``,
    or ``cuda`` for one GPU per row. ``address``: a Ray cluster (``ray://host:10001``, ``auto``);
    None uses ``$RAY_ADDRESS``, else starts Ray on this machine (a Ray this process is already
    connected to is used as it is). ``cpus_per_model``: CPUs, and so torch threads, per CPU row;
    None shares the cluster's CPUs among the rows, at most one node's.

    Rows finished by an earlier run are skipped; a failing row is reported and the others go on.
    Writes ``out/results.csv`` and ``results.md`` after each row and ``train_many.json`` last. On
    Ctrl-C the running rows are cancelled, the results written, and KeyboardInterrupt raised.
    """
    started = time.perf_counter()
    if device not in DEVICES:
        raise EfficientADError(f"device must be one of {', '.join(DEVICES)} (Ray assigns the GPU), got {device!r}")
    if cpus_per_model is not None:
        check_count("cpus_per_model", cpus_per_model)
    rows = read_manifest(manifest, settings)
    out = check_output_folder(out, subfolders=[row.name for row in rows])
    results = {row.number: finished(row, out / row.name) for row in rows}
    to_run = [row for row in rows if results[row.number] is None]
    ray = import_ray() if to_run else None
    # The run record describes the results beside it, which change from here on.
    (out / "train_many.json").unlink(missing_ok=True)
    if progress and len(to_run) < len(rows):
        names = [row.name for row in rows if results[row.number] is not None]
        print(f"skipping {len(names)} row(s) finished by an earlier run: {', '.join(names)}", file=sys.stderr)

    def snapshot(unfinished: str) -> list[RowResult]:
        return [results[row.number] or RowResult(row.number, row.name, unfinished) for row in rows]

    ray_record: dict[str, Any] = {}
    try:
        if to_run:
            ray_record = _run(ray, to_run, out, results, device, address, cpus_per_model, progress, lambda: write_results(out, snapshot("pending")))
    finally:
        final = snapshot("cancelled")
        write_results(out, final)
        write_run_record(
            out / "train_many.json",
            {
                "manifest": str(Path(manifest).resolve()) if isinstance(manifest, (str, os.PathLike)) else "(rows given in Python)",
                "out": str(out),
                "device": device,
                "settings": dict(settings or {}),
                "ray": ray_record,
                "wall_seconds": time.perf_counter() - started,
                "complete": all(result.status != "cancelled" for result in final),
                "counts": counts(final),
                "rows": [asdict(result) for result in final],
            },
        )
    return final


def _connect(ray, address: str | None) -> None:
    local = address is None and not os.environ.get("RAY_ADDRESS")
    try:
        # Ray's start-up lines and dashboard would be noise (and seconds) for a command-line tool.
        ray.init(address=address, logging_level=logging.WARNING, **({"include_dashboard": False} if local else {}))
    except (ConnectionError, RuntimeError, ValueError) as error:
        where = "start Ray on this machine" if local else f"connect to Ray at {address or os.environ['RAY_ADDRESS']}"
        raise EfficientADError(f"cannot {where}: {first_line(error)}") from None


def _run(
    ray,
    rows: list[Row],
    out: Path,
    results: dict[int, RowResult | None],
    device: str,
    address: str | None,
    cpus_per_model: int | None,
    progress: bool,
    save: Callable[[], None],
) -> dict[str, Any]:
    """Run ``rows`` as Ray tasks, filling ``results`` as they finish; returns what the record says of Ray."""
    from tqdm import tqdm

    connected_here = not ray.is_initialized()
    if connected_here:
        _connect(ray, address)
    try:
        resources = _resources(ray, device, cpus_per_model, len(rows))
        shared = _share(ray, rows, results, progress)
        task = ray.remote(train_row).options(
            **resources,
            # A lost worker or node is retried once; an error of the row itself is not retried.
            max_retries=1,
            # Trainings are memory-heavy: spread them over the nodes rather than filling one first.
            scheduling_strategy="SPREAD",
        )
        # Rows whose teacher or penalty images could not be loaded have failed already, without a task.
        pending = {task.remote(row, device, *shared[row.number]): row for row in rows if row.number in shared}
        with tqdm(total=len(rows), desc="train-many", unit="model", disable=not progress, dynamic_ncols=True) as bar:
            bar.update(len(rows) - len(pending))
            try:
                while pending:
                    # A timeout, so that Ctrl-C is noticed between waits.
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                    for ref in ready:
                        row = pending.pop(ref)
                        results[row.number] = _collect(ray, ref, row, out)
                        if progress:
                            bar.write(_describe(results[row.number]))
                        bar.update(1)
                        save()  # after every row, so that a killed run keeps what it finished
            except BaseException:
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise
        nodes = sorted({result.node for row in rows if (result := results[row.number]) and result.node})
        return {"address": address or os.environ.get("RAY_ADDRESS"), "resources_per_row": resources, "nodes_used": nodes}
    finally:
        if connected_here:
            ray.shutdown()


def _resources(ray, device: str, cpus_per_model: int | None, n_rows: int) -> dict[str, int]:
    """Ray resources of one row's task, checked against the nodes so that no task waits forever."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    if device == "cuda":
        if not any(node.get("GPU", 0) >= 1 for node in nodes):
            raise EfficientADError("device cuda: the Ray cluster has no GPU; use device cpu")
        return {"num_gpus": 1, "num_cpus": cpus_per_model or 1}
    largest = int(max((node.get("CPU", 0) for node in nodes), default=0))
    if cpus_per_model is None:
        total = int(sum(node.get("CPU", 0) for node in nodes))
        cpus_per_model = max(1, min(total // n_rows, largest))
    if cpus_per_model > largest:
        raise EfficientADError(f"cpus_per_model {cpus_per_model}: no Ray node has that many CPUs (the largest has {largest})")
    return {"num_cpus": cpus_per_model}


def _share(ray, rows: list[Row], results: dict[int, RowResult | None], progress: bool) -> dict[int, tuple[Any, Any]]:
    """Each row's (teacher, penalty) as object refs, loaded once per distinct one.

    A teacher or penalty folder that cannot be loaded fails its rows here, without a task.
    """
    from ..training.penalty import PenaltyImages
    from ..training.teacher import resolve_teacher

    def penalty_object(folder: str, image_size: tuple[int, int]) -> Any:
        images = PenaltyImages(folder, image_size, progress)
        # A numpy array comes out of the object store without a copy: the tasks of a node share it.
        # Past the memory limit there is no array, only paths, and each task reads from disk.
        return images if images.images is None else images.images.numpy()

    # An object ref per distinct teacher or penalty set, or the error that loading it raised.
    loaded: dict[tuple, Any] = {}

    def put(key: tuple, load: Callable[[], Any]) -> Any:
        if key not in loaded:
            try:
                loaded[key] = ray.put(load())
            except (EfficientADError, OSError) as error:
                loaded[key] = EfficientADError(first_line(error))
        return loaded[key]

    shared = {}
    for row in rows:
        config = row.config
        teacher = put(("teacher", config.teacher, config.model_size), lambda: resolve_teacher(config.teacher, config.model_size, progress))
        penalty = None
        if config.penalty_images is not None:
            penalty = put(("penalty", config.penalty_images, config.image_size), lambda: penalty_object(config.penalty_images, config.image_size))
        problem = next((item for item in (teacher, penalty) if isinstance(item, EfficientADError)), None)
        if problem is not None:
            results[row.number] = RowResult(row.number, row.name, "failed", error=str(problem))
        else:
            shared[row.number] = (teacher, penalty)
    return shared


def _collect(ray, ref, row: Row, out: Path) -> RowResult:
    """The finished task's result, with the row's files written; a failure becomes the row's error."""
    try:
        trained: Trained = ray.get(ref)
    except ray.exceptions.RayError as error:  # the row's own error, or a crashed worker or lost node
        return RowResult(row.number, row.name, "failed", error=_one_line(error))
    for message in trained.warnings:
        warnings.warn(f"{row.name}: {message}", stacklevel=2)
    folder = out / row.name
    try:
        # metrics.json first out, last in: a row with one describes the model beside it.
        (folder / "metrics.json").unlink(missing_ok=True)
        trained.detector.save_run(folder, record_of(row, trained.seconds, trained.node, trained.threads))
        if trained.metrics is not None:
            atomic_write_text(folder / "metrics.json", json.dumps(trained.metrics, indent=2) + "\n")
    except (OSError, EfficientADError) as error:
        return RowResult(row.number, row.name, "failed", trained.seconds, node=trained.node, error=f"writing {folder}: {first_line(error)}")
    return done(row, trained.seconds, trained.metrics, trained.detector.threshold, trained.node, trained.threads)


def _one_line(error: BaseException) -> str:
    cause = getattr(error, "cause", None) or error  # a RayTaskError carries the task's own exception
    if isinstance(cause, EfficientADError):
        return " ".join(str(cause).split())
    return f"{type(cause).__name__}: {first_line(cause)}"


def _describe(result: RowResult) -> str:
    if result.status == "failed":
        return f"{result.name}: FAILED: {result.error}"
    scores = [f"{label} {value:.3f}" for label, value in (("image AUROC", result.image_auroc), ("AU-PRO", result.au_pro)) if value is not None]
    return f"{result.name}: done in {format_duration(result.seconds or 0)}" + (f": {', '.join(scores)}" if scores else "")
