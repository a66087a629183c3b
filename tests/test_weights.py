"""The teacher's ImageNet weights are real, load offline, and fail clearly when missing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stpm import StpmError, scoring, settings, weights

ESPRESSO = 967  # ImageNet class index
TABBY, TIGER_CAT, EGYPTIAN_CAT = 281, 282, 285


def classify(model: torch.nn.Module, image: np.ndarray) -> int:
    """Top-1 ImageNet class of an RGB photo, centre-cropped and preprocessed as timm says."""
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = scoring.resize(image[top : top + side, left : left + side], (224, 224))
    config = model.pretrained_cfg
    batch = torch.from_numpy(scoring.normalize(crop[None], config["mean"], config["std"]))
    with torch.inference_mode():
        return int(model.eval()(batch).argmax())


@pytest.fixture(scope="module")
def photos():
    skimage_data = pytest.importorskip("skimage.data")
    return {"coffee": skimage_data.coffee(), "cat": skimage_data.chelsea()}


def test_packaged_teacher_recognises_real_photographs(photos):
    weights_file = weights.resolve_weights_file(settings.DEFAULT_BACKBONE)
    classifier = weights.create_backbone(settings.DEFAULT_BACKBONE, None, weights_file)
    assert classify(classifier, photos["coffee"]) == ESPRESSO
    assert classify(classifier, photos["cat"]) in (TABBY, TIGER_CAT, EGYPTIAN_CAT)


def test_random_teacher_fails_the_same_check(photos):
    torch.manual_seed(0)
    classifier = weights.create_backbone(settings.DEFAULT_BACKBONE, None, False)
    assert classify(classifier, photos["coffee"]) != ESPRESSO


def test_conversion_is_cached_and_maps_every_tensor(tmp_path, monkeypatch):
    monkeypatch.setenv("STPM_CACHE", str(tmp_path))
    first = weights.packaged_weights_file(settings.DEFAULT_BACKBONE)
    assert first.parent == tmp_path and first.is_file()
    state = torch.load(first, weights_only=True)
    expected = weights.create_backbone(settings.DEFAULT_BACKBONE, None, False).state_dict()
    assert list(state) == list(expected)
    assert all(state[name].shape == expected[name].shape for name in expected)
    mtime = first.stat().st_mtime_ns
    assert weights.packaged_weights_file(settings.DEFAULT_BACKBONE).stat().st_mtime_ns == mtime


def test_offline_without_weights_names_both_ways_out(monkeypatch):
    monkeypatch.setattr(weights, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(weights, "_hub_cached_file", lambda backbone: None)
    with pytest.raises(StpmError, match="--teacher-weights") as error:
        weights.resolve_weights_file("resnet18")
    assert "internet" in str(error.value)


def test_teacher_weights_file_is_used_and_fingerprinted(tmp_path):
    source = weights.create_backbone("resnet18", None, False)
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    teacher = weights.create_backbone(
        "resnet18", (1, 2, 3), weights.resolve_weights_file("resnet18", path)
    )
    assert torch.equal(
        teacher.state_dict()["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"]
    )
    other = weights.create_backbone("resnet18", (1, 2, 3), False)
    assert weights.weights_fingerprint(teacher) != weights.weights_fingerprint(other)


def test_teacher_weights_of_another_backbone_are_refused(tmp_path):
    path = tmp_path / "lite0.pth"
    torch.save(weights.create_backbone(settings.DEFAULT_BACKBONE, None, False).state_dict(), path)
    with pytest.raises(StpmError, match="do not fit resnet18"):
        weights.create_backbone("resnet18", (1, 2, 3), path)


def test_missing_teacher_weights_file():
    with pytest.raises(StpmError, match="not found"):
        weights.resolve_weights_file("resnet18", "/no/such/file.pth")
