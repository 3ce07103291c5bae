"""Side by side with anomalib 2.7's EfficientAd (issue 14): image AUROC on MVTec AD bottle over seeds.

    python benchmarks/anomalib_side_by_side.py                    # 300 and 1,000 steps, seeds 0 1 2, both tools
    python benchmarks/anomalib_side_by_side.py --resume           # run only the runs the JSON lacks
    python benchmarks/anomalib_side_by_side.py --steps 3 --seeds 0 --json /tmp/smoke.json   # a smoke run

Both train EfficientAD-S in fp32 on the CPU with the same teacher (``../shared/weights/
teacher_small_r18.pth``, loaded into anomalib's ``conv1..conv4``), the same penalty images
(``../shared/data/imagenet_samples``, which anomalib reads as an ImageFolder of one class), the same
number of steps and the same held-out images: ours holds out a seeded 10% of the training images
(:func:`learning_curves.held_out`, as ``EfficientAD.fit`` does) and anomalib gets exactly those as
its validation set (they depend on the seed), on which it measures its map quantiles, and trains
on the rest. Each tool then scores bottle's 83 test images; the image AUROC is computed from the raw
scores by scikit-learn for both.

anomalib is driven by its own code: its ``EfficientAd`` LightningModule builds the networks, the
ImageNet loader (``prepare_imagenette_data``), the teacher statistics
(``teacher_channel_mean_std``) and the map quantiles (``map_norm_quantiles``); a step is its
``EfficientAdModel``'s three losses, summed, one Adam step with its learning rate and weight decay,
as its ``training_step`` and Lightning's automatic optimisation take it. Its ``StepLR`` (x0.1 after
95% of the steps) is stepped as Lightning steps a scheduler configured without an interval: once
per epoch, i.e. per pass over the training images. At 300 or 1,000 steps (1.6 or 5.3 epochs of 188
images) its learning rate therefore never drops, where ours drops at 95% of the steps as the paper
does; the JSON records both learning rates at the end. Lightning itself (its Trainer, logging and
callbacks) is not run: it does not change what is computed, and it would need anomalib's dataset
classes and downloads.

Seeds: one seed sets each tool's initialisation, data order, augmentations and penalty-image order
(ours through its config; anomalib through ``torch.manual_seed``, ``random`` and ``numpy``, as
Lightning's ``seed_everything`` does). The two tools draw their random numbers differently, so the
same seed is not the same run: only the distributions over seeds compare. The report gives each
tool's mean, spread (max - min) and standard deviation per step count, and Welch's t-test of the
difference of means.

The JSON is rewritten after every run; ``--resume`` keeps the runs of the same settings already in
it. ``--ours-runs DIR...`` takes our side from finished ``efficientad train`` runs instead of
training again (on a 2-core CPU without native bf16 a 1,000-step run is 50 minutes): each must have
been trained exactly as this script trains (bottle in the MVTec layout, this teacher and these
penalty images, fp32, no time budget or early stop, every other setting at its default); anything
else is refused by name. Its model is scored on the test set here; its training seconds are the
run's own (``total_seconds``: image loading, teacher statistics, steps and calibration). Relative
paths in a run's ``train.json`` are taken from the repository root, where the README's commands run.

anomalib must be importable (``pip install anomalib==2.7.0``, in a virtual environment with
``--system-site-packages`` so that it uses this project's torch); without it only ours run and the
report says so.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
TOOLS = ("efficientad", "anomalib")


def anomalib_teacher_state(path: Path) -> dict[str, Any]:
    """The shared teacher (reference layout: ``nn.Sequential`` convolutions 0, 3, 6, 8) under anomalib's ``conv1..conv4``."""
    import torch

    state = torch.load(path, map_location="cpu", weights_only=True)
    indices = sorted({int(key.split(".")[0]) for key in state})
    if len(indices) != 4:
        raise SystemExit(f"{path}: expected the four convolutions of a PDN-small teacher, found layers {indices}")
    return {f"conv{indices.index(int(key.split('.')[0])) + 1}.{key.split('.', 1)[1]}": value for key, value in state.items()}


class Batch(NamedTuple):
    """What anomalib's statistics methods read of a batch: the images and their labels (0: good)."""

    image: Any
    gt_label: Any


def good_batches(images) -> list[Batch]:
    """Float images (N, 3, H, W) as anomalib's statistics methods iterate them: batches of one good image."""
    import torch

    return [Batch(images[i : i + 1], torch.zeros(1)) for i in range(len(images))]


