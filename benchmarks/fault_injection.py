"""Kill `efficientad train` and `efficientad predict` with SIGKILL at random moments; check what is left.

    python benchmarks/fault_injection.py [--rounds 20] [--seed 0] [--json benchmarks/results/fault_injection.json]

Both commands write into one output folder, round after round: tiny real runs (a synthetic set of
256x256 images, 2 training steps with a random teacher; 8 images predicted one per batch). Each round
starts one of them and kills it with SIGKILL, in half the rounds at a random time within the run's
length, in the other half up to 0.1 s after its n-th temporary file appears (n random), so that
many kills land inside writes or between them. After every kill the folder must hold:

- no empty file (the temporary files of atomic writes aside: the next run removes them);
- a model.pt whose tensors match its SHA-256, and a train.json only beside the model.pt it
  describes (the same tensor SHA-256);
- a predict.json only with the scores.csv of its own run (as many rows as it counts) and no
  scores.partial.csv; only readable PNG overlays, and one for every row of scores that names one;
  only readable JSON;

and a run that gets past its start must have removed the temporary files left before it. At the
end, one train and one predict run without a kill must succeed and leave no temporary file.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "fault_injection.json"
# The temporary files of a run that live long enough to be seen by polling: model.pt's; the 8 overlays'.
# A kill up to 0.1 s after one appears lands inside that write, or between it and the next.
KILL_POINTS = {"train": 1, "predict": 8}


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file below ``folder``, by relative path."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = Path(parent) / name
            try:
                stat = path.stat()
            except FileNotFoundError:  # renamed away while we looked
                continue
            files[str(path.relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return files


def temporary(files) -> set[str]:
    from efficientad.files import TEMPORARY_NAME

    return {name for name in files if TEMPORARY_NAME.fullmatch(Path(name).name)}


def cleaned_by(command: str, names: set[str]) -> set[str]:
    """The temporary files that ``command`` removes at its start: train's in the folder, predict's below it too."""
    return names if command == "predict" else {name for name in names if "/" not in name}


def violations(out: Path) -> list[str]:
    """What is wrong with the folder's files, one line each (none: the invariants hold)."""
    from PIL import Image

    from efficientad.errors import EfficientADError
    from efficientad.model import load_model

    files = snapshot(out)
    found = [f"empty file {name}" for name, (size, _) in files.items() if size == 0 and name not in temporary(files)]
    records = {}
    for name in (name for name in files if name.endswith(".json")):
        try:
            records[name] = json.loads((out / name).read_text())
        except ValueError as error:
            found.append(f"unreadable {name}: {error}")
    checksum = None
    if "model.pt" in files:
        try:
            checksum = load_model(out / "model.pt")[1]["tensor_sha256"]
        except EfficientADError as error:
            found.append(str(error))
    if "train.json" in records and records["train.json"].get("model_tensor_sha256") != checksum:
        found.append("train.json describes another model than the model.pt beside it")
    rows = {}
    for name in ("scores.csv", "scores.partial.csv"):
        if name in files:
            text = (out / name).read_text()
            lines = text.splitlines(keepends=True)
            if name == "scores.partial.csv" and lines and not lines[-1].endswith("\n"):
                lines = lines[:-1]  # a row cut by the kill: the rows before it are whole
            rows[name] = list(csv.DictReader(lines))
            missing = [row["overlay"] for row in rows[name] if row["overlay"] and not (out / row["overlay"]).is_file()]
            if missing:
                found.append(f"{name} names overlays that do not exist: {missing[:3]}")
    if "predict.json" in records:
        if "scores.partial.csv" in files:
            found.append("predict.json beside the scores.partial.csv of a later run")
        if len(rows.get("scores.csv", ())) != records["predict.json"]["n_images"]:
            found.append("predict.json counts other images than scores.csv holds")
    for name in (name for name in files if name.endswith(".png")):
        try:
            with Image.open(out / name) as image:
                image.load()
        except OSError as error:
            found.append(f"unreadable overlay {name}: {error}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="killed runs (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the commands, kill times and kill points (default: %(default)s)")
    parser.add_argument("--json", default=str(RESULTS), help="where to write the result (default: %(default)s)")
    args = parser.parse_args(argv)

    from efficientad.data.synthetic import make_dataset
    from efficientad.deploy.speed import system_info
    from efficientad.files import write_run_record

    rng = random.Random(args.seed)
    started = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        make_dataset(work / "data", "part", n_train=6, n_test_good=4, n_test_defect=4, size=256)
        out = work / "out"
        commands = {
            "train": ["train", "--data", str(work / "data"), "--category", "part", "--teacher", "random", "--steps", "2"],
            "predict": ["predict", "--model", str(out / "model.pt"), str(work / "data" / "part" / "test"), "--batch-size", "1"],
        }

        def start(command: str) -> tuple[subprocess.Popen, Path]:
            log = work / f"{command}.log"
            with open(log, "w") as file:
                argv = [sys.executable, "-m", "efficientad", *commands[command], "--out", str(out)]
                return subprocess.Popen(argv, stdout=file, stderr=subprocess.STDOUT, env=env), log

        def run_to_the_end(command: str) -> tuple[int, float]:
            began = time.perf_counter()
            process, log = start(command)
            code = process.wait()
            if code != 0:
                print(log.read_text()[-2000:], file=sys.stderr)
            return code, time.perf_counter() - began

        lengths = {}
        for command in ("train", "predict"):  # predict needs the model; both give the runs' lengths
            code, lengths[command] = run_to_the_end(command)
            if code != 0:
                raise SystemExit(f"the first {command} run failed (exit code {code})")

        found, rounds = [], []
        for index in range(args.rounds):
            command, mode = rng.choice(("train", "predict")), rng.choice(("random time", "n-th temporary file"))
            before = snapshot(out)
            left_before = temporary(before)
            process, log = start(command)
            began = time.perf_counter()
            if mode == "random time":
                deadline = began + rng.uniform(0.0, lengths[command])
                while process.poll() is None and time.perf_counter() < deadline:
                    time.sleep(0.005)
            else:
                wanted, seen = rng.randint(1, KILL_POINTS[command]), set()
                while process.poll() is None and len(seen) < wanted:
                    seen |= temporary(snapshot(out)) - left_before
                    time.sleep(0.002)
                time.sleep(rng.uniform(0.0, 0.1))
            finished = process.poll() is not None
            if not finished:
                process.send_signal(signal.SIGKILL)
            code = process.wait()
            after = snapshot(out)
            left = temporary(after) - left_before
            changed = {name: stat for name, stat in after.items() if name not in temporary(after)} != {
                name: stat for name, stat in before.items() if name not in left_before
            }
            phase = (
                "finished" if finished
                else "inside an atomic write" if left
                else "between writes" if changed
                else "before any write"
            )  # fmt: skip
            problems = [f"round {index} ({command}, {phase}): {problem}" for problem in violations(out)]
            removed = left_before - temporary(after)
            if changed or "removed " in log.read_text():  # it got past its start, where it cleans
                kept = cleaned_by(command, left_before) - removed
                problems += [f"round {index} ({command}): the run did not remove {sorted(kept)}"] if kept else []
            if finished and code != 0:
                problems.append(f"round {index} ({command}): exit code {code}: {log.read_text()[-500:]}")
            found += problems
            rounds.append({
                "command": command, "kill": mode, "after_seconds": round(time.perf_counter() - began, 3), "phase": phase,
                "temporary_files_left": len(left), "temporary_files_removed": len(removed),
            })  # fmt: skip
            print(f"round {index + 1}/{args.rounds}: {command}, killed at the {mode}: {phase}"
                  f"{f', left {len(left)} temporary file(s)' if left else ''}{'; VIOLATION' if problems else ''}", flush=True)

        pending, final = temporary(snapshot(out)), {}
        for command in ("train", "predict"):
            final[command], _ = run_to_the_end(command)
        files = snapshot(out)
        leftovers = sorted(temporary(files))
        found += [f"final {command} run failed (exit code {code})" for command, code in final.items() if code != 0]
        if leftovers:
            found.append(f"the final runs left temporary files {leftovers}")
        if not {"train.json", "predict.json"} <= set(files):
            found.append("the final runs left no train.json or predict.json")
        found += [f"after the final runs: {problem}" for problem in violations(out)]

    phases = [entry["phase"] for entry in rounds]
    result = {
        "benchmark": "fault_injection",
        "rounds": args.rounds,
        "seed": args.seed,
        "run_seconds_unkilled": lengths,
        "by_command": {command: sum(entry["command"] == command for entry in rounds) for command in commands},
        "by_phase": {phase: phases.count(phase) for phase in ("before any write", "inside an atomic write", "between writes", "finished")},
        "kills_during_writes": phases.count("inside an atomic write") + phases.count("between writes"),
        "temporary_files_left_by_kills": sum(entry["temporary_files_left"] for entry in rounds),
        "temporary_files_removed_by_a_later_run": sum(entry["temporary_files_removed"] for entry in rounds)
        + len(pending - set(leftovers)),
        "final_runs_succeeded": all(code == 0 for code in final.values()) and not leftovers,
        "violations": found,
        "seconds": time.perf_counter() - started,
        "round_details": rounds,
        "system": system_info(),
    }
    write_run_record(args.json, result)
    print(
        f"{args.rounds} rounds, {result['kills_during_writes']} kills during writes, "
        f"{result['temporary_files_left_by_kills']} temporary files left by kills, "
        f"final runs {'succeeded' if result['final_runs_succeeded'] else 'FAILED'}, {len(found)} violations; wrote {args.json}"
    )
    for problem in found:
        print(f"VIOLATION: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
