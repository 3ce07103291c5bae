"""Many models on Ray: rows side by side against one after another, and a simulated two-node cluster.

    python benchmarks/train_many.py [--steps 50] [--json benchmarks/results/train_many.json]

Four rows: MVTec AD bottle and VisA fryum from ../shared/data, and two synthetic categories, with
../shared's stand-in teacher and ImageNet penalty images (bf16 + channels-last where the CPU has
native bf16). The same rows run three times through ``efficientad.fleet.train_many``, each into a
fresh folder:

1. ``parallel``: a local Ray of 2 CPUs, 1 CPU (and torch thread) per row: two rows at a time;
2. ``sequential``: the same Ray, 2 CPUs per row: one row at a time with two threads;
3. ``cluster``: ``ray.cluster_utils.Cluster``, a head and a worker node of 1 CPU each on this
   machine, the two synthetic rows: each row's Ray node id is recorded, to show both nodes train.

On one machine the nodes share its cores, so (3) shows scheduling, not a cluster's speed.
"""

from __future__ import annotations

import argparse
import csv
import logging
import tempfile
import time
import warnings
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def write_manifest(path: Path, synthetic: Path, steps: int, names: tuple[str, ...] | None = None) -> Path:
    rows = [
        {"name": "bottle", "data": SHARED / "data" / "mvtec_ad", "category": "bottle", "format": "mvtec"},
        {"name": "fryum", "data": SHARED / "data" / "visa", "category": "fryum", "format": "visa"},
        {"name": "flange_a", "data": synthetic, "category": "flange_a", "format": "mvtec"},
        {"name": "flange_b", "data": synthetic, "category": "flange_b", "format": "mvtec"},
    ]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["name", "data", "category", "format", "steps"])
        writer.writeheader()
        for row in rows:
            if names is None or row["name"] in names:
                writer.writerow({**row, "steps": steps})
    return path


def timed_run(manifest: Path, out: Path, settings: dict, **options) -> dict:
    from efficientad.fleet import train_many

    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = train_many(manifest, out, settings=settings, progress=True, **options)
    wall = time.perf_counter() - started
    print(f"  {wall:.0f} s: " + ", ".join(f"{r.name} {r.status} {r.seconds or 0:.0f} s on {str(r.node)[:8]}" for r in results))
    return {**options, "wall_seconds": wall, "rows": [asdict(result) for result in results]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50, help="training steps per row (default: %(default)s: the 2-core machine runs all three phases in ~10 min)")
    parser.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "train_many.json"))
    args = parser.parse_args(argv)

    import ray
    from ray.cluster_utils import Cluster

    from efficientad.data.synthetic import make_dataset
    from efficientad.deploy.speed import system_info
    from efficientad.device import cpu_supports_bf16
    from efficientad.files import write_run_record

    bf16 = cpu_supports_bf16()
    settings = {
        "teacher": str(SHARED / "weights" / "teacher_small_r18.pth"),
        "penalty_images": str(SHARED / "data" / "imagenet_samples"),
        **({"precision": "bf16", "channels_last": True} if bf16 else {}),
    }
    record = {"benchmark": "train_many", "steps": args.steps, "settings": settings}
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        for seed, category in enumerate(("flange_a", "flange_b")):
            make_dataset(work / "synthetic", category, n_train=60, n_test_good=15, n_test_defect=15, seed=seed)
        manifest = write_manifest(work / "rows.csv", work / "synthetic", args.steps)

        ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
        try:
            for phase, cpus in (("parallel", 1), ("sequential", 2)):
                print(f"{phase}: {cpus} CPU(s) per row on a local Ray of 2 CPUs")
                record[phase] = timed_run(manifest, work / phase, settings, cpus_per_model=cpus)
        finally:
            ray.shutdown()
        record["speedup_parallel_over_sequential"] = record["sequential"]["wall_seconds"] / record["parallel"]["wall_seconds"]

        print("cluster: two simulated nodes of 1 CPU each, the two synthetic rows")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        cluster.add_node(num_cpus=1)
        try:
            ray.init(address=cluster.address, logging_level=logging.WARNING)
            nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
            small = write_manifest(work / "synthetic.csv", work / "synthetic", args.steps, ("flange_a", "flange_b"))
            run = timed_run(small, work / "cluster", settings, cpus_per_model=1)
            used = sorted({row["node"] for row in run["rows"] if row["node"]})
            record["cluster"] = {"nodes": nodes, "nodes_used": used, "rows_on_both_nodes": used == nodes, **run}
        finally:
            ray.shutdown()
            cluster.shutdown()
    record["system"] = system_info()
    write_run_record(args.json, record)
    print(
        f"parallel {record['parallel']['wall_seconds']:.0f} s, sequential {record['sequential']['wall_seconds']:.0f} s "
        f"(x{record['speedup_parallel_over_sequential']:.2f}); cluster rows on {len(record['cluster']['nodes_used'])} "
        f"of {len(record['cluster']['nodes'])} nodes; wrote {args.json}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
