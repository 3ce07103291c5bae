import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from efficientad.data.datasets import (
    DefectSpec,
    Sample,
    load_defects_config,
    load_folder_split,
    load_split,
    read_loco_regions,
    read_mask,
)
from efficientad.errors import EfficientADError
from .conftest import SHARED, requires_shared

SHARED_DATA = SHARED / "data"


def image(path: Path, value=0, size=(8, 6), mode="L") -> Path:
    """Write a tiny image of ``size`` (width, height) filled with ``value``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def mask(path: Path, pixels, value=255, size=(8, 6)) -> Path:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    for y, x in pixels:
        array[y, x] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def make_mvtec(root: Path) -> Path:
    base = root / "widget"
    for name in ("000.png", "001.png", "002.png"):
        image(base / "train" / "good" / name)
    image(base / "test" / "good" / "000.png")
    image(base / "test" / "scratch" / "000.png")
    image(base / "test" / "scratch" / "001.png")
    image(base / "test" / "crack" / "000.png")
    mask(base / "ground_truth" / "scratch" / "000_mask.png", [(0, 0)])
    mask(base / "ground_truth" / "crack" / "000_mask.png", [(1, 1)])
    return root


def test_mvtec(tmp_path):
    split = load_split("mvtec", make_mvtec(tmp_path), "widget")
    assert (split.format, split.category, split.validation) == ("mvtec", "widget", None)
    assert [p.name for p in split.train] == ["000.png", "001.png", "002.png"]
    assert split.defect_types == ["good", "crack", "scratch", "scratch"]
    assert split.labels == [0, 1, 1, 1]
    base = tmp_path / "widget" / "ground_truth"
    assert split.test[1].mask_paths == (base / "crack" / "000_mask.png",)
    assert split.test[0].mask_paths == ()
    # scratch/001 has no mask file: an empty tuple, not an error.
    assert split.test[3].mask_paths == ()


def test_mvtec_layout_errors(tmp_path):
    make_mvtec(tmp_path)
    with pytest.raises(EfficientADError, match=r"expected MVTec AD layout: .*bottle not found \(folders in .*widget"):
        load_split("mvtec", tmp_path, "bottle")
    for path in (tmp_path / "widget" / "train" / "good").iterdir():
        path.unlink()
    (tmp_path / "widget" / "train" / "good").rmdir()
    with pytest.raises(EfficientADError, match=r"expected MVTec AD layout: .*widget/train/good not found"):
        load_split("mvtec", tmp_path, "widget")
    with pytest.raises(EfficientADError, match="format must be one of .*got 'kaggle'"):
        load_split("kaggle", tmp_path, "widget")
    with pytest.raises(EfficientADError, match="dataset root not found"):
        load_split("mvtec", tmp_path / "missing", "widget")


def make_loco(root: Path) -> Path:
    base = root / "box"
    image(base / "train" / "good" / "000.png")
    image(base / "train" / "good" / "001.png")
    image(base / "validation" / "good" / "000.png")
    image(base / "test" / "good" / "000.png")
    image(base / "test" / "logical_anomalies" / "000.png")
    image(base / "test" / "structural_anomalies" / "000.png")
    gt = base / "ground_truth"
    mask(gt / "logical_anomalies" / "000" / "000.png", [(0, 0), (0, 1), (5, 7), (4, 7)], value=1)
    mask(gt / "logical_anomalies" / "000" / "001.png", [(2, 2)], value=2)
    mask(gt / "structural_anomalies" / "000" / "000.png", [(3, 3), (3, 4)], value=2)
    config = [
        {"defect_name": "missing", "pixel_value": 1, "saturation_threshold": 0.5, "relative_saturation": True},
        {"defect_name": "dent", "pixel_value": 2, "saturation_threshold": 10, "relative_saturation": False},
    ]
    (base / "defects_config.json").write_text(json.dumps(config))
    return root


def test_loco(tmp_path):
    split = load_split("loco", make_loco(tmp_path), "box")
    assert len(split.train) == 2 and [p.name for p in split.validation] == ["000.png"]
    assert split.defect_types == ["good", "logical_anomalies", "structural_anomalies"]
    logical = split.test[1]
    assert [p.name for p in logical.mask_paths] == ["000.png", "001.png"]
    assert read_mask(logical.mask_paths).sum() == 5

    defects = load_defects_config(tmp_path, "box")
    assert defects[1] == DefectSpec("missing", 1, 0.5, True)
    regions = read_loco_regions(logical, defects)
    assert [r.defect.name for r in regions] == ["missing", "dent"]
    # "missing" spans two components but is one 4-pixel defect, saturated at int(0.5 * 4) = 2;
    # "dent" has 1 pixel, so its absolute threshold of 10 is capped at 1.
    assert regions[0].mask.sum() == 4 and regions[0].saturation == 2
    assert regions[1].saturation == 1
    # Upsampled 2x per side, absolute thresholds scale by 4 (then cap at the new area of 4).
    structural = read_loco_regions(split.test[2], defects, size=(12, 16))
    assert structural[0].mask.shape == (12, 16) and structural[0].mask.sum() == 8
    assert structural[0].saturation == 8


def test_loco_errors(tmp_path):
    make_loco(tmp_path)
    config = tmp_path / "box" / "defects_config.json"
    config.write_text(json.dumps([{"defect_name": "x", "pixel_value": 1}]))
    with pytest.raises(EfficientADError, match="entry 0 needs defect_name"):
        load_defects_config(tmp_path, "box")
    config.write_text(
        json.dumps([{"defect_name": "x", "pixel_value": 1, "saturation_threshold": 2.0, "relative_saturation": True}])
    )
    with pytest.raises(EfficientADError, match=r"a fraction in \(0, 1\]"):
        load_defects_config(tmp_path, "box")
    config.unlink()
    with pytest.raises(EfficientADError, match="expected MVTec LOCO AD layout: .*defects_config.json not found"):
        load_defects_config(tmp_path, "box")
    two_values = mask(tmp_path / "two.png", [(0, 0)], value=1)
    array = np.array(Image.open(two_values))
    array[1, 1] = 2
    Image.fromarray(array).save(two_values)
    spec = DefectSpec("x", 1, 1.0, True)
    with pytest.raises(EfficientADError, match="exactly one defect value"):
        read_loco_regions(Sample(tmp_path / "a.png", 1, "logical_anomalies", (two_values,)), {1: spec})
    unknown = mask(tmp_path / "unknown.png", [(0, 0)], value=7)
    with pytest.raises(EfficientADError, match="pixel value 7"):
        read_loco_regions(Sample(tmp_path / "a.png", 1, "logical_anomalies", (unknown,)), {1: spec})
    for path in (tmp_path / "box" / "validation" / "good").iterdir():
        path.unlink()
    with pytest.raises(EfficientADError, match="no images in .*validation/good"):
        load_split("loco", tmp_path, "box")


def make_visa(root: Path) -> Path:
    base = root / "candy" / "Data"
    rows = ["object,split,label,image,mask"]
    for name in ("000", "001", "002"):
        image(base / "Images" / "Normal" / f"{name}.JPG", mode="RGB")
        rows.append(f"candy,train,normal,candy/Data/Images/Normal/{name}.JPG,")
    image(base / "Images" / "Normal" / "003.JPG", mode="RGB")
    rows.append("candy,test,normal,candy/Data/Images/Normal/003.JPG,")
    image(base / "Images" / "Anomaly" / "000.JPG", mode="RGB")
    mask(base / "Masks" / "Anomaly" / "000.png", [(0, 0)], value=1)
    array = np.array(Image.open(base / "Masks" / "Anomaly" / "000.png"))
    array[5, 5] = 2  # a second region id
    Image.fromarray(array).save(base / "Masks" / "Anomaly" / "000.png")
    rows.append("candy,test,anomaly,candy/Data/Images/Anomaly/000.JPG,candy/Data/Masks/Anomaly/000.png")
    rows.append("other,train,normal,other/Data/Images/Normal/000.JPG,")
    (root / "split_csv").mkdir()
    (root / "split_csv" / "1cls.csv").write_text("\r\n".join(rows) + "\r\n")
    return root


def test_visa(tmp_path):
    split = load_split("visa", make_visa(tmp_path), "candy")
    assert [p.name for p in split.train] == ["000.JPG", "001.JPG", "002.JPG"]
    assert split.labels == [0, 1] and split.defect_types == ["good", "anomaly"]
    anomalous = split.test[1]
    assert anomalous.mask_paths == (tmp_path / "candy" / "Data" / "Masks" / "Anomaly" / "000.png",)
    region_ids = read_mask(anomalous.mask_paths)
    assert region_ids.dtype == bool and region_ids.sum() == 2
    assert read_mask(anomalous.mask_paths, size=(12, 16)).sum() == 8
    assert not read_mask([], size=(3, 4)).any()


def test_visa_errors(tmp_path):
    make_visa(tmp_path)
    with pytest.raises(EfficientADError, match="no rows for object 'cake'"):
        load_split("visa", tmp_path, "cake")
    (tmp_path / "candy" / "Data" / "Images" / "Normal" / "001.JPG").unlink()
    with pytest.raises(EfficientADError, match=r"expected VisA layout: .*001.JPG \(listed in"):
        load_split("visa", tmp_path, "candy")
    (tmp_path / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(EfficientADError, match=r"expected VisA layout: .*split_csv/1cls.csv not found"):
        load_split("visa", tmp_path, "candy")


def test_folder_convention(tmp_path):
    base = tmp_path / "parts"
    image(base / "train" / "a.png")
    image(base / "train" / "b.png")
    image(base / "test" / "good" / "c.png")
    image(base / "test" / "dent" / "d.png")
    image(base / "test" / "dent" / "e.png")
    mask(base / "masks" / "dent" / "d_mask.png", [(0, 0)])
    mask(base / "masks" / "e.png", [(0, 0)])
    split = load_split("folder", tmp_path, "parts")
    assert [p.name for p in split.train] == ["a.png", "b.png"] and split.validation is None
    assert split.defect_types == ["good", "dent", "dent"]
    assert [s.mask_paths for s in split.test] == [(), (base / "masks" / "dent" / "d_mask.png",), (base / "masks" / "e.png",)]
    image(base / "validation" / "v.png")
    assert [p.name for p in load_split("folder", tmp_path, "parts").validation] == ["v.png"]


def test_load_folder_split(tmp_path):
    image(tmp_path / "ok" / "1.png")
    image(tmp_path / "bad" / "2.png")
    image(tmp_path / "bad" / "3.png")
    mask(tmp_path / "gt" / "2.png", [(0, 0)])
    split = load_folder_split(tmp_path / "ok", test_defect_dirs=tmp_path / "bad", mask_dir=tmp_path / "gt")
    assert split.defect_types == ["bad", "bad"] and split.test[1].mask_paths == ()
    split = load_folder_split(tmp_path / "ok", tmp_path / "ok", {"scratch": tmp_path / "bad"})
    assert split.defect_types == ["good", "scratch", "scratch"] and split.train == [tmp_path / "ok" / "1.png"]
    with pytest.raises(EfficientADError, match="image folder not found"):
        load_folder_split(tmp_path / "missing")
    with pytest.raises(EfficientADError, match="cannot be named 'good'"):
        load_folder_split(tmp_path / "ok", test_defect_dirs={"good": tmp_path / "bad"})
    with pytest.raises(EfficientADError, match=r"expected folder layout: .*train not found"):
        load_split("folder", tmp_path, "ok")


def test_read_mask(tmp_path):
    a = mask(tmp_path / "a.png", [(0, 0)])
    b = mask(tmp_path / "b.png", [(1, 1)], size=(4, 4))
    assert read_mask(a).shape == (6, 8)
    # b's pixel (1, 1) of 4x4 covers rows 1-2 and columns 2-3 of 6x8 under nearest neighbour.
    assert read_mask([a, b], size=(6, 8)).sum() == 1 + 4
    with pytest.raises(EfficientADError, match="has shape"):
        read_mask([a, b])
    with pytest.raises(EfficientADError, match="mask not found"):
        read_mask(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(EfficientADError, match="not an image file"):
        read_mask(tmp_path / "text.png")
    with pytest.raises(EfficientADError, match="needs a size"):
        read_mask([])
    # An opaque alpha channel is not a defect.
    rgba = tmp_path / "rgba.png"
    Image.new("RGBA", (3, 3), (0, 0, 0, 255)).save(rgba)
    assert not read_mask(rgba).any()


@requires_shared("data")
def test_shared_data():
    bottle = load_split("mvtec", SHARED_DATA / "mvtec_ad", "bottle")
    assert len(bottle.train) == 209 and len(bottle.test) == 83
    assert bottle.labels.count(0) == 20
    assert all(s.mask_paths and s.mask_paths[0].is_file() for s in bottle.test if s.label == 1)
    fryum = load_split("visa", SHARED_DATA / "visa", "fryum")
    assert len(fryum.train) == 450 and len(fryum.test) == 150
    assert fryum.labels.count(0) == 50 and fryum.labels.count(1) == 100
    assert all(len(s.mask_paths) == 1 for s in fryum.test if s.label == 1)
