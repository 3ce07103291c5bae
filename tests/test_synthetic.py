from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from efficientad.errors import EfficientADError
from efficientad.data.synthetic import DEFECT_TYPES, _sample, make_dataset

# Small images keep the suite fast; the geometry scales with size, so the checks carry over.
SIZE = 96


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("syn"), n_train=6, n_test_good=3, n_test_defect=7, size=SIZE)


def test_layout_and_counts(dataset: Path) -> None:
    assert dataset.name == "widget"
    assert sorted(p.name for p in (dataset / "train" / "good").iterdir()) == [f"{i:03d}.png" for i in range(6)]
    assert len(list((dataset / "test" / "good").glob("*.png"))) == 3
    assert not (dataset / "ground_truth" / "good").exists()
    # 7 defect images shared out in turn over three types.
    counts = [len(list((dataset / "test" / d).glob("*.png"))) for d in DEFECT_TYPES]
    assert counts == [3, 2, 2]
    for defect in DEFECT_TYPES:
        stems = sorted(p.stem for p in (dataset / "test" / defect).glob("*.png"))
        masks = sorted(p.name for p in (dataset / "ground_truth" / defect).glob("*.png"))
        assert masks == [f"{stem}_mask.png" for stem in stems]


def test_images_and_masks_have_the_right_format(dataset: Path) -> None:
    with Image.open(dataset / "test" / "scratch" / "000.png") as image:
        assert image.mode == "RGB" and image.size == (SIZE, SIZE)
    with Image.open(dataset / "ground_truth" / "scratch" / "000_mask.png") as mask:
        assert mask.mode == "L" and mask.size == (SIZE, SIZE)
        assert set(np.unique(np.asarray(mask))) == {0, 255}


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_masks_are_small_but_not_empty(dataset: Path, defect: str) -> None:
    for path in (dataset / "ground_truth" / defect).glob("*.png"):
        fraction = (_read(path) > 0).mean()
        assert 0.002 < fraction < 0.04, (path, fraction)


@pytest.mark.parametrize("folder", ["train", "good"])
def test_good_images_have_no_defect(folder: str) -> None:
    for index in range(3):
        image, mask = _sample(0, folder, index, SIZE)
        assert not mask.any()
        assert np.array_equal(image, _sample(0, folder, index, SIZE, with_defect=False)[0])


@pytest.mark.parametrize("defect", DEFECT_TYPES)
def test_mask_covers_exactly_the_changed_pixels(defect: str) -> None:
    for index in range(3):
        image, mask = _sample(0, defect, index, SIZE)
        clean, clean_mask = _sample(0, defect, index, SIZE, with_defect=False)
        assert not clean_mask.any()
        changed = (image != clean).any(axis=-1)
        assert not (changed & ~mask).any()
        # Only the faint outermost ring of a soft edge may round back to the clean value.
        assert (changed & mask).sum() >= 0.9 * mask.sum()
        # Visible: on average several times the sensor noise (about 3 grey levels) over the defect.
        difference = np.abs(image.astype(int) - clean.astype(int)).max(axis=-1)
        assert difference[mask].mean() > 12


def test_same_seed_same_files_and_other_seed_differs(tmp_path: Path, dataset: Path) -> None:
    again = make_dataset(tmp_path / "a", n_train=6, n_test_good=3, n_test_defect=7, size=SIZE)
    other = make_dataset(tmp_path / "b", n_train=6, n_test_good=3, n_test_defect=7, size=SIZE, seed=1)
    for relative in ["train/good/000.png", "test/stain/001.png", "ground_truth/worn/000_mask.png"]:
        assert np.array_equal(_read(dataset / relative), _read(again / relative))
        assert not np.array_equal(_read(dataset / relative), _read(other / relative))


def test_good_images_differ_but_look_alike(dataset: Path) -> None:
    paths = sorted((dataset / "train" / "good").glob("*.png")) + sorted((dataset / "test" / "good").glob("*.png"))
    images = np.stack([_read(p).astype(np.float64) for p in paths])
    for i in range(len(images)):
        for j in range(i):
            assert np.abs(images[i] - images[j]).mean() > 1.0
    means = images.mean(axis=(1, 2, 3))
    stds = images.std(axis=(1, 2, 3))
    assert means.std() < 0.05 * means.mean()
    assert stds.std() < 0.05 * stds.mean()
    # Averaged over 8x8 blocks, which hides grooves and noise, every good part has the same layout.
    blocks = images.reshape(len(images), SIZE // 8, 8, SIZE // 8, 8, 3).mean(axis=(2, 4))
    assert np.corrcoef(blocks.reshape(len(images), -1)).min() > 0.85


def test_rerun_replaces_own_output_but_not_foreign_data(tmp_path: Path) -> None:
    first = make_dataset(tmp_path, n_train=4, n_test_good=1, n_test_defect=3, size=64)
    second = make_dataset(tmp_path, n_train=2, n_test_good=1, n_test_defect=0, size=64)
    assert first == second
    assert len(list((second / "train" / "good").glob("*.png"))) == 2
    assert not (second / "ground_truth").exists()

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(EfficientADError, match="not written by efficientad"):
        make_dataset(tmp_path, category="mine", size=64)
    assert (foreign / "keep.txt").read_text() == "user data"


@pytest.mark.parametrize(
    "kwargs",
    [{"n_train": 0}, {"n_test_defect": -1}, {"size": 32}, {"seed": -1}, {"category": "a/b"}, {"category": ""}],
)
def test_bad_arguments_are_rejected(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(EfficientADError):
        make_dataset(tmp_path, **kwargs)
