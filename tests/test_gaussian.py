"""The image-level add-on: a Gaussian of the teacher's pooled features, added to each score."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stpm import STPM, scoring
from stpm.calibration import fit_image_model
from stpm.export import export_model
from stpm.gaussian import pooled
from stpm.modelfile import read_model_file

from .conftest import TINY


def test_the_term_is_the_standardised_distance_in_the_students_units():
    rng = np.random.default_rng(0)
    train, validation = rng.normal(size=(200, 6)), rng.normal(size=(40, 6))
    student_scores = rng.normal(1.0, 0.2, 40)  # the maxima of the validation images' maps
    model, scores = fit_image_model(train, validation, student_scores)
    levels = [torch.from_numpy(validation[:, :, None, None]).float()]  # 1 x 1 "maps"
    assert torch.allclose(pooled(levels), levels[0][:, :, 0, 0])
    terms = model(levels).double().numpy()
    assert terms.mean() == pytest.approx(0.0, abs=1e-5)  # centred on the validation images
    assert terms.std(ddof=1) == pytest.approx(np.std(student_scores, ddof=1), rel=1e-4)
    far = [torch.full((1, 6, 1, 1), 6.0)]
    assert model(far).item() > terms.max()
    assert np.allclose(scores, student_scores + terms, atol=1e-5)  # scoring's rule


@pytest.fixture(scope="module")
def with_gaussian(category, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("gaussian") / "run"
    return STPM(**TINY, image_model="gaussian").fit(category, run_dir=run_dir), run_dir


def test_scores_include_the_term_and_the_threshold_is_set_on_them(with_gaussian):
    model, _ = with_gaussian
    validation = [scoring.read_image(path) for path in model.validation_images_]
    outputs = scoring.run(model.runtime_, validation)
    maps, terms = outputs.maps, outputs.terms
    assert np.abs(terms).max() > 0
    expected = maps.reshape(len(maps), -1).max(axis=1) + terms
    assert np.allclose(model.validation_scores_, expected, atol=1e-5)
    predictions = model.predict(model.validation_images_)
    assert np.allclose([p.score for p in predictions], expected, atol=1e-5)
    brighter = [np.clip(image.astype(int) + 60, 0, 255).astype(np.uint8) for image in validation]
    assert scoring.run(model.runtime_, brighter).terms.mean() > terms.mean()


def test_it_reloads_from_its_file_and_survives_export(with_gaussian, tmp_path):
    model, run_dir = with_gaussian
    description, _, image_state = read_model_file(run_dir / "model.pt")  # weights_only
    assert description.image_model == "gaussian" and set(image_state) >= {"mean", "precision"}
    loaded = STPM.load(run_dir / "model.pt", device="cpu")
    images = np.random.default_rng(0).integers(0, 256, (3, *model.input_size_, 3), dtype=np.uint8)
    ours, our_terms = _maps_and_terms(model, images)
    again, again_terms = _maps_and_terms(loaded, images)
    assert np.array_equal(ours, again) and np.array_equal(our_terms, again_terms)
    assert loaded.threshold_ == model.threshold_
    path = export_model(loaded.runtime_, tmp_path / "model.onnx", check=False).path
    for runtime in ("onnxruntime", "openvino"):
        exported = STPM.load(path, runtime=runtime)
        maps, terms = _maps_and_terms(exported, images)
        assert np.abs(maps - ours).max() < 1e-4
        assert np.abs(terms - our_terms).max() < 1e-3 * max(1.0, np.abs(our_terms).max())


def _maps_and_terms(model: STPM, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    outputs = scoring.run_resized(model.runtime_, images)
    return outputs.maps, outputs.terms
