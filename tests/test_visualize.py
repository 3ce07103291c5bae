"""Heat-map overlays: the colours of the reference formula, at a size that memory allows."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image

from efficientad.deploy.inferencer import Prediction
from efficientad.visualize import display_size, heat_colors, heat_map, overlay


def test_overlay_matches_the_plain_blend():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (300, 500, 3), dtype=np.uint8))
    anomaly_map = (rng.random((300, 500)) * 0.4).astype(np.float32)
    vmax, alpha = 0.2, 0.45
    scaled = np.clip(anomaly_map / vmax, 0.0, 1.0)
    heat = (colormaps["jet"](scaled)[..., :3] * 255).astype(np.uint8).astype(np.float32)
    weight = alpha * np.clip(anomaly_map / vmax, 0.25, 1.0)[..., None]
    expected = (np.asarray(image, dtype=np.float32) * (1 - weight) + heat * weight).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(overlay(image, anomaly_map, vmax, alpha)), expected)


def test_heat_colors_survive_nan_and_infinity():
    colors = heat_colors(np.array([[np.nan, np.inf, -np.inf, 0.1]], dtype=np.float32), 0.2)
    assert colors.shape == (1, 4, 3) and colors.dtype == np.uint8
    np.testing.assert_array_equal(colors[0, 1], heat_colors(np.array([[1.0]]), 0.2)[0, 0])  # +inf: the top colour


def test_large_images_are_drawn_at_a_bounded_size():
    assert display_size(1000, 800) == (1000, 800)
    width, height = display_size(12000, 6000)
    assert width * height <= 4e6 and abs(width / height - 2) < 0.01
    grid = np.zeros((3, 64, 64), dtype=np.float32)
    grid[0, 30:34, 30:34] = 1.0
    prediction = Prediction(1.0, 1.0, 0.0, True, grid, (6000, 12000))
    drawn = heat_map(Image.new("RGB", (12000, 6000), (90, 90, 90)), prediction, vmax=0.2)
    assert drawn.size == (width, height)
    pixels = np.asarray(drawn)
    assert pixels[height // 2, width // 2, 0] > pixels[0, 0, 0]  # the hot spot is red, where the map has it
    assert "anomaly_map" not in vars(prediction)  # the full-size map was never made
