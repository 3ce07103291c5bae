"""Learning curves (issue 14): image AUROC and AU-PRO against training steps and against wall-clock.

    python benchmarks/learning_curves.py                      # bottle and fryum, seeds 0 1, the paper's schedule
    python benchmarks/learning_curves.py --resume --schedule-variant b8=8:4:600   # add a candidate later
    python benchmarks/learning_curves.py --report             # only redraw the table and plot from the JSON
    python benchmarks/learning_curves.py --category bottle --seeds 0 --checkpoints 2,4   # a trial in a minute

For each category, seed and schedule, ONE training run goes to the schedule's last checkpoint. At
each checkpoint a copy of the model is calibrated on the held-out good images exactly as the end of
training calibrates (:func:`efficientad.training.calibrate.calibrate`) and scored on the test set
(:func:`efficientad.evaluation.evaluate.evaluate`: image AUROC, and AU-PRO up to a false-positive
rate of 0.3). The training itself is ``efficientad train``'s: the same images held out, teacher
statistics, steps and learning-curve validations, seeded alike.

Each point records the training seconds so far: from the start of training (teacher statistics
included, image loading not) to that step, without the time spent scoring earlier checkpoints,
which is recorded apart (``eval_seconds``).

The learning rate drops x0.1 at 95% of a run's planned steps, as in the paper's schedule. So the
checkpoints inside a run, all but its last, are taken BEFORE the drop: each is the model after that
many steps of a longer run, not a shorter run of the paper's schedule with its own drop (the points
say ``lr_dropped``). The paper's schedule here is laid out on the last of ``--checkpoints``.

``--schedule-variant NAME=BATCH:LR_SCALE:STEPS[:C1,C2,...]`` adds a candidate fast schedule: BATCH
images per step (TrainConfig's ``batch_size``), the learning rate x LR_SCALE (``learning_rate``),
STEPS steps with the same drop at 95%; its checkpoints are C1,C2,... (STEPS is always the last) or,
by default, ``--checkpoints`` scaled to end at STEPS. Its curve against wall-clock is then compared
with the paper's at matched time (the plot's right panel and the report's target table).

Uses ../shared (beside the repo) by default: data/mvtec_ad (bottle), data/visa (fryum),
weights/teacher_small_r18.pth and data/imagenet_samples for the penalty; a category whose data
is missing is skipped and listed as such. Precision ``auto``: bf16 with channels-last where the
device computes bf16 natively, else fp32.

The JSON (``--json``) is rewritten after every run, so a stopped measurement keeps the runs it
finished; ``--resume`` keeps them and runs only the missing ones (the settings and the machine must
be the same, since wall-clock is measured). A run in progress also saves itself every
``--checkpoint-every`` minutes (training's own checkpoint, with the points scored so far) to
NAME.checkpoints/ beside the JSON, and ``--resume`` continues it from there, bit for bit: a
5,000-step run takes longer than a working session on a CPU without native bf16 (2.7-3 s a
step). Then the report is written beside it: NAME.md (every point, mean and spread over seeds, the
issue's target) and NAME.png (AUROC against steps and against training seconds).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DEFAULT_CHECKPOINTS = (250, 500, 1000, 2000, 5000)
PAPER = "paper"
BEFORE_DROP_NOTE = (
    "The learning rate drops x0.1 at 95% of each run's planned steps; every checkpoint of a run but its last "
    "is taken before that drop (see lr_dropped), i.e. it is the model part-way through the longer run."
)
SECONDS_NOTE = (
    "seconds: training time from the start of training (teacher statistics, steps, learning-curve validations) "
    "to the checkpoint, without image loading and without the earlier checkpoints' scoring (eval_seconds)."
)


class Dataset(NamedTuple):
    """Where a category lives: its layout (``efficientad.choices.DATASET_FORMATS``) and dataset root."""

    format: str
    root: Path


KNOWN_DATASETS = {
    "bottle": Dataset("mvtec", SHARED / "data" / "mvtec_ad"),
    "fryum": Dataset("visa", SHARED / "data" / "visa"),
}


@dataclass(frozen=True)
class Setup:
    """What every run of one measurement shares, and what a resumed measurement must repeat."""

    teacher: str
    penalty_images: str | None
    precision: str
    channels_last: bool
    device: str


@dataclass(frozen=True)
class Schedule:
    """A training schedule: images per step, learning-rate factor, and the steps where the model is scored.

    The run trains ``steps`` (the last checkpoint) steps with the learning rate x0.1 from 95% of them.
    """

    name: str
    batch_size: int
    lr_scale: float
    checkpoints: tuple[int, ...]

    @property
    def steps(self) -> int:
        return self.checkpoints[-1]

    def config(self, setup: Setup, seed: int):
        """The run's TrainConfig: the defaults (the paper's) but for this schedule, the setup and the seed."""
        from efficientad.config import TrainConfig, default

        return TrainConfig(
            teacher=setup.teacher,
            penalty_images=setup.penalty_images,
            steps=self.steps,
            batch_size=self.batch_size,
            learning_rate=self.lr_scale * default(TrainConfig, "learning_rate"),
            precision=setup.precision,
            channels_last=setup.channels_last,
            seed=seed,
        )

    def record(self) -> dict[str, Any]:
        return {**asdict(self), "checkpoints": list(self.checkpoints), "steps": self.steps}


def parse_checkpoints(text: str) -> tuple[int, ...]:
    """``"250,500,1000"`` as ascending distinct positive steps."""
    try:
        steps = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"checkpoints must be steps separated by commas, got {text!r}") from None
    if not steps or steps[0] < 1:
        raise argparse.ArgumentTypeError(f"checkpoints must be positive steps, got {text!r}")
    return tuple(steps)


def scaled_checkpoints(checkpoints: Sequence[int], steps: int) -> tuple[int, ...]:
    """``checkpoints`` stretched or shrunk to end at ``steps``: the same fractions of the run, at least step 1."""
    return tuple(sorted({max(1, round(step * steps / checkpoints[-1])) for step in checkpoints} | {steps}))


def parse_variant(text: str, checkpoints: Sequence[int]) -> Schedule:
    """``NAME=BATCH:LR_SCALE:STEPS[:C1,C2,...]`` as a schedule (see the module's help)."""
    name, _, spec = text.partition("=")
    parts = spec.split(":")
    try:
        if not name or name == PAPER or len(parts) not in (3, 4):
            raise ValueError
        batch_size, lr_scale, steps = int(parts[0]), float(parts[1]), int(parts[2])
        if batch_size < 1 or lr_scale <= 0 or steps < 1:
            raise ValueError
        own = scaled_checkpoints(checkpoints, steps) if len(parts) == 3 else parse_checkpoints(parts[3])
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(
            f"a schedule variant is NAME=BATCH:LR_SCALE:STEPS[:C1,C2,...] with a name other than {PAPER!r}, "
            f"BATCH and STEPS >= 1, LR_SCALE > 0, checkpoints in 1..STEPS; got {text!r}"
        ) from None
    if own[-1] > steps:
        raise argparse.ArgumentTypeError(f"schedule variant {name}: checkpoints beyond its {steps} steps in {text!r}")
    return Schedule(name, batch_size, lr_scale, tuple(sorted(set(own) | {steps})))


def parse_category(text: str) -> tuple[str, Dataset]:
    """``bottle``/``fryum`` (../shared), or ``NAME=FORMAT:ROOT`` for any other category."""
    if "=" not in text:
        if text not in KNOWN_DATASETS:
            raise argparse.ArgumentTypeError(f"unknown category {text!r}: give {', '.join(KNOWN_DATASETS)} or NAME=FORMAT:ROOT")
        return text, KNOWN_DATASETS[text]
    name, _, spec = text.partition("=")
    format, _, root = spec.partition(":")
    if not name or not format or not root:
        raise argparse.ArgumentTypeError(f"a category is NAME or NAME=FORMAT:ROOT, got {text!r}")
    return name, Dataset(format, Path(root))


def auto_precision(device: str) -> str:
    """bf16 where ``device`` computes it natively (never emulated), else fp32."""
    from efficientad.device import check_precision, resolve_device
    from efficientad.errors import EfficientADError

    try:
        check_precision("bf16", resolve_device(device))
    except EfficientADError:
        return "fp32"
    return "bf16"


# ------------------------------------------------------------------------------------------ one run
def held_out(split, config):
    """Training and held-out images as uint8 tensors, held out as ``EfficientAD.fit`` does.

    The layout's validation images where it has them, else the seeded ``validation_fraction`` of the
    training images.
    """
    import torch

    from efficientad.data.images import load_images, split_validation

    train = load_images(split.train, config.image_size)
    if split.validation is not None:
        return train, load_images(split.validation, config.image_size)
    kept, validation = split_validation(list(train), config.validation_fraction, config.seed)
    return torch.stack(kept), torch.stack(validation)


def score_snapshot(model, validation, split, config) -> dict[str, Any]:
    """Calibrate a copy of the training model as the end of training does, and score the test set with it."""
    import torch

    from efficientad.deploy.inferencer import Inferencer
    from efficientad.evaluation.evaluate import evaluate
    from efficientad.training.calibrate import calibrate

    device = model.teacher_mean.device
    # Training draws dropout from torch's global generator: scoring must leave it where it was.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        # As train_networks leaves a finished model: contiguous, in eval mode.
        snapshot = copy.deepcopy(model).to(memory_format=torch.contiguous_format).eval()
        calibration = calibrate(snapshot, validation, config)
        metadata = {"inference_precision": config.precision, "threshold": calibration["threshold"]}
        metrics = evaluate(Inferencer.from_model(snapshot, metadata, device=device), split, progress=False)
    return {"image_auroc": metrics["image_auroc"], "au_pro": metrics["au_pro"], "threshold": calibration["threshold"]}


def train_with_snapshots(
    model,
    train,
    validation,
    config,
    penalty,
    checkpoints: Sequence[int],
    score: Callable[[Any], dict[str, Any]],
    progress: bool = False,
    checkpoint=None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train as ``efficientad train`` does, calling ``score(model)`` after each of ``checkpoints`` steps.

    Returns train_networks' history and one point per checkpoint: ``step``, ``seconds`` (training so
    far, without scoring), ``eval_seconds``, ``lr_dropped`` and what ``score`` returned. The model
    trains as it would without the snapshots (tested bit for bit).

    ``checkpoint`` (training's :class:`~efficientad.training.checkpoint.Checkpointing`) saves the run
    with the points so far, and continues the one in ``checkpoint.resume`` with its points.
    """
    from efficientad.training.train import train_networks

    wanted = set(checkpoints)
    resume = None if checkpoint is None else checkpoint.resume
    points: list[dict[str, Any]] = [] if resume is None else list(resume["benchmark_points"])
    # Training's seconds include the scoring done in on_step; the points' exclude it, resumed or not.
    seconds_before = 0.0 if resume is None else resume["seconds"] - sum(point["eval_seconds"] for point in points)
    if checkpoint is not None:
        checkpoint.identity["benchmark_points"] = points  # the same list: each checkpoint holds the points made by then
    scoring = 0.0  # seconds spent in score so far in this session

    def on_step(step: int, _losses: dict[str, float]) -> None:
        nonlocal scoring
        done = step + 1  # on_step gets the 0-based index of the step just taken
        if done not in wanted:
            return
        tic = time.perf_counter()
        seconds = seconds_before + tic - started - scoring
        point = {"step": done, "seconds": seconds, **score(model)}
        point["eval_seconds"] = time.perf_counter() - tic
        scoring += point["eval_seconds"]
        points.append(point)
        if progress:
            print(f"  step {done:,}: {seconds:.0f} s, image AUROC {_number(point['image_auroc'])}, AU-PRO {_number(point['au_pro'])}",
                  file=sys.stderr)

    started = time.perf_counter()
    history = train_networks(model, train, config, penalty, progress, on_step, validation_images=validation, checkpoint=checkpoint)
    for point in points:
        point["lr_dropped"] = point["step"] > history["lr_drop_step"]
    return history, points


def run_curve(
    category: str,
    split,
    schedule: Schedule,
    seed: int,
    setup: Setup,
    teacher,
    penalty,
    progress: bool,
    checkpoint_path: Path | None = None,
    checkpoint_every: float = 0.0,
    resume: bool = False,
) -> dict[str, Any]:
    """One training run of ``schedule`` on ``split``'s category, scored at its checkpoints: one run of the JSON.

    With ``checkpoint_path`` the run saves itself there every ``checkpoint_every`` seconds and, with
    ``resume``, continues from the checkpoint it finds there; the file is removed when the run ends.
    """
    import torch

    from efficientad.errors import EfficientADError
    from efficientad.model import EfficientADModel
    from efficientad.training.checkpoint import Checkpointing, check_same_config, read_checkpoint

    config = schedule.config(setup, seed)
    checkpoint = None
    if checkpoint_path is not None:
        this_run = {"category": category, "schedule": schedule.record(), "seed": seed, "setup": asdict(setup)}
        saved = read_checkpoint(checkpoint_path) if resume and checkpoint_path.is_file() else None
        if saved is not None:
            if saved.get("benchmark_run") != this_run:
                raise EfficientADError(f"{checkpoint_path} holds another run ({saved.get('benchmark_run')}): remove it")
            check_same_config(saved, config.as_dict(), checkpoint_path)
            if progress:
                print(f"  resuming from step {saved['step']:,} ({checkpoint_path})", file=sys.stderr)
        checkpoint = Checkpointing(checkpoint_path, checkpoint_every, {"benchmark_run": this_run, "config": config.as_dict()}, saved)
    train, validation = held_out(split, config)
    torch.manual_seed(seed)  # the networks' initialisation, seeded as EfficientAD.fit seeds it
    model = EfficientADModel(config.model_size, config.image_size)
    model.teacher.load_state_dict(teacher.network.state_dict())
    model.to(setup.device)
    history, points = train_with_snapshots(
        model, train, validation, config, penalty, schedule.checkpoints,
        lambda snapshot: score_snapshot(snapshot, validation, split, config), progress, checkpoint,
    )  # fmt: skip
    if checkpoint_path is not None:
        checkpoint_path.unlink(missing_ok=True)
    return {
        "category": category,
        "format": split.format,
        "schedule": schedule.record(),
        "seed": seed,
        "config": config.as_dict(),
        "teacher_source": teacher.source,
        "n_train_images": len(train),
        "n_validation_images": len(validation),
        "n_test_images": len(split.test),
        "points": points,
        "training": history,
    }


# -------------------------------------------------------------------------------- the measurement
def machine(system: dict[str, Any]) -> dict[str, Any]:
    """What wall-clock depends on: a resumed measurement must run where the first one did."""
    return {key: system.get(key) for key in ("cpu", "cpu_flags", "threads", "gpu")}


def resumed_runs(path: Path, setup: Setup, system: dict[str, Any], schedules: Sequence[Schedule]) -> list[dict[str, Any]]:
    """The runs of the JSON at ``path``, after checking that they were measured as these would be."""
    from efficientad.errors import EfficientADError

    stored = json.loads(path.read_text())
    if stored["settings"]["setup"] != asdict(setup):
        raise EfficientADError(f"--resume: {path} was measured with {stored['settings']['setup']}, not {asdict(setup)}")
    if machine(stored["system"]) != machine(system):
        raise EfficientADError(f"--resume: {path} was measured on {machine(stored['system'])}, this is {machine(system)}")
    current = {schedule.name: schedule.record() for schedule in schedules}
    for run in stored["runs"]:
        name = run["schedule"]["name"]
        if name in current and run["schedule"] != current[name]:
            raise EfficientADError(f"--resume: schedule {name!r} in {path} is {run['schedule']}, now {current[name]}: give it another name")
    return stored["runs"]


def checkpoint_folder(json_path: Path) -> Path:
    """Where the runs in progress of the measurement written to ``json_path`` keep their checkpoints."""
    return json_path.with_name(f"{json_path.stem}.checkpoints")


def load_splits(categories: dict[str, Dataset]) -> tuple[dict[str, Any], dict[str, str]]:
    """Each category's files, and why those that cannot be found are skipped."""
    from efficientad.data.datasets import load_split
    from efficientad.errors import EfficientADError

    splits, skipped = {}, {}
    for category, dataset in categories.items():
        try:
            splits[category] = load_split(dataset.format, dataset.root, category)
        except EfficientADError as error:
            skipped[category] = str(error)
    return splits, skipped


def measure(
    categories: dict[str, Dataset],
    seeds: Sequence[int],
    schedules: Sequence[Schedule],
    setup: Setup,
    json_path: Path,
    resume: bool = False,
    progress: bool = True,
    checkpoint_every: float = 600.0,
) -> dict[str, Any]:
    """Run each (category, seed, schedule) not yet in ``json_path``, rewriting it after each run; returns its record.

    Runs in progress save themselves every ``checkpoint_every`` seconds (0: never) to
    :func:`checkpoint_folder`; with ``resume`` a run continues from its checkpoint there.
    """
    import warnings

    from efficientad.config import TrainConfig, default
    from efficientad.deploy.speed import system_info
    from efficientad.device import check_precision, resolve_device
    from efficientad.files import write_run_record
    from efficientad.training.penalty import PenaltyImages
    from efficientad.training.teacher import resolve_teacher

    check_precision(setup.precision, resolve_device(setup.device))  # refused before hours of emulated bf16, not after
    system = system_info(setup.device)
    runs = resumed_runs(json_path, setup, system, schedules) if resume and json_path.exists() else []
    splits, skipped = load_splits(categories)
    record = {
        "benchmark": "learning_curves",
        "notes": [BEFORE_DROP_NOTE, SECONDS_NOTE],
        "settings": {
            "setup": asdict(setup),
            "categories": {name: {"format": data.format, "root": str(data.root)} for name, data in categories.items()},
            "seeds": list(seeds),
            "schedules": [schedule.record() for schedule in schedules],
        },
        "system": system,
        "runs": runs,
        "skipped": skipped,
    }
    done = {(run["category"], run["schedule"]["name"], run["seed"]) for run in runs}
    # Shortest runs first: a stopped measurement then holds the most runs, the paper's long one last.
    pending = [(c, seed, s) for c in splits for seed in seeds for s in sorted(schedules, key=lambda s: s.steps) if (c, s.name, seed) not in done]
    teacher = penalty = None
    if pending:
        # Read once for all runs; a random teacher is for tests only, and the setup says so.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore" if setup.teacher == "random" else "default")
            teacher = resolve_teacher(setup.teacher, default(TrainConfig, "model_size"), progress)
        image_size = default(TrainConfig, "image_size")
        penalty = None if setup.penalty_images is None else PenaltyImages(setup.penalty_images, image_size, progress)
    for category, seed, schedule in pending:
        if progress:
            print(f"{category}, schedule {schedule.name} ({schedule.steps:,} steps), seed {seed}:", file=sys.stderr)
        checkpoint = checkpoint_folder(json_path) / f"{category}-{schedule.name}-seed{seed}.pt" if checkpoint_every else None
        if checkpoint is not None:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
        record["runs"].append(run_curve(category, splits[category], schedule, seed, setup, teacher, penalty, progress, checkpoint, checkpoint_every, resume))
        write_run_record(json_path, record)
    write_run_record(json_path, record)
    return record


# ---------------------------------------------------------------------------------------- report
class Summary(NamedTuple):
    """One (category, schedule, step) over its seeds: means, and spreads as (min, max)."""

    category: str
    schedule: str
    step: int
    seeds: int
    seconds: float
    auroc: tuple[float, float, float] | None  # mean, min, max
    au_pro: tuple[float, float, float] | None


def _spread(values: Sequence[float | None]) -> tuple[float, float, float] | None:
    present = [value for value in values if value is not None]
    return (statistics.mean(present), min(present), max(present)) if present else None


def _schedule_order(name: str) -> tuple[bool, str]:
    return name != PAPER, name  # the paper's first


def summarize(runs: Sequence[dict[str, Any]]) -> list[Summary]:
    """Mean and spread over seeds of every checkpoint, by category, schedule (the paper's first) and step."""
    groups: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
    for run in runs:
        for point in run["points"]:
            groups.setdefault((run["category"], run["schedule"]["name"], point["step"]), []).append(point)
    ordered = sorted(groups, key=lambda key: (key[0], _schedule_order(key[1]), key[2]))
    return [
        Summary(
            *key, len(groups[key]), statistics.mean(p["seconds"] for p in groups[key]),
            _spread([p["image_auroc"] for p in groups[key]]), _spread([p["au_pro"] for p in groups[key]]),
        )  # fmt: skip
        for key in ordered
    ]


def time_to_paper(summaries: Sequence[Summary]) -> list[dict[str, Any]]:
    """Per category and candidate schedule: when its mean AUROC first reaches the paper schedule's final mean AUROC.

    The issue's target: in a quarter of the paper's time or less.
    """
    rows = []
    for category in sorted({s.category for s in summaries}):
        curves: dict[str, list[Summary]] = {}
        for summary in summaries:
            if summary.category == category and summary.auroc is not None:
                curves.setdefault(summary.schedule, []).append(summary)
        if PAPER not in curves:
            continue
        target = curves[PAPER][-1]
        for name, curve in curves.items():
            if name == PAPER:
                continue
            reached = next((s for s in curve if s.auroc[0] >= target.auroc[0]), None)
            best = max(curve, key=lambda s: s.auroc[0])
            rows.append({"category": category, "schedule": name, "target": target, "reached": reached, "best": best})
    return rows


def _number(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mean_spread(values: tuple[float, float, float] | None) -> str:
    return "-" if values is None else f"{values[0]:.3f} | {values[2] - values[1]:.3f}"


def report_markdown(record: dict[str, Any]) -> str:
    """The report: settings, the mean over seeds, time to the paper's AUROC, and every point."""
    setup, system = record["settings"]["setup"], record["system"]
    summaries = summarize(record["runs"])
    lines = [
        "# Learning curves: image AUROC and AU-PRO against steps and training time",
        "",
        f"`{' '.join(record.get('command', []))}` (benchmarks/learning_curves.py), finished {record.get('finished_at', '?')}.",
        f"Machine: {system['cpu']} (flags: {', '.join(system['cpu_flags']) or 'none listed'}), {system['threads']} threads"
        + (f", GPU {system['gpu']}" if system.get("gpu") else "") + f"; device {setup['device']}.",
        f"Precision {setup['precision']}{' + channels-last' if setup['channels_last'] else ''}; teacher `{setup['teacher']}`; "
        f"penalty images `{setup['penalty_images']}`.",
        "",
        *(f"- {note}" for note in record["notes"]),
        "- Spread: max - min over the seeds.",
        "",
        "Schedules: " + "; ".join(
            f"**{s['name']}** batch {s['batch_size']}, learning rate x{s['lr_scale']:g}, {s['steps']:,} steps, checkpoints {s['checkpoints']}"
            for s in {run["schedule"]["name"]: run["schedule"] for run in record["runs"]}.values()
        ) + ".",
        "",
        "## Mean over seeds",
        "",
        "| category | schedule | step | seeds | seconds | image AUROC | spread | AU-PRO | spread |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        *(
            f"| {s.category} | {s.schedule} | {s.step:,} | {s.seeds} | {s.seconds:.0f} | {_mean_spread(s.auroc)} | {_mean_spread(s.au_pro)} |"
            for s in summaries
        ),
    ]
    targets = time_to_paper(summaries)
    if targets:
        lines += [
            "",
            "## Time to the paper schedule's final image AUROC (mean over seeds)",
            "",
            "| category | schedule | paper: step, seconds, AUROC | first checkpoint at or above it | its seconds / paper's |",
            "|---|---|---|---|---:|",
        ]
        for row in targets:
            target, reached, best = row["target"], row["reached"], row["best"]
            paper = f"{target.step:,}, {target.seconds:.0f} s, {target.auroc[0]:.3f}"
            if reached is None:
                found = f"not reached (best {best.auroc[0]:.3f} at step {best.step:,}, {best.seconds:.0f} s)"
                ratio = "-"
            else:
                found = f"step {reached.step:,}, {reached.seconds:.0f} s, {reached.auroc[0]:.3f}"
                ratio = f"{reached.seconds / target.seconds:.2f}"
            lines.append(f"| {row['category']} | {row['schedule']} | {paper} | {found} | {ratio} |")
    lines += [
        "",
        "## Every run",
        "",
        "| category | schedule | seed | step | seconds | image AUROC | AU-PRO | lr x0.1 done | scoring seconds |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for run in sorted(record["runs"], key=lambda r: (r["category"], _schedule_order(r["schedule"]["name"]), r["seed"])):
        for p in run["points"]:
            lines.append(
                f"| {run['category']} | {run['schedule']['name']} | {run['seed']} | {p['step']:,} | {p['seconds']:.0f} | "
                f"{_number(p['image_auroc'])} | {_number(p['au_pro'])} | {'yes' if p['lr_dropped'] else 'no'} | {p['eval_seconds']:.0f} |"
            )
    if record["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{name}: {why}" for name, why in record["skipped"].items()) + "."]
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> Path:
    """Mean image AUROC over seeds (band: min to max) against steps and against training seconds, one line per category/schedule."""
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no display

    from efficientad.files import atomic_write

    curves: dict[tuple[str, str], list[Summary]] = {}
    for summary in summarize(record["runs"]):
        if summary.auroc is not None:
            curves.setdefault((summary.category, summary.schedule), []).append(summary)
    figure = Figure(figsize=(11, 4.5))
    by_steps, by_seconds = figure.subplots(1, 2, sharey=True)
    for (category, schedule), curve in curves.items():
        mean, low, high = zip(*(s.auroc for s in curve))
        for axes, x in ((by_steps, [s.step for s in curve]), (by_seconds, [s.seconds for s in curve])):
            line, = axes.plot(x, mean, marker="o", label=f"{category} / {schedule}")
            axes.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    for axes, label in ((by_steps, "training steps"), (by_seconds, "training seconds (without scoring)")):
        axes.set_xscale("log")
        axes.set_xlabel(label)
        axes.grid(alpha=0.3)
    by_steps.set_ylabel("image AUROC (mean over seeds; band: min to max)")
    by_steps.legend(fontsize=8)
    figure.suptitle("Learning curves (points before a run's last are before its learning-rate drop)", fontsize=10)
    figure.tight_layout()
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))


