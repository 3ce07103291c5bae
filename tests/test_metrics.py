import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from efficientad.errors import EfficientADError
from efficientad.evaluation.metrics import (
    au_pro,
    au_spro,
    f1_max,
    image_auroc,
    metrics_by_type,
    pixel_auroc,
    plot_curves,
    pro_curve,
    spro_curve,
)


def one_region_case():
    # 4x4 map, one 2-pixel region at the top left scored 0.9 and 0.5. The 14 defect-free pixels
    # score 0.7, 0.3 and twelve times 0.0. Lowering the threshold through the distinct scores:
    #   0.9 -> FPR 0,    PRO 1/2      0.7 -> FPR 1/14, PRO 1/2
    #   0.5 -> FPR 1/14, PRO 1        0.3 -> FPR 2/14, PRO 1      0.0 -> FPR 1, PRO 1
    # Area up to FPR 0.3: 1/14 * 1/2 (flat at 1/2) + (0.3 - 1/14) * 1 = 0.3 - 1/28,
    # normalised by 0.3: 1 - 1/8.4.
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, :2] = True
    amap = np.zeros((4, 4))
    amap[0, 0], amap[0, 1], amap[1, 0], amap[2, 2] = 0.9, 0.5, 0.7, 0.3
    return mask, amap


def test_pro_curve_hand_case():
    mask, amap = one_region_case()
    fpr, pro, thresholds = pro_curve(mask, amap)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 14, 1 / 14, 2 / 14, 1])
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.7, 0.5, 0.3, 0.0])
    assert au_pro(mask, amap, 0.3) == pytest.approx(1 - 1 / 8.4)


def test_integration_limit_interpolates_the_curve_point():
    # One defective pixel tied with one defect-free pixel at 0.5: the curve jumps from (0, 0)
    # straight to (1/2, 1), then to (1, 1). At FPR 0.3 the interpolated PRO is 0.6, so the area is
    # 0.3 * 0.6 / 2 = 0.09 and the normalised value 0.3.
    mask = np.array([[1, 0, 0]])
    amap = np.array([[0.5, 0.5, 0.1]])
    assert au_pro(mask, amap, 0.3) == pytest.approx(0.3)
    assert au_pro(mask, amap, 0.5) == pytest.approx(0.5)
    assert au_pro(mask, amap, 1.0) == pytest.approx(0.75)


def test_regions_are_eight_connected():
    # Diagonal neighbours A=(0,0), B=(1,1) and a lone pixel C=(3,3); only A scores high. With the
    # official 8-connectivity the regions are {A, B} and {C}: PRO = (1/2 + 0) / 2 = 1/4 at FPR 0
    # (4-connectivity would give three regions and 1/3).
    mask = np.zeros((4, 4), dtype=bool)
    mask[0, 0] = mask[1, 1] = mask[3, 3] = True
    amap = np.zeros((4, 4))
    amap[0, 0] = 1.0
    fpr, pro, _ = pro_curve(mask, amap)
    assert fpr[1] == 0 and pro[1] == pytest.approx(0.25)


def brute_force_pro(masks, maps):
    regions, negatives = [], []
    for mask, amap in zip(masks, maps):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [amap[labelled == k] for k in range(1, n + 1)]
        negatives.append(amap[~mask])
    negatives = np.concatenate(negatives)
    thresholds = np.unique(maps)[::-1]
    fpr = [0.0] + [float(np.mean(negatives >= t)) for t in thresholds]
    pro = [0.0] + [float(np.mean([np.mean(r >= t) for r in regions])) for t in thresholds]
    return np.array(fpr), np.array(pro)


def random_case(seed, n=4, size=12):
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(1, n):
        for _ in range(2):
            y, x = rng.integers(0, size - 3, 2)
            masks[i, y : y + rng.integers(1, 4), x : x + rng.integers(1, 4)] = True
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    return masks, np.round(maps, 1)  # rounding creates ties across pixels


def test_pro_curve_matches_brute_force_with_ties():
    masks, maps = random_case(0)
    fpr, pro, _ = pro_curve(masks, maps)
    expected_fpr, expected_pro = brute_force_pro(masks, maps)
    np.testing.assert_allclose(fpr, expected_fpr)
    np.testing.assert_allclose(pro, expected_pro)


def test_invariance_under_monotone_transform():
    masks, maps = random_case(1)
    labels = masks.any(axis=(1, 2)).astype(int)
    scores = maps.max(axis=(1, 2))
    transform = lambda x: np.exp(2 * x) + 3  # noqa: E731 - strictly increasing
    assert image_auroc(labels, transform(scores)) == pytest.approx(image_auroc(labels, scores))
    assert pixel_auroc(masks, transform(maps)) == pytest.approx(pixel_auroc(masks, maps))
    assert au_pro(masks, transform(maps)) == pytest.approx(au_pro(masks, maps))


def test_image_auroc_agrees_with_sklearn():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, 200)
    scores = rng.normal(size=200) + labels
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores))
    masks, maps = random_case(3)
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_f1_max_hand_case():
    # Sorted by score: 1 (0.9), 0 (0.8), 1 (0.7), 0 (0.1). Thresholds give (precision, recall):
    # 0.9 -> (1, 1/2), F1 2/3; 0.8 -> (1/2, 1/2), F1 1/2; 0.7 -> (2/3, 1), F1 4/5; 0.1 -> (1/2, 1), F1 2/3.
    assert f1_max([1, 0, 1, 0], [0.9, 0.8, 0.7, 0.1]) == pytest.approx(0.8)


