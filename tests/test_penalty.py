"""Penalty images: prepared as the reference does, held at the crop's size, or read per step when many."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from efficientad.data.images import list_images, load_images
from efficientad.training.penalty import PenaltyImages


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("penalty")
    rng = np.random.default_rng(0)
    for i, size in enumerate([(300, 400), (256, 256), (500, 333)]):
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(root / f"{i}.png")
    (root / "nested").mkdir()
    Image.fromarray((rng.random((280, 280, 3)) * 255).astype(np.uint8)).save(root / "nested" / "3.jpg")
    return root


def test_images_are_the_centre_crop_of_a_2x_resize(folder):
    penalty = PenaltyImages(folder, (256, 256), progress=False)
    assert len(penalty) == 4 and penalty.in_memory
    # The reference's preparation: resize to twice the size, then take the centre.
    doubled = load_images(list_images(folder, recursive=True), (512, 512))
    torch.testing.assert_close(penalty.images, doubled[:, :, 128:384, 128:384], rtol=0, atol=0)


def test_memory_holds_one_crop_per_image(folder):
    penalty = PenaltyImages(folder, (256, 320), progress=False)
    assert penalty.images.dtype == torch.uint8
    assert penalty.images.numel() == 4 * 3 * 256 * 320


def test_a_folder_over_the_memory_limit_is_read_per_step_with_the_same_pixels(folder):
    in_memory = PenaltyImages(folder, (256, 256), progress=False)
    lazy = PenaltyImages(folder, (256, 256), progress=False, memory_limit_bytes=3 * 256 * 256)
    assert not lazy.in_memory and lazy.images is None
    for index in range(len(lazy)):
        assert torch.equal(lazy[index], in_memory[index])
