"""Input geometry: squash (stretch to the input size) or letterbox (aspect kept, padded)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from stpm import STPM, StpmError, scoring
from stpm.export import export_model

from .conftest import TINY


@pytest.mark.parametrize(
    ("shape", "box"),
    [((100, 200), (16, 0, 32, 64)), ((200, 100), (0, 16, 64, 32)), ((50, 50), (0, 0, 64, 64))],
)
def test_a_letterboxed_image_keeps_its_aspect_and_is_centred(shape, box):
    assert scoring.letterbox_box(shape, (64, 64)) == box
    image = np.full((*shape, 3), 200, np.uint8)
    boxed = scoring.resize(image, (64, 64), "letterbox")
    top, left, height, width = box
    assert boxed.shape == (64, 64, 3)
    assert (boxed[top : top + height, left : left + width] == 200).all()
    assert boxed.sum() == 200 * 3 * height * width  # the rest is black padding
    assert np.array_equal(
        scoring.resize(image, (64, 64)), scoring.resize(image, (64, 64), "squash")
    )


def test_unletterboxing_gives_the_map_a_squashed_image_would_have():
    """A map that is a function of position in the part comes back as the squashed one."""
    rows = np.linspace(0, 1, 120, dtype=np.float32)[:, None] * np.ones((1, 300), np.float32)
    squashed = scoring.resize_map(rows, (64, 64))
    top, left, height, width = scoring.letterbox_box(rows.shape, (64, 64))
    boxed = np.zeros((64, 64), np.float32)
    boxed[top : top + height, left : left + width] = scoring.resize_map(rows, (height, width))
    assert np.abs(scoring.unletterbox_map(boxed, rows.shape) - squashed).max() < 0.05


def _oblong_category(square, root):
    """The tiny category, each image cut to 80 x 48 (height x width)."""
    for path in square.rglob("*.png"):
        target = root / path.relative_to(square)
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, 16:64])
    return root


def test_a_letterbox_model_trains_reloads_exports_and_scores_the_part_only(category, tmp_path):
    oblong = _oblong_category(category, tmp_path / "oblong")
    settings = {**TINY, "epochs": 2, "resize_mode": "letterbox"}
    model = STPM(**settings).fit(oblong, run_dir=tmp_path / "run")
    loaded = STPM.load(tmp_path / "run" / "model.pt", device="cpu")
    assert loaded.resize_mode == "letterbox"
    validation = [p for p in sorted((oblong / "train" / "good").iterdir())]
    validation = [p for p in validation if str(p) in set(model.validation_images_)]
    scores = [prediction.score for prediction in loaded.predict(validation)]
    assert np.allclose(scores, model.validation_scores_, atol=1e-5)  # the threshold's scores
    prediction = loaded.predict(oblong / "test" / "scratch" / "000.png")[0]
    assert prediction.anomaly_map.shape == (80, 48)
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in validation]
    torch_maps = loaded.anomaly_maps(images, resize=True)
    path = export_model(loaded.runtime_, tmp_path / "model.onnx", check=False).path
    exported = STPM.load(path)
    assert exported.resize_mode == "letterbox"
    assert np.abs(exported.anomaly_maps(images, resize=True) - torch_maps).max() < 1e-4
    with pytest.raises(StpmError, match="resize mode"):
        STPM(**{**TINY, "resize_mode": "crop"}).fit(oblong)
