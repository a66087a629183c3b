"""Smaller students from trained ones: structured pruning and shared early layers, each followed
by a short distillation fine-tune (the training loop of stpm.train, started from the student's
trained weights instead of random ones).

Pruning (Torch-Pruning, `pip install "stpm[compress]"`) removes whole channels: inside each
inverted-residual block, the expansion's output channels, with the depthwise convolution and the
BatchNorms that follow them. The stem, every block's output projection and the level
projections are left alone, so each level keeps the width the map needs and residual additions
keep their shapes. Channels go by the L2 norm of their weights, the same share in every block,
rounded to multiples of 8 so that ONNX Runtime's blocked convolution kernels still apply.

A pruned student is stored as what it is: its state dict, whose tensors carry the pruned shapes;
loading reshapes the unpruned architecture's modules to them (stpm.networks.resize_like), so the
model file still loads with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .errors import StpmError

# widths stay multiples of 8, the channel block of ONNX Runtime's NCHWc kernels on AVX2 (16 on
# AVX-512, which the unpruned Lite widths, 24, 40, 56..., are not multiples of either)
ROUND_TO = 8


def count_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def prune_student(student: nn.Module, ratio: float, input_size: tuple[int, int]) -> nn.Module:
    """Remove about `ratio` of the expansion channels of every block of student, in place.

    The level outputs keep their shapes (checked), so the same map arithmetic applies.
    """
    try:
        import torch_pruning
    except ImportError:
        raise StpmError(
            'pruning needs Torch-Pruning: pip install "stpm[compress]" (or torch-pruning)'
        ) from None
    if not 0.0 < ratio < 1.0:
        raise StpmError(f"the pruning ratio is a share of channels in (0, 1), not {ratio}")
    example = torch.zeros((1, 3, *input_size))
    device = next(student.parameters()).device
    student = student.cpu().eval()
    with torch.no_grad():
        before = [tuple(level.shape) for level in student(example)]
    pruner = torch_pruning.pruner.MetaPruner(
        student,
        example,
        importance=torch_pruning.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=_kept_outputs(student),
        round_to=ROUND_TO,
        output_transform=lambda levels: sum(level.sum() for level in levels),
    )
    pruner.step()
    with torch.no_grad():
        after = [tuple(level.shape) for level in student(example)]
    if after != before:  # a bug, not a user mistake
        raise RuntimeError(f"pruning changed the level shapes: {before} -> {after}")
    return student.to(device)


def _kept_outputs(student: nn.Module) -> list[nn.Module]:
    """The convolutions whose output channels must stay: the stem, each block's output
    projection (timm's DepthwiseSeparableConv.conv_pw, InvertedResidual.conv_pwl) and the level
    projections."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    kept = []
    for name, module in student.named_modules():
        if isinstance(module, DepthwiseSeparableConv):
            kept.append(module.conv_pw)
        elif isinstance(module, InvertedResidual):
            kept.append(module.conv_pwl)
        elif isinstance(module, nn.Conv2d) and name.split(".")[-1] == "conv_stem":
            kept.append(module)
    projections = getattr(student, "projections", [])
    return kept + [module for module in projections if isinstance(module, nn.Conv2d)]


def compress(
    model_file: str | Path,
    folder: str | Path,
    prune: float | None = None,
    share_stem: bool = False,
    epochs: int = 5,
    learning_rate: float | None = None,
    run_dir: str | Path | None = None,
    device: str = "auto",
    seed: int | None = None,
):
    """A trained model's student made smaller (pruned by `prune`, and/or its stem shared with
    the teacher), then fine-tuned by distillation for `epochs` on folder/train/good with the
    model's own settings (learning_rate and seed: the model's unless given). The threshold and the
    image-level term are fitted anew, as at the end of training. Returns the new STPM; with
    run_dir, its run folder (model.pt, config.json, checkpoint) is written there as stpm-train
    writes one, and an interrupted fine-tune resumes with `stpm-train --resume run_dir`.
    """
    from .detector import STPM

    if prune is None and not share_stem:
        raise StpmError("nothing to compress: give a pruning ratio (--prune) or --share-stem")
    source = STPM.load(model_file, runtime="torch", device=device)
    student = source.runtime_.student
    before = count_parameters(student)
    pruning = source.pruning_
    if prune is not None:
        prune_student(student, prune, source.input_size_)
        pruning = {
            "ratio": prune,
            "parameters_before": before,
            "parameters_after": count_parameters(student),
            "epochs": epochs,
            "source": str(Path(model_file).resolve()),
        }
    params = source.get_params()
    params.update(epochs=epochs, share_stem=share_stem or source.share_stem, device=device)
    if learning_rate is not None:
        params["learning_rate"] = learning_rate
    if seed is not None:
        params["seed"] = seed
    init = {"student": student.state_dict(), "pruning": pruning}
    return STPM(**params).fit(folder, run_dir=run_dir, init=init)
