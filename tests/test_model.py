"""The loss and the anomaly map do what the paper says."""

from __future__ import annotations

import pytest
import torch

from stpm import StpmError
from stpm.model import (
    MapSettings,
    anomaly_map,
    feature_loss,
    gaussian_blur,
    image_scores,
    layer_distances,
    upsample_bilinear,
)
from stpm.networks import pyramid_indices


def features(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, c, s, s, generator=generator) for c, s in ((8, 16), (16, 8), (32, 4))]


def test_identical_features_cost_nothing():
    teacher = features(0)
    assert feature_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)
    scaled = [2.5 * level for level in teacher]  # the loss ignores feature length
    assert feature_loss(teacher, scaled).item() == pytest.approx(0.0, abs=1e-6)


def test_opposite_features_cost_the_most():
    teacher = features(0)
    opposite = [-level for level in teacher]
    distances = layer_distances(teacher, opposite)
    assert all(torch.allclose(d, torch.full_like(d, 2.0)) for d in distances)
    assert feature_loss(teacher, opposite).item() == pytest.approx(6.0)


def test_distance_is_one_minus_cosine():
    teacher, student = features(0), features(1)
    cosine = torch.nn.functional.cosine_similarity(teacher[0], student[0], dim=1)
    assert torch.allclose(layer_distances(teacher, student)[0][:, 0], 1 - cosine, atol=1e-5)


def test_map_size_combination_and_score():
    teacher, student = features(0), features(1)
    product = anomaly_map(teacher, student, MapSettings((32, 48), combine="product"))
    total = anomaly_map(teacher, student, MapSettings((32, 48), combine="sum"))
    assert product.shape == total.shape == (2, 1, 32, 48)
    assert (product >= 0).all() and (total >= product.pow(1 / 3) * 0).all()
    assert torch.equal(image_scores(product), product.flatten(1).max(dim=1).values)
    with pytest.raises(StpmError):
        MapSettings((32, 32), combine="mean")


def test_an_anomaly_in_one_place_lights_up_that_place():
    teacher = features(0)
    student = [level.clone() for level in teacher]
    for level in student:  # the student is wrong in the top-left quarter only
        h, w = level.shape[-2:]
        level[:, :, : h // 2, : w // 2] *= -1
    maps = anomaly_map(teacher, student, MapSettings((64, 64)))
    assert maps[:, :, :24, :24].min() > 1.0 and maps[:, :, 40:, 40:].max() < 1e-6


def test_smoothing_keeps_a_constant_map_and_spreads_a_peak():
    constant = torch.full((1, 1, 20, 20), 0.3)
    assert torch.allclose(gaussian_blur(constant, 2.0), constant, atol=1e-6)
    peak = torch.zeros(1, 1, 21, 21)
    peak[0, 0, 10, 10] = 1.0
    smooth = gaussian_blur(peak, 2.0)
    assert smooth.shape == peak.shape
    assert smooth.sum().item() == pytest.approx(1.0, rel=1e-4) and smooth.max() < 0.1


def test_pyramid_indices_follow_strides():
    assert pyramid_indices("resnet18", (4, 8, 16)) == (1, 2, 3)  # layer1..layer3
    assert pyramid_indices("tf_efficientnet_lite0", (8, 16, 32)) == (2, 3, 4)
    with pytest.raises(StpmError, match="stride 64"):
        pyramid_indices("resnet18", (64,))


def test_blur_equals_a_reflected_separable_convolution():
    maps = torch.rand(3, 1, 40, 56, dtype=torch.float64)
    sigma = 2.5
    radius = int(4 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = torch.nn.functional.pad(maps, (radius,) * 4, mode="reflect")
    expected = torch.nn.functional.conv2d(padded, kernel.view(1, 1, 1, -1))
    expected = torch.nn.functional.conv2d(expected, kernel.view(1, 1, -1, 1))
    assert torch.allclose(gaussian_blur(maps, sigma), expected, atol=1e-12)
    with pytest.raises(StpmError, match="too large"):
        gaussian_blur(maps, 10.0)


@pytest.mark.parametrize(
    ("source", "target"), [((32, 32), (256, 256)), ((4, 7), (64, 50)), ((9, 5), (9, 5))]
)
def test_upsampling_by_matrices_is_bilinear_interpolation(source, target):
    maps = torch.rand(2, 1, *source, dtype=torch.float64)
    expected = torch.nn.functional.interpolate(maps, target, mode="bilinear", align_corners=False)
    assert torch.allclose(upsample_bilinear(maps, target), expected, atol=1e-12)
