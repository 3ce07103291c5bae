"""int8 that keeps EfficientAD's accuracy, chosen and checked with normal images only.

Users have good images and no defects, so every decision here is made from the model's own
held-out normal validation images and from *synthetic defects* pasted into them (a patch of another
good image, recoloured, at another place: :func:`synthetic_defects`). What was found, and why each
step is here (measured on MVTec AD bottle, see ``benchmarks/int8_study.py``):

1. Only the three networks are quantised (NNCF post-training quantisation, OpenVINO IR). The map
   arithmetic after them (squared differences, channel means, padding, resize) stays float: int8
   there moved the maps by up to 2.0 on a scale where 0.1 is a normal image's rare extreme.
2. Quantisation noise in two networks' features adds its variance to their squared difference: the
   int8 maps of normal images sit higher than the float ones. So the map quantiles and the threshold
   are measured again on the int8 model, as training measures them on the model in its own
   arithmetic. After that, normal images' scores agree with fp32 to about 0.001.
3. Defects are where int8 loses accuracy: activations outside the normal images' calibrated ranges
   are clipped, so defects score lower and the image AUROC fell by 0.009. Normal images cannot show
   this; synthetic defects do (their score error tracked the test set's in every variant tried).
   NNCF's accuracy control reverts to float, one at a time, the layers that cost the most agreement
   with fp32 on the validation and synthetic-defect images, until the mean score error is at most
   ``max_score_error``.

:func:`quantize_int8` returns the int8 model with its calibration record (images used, layers kept
in float, the map quantiles and threshold measured on it, the drift against fp32 and whether it
passed); ``efficientad export --precision int8`` writes both.
"""

from __future__ import annotations

import copy
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from ..config import INT8_CALIBRATION_IMAGES, INT8_MAX_SCORE_ERROR
from ..errors import EfficientADError
from ..model import MAP_PADDING, EfficientADModel, MapQuantiles, decision_threshold, image_scores, map_scale, measure_map_quantiles, normalize_maps, to_image_grid
from .fused import FusedModel
from .graphs import openvino_model
from .runtimes import InferenceOutput, OpenVinoSession

SYNTHETIC_DEFECT_SEED = 20240101
RANKING_IMAGES = 24
# NNCF reverts one layer group per iteration and ranks the rest again (~30 evaluations) whenever a
# revert made things worse: on bottle, unbounded, that was still going after 45 minutes on 2 cores.
# Past this many reverts the model is taken as it is, and the acceptance test decides.
INT8_MAX_REVERTS = 6


def require_nncf():
    """Import NNCF or say how to install it; its per-node INFO lines are silenced, its progress bars kept."""
    # NNCF's import probes torch's C++ extension tooling, which warns about CUDA on CPU-only machines.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
    except ImportError:
        raise EfficientADError("int8 quantisation needs NNCF: pip install 'efficientad[int8]'") from None
    nncf.set_log_level(logging.WARNING)
    return nncf


