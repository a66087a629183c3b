"""Same results across versions: model files written by older stpm load and give the same maps.

tests/data/ holds files made by earlier versions (tests/data/make_reference.py says how). They
stay as the format grows: each new format version adds a file, none is replaced.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

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
