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
from ..errors import EfficientADError
from ..deploy.fused import FusedModel
from ..deploy.runtimes import make_session
from ..model import EfficientADModel, MapQuantiles, image_scores, map_scale, normalize_maps, to_image_grid
from .train import quantile


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
    if not torch.isfinite(raw).all():
        raise EfficientADError(
            "calibration failed: the held-out images' anomaly maps are not finite (training diverged); "
            "train again with precision='fp32' or a lower learning_rate"
        )
    low, high = config.map_quantile_low, config.map_quantile_high
    q = [quantile(raw[:, 0], low), quantile(raw[:, 0], high), quantile(raw[:, 1], low), quantile(raw[:, 1], high)]
    for branch, start, end in (("local", q[0], q[1]), ("global", q[2], q[3])):
        # float32 maps: a spread below their resolution would turn every later score into inf or NaN.
        if not end - start > 1e-6 * max(float(abs(end)), 1e-30):
            raise EfficientADError(
                f"calibration failed: the held-out images' {branch} map has no spread (its {high} quantile equals its "
                f"{low} quantile), so no threshold can be measured; the training images are constant or nearly so: "
                "train on varied photos of good parts"
            )
    model.map_quantiles.copy_(torch.stack(q))
    maps = to_image_grid(normalize_maps(raw, *map_scale(model.map_quantiles.cpu())), model.image_size)
    scores = image_scores(maps).double()
    threshold = float(torch.quantile(scores, 1.0 - config.false_positive_rate))
    return {
        "map_quantiles": MapQuantiles(*(float(value) for value in q))._asdict(),
        "quantile_levels": [low, high],
        "validation_scores": scores.tolist(),
        "threshold": threshold,
    }
