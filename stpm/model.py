"""The student-teacher pair, the distillation loss and the anomaly map: pure torch, no I/O.

One path turns normalised images into maps, `AnomalyMapModel`: networks -> per-level distances
-> upsampled level maps -> combined -> smoothed, and the image-level term from the teacher's
pooled features. The torch runtime, training's validation and the ONNX export all run it. Where
the student's features disagree with the teacher's, the image is unlike the training images.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import gaussian
from .errors import StpmError
from .settings import COMBINES, MapSettings


class FeatureScale(nn.Module):
    """Per level and channel (x - mean) / std, with the teacher's statistics on training images.

    The standardized distance compares the student with the teacher's features in these units.
    It lives in the student (`student.target_scale`), so the model file that carries the
    student's weights carries it too.
    """

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        for index, width in enumerate(widths):
            self.register_buffer(f"mean{index}", torch.zeros(1, width, 1, 1))
            self.register_buffer(f"std{index}", torch.ones(1, width, 1, 1))

    def set(self, means: Sequence[torch.Tensor], stds: Sequence[torch.Tensor]) -> None:
        """Per level, the channels' means and standard deviations, each (C,).

        A channel that barely varies on the training images (a ReLU that never fires) is
        divided by at least a hundredth of its level's median spread, not by almost zero:
        otherwise its first activation on a new image is a huge distance, and its gradients
        blow the training up.
        """
        for index, (mean, std) in enumerate(zip(means, stds, strict=True)):
            floor = max(float(std.median()) * 1e-2, 1e-6)
            getattr(self, f"mean{index}").copy_(mean.view(1, -1, 1, 1))
            getattr(self, f"std{index}").copy_(std.clamp_min(floor).view(1, -1, 1, 1))

    def forward(self, levels: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [
            (level - getattr(self, f"mean{index}")) / getattr(self, f"std{index}")
            for index, level in enumerate(levels)
        ]


class StudentTeacher(nn.Module):
    """(B, 3, H, W) normalised images -> (teacher features, student features), one per level.

    A student with a target_scale (FeatureScale) is compared with the teacher's features in
    those standardized units.
    """

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.student = student

    def train(self, mode: bool = True) -> StudentTeacher:
        super().train(mode)
        self.teacher.eval()  # frozen BatchNorm statistics: the teacher never changes
        return self

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        with torch.no_grad():
            teacher_features = self.teacher_targets(images)
        return teacher_features, self.student(images)

    def teacher_targets(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The teacher's features, in the units the student learns them in."""
        features = self.teacher(images)
        scale = getattr(self.student, "target_scale", None)
        return features if scale is None else scale(features)


class AnomalyMapModel(nn.Module):
    """Normalised images (B, 3, H, W) -> anomaly maps (B, 1, H, W), image scores (B,) and the
    image-level term in them (B,).

    The score output is stpm.scoring.image_scores written in torch, so that an ONNX export
    carries it: the map's maximum + the term. Every stpm caller scores through stpm.scoring
    from the maps and terms (letterboxed maps are unpadded first); tests hold the two equal.

    image_model: None (term 0), or a module from the teacher's pooled features to the term
    (stpm.gaussian.PooledGaussian). features_output: forward returns those pooled features too,
    the image model's input (an ONNX export's fourth output, what the INT8 refit fits on).
    """

    def __init__(
        self,
        network: StudentTeacher,
        settings: MapSettings,
        image_model: nn.Module | None = None,
        features_output: bool = False,
    ) -> None:
        super().__init__()
        self.network = network
        self.settings = settings
        self.image_model = image_model
        self.features_output = features_output  # forward also returns the pooled features

    def level_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Per-level distances upsampled to the map size: one (B, 1, H, W) per level."""
        return level_maps(*self.network(images), self.settings.size, self.settings.distance)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps, terms, features = self.run(images, pooled=self.features_output)
        outputs = (maps, image_scores(maps) + terms, terms)
        return (*outputs, features) if self.features_output else outputs

    def run(
        self, images: torch.Tensor, pooled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(maps (B, 1, H, W), terms (B,), and with pooled=True the image model's input, the
        teacher's pooled features (B, D); else None)."""
        teacher_features, student_features = self.network(images)
        levels = level_maps(
            teacher_features, student_features, self.settings.size, self.settings.distance
        )
        maps = finish_map(levels, self.settings)
        wanted = pooled or self.image_model is not None
        features = gaussian.pooled(teacher_features) if wanted else None
        if self.image_model is None:
            terms = maps.new_zeros(maps.shape[0])
        else:
            terms = self.image_model.term(features)
        return maps, terms, features if pooled else None


def layer_distances(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    distance: str = "cosine",
) -> list[torch.Tensor]:
    """Per level and position, (B, 1, h, w):
    "cosine" (the paper): 0.5 * ||t/|t| - s/|s|||^2 over channels (= 1 - cosine), in [0, 2];
    "standardized": the mean over channels of (t - s)^2, t already standardized per channel
    (FeatureScale): keeps the features' magnitude, which a change of brightness over a large
    area moves while their direction stays.
    """
    distances = []
    for teacher, student in zip(teacher_features, student_features, strict=True):
        if distance == "standardized":
            distances.append((teacher - student).pow(2).mean(dim=1, keepdim=True))
            continue
        difference = F.normalize(teacher, dim=1) - F.normalize(student, dim=1)
        distances.append(0.5 * difference.pow(2).sum(dim=1, keepdim=True))
    return distances


