"""Training objectives: synthetic corruptions, the denoising student, the hard feature loss and
model selection by separation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stpm import STPM, StpmError, corruptions, scoring
from stpm.export import export_model

from .conftest import TINY


def test_corruptions_are_deterministic_under_their_key_and_leave_the_input_alone():
    images = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    before = images.copy()
    keys = [(0, 7, 1, index) for index in range(6)]
    first, again = corruptions.corrupt_batch(images, keys), corruptions.corrupt_batch(images, keys)
    assert np.array_equal(first, again)
    assert np.array_equal(images, before)  # copies, never the caller's images
    assert all((a != b).any() for a, b in zip(first, images, strict=True))  # share 1: all changed
    other = corruptions.corrupt_batch(images, [(0, 8, 1, index) for index in range(6)])
    assert not np.array_equal(first, other)
    none = corruptions.corrupt_batch(images, keys, share=0.0)
    assert np.array_equal(none, images)
    for seed in range(20):
        mask = corruptions.blob((64, 64), np.random.default_rng(seed))
        assert 0 < mask.mean() < 0.5 and mask.min() >= 0 and mask.max() <= 1


def _validation_images(model) -> list:
    return [
        scoring.resize(scoring.read_image(p), model.input_size_) for p in model.validation_images_
    ]


@pytest.mark.parametrize(
    "objective",
    [
        {"denoise": 0.5},
        {"hard_quantile": 0.9},
        {"distance": "standardized"},
        {"selection": "separation", "denoise": 0.5},
    ],
    ids=["denoise", "hard", "standardized", "separation"],
)
def test_each_objective_learns_and_sees_corruptions(category, tmp_path, monkeypatch, objective):
    corrupted_inputs = []
    original = corruptions.corrupt_batch

    def recording(images, keys, share=1.0):
        corrupted_inputs.append((np.array(images), list(keys)))
        return original(images, keys, share)

    monkeypatch.setattr(corruptions, "corrupt_batch", recording)
    settings = {**TINY, **objective}
    model = STPM(**settings).fit(category, run_dir=tmp_path / "run")
    history = model.history_
    assert history[-1]["loss"] < history[0]["loss"]
    validation = _validation_images(model)
    # the threshold's scores are those of the clean validation images
    scores = [p.score for p in model.predict(model.validation_images_)]
    assert np.allclose(scores, model.validation_scores_, atol=1e-5)
    trained_on = [keys for _, keys in corrupted_inputs if keys[0][0] == 0]  # TRAINING stream
    if objective.get("denoise"):
        assert trained_on
        seen = np.concatenate([images for images, keys in corrupted_inputs if keys[0][0] == 0])
        for image in validation:  # never a validation image among what the student trained on
            assert not (seen == image[None]).all(axis=(1, 2, 3)).any()
    else:
        assert not trained_on
    if objective.get("selection") == "separation":
        assert all("separation" in epoch for epoch in history)
        best = max(epoch["separation"] for epoch in history)
        assert history[model.best_epoch_ - 1]["separation"] == best
    stack = np.stack(validation * 8)  # eight corruptions of each held-out image
    dirty = original(stack, [(9, index) for index in range(len(stack))])

    def score(images):  # the image score: the map's maximum
        return model.anomaly_maps(images).reshape(len(images), -1).max(axis=1).mean()

    if objective.get("selection") != "separation":  # 3 held-out images: it may keep epoch 1
        assert score(dirty) > score(stack)
    loaded = STPM.load(tmp_path / "run" / "model.pt", device="cpu")
    for name in ("denoise", "hard_quantile", "selection", "distance"):
        assert getattr(loaded, name) == getattr(model, name)
    trained_scale = model.runtime_.student.state_dict()
    for key, value in loaded.runtime_.student.state_dict().items():
        assert torch.equal(value, trained_scale[key])  # the feature scale included
    path = export_model(loaded.runtime_, tmp_path / "model.onnx", check=False).path
    exported = STPM.load(path)
    assert np.abs(exported.anomaly_maps(dirty) - loaded.anomaly_maps(dirty)).max() < 1e-4


@pytest.mark.parametrize(
    "bad",
    [{"denoise": 1.5}, {"hard_quantile": 1.0}, {"selection": "best"}, {"distance": "l1"}],
)
def test_bad_objective_settings_are_refused(category, bad):
    with pytest.raises(StpmError):
        STPM(**{**TINY, **bad}).fit(category)


def test_the_standardized_distance_sees_a_change_of_magnitude_that_cosine_ignores():
    from stpm.model import FeatureScale, layer_distances

    teacher = [torch.rand(1, 8, 4, 4) + 0.5]
    brighter = [teacher[0] * 2.0]  # same direction, twice the magnitude
    assert layer_distances(teacher, brighter)[0].max() < 1e-6
    assert layer_distances(teacher, brighter, "standardized")[0].min() > 0.2
    scale = FeatureScale([8])
    scale.set([torch.full((8,), 0.5)], [torch.full((8,), 2.0)])
    assert torch.allclose(scale(teacher)[0], (teacher[0] - 0.5) / 2.0)


def test_a_diverging_training_stops_with_advice(category, monkeypatch):
    from stpm import train

    monkeypatch.setattr(train, "feature_loss", lambda *args: torch.tensor(float("nan")))
    with pytest.raises(StpmError, match="diverged"):
        STPM(**{**TINY, "epochs": 1}).fit(category)
