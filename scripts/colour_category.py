"""A small colour category for looking at overlays on colour parts, made offline from
scikit-image's immunohistochemistry sample (a 512 x 512 RGB tissue stain: a colour texture).

Usage: python scripts/colour_category.py OUT [--size 128]

train/good: 96 crops at random places; test/good: 6 crops at other random places; test/stain:
the same 6 crops with a synthetic defect (a dark curved scratch and a pale blob), their masks in
ground_truth/stain. Deterministic (seeded).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np
from skimage import data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    picture = cv2.cvtColor(data.immunohistochemistry(), cv2.COLOR_RGB2BGR)
    rng, size = np.random.default_rng(0), args.size
    for index in range(96):
        top, left = rng.integers(0, 512 - size, 2)
        write(
            args.out / "train" / "good" / f"{index:03d}.png",
            picture[top : top + size, left : left + size],
        )
    for index in range(6):
        top, left = rng.integers(0, 512 - size, 2)
        crop = picture[top : top + size, left : left + size].copy()
        write(args.out / "test" / "good" / f"{index:03d}.png", crop)
        damaged, mask = defect(crop, rng)
        write(args.out / "test" / "stain" / f"{index:03d}.png", damaged)
        write(args.out / "ground_truth" / "stain" / f"{index:03d}_mask.png", mask)
    print(f"wrote {args.out}")


def defect(crop: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A dark curved scratch and a pale blob painted on a copy of crop, and their mask."""
    size = crop.shape[0]
    mask = np.zeros(crop.shape[:2], np.uint8)
    start = rng.integers(size // 8, size // 2, 2)
    points = np.array(
        [start + [t * size // 3, int(size / 8 * np.sin(t * 2))] for t in np.linspace(0, 1.5, 12)],
        np.int32,
    )
    cv2.polylines(mask, [points], False, 255, max(2, size // 40))
    centre = tuple(int(c) for c in rng.integers(size // 3, 2 * size // 3, 2))
    cv2.circle(mask, centre, size // 10, 255, -1)
    damaged = crop.copy()
    scratch = np.zeros_like(mask)
    cv2.polylines(scratch, [points], False, 255, max(2, size // 40))
    damaged[scratch > 0] = (damaged[scratch > 0] * 0.3).astype(np.uint8)
    blob = (mask > 0) & (scratch == 0)
    damaged[blob] = (0.4 * damaged[blob] + 0.6 * 235).astype(np.uint8)
    return damaged, mask


def write(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)


if __name__ == "__main__":
    main()