def write_report(record: dict[str, Any], json_path: Path) -> tuple[Path, Path]:
    """NAME.md and NAME.png beside ``json_path``."""
    from efficientad.files import atomic_write_text

    markdown = atomic_write_text(json_path.with_suffix(".md"), report_markdown(record))
    return markdown, plot(record, json_path.with_suffix(".png"))


# ------------------------------------------------------------------------------------------ command
def main(argv: list[str] | None = None) -> int:
    from efficientad.choices import PRECISIONS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--category", action="append", type=parse_category, metavar="NAME|NAME=FORMAT:ROOT",
        help="a category to measure, repeatable: bottle or fryum (../shared), or any other as NAME=FORMAT:ROOT "
        "(FORMAT: mvtec, visa, loco, folder) (default: bottle and fryum)",
    )  # fmt: skip
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="one run per seed (default: 0 1)")
    parser.add_argument(
        "--checkpoints", type=parse_checkpoints, default=DEFAULT_CHECKPOINTS, metavar="S1,S2,...",
        help="steps at which the paper's schedule is scored; it trains to the last "
        f"(default: {','.join(map(str, DEFAULT_CHECKPOINTS))}); e.g. 2,4 for a trial",
    )  # fmt: skip
    parser.add_argument(
        "--schedule-variant", action="append", default=[], metavar="NAME=BATCH:LR_SCALE:STEPS[:C1,C2,...]",
        help="also measure this schedule (repeatable): BATCH images per step, the learning rate x LR_SCALE, STEPS steps; "
        "scored at C1,C2,... or --checkpoints scaled to STEPS",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("auto", *PRECISIONS), default="auto",
        help="auto: bf16 + channels-last where the device has native bf16, else fp32 (default: auto)",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--teacher", default=str(SHARED / "weights" / "teacher_small_r18.pth"), help="teacher file (default: ../shared's)")
    parser.add_argument("--penalty-images", default=str(SHARED / "data" / "imagenet_samples"), help="penalty image folder (default: ../shared's)")
    parser.add_argument("--no-penalty", action="store_true", help="train without penalty images")
    parser.add_argument(
        "--json", type=Path, default=REPO / "benchmarks" / "results" / "learning_curves.json",
        help="the result, rewritten after each run; the report goes beside it as .md and .png "
        "(default: benchmarks/results/learning_curves.json)",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action="store_true",
        help="keep the runs already in --json, continue a stopped run from its checkpoint, and run the missing ones",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-every", type=float, default=10.0, metavar="MINUTES",
        help="a run in progress saves itself this often to NAME.checkpoints/ beside --json; 0: never (default: 10)",
    )  # fmt: skip
    parser.add_argument("--report", action="store_true", help="train nothing: write the report from --json")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or per-checkpoint lines")
    args = parser.parse_args(argv)

    from efficientad.errors import EfficientADError

    try:
        if args.report:
            record = json.loads(args.json.read_text())
        else:
            schedules = [Schedule(PAPER, 1, 1.0, args.checkpoints)]
            for text in args.schedule_variant:
                schedules.append(parse_variant(text, args.checkpoints))
            if len({schedule.name for schedule in schedules}) < len(schedules):
                parser.error("schedule variants need distinct names")
            precision = auto_precision(args.device) if args.precision == "auto" else args.precision
            setup = Setup(args.teacher, None if args.no_penalty else args.penalty_images, precision, precision == "bf16", args.device)
            categories = dict(args.category or KNOWN_DATASETS.items())
            record = measure(categories, args.seeds, schedules, setup, args.json, args.resume, not args.quiet, 60.0 * args.checkpoint_every)
    except argparse.ArgumentTypeError as error:
        parser.error(str(error))
    except (EfficientADError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    markdown, picture = write_report(record, args.json)
    print(f"wrote {args.json}, {markdown} and {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
