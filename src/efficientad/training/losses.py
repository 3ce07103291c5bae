"""The paper's hard feature loss, shared by the training step and the learning curve's validation."""

from __future__ import annotations

import torch

from ..model import quantile


def hard_feature_loss(distance: torch.Tensor, q: float = 0.999) -> torch.Tensor:
    """Mean of the squared errors at or above their ``q`` quantile (the paper's L_hard)."""
    threshold = quantile(distance.detach(), q)
    return distance[distance >= threshold].mean()