def quantization_images(
    model_metadata: dict[str, Any], data: str | os.PathLike, category: str, layout: str = "mvtec", count: int = INT8_CALIBRATION_IMAGES
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A model's calibration (``count`` evenly spaced training images) and validation images, rebuilt from its data.

    The validation images are the ones training held out, found as training found them: the
    layout's own validation set, else the seeded split that the model's config records.
    """
    from ..data.datasets import load_split
    from ..data.images import load_images, split_validation, to_float

    config = model_metadata.get("config") or {}
    size = tuple(model_metadata["image_size"])
    split = load_split(layout, data, category)
    if split.validation:
        train, validation = split.train, split.validation
    else:
        train, validation = split_validation(split.train, config.get("validation_fraction", 0.1), config.get("seed", 0))
    chosen = [train[i] for i in np.linspace(0, len(train) - 1, min(count, len(train))).round().astype(int)]

    def batches(paths) -> list[np.ndarray]:
        return [image[None] for image in to_float(load_images(paths, size)).numpy()]

    return batches(chosen), batches(validation)


def synthetic_defects(images: Sequence[np.ndarray], seed: int = SYNTHETIC_DEFECT_SEED) -> list[np.ndarray]:
    """One defective copy of each (1, 3, H, W) float image: a recoloured patch of another image pasted in.

    The patch (8-25% of each side) comes from a random place of a random image of the set, its
    colours scaled by 0.6-1.4 per channel and shifted by up to 0.2, and lands away from the border.
    """
    rng = np.random.default_rng(seed)
    defective = []
    for image in images:
        height, width = image.shape[2:]
        source = images[rng.integers(len(images))][0]
        patch_h, patch_w = int(height * rng.uniform(0.08, 0.25)), int(width * rng.uniform(0.08, 0.25))
        y, x = rng.integers(0, height - patch_h), rng.integers(0, width - patch_w)
        to_y = rng.integers(height // 8, height - patch_h - height // 8)
        to_x = rng.integers(width // 8, width - patch_w - width // 8)
        patch = source[:, y : y + patch_h, x : x + patch_w] * rng.uniform(0.6, 1.4, (3, 1, 1)) + rng.uniform(-0.2, 0.2)
        copy_ = image.copy()
        copy_[0, :, to_y : to_y + patch_h, to_x : to_x + patch_w] = np.clip(patch, 0.0, 1.0)
        defective.append(copy_.astype(np.float32))
    return defective


def network_scopes(module: FusedModel) -> list[str]:
    """The fused module's children that hold convolutions: the networks, which alone are quantised."""
    return [name for name, child in module.named_children() if any(isinstance(layer, nn.Conv2d) for layer in child.modules())]


def outside_networks(module: FusedModel) -> str:
    """A pattern of every graph node that is not in a network: the map arithmetic that stays float."""
    return rf"^/(?!{'|'.join(map(re.escape, network_scopes(module)))}).*"


def raw_maps_of(output: InferenceOutput, module: FusedModel) -> torch.Tensor:
    """The un-normalised (local, global) feature-grid maps (N, 2, h, w) behind a session's outputs.

    The graph normalises in float32 after the networks (``gain * raw + offset``, padded), so this
    inverts it to within float32 rounding: the raw maps of whatever arithmetic ran the networks.
    """
    if tuple(output.local_map.shape[2:]) != tuple(module.output_size) or module.resize_output:
        raise EfficientADError("raw maps need the graph's own feature-grid outputs (no --output-size)")
    inner = (slice(None), 0, slice(MAP_PADDING, -MAP_PADDING), slice(MAP_PADDING, -MAP_PADDING))
    normalised = torch.from_numpy(np.stack([output.local_map[inner], output.global_map[inner]], axis=1)).double()
    gain, offset = module.map_gain.double(), module.map_offset.double()
    return ((normalised - offset) / gain).float()


def scores_of(raw: torch.Tensor, quantiles: torch.Tensor, image_size: tuple[int, int]) -> np.ndarray:
    """Image scores of raw maps under ``quantiles``: the formula the graph applies."""
    return image_scores(to_image_grid(normalize_maps(raw, *map_scale(quantiles)), image_size)).double().numpy()


def _run(runner: Callable[[np.ndarray], InferenceOutput], images: Sequence[np.ndarray]) -> InferenceOutput:
    return InferenceOutput(*(np.concatenate(column) for column in zip(*(runner(image) for image in images))))


def _compiled_runner(compiled) -> Callable[[np.ndarray], InferenceOutput]:
    return lambda image: InferenceOutput(*(compiled(image)[i] for i in range(4)))


class Int8Model(NamedTuple):
    """An int8 OpenVINO model (its map quantiles and threshold measured on itself) and its calibration record."""

    model: Any  # openvino.Model
    quantiles: torch.Tensor
    threshold: float
    record: dict[str, Any]


def quantize_int8(
    model: EfficientADModel,
    calibration: Sequence[np.ndarray],
    validation: Sequence[np.ndarray],
    *,
    quantile_levels: tuple[float, float] = (0.9, 0.995),
    false_positive_rate: float = 0.01,
    max_score_error: float = INT8_MAX_SCORE_ERROR,
    expected_validation_scores: Sequence[float] | None = None,
    threads: int | None = None,
) -> Int8Model:
    """Quantise ``model``'s networks to int8, keeping in float the layers its accuracy needs.

    ``calibration``: training images (float32 (1, 3, H, W) in [0, 1]) that set the activation ranges;
    ``validation``: the held-out normal images the model was calibrated on, never trained on, which
    with their synthetic defects decide which layers stay float and on which the quantiles and threshold
    are measured again. ``quantile_levels`` and ``false_positive_rate`` are the model's training
    settings. The record's ``accepted`` says whether the mean score error against fp32 on those images
    is at most ``max_score_error`` (0.1 is a normal image's rare extreme). ``expected_validation_scores``
    (the model file's) prove that ``validation`` are the images the model was calibrated on.
    """
    if expected_validation_scores is not None and len(validation) != len(expected_validation_scores):
        raise EfficientADError(
            f"got {len(validation)} held-out images, but the model was calibrated on {len(expected_validation_scores)}: "
            "give the data, category and layout it was trained with"
        )
    if len(calibration) < 1 or len(validation) < 2:
        raise EfficientADError(f"int8 needs calibration images and at least 2 validation images, got {len(calibration)} and {len(validation)}")
    nncf = require_nncf()
    started = time.perf_counter()
    module = FusedModel(model)
    float_graph = openvino_model(module)
    defective = synthetic_defects(validation)
    checked = [*validation, *defective]

    n = len(validation)
    # The reference is fp32 deployed as the int8 model will be: quantiles measured on its own validation maps.
    reference_raw = raw_maps_of(_run(OpenVinoSession(float_graph, "fp32", threads).run, checked), module)
    if expected_validation_scores is not None:
        _check_same_images(scores_of(reference_raw[:n], model.map_quantiles, module.image_size), expected_validation_scores)
    reference_quantiles = measure_map_quantiles(reference_raw[:n], *quantile_levels)
    reference = scores_of(reference_raw, reference_quantiles, module.image_size)

    measured: list = [None, None]  # the last compiled model NNCF evaluated, and its quantiles

    def agreement(compiled, items) -> tuple[float, list[float]]:
        # Defect-free accuracy for NNCF to keep: 1 - |score - fp32 score| per image of ``items`` (indices
        # into ``checked``). It is 1 for fp32 itself, never 0 (NNCF divides by the float model's metric).
        # NNCF asks item by item, so each compiled model's quantiles are measured once, on all validation images.
        runner = _compiled_runner(compiled)
        if measured[0] is not compiled:
            measured[:] = [compiled, measure_map_quantiles(raw_maps_of(_run(runner, validation), module), *quantile_levels)]
        indices = list(items)
        scores = scores_of(raw_maps_of(_run(runner, [checked[i] for i in indices]), module), measured[1], module.image_size)
        per_image = 1.0 - np.abs(scores - reference[indices])
        return float(per_image.mean()), per_image.tolist()

    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    in_float = outside_networks(module)
    controlled = nncf.quantize_with_accuracy_control(
        float_graph,
        nncf.Dataset(list(calibration)),
        nncf.Dataset(list(range(len(checked)))),
        validation_fn=agreement,
        max_drop=max_score_error,
        drop_type=nncf.DropType.ABSOLUTE,
        subset_size=len(calibration),
        preset=nncf.QuantizationPreset.MIXED,
        ignored_scope=nncf.IgnoredScope(patterns=[in_float], validate=False),
        # Layers are ranked on the images whose scores int8 moved most: enough to tell them apart, and
        # each of the ~30 rankings costs a pass over them (plus the validation images, for the quantiles).
        advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(
            ranking_subset_size=min(len(checked), RANKING_IMAGES), max_num_iterations=INT8_MAX_REVERTS
        ),
    )
    kept_in_float = float_convolutions(controlled)
    scope = nncf.IgnoredScope(patterns=[in_float], names=kept_in_float, validate=False)

    def quantized(graph):
        return nncf.quantize(graph, nncf.Dataset(list(calibration)), subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED, ignored_scope=scope)

    # The same quantisation with quantiles measured on it: the networks' int8 ranges depend only on
    # the calibration images, so the second graph's raw maps equal the first's (checked below).
    first = OpenVinoSession(quantized(float_graph), "fp32", threads)
    raw = raw_maps_of(_run(first.run, validation), module)
    quantiles = measure_map_quantiles(raw, *quantile_levels)
    recalibrated = copy.deepcopy(model)
    recalibrated.map_quantiles.copy_(quantiles)
    final_module = FusedModel(recalibrated)
    final_graph = quantized(openvino_model(final_module))
    if float_convolutions(final_graph) != kept_in_float:
        raise EfficientADError(f"int8: the layers kept in float changed between quantisations ({float_convolutions(final_graph)} vs {kept_in_float})")
    final = OpenVinoSession(final_graph, "fp32", threads)
    output = _run(final.run, checked)
    final_raw = raw_maps_of(output, final_module)
    drift = float((final_raw[: len(validation)] - raw).abs().max() / raw.abs().max())
    if drift > 1e-4:
        raise EfficientADError(f"int8 quantisation is not repeatable here (raw maps moved by {drift:.1e}, relative); nothing was written")
    scores = output.score.astype(np.float64)
    validation_scores = torch.from_numpy(scores[: len(validation)])
    threshold = decision_threshold(validation_scores, false_positive_rate)
    error = np.abs(scores - reference)
    # The reference's maps under its own measured quantiles, for the map drift of the int8 graph.
    reference_normalised = normalize_maps(reference_raw, *map_scale(reference_quantiles))[:, 0]
    final_normalised = normalize_maps(final_raw, *map_scale(quantiles))[:, 0]
    record = {
        "precision": "int8",
        "tool": f"nncf {nncf.__version__}, post-training quantisation with accuracy control (OpenVINO)",
        "n_calibration_images": len(calibration),
        "n_validation_images": n,
        "n_synthetic_defect_images": len(defective),
        "synthetic_defect_seed": SYNTHETIC_DEFECT_SEED,
        "kept_in_float": kept_in_float,
        "n_convolutions": count_convolutions(final_graph),
        "map_quantiles": MapQuantiles(*quantiles.tolist())._asdict(),
        "fp32_map_quantiles": MapQuantiles(*reference_quantiles.tolist())._asdict(),
        "quantile_levels": list(quantile_levels),
        "threshold": threshold,
        "false_positive_rate": false_positive_rate,
        "validation_scores": validation_scores.tolist(),
        "drift": {
            "validation_score_error_mean": float(error[:n].mean()),
            "validation_score_error_max": float(error[:n].max()),
            "synthetic_defect_score_error_mean": float(error[n:].mean()),
            "synthetic_defect_score_error_max": float(error[n:].max()),
            "map_error_max": float((final_normalised - reference_normalised).abs().max()),
        },
        "max_score_error": max_score_error,
        "accepted": bool(error.mean() <= max_score_error),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return Int8Model(final_graph, quantiles, threshold, record)


# Scores of the same images in fp32 and in the model's calibration precision (bf16 at most) differ by
# about 0.003; other images differ by far more.
SAME_IMAGES_TOLERANCE = 0.02


def _check_same_images(scores: np.ndarray, expected: Sequence[float]) -> None:
    difference = float(np.max(np.abs(np.asarray(scores, np.float64) - np.asarray(expected, np.float64))))
    if difference > SAME_IMAGES_TOLERANCE:
        raise EfficientADError(
            f"these validation images score up to {difference:.3f} away from the scores the model stored for its own: "
            "they are not the images it was calibrated on (give the data, category and layout it was trained with)"
        )


def _convolutions(graph) -> list:
    return [op for op in graph.get_ordered_ops() if op.get_type_name() == "Convolution"]


def count_convolutions(graph) -> int:
    return len(_convolutions(graph))


def float_convolutions(graph) -> list[str]:
    """Names of the convolutions of an NNCF-quantised OpenVINO graph whose input is not quantised."""
    return sorted(op.get_friendly_name() for op in _convolutions(graph) if op.input_value(0).get_node().get_type_name() != "FakeQuantize")
