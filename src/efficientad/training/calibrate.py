"""Calibration: the map quantiles and the decision threshold, measured on held-out normal images.

Both are measured with the deployed prediction path itself: the fused module's raw maps, in the
precision the model will predict in, normalised and scored by the same functions of
:mod:`efficientad.model` that the fused module applies. A validation image scored later by
``predict``, ``eval`` or ``serve`` gets the score its threshold was set from.
"""

from __future__ import annotations

import torch

from ..config import PREDICT_BATCH_SIZE, TrainConfig
from ..data.images import to_float
from ..deploy.fused import FusedModel
from ..deploy.runtimes import make_session
from ..model import EfficientADModel, MapQuantiles, decision_threshold, image_scores, map_scale, measure_map_quantiles, normalize_maps, to_image_grid


@torch.no_grad()
def calibrate(model: EfficientADModel, images: torch.Tensor, config: TrainConfig, batch_size: int = PREDICT_BATCH_SIZE) -> dict:
    """Set the map quantiles from held-out normal uint8 images (N, 3, H, W); return their scores and a threshold.

    The threshold is the score that the chosen fraction of validation images
    (``false_positive_rate``, default 1%) exceeds.
    """
    device = model.teacher_mean.device
    batches = [to_float(images[start : start + batch_size]) for start in range(0, len(images), batch_size)]
    measuring = make_session(FusedModel(model, allow_uncalibrated=True), "torch", config.precision, device)
    raw = torch.cat([torch.from_numpy(measuring.raw_maps(batch)) for batch in batches])
    low, high = config.map_quantile_low, config.map_quantile_high
    quantiles = measure_map_quantiles(raw, low, high)
    model.map_quantiles.copy_(quantiles)
    scores = image_scores(to_image_grid(normalize_maps(raw, *map_scale(quantiles)), model.image_size))
    return {
        "map_quantiles": MapQuantiles(*quantiles.tolist())._asdict(),
        "quantile_levels": [low, high],
        "validation_scores": scores.double().tolist(),
        "threshold": decision_threshold(scores, config.false_positive_rate),
    }
