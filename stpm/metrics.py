"""Image AUROC, pixel AUROC, PRO and F1-max, as defined with MVTec AD.

Pixel metrics stream: each image's map is reduced to histograms over shared score bins as it
arrives, so memory does not grow with the number of test pixels. The bins are quantiles of the
scores themselves (65,536 by default), so ties inside one bin cost at most about 1e-5 of AUROC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

PRO_FPR_LIMIT = 0.3


def image_auroc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC of image scores; labels 1 = defective. NaN if one class is missing."""
    labels = np.asarray(labels)
    if labels.min(initial=1) == labels.max(initial=0):
        return float("nan")
    return float(roc_auc_score(labels, scores))


def f1_max(labels: Sequence[int], scores: Sequence[float]) -> tuple[float, float]:
    """Best F1 over all thresholds and the threshold reaching it: (f1, threshold)."""
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1])) if len(thresholds) else 0
    return float(f1[best]), float(thresholds[best]) if len(thresholds) else float("nan")


def score_bins(samples: np.ndarray, count: int = 65536) -> np.ndarray:
    """Bin edges: quantiles of a sample of the scores, so every bin holds about as many pixels."""
    edges = np.unique(np.quantile(samples.astype(np.float64), np.linspace(0, 1, count + 1)))
    return edges[1:-1]  # inner edges; np.searchsorted puts everything else in the end bins


@dataclass
class PixelAccumulator:
    """Histograms of pixel scores over fixed bins, filled one image at a time.

    negatives: defect-free pixels per bin; positives: defect pixels per bin; overlap: defect
    pixels per bin weighted by 1 / the size of their connected region (for PRO).
    """

    edges: np.ndarray
    negatives: np.ndarray = field(init=False)
    positives: np.ndarray = field(init=False)
    overlap: np.ndarray = field(init=False)
    regions: int = 0

    def __post_init__(self) -> None:
        size = len(self.edges) + 1
        self.negatives = np.zeros(size, np.int64)
        self.positives = np.zeros(size, np.int64)
        self.overlap = np.zeros(size, np.float64)

    def add(self, anomaly_map: np.ndarray, mask: np.ndarray | None) -> None:
        """anomaly_map (H, W) float; mask (H, W) bool or None for an image with no defect."""
        bins = np.searchsorted(self.edges, anomaly_map.ravel(), side="right")
        size = len(self.negatives)
        if mask is None or not mask.any():
            self.negatives += np.bincount(bins, minlength=size)
            return
        defect = mask.ravel().astype(bool)
        self.negatives += np.bincount(bins[~defect], minlength=size)
        self.positives += np.bincount(bins[defect], minlength=size)
        count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
        labels = labels.ravel()[defect]
        region_sizes = np.bincount(labels)
        self.overlap += np.bincount(
            bins[defect], weights=1.0 / region_sizes[labels], minlength=size
        )
        self.regions += count - 1

    def auroc(self) -> float:
        """Pixel AUROC from the histograms (ties within a bin count one half), via scikit-learn."""
        if not self.positives.any() or not self.negatives.any():
            return float("nan")
        labels, scores, counts = self._as_samples()
        return float(roc_auc_score(labels, scores, sample_weight=counts))

    def roc(self) -> tuple[np.ndarray, np.ndarray]:
        """(false-positive rate, true-positive rate) of pixels, thresholds from high to low."""
        labels, scores, counts = self._as_samples()
        fpr, tpr, _ = roc_curve(labels, scores, sample_weight=counts)
        return fpr, tpr

    def _as_samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The histograms as scikit-learn's (labels, scores, sample_weight): one row per bin and
        class, the bin index as score, the pixel count as weight."""
        bins = np.arange(len(self.negatives))
        labels = np.r_[np.zeros_like(bins), np.ones_like(bins)]
        return labels, np.r_[bins, bins], np.r_[self.negatives, self.positives]

    def pro(self, fpr_limit: float = PRO_FPR_LIMIT) -> float:
        """Per-region overlap averaged over regions, integrated over FPR in [0, limit] / limit."""
        if self.regions == 0 or not self.negatives.any():
            return float("nan")
        # lower the threshold one bin at a time, from the highest bin to the lowest
        fpr = np.r_[0.0, np.cumsum(self.negatives[::-1]) / self.negatives.sum()]
        overlap = np.r_[0.0, np.cumsum(self.overlap[::-1]) / self.regions]
        return integrate_to(fpr, overlap, fpr_limit) / fpr_limit


def integrate_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under y(x) for x in [0, limit]; x ascending, y interpolated at limit."""
    inside = x <= limit
    xs, ys = x[inside], y[inside]
    if xs[-1] < limit:
        xs, ys = np.r_[xs, limit], np.r_[ys, np.interp(limit, x, y)]
    return float(np.trapezoid(ys, xs))


def threshold_for_false_alarms(good_scores: Sequence[float], share: float) -> float:
    """The lowest threshold (a score must be above it) that flags at most `share` of the good
    parts' scores: the score of the good part ranked floor(share * count) + 1 from the top."""
    ranked = np.sort(np.asarray(good_scores, np.float64))[::-1]
    return float(ranked[min(int(np.floor(share * len(ranked))), len(ranked) - 1)])


def operating_point(
    labels: np.ndarray, defects: Sequence[str], scores: np.ndarray, threshold: float
) -> dict:
    """What a threshold does on a test set: the good parts it flags (false alarms, a count and
    a share) and the share of defective parts it catches, overall and per defect type."""
    flagged, good = np.asarray(scores) > threshold, np.asarray(labels) == 0
    defects = np.asarray(defects)
    kinds = sorted(set(defects.tolist()) - {"good"})
    return {
        "threshold": float(threshold),
        "false_alarms": int(flagged[good].sum()),
        "false_alarm_rate": float(flagged[good].mean()) if good.any() else float("nan"),
        "caught": float(flagged[~good].mean()) if (~good).any() else float("nan"),
        "caught_per_defect": {kind: float(flagged[defects == kind].mean()) for kind in kinds},
    }
