"""The deployed EfficientAD: image in, score and anomaly maps out, in one ``forward``.

:class:`FusedModel` computes what :class:`~efficientad.model.EfficientADModel` computes, with
the map formula of :mod:`efficientad.model` and every constant folded away:

- ImageNet normalisation: one subtraction of the mean shared by all three networks, the division by
  the standard deviation (and by 255 for uint8 input) folded into their first convolutions. The mean
  cannot go into the biases because the autoencoder's first convolution pads with zeros, and zero
  must keep meaning "the mean colour" there;
- the teacher's output normalisation (mean/std per channel) folded into its last convolution;
- teacher minus student: the teacher's last convolution and the first half of the student's last
  convolution run as one convolution over both inputs, which yields the difference directly (in
  bf16 it is then rounded relative to the difference, not to the larger features). For int8 they
  stay two convolutions (``fuse_local_head=False``): one convolution has one activation scale, and
  the teacher trunk's outputs are about 3x smaller than the student's (bottle: largest 2.8 against
  9.6, median channel 0.28), so in one they would get a few of the 256 levels;
- the map quantiles become one scale and offset per map.

Running the teacher's and student's identically shaped layers as single convolutions (concatenated
outputs for the first, two groups after it) was tried and dropped: on an AVX-512 CPU with oneDNN it
was 3-7% slower than the separate convolutions, in fp32 and bf16.

The runtimes that run it (PyTorch, ONNX Runtime, OpenVINO) are in :mod:`efficientad.deploy.runtimes`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from ..choices import INPUT_DTYPES, check_choice
from ..errors import EfficientADError
from ..model import EfficientADModel, image_scores, map_scale, normalize_maps, pad_maps, resize_maps
from ..networks import TEACHER_CHANNELS


def _stages(network: nn.Sequential) -> list[tuple[nn.Conv2d, bool, nn.AvgPool2d | None]]:
    """A PDN as (conv, ReLU after it, pooling after that) triples."""
    stages: list[tuple[nn.Conv2d, bool, nn.AvgPool2d | None]] = []
    for layer in network:
        if isinstance(layer, nn.Conv2d):
            stages.append((layer, False, None))
        elif isinstance(layer, nn.ReLU):
            stages[-1] = (stages[-1][0], True, None)
        elif isinstance(layer, nn.AvgPool2d):
            stages[-1] = (stages[-1][0], stages[-1][1], layer)
        else:
            raise EfficientADError(f"unexpected layer {type(layer).__name__} in a PDN")
    return stages


def _conv_like(conv: nn.Conv2d, in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, conv.kernel_size, conv.stride, conv.padding)


def _part_of(conv: nn.Conv2d, channels: slice) -> nn.Conv2d:
    """The convolution computing ``conv``'s output ``channels`` only."""
    part = _conv_like(conv, conv.in_channels, len(range(conv.out_channels)[channels]))
    part.weight.copy_(conv.weight[channels])
    part.bias.copy_(conv.bias[channels])
    return part


