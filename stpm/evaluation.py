"""Score a category's test/ set and compute its metrics, overall and per defect type.

Two passes keep memory bounded: the first scores every image and keeps only its map at the
model's input size (N x H x W float32); the second upsamples one map at a time to its mask's
resolution and adds it to the pixel histograms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from . import data, metrics
from .detector import STPM
from .errors import StpmError


@dataclass
class Evaluation:
    """Metrics plus what the report draws: per-image scores, small maps, pixel ROC."""

    metrics: dict
    samples: list[data.TestSample]
    scores: np.ndarray  # (N,) raw image scores
    maps: np.ndarray  # (N, H, W) anomaly maps at the model's input size
    pixel_roc: tuple[np.ndarray, np.ndarray]

    @property
    def labels(self) -> np.ndarray:
        return np.array([sample.defect != "good" for sample in self.samples], dtype=int)


def read_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as bool (H, W); all False when the image has no mask file."""
    if path is None:
        return np.zeros(shape, bool)
    mask = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise StpmError(f"cannot read mask {path}")
    return mask > 127


def evaluate(detector: STPM, category: Path, batch_size: int | None = None) -> Evaluation:
    """Image AUROC, pixel AUROC, PRO and F1-max on category/test, overall and per defect."""
    samples = data.test_samples(category)
    scores, maps = [], []
    outcomes = detector.predict_iter(
        [sample.path for sample in samples], batch_size=batch_size, full_resolution=False
    )
    for _, outcome in tqdm(outcomes, total=len(samples), unit="img", desc="scoring test/"):
        if isinstance(outcome, StpmError):
            raise outcome
        scores.append(outcome.score)
        maps.append(outcome.anomaly_map)
    sizes = [data.image_shape(sample.path) for sample in samples]  # headers only, no decoding
    scores, maps = np.asarray(scores), np.stack(maps)
    edges = metrics.score_bins(maps[:, ::2, ::2].ravel())
    defects = sorted({sample.defect for sample in samples} - {"good"})
    overall = metrics.PixelAccumulator(edges)
    per_defect = {defect: metrics.PixelAccumulator(edges) for defect in defects}
    for sample, small_map, size in tqdm(
        zip(samples, maps, sizes, strict=True),
        total=len(samples),
        desc="pixel metrics",
        leave=False,
    ):
        full_map = data.resize_map(small_map, size)
        mask = read_mask(sample.mask, size)
        if mask.shape != full_map.shape:
            full_map = data.resize_map(small_map, mask.shape)
        overall.add(full_map, mask)
        for defect in defects if sample.defect == "good" else [sample.defect]:
            per_defect[defect].add(full_map, mask)
    labels = np.array([sample.defect != "good" for sample in samples], dtype=int)
    results = _summary(labels, scores, overall)
    results["per_defect"] = {}
    for defect in defects:
        chosen = np.array([sample.defect in ("good", defect) for sample in samples])
        results["per_defect"][defect] = {
            "images": int((labels[chosen] == 1).sum()),
            **_summary(labels[chosen], scores[chosen], per_defect[defect]),
        }
    results["images"] = {"good": int((labels == 0).sum()), "defective": int(labels.sum())}
    return Evaluation(results, samples, scores, maps, overall.roc())


def _summary(labels: np.ndarray, scores: np.ndarray, pixels: metrics.PixelAccumulator) -> dict:
    f1, f1_threshold = metrics.f1_max(labels, scores)
    return {
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": pixels.auroc(),
        "pro": pixels.pro(),
        "f1_max": f1,
        "f1_max_threshold": f1_threshold,
    }
