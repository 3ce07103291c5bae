"""int8 that keeps EfficientAD's accuracy, chosen and checked with normal images only.

Users have good images and no defects, so every decision here is made from the model's own
held-out normal validation images and from *synthetic defects* pasted into them (a patch of another
good image, recoloured, at another place, with its mask: :func:`synthetic_defects`). What was found,
and why each step is here (MVTec AD bottle, ``benchmarks/int8_study.py``):

1. Only the three networks are quantised (NNCF post-training quantisation, OpenVINO IR). The map
   arithmetic after them (squared differences, channel means, padding, resize) stays float: int8
   there moved the maps by up to 2.0 on a scale where 0.1 is a normal image's rare extreme.
2. Teacher and student keep separate last convolutions (``FusedModel(fuse_local_head=False)``):
   fused into one, their inputs share one activation scale, and the teacher trunk's outputs (largest
   2.8, median channel 0.28) got a few of the 256 levels that the student's (largest 9.6) set. Fused,
   int8 lost 0.04 AU-PRO on the test set; apart, none.
3. Quantisation noise adds to the squared differences, so the map quantiles and the threshold are
   measured again on the int8 model, as training measures them on the model in its own arithmetic;
   the held-out images then score as in fp32 to about 0.001.
4. The acceptance test asks what the user will: do defects still rank above good parts, and do the
   maps still find them? Image AUROC and AU-PRO of the held-out images against their synthetic
   defects, int8 against fp32, each no more than a set amount lower. And, on the held-out images
   alone, each map's quantile spread, which weighs the two maps in the combined one: int8 noise
   widened the teacher-student map's tail by 60% on bottle, re-weighting the maps, which pasted
   defects did not show but the test set did (AUROC -0.011 on one model). The re-measured
   quantiles also scale defect scores down (10-13%) while good images keep theirs, so faint
   defects can sink among good images: the AUROC proxy sees that (below).
5. The networks' input (the image minus the mean colour) is quantised over every value an image can
   give (:func:`cover_every_image`), not over the calibration images' colours: a defect of a colour
   the good parts do not have was clipped before any network saw it, on 59% of bottle's synthetic
   defect images (proxy AUROC -0.024; covering every colour: -0.008).
6. Where the test fails, one pass ranks the layer groups by what keeping each in float recovers,
   and the best are kept in float, one more at a time, until the test passes, short of keeping them
   all (fp32). Where nothing passes, the closest is written, not accepted.
7. Every convolution's weights use half of the int8 range (NNCF's overflow fix, on all of them
   rather than on the first ones only, its default): CPUs without VNNI (AVX2; AVX-512 before
   Cascade Lake) add products of uint8 inputs and full-range int8 weights in pairs into int16, which
   saturates. An export made on a VNNI CPU then ran on the AVX2 code path at image AUROC 0.914
   where VNNI gave 0.931 (bottle). Half-range weights cannot saturate there, so every CPU computes
   what the acceptance test measured.
8. Quantisation-aware fine-tuning (``fine_tuned``, from
   :func:`efficientad.training.quantization_aware.fine_tune_for_int8`, ``export --qat-steps``)
   teaches the student and autoencoder to give the fp32 maps under int8 rounding; with full-range
   weights it took the local map's spread change on bottle from +62% to +4%. With half-range weights
   post-training int8 alone passed on bottle (+14%) and 200 fine-tuning steps narrowed it by 56%,
   failing (README, "Precision").

:func:`quantize_int8` returns the int8 model with its calibration record (images used, layers kept
in float, the map quantiles and threshold measured on it, the proxies and drift against fp32 and
whether it passed); ``efficientad export --precision int8`` writes both.
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

from ..config import INT8_CALIBRATION_IMAGES, INT8_MAX_AU_PRO_DROP, INT8_MAX_AUROC_DROP, INT8_MAX_SCORE_ERROR, INT8_MAX_SPREAD_CHANGE
from ..errors import EfficientADError
from ..evaluation.metrics import au_pro, image_auroc
from ..model import MAP_PADDING, EfficientADModel, MapQuantiles, decision_threshold, image_scores, map_scale, measure_map_quantiles, normalize_maps, to_image_grid
from .fused import FusedModel
from .graphs import openvino_model
from .runtimes import InferenceOutput, OpenVinoSession

SYNTHETIC_DEFECT_SEED = 20240101
# The int8 levels every convolution's weights use (point 7): NNCF's half range, per output channel,
# the largest weight at 63.5 steps (127 where the full range is used).
HALF_RANGE_WEIGHT_LEVELS = (-64, 64)
# Synthetic defects per held-out image: enough pairs for the image AUROC of the acceptance test to
# move in steps of well under its bound (bottle: 21 x 63 pairs, 0.0008 each).
SYNTHETIC_DEFECTS_PER_IMAGE = 3


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


def held_out_split(model_metadata: dict[str, Any], data: str | os.PathLike, category: str, layout: str = "mvtec") -> tuple[list, list]:
    """A model's training and held-out validation images (paths), found as training found them.

    The layout's own validation set, else the seeded split that the model's config records.
    """
    from ..data.datasets import load_split
    from ..data.images import split_validation

    config = model_metadata.get("config") or {}
    split = load_split(layout, data, category)
    if split.validation:
        return list(split.train), list(split.validation)
    return split_validation(split.train, config.get("validation_fraction", 0.1), config.get("seed", 0))


def quantization_images(
    model_metadata: dict[str, Any], data: str | os.PathLike, category: str, layout: str = "mvtec", count: int = INT8_CALIBRATION_IMAGES
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """A model's calibration (``count`` evenly spaced training images) and its held-out validation images."""
    from ..data.images import load_images, to_float

    size = tuple(model_metadata["image_size"])
    train, validation = held_out_split(model_metadata, data, category, layout)
    chosen = [train[i] for i in np.linspace(0, len(train) - 1, min(count, len(train))).round().astype(int)]

    def batches(paths) -> list[np.ndarray]:
        return [image[None] for image in to_float(load_images(paths, size)).numpy()]

    return batches(chosen), batches(validation)


