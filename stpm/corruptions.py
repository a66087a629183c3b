"""Synthetic defects made from the training images themselves, for training and model selection.

The student learns to output the teacher's features of the clean image from a corrupted one
(the denoising objective), so it stops reproducing defect-like patterns; and an epoch can be
kept for how well it separates held-out images from corrupted copies of them. Nothing comes from
outside the part's own images (no texture set is available offline), and everything is
deterministic under (seed, epoch, image index). Three kinds, one per defect a line sees:
  - "shade": a random blob whose brightness and contrast shift (uneven surfaces);
  - "curve": a thin dark curve (cracks, scratches);
  - "patch": a blob of the same image's texture taken from elsewhere (foreign structure).
Blobs are value noise (a coarse random grid upsampled bicubically, see blob): irregular shapes,
the role Perlin noise plays in DRAEM, for the cost of one OpenCV resize.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

KINDS = ("shade", "curve", "patch")


def corrupt(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A corrupted copy of an RGB uint8 image (H, W, 3), one kind drawn at random."""
    kind = KINDS[rng.integers(len(KINDS))]
    if kind == "shade":
        return _shade(image, rng)
    if kind == "curve":
        return _curve(image, rng)
    return _patch(image, rng)


def corrupt_batch(
    images: np.ndarray, keys: Sequence[Sequence[int]], share: float = 1.0
) -> np.ndarray:
    """Copies of uint8 images (B, H, W, 3), each corrupted with probability share, under its own
    key (e.g. (seed, epoch, image index)): the same keys always give the same corruptions."""
    out = np.array(images, copy=True)
    for index, key in enumerate(keys):
        rng = np.random.default_rng(list(key))
        if rng.random() < share:
            out[index] = corrupt(out[index], rng)
    return out


def blob(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A soft mask float32 (H, W) in [0, 1]: one irregular blob, about 0.5-15% of the image.

    Value noise (coarse random grid, bicubic) under a Gaussian window at a random centre, then
    thresholded: one defect-like region with a ragged edge, not speckles all over the part.
    """
    height, width = shape
    cell = int(rng.choice([4, 8, 16]))
    rows, columns = height // cell + 2, width // cell + 2
    centre = rng.uniform((0, 0), (rows, columns))
    radius = rng.uniform(0.1, 0.35) * min(rows, columns)
    y, x = np.ogrid[:rows, :columns]
    window = np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / (2 * radius**2))
    coarse = (rng.random((rows, columns)) * window).astype(np.float32)
    if coarse.max() < 0.6:  # a window too faint to cross the threshold: lift its peak
        coarse *= 0.6 / max(float(coarse.max()), 1e-6)
    noise = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)
    return cv2.GaussianBlur((noise > 0.5).astype(np.float32), (0, 0), sigmaX=1.0)


def _blend(image: np.ndarray, changed: np.ndarray, mask: np.ndarray) -> np.ndarray:
    mixed = image.astype(np.float32) * (1 - mask[..., None]) + changed * mask[..., None]
    return np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


def _shade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pixels = image.astype(np.float32)
    contrast = rng.uniform(0.6, 1.4)
    shift = rng.choice([-1, 1]) * rng.uniform(15, 60)
    changed = (pixels - pixels.mean()) * contrast + pixels.mean() + shift
    return _blend(image, changed, blob(image.shape[:2], rng))


def _curve(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    steps = int(rng.integers(8, 24))
    start = rng.uniform((0, 0), (width, height))
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.35, steps))
    length = rng.uniform(0.15, 0.5) * min(height, width) / steps
    points = start + np.cumsum(length * np.stack([np.cos(heading), np.sin(heading)], 1), 0)
    mask = np.zeros((height, width), np.uint8)
    thickness = int(rng.integers(1, 3))
    cv2.polylines(mask, [np.round(points).astype(np.int32)], False, 255, thickness, cv2.LINE_AA)
    darker = image.astype(np.float32) * rng.uniform(0.2, 0.6)
    return _blend(image, darker, mask.astype(np.float32) / 255.0)


def _patch(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    shift = (int(rng.integers(height // 4, height)), int(rng.integers(width // 4, width)))
    elsewhere = np.roll(image, shift, axis=(0, 1)).astype(np.float32)
    return _blend(image, elsewhere, blob((height, width), rng))