def test_spro_saturation_hand_case():
    # A 4-pixel defect scored 0.9, 0.8, 0.2, 0.1 with a saturation of 2 pixels; two defect-free
    # pixels score 0.5 and 0.0. The two best pixels already saturate it: sPRO is 1 at FPR 0.
    region = np.array([[1, 1, 1, 1, 0, 0]], dtype=bool)
    amap = np.array([[0.9, 0.8, 0.2, 0.1, 0.5, 0.0]])
    fpr, spro, _ = spro_curve([[region]], amap, [[2]])
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.5, 0.5, 0.5, 1])
    np.testing.assert_allclose(spro, [0, 0.5, 1, 1, 1, 1, 1])
    assert au_spro([[region]], amap, [[2]]) == pytest.approx(1.0)
    # Without saturation it is plain overlap: 1/2 up to FPR 1/2, so 1/2 after normalising.
    assert au_spro([[region]], amap) == pytest.approx(0.5)
    # A threshold above the area is capped at the area.
    assert au_spro([[region]], amap, [[100]]) == pytest.approx(0.5)


def test_spro_defects_are_whole_masks_and_may_overlap():
    # One mask with two separate components is one defect; a second defect overlaps the first.
    first = np.array([[1, 0, 1, 0]], dtype=bool)
    second = np.array([[1, 1, 0, 0]], dtype=bool)
    amap = np.array([[0.9, 0.1, 0.1, 0.5]])
    fpr, spro, _ = spro_curve([[first, second]], amap)
    # At 0.9 both defects have one of two pixels: mean 1/2. The only defect-free pixel is the last.
    assert spro[1] == pytest.approx(0.5) and fpr[1] == 0
    assert fpr[2] == 1.0


def test_spro_without_saturation_equals_pro_on_connected_regions():
    masks, maps = random_case(4)
    per_image = []
    for mask in masks:
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        per_image.append([labelled == k for k in range(1, n + 1)])
    assert au_spro(per_image, maps, integration_limit=0.3) == pytest.approx(au_pro(masks, maps, 0.3))


def test_plot_curves():
    masks, maps = random_case(5)
    labels = masks.any(axis=(1, 2)).astype(int)
    curves = plot_curves(labels, maps.max(axis=(1, 2)), masks, maps, max_points=20)
    assert set(curves) == {"image_roc", "pro"}
    fpr, pro = curves["pro"]["fpr"], curves["pro"]["pro"]
    assert len(fpr) <= 20 and fpr[0] == 0 and fpr[-1] == 1 and pro[-1] == pytest.approx(1)
    assert fpr == sorted(fpr) and isinstance(fpr[0], float)
    assert set(plot_curves(labels, maps.max(axis=(1, 2)))) == {"image_roc"}


def test_metrics_by_type():
    types = ["good", "good", "a", "a", "b"]
    labels = [0, 0, 1, 1, 1]
    scores = [0.1, 0.5, 0.9, 0.3, 0.8]
    masks = np.zeros((5, 2, 2), dtype=bool)
    masks[2:, 0, 0] = True
    maps = masks * 1.0 + 0.1
    result = metrics_by_type(types, labels, scores, masks, maps)
    assert list(result) == ["overall", "a", "b"]
    # Type a against the good images: 0.9 beats both, 0.3 beats one -> 3 of 4 pairs.
    assert result["a"]["image_auroc"] == pytest.approx(0.75)
    assert result["b"]["image_auroc"] == pytest.approx(1.0)
    assert result["overall"]["image_auroc"] == pytest.approx(5 / 6)
    assert result["b"]["pixel_auroc"] == pytest.approx(1.0) and result["b"]["au_pro"] == pytest.approx(1.0)
    assert all(isinstance(v, float) for entry in result.values() for v in entry.values())
    assert "pixel_auroc" not in metrics_by_type(types, labels, scores)["a"]


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: image_auroc([0, 1, 1], [0.1, 0.2]), "equal length"),
        (lambda: image_auroc([1, 1], [0.1, 0.2]), "at least one good"),
        (lambda: image_auroc([0, 0], [0.1, 0.2]), "at least one good"),
        (lambda: image_auroc([0, 2], [0.1, 0.2]), "labels must be 0"),
        (lambda: f1_max([0, 1], [0.1, np.nan]), "NaN"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5))), "differ in shape"),
        (lambda: pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 4))), "defective and defect-free"),
        (lambda: au_pro(np.zeros((2, 4, 4)), np.zeros((2, 4, 4))), "at least one defective"),
        (lambda: au_pro(np.ones((2, 4, 4)), np.zeros((2, 4, 4))), "at least one defect-free"),
        (lambda: au_pro(np.eye(3), np.eye(3), integration_limit=0), "integration_limit"),
        (lambda: au_spro([[]], np.zeros((1, 3, 3))), "at least one defect mask"),
        (lambda: au_spro([[np.zeros((3, 3))]], np.zeros((1, 3, 3))), "is empty"),
        (lambda: au_spro([[np.eye(3)]], np.zeros((1, 3, 3)), [[0]]), "must be > 0"),
        (lambda: au_spro([[np.eye(2)]], np.zeros((1, 3, 3))), "has shape"),
        (lambda: au_spro([[np.eye(3)], []], np.zeros((1, 3, 3))), "for 2 images"),
        (lambda: metrics_by_type(["a"], [0, 1], [0.1, 0.2]), "defect types"),
        (lambda: plot_curves([0, 1], [0.1, 0.2], masks=np.eye(2)), "given together"),
    ],
)
def test_errors(call, message):
    with pytest.raises(EfficientADError, match=message):
        call()
