"""Calibration: what a trained model learns from defect-free images it never trained on.

- the validation split: a seeded, fixed share of train/good held out from training;
- the image model's fit: a Gaussian of the teacher's pooled features over the training images,
  standardised on the validation images and scaled to the student's scores (stpm.gaussian);
- the threshold rules: mean + 3 standard deviations of the validation scores (the default), their
  (1 - share) quantile for a share of false alarms a line accepts, or a user's own number.

Training, STPM.set_map and STPM.set_threshold, and the INT8 refit (stpm.export) all calibrate
through these functions, scoring the validation images by stpm.scoring's rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import scoring
from .errors import StpmError
from .settings import check_false_alarms

THRESHOLD_SIGMAS = 3.0  # default threshold = mean + 3 std of defect-free validation scores


def split_validation(paths: Sequence[Path], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded, fixed split of train/good into (train, validation)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), not {fraction}")
    count = int(round(fraction * len(paths))) if len(paths) > 1 else 0
    count = max(count, 1) if fraction > 0 and len(paths) > 1 else count
    order = np.random.default_rng(seed).permutation(len(paths))
    validation = sorted(paths[index] for index in order[:count])
    train = sorted(paths[index] for index in order[count:])
    return train, validation


@dataclass(frozen=True)
class Calibration:
    """The validation scores and the threshold a rule sets on them (None with fewer than 2)."""

    scores: list[float] = field(default_factory=list)
    max_false_alarms: float | None = None  # the rule: None for mean + 3 std
    mean: float | None = None
    std: float | None = None
    threshold: float | None = None

    @property
    def rule(self) -> str:
        """The threshold rule in words, as model files record it."""
        if self.max_false_alarms is None:
            return f"mean + {THRESHOLD_SIGMAS:g} * std"
        return f"quantile {1.0 - self.max_false_alarms:g}"

    def validation(self) -> dict:
        """What a model file keeps of it (ModelDescription.validation)."""
        return {
            "scores": self.scores,
            "mean": self.mean,
            "std": self.std,
            "threshold_rule": self.rule,
        }


def calibrate(scores: Sequence[float], max_false_alarms: float | None = None) -> Calibration:
    """The threshold of defect-free validation scores by the rule max_false_alarms: their
    (1 - max_false_alarms) quantile, or mean + 3 std for None."""
    check_false_alarms(max_false_alarms)
    scores = [float(score) for score in scores]
    if len(scores) < 2:
        return Calibration(scores, max_false_alarms)
    values = np.asarray(scores, dtype=np.float64)
    mean, std = float(values.mean()), float(values.std(ddof=1))
    if max_false_alarms is None:
        threshold = mean + THRESHOLD_SIGMAS * std
    else:
        threshold = threshold_at(scores, max_false_alarms)
    return Calibration(scores, max_false_alarms, mean, std, threshold)


def threshold_at(scores: Sequence[float], max_false_alarms: float | None) -> float:
    """The raw score above which at most this share of the defect-free validation scores lie:
    their (1 - max_false_alarms) quantile, linearly interpolated."""
    if max_false_alarms is None:
        raise StpmError("name the share of false alarms, e.g. threshold_at(0.01)")
    check_false_alarms(max_false_alarms)
    if len(scores) < 2:
        raise StpmError("this model has fewer than 2 validation scores to take a quantile of")
    return float(np.quantile(scores, 1.0 - max_false_alarms))


def fit_image_model(train_pooled: np.ndarray, validation_pooled: np.ndarray, validation_maps):
    """The image model (stpm.gaussian.PooledGaussian) fitted on the teacher's pooled features of
    the training images (N, D), standardised on the validation images' (M, D) and scaled to the
    spread of the student's own scores of them, the maxima of their maps (M, [1,] H, W); and the
    validation images' full scores (M,), the term included (scoring.image_scores)."""
    import torch
    from sklearn.covariance import LedoitWolf

    from .gaussian import PooledGaussian

    train_pooled = np.asarray(train_pooled, np.float64)
    validation = torch.from_numpy(np.asarray(validation_pooled, np.float32))
    student_scores = scoring.map_maxima(validation_maps)
    estimate = LedoitWolf().fit(train_pooled)
    model = PooledGaussian(train_pooled.shape[1])
    model.mean.copy_(torch.from_numpy(estimate.location_))
    model.precision.copy_(torch.from_numpy(estimate.precision_))
    with torch.no_grad():  # in the precision prediction computes them in
        distances = model.distances(validation)
        spread = float(distances.std()) if len(distances) > 1 else 1.0
        own = float(np.std(student_scores, ddof=1)) if len(student_scores) > 1 else 1.0
        model.offset.fill_(float(distances.mean()) if len(distances) else 0.0)
        model.scale.fill_(own / max(spread, 1e-12))
        terms = model.term(validation).double().numpy()
    return model, scoring.image_scores(validation_maps, terms)
