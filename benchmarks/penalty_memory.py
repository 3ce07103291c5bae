"""Peak memory of holding the penalty images, for 1,000 and 10,000 of them.

    python benchmarks/penalty_memory.py [--json out.json]

Each count runs in a fresh process that builds ``PenaltyImages`` over ../shared's ImageNet samples
(repeated to reach the count, by links in a temporary folder) and reports its peak RSS above the
interpreter's own. Up to the memory limit (1 GiB: ~5,400 images at 256x256) the crops are held in
memory, 196 KB each; beyond it they are read from disk per step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

CHILD = """
import resource, sys, time
from efficientad.training.penalty import PenaltyImages
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
penalty = PenaltyImages(sys.argv[1], (256, 256), progress=False)
seconds = time.perf_counter() - started
started = time.perf_counter()
for index in range(0, len(penalty), max(1, len(penalty) // 50)):
    penalty[index]
per_image_ms = 1e3 * (time.perf_counter() - started) / len(range(0, len(penalty), max(1, len(penalty) // 50)))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(len(penalty), penalty.in_memory, (peak - before) / 1024, seconds, per_image_ms)
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--images", default=str(SHARED / "data" / "imagenet_samples"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from efficientad.data.images import list_images
    from efficientad.deploy.speed import system_info
    from efficientad.files import write_run_record

    sources = list_images(args.images, recursive=True)
    rows = []
    for count in args.counts:
        with tempfile.TemporaryDirectory() as folder:
            for index in range(count):
                source = sources[index % len(sources)]
                os.symlink(source.resolve(), Path(folder) / f"{index:06d}{source.suffix}")
            output = subprocess.run([sys.executable, "-c", CHILD, folder], capture_output=True, text=True, check=True).stdout.split()
        n, in_memory, peak_mb, seconds, per_image_ms = int(output[0]), output[1] == "True", *map(float, output[2:])
        rows.append({"images": n, "in_memory": in_memory, "peak_rss_increase_mb": peak_mb, "load_seconds": seconds, "access_ms_per_image": per_image_ms})
        print(f"{n:>6} images: {'in memory' if in_memory else 'read per step'}, peak RSS +{peak_mb:.0f} MB, "
              f"loading {seconds:.1f} s, {per_image_ms:.2f} ms per image fetched")
    if args.json:
        write_run_record(args.json, {"benchmark": "penalty_memory", "results": rows, "system": system_info()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
