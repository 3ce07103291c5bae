"""The distillation target's per-channel mean and std: measured over a seeded sample stream, cached on disk.

Pretraining standardises the backbone's features by their mean and std over the first
``normalization_images`` samples of a seeded augmented stream (10,000 in the paper: about an hour
on a 2-core CPU). Sample ``n`` of that stream depends only on the seed, the training images and
``n``, so the statistics of the first ``k`` samples are a fact about those inputs:
:class:`StatisticsCache` keeps them as float64 sums in one small file per ``k``, which lets a later
run with the same inputs reuse them, and a run asking for more samples continue from them (its
result equals a single pass over all of them, up to float64 rounding).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ..config import PretrainConfig
from ..errors import first_line
from ..files import atomic_save
from .teacher import cache_dir, sha256_of

STATISTICS_FORMAT = "efficientad-target-statistics"
# Part of every cache key: bump it when the target's computation or the statistics stream changes
# what a sample contributes, so that files written before no longer match.
STATISTICS_VERSION = 1
# A channel (almost) silent during the statistics pass would divide its later activations by ~0
# and dominate the loss; its std is floored at this fraction of the median channel's.
_MIN_RELATIVE_STD = 1e-2


def default_cache() -> Path:
    """Where statistics are cached unless told otherwise: ``target_stats`` in the user cache folder."""
    return cache_dir() / "target_stats"


def weights_identity(weights: str | os.PathLike | None) -> str:
    """What names the backbone's weights: torchvision's pinned ImageNet file, a file's SHA-256, or "random"."""
    if weights is None:
        # Drawn by torch's initialisers from the run's seed (which the key holds too).
        return f"random (torch {torch.__version__})"
    if str(weights) == "imagenet":
        return "torchvision IMAGENET1K_V1"
    return f"sha256:{sha256_of(Path(weights))}"


def statistics_key(config: PretrainConfig, paths: Sequence[Path]) -> dict[str, Any]:
    """Everything that decides the statistics of the stream over ``paths`` (the training images), as a JSON-able dict.

    Of ``config``: the backbone and its weights, image size, grayscale probability, seed and
    precision; batch size, workers and device change only the order of float64 additions. Images
    count by path, size and modification time: hashing the contents of ten thousand photos would
    cost more than a cache hit saves, and a changed file gets a new time.
    """
    images = hashlib.sha256()
    for path in paths:
        stat = path.stat()
        images.update(f"{path.resolve()}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {
        "version": STATISTICS_VERSION,
        "backbone": config.backbone,
        "weights": weights_identity(config.backbone_weights),
        "image_size": config.image_size,
        "grayscale": config.grayscale,
        "seed": config.seed,
        "precision": config.precision,
        "images": len(paths),
        "images_sha256": images.hexdigest(),
    }


@dataclass
class ChannelSums:
    """Running float64 sums of the target's values per channel, over ``samples`` samples."""

    samples: int = 0
    positions: int = 0  # values summed per channel: samples x grid cells
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, features: torch.Tensor) -> None:
        # float64 sums keep E[x^2] - E[x]^2 accurate over millions of values.
        features = features.double()
        total, squares = features.sum(dim=(0, 2, 3)).cpu(), features.square().sum(dim=(0, 2, 3)).cpu()
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.samples += len(features)
        self.positions += features.numel() // features.shape[1]

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std, shaped (1, C, 1, 1) for broadcasting."""
        mean = self.total / self.positions
        std = (self.squares / self.positions - mean.square()).clamp(min=0).sqrt()
        std = std.clamp(min=max(_MIN_RELATIVE_STD * float(std.median()), 1e-6))
        return mean.float().view(1, -1, 1, 1), std.float().view(1, -1, 1, 1)


@torch.no_grad()
def accumulate(
    target: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    sums: ChannelSums,
    count: int,
    autocast: Callable[[], Any],
    stop: Callable[[int], bool],
    progress: bool,
) -> ChannelSums:
    """Add the target's values on ``batches`` (backbone views first) to ``sums`` until ``count`` samples.

    ``stop(samples)`` is asked before each batch; True ends the pass early (the time budget).
    """
    iterator = iter(batches)
    with tqdm(total=count, initial=sums.samples, desc="Target statistics", unit="img", disable=not progress) as bar:
        # Asked before the next batch is fetched, so that a pass stopped at once reads no image.
        while sums.samples < count and not stop(sums.samples):
            batch = next(iterator, None)
            if batch is None:
                break
            with autocast():
                sums.add(target(batch[0]))
            bar.update(len(batch[0]))
    return sums


class StatisticsCache:
    """Files ``BACKBONE-DIGEST-SAMPLES.pt`` in ``folder``, one per sample count measured for ``key``.

    A run asking for ``n`` samples reuses the file of exactly ``n``, else continues from the largest
    below ``n`` (a pass that a time budget cut short, or a run that asked for fewer); files above
    ``n`` are not used, since the sums of a longer stream hold no shorter one. Unreadable files are
    skipped and failed writes only warned about: the cache saves time, it never decides a result.
    """

    def __init__(self, folder: str | os.PathLike, key: dict[str, Any]) -> None:
        self.folder, self.key = Path(folder), key
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]
        self.prefix = f"{key['backbone']}-{digest}-"

    def path(self, samples: int) -> Path:
        return self.folder / f"{self.prefix}{samples}.pt"

    def _counts(self) -> list[int]:
        names = (p.name[len(self.prefix) : -len(".pt")] for p in self.folder.glob(f"{self.prefix}*.pt"))
        return sorted(int(name) for name in names if name.isdigit())

    def load(self, samples: int) -> tuple[ChannelSums, Path | None]:
        """The sums of the most samples, at most ``samples``, found in the folder (empty sums if none)."""
        for count in reversed([c for c in self._counts() if c <= samples]):
            path = self.path(count)
            try:
                saved = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # torch.load raises many types for foreign or corrupt files
                warnings.warn(f"ignoring cached target statistics {path}: {first_line(error)}", stacklevel=2)
                continue
            if not isinstance(saved, dict) or saved.get("format") != STATISTICS_FORMAT or saved.get("key") != self.key:
                warnings.warn(f"ignoring cached target statistics {path}: not those of these inputs", stacklevel=2)
                continue
            return ChannelSums(count, saved["positions"], saved["total"], saved["squares"]), path
        return ChannelSums(), None

    def save(self, sums: ChannelSums) -> Path | None:
        """Write ``sums`` atomically; returns the file, or None (with a warning) when it cannot be written."""
        path = self.path(sums.samples)
        content = {
            "format": STATISTICS_FORMAT,
            "key": self.key,
            "samples": sums.samples,
            "positions": sums.positions,
            "total": sums.total,
            "squares": sums.squares,
        }
        try:
            return atomic_save(content, path)
        except OSError as error:
            warnings.warn(f"could not cache the target statistics in {path}: {error}", stacklevel=2)
            return None