def _trunk(stages: list[tuple[nn.Conv2d, bool, nn.AvgPool2d | None]]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for conv, relu, pool in stages:
        layers.append(copy.deepcopy(conv))
        if relu:
            layers.append(nn.ReLU(inplace=True))
        if pool is not None:
            layers.append(copy.deepcopy(pool))
    return nn.Sequential(*layers)


class FusedModel(nn.Module):
    """EfficientAD from image to score in one ``forward``, with all constants folded into weights.

    Built from a calibrated :class:`EfficientADModel` (whose weights it copies; later changes to that
    model do not reach it). ``forward(images)`` takes (N, 3, H, W) at the model's ``image_size``,
    floats in [0, 1] or, with ``input_dtype="uint8"``, bytes in [0, 255], and returns
    ``(score, anomaly_map, local_map, global_map)``: scores (N,) and maps (N, 1, *output_size*),
    always float32. The score is the combined map's maximum at ``image_size``. ``output_size``
    defaults to the padded feature grid (64x64 at 256x256): resized bilinearly to an image's own
    size, such a map is exactly the reference reproduction's, and it is 16x smaller to hand back.
    """

    def __init__(
        self,
        model: EfficientADModel,
        output_size: Sequence[int] | None = None,
        input_dtype: str = "float32",
        allow_uncalibrated: bool = False,
        fuse_local_head: bool = True,
    ):
        super().__init__()
        if not (model.is_calibrated or allow_uncalibrated):
            raise EfficientADError("the model has no map quantiles yet: train (fit) it before exporting or benchmarking")
        check_choice("input_dtype", input_dtype, INPUT_DTYPES)
        self.model_size = model.model_size
        self.image_size = tuple(model.image_size)
        self.output_size = model.padded_map_size if output_size is None else tuple(int(v) for v in output_size)
        self.resize_output = self.output_size != model.padded_map_size
        if len(self.output_size) != 2 or min(self.output_size) < 1:
            raise EfficientADError(f"output_size must be (height, width) of positive ints, got {output_size!r}")
        self.input_dtype = input_dtype
        self.fuse_local_head = fuse_local_head

        self._build(copy.deepcopy(model).float().cpu())
        self.requires_grad_(False).eval()

    @torch.no_grad()
    def _build(self, model: EfficientADModel) -> None:
        scale = 255.0 if self.input_dtype == "uint8" else 1.0
        # (x*scale - mean)/std = (x - mean/scale) * (1/(scale*std)): subtract here, multiply in the conv.
        self.register_buffer("input_offset", (model.input_mean * scale).clone())
        input_gain = (1.0 / (model.input_std * scale)).view(1, 3, 1, 1)

        teacher = _stages(model.teacher)
        student = _stages(model.student)
        if any(teacher[0][0].padding) or any(student[0][0].padding):
            # The autoencoder's zero padding is why the mean is subtracted outside the convolutions;
            # a padded PDN would be no different, but nothing here was checked for that case.
            raise EfficientADError("expected the anomaly-detection PDNs, whose first convolution is unpadded")

        def scaled_first(conv: nn.Conv2d) -> nn.Conv2d:
            folded = copy.deepcopy(conv)
            folded.weight.mul_(input_gain)
            return folded

        # Teacher output normalisation into its last conv: (W h + b - mean) / std.
        last_t = copy.deepcopy(teacher[-1][0])
        std = model.teacher_std.view(-1)
        last_t.weight.div_(std.view(-1, 1, 1, 1))
        last_t.bias.sub_(model.teacher_mean.view(-1)).div_(std)
        teacher = [(scaled_first(teacher[0][0]), *teacher[0][1:])] + teacher[1:-1] + [(last_t, *teacher[-1][1:])]
        student = [(scaled_first(student[0][0]), *student[0][1:])] + student[1:]

        self.teacher_trunk = _trunk(teacher[:-1])
        self.student_trunk = _trunk(student[:-1])

        last_s = student[-1][0]
        if self.fuse_local_head:
            # teacher - student[:384] as one conv over the concatenated inputs: W_t h_t - W_s h_s.
            self.local_head = _conv_like(last_t, last_t.in_channels + last_s.in_channels, TEACHER_CHANNELS)
            self.local_head.weight.copy_(torch.cat([last_t.weight, -last_s.weight[:TEACHER_CHANNELS]], dim=1))
            self.local_head.bias.copy_(last_t.bias - last_s.bias[:TEACHER_CHANNELS])
        else:
            self.teacher_head = last_t
            self.student_local_head = _part_of(last_s, slice(0, TEACHER_CHANNELS))
        self.global_head = _part_of(last_s, slice(TEACHER_CHANNELS, None))

        layers = [copy.deepcopy(m) for m in model.autoencoder if not isinstance(m, nn.Dropout)]
        layers[0].weight.mul_(input_gain)
        self.autoencoder = nn.Sequential(*layers)

        if model.is_calibrated:
            gain, offset = map_scale(model.map_quantiles)
        else:  # only raw_maps is meaningful: what calibration measures the quantiles on
            gain, offset = torch.full((1, 2, 1, 1), float("nan")), torch.full((1, 2, 1, 1), float("nan"))
        self.register_buffer("map_gain", gain)
        self.register_buffer("map_offset", offset)

    def differences(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher minus student, and autoencoder minus student, per channel at the feature grid: (N, 384, h, w) each."""
        # The convolutions' dtype: TorchSession converts only them to bf16/fp16, never the constants.
        x = (images.float() - self.input_offset).to(next(self.autoencoder.parameters()).dtype)
        student = self.student_trunk(x)
        if self.fuse_local_head:
            local_difference = self.local_head(torch.cat([self.teacher_trunk(x), student], dim=1))
        else:
            local_difference = self.teacher_head(self.teacher_trunk(x)) - self.student_local_head(student)
        return local_difference, self.autoencoder(x) - self.global_head(student)

    def raw_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Un-normalised (local, global) maps at the feature grid, (N, 2, h, w), float32."""
        local_difference, global_difference = self.differences(images)
        # Squares and means in float32 even in bf16/fp16: half-precision sums of 384 squares lose digits.
        return torch.cat(
            [
                local_difference.float().pow(2).mean(dim=1, keepdim=True),
                global_difference.float().pow(2).mean(dim=1, keepdim=True),
            ],
            dim=1,
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        padded = pad_maps(normalize_maps(self.raw_maps(images), self.map_gain, self.map_offset))
        # The score is always taken at the image size, whatever size the maps are handed back at.
        score = image_scores(resize_maps(padded, self.image_size))
        maps = resize_maps(padded, self.output_size) if self.resize_output else padded
        return score, maps[:, 0:1], maps[:, 1:2], maps[:, 2:3]
