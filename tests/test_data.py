import numpy as np
import pytest
from PIL import Image

from efficientad.data.images import list_images, load_images, read_image, split_validation
from efficientad.errors import EfficientADError


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(EfficientADError, match="image folder not found"):
        list_images(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EfficientADError, match="no images in"):
        list_images(tmp_path)


def test_grayscale_rgba_palette_and_16_bit_become_rgb(tmp_path):
    gray = np.full((20, 30), 128, np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((20, 30), 32768, np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(np.full((20, 30, 3), 60, np.uint8)).convert("P", palette=Image.ADAPTIVE).save(tmp_path / "palette.png")
    for name, expected in [("gray", 128), ("rgba", 200), ("deep", 128), ("palette", 60)]:
        image = read_image(tmp_path / f"{name}.png")
        assert image.mode == "RGB" and image.size == (30, 20)
        assert abs(int(np.asarray(image)[0, 0, 0]) - expected) <= 1, name


def test_truncated_image_is_named(tmp_path):
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(EfficientADError, match="corrupt or truncated image .*cut.png"):
        read_image(tmp_path / "cut.png")


def test_non_image_file_is_named(tmp_path):
    (tmp_path / "fake.jpg").write_text("this is text")
    with pytest.raises(EfficientADError, match="not an image file.*fake.jpg"):
        read_image(tmp_path / "fake.jpg")


def test_missing_file(tmp_path):
    with pytest.raises(EfficientADError, match="image not found"):
        read_image(tmp_path / "nope.png")


def test_arrays_of_several_kinds():
    assert read_image(np.zeros((8, 9), np.uint8)).size == (9, 8)
    assert np.asarray(read_image(np.ones((8, 9, 3), np.float32)))[0, 0, 0] == 255
    with pytest.raises(EfficientADError, match="HxW"):
        read_image(np.zeros((8, 9, 5), np.uint8))


def test_load_images_resizes_and_stacks(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((40 + i, 50, 3), i * 50, np.uint8)).save(tmp_path / f"{i}.png")
    tensor = load_images(list_images(tmp_path), (32, 48))
    assert tensor.shape == (3, 3, 32, 48) and tensor.dtype.is_floating_point is False
    assert int(tensor[2, 0, 0, 0]) == 100


def test_every_unreadable_image_is_named_at_once(tmp_path):
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"good{i}.png")
    (tmp_path / "a_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (tmp_path / "z_text.jpg").write_text("not an image")
    with pytest.raises(EfficientADError) as caught:
        load_images(list_images(tmp_path), (8, 8))
    message = str(caught.value)
    assert message.startswith("2 of 5 images cannot be read") and "a_broken.png" in message and "z_text.jpg" in message
    assert "\n" not in message


def test_a_long_list_of_unreadable_images_is_cut_short(tmp_path):
    for i in range(25):
        (tmp_path / f"{i:02d}.png").write_bytes(b"")
    message = str(pytest.raises(EfficientADError, load_images, list_images(tmp_path), (8, 8)).value)
    assert message.startswith("25 of 25 images") and "19.png" in message and "20.png" not in message
    assert message.endswith("; and 5 more")


def test_split_is_seeded_and_disjoint():
    items = list(range(209))
    train, validation = split_validation(items, 0.1, seed=0)
    assert len(train) == 188 and len(validation) == 21
    assert sorted(train + validation) == items
    assert split_validation(items, 0.1, seed=0) == (train, validation)
    assert split_validation(items, 0.1, seed=1) != (train, validation)
    with pytest.raises(EfficientADError, match="at least 2"):
        split_validation([1], 0.1, seed=0)


def test_to_float_never_changes_its_input():
    import torch

    from efficientad.data.images import to_float

    for images in (torch.full((1, 3, 2, 2), 255, dtype=torch.uint8), torch.full((1, 3, 2, 2), 255.0)):
        before = images.clone()
        converted = to_float(images)
        assert torch.equal(images, before)
        assert converted.dtype == torch.float32 and float(converted.max()) == 1.0