def feature_loss(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    hard_quantile: float | None = None,
    distance: str = "cosine",
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The paper's loss: per level the mean distance over batch and positions, summed over levels.

    hard_quantile (EfficientAD's hard feature loss): per level, average only the distances at
    or above that quantile of the batch's, so the student stops polishing what it already
    matches and spends its capacity where it is still wrong.

    gather: when one batch is split between processes (stpm.distributed.gather_rows), joins a
    tensor's rows from all of them, so that the quantile and the count are the whole batch's.
    The loss returned is then this process's share of the whole batch's loss: the shares of
    all processes add up to it.
    """
    total = torch.zeros(())
    for level in layer_distances(teacher_features, student_features, distance):
        everything = level.detach().flatten().float()
        if gather is not None:
            everything = gather(everything)
        if hard_quantile is not None:
            cut = torch.quantile(everything, hard_quantile)
            level, everything = level[level >= cut], everything[everything >= cut]
        total = total + (level.mean() if gather is None else level.sum() / len(everything))
    return total


def per_image_loss(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    distance: str = "cosine",
) -> torch.Tensor:
    """The plain loss (every position) for each image of the batch: (B,)."""
    distances = layer_distances(teacher_features, student_features, distance)
    return sum(distance.mean(dim=(1, 2, 3)) for distance in distances)


def level_maps(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    size: tuple[int, int],
    distance: str = "cosine",
) -> list[torch.Tensor]:
    """Each level's distance map, upsampled bilinearly to size: one (B, 1, H, W) per level.

    A list, not one stacked tensor: stacking and slicing again cost OpenVINO 1.1 ms per 256 px
    image (its Concat and Split run reference code), 4% of the whole model.
    """
    return [
        upsample_bilinear(level, size)
        for level in layer_distances(teacher_features, student_features, distance)
    ]


def upsample_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """F.interpolate(maps, size, mode="bilinear", align_corners=False) of (B, 1, h, w) maps,
    done as two small matrix products (rows, then columns), like the blur.

    Single-channel Interpolate nodes took OpenVINO 1.33 ms per 256 px image for the three
    levels (scripts/results/openvino_profile.md), a sixth of an INT8 model's time; the same
    upsampling as matrix products is a few hundred thousand multiply-adds.
    """
    height, width = int(maps.shape[-2]), int(maps.shape[-1])  # constants in an ONNX export
    rows = _resize_matrix(height, int(size[0])).to(maps.dtype).to(maps.device)
    columns = _resize_matrix(width, int(size[1])).to(maps.dtype).to(maps.device)
    return rows @ maps @ columns.T


@functools.lru_cache(maxsize=16)
def _resize_matrix(size: int, target: int) -> torch.Tensor:
    """(target, size): linear interpolation with half-pixel centres, edges clamped (torch's
    align_corners=False)."""
    source = np.maximum((np.arange(target) + 0.5) * (size / target) - 0.5, 0.0)
    low = np.floor(source).astype(int)
    high = np.minimum(low + 1, size - 1)
    weight = source - low
    matrix = np.zeros((target, size))
    np.add.at(matrix, (np.arange(target), low), 1.0 - weight)
    np.add.at(matrix, (np.arange(target), high), weight)
    return torch.from_numpy(matrix)


def combine_levels(levels: Sequence[torch.Tensor], combine: str) -> torch.Tensor:
    """Level maps, each (B, 1, H, W) -> (B, 1, H, W): multiplied (the paper) or summed."""
    if combine not in COMBINES:
        raise StpmError(f"combine must be 'product' or 'sum', not {combine!r}")
    combined = levels[0]
    for level in levels[1:]:
        combined = combined * level if combine == "product" else combined + level
    return combined


def finish_map(levels: Sequence[torch.Tensor], settings: MapSettings) -> torch.Tensor:
    """Level maps, each (B, 1, H, W) -> the anomaly map (B, 1, H, W): combined, then smoothed."""
    combined = combine_levels(levels, settings.combine)
    return gaussian_blur(combined, settings.sigma) if settings.sigma > 0 else combined


def anomaly_map(
    teacher_features: Sequence[torch.Tensor],
    student_features: Sequence[torch.Tensor],
    settings: MapSettings,
) -> torch.Tensor:
    """Per-pixel anomaly (B, 1, H, W) from the two pyramids."""
    levels = level_maps(teacher_features, student_features, settings.size, settings.distance)
    return finish_map(levels, settings)


def image_scores(maps: torch.Tensor) -> torch.Tensor:
    """Each anomaly map's maximum: (B, 1, H, W) -> (B,)."""
    return maps.flatten(1).amax(dim=1)


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
