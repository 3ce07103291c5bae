"""Backbones a teacher can be distilled from: torchvision names and their layer2/layer3 widths.

Kept free of torch so that the CLI can offer the names without importing it.
"""

BACKBONES: dict[str, tuple[int, int]] = {
    "wide_resnet101_2": (512, 1024),
    "wide_resnet50_2": (512, 1024),
    "resnet18": (128, 256),
    "resnet50": (512, 1024),
}
