"""Heat-map overlays that a person can read at a glance."""

from __future__ import annotations

import numpy as np
from PIL import Image


def heat_colors(anomaly_map: np.ndarray, vmax: float) -> np.ndarray:
    """RGB uint8 'jet' colours for a map, 0 (normal) blue to ``vmax`` and above red."""
    from matplotlib import colormaps

    scaled = np.clip(anomaly_map / max(vmax, 1e-12), 0.0, 1.0)
    return (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8)


def overlay(image: Image.Image, anomaly_map: np.ndarray, vmax: float, alpha: float = 0.45) -> Image.Image:
    """Blend the heat map over the image (same size); cold regions stay mostly transparent."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    heat = heat_colors(anomaly_map, vmax).astype(np.float32)
    weight = alpha * np.clip(anomaly_map / max(vmax, 1e-12), 0.25, 1.0)[..., None]
    return Image.fromarray((rgb * (1 - weight) + heat * weight).astype(np.uint8))


def display_range(threshold: float | None) -> float:
    """Upper end of the colour scale: twice the decision threshold (0.1 is normal images' rare extreme)."""
    return 2.0 * threshold if threshold is not None and threshold > 0 else 0.2
