"""Heat-map overlays that a person can read at a glance."""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .config import OVERLAY_MAX_MEGAPIXELS

if TYPE_CHECKING:
    from .deploy.inferencer import Prediction

# Rows blended at once: temporaries stay at a few MB whatever the image's size.
BAND_PIXELS = 1 << 20


@functools.cache
def _jet_table() -> np.ndarray:
    """matplotlib's 'jet' as an (N, 3) uint8 table, built once (overlays use it for every band)."""
    from matplotlib import colormaps

    jet = colormaps["jet"]
    return jet(np.arange(jet.N), bytes=True)[:, :3]


def heat_colors(anomaly_map: np.ndarray, vmax: float) -> np.ndarray:
    """RGB uint8 'jet' colours for a map, 0 (normal) blue to ``vmax`` and above red."""
    table = _jet_table()
    levels = len(table)
    # The colormap's own binning of [0, 1] into its N entries, without its float64 RGBA copy of the map.
    scaled = np.nan_to_num(anomaly_map / max(vmax, 1e-12) * levels, nan=0.0, posinf=levels, neginf=0.0)
    index = np.clip(scaled, 0, levels - 1).astype(np.intp)
    return table[index]


def overlay(image: Image.Image, anomaly_map: np.ndarray, vmax: float, alpha: float = 0.45) -> Image.Image:
    """Blend the heat map over the image (same size); cold regions stay mostly transparent."""
    rgb = np.asarray(image.convert("RGB"))
    if rgb.shape[:2] != anomaly_map.shape:
        raise ValueError(f"map {anomaly_map.shape} and image {rgb.shape[:2]} differ in size")
    blended = np.empty_like(rgb)
    rows = max(1, BAND_PIXELS // max(rgb.shape[1], 1))
    for top in range(0, rgb.shape[0], rows):
        band = slice(top, top + rows)
        heat = heat_colors(anomaly_map[band], vmax).astype(np.float32)
        weight = alpha * np.clip(anomaly_map[band] / max(vmax, 1e-12), 0.25, 1.0)[..., None].astype(np.float32)
        blended[band] = rgb[band] * (1 - weight) + heat * weight
    return Image.fromarray(blended)


def display_size(width: int, height: int, max_megapixels: float = OVERLAY_MAX_MEGAPIXELS) -> tuple[int, int]:
    """(width, height) scaled down, keeping the aspect ratio, to at most ``max_megapixels``."""
    scale = min(1.0, math.sqrt(max_megapixels * 1e6 / (width * height)))
    return max(1, int(width * scale)), max(1, int(height * scale))


def shrink_for_display(image: Image.Image, max_megapixels: float = OVERLAY_MAX_MEGAPIXELS) -> Image.Image:
    """``image`` itself when small enough, else a copy reduced to :func:`display_size`."""
    size = display_size(*image.size, max_megapixels)
    return image if size == image.size else image.resize(size, Image.BILINEAR, reducing_gap=2.0)


def heat_map(image: Image.Image, prediction: Prediction, vmax: float) -> Image.Image:
    """The prediction's combined map over ``image``, drawn at no more than :data:`OVERLAY_MAX_MEGAPIXELS`.

    ``image`` may already be reduced (the server keeps only a display-sized copy of large uploads):
    the map is resized straight from the model's grid to whatever size is drawn.
    """
    shown = shrink_for_display(image)
    return overlay(shown, prediction.map_at((shown.height, shown.width)), vmax)


def display_range(threshold: float | None) -> float:
    """Upper end of the colour scale: twice the decision threshold (0.1 is normal images' rare extreme)."""
    return 2.0 * threshold if threshold is not None and threshold > 0 else 0.2