def train_anomalib(train, validation, test_images, teacher: Path, penalty_dir: Path, steps: int, seed: int) -> dict[str, Any]:
    """anomalib 2.7's EfficientAd trained ``steps`` steps on uint8 ``train``; its raw test scores and timings."""
    import torch
    from anomalib.models import EfficientAd

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as folder:
        imagenet = Path(folder) / "imagenet"
        imagenet.mkdir()
        (imagenet / "samples").symlink_to(penalty_dir.resolve(), target_is_directory=True)  # ImageFolder wants a class folder
        module = EfficientAd(imagenet_dir=imagenet, teacher_out_channels=384, model_size="small")
        module.model.teacher.load_state_dict(anomalib_teacher_state(teacher))
        size = tuple(train.shape[-2:])
        module.prepare_imagenette_data(size)
        started = time.perf_counter()
        images = train.float() / 255
        module.model.mean_std.update(module.teacher_channel_mean_std(good_batches(images)))
        optimizer = torch.optim.Adam(list(module.model.student.parameters()) + list(module.model.ae.parameters()), lr=module.lr, weight_decay=module.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=int(0.95 * steps), gamma=0.1)
        module.model.train()
        step = 0
        while step < steps:
            for index in torch.randperm(len(images)).tolist():
                if step == steps:
                    break
                try:
                    penalty = next(module.imagenet_iterator)[0]
                except StopIteration:
                    module.imagenet_iterator = iter(module.imagenet_loader)
                    penalty = next(module.imagenet_iterator)[0]
                loss_st, loss_ae, loss_stae = module.model(batch=images[index : index + 1], batch_imagenet=penalty)
                optimizer.zero_grad()
                (loss_st + loss_ae + loss_stae).backward()
                optimizer.step()
                step += 1
            else:
                scheduler.step()  # Lightning's default interval for a scheduler: the end of each epoch
        train_seconds = time.perf_counter() - started
        module.model.eval()
        with torch.no_grad():
            module.model.quantiles.update(module.map_norm_quantiles(good_batches(validation.float() / 255)))
            scores = [float(module.model(torch.from_numpy(image[None])).pred_score.reshape(-1)[0]) for image in test_images]
    return {"scores": scores, "train_seconds": train_seconds, "final_learning_rate": optimizer.param_groups[0]["lr"]}


def train_ours(split, teacher: Path, penalty_dir: Path, steps: int, seed: int) -> dict[str, Any]:
    """This project's EfficientAD-S, trained as ``efficientad train`` trains it; its raw test scores and timings."""
    from efficientad.detector import EfficientAD

    detector = EfficientAD(teacher=str(teacher), penalty_images=str(penalty_dir), steps=steps, seed=seed, precision="fp32", progress=False)
    started = time.perf_counter()
    detector.fit(split.train, split.validation)
    return tested_ours(detector, split, time.perf_counter() - started)


def tested_ours(detector, split, train_seconds: float) -> dict[str, Any]:
    """A trained or loaded model of ours: its raw test scores, training seconds and learning rate at the end."""
    scores = [prediction.score for prediction in detector.predict([sample.path for sample in split.test])]
    dropped = detector.metadata_["training"]["lr_drop_step"] < detector.config.steps
    return {"scores": scores, "train_seconds": train_seconds, "final_learning_rate": detector.config.learning_rate * (0.1 if dropped else 1.0)}


def with_auroc(tool: str, steps: int, seed: int, labels, outcome: dict[str, Any]) -> dict[str, Any]:
    """One run's record: its image AUROC from the raw scores (scikit-learn, for both tools) and its outcome."""
    from sklearn.metrics import roc_auc_score

    return {"tool": tool, "steps": steps, "seed": seed, "image_auroc": float(roc_auc_score(labels, outcome["scores"])), **outcome}


# What does not change the trained weights, or is compared by resolved path below.
_NOT_COMPARED = ("teacher", "penalty_images", "checkpoint_every")


def resolved(path: str | None) -> Path | None:
    """A path from a run's train.json: relative ones from the repository root."""
    return None if path is None else (REPO / path).resolve()


