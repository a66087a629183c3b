"""Metrics against cases worked out by hand, and against scikit-learn on raw pixels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stpm import metrics


def accumulate(maps, masks):
    pixels = np.concatenate([m.ravel() for m in maps])
    accumulator = metrics.PixelAccumulator(metrics.score_bins(pixels))
    for anomaly_map, mask in zip(maps, masks, strict=True):
        accumulator.add(anomaly_map, mask)
    return accumulator


# one row of 10 pixels: region A = pixel 0, region B = pixels 2-3; 7 defect-free pixels
HAND_MAP = np.array([[0.9, 0.7, 0.8, 0.1, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05]])
HAND_MASK = np.array([[1, 0, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=bool)


def test_pro_by_hand():
    # thresholds from high to low give (FPR, PRO): (0, 1/2) A found; (0, 3/4) half of B;
    # (1/7, 3/4) one false pixel; (1/7, 1) all of B; (1, 1). Area to FPR 0.3:
    # 3/4 * 1/7 + 1 * (0.3 - 1/7), normalised by 0.3.
    expected = (0.75 / 7 + (0.3 - 1 / 7)) / 0.3
    assert accumulate([HAND_MAP], [HAND_MASK]).pro() == pytest.approx(expected)


def test_pixel_auroc_by_hand():
    # defect pixels 0.9, 0.8, 0.1 against defect-free 0.7 and six 0.05: (7 + 7 + 6) / 21 pairs
    assert accumulate([HAND_MAP], [HAND_MASK]).auroc() == pytest.approx(20 / 21)


def test_regions_count_equally_whatever_their_size():
    # a big region fully found and a small one missed: PRO 1/2 at low FPR, pixel TPR 16/17
    mask = np.zeros((10, 10), bool)
    mask[:4, :4] = True  # 16 pixels
    mask[9, 9] = True  # 1 pixel
    anomaly_map = np.where(mask, 1.0, 0.5)
    anomaly_map[9, 9] = 0.0
    accumulator = accumulate([anomaly_map], [mask])
    fpr_limit_area = 0.5 * 0.3  # PRO stays 1/2 until every defect-free pixel is flagged
    assert accumulator.pro() == pytest.approx(fpr_limit_area / 0.3)


@pytest.mark.parametrize("sign, expected", [(1, 1.0), (-1, 0.0)])
def test_perfect_and_inverted_maps(sign, expected):
    rng = np.random.default_rng(0)
    masks = [rng.random((20, 30)) > 0.8 for _ in range(3)] + [np.zeros((20, 30), bool)]
    maps = [sign * (mask + 0.01 * rng.random(mask.shape)) for mask in masks]
    accumulator = accumulate(maps, masks)
    assert accumulator.auroc() == pytest.approx(expected)
    assert accumulator.pro() == pytest.approx(expected, abs=1e-3)
    labels = np.array([1, 1, 1, 0])
    assert metrics.image_auroc(labels, sign * (labels + 0.1 * rng.random(4))) == expected


def test_pixel_auroc_matches_scikit_learn_on_raw_pixels():
    rng = np.random.default_rng(1)
    masks = [rng.random((40, 40)) > 0.9 for _ in range(5)]
    maps = [mask * 0.5 + rng.random(mask.shape) for mask in masks]
    expected = roc_auc_score(
        np.concatenate([m.ravel() for m in masks]), np.concatenate([m.ravel() for m in maps])
    )
    assert accumulate(maps, masks).auroc() == pytest.approx(expected, abs=1e-4)


def test_f1_max_by_hand():
    # threshold 0.35 flags 0.35, 0.4, 0.8: precision 2/3, recall 1, F1 0.8
    f1, threshold = metrics.f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    assert f1 == pytest.approx(0.8) and threshold == pytest.approx(0.35)


def test_one_class_only_gives_nan():
    assert np.isnan(metrics.image_auroc([0, 0], [0.1, 0.2]))
    accumulator = accumulate([np.ones((3, 3))], [np.zeros((3, 3), bool)])
    assert np.isnan(accumulator.auroc()) and np.isnan(accumulator.pro())
