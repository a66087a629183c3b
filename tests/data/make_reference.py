"""Write the reference files that tests/test_reference.py compares against (run once, by hand).

`python tests/data/make_reference.py` made the first ones with stpm 0.1.0 at commit a727542,
before the runtime redesign: a tiny model file (format version 1), four small test images, and
the maps and scores that version gave them; and, when the shared Magnetic Tile data and default
model are present, that model's maps of two test images.

`python tests/data/make_reference.py v3` made the v3_* ones with stpm 0.3.0 at commit e62d3c3,
before the scoring path was merged into one module: two tiny models of format version 3 with
today's defaults (slim student, hard loss, the image-level term), one squashing its inputs and one
letterboxing them (trained on the same images cut to 80 x 48: oblong_*.png), with the maps,
scores, normalised scores, threshold and validation scores that version gave them.

The test checks that today's code loads the old files and reproduces the old numbers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from stpm import STPM  # noqa: E402
from tests.conftest import TINY, make_category  # noqa: E402

SHARED = HERE.parents[2] / "shared"
DEFAULT_MODEL = SHARED / "models" / "magnetic_tile_default_seed0" / "model.pt"
TILES = SHARED / "datasets" / "magnetic_tile"
TILE_IMAGES = ("MT_Crack/Imgs/exp1_num_249594.jpg", "MT_Free/Imgs/exp0_num_743.jpg")


def main_v3() -> None:
    with tempfile.TemporaryDirectory() as folder:
        category = make_category(Path(folder) / "tiles")
        model = STPM(**{**TINY, "epochs": 3}).fit(category)
        model.save(HERE / "v3_tiny_gaussian_model.pt")
        oblong = Path(folder) / "oblong"
        for path in category.rglob("*.png"):
            target = oblong / path.relative_to(category)
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, 16:64])
        boxed = STPM(**{**TINY, "epochs": 3, "resize_mode": "letterbox"}).fit(oblong)
        boxed.save(HERE / "v3_tiny_letterbox_model.pt")
    for index in range(4):
        image = cv2.imread(str(HERE / f"image_{index}.png"), cv2.IMREAD_UNCHANGED)
        cv2.imwrite(str(HERE / f"oblong_{index}.png"), image[:, 16:64])
    for detector, name, images in ((model, "gaussian", "image"), (boxed, "letterbox", "oblong")):
        predictions = detector.predict([HERE / f"{images}_{index}.png" for index in range(4)])
        np.savez_compressed(
            HERE / f"v3_tiny_{name}_maps.npz",
            **{f"map_{index}": p.anomaly_map for index, p in enumerate(predictions)},
            scores=np.array([p.score for p in predictions]),
            normalized_scores=np.array([p.normalized_score for p in predictions]),
            threshold=np.array(detector.threshold_),
            validation_scores=np.array(detector.validation_scores_),
        )


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        category = make_category(Path(folder) / "tiles")
        model = STPM(**{**TINY, "epochs": 3}).fit(category)
        model.save(HERE / "v1_tiny_model.pt")
        images = (
            sorted((category / "test").rglob("*.png"))[:2]
            + sorted((category / "test").rglob("*.png"))[-2:]
        )
        for index, path in enumerate(images):
            (HERE / f"image_{index}.png").write_bytes(path.read_bytes())
    paths = [HERE / f"image_{index}.png" for index in range(4)]
    predictions = model.predict(paths)
    np.savez_compressed(
        HERE / "v1_tiny_maps.npz",
        maps=np.stack([p.anomaly_map for p in predictions]),
        scores=np.array([p.score for p in predictions]),
        normalized_scores=np.array([p.normalized_score for p in predictions]),
        threshold=np.array(model.threshold_),
    )
    if DEFAULT_MODEL.is_file() and TILES.is_dir():
        default = STPM.load(DEFAULT_MODEL, device="cpu")
        predictions = default.predict([TILES / name for name in TILE_IMAGES])
        np.savez_compressed(
            HERE / "default_model_maps.npz",
            names=np.array(TILE_IMAGES),
            scores=np.array([p.score for p in predictions]),
            **{f"map_{index}": p.anomaly_map for index, p in enumerate(predictions)},
        )


if __name__ == "__main__":
    main_v3() if sys.argv[1:] == ["v3"] else main()
