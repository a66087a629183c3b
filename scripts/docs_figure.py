"""The README's picture: image, ground truth and heatmap for a few defects of a category.

Usage: python scripts/docs_figure.py MODEL CATEGORY_DIR OUT.png [--defects blowhole crack break]

For each defect type the image with the highest score of its type (--pick best, the default)
or with the median score (--pick median, a typical one) is shown.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from stpm import STPM, data, visualize
from stpm.evaluation import read_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--defects", nargs="+", default=["blowhole", "crack", "break"])
    parser.add_argument("--pick", choices=["best", "median"], default="best")
    args = parser.parse_args()
    model = STPM.load(args.model)
    rows = []
    for defect in args.defects:
        samples = [s for s in data.test_samples(args.category) if s.defect == defect]
        predictions = model.predict([s.path for s in samples])
        order = np.argsort([p.score for p in predictions])
        chosen = int(order[-1] if args.pick == "best" else order[len(order) // 2])
        sample, prediction = samples[chosen], predictions[chosen]
        image = data.read_image(sample.path)
        mask = read_mask(sample.mask, image.shape[:2]).astype(np.uint8) * 255
        verdict = "ANOMALOUS" if prediction.is_anomalous else "good"
        label = f"{verdict} {prediction.normalized_score:.2f}"
        overlay = visualize.heatmap_overlay(image, prediction.anomaly_map, model.threshold_, label)
        rows.append((f"{defect}: {args.pick} score of {len(samples)}", image, mask, overlay))
    visualize.comparison_grid(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
