"""Scoring with Ray Data: the same numbers as predict, rows in order, bad rows not fatal.

Scores may differ from predict's in the last bits of float32 (rel 1e-6): the actors run other
thread counts and batch compositions, which change the order of the convolutions' sums.
"""

from __future__ import annotations

import importlib
import socket
import sys

import numpy as np
import pytest

import stpm
import stpm.raydata
from stpm import StpmError
from stpm.raydata import RayScorer, score_paths

from .conftest import texture

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def local_ray():
    """A quiet local Ray of 2 CPUs for this module, with no usage report sent anywhere."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


@pytest.fixture(scope="module")
def model_file(trained):
    return trained[1] / "model.pt"


@pytest.fixture(scope="module")
def scorer(model_file):
    """A scorer in this process: RayScorer is a plain class, Ray only calls it."""
    return RayScorer(model_file, maps=True)


def test_read_images_through_the_scorer_matches_predict(local_ray, trained, model_file, category):
    model, _ = trained
    folder = category / "test" / "scratch"
    rows = (
        ray.data.read_images(str(folder), include_paths=True)
        .map_batches(
            RayScorer,
            fn_constructor_kwargs=dict(model=str(model_file), maps=True),
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=2,
        )
        .take_all()
    )
    expected = {
        prediction.path: prediction for prediction in model.predict(sorted(folder.iterdir()))
    }
    assert sorted(row["path"] for row in rows) == sorted(expected)
    for row in rows:
        prediction = expected[row["path"]]
        assert "image" not in row
        assert row["score"] == pytest.approx(prediction.score, rel=1e-6)
        assert row["normalized_score"] == pytest.approx(prediction.normalized_score, abs=1e-6)
        assert row["verdict"] == "anomalous" and row["is_anomalous"] and row["error"] == ""
        np.testing.assert_allclose(row["anomaly_map"], prediction.anomaly_map, atol=1e-5)


def test_score_paths_keeps_input_order_and_reports_bad_files(
    local_ray, trained, model_file, category, tmp_path
):
    model, _ = trained
    images = sorted((category / "test").rglob("*.png"))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    paths = [*images[::-1], not_an_image, *images]  # reversed, so that order means something
    rows = score_paths(paths, model_file, workers=2, batch_size=2)
    assert [row["path"] for row in rows] == [str(path) for path in paths]
    expected = {prediction.path: prediction.score for prediction in model.predict(images)}
    for row in rows:
        if row["path"] == str(not_an_image):
            assert row["verdict"] == "error" and np.isnan(row["score"])
            assert "not a decodable image" in row["error"]
        else:
            assert row["score"] == pytest.approx(expected[row["path"]], rel=1e-6)
            assert row["verdict"] in ("good", "anomalous") and row["error"] == ""
    assert [row["verdict"] for row in rows].count("anomalous") == 6  # 3 scratches, twice


def test_an_image_column_of_any_sizes_with_one_bad_image(scorer, trained):
    model, _ = trained
    square = texture(np.random.default_rng(1), 80)  # grayscale (H, W)
    wide = np.dstack([texture(np.random.default_rng(2), 120)[:50]] * 3)  # RGB 50 x 120
    broken = np.full((8, 8), np.nan, np.float32)
    images = np.empty(3, dtype=object)
    images[:] = [square, broken, wide]
    scored = scorer({"image": images, "id": np.arange(3)})
    assert "image" not in scored and list(scored["id"]) == [0, 1, 2]
    assert scored["verdict"][1] == "error" and "NaN" in scored["error"][1]
    assert np.isnan(scored["score"][1]) and not scored["is_anomalous"][1]
    for row, image in ((0, square), (2, wide)):
        prediction = model.predict(image)[0]
        assert scored["score"][row] == pytest.approx(prediction.score, rel=1e-6)
        assert scored["verdict"][row] == ("anomalous" if prediction.is_anomalous else "good")
        assert scored["anomaly_map"][row].shape == image.shape[:2]
    assert scored["anomaly_map"][1].shape == (0, 0)


def test_a_batch_without_images_or_paths_is_refused(scorer):
    with pytest.raises(StpmError, match="'image' or a 'path' column; this one has 'id', 'label'"):
        scorer({"id": np.arange(2), "label": np.array(["a", "b"])})


def test_a_missing_model_names_the_path_and_the_host(tmp_path):
    missing = tmp_path / "runs" / "model.pt"
    with pytest.raises(StpmError, match=f"not found on host {socket.gethostname()}: .*model.pt"):
        RayScorer(missing)
    with pytest.raises(StpmError, match="model file not found: .*model.pt"):
        score_paths(["a.png"], missing)


def test_without_ray_the_module_imports_and_score_paths_says_what_to_install(
    monkeypatch, model_file
):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails
    monkeypatch.delitem(sys.modules, "stpm.raydata")  # so that it is imported afresh
    monkeypatch.setattr(stpm, "raydata", stpm.raydata)  # and the original put back after
    without_ray = importlib.import_module("stpm.raydata")
    with pytest.raises(StpmError, match=r'Ray is not installed: pip install "stpm\[ray\]"'):
        without_ray.score_paths(["a.png"], model_file)
