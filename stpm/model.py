"""Teacher and student feature pyramids, the distillation loss and the anomaly map: pure torch.

Both networks are the same timm backbone cut at the pyramid levels we compare; the teacher is
frozen (ImageNet weights, eval mode), the student starts from random weights. Where the
student's features disagree with the teacher's, the image is unlike the training images.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .errors import StpmError


def pyramid_indices(backbone: str, strides: Sequence[int]) -> tuple[int, ...]:
    """timm out_indices of the deepest feature map at each stride (4, 8, 16 -> layer1..3)."""
    reductions = timm.create_model(
        backbone, features_only=True, pretrained=False
    ).feature_info.reduction()
    indices = []
    for stride in strides:
        matches = [index for index, reduction in enumerate(reductions) if reduction == stride]
        if not matches:
            raise StpmError(
                f"{backbone} has no feature map at stride {stride}; it has {reductions}"
            )
        indices.append(matches[-1])
    return tuple(indices)


class StudentTeacher(nn.Module):
    """(B, 3, H, W) normalised images -> (teacher features, student features), one per level."""

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        super().__init__()
        self.teacher = drop_unused_blocks(teacher).eval().requires_grad_(False)
        self.student = drop_unused_blocks(student)

    def train(self, mode: bool = True) -> StudentTeacher:
        super().train(mode)
        self.teacher.eval()  # frozen BatchNorm statistics: the teacher never changes
        return self

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            teacher_features = self.teacher(images)
        return teacher_features, self.student(images)


def drop_unused_blocks(features: nn.Module) -> nn.Module:
    """Cut the blocks after the deepest level we compare, in place.

    timm's EfficientNet and MobileNet feature extractors run every block even when the deepest
    level asked for is at stride 16: for EfficientNet-Lite0 at strides 4/8/16 that is a third of
    the FLOPs spent on stride-32 blocks whose output is thrown away. (timm's generic wrapper,
    used for ResNets, already stops at the last level.)
    """
    blocks = getattr(features, "blocks", None)
    names = features.feature_info.module_name() if hasattr(features, "feature_info") else []
    if not isinstance(blocks, nn.Sequential) or not names:
        return features
    if not all(name.startswith("blocks.") for name in names):
        return features
    deepest = max(int(name.split(".")[1]) for name in names)
    features.blocks = blocks[: deepest + 1]
    return features


def layer_distances(
    teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Per level 0.5 * ||t/|t| - s/|s|||^2 over channels (= 1 - cosine): (B, 1, h, w) in [0, 2]."""
    distances = []
    for teacher, student in zip(teacher_features, student_features, strict=True):
        difference = F.normalize(teacher, dim=1) - F.normalize(student, dim=1)
        distances.append(0.5 * difference.pow(2).sum(dim=1, keepdim=True))
    return distances


def feature_loss(
    teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The paper's loss: per level the mean distance over batch and positions, summed over levels."""
    return sum(distance.mean() for distance in layer_distances(teacher_features, student_features))


def per_image_loss(
    teacher_features: Sequence[torch.Tensor], student_features: Sequence[torch.Tensor]
) -> torch.Tensor:
    """The same loss for each image of the batch: (B,)."""
    distances = layer_distances(teacher_features, student_features)
    return sum(distance.mean(dim=(1, 2, 3)) for distance in distances)


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, 1, H, W) maps; kernel radius 4 sigma, edges reflected.

    Done as two matrix products (rows, then columns) with the kernel and the reflection folded
    into one (H, H) and one (W, W) matrix: a single-channel 33-tap convolution is one of the
    slowest things a CPU convolution library does (17 ms per 256 x 256 map on one core), while
    the same blur as matrix products takes about a millisecond.
    """
    height, width = int(maps.shape[-2]), int(maps.shape[-1])  # constants in an ONNX export
    rows = _blur_matrix(height, float(sigma)).to(maps.dtype).to(maps.device)
    columns = _blur_matrix(width, float(sigma)).to(maps.dtype).to(maps.device)
    return rows @ maps @ columns.T


@functools.lru_cache(maxsize=8)
def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size): output i = sum over j of matrix[i, j] * input j, 'reflect' padding included.

    Built with numpy, so that tracing (ONNX export) sees one constant, not the construction.
    """
    radius = max(1, int(4.0 * sigma + 0.5))
    if radius >= size:
        raise StpmError(f"smoothing sigma {sigma:g} is too large for a map {size} pixels wide")
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    sources = np.abs(np.arange(size)[:, None] + offsets[None, :])  # reflect at the start
    sources = np.where(sources > size - 1, 2 * (size - 1) - sources, sources)  # and the end
    matrix = np.zeros((size, size))
    np.add.at(matrix, (np.arange(size)[:, None].repeat(len(offsets), 1), sources), kernel)
    return torch.from_numpy(matrix)


def anomaly_map(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    size: tuple[int, int],
    combine: str = "product",
    sigma: float = 0.0,
) -> torch.Tensor:
    """Per-pixel anomaly (B, 1, H, W): level distances upsampled bilinearly to size, then
    multiplied (the paper) or summed, then optionally smoothed (sigma in pixels)."""
    upsampled = [
        F.interpolate(distance, size=size, mode="bilinear", align_corners=False)
        for distance in layer_distances(teacher_features, student_features)
    ]
    if combine == "product":
        combined = upsampled[0]
        for level in upsampled[1:]:
            combined = combined * level
    elif combine == "sum":
        combined = sum(upsampled)
    else:
        raise StpmError(f"combine must be 'product' or 'sum', not {combine!r}")
    return gaussian_blur(combined, sigma) if sigma > 0 else combined


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Image score = maximum of its anomaly map: (B, 1, H, W) -> (B,)."""
    return maps.flatten(1).amax(dim=1)