class SyntheticDefects(NamedTuple):
    """Defective copies of normal images and where each defect is: (1, 3, H, W) floats and (H, W) masks."""

    images: list[np.ndarray]
    masks: list[np.ndarray]


def synthetic_defects(images: Sequence[np.ndarray], per_image: int = 1, seed: int = SYNTHETIC_DEFECT_SEED) -> SyntheticDefects:
    """``per_image`` defective copies of each (1, 3, H, W) float image: a recoloured patch of another image pasted in.

    The patch (8-25% of each side) comes from a random place of a random image of the set, its
    colours scaled by 0.6-1.4 per channel and shifted by up to 0.2, and lands away from the border;
    its mask marks where it landed.
    """
    rng = np.random.default_rng(seed)
    defective, masks = [], []
    for image in images:
        height, width = image.shape[2:]
        for _ in range(per_image):
            source = images[rng.integers(len(images))][0]
            patch_h, patch_w = int(height * rng.uniform(0.08, 0.25)), int(width * rng.uniform(0.08, 0.25))
            y, x = rng.integers(0, height - patch_h), rng.integers(0, width - patch_w)
            to_y = rng.integers(height // 8, height - patch_h - height // 8)
            to_x = rng.integers(width // 8, width - patch_w - width // 8)
            patch = source[:, y : y + patch_h, x : x + patch_w] * rng.uniform(0.6, 1.4, (3, 1, 1)) + rng.uniform(-0.2, 0.2)
            copy_ = image.copy()
            copy_[0, :, to_y : to_y + patch_h, to_x : to_x + patch_w] = np.clip(patch, 0.0, 1.0)
            mask = np.zeros((height, width), dtype=bool)
            mask[to_y : to_y + patch_h, to_x : to_x + patch_w] = True
            defective.append(copy_.astype(np.float32))
            masks.append(mask)
    return SyntheticDefects(defective, masks)


def network_scopes(module: FusedModel) -> list[str]:
    """The fused module's children that hold convolutions: the networks, which alone are quantised."""
    return [name for name, child in module.named_children() if any(isinstance(layer, nn.Conv2d) for layer in child.modules())]


def outside_networks(module: FusedModel) -> str:
    """A pattern of every graph node that is not in a network: the map arithmetic that stays float."""
    return rf"^/(?!{'|'.join(map(re.escape, network_scopes(module)))}).*"


def input_range(module: FusedModel) -> tuple[float, float]:
    """Every value the networks' input (image minus the mean colour, images in [0, 1]) can take: its int8 range."""
    return float(-module.input_offset.max()), float(1.0 - module.input_offset.min())


def _range_with_zero(low: float, high: float, levels: int = 256) -> tuple[float, float]:
    """The narrowest range covering [low, high] (low < 0 < high) in which zero is one of the ``levels`` values (asymmetric int8 needs it)."""
    top = levels - 1
    step, zero_point = min((max(-low / zero_point, high / (top - zero_point)), zero_point) for zero_point in range(1, top))
    return -zero_point * step, (top - zero_point) * step


def input_quantization_range(module: FusedModel) -> tuple[float, float]:
    """The int8 range of the networks' input: every value an image can give (:func:`input_range`), zero on its grid."""
    return _range_with_zero(*input_range(module))


def cover_every_image(graph, module: FusedModel) -> int:
    """Set the int8 range of the networks' input to :func:`input_quantization_range`, in place; returns how many quantisers it set.

    NNCF measures it on the calibration images, good parts of one product, whose colours span only
    part of what an image can hold; a defect of another colour was then clipped at the networks'
    input before any network saw it (bottle: 0.4% of the pixels of 59% of the synthetic-defect
    images; of the good ones, 0.001%). The full range costs resolution (steps of 1.06/255 where the
    calibration's were finer): with post-training quantisation alone, bottle's test AUROC fell from
    0.931 to 0.915, which quantisation-aware fine-tuning then learns around (README, "Precision").
    """
    from openvino import opset13 as opset

    low, high = input_quantization_range(module)
    outside = re.compile(outside_networks(module))
    changed = 0
    for op in graph.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize" and outside.match(op.input_value(0).get_node().get_friendly_name()):
            for index, value in ((1, low), (2, high), (3, low), (4, high)):
                shape = list(op.input_value(index).get_shape())
                op.input(index).replace_source_output(opset.constant(np.full(shape, value, np.float32)).output(0))
            changed += 1
    return changed


def post_training_int8(graph, module: FusedModel, calibration: Sequence[np.ndarray], kept_in_float: Sequence[str] = ()):
    """NNCF's post-training int8 of ``module``'s networks in ``graph`` (its OpenVINO model), the map arithmetic and the
    layer groups ``kept_in_float`` (:func:`layer_groups`) left in float, the input's range covering every image."""
    nncf = require_nncf()
    groups = layer_groups(module)
    scope = nncf.IgnoredScope(patterns=[outside_networks(module), *(groups[name] for name in kept_in_float)], validate=False)
    quantized = nncf.quantize(
        graph, nncf.Dataset(list(calibration)), subset_size=len(calibration), preset=nncf.QuantizationPreset.MIXED, ignored_scope=scope,
        advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=nncf.OverflowFix.ENABLE),
    )  # fmt: skip
    # With every convolution that reads the image kept in float, there is no input quantiser to widen.
    if cover_every_image(quantized, module) == 0 and not set(IMAGE_GROUPS) <= set(kept_in_float):
        raise EfficientADError("NNCF left the networks' input unquantised: this NNCF version places its quantisers differently")
    return quantized


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


class Measured(NamedTuple):
    """One graph on the acceptance images: raw maps, the quantiles of its held-out maps, scores and the two proxies."""

    raw: torch.Tensor
    quantiles: torch.Tensor
    scores: np.ndarray
    image_auroc: float
    au_pro: float


class LabelledImages(NamedTuple):
    """(1, 3, H, W) float images with labels (1: defective) and masks; the first ``n_normal`` are held-out normal images."""

    images: list[np.ndarray]
    labels: list[int]
    masks: np.ndarray
    n_normal: int = 0

    @classmethod
    def with_synthetic_defects(cls, validation: Sequence[np.ndarray]) -> LabelledImages:
        """The acceptance test's images: the held-out normal images, then their synthetic defects."""
        defects = synthetic_defects(validation, SYNTHETIC_DEFECTS_PER_IMAGE)
        size = validation[0].shape[2:]
        masks = np.stack([np.zeros(size, dtype=bool)] * len(validation) + defects.masks)
        return cls([*validation, *defects.images], [0] * len(validation) + [1] * len(defects.images), masks, len(validation))

    def measure(
        self,
        runner: Callable[[np.ndarray], InferenceOutput],
        module: FusedModel,
        quantile_levels: tuple[float, float],
        quantiles: torch.Tensor | None = None,
    ) -> Measured:
        """Run, and score everything as calibration would: with the quantiles of the normal images' maps, or ``quantiles``."""
        raw = raw_maps_of(_run(runner, self.images), module)
        if quantiles is None:
            quantiles = measure_map_quantiles(raw[: self.n_normal], *quantile_levels)
        maps = to_image_grid(normalize_maps(raw, *map_scale(quantiles)), module.image_size)
        scores = image_scores(maps).double().numpy()
        # Python floats: they go into the JSON record.
        return Measured(raw, quantiles, scores, float(image_auroc(self.labels, scores)), float(au_pro(self.masks, maps[:, 0].numpy())))


# The networks whose first convolution reads the image, and the layer groups (:func:`layer_groups`) holding those convolutions.
INPUT_NETWORKS = ("teacher_trunk", "student_trunk", "autoencoder")
IMAGE_GROUPS = ("teacher_trunk.0", "student_trunk.0", "autoencoder encoder")


def layer_groups(module: FusedModel) -> dict[str, str]:
    """The units that can be kept in float, each as a pattern of its graph nodes.

    Every convolution of the trunks and heads, and the autoencoder's encoder (up to its bottleneck)
    and decoder: their convolutions are small, and one at a time they would only lengthen the search.
    """
    groups = {}
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            groups[name] = rf"^/{re.escape(name)}/.*"
        elif name == "autoencoder":
            bottleneck = next(index for index, layer in enumerate(child) if isinstance(layer, nn.Upsample))
            for part, indices in (("encoder", range(bottleneck)), ("decoder", range(bottleneck, len(child)))):
                groups[f"autoencoder {part}"] = rf"^/autoencoder/autoencoder\.({'|'.join(map(str, indices))})/.*"
        elif isinstance(child, nn.Sequential):
            for index, layer in enumerate(child):
                if isinstance(layer, nn.Conv2d):
                    groups[f"{name}.{index}"] = rf"^/{name}/{name}\.{index}/.*"
    return groups


class AcceptanceBounds(NamedTuple):
    max_auroc_drop: float = INT8_MAX_AUROC_DROP
    max_au_pro_drop: float = INT8_MAX_AU_PRO_DROP
    max_score_error: float = INT8_MAX_SCORE_ERROR
    max_spread_change: float = INT8_MAX_SPREAD_CHANGE


def spread_changes(reference: torch.Tensor, candidate: torch.Tensor) -> dict[str, float]:
    """Relative change of each map's quantile spread (q0.995 - q0.9 of the held-out maps): the inverse of its gain."""
    ratios = (map_scale(reference)[0] / map_scale(candidate)[0]).flatten().double().tolist()
    return {"local": ratios[0] - 1.0, "global": ratios[1] - 1.0}


def acceptance_check(reference: Measured, candidate: Measured, n_normal: int, bounds: AcceptanceBounds) -> dict[str, Any]:
    """The acceptance test of ``candidate`` against ``reference`` (the same images, the first ``n_normal`` normal).

    Besides the two proxies and the held-out score error, each map's quantile spread on the held-out
    images may change by at most ``max_spread_change`` (relative): the spread is the map's divisor,
    so int8 noise that widens one map's tail re-weights the two maps in the combined one, which
    moves both the image ranking and the localisation, on defects of every kind, not only pasted
    ones (bottle, seed 1: the local spread +61%, test AUROC -0.011; the teacher's last trunk
    convolution in float: +10%, -0.002). ``shortfall`` is how far outside the bounds it lies, each
    excess in units of its own bound: 0 when it passes, and what keeping layers in float has to bring down.
    """
    drops = {"image_auroc_drop": reference.image_auroc - candidate.image_auroc, "au_pro_drop": reference.au_pro - candidate.au_pro}
    errors = np.abs(candidate.scores[:n_normal] - reference.scores[:n_normal])
    error = float(errors.mean())
    spreads = spread_changes(reference.quantiles, candidate.quantiles)
    shortfall = (
        max(0.0, drops["image_auroc_drop"] - bounds.max_auroc_drop) / bounds.max_auroc_drop
        + max(0.0, drops["au_pro_drop"] - bounds.max_au_pro_drop) / bounds.max_au_pro_drop
        + max(0.0, error - bounds.max_score_error) / bounds.max_score_error
        + sum(max(0.0, abs(change) - bounds.max_spread_change) / bounds.max_spread_change for change in spreads.values())
    )
    return {
        "image_auroc": candidate.image_auroc, "au_pro": candidate.au_pro, **drops,
        "validation_score_error_mean": error, "validation_score_error_max": float(errors.max()),
        "map_spread_change": spreads, "shortfall": float(shortfall), "passed": bool(shortfall == 0.0),
    }  # fmt: skip


class Trial(NamedTuple):
    """One quantisation tried: what it measured, and its verdict (``passed``, ``shortfall``, the proxies)."""

    result: Any
    check: dict[str, Any]


def search_float_layers(groups: Sequence[str], trial: Callable[[list[str]], Trial]) -> tuple[list[str], Trial]:
    """The layer groups to keep in float, and the trial of the quantisation that keeps them.

    All int8 first. If that fails, one pass of sensitivity tries each group alone in float, ending at
    the first that passes (bottle after quantisation-aware fine-tuning: the fourth of 11); then the
    groups are kept in float in the order of how close each alone came to passing (least
    ``shortfall`` first), one more at a time, until a trial passes: fewer than ``2 * len(groups)``
    trials, where NNCF's accuracy control re-ranked every group after each revert (still going after
    45 minutes on bottle on 2 cores). Every group in float is never tried: that is fp32, which passes
    by definition and is not int8 (it once ended a search on bottle, an "int8" export as slow as
    fp32). Where nothing passes, the trial closest to passing is returned, and it has not passed.
    """
    kept: list[str] = []
    outcome = trial(kept)
    if outcome.check["passed"]:
        return kept, outcome
    alone: dict[str, Trial] = {}
    for name in groups:
        alone[name] = trial([name])
        if alone[name].check["passed"]:  # no search keeps fewer groups in float; the rest of the pass is not run
            return [name], alone[name]
    best = min([([], outcome), *(([name], alone[name]) for name in groups)], key=lambda tried: tried[1].check["shortfall"])
    for name in sorted(groups, key=lambda name: alone[name].check["shortfall"])[: len(groups) - 1]:
        kept.append(name)
        outcome = alone[name] if len(kept) == 1 else trial(list(kept))
        if outcome.check["passed"]:
            return kept, outcome
        if outcome.check["shortfall"] < best[1].check["shortfall"]:
            best = (list(kept), outcome)
    return best


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
    max_auroc_drop: float = INT8_MAX_AUROC_DROP,
    max_au_pro_drop: float = INT8_MAX_AU_PRO_DROP,
    max_score_error: float = INT8_MAX_SCORE_ERROR,
    max_spread_change: float = INT8_MAX_SPREAD_CHANGE,
    expected_validation_scores: Sequence[float] | None = None,
    threads: int | None = None,
    fine_tuned: tuple[FusedModel, dict[str, Any]] | None = None,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
) -> Int8Model:
    """Quantise ``model``'s networks to int8, keeping in float the layers its accuracy needs.

    ``calibration``: training images (float32 (1, 3, H, W) in [0, 1]) that set the activation ranges;
    ``validation``: the held-out normal images the model was calibrated on, never trained on, which
    with their synthetic defects decide which layers stay float and on which the quantiles and
    threshold are measured again. ``quantile_levels`` and ``false_positive_rate`` are the model's
    training settings. The record's ``accepted`` says whether, against the same model in fp32, the
    image AUROC and AU-PRO of the held-out images against their synthetic defects fell by at most
    ``max_auroc_drop`` and ``max_au_pro_drop``, the held-out images' scores moved by at most
    ``max_score_error`` on average (0.1 is a normal image's rare extreme), and each map's quantile
    spread on them by at most ``max_spread_change`` (relative), see :func:`acceptance_check`.
    ``expected_validation_scores`` (the model file's) prove that ``validation`` are the images the
    model was calibrated on. ``fine_tuned``: (networks, record) to quantise instead of ``model``'s own
    fused networks, from quantisation-aware fine-tuning
    (:func:`efficientad.training.quantization_aware.fine_tune_for_int8`); the reference stays
    ``model`` in fp32, and the record goes into the calibration record. ``on_trial`` is called with
    each quantisation's record as it is measured (the search can take many minutes).
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
    module = FusedModel(model, fuse_local_head=False)
    float_graph = openvino_model(module)
    to_quantize = module if fine_tuned is None else fine_tuned[0]
    source_graph = float_graph if fine_tuned is None else openvino_model(to_quantize)
    images = LabelledImages.with_synthetic_defects(validation)
    n = images.n_normal

    def measured(graph) -> Measured:
        return images.measure(OpenVinoSession(graph, "fp32", threads).run, module, quantile_levels)

    # The reference is fp32 deployed as the int8 model will be: quantiles measured on its own validation maps.
    reference = measured(float_graph)
    if expected_validation_scores is not None:
        _check_same_images(scores_of(reference.raw[:n], model.map_quantiles, module.image_size), expected_validation_scores)

    bounds = AcceptanceBounds(max_auroc_drop, max_au_pro_drop, max_score_error, max_spread_change)

    def verdict(candidate: Measured) -> dict[str, Any]:
        return acceptance_check(reference, candidate, n, bounds)

    groups = layer_groups(module)

    def quantized(graph, kept: Sequence[str]):
        return post_training_int8(graph, module, calibration, kept)

    trials: list[dict[str, Any]] = []

    def trial(kept: Sequence[str]) -> Trial:
        result = measured(quantized(source_graph, kept))
        trials.append({"kept_in_float": list(kept), **verdict(result)})
        if on_trial is not None:
            on_trial(trials[-1])
        return Trial(result, trials[-1])

    kept, (result, check) = search_float_layers(list(groups), trial)

    # The same quantisation with the quantiles measured on it baked in: the networks' int8 ranges depend
    # only on the calibration images, so the second graph's raw maps equal the first's (checked below).
    final_module = copy.deepcopy(to_quantize)
    for buffer, value in zip((final_module.map_gain, final_module.map_offset), map_scale(result.quantiles)):
        buffer.copy_(value)
    final_graph = quantized(openvino_model(final_module), kept)
    output = _run(OpenVinoSession(final_graph, "fp32", threads).run, images.images)
    final_raw = raw_maps_of(output, final_module)
    drift = float((final_raw - result.raw).abs().max() / result.raw.abs().max())
    if drift > 1e-4:
        raise EfficientADError(f"int8 quantisation is not repeatable here (raw maps moved by {drift:.1e}, relative); nothing was written")
    scores = output.score.astype(np.float64)
    validation_scores = torch.from_numpy(scores[:n])
    threshold = decision_threshold(validation_scores, false_positive_rate)
    error = np.abs(scores - reference.scores)
    relative = error[n:] / np.maximum(np.abs(reference.scores[n:]), 1e-12)
    reference_normalised = normalize_maps(reference.raw, *map_scale(reference.quantiles))[:, 0]
    final_normalised = normalize_maps(final_raw, *map_scale(result.quantiles))[:, 0]
    record = {
        "precision": "int8",
        "tool": f"nncf {nncf.__version__}, post-training quantisation (OpenVINO){'' if fine_tuned is None else ' after quantisation-aware fine-tuning'}; "
        "layers kept in float by one sensitivity pass",
        "quantization_aware_fine_tuning": None if fine_tuned is None else fine_tuned[1],
        # Exports from before it was recorded used the full range (past the first convolutions), which CPUs without VNNI saturate.
        "weights_half_range": True,
        "n_calibration_images": len(calibration),
        "n_validation_images": n,
        "n_synthetic_defect_images": len(images.images) - n,
        "synthetic_defect_seed": SYNTHETIC_DEFECT_SEED,
        "kept_in_float": kept,
        "float_convolutions": float_convolutions(final_graph),
        "n_convolutions": count_convolutions(final_graph),
        "map_quantiles": MapQuantiles(*result.quantiles.tolist())._asdict(),
        "fp32_map_quantiles": MapQuantiles(*reference.quantiles.tolist())._asdict(),
        "quantile_levels": list(quantile_levels),
        "threshold": threshold,
        "false_positive_rate": false_positive_rate,
        "validation_scores": validation_scores.tolist(),
        "acceptance": {
            "images": "the held-out normal images against their synthetic defects",
            "fp32": {"image_auroc": reference.image_auroc, "au_pro": reference.au_pro},
            "int8": {key: check[key] for key in ("image_auroc", "au_pro", "image_auroc_drop", "au_pro_drop", "validation_score_error_mean", "map_spread_change")},
            "max_image_auroc_drop": max_auroc_drop,
            "max_au_pro_drop": max_au_pro_drop,
            "max_score_error": max_score_error,
            "max_map_spread_change": max_spread_change,
        },
        "trials": trials,
        "drift": {
            "validation_score_error_mean": float(error[:n].mean()),
            "validation_score_error_max": float(error[:n].max()),
            "synthetic_defect_relative_score_error_mean": float(relative.mean()),
            "synthetic_defect_relative_score_error_max": float(relative.max()),
            "map_error_max": float((final_normalised - reference_normalised).abs().max()),
        },
        "accepted": bool(check["passed"]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return Int8Model(final_graph, result.quantiles, threshold, record)


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
