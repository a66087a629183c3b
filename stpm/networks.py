"""The teacher and student feature pyramids: which timm backbone, which levels, and how it is cut.

Contract: (B, 3, H, W) normalised images in, one feature map per level out, with the teacher's
channels and strides. The teacher is frozen (ImageNet weights, eval mode); the student is built
by `build_student(kind, teacher)`, always with random weights:
  - "same": the teacher's architecture (the paper);
  - "slim": an EfficientNet-Lite teacher's architecture at half its channels, built by timm's
    own EfficientNet-Lite generator with half the teacher's channel multiplier (Lite0: 0.5),
    since the public `timm.create_model("tf_efficientnet_lite0")` fixes the multipliers;
  - any other timm CNN name (e.g. "resnet18"): that network, cut at the teacher's strides.
A student whose level widths differ from the teacher's gets a 1x1 projection per level, trained
with it and saved in the model file with its other weights.

`new_network` assembles a pair to train, `rebuild` a trained model from its file: the one place
where a teacher, a student and their weights come together.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from torch import nn

from . import weights
from .errors import StpmError
from .gaussian import PooledGaussian
from .model import AnomalyMapModel, FeatureScale, StudentTeacher
from .modelfile import ModelDescription
from .settings import STUDENT_KINDS

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # a teacher's input normalisation when timm names none
IMAGENET_STD = (0.229, 0.224, 0.225)
# timm's (channel, depth) multipliers of the EfficientNet-Lite family: "slim" halves the first
LITE_MULTIPLIERS = {
    "tf_efficientnet_lite0": (1.0, 1.0),
    "tf_efficientnet_lite1": (1.0, 1.1),
    "tf_efficientnet_lite2": (1.1, 1.2),
    "tf_efficientnet_lite3": (1.2, 1.4),
    "tf_efficientnet_lite4": (1.4, 1.8),
}


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


def build_teacher(
    backbone: str, out_indices: tuple[int, ...], weights_file: Path | None
) -> tuple[nn.Module, str]:
    """The frozen ImageNet teacher, cut after its deepest level, and the SHA-256 of its weights.

    The fingerprint covers the whole pretrained feature extractor, before the cut, so that it
    names the weights file whatever levels a model uses.
    """
    teacher = weights.create_backbone(backbone, out_indices, weights_file)
    fingerprint = weights.weights_fingerprint(teacher)
    return drop_unused_blocks(teacher).eval().requires_grad_(False), fingerprint


def check_names(backbone: str, student: str) -> None:
    """Refuse a backbone or a student kind timm does not know."""
    if not weights.backbone_exists(backbone):
        raise StpmError(f"unknown backbone {backbone!r}; any name from timm.list_models()")
    if student not in STUDENT_KINDS and not weights.backbone_exists(student):
        raise StpmError(
            f"unknown student {student!r}; use {', '.join(STUDENT_KINDS)} or a timm CNN name"
        )


@dataclass
class Built:
    """A new pair and what a model file records of its teacher."""

    network: StudentTeacher
    out_indices: tuple[int, ...]
    mean: tuple[float, ...]  # the teacher's input normalisation, per RGB channel, in [0, 1]
    std: tuple[float, ...]
    teacher: dict  # source (where its weights came from) and sha256 (of its tensors)


def new_network(
    backbone: str,
    strides: Sequence[int],
    student: str,
    distance: str,
    teacher_weights: str | Path | None = None,
) -> Built:
    """A teacher with its ImageNet weights and a student of the chosen kind with random weights
    (drawn from torch's global generator)."""
    out_indices = pyramid_indices(backbone, tuple(strides))
    weights_file = weights.resolve_weights_file(backbone, teacher_weights)
    teacher, fingerprint = build_teacher(backbone, out_indices, weights_file)
    source = weights.describe_source(backbone, weights_file, teacher_weights)
    return Built(
        StudentTeacher(teacher, build_student(student, teacher, distance)),
        out_indices,
        tuple(teacher.pretrained_cfg.get("mean") or IMAGENET_MEAN),
        tuple(teacher.pretrained_cfg.get("std") or IMAGENET_STD),
        {"source": source, "sha256": fingerprint},
    )


def start_student(
    network: StudentTeacher,
    state: dict[str, torch.Tensor] | None,
    share: bool,
    pruned: bool = True,
) -> list[str]:
    """Give the student the values of state (a trained student; None: keep its random weights),
    first its shapes where it may be pruned (stpm.compress), and with share the teacher's own
    stem; returns the shared modules' names (share_stem)."""
    if state is not None:
        if pruned:
            resize_like(network.student, state)
        network.student.load_state_dict(state)
    return share_stem(network.student, network.teacher) if share else []


def rebuild(
    description: ModelDescription,
    student_state: dict[str, torch.Tensor],
    image_state: dict[str, torch.Tensor] | None,
    path: str | Path,
    teacher_weights: str | Path | None = None,
    force: bool = False,
) -> AnomalyMapModel:
    """A trained model from its file's parts; refuses weights of another teacher than this
    machine's (force: load anyway) and a student that does not fit."""
    source = description.teacher["source"]
    if teacher_weights is None and source.startswith("file:") and Path(source[5:]).is_file():
        teacher_weights = source[5:]
    weights_file = weights.resolve_weights_file(description.backbone, teacher_weights)
    teacher, fingerprint = build_teacher(
        description.backbone, tuple(description.out_indices), weights_file
    )
    try:
        student = build_student(description.student_kind, teacher, description.distance)
    except StpmError as error:
        raise StpmError(
            f"{path}: student weights do not fit {description.backbone} ({error})"
        ) from None
    known = student.state_dict().keys()  # files of stpm < 0.1 also hold the unused blocks
    network = StudentTeacher(teacher, student)
    try:
        shared = start_student(
            network,
            {k: v for k, v in student_state.items() if k in known},
            share=bool(description.shared_layers),
            pruned=bool(description.pruning),
        )
    except RuntimeError:
        raise StpmError(f"{path}: student weights do not fit {description.backbone}") from None
    if shared != description.shared_layers:
        raise StpmError(f"{path}: its shared layers do not fit {description.backbone}")
    if fingerprint != description.teacher["sha256"] and not force:
        here = weights.describe_source(description.backbone, weights_file, teacher_weights)
        raise StpmError(
            f"{path} was trained with other teacher weights ({source}, sha256 "
            f"{description.teacher['sha256'][:12]}) than this machine has ({here}, "
            f"{fingerprint[:12]}); its scores would be meaningless. Pass the right "
            "--teacher-weights, or --force"
        )
    image_model = None
    if image_state is not None:
        image_model = PooledGaussian(len(image_state["mean"]))
        image_model.load_state_dict(image_state)
    return AnomalyMapModel(network, description.map_settings(), image_model)


def build_student(kind: str, teacher: nn.Module, distance: str = "cosine") -> nn.Module:
    """A student with random weights whose levels match the teacher's channels and strides;
    for the standardized distance it carries the teacher's feature scale (FeatureScale)."""
    student = _student(kind, teacher)
    if distance == "standardized":
        return StandardizedStudent(student, teacher.feature_info.channels())
    return student


def _student(kind: str, teacher: nn.Module) -> nn.Module:
    architecture = teacher.pretrained_cfg["architecture"]
    out_indices = tuple(teacher.feature_info.out_indices)
    if kind == "same":
        return drop_unused_blocks(weights.create_backbone(architecture, out_indices, False))
    if kind == "slim":
        features = _slim_lite(architecture, out_indices)
    elif weights.backbone_exists(kind):
        features = weights.create_backbone(
            kind, pyramid_indices(kind, teacher.feature_info.reduction()), False
        )
    else:
        raise StpmError(
            f"unknown student {kind!r}; use {', '.join(STUDENT_KINDS)} or a timm CNN name"
        )
    return ProjectedStudent(drop_unused_blocks(features), teacher.feature_info.channels())


def _slim_lite(architecture: str, out_indices: tuple[int, ...]) -> nn.Module:
    if architecture not in LITE_MULTIPLIERS:
        raise StpmError(
            f"the slim student is defined for EfficientNet-Lite teachers, not {architecture}; "
            "use student='same' (--student same) or a timm CNN name"
        )
    from timm.models.efficientnet import _gen_efficientnet_lite

    channels, depth = LITE_MULTIPLIERS[architecture]
    return _gen_efficientnet_lite(
        architecture,
        channel_multiplier=channels / 2,
        depth_multiplier=depth,
        features_only=True,
        out_indices=out_indices,
        bn_eps=1e-3,  # the tf_ models' own settings: TF's BatchNorm epsilon
        pad_type="same",  # and TF's 'same' padding
    )


class ProjectedStudent(nn.Module):
    """A feature pyramid whose levels are mapped to the teacher's widths by 1x1 convolutions."""

    def __init__(self, features: nn.Module, widths: list[int]) -> None:
        super().__init__()
        self.features = features
        self.feature_info = features.feature_info
        self.projections = nn.ModuleList(
            nn.Identity() if have == want else nn.Conv2d(have, want, kernel_size=1)
            for have, want in zip(features.feature_info.channels(), widths, strict=True)
        )

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        levels = self.features(images)
        return [project(level) for project, level in zip(self.projections, levels, strict=True)]


class StandardizedStudent(nn.Module):
    """A student that learns the teacher's features standardized per channel: it carries the
    teacher's statistics (target_scale), so its state dict, the model file, carries them too."""

    def __init__(self, features: nn.Module, widths: list[int]) -> None:
        super().__init__()
        self.features = features
        self.feature_info = features.feature_info
        self.target_scale = FeatureScale(widths)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        return self.features(images)


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


def fixed_same_padding(network: nn.Module, size: tuple[int, int]) -> nn.Module:
    """A copy of network whose TensorFlow-style 'same' convolutions pad by fixed amounts.

    timm's Conv2dSame works its padding out from the input's shape on every call. Traced into
    ONNX that is about 150 small shape operations (Shape, Gather, Ceil, Cast, Div...) and a Pad
    that ONNX Runtime cannot fold into the convolution. The input size of a model is fixed, so
    the padding is too.
    """
    from timm.layers import Conv2dSame
    from timm.layers.padding import get_same_padding

    network = copy.deepcopy(network).cpu().eval()
    shapes: dict[nn.Module, tuple[int, int]] = {}

    def remember(module: nn.Module, inputs: tuple) -> None:
        shapes[module] = tuple(inputs[0].shape[-2:])

    same = [module for module in network.modules() if isinstance(module, Conv2dSame)]
    hooks = [module.register_forward_pre_hook(remember) for module in same]
    with torch.no_grad():
        network(torch.zeros((1, 3, *size)))
    for hook in hooks:
        hook.remove()
    for parent in list(network.modules()):
        for name, child in list(parent.named_children()):
            if child not in shapes:
                continue
            height, width = (
                get_same_padding(side, kernel, stride, dilation)
                for side, kernel, stride, dilation in zip(
                    shapes[child], child.kernel_size, child.stride, child.dilation, strict=True
                )
            )
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                child.kernel_size,
                child.stride,
                0,
                child.dilation,
                child.groups,
                child.bias is not None,
            )
            plain.load_state_dict(child.state_dict())
            padding = (width // 2, width - width // 2, height // 2, height - height // 2)
            setattr(parent, name, nn.Sequential(nn.ZeroPad2d(padding), plain))
    return network


def resize_like(module: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Reshape module's convolutions and BatchNorms to the tensors of state, in place: how a
    pruned student (stpm.compress) is rebuilt from its unpruned architecture and its file.

    Only shapes change (the values come from load_state_dict after); a depthwise convolution
    stays depthwise.
    """
    for name, child in module.named_modules():
        prefix = f"{name}." if name else ""
        was_depthwise = isinstance(child, nn.Conv2d) and 1 < child.groups == child.in_channels
        for store in (child._parameters, child._buffers):
            for key, value in store.items():
                wanted = state.get(prefix + key)
                if value is None or wanted is None or wanted.shape == value.shape:
                    continue
                empty = torch.empty(wanted.shape, dtype=value.dtype, device=value.device)
                is_parameter = isinstance(value, nn.Parameter)
                store[key] = nn.Parameter(empty, value.requires_grad) if is_parameter else empty
        if isinstance(child, nn.Conv2d):
            child.out_channels = child.weight.shape[0]
            child.groups = child.out_channels if was_depthwise else child.groups
            child.in_channels = child.weight.shape[1] * child.groups
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.num_features = child.weight.shape[0]
    return module


STEM = ("conv_stem", "bn1")  # timm's EfficientNet/MobileNet stem: a convolution and its BatchNorm


def share_stem(student: nn.Module, teacher: nn.Module) -> list[str]:
    """Make the student's stem the teacher's own frozen modules, in place, where the two have
    the same architecture (EfficientNet-Lite students: timm fixes the stem's width); returns the
    student's names of the shared modules ([] where nothing can be shared).

    The exported graph then holds one convolution on the same input with the same weights twice,
    which ONNX Runtime's and OpenVINO's common-subexpression passes run once.
    """
    features = getattr(student, "features", student)
    shared = []
    for name in STEM:
        mine, theirs = getattr(features, name, None), getattr(teacher, name, None)
        if mine is None or theirs is None:
            return []
        shapes = [tuple(tensor.shape) for tensor in mine.state_dict().values()]
        if type(mine) is not type(theirs) or shapes != [
            tuple(tensor.shape) for tensor in theirs.state_dict().values()
        ]:
            return []
    for name in STEM:
        setattr(features, name, getattr(teacher, name))
        shared.append(f"features.{name}" if features is not student else name)
    return shared
