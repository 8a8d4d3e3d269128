"""Dice, IoU and HD95 against hand-computed values and a brute-force NumPy reference."""

import itertools

import numpy as np
import pytest

from fedjax_med.training import metrics, segmentation


def _brute_border(mask):
    """Pixels of ``mask`` with a 4-neighbour outside it or outside the image, by enumeration."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    for y, x in itertools.product(range(h), range(w)):
        if not mask[y, x]:
            continue
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            yy, xx = y + dy, x + dx
            if not (0 <= yy < h and 0 <= xx < w) or not mask[yy, xx]:
                out[y, x] = True
    return out


def _brute_hd95(a, b):
    pa, pb = np.argwhere(_brute_border(a)), np.argwhere(_brute_border(b))
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


def test_hd95_equals_brute_force_on_random_tiny_masks():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        a, b = rng.uniform(size=(2, 7, 9)) < rng.uniform(0.1, 0.6, (2, 1, 1))
        if a.any() and b.any():
            assert segmentation.hd95(a, b) == pytest.approx(_brute_hd95(a, b), abs=1e-9)
            checked += 1
    assert checked > 30


def test_hd95_by_hand_and_empty_conventions():
    a = np.zeros((6, 6), bool)
    a[1:3, 1:3] = True  # 2x2 square: every pixel is a border pixel
    b = np.roll(a, 2, axis=1)  # shifted by 2 columns
    # Distances from each set's 4 border pixels to the other's nearest: 2, 2, 1... by hand:
    # a's column 2 pixels are 1 from b's column 3, column 1 pixels are 2 away; symmetric.
    assert segmentation.hd95(a, b) == pytest.approx(np.percentile([1, 1, 2, 2] * 2, 95))
    assert segmentation.hd95(a, a) == 0.0
    empty = np.zeros_like(a)
    assert segmentation.hd95(empty, empty) == 0.0
    assert (
        segmentation.hd95(empty, a) == segmentation.hd95(a, empty) == pytest.approx(np.hypot(6, 6))
    )


def test_dice_iou_by_hand_and_per_class():
    # Image 0: class 1 true on 4 pixels, predicted on 2 of them + 2 others; class 2 absent in both.
    true = np.zeros((2, 4, 4), int)
    pred = np.zeros((2, 4, 4), int)
    true[0, 0, :4] = 1
    pred[0, 0, :2] = 1
    pred[0, 1, :2] = 1
    # Image 1: class 2 true on 2 pixels, predicted as class 1 instead (a miss and a hallucination).
    true[1, 3, :2] = 2
    pred[1, 3, :2] = 1
    s = segmentation.per_image_scores(pred, true, 3)
    assert s["dice"][0].tolist() == [pytest.approx(2 * 2 / 8), 1.0]  # both-empty class 2 -> 1
    assert s["iou"][0].tolist() == [pytest.approx(2 / 6), 1.0]
    assert s["present"].tolist() == [[True, False], [True, True]]
    assert s["dice"][1].tolist() == [0.0, 0.0]
    assert s["hd95"][1].tolist() == [pytest.approx(np.hypot(4, 4))] * 2

    probs = np.eye(3)[pred]
    m = metrics.classification_metrics(probs, true, "segmentation", losses=np.array([1.0, 3.0]))
    # Image 0 averages over class 1 only; image 1 over both classes (each present somewhere).
    assert m["dice"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["iou"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert m["dice_class_1"] == pytest.approx((0.5 + 0.0) / 2)
    assert m["dice_class_2"] == 0.0
    assert m["accuracy"] == pytest.approx(1 - 6 / 32)
    assert m["loss"] == 2.0 and m["num_examples"] == 2


def test_all_background_baseline_is_the_fraction_of_empty_images():
    rng = np.random.default_rng(1)
    masks = np.zeros((10, 8, 8), np.uint8)
    for i in range(7):  # 7 of 10 images hold a structure
        y, x = rng.integers(0, 6, 2)
        masks[i, y : y + 2, x : x + 2] = rng.integers(1, 3)
    background = np.zeros((10, 8, 8, 3))
    background[..., 0] = 1
    m = segmentation.segmentation_metrics(background, masks)
    assert m["dice"] == pytest.approx(0.3) and m["iou"] == pytest.approx(0.3)
    assert m["dice_class_1"] == 0.0 or np.isnan(m["dice_class_1"])
    perfect = segmentation.segmentation_metrics(np.eye(3)[masks], masks)
    assert perfect["dice"] == perfect["iou"] == 1.0 and perfect["hd95"] == 0.0


def test_grouped_metrics_and_site_summary_rank_by_dice():
    masks = np.zeros((4, 4, 4), int)
    masks[:, :2, :2] = 1
    pred = masks.copy()
    pred[2:] = 0  # site 1 misses everything
    per_site = metrics.grouped_metrics(
        np.eye(2)[pred], masks, "segmentation", np.array([0, 0, 1, 1]), ("a", "b")
    )
    assert per_site["a"]["dice"] == 1.0 and per_site["b"]["dice"] == 0.0
    summary = metrics.summarize_groups(per_site, metrics.primary_metric("segmentation"))
    assert summary["worst_dice"] == 0.0 and summary["mean_dice"] == 0.5
    assert metrics.summarize_groups(per_site, "hd95")["worst_hd95"] == pytest.approx(np.hypot(4, 4))


def test_bad_shapes_and_values_are_refused():
    with pytest.raises(ValueError, match="expected probs \\(N, H, W, K\\) and masks \\(N, H, W\\)"):
        segmentation.segmentation_metrics(np.zeros((2, 4, 4, 2)), np.zeros((2, 4, 5), int))
    with pytest.raises(ValueError, match="mask values must lie in \\[0, 2\\)"):
        segmentation.segmentation_metrics(np.zeros((1, 4, 4, 2)), np.full((1, 4, 4), 2))
