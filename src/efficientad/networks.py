"""The three networks of EfficientAD: PDN-small, PDN-medium and the autoencoder.

Each network is an ``nn.Sequential`` so that its ``state_dict`` keys are the indices the paper's
reference reproduction uses (small: 0, 3, 6, 8; medium: 0, 3, 6, 8, 10, 12) and its published
teachers load without renaming.

Table 6 and 7 of the paper (PDN) and table 8 (autoencoder) are readable in ``PDN_SPECS`` and
``autoencoder``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import EfficientADError

TEACHER_CHANNELS = 384
# The encoder halves the image five times and then needs an 8x8 grid for its last 8x8 conv.
MIN_IMAGE_SIDE = 256


@dataclass(frozen=True)
class ConvSpec:
    """One convolution of a PDN; ``pool`` adds a 2x2 average pooling after its ReLU."""

    out_channels: int | None  # None: the network's output channels
    kernel: int
    padding: int = 0  # applied only when the PDN is built with padding on
    relu: bool = True
    pool: bool = False


PDN_SPECS: dict[str, tuple[ConvSpec, ...]] = {
    "s": (
        ConvSpec(128, 4, padding=3, pool=True),
        ConvSpec(256, 4, padding=3, pool=True),
        ConvSpec(256, 3, padding=1),
        ConvSpec(None, 4, relu=False),
    ),
    "m": (
        ConvSpec(256, 4, padding=3, pool=True),
        ConvSpec(512, 4, padding=3, pool=True),
        ConvSpec(512, 1),
        ConvSpec(512, 3, padding=1),
        ConvSpec(None, 4),
        ConvSpec(None, 1, relu=False),
    ),
}


def pdn(model_size: str, out_channels: int = TEACHER_CHANNELS, padding: bool = False) -> nn.Sequential:
    """Build a patch description network.

    ``padding=False`` is the anomaly-detection setting (256x256 input gives 56x56 maps, each output
    pixel sees a 33x33 patch of the input). ``padding=True`` is the pretraining setting (256x256
    gives 64x64, the grid of the distillation target).
    """
    if model_size not in PDN_SPECS:
        raise EfficientADError(f"model_size must be one of {sorted(PDN_SPECS)}, got {model_size!r}")
    layers: list[nn.Module] = []
    in_channels = 3
    for spec in PDN_SPECS[model_size]:
        channels = out_channels if spec.out_channels is None else spec.out_channels
        layers.append(nn.Conv2d(in_channels, channels, spec.kernel, padding=spec.padding if padding else 0))
        if spec.relu:
            layers.append(nn.ReLU(inplace=True))
        if spec.pool:
            layers.append(nn.AvgPool2d(kernel_size=2, stride=2, padding=1 if padding else 0))
        in_channels = channels
    return nn.Sequential(*layers)


def pdn_output_side(model_size: str, side: int, padding: bool = False) -> int:
    """Side length of a PDN's output map for an input side length."""
    for spec in PDN_SPECS[model_size]:
        side = side + 2 * (spec.padding if padding else 0) - spec.kernel + 1
        if spec.pool:
            side = (side + 2 * (1 if padding else 0) - 2) // 2 + 1
    return side


def check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """Validate an (height, width) training size and return it as a tuple of ints."""
    height, width = (int(v) for v in image_size)
    if min(height, width) < MIN_IMAGE_SIDE:
        raise EfficientADError(
            f"image_size must be at least {MIN_IMAGE_SIDE} on each side (the autoencoder's encoder "
            f"needs an 8x8 grid after five halvings), got {height}x{width}"
        )
    return height, width


def _decoder_sizes(side: int) -> list[int]:
    # The paper's 256x256 decoder upsamples to 3, 8, 15, 32, 63, 127 and each 4x4 conv with padding 2
    # adds one pixel; these fractions of the input side reproduce that and scale to other sizes.
    return [side // 64 - 1, side // 32, side // 16 - 1, side // 8, side // 4 - 1, side // 2 - 1]


def autoencoder(
    image_size: tuple[int, int] = (256, 256),
    out_channels: int = TEACHER_CHANNELS,
    output_size: tuple[int, int] | None = None,
) -> nn.Sequential:
    """Build the autoencoder for one input size.

    The decoder's upsampling targets derive from ``image_size`` and its last upsampling lands on
    ``output_size`` (default: the unpadded PDN's output grid, 56x56 at 256x256).
    """
    height, width = check_image_size(image_size)
    if output_size is None:
        output_size = (pdn_output_side("s", height), pdn_output_side("s", width))
    encoder_channels = [3, 32, 32, 64, 64, 64]
    layers: list[nn.Module] = []
    for in_channels, channels in zip(encoder_channels, encoder_channels[1:]):
        layers += [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.ReLU(inplace=True)]
    layers.append(nn.Conv2d(64, 64, 8))
    for size in zip(_decoder_sizes(height), _decoder_sizes(width)):
        layers += [
            nn.Upsample(size=size, mode="bilinear"),
            nn.Conv2d(64, 64, 4, stride=1, padding=2),
            nn.ReLU(inplace=True),
            nn.Dropout(0.2),
        ]
    layers += [
        nn.Upsample(size=tuple(output_size), mode="bilinear"),
        nn.Conv2d(64, 64, 3, stride=1, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(64, out_channels, 3, stride=1, padding=1),
    ]
    return nn.Sequential(*layers)
