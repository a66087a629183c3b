"""The README's pictures: image, ground truth and heatmap for defects of a category.

Usage: python scripts/docs_figure.py MODEL CATEGORY_DIR OUT.png [--defects blowhole crack break]
       python scripts/docs_figure.py MODEL CATEGORY_DIR OUT.png --failures 3

For each defect type the image with the highest score of its type (--pick best, the default)
or with the median score (--pick median, a typical one) is shown, a column each: the image, its
ground truth and its heat (stpm.visualize.heat_overlay). --failures N shows instead, over the
whole test set, the N defective images scored highest, the N scored lowest and the N good images
scored highest (the likeliest false alarms), each with its verdict.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from stpm import STPM, Prediction, data, scoring, visualize
from stpm.evaluation import read_mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("category", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--defects", nargs="+", default=["blowhole", "crack", "break"])
    parser.add_argument("--pick", choices=["best", "median"], default="best")
    parser.add_argument(
        "--failures", type=int, metavar="N", help="top and lowest defects, top good parts"
    )
    args = parser.parse_args()
    model = STPM.load(args.model)
    rows = []
    if args.failures:
        samples = data.test_samples(args.category)
        predictions = model.predict([s.path for s in samples])
        order = sorted(range(len(samples)), key=lambda i: predictions[i].score)
        defective = [i for i in order if samples[i].defect != "good"]
        good = [i for i in order if samples[i].defect == "good"]
        n = args.failures
        picks = [("top defect", defective[::-1][:n]), ("lowest defect", defective[:n])]
        picks.append(("top good part", good[::-1][:n]))
        for title, indices in picks:
            for i in indices:
                rows.append(_row(model, samples[i], predictions[i], title))
    else:
        for defect in args.defects:
            samples = [s for s in data.test_samples(args.category) if s.defect == defect]
            predictions = model.predict([s.path for s in samples])
            order = np.argsort([p.score for p in predictions])
            chosen = int(order[-1] if args.pick == "best" else order[len(order) // 2])
            title = f"{defect}: {args.pick} score of {len(samples)}"
            rows.append(_row(model, samples[chosen], predictions[chosen], title))
    visualize.comparison_grid(rows, args.out)
    print(f"wrote {args.out}")


def _row(model: STPM, sample: data.TestSample, prediction: Prediction, title: str) -> tuple:
    """(title, image, mask, heat) for visualize.comparison_grid: one column of the figure."""
    image = scoring.read_image(sample.path)
    mask = read_mask(sample.mask, image.shape[:2]).astype(np.uint8) * 255
    verdict = "ANOMALOUS" if prediction.is_anomalous else "good"
    heat = visualize.heat_overlay(image, prediction.anomaly_map, prediction.threshold)
    name = f"{sample.path.parent.name}/{sample.path.stem}"
    return (f"{title}\n{verdict} {prediction.normalized_score:.2f}\n{name}", image, mask, heat)


if __name__ == "__main__":
    main()
