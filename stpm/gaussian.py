"""The image-level add-on: a Gaussian model of the teacher's features averaged over the image.

A per-position distance between student and teacher normalises away a change that covers a
large area (uneven brightness over half a tile), and a crack a few pixels wide moves few
positions; averaged over the image, the teacher's features still move. A Gaussian of those
averages over the defect-free training images (Ledoit-Wolf shrinkage: a few hundred dimensions
from a few hundred images) scores an image by its Mahalanobis distance, as Rippel et al.
(ICPR 2020) score whole images.

The distance joins the student's score in the student's units: standardised on the defect-free
validation images, then multiplied by the standard deviation of the student's own validation
scores. The image score is the map's maximum plus that term, so neither part dominates by its
units, and score, threshold and map keep one scale (a pixel above the threshold still means the
same thing).

The torch module lives here; its fit, with the rest of the calibration, in stpm.calibration.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def pooled(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """Each level averaged over positions, concatenated: (B, channels of all levels)."""
    return torch.cat([level.mean(dim=(2, 3)) for level in features], dim=1)


class PooledGaussian(nn.Module):
    """Teacher features (one (B, C, h, w) per level) -> the image term (B,), in score units."""

    def __init__(self, dimensions: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dimensions))
        self.register_buffer("precision", torch.eye(dimensions))
        self.register_buffer("offset", torch.zeros(()))  # validation distances' mean
        self.register_buffer("scale", torch.ones(()))  # student's std / distances' std

    def distances(self, pooled_features: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance of pooled features (B, D) to the training images': (B,)."""
        centred = pooled_features - self.mean
        return ((centred @ self.precision) * centred).sum(dim=1).clamp_min(0).sqrt()

    def term(self, pooled_features: torch.Tensor) -> torch.Tensor:
        """The standardised distance in the student's score units: (B,)."""
        return self.scale * (self.distances(pooled_features) - self.offset)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.term(pooled(features))
