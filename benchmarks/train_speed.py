"""Seconds per EfficientAD-S training step on this machine, per precision, against anomalib's step.

    python benchmarks/train_speed.py [--steps 20] [--variants fp32,bf16,bf16-cl] [--json out.json]

Each variant trains a fresh model on MVTec AD bottle (../shared beside the repo; synthetic images
when absent) with one penalty image per step, batch 1, and reports the median step time after
warm-up. When anomalib is importable, its EfficientAD-S training step (torch model, same batch and
penalty image, Adam) is timed in the same run; otherwise the peer is skipped and said so.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
VARIANTS = {
    "fp32": {"precision": "fp32"},
    "fp32-cl": {"precision": "fp32", "channels_last": True},
    "bf16": {"precision": "bf16"},
    "bf16-cl": {"precision": "bf16", "channels_last": True},
    "bf16-compile": {"precision": "bf16", "compile": True},
}


def load_images(n_train: int, n_penalty: int):
    import torch

    from efficientad.data.images import list_images, load_images as decode
    from efficientad.training.penalty import PenaltyImages

    bottle = SHARED / "data" / "mvtec_ad" / "bottle" / "train" / "good"
    if bottle.is_dir():
        train = decode(list_images(bottle)[:n_train], (256, 256))
        penalty = PenaltyImages(SHARED / "data" / "imagenet_samples", (256, 256), progress=False).images[:n_penalty]
        return train, penalty, "mvtec_ad/bottle + imagenet_samples"
    generator = torch.Generator().manual_seed(0)
    train = (torch.rand(n_train, 3, 256, 256, generator=generator) * 255).to(torch.uint8)
    penalty = (torch.rand(n_penalty, 3, 256, 256, generator=generator) * 255).to(torch.uint8)
    return train, penalty, "synthetic noise (../shared absent)"


def time_ours(variant: str, train, penalty, steps: int, warmup: int) -> dict:
    from efficientad.model import EfficientADModel
    from efficientad.config import TrainConfig
    from efficientad.training.train import train_networks

    model = EfficientADModel("s", (256, 256))
    config = TrainConfig(steps=warmup + steps, **VARIANTS[variant])
    times = []
    last = [time.perf_counter()]

    def tick(step, losses):
        now = time.perf_counter()
        if step >= warmup:
            times.append(now - last[0])
        last[0] = now

    train_networks(model, train, config, penalty, progress=False, on_step=tick)
    return {"median_step_seconds": statistics.median(times), "p90_step_seconds": sorted(times)[int(0.9 * (len(times) - 1))], **VARIANTS[variant]}


def time_anomalib(train, penalty, steps: int, warmup: int) -> dict:
    import torch
    from anomalib import __version__ as anomalib_version
    from anomalib.models.image.efficient_ad.torch_model import EfficientAdModel

    model = EfficientAdModel(teacher_out_channels=384, model_size="small")
    model.train()
    model.teacher.eval()
    # anomalib fills these from the training data before its first step; any values time the same.
    model.mean_std.update({"mean": torch.zeros(1, 384, 1, 1), "std": torch.ones(1, 384, 1, 1)})
    optimizer = torch.optim.Adam(list(model.student.parameters()) + list(model.ae.parameters()), lr=1e-4, weight_decay=1e-5)
    times = []
    for step in range(warmup + steps):
        tic = time.perf_counter()
        batch = train[step % len(train)][None].float() / 255
        imagenet = penalty[step % len(penalty)][None].float() / 255
        loss_st, loss_ae, loss_stae = model(batch=batch, batch_imagenet=imagenet)
        loss = loss_st + loss_ae + loss_stae
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= warmup:
            times.append(time.perf_counter() - tic)
    return {"median_step_seconds": statistics.median(times), "anomalib": anomalib_version}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", default="fp32,bf16,bf16-cl", help=f"comma-separated, of {','.join(VARIANTS)}")
    parser.add_argument("--no-peer", action="store_true", help="do not time anomalib even if installed")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from efficientad.deploy.speed import system_info
    from efficientad.files import write_run_record

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {sorted(VARIANTS)}")
    train, penalty, source = load_images(n_train=32, n_penalty=32)
    result = {"benchmark": "train_speed", "model_size": "s", "batch_size": 1, "penalty": True, "data": source,
              "system": system_info(), "ours": {}}
    for variant in variants:
        result["ours"][variant] = time_ours(variant, train, penalty, args.steps, args.warmup)
        print(f"{variant}: {result['ours'][variant]['median_step_seconds']:.3f} s/step", flush=True)
    try:
        if args.no_peer:
            raise ImportError("--no-peer")
        result["anomalib"] = time_anomalib(train, penalty, args.steps, args.warmup)
        print(f"anomalib: {result['anomalib']['median_step_seconds']:.3f} s/step", flush=True)
        if result["ours"]:
            best = min(v["median_step_seconds"] for v in result["ours"].values())
            result["best_vs_anomalib"] = best / result["anomalib"]["median_step_seconds"]
    except ImportError as error:
        result["anomalib"] = {"skipped": f"anomalib not importable ({error})"}
        print(result["anomalib"]["skipped"])
    print(json.dumps(result, indent=2))
    if args.json:
        write_run_record(args.json, result)  # adds the command line and package versions
    return 0


if __name__ == "__main__":
    sys.exit(main())