def reused_run(folder: Path, args, split) -> dict[str, Any]:
    """Our side from a finished ``efficientad train`` run in ``folder``, if it was trained as :func:`train_ours` trains."""
    from efficientad.config import TrainConfig
    from efficientad.detector import EfficientAD

    record_path = folder / "train.json"
    if not record_path.is_file():
        raise SystemExit(f"--ours-runs: {record_path} not found (not a finished `efficientad train` run)")
    record = json.loads(record_path.read_text())
    config, data = record["config"], record["data"]
    expected = TrainConfig(teacher=str(args.teacher), penalty_images=str(args.penalty_images), steps=config["steps"],
                           seed=config["seed"], precision="fp32").as_dict()  # fmt: skip
    differences = [f"{name} {config.get(name)!r} (here {value!r})" for name, value in expected.items() if name not in _NOT_COMPARED and config.get(name) != value]
    if resolved(record["teacher_source"]) != args.teacher.resolve():
        differences.append(f"teacher {record['teacher_source']} (here {args.teacher})")
    if resolved(config["penalty_images"]) != args.penalty_images.resolve():
        differences.append(f"penalty images {config['penalty_images']} (here {args.penalty_images})")
    if (data["format"], data["category"], resolved(data["root"])) != ("mvtec", "bottle", args.data.resolve()):
        differences.append(f"data {data['root']}/{data['category']} as {data['format']} (here {args.data}/bottle as mvtec)")
    training = record["training"]
    if training["steps_done"] != config["steps"]:
        differences.append(f"{training['steps_done']} of {config['steps']} steps done")
    if differences:
        raise SystemExit(f"--ours-runs: {folder} was not trained as this script trains: " + "; ".join(differences))
    outcome = tested_ours(EfficientAD.load(folder / Path(record["model_file"]).name), split, training["total_seconds"])
    return with_auroc("efficientad", config["steps"], config["seed"], split.labels, {**outcome, "reused_run": str(folder)})


