"""Soak test: predict over thousands of generated images in one process; memory must stay flat.

Usage: python scripts/soak.py [--images 3000] [--model MODEL] [--out scripts/results/soak.json]

Without --model a small model (64 px, 2 epochs) is trained on generated textures first. The
resident set size (VmRSS) is sampled every --every images while stpm-predict's path (decode,
batch, score, full-resolution map) runs over the folder. Writes the curve as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from benchkit import markdown_table, rss_mb

from stpm import STPM


def generate(folder: Path, count: int, seed: int = 0) -> list[Path]:
    """count grey textures of varied sizes (60-140 px a side) as PNG files."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        height, width = rng.integers(60, 140, size=2)
        small = rng.normal(128, 40, (height // 8 + 1, width // 8 + 1)).astype(np.float32)
        image = np.clip(cv2.resize(small, (int(width), int(height))), 0, 255).astype(np.uint8)
        path = folder / f"{index:05d}.png"
        cv2.imwrite(str(path), image)
        paths.append(path)
    return paths


def summarize(curve: list[tuple[int, float]], images: int, seconds: float) -> dict:
    """A leak grows with the images scored: compare the median RSS of the second and last thirds.

    Single samples mislead: RSS swings by a batch's buffers as the allocator reuses memory, and
    a batch of a new shape (the last, smaller one) may allocate once.
    """
    third = max(1, len(curve) // 3)
    middle = float(np.median([mb for _, mb in curve[third : 2 * third]]))
    last = float(np.median([mb for _, mb in curve[2 * third :]]))
    return {
        "images": images,
        "seconds": round(seconds, 1),
        "rss_mb": [[index, round(mb, 1)] for index, mb in curve],
        "median_second_third_mb": round(middle, 1),
        "median_last_third_mb": round(last, 1),
        "growth_mb": round(last - middle, 1),
        "peak_mb": round(max(mb for _, mb in curve), 1),
    }


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Soak: memory over a long prediction run",
        "",
        f"`python scripts/soak.py --images {result['images']}`: {result['images']} generated "
        f"images in {result['seconds']} s, one process.",
        "",
        *markdown_table(
            ["images scored", "RSS MB"], [[index, f"{mb:.1f}"] for index, mb in result["rss_mb"]]
        ),
        "",
        f"Median RSS over the second third {result['median_second_third_mb']} MB, over the last "
        f"third {result['median_last_third_mb']} MB: growth {result['growth_mb']} MB "
        f"(peak {result['peak_mb']} MB).",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "soak.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        if args.model:
            model = STPM.load(args.model)
        else:
            generate(root / "tiles" / "train" / "good", 16, seed=1)
            model = STPM(image_size=64, epochs=2, batch_size=8, validation_fraction=0.25).fit(
                root / "tiles"
            )
        paths = generate(root / "soak", args.images)
        curve, started = [(0, rss_mb())], time.perf_counter()
        for index, (_, outcome) in enumerate(model.predict_iter(paths, batch_size=16), start=1):
            assert not isinstance(outcome, Exception), outcome
            if index % args.every == 0 or index == len(paths):
                curve.append((index, rss_mb()))
        seconds = time.perf_counter() - started
    result = summarize(curve, args.images, seconds)
    write(result, args.out)
    print(json.dumps({k: v for k, v in result.items() if k != "rss_mb"}))


if __name__ == "__main__":
    main()
