"""Same results across versions: model files written by older stpm load and give the same maps.

tests/data/ holds files made by earlier versions (tests/data/make_reference.py says how). They
stay as the format grows: each new format version adds a file, none is replaced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from stpm import STPM

DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared"
DEFAULT_MODEL = SHARED / "models" / "magnetic_tile_default_seed0" / "model.pt"
TILES = SHARED / "datasets" / "magnetic_tile"


def test_a_version_1_model_file_gives_its_old_maps_and_scores():
    reference = np.load(DATA / "v1_tiny_maps.npz")
    model = STPM.load(DATA / "v1_tiny_model.pt", device="cpu")
    assert model.threshold_ == pytest.approx(float(reference["threshold"]), rel=1e-12)
    # what it was trained with, whatever today's defaults are
    assert (model.student, model.hard_quantile, model.image_model) == ("same", None, None)
    assert (model.distance, model.resize_mode, model.denoise) == ("cosine", "squash", 0.0)
    predictions = model.predict([DATA / f"image_{index}.png" for index in range(4)])
    maps = np.stack([prediction.anomaly_map for prediction in predictions])
    np.testing.assert_allclose(maps, reference["maps"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        [p.score for p in predictions], reference["scores"], rtol=1e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        [p.normalized_score for p in predictions], reference["normalized_scores"], atol=1e-6
    )


@pytest.mark.parametrize(
    ("name", "images", "resize_mode"),
    [("gaussian", "image", "squash"), ("letterbox", "oblong", "letterbox")],
)
def test_a_version_3_model_file_gives_its_old_maps_and_scores(name, images, resize_mode):
    """Today's defaults (slim student, hard loss, image-level term), squashed and letterboxed:
    the two ways an image reaches its score that later versions merged into one path."""
    reference = np.load(DATA / f"v3_tiny_{name}_maps.npz")
    model = STPM.load(DATA / f"v3_tiny_{name}_model.pt", device="cpu")
    assert (model.image_model, model.resize_mode) == ("gaussian", resize_mode)
    assert model.threshold_ == pytest.approx(float(reference["threshold"]), rel=1e-12)
    assert model.validation_scores_ == pytest.approx(reference["validation_scores"], rel=1e-12)
    predictions = model.predict([DATA / f"{images}_{index}.png" for index in range(4)])
    for index, prediction in enumerate(predictions):
        np.testing.assert_allclose(
            prediction.anomaly_map, reference[f"map_{index}"], rtol=1e-5, atol=1e-7
        )
    np.testing.assert_allclose(
        [p.score for p in predictions], reference["scores"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        [p.normalized_score for p in predictions], reference["normalized_scores"], atol=1e-6
    )


def test_a_version_2_model_file_loads_with_what_version_3_added(tmp_path):
    """A file of format version 2 (stpm 0.2) is a version 3 file without pruning and shared
    layers: made here from the v3 reference, it loads and gives the same scores."""
    state = torch.load(DATA / "v3_tiny_gaussian_model.pt", weights_only=True)
    del state["pruning"], state["shared_layers"]
    state.update(format_version=2, stpm_version="0.2.0")
    torch.save(state, tmp_path / "v2.pt")
    model = STPM.load(tmp_path / "v2.pt", device="cpu")
    assert model.pruning_ is None and model.shared_layers_ == []
    reference = np.load(DATA / "v3_tiny_gaussian_maps.npz")
    scores = [p.score for p in model.predict([DATA / f"image_{i}.png" for i in range(4)])]
    np.testing.assert_allclose(scores, reference["scores"], rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(
    not (DEFAULT_MODEL.is_file() and TILES.is_dir()),
    reason="needs ../shared/models/magnetic_tile_default_seed0 and the Magnetic Tile data",
)
def test_the_default_model_gives_its_old_maps():
    reference = np.load(DATA / "default_model_maps.npz")
    model = STPM.load(DEFAULT_MODEL, device="cpu")
    predictions = model.predict([TILES / str(name) for name in reference["names"]])
    for index, prediction in enumerate(predictions):
        old = reference[f"map_{index}"]
        np.testing.assert_allclose(prediction.anomaly_map, old, rtol=1e-4, atol=1e-6 * old.max())
    np.testing.assert_allclose([p.score for p in predictions], reference["scores"], rtol=1e-5)