def run(tool: str, steps: int, seed: int, args, split, test_images) -> dict[str, Any]:
    from efficientad.config import TrainConfig
    from learning_curves import held_out

    if tool == "anomalib":
        # The images ours holds out with this seed (EfficientAD.fit's rule), and trains on the rest.
        train, validation = held_out(split, TrainConfig(seed=seed))
        outcome = train_anomalib(train, validation, test_images, args.teacher, args.penalty_images, steps, seed)
    else:
        outcome = train_ours(split, args.teacher, args.penalty_images, steps, seed)
    return with_auroc(tool, steps, seed, split.labels, outcome)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per step count: each tool's mean, spread and standard deviation over seeds, and Welch's t-test of the difference."""
    from scipy.stats import ttest_ind

    rows = []
    for steps in sorted({r["steps"] for r in runs}):
        by_tool = {tool: [r["image_auroc"] for r in runs if r["steps"] == steps and r["tool"] == tool] for tool in TOOLS}
        row: dict[str, Any] = {"steps": steps}
        for tool, values in by_tool.items():
            if values:
                row[tool] = {
                    "seeds": len(values), "mean": statistics.fmean(values), "spread": max(values) - min(values),
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                }  # fmt: skip
        if all(len(values) > 1 for values in by_tool.values()):
            test = ttest_ind(by_tool["efficientad"], by_tool["anomalib"], equal_var=False)
            row["welch_p"] = float(test.pvalue)
            row["difference"] = row["efficientad"]["mean"] - row["anomalib"]["mean"]
        rows.append(row)
    return rows


def report(record: dict[str, Any]) -> str:
    lines = [
        "# EfficientAD-S side by side with anomalib 2.7's EfficientAd: MVTec AD bottle, image AUROC",
        "",
        f"`{' '.join(record['command'])}` (benchmarks/anomalib_side_by_side.py). CPU: {record['system']['cpu']}, "
        f"flags {', '.join(record['system']['cpu_flags'])}; fp32, {record['system']['threads']} threads.",
        "",
        "| steps | ours: mean (spread, std) | anomalib: mean (spread, std) | ours - anomalib | Welch p |",
        "|---:|---|---|---:|---:|",
    ]

    def cell(summary):
        if summary is None:
            return "-"
        std = "-" if summary["std"] is None else f"{summary['std']:.3f}"
        return f"{summary['mean']:.3f} ({summary['spread']:.3f}, {std}; {summary['seeds']} seeds)"

    for row in record["summary"]:
        difference = f"{row['difference']:+.3f}" if "difference" in row else "-"
        p = f"{row['welch_p']:.3f}" if "welch_p" in row else "-"
        lines.append(f"| {row['steps']:,} | {cell(row.get('efficientad'))} | {cell(row.get('anomalib'))} | {difference} | {p} |")
    lines += ["", "| tool | steps | seed | image AUROC | training s | learning rate at the end |", "|---|---:|---:|---:|---:|---:|"]
    for r in record["runs"]:
        origin = f" (`efficientad train` run {Path(r['reused_run']).name})" if "reused_run" in r else ""
        lines.append(f"| {r['tool']}{origin} | {r['steps']:,} | {r['seed']} | {r['image_auroc']:.4f} | {r['train_seconds']:.0f} | {r['final_learning_rate']:.1e} |")
    if record.get("anomalib"):
        lines += ["", record["anomalib"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", nargs="+", type=int, default=[300, 1000], help="step counts (default: 300 1000)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="one run per tool, step count and seed (default: 0 1 2)")
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "mvtec_ad", help="MVTec AD root holding bottle/")
    parser.add_argument("--teacher", type=Path, default=SHARED / "weights" / "teacher_small_r18.pth")
    parser.add_argument("--penalty-images", type=Path, default=SHARED / "data" / "imagenet_samples")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help="keep the runs of these settings already in --json")
    parser.add_argument(
        "--ours-runs", nargs="+", type=Path, default=[], metavar="DIR",
        help="finished `efficientad train` runs, trained as this script trains, to use as our side instead of training again",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "anomalib_side_by_side.json")
    args = parser.parse_args(argv)
    for path in (args.data / "bottle", args.teacher, args.penalty_images):
        if not path.exists():
            parser.error(f"{path} not found (the defaults are ../shared's)")

    import torch

    from efficientad.config import TrainConfig
    from efficientad.data.datasets import load_split
    from efficientad.data.images import load_images
    from efficientad.deploy.speed import system_info
    from efficientad.files import atomic_write_text, write_run_record
    torch.set_num_threads(args.threads)
    tools = list(TOOLS)
    note = None
    try:
        import anomalib  # noqa: F401
    except ImportError as error:
        tools.remove("anomalib")
        note = f"anomalib is not importable here ({error}): only this project's runs."
    split = load_split("mvtec", args.data, "bottle")
    test_images = (load_images([s.path for s in split.test], TrainConfig().image_size).float() / 255).numpy()
    settings = {"data": str(args.data / "bottle"), "teacher": str(args.teacher), "penalty_images": str(args.penalty_images), "threads": args.threads}
    runs: list[dict[str, Any]] = []
    if args.resume and args.json.is_file():
        previous = json.loads(args.json.read_text())
        if previous.get("settings") == settings:
            runs = previous["runs"]
    record = {"benchmark": "anomalib_side_by_side", "command": [Path(sys.argv[0]).name, *(argv or sys.argv[1:])],
              "settings": settings, "system": system_info(threads=args.threads), "anomalib": note}  # fmt: skip
    for folder in args.ours_runs:
        reused = reused_run(folder, args, split)
        if reused["steps"] not in args.steps or reused["seed"] not in args.seeds:
            parser.error(f"{folder} trained {reused['steps']:,} steps with seed {reused['seed']}: not among --steps and --seeds")
        runs = [r for r in runs if (r["tool"], r["steps"], r["seed"]) != ("efficientad", reused["steps"], reused["seed"])]
        runs.append(reused)
        print(f"efficientad: {reused['steps']:,} steps, seed {reused['seed']}, from {folder}: image AUROC {reused['image_auroc']:.4f}", file=sys.stderr)
    done = {(r["tool"], r["steps"], r["seed"]) for r in runs}
    # The shortest runs first, the tools alternating, so that a stopped measurement has whole pairs.
    for steps in sorted(args.steps):
        for seed in args.seeds:
            for tool in tools:
                if (tool, steps, seed) in done:
                    continue
                print(f"{tool}: {steps:,} steps, seed {seed}", file=sys.stderr, flush=True)
                runs.append(run(tool, steps, seed, args, split, test_images))
                print(f"  image AUROC {runs[-1]['image_auroc']:.4f}, {runs[-1]['train_seconds']:.0f} s", file=sys.stderr, flush=True)
                write_run_record(args.json, {**record, "runs": runs, "summary": summarize(runs)})
    write_run_record(args.json, {**record, "runs": runs, "summary": summarize(runs)})
    atomic_write_text(args.json.with_suffix(".md"), report(json.loads(args.json.read_text())))
    print(f"wrote {args.json} and {args.json.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
