"""Score a category's test/ set and compute its metrics, overall and per defect type.

Two passes keep memory bounded: the first scores every image and keeps only its map at the
model's input size (N x H x W float32); the second upsamples one map at a time to its mask's
resolution and adds it to the pixel histograms.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from sklearn.metrics import roc_curve
from tqdm import tqdm

from . import data, distributed, metrics, scoring, visualize
from .detector import STPM
from .errors import StpmError
from .files import atomic_write_text


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
        return defect_labels(self.samples)

    @property
    def has_masks(self) -> bool:
        """Whether any test image has a defect mask: pixel metrics need one."""
        return any(sample.mask is not None for sample in self.samples)


def defect_labels(samples: list[data.TestSample]) -> np.ndarray:
    """1 for a defective test image, 0 for a good one: (N,) int."""
    return np.array([sample.defect != "good" for sample in samples], dtype=int)


def read_mask(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """A ground-truth mask as bool (H, W); all False when the image has no mask file."""
    if path is None:
        return np.zeros(shape, bool)
    mask = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise StpmError(f"cannot read mask {path}")
    return mask > 127


def evaluate(
    detector: STPM,
    category: Path,
    batch_size: int | None = None,
    world: distributed.World = distributed.ALONE,
) -> Evaluation | None:
    """Image AUROC, pixel AUROC, PRO and F1-max on category/test, overall and per defect.

    Under torchrun (world) each process scores a contiguous share of the test images and sends
    its scores and small maps to rank 0, which computes the metrics (and returns them; the
    other ranks return None)."""
    samples = distributed.check_everywhere(lambda: data.test_samples(category), world)
    distributed.agree_on_files([sample.path for sample in samples], "the test images", world)
    mine = samples[distributed.shard(len(samples), world)]
    scores, maps = [], []
    outcomes = detector.predict_iter(
        [sample.path for sample in mine], batch_size=batch_size, full_resolution=False
    )
    for _, outcome in tqdm(
        outcomes, total=len(mine), unit="img", desc="scoring test/", disable=not world.main
    ):
        if isinstance(outcome, StpmError):
            raise outcome
        scores.append(outcome.score)
        maps.append(outcome.anomaly_map)
    parts = distributed.gather_to_main([(scores, maps)], world)
    if parts is None:
        return None
    scores = np.asarray([score for part, _ in parts for score in part])
    maps = np.stack([small for _, part in parts for small in part])
    results, pixel_roc = summarize(samples, scores, maps)
    if world.distributed:
        results["images_per_rank"] = [len(part) for part, _ in parts]
    return Evaluation(results, samples, scores, maps, pixel_roc)


def summarize(
    samples: list[data.TestSample], scores: np.ndarray, maps: np.ndarray
) -> tuple[dict, tuple[np.ndarray, np.ndarray]]:
    """Metrics from image scores (N,) and anomaly maps (N, h, w) of any detector.

    Each map is upsampled bilinearly to its image's own size before the pixel metrics, the
    same way for every method compared.
    """
    sizes = [scoring.image_shape(sample.path) for sample in samples]  # headers only, no decoding
    edges = metrics.score_bins(maps[:, ::2, ::2].ravel())
    defects = sorted({sample.defect for sample in samples} - {"good"})
    overall = metrics.PixelAccumulator(edges)
    per_defect = {defect: metrics.PixelAccumulator(edges) for defect in defects}
    pairs = zip(samples, maps, sizes, strict=True)
    for sample, small_map, size in tqdm(
        pairs, total=len(samples), desc="pixel metrics", leave=False
    ):
        mask = read_mask(sample.mask, size)
        full_map = scoring.resize_map(small_map, mask.shape)
        overall.add(full_map, mask)
        for defect in defects if sample.defect == "good" else [sample.defect]:
            per_defect[defect].add(full_map, mask)
    labels = defect_labels(samples)
    results = _summary(labels, scores, overall)
    results["per_defect"] = {}
    for defect in defects:
        chosen = np.array([sample.defect in ("good", defect) for sample in samples])
        results["per_defect"][defect] = {
            "images": int((labels[chosen] == 1).sum()),
            **_summary(labels[chosen], scores[chosen], per_defect[defect]),
        }
    results["images"] = {"good": int((labels == 0).sum()), "defective": int(labels.sum())}
    has_both = overall.positives.any() and overall.negatives.any()
    return results, overall.roc() if has_both else (np.zeros(0), np.zeros(0))


def _summary(labels: np.ndarray, scores: np.ndarray, pixels: metrics.PixelAccumulator) -> dict:
    f1, f1_threshold = metrics.f1_max(labels, scores)
    return {
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": pixels.auroc(),
        "pro": pixels.pro(),
        "f1_max": f1,
        "f1_max_threshold": f1_threshold,
    }


def write_report(
    evaluation: Evaluation, threshold: float | None, out: Path, examples: int = 3
) -> Path:
    """metrics.json, roc.png, histogram.png, heatmaps.png and report.md (a table and the pictures)."""
    out.mkdir(parents=True, exist_ok=True)
    results = evaluation.metrics
    text = json.dumps(finite_or_null(results), indent=2, allow_nan=False)
    atomic_write_text(out / "metrics.json", text + "\n")
    labels, scores = evaluation.labels, evaluation.scores
    curves = {}
    if 0 < labels.sum() < len(labels):
        fpr, tpr, _ = roc_curve(labels, scores)
        curves["image"] = (fpr, tpr, results["image_auroc"])
    if evaluation.has_masks:
        curves["pixel"] = (*evaluation.pixel_roc, results["pixel_auroc"])
    visualize.roc_curves(curves, out / "roc.png")
    visualize.score_histogram(
        scores[labels == 0], scores[labels == 1], threshold, out / "histogram.png"
    )
    visualize.comparison_grid(_examples(evaluation, threshold, examples), out / "heatmaps.png")
    atomic_write_text(out / "report.md", _markdown(results))
    return out


def finite_or_null(value):
    """A copy of nested dicts and lists with NaN and infinities as None: JSON has no NaN."""
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _examples(evaluation: Evaluation, threshold: float | None, count: int) -> list:
    """The best-found defects, the worst-missed defects and the worst false alarms."""
    labels, scores = evaluation.labels, evaluation.scores
    defective, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    picks = [(i, "best found") for i in defective[np.argsort(-scores[defective])][:count]]
    picks += [(i, "worst missed") for i in defective[np.argsort(scores[defective])][:count]]
    picks += [(i, "false alarm") for i in good[np.argsort(-scores[good])][:count]]
    reference = threshold or float(np.quantile(scores, 0.5))
    rows = []
    for index, kind in picks:
        sample = evaluation.samples[index]
        image = scoring.read_image(sample.path)
        full_map = scoring.resize_map(evaluation.maps[index], image.shape[:2])
        mask = read_mask(sample.mask, image.shape[:2]).astype(np.uint8) * 255
        overlay = visualize.heatmap_overlay(image, full_map, reference, f"{scores[index]:.3g}")
        rows.append((f"{kind}\n{sample.defect}/{sample.path.name}", image, mask, overlay))
    return rows


METRIC_KEYS = ("image_auroc", "pixel_auroc", "pro", "f1_max")


def _table_rows(results: dict) -> list[tuple[str, int, list[float]]]:
    """(defect, defective images, metrics in METRIC_KEYS order) per defect, then 'all'."""
    rows = [
        (name, values["images"], [values[key] for key in METRIC_KEYS])
        for name, values in results["per_defect"].items()
    ]
    rows.append(("all", results["images"]["defective"], [results[key] for key in METRIC_KEYS]))
    return rows


def _markdown(results: dict) -> str:
    header = "| defect | images | image AUROC | pixel AUROC | PRO (FPR <= 0.3) | F1-max |\n"
    header += "| --- | --- | --- | --- | --- | --- |\n"
    rows = [
        f"| {name} | {images} | " + " | ".join(_cell(value) for value in values) + " |"
        for name, images, values in _table_rows(results)
    ]
    return (
        "# Evaluation\n\n"
        f"{results['images']['good']} good and {results['images']['defective']} defective test "
        "images; per-defect rows compare that defect's images with all good ones.\n\n"
        + header
        + "\n".join(rows)
        + "\n\n"
        "![ROC curves](roc.png)\n\n![Score histogram](histogram.png)\n\n"
        "![Best and worst heatmaps](heatmaps.png)\n"
    )


def _cell(value: float, width: int = 0) -> str:
    """A metric with 3 decimals, or "-" where it could not be computed (NaN)."""
    return f"{value:{width}.3f}" if np.isfinite(value) else "-".rjust(width)


def format_table(results: dict) -> str:
    """The per-defect table as plain text, for the terminal."""
    lines = [
        f"{'defect':14s} {'images':>6s} {'img AUROC':>9s} {'px AUROC':>9s} {'PRO':>7s} {'F1-max':>7s}"
    ]
    for name, images, values in _table_rows(results):
        cells = (_cell(value, width) for value, width in zip(values, (9, 9, 7, 7), strict=True))
        lines.append(f"{name:14s} {images:6d} " + " ".join(cells))
    return "\n".join(lines)
