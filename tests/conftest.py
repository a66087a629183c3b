"""Shared fixtures: a tiny synthetic MVTec-style category and a small model trained on it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from stpm import STPM
from stpm.export import export_model

SHARED_TILES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "magnetic_tile"
TINY = {
    "image_size": 64,
    "strides": (4, 8, 16),  # at 64 px a stride-16 map is 4 x 4: tiny images need the finer level
    "epochs": 10,
    "batch_size": 4,
    "validation_fraction": 0.25,
    "seed": 0,
    "device": "cpu",
}


def texture(rng: np.random.Generator, size: int = 80) -> np.ndarray:
    """A smooth grey texture standing in for a defect-free surface: (size, size) uint8."""
    noise = rng.normal(128, 40, (size // 8, size // 8)).astype(np.float32)
    smooth = cv2.resize(noise, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(smooth + rng.normal(0, 4, (size, size)), 0, 255).astype(np.uint8)


def make_category(root: Path, train: int = 12, seed: int = 0) -> Path:
    """train/good, test/good, test/scratch with masks in ground_truth/scratch."""
    rng = np.random.default_rng(seed)
    for index in range(train):
        _write(root / "train" / "good" / f"{index:03d}.png", texture(rng))
    for index in range(3):
        _write(root / "test" / "good" / f"{index:03d}.png", texture(rng))
        image, mask = texture(rng), np.zeros((80, 80), np.uint8)
        mask[30:50, 20:60] = 255
        image[mask > 0] = 255
        _write(root / "test" / "scratch" / f"{index:03d}.png", image)
        _write(root / "ground_truth" / "scratch" / f"{index:03d}_mask.png", mask)
    return root


def _write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


@pytest.fixture(scope="session")
def category(tmp_path_factory) -> Path:
    return make_category(tmp_path_factory.mktemp("data") / "tiles")


@pytest.fixture(scope="session")
def trained(category, tmp_path_factory) -> tuple[STPM, Path]:
    """A tiny model and its run folder, trained once for the whole session."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    return STPM(**TINY).fit(category, run_dir=run_dir), run_dir


@pytest.fixture(scope="session")
def onnx_file(trained, tmp_path_factory) -> Path:
    """The tiny model exported to ONNX (FP32)."""
    model, _ = trained
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return export_model(model.runtime_, path, check=False).path


@pytest.fixture(scope="session")
def second_onnx(trained, tmp_path_factory) -> Path:
    """Another model: the tiny one with its student's weights scaled by 1.2, exported to ONNX,
    so that its scores (and its SHA-256) differ from onnx_file's."""
    import copy

    import torch

    model = copy.deepcopy(trained[0])
    with torch.no_grad():
        for parameter in model.runtime_.student.parameters():
            parameter.mul_(1.2)
    path = tmp_path_factory.mktemp("second") / "model.onnx"
    return export_model(model.runtime_, path, check=False).path
