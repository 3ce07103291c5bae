"""EfficientAD: accurate visual anomaly detection at millisecond-level latencies.

    from efficientad import EfficientAD, Inferencer, Prediction, EfficientADError

The names load lazily, on first use, so that ``efficientad --help`` and ``import efficientad`` stay
free of torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_PUBLIC = {
    "EfficientAD": "efficientad.detector",
    "TrainConfig": "efficientad.config",
    "PretrainConfig": "efficientad.config",
    "Inferencer": "efficientad.deploy.inferencer",
    "Prediction": "efficientad.deploy.inferencer",
    "EfficientADError": "efficientad.errors",
}
__all__ = ["__version__", *_PUBLIC]

if TYPE_CHECKING:
    from .config import PretrainConfig, TrainConfig
    from .deploy.inferencer import Inferencer, Prediction
    from .detector import EfficientAD
    from .errors import EfficientADError


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'efficientad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
