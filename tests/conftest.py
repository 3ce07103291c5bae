from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"

# Two cores: keep each test process from oversubscribing them.
torch.set_num_threads(2)


def requires_shared(*parts: str):
    """Skip a test when ../shared (real data and weights beside the repo) is absent."""
    path = SHARED.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"needs {path} (the read-only shared assets beside the repo)")


@pytest.fixture
def random_images():
    """Noise images, enough to exercise every code path (not to learn anything)."""
    rng = np.random.default_rng(0)
    return [(rng.random((256, 256, 3)) * 255).astype(np.uint8) for _ in range(10)]
