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
    results["operating_points"] = operating_points(samples, scores, detector.threshold_)
    if world.distributed:
        results["images_per_rank"] = [len(part) for part, _ in parts]
    return Evaluation(results, samples, scores, maps, pixel_roc)


# how each operating point's threshold is chosen: the model's own, or the one that rejects this
# share of the test set's good parts (scripts/operating_points.py takes the same)
OPERATING_POINTS = (("the model's threshold", None), ("1% of good parts rejected", 0.01))
OPERATING_POINTS += (("5% of good parts rejected", 0.05),)


def operating_points(samples: list[data.TestSample], scores: np.ndarray, threshold) -> list[dict]:
    """What each operating point catches and rejects (stpm.metrics.operating_point), labelled by
    how its threshold was chosen: the model's own (when it has one), and the thresholds that
    reject 1% and 5% of the test set's good parts."""
    labels, defects = defect_labels(samples), [sample.defect for sample in samples]
    points = []
    for name, share in OPERATING_POINTS:
        if share is not None:
            chosen = metrics.threshold_for_false_alarms(scores[labels == 0], share)
        elif threshold is not None:
            chosen = threshold
        else:
            continue
        points.append(
            {"chosen_by": name, **metrics.operating_point(labels, defects, scores, chosen)}
        )
    return points


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


def write_report(evaluation: Evaluation, detector: STPM, out: Path, examples: int = 3) -> Path:
    """metrics.json, roc.png, histogram.png, heatmaps.png and report.md: which model, its
    threshold and rule, the metrics per defect type with true counts, the operating points, and
    the pictures."""
    threshold = detector.threshold_
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
    score = "image score: the map's maximum"
    if detector.image_model:
        score = "image score: the map's maximum + the image term"
    visualize.score_histogram(
        scores[labels == 0], scores[labels == 1], threshold, out / "histogram.png", score
    )
    visualize.comparison_grid(_examples(evaluation, threshold, examples), out / "heatmaps.png")
    atomic_write_text(out / "report.md", _markdown(results, _model_lines(detector, score)))
    return out


def _model_lines(detector: STPM, score: str) -> list[str]:
    """Which model was evaluated, and how it decides."""
    path = getattr(detector.runtime_, "path", None)
    rule = detector.describe().validation["threshold_rule"]
    threshold = "none" if detector.threshold_ is None else f"{detector.threshold_:.4g}"
    return [
        f"Model: `{path or 'in memory'}` ({detector.runtime_.name}); {score}.",
        f"Threshold: {threshold}, set by the rule {rule} of its defect-free validation scores.",
    ]


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
    """The top- and lowest-scored defects and the top-scored good parts, each named by what the
    threshold did with it: caught or missed, a false alarm or passed."""
    labels, scores = evaluation.labels, evaluation.scores
    defective, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    picks = [(i, "top defect") for i in defective[np.argsort(-scores[defective])][:count]]
    picks += [(i, "lowest defect") for i in defective[np.argsort(scores[defective])][:count]]
    picks += [(i, "top good part") for i in good[np.argsort(-scores[good])][:count]]
    reference = threshold if threshold is not None else float(np.quantile(scores, 0.5))
    rows = []
    for index, group in picks:
        sample, flagged = evaluation.samples[index], scores[index] > reference
        if labels[index]:
            verdict = "caught" if flagged else "missed"
        else:
            verdict = "false alarm" if flagged else "passed"
        image = scoring.read_image(sample.path)
        full_map = scoring.resize_map(evaluation.maps[index], image.shape[:2])
        mask = read_mask(sample.mask, image.shape[:2]).astype(np.uint8) * 255
        heat = visualize.heat_overlay(image, full_map, reference)
        title = f"{group}: {verdict}\nscore {scores[index]:.3g}\n{sample.defect}/{sample.path.stem}"
        rows.append((title, image, mask, heat))
    return rows


METRIC_KEYS = ("image_auroc", "pixel_auroc", "pro", "f1_max")


def _table_rows(results: dict) -> list[tuple[str, int, int, list[float]]]:
    """(defect, its defective images, the good images, metrics in METRIC_KEYS order) per
    defect, then 'all': each row compares its defective images with every good one."""
    good = results["images"]["good"]
    rows = [
        (name, values["images"], good, [values[key] for key in METRIC_KEYS])
        for name, values in results["per_defect"].items()
    ]
    everything = [results[key] for key in METRIC_KEYS]
    return rows + [("all", results["images"]["defective"], good, everything)]


def _markdown(results: dict, model: list[str]) -> str:
    header = "| defect | defective images | good images | image AUROC | pixel AUROC "
    header += "| PRO (FPR <= 0.3) | F1-max |\n| --- | --- | --- | --- | --- | --- | --- |\n"
    rows = [
        f"| {name} | {defective} | {good} | " + " | ".join(_cell(value) for value in values) + " |"
        for name, defective, good, values in _table_rows(results)
    ]
    return (
        "# Evaluation\n\n"
        + "\n".join(model)
        + f"\n\n{results['images']['good']} good and {results['images']['defective']} defective "
        "test images; each row compares its defective images with all the good ones.\n\n"
        + header
        + "\n".join(rows)
        + "\n\n## Operating points\n\n"
        + _operating_table(results.get("operating_points", []))
        + "\n\n## Pictures\n\n"
        "![ROC curves](roc.png)\n\n![Score histogram](histogram.png)\n\n"
        "![Highest- and lowest-scored test images](heatmaps.png)\n"
    )


def _operating_table(points: list[dict]) -> str:
    """Each operating point's threshold, false alarms and defects caught, per defect type."""
    if not points:
        return "No operating points: the test set needs good and defective images."
    kinds = list(points[0]["caught_per_defect"])
    lines = [
        "| threshold chosen by | threshold | false alarms (good parts flagged) | caught, all "
        "defects | " + " | ".join(f"caught, {kind}" for kind in kinds) + " |",
        "| --- " * (4 + len(kinds)) + "|",
    ]
    for point in points:
        alarms = f"{point['false_alarms']} ({point['false_alarm_rate']:.1%})"
        caught = [point["caught"], *point["caught_per_defect"].values()]
        lines.append(
            f"| {point['chosen_by']} | {point['threshold']:.4g} | {alarms} | "
            + " | ".join(f"{share:.0%}" for share in caught)
            + " |"
        )
    return "\n".join(lines)


def _cell(value: float, width: int = 0) -> str:
    """A metric with 3 decimals, or "-" where it could not be computed (NaN)."""
    return f"{value:{width}.3f}" if np.isfinite(value) else "-".rjust(width)


def format_table(results: dict) -> str:
    """The per-defect table as plain text, for the terminal."""
    lines = [
        f"{'defect':14s} {'defective':>9s} {'good':>5s} {'img AUROC':>9s} {'px AUROC':>9s} "
        f"{'PRO':>7s} {'F1-max':>7s}"
    ]
    for name, defective, good, values in _table_rows(results):
        cells = (_cell(value, width) for value, width in zip(values, (9, 9, 7, 7), strict=True))
        lines.append(f"{name:14s} {defective:9d} {good:5d} " + " ".join(cells))
    return "\n".join(lines)
