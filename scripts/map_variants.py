"""Screen ways of turning a trained student's level maps into anomaly maps and image scores.

Usage:
    python scripts/map_variants.py --data DIR --model MODEL.pt [--results DIR]

No retraining: the per-level distance maps of the test images and of the model's own defect-free
validation images (the seeded split of train/good it held out) are computed once, through the
package's map path (`AnomalyMapModel.level_maps`), then combined every way below:
  - levels normalised on the validation images before they are combined: none, z-score (each
    level's pixel mean and standard deviation), or EfficientAD's quantile scaling (each level's
    0.9 and 0.995 pixel quantiles mapped to 0 and 0.1); a product ignores a per-level scale, so
    it is screened without normalisation only;
  - product, sum or maximum of the levels; Gaussian smoothing sigma 0 or 4 pixels;
  - image score: the map's maximum, or the mean of its top 100 or 1000 pixels (of 65,536).
Image AUROC and the share of defective images caught at 1% and 5% false alarms are reported on
two fixed halves of the test set (every other image, sorted by path: half A to choose on, half
B to check) and on all of it; pixel AUROC and PRO for the package's default and the variants
that lead on half A. Results: scripts/results/map_variants.md and .json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import ablation
import benchkit
import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
NORMALISATIONS = ("none", "zscore", "quantile")
COMBINES = ("product", "sum", "max")
SIGMAS = (0.0, 4.0)
TOP_K = (1, 100, 1000)


def level_maps(detector, paths: list[Path]) -> torch.Tensor:
    """(levels, N, H, W) float32 distance maps of image files at the model's input size, by
    ablation.level_maps (the package's map path)."""
    from stpm import data

    images = torch.from_numpy(data.load_resized(paths, detector.input_size_, desc="decoding"))
    return ablation.level_maps(detector, images).transpose(0, 1).contiguous()


def level_statistics(validation: torch.Tensor, normalisation: str) -> list[tuple[float, float]]:
    """Per level (shift, scale) from the validation maps: x -> (x - shift) / scale."""
    statistics = []
    for level in validation:
        pixels = level.flatten()[:: max(1, level.numel() // 2_000_000)].double()
        if normalisation == "zscore":
            statistics.append((float(pixels.mean()), float(pixels.std())))
        elif normalisation == "quantile":
            low, high = (float(torch.quantile(pixels, q)) for q in (0.9, 0.995))
            statistics.append((low, (high - low) / 0.1))
        else:
            statistics.append((0.0, 1.0))
    return statistics


def combined_maps(levels: torch.Tensor, statistics, combine: str, sigma: float) -> torch.Tensor:
    """(levels, N, H, W) -> (N, H, W): normalised, combined, smoothed (64 maps at a time)."""
    from stpm.model import gaussian_blur

    normalised = torch.stack(
        [(level - shift) / scale for level, (shift, scale) in zip(levels, statistics, strict=True)]
    )
    if combine == "product":
        maps = normalised.prod(dim=0)
    elif combine == "sum":
        maps = normalised.sum(dim=0)
    else:
        maps = normalised.amax(dim=0)
    if sigma > 0:
        maps = torch.cat([gaussian_blur(part[:, None], sigma)[:, 0] for part in maps.split(64)])
    return maps


def image_scores(maps: torch.Tensor, top_k: int) -> np.ndarray:
    flat = maps.flatten(1)
    return (flat.amax(dim=1) if top_k == 1 else flat.topk(top_k, dim=1).values.mean(dim=1)).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared category folder")
    parser.add_argument("--model", type=Path, required=True, help="a trained model.pt")
    parser.add_argument("--pixel-metrics", type=int, default=5, help="leading variants to add")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    from stpm import STPM, data
    from stpm.evaluation import defect_labels, summarize
    from stpm.train import split_validation

    detector = STPM.load(args.model, runtime="torch", device="cpu")
    _, validation_paths = split_validation(
        data.train_images(args.data), detector.validation_fraction, detector.seed
    )
    samples = data.test_samples(args.data)
    labels = defect_labels(samples)
    halves = benchkit.test_halves([sample.path for sample in samples])
    validation = level_maps(detector, validation_paths)
    test = level_maps(detector, [sample.path for sample in samples])
    records = []
    for normalisation, combine, sigma in itertools.product(NORMALISATIONS, COMBINES, SIGMAS):
        if combine == "product" and normalisation != "none":
            continue
        maps = combined_maps(test, level_statistics(validation, normalisation), combine, sigma)
        for top_k in TOP_K:
            scores = image_scores(maps, top_k)
            variant = dict(normalisation=normalisation, combine=combine, sigma=sigma, top_k=top_k)
            records.append({**variant, "halves": benchkit.image_figures(labels, scores, halves)})
            print(_name(records[-1]), _figures(records[-1]), flush=True)
    default = dict(normalisation="none", combine=detector.combine, sigma=detector.smoothing_sigma)
    default["top_k"] = 1
    leading = sorted(records, key=lambda r: -r["halves"]["A"]["image_auroc"])[: args.pixel_metrics]
    for record in [r for r in records if _is(r, default)] + leading:
        if "pixel" in record:
            continue
        statistics = level_statistics(validation, record["normalisation"])
        maps = combined_maps(test, statistics, record["combine"], record["sigma"])
        metrics, _ = summarize(samples, image_scores(maps, record["top_k"]), maps.numpy())
        record["pixel"] = {"pixel_auroc": metrics["pixel_auroc"], "pro": metrics["pro"]}
        record["per_defect"] = {
            defect: values["image_auroc"] for defect, values in metrics["per_defect"].items()
        }
    settings = {
        "model": str(args.model),
        "data": str(args.data),
        "validation_images": len(validation_paths),
        "test_images": {name: int(chosen.sum()) for name, chosen in halves.items()},
        "cpu": benchkit.cpu_info(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "map_variants.json").write_text(
        json.dumps({"settings": settings, "default": default, "records": records}, indent=1)
    )
    (args.results / "map_variants.md").write_text(report(records, default, settings))
    print((args.results / "map_variants.md").read_text())


def _is(record: dict, variant: dict) -> bool:
    return all(record[key] == value for key, value in variant.items())


def _name(record: dict) -> str:
    score = "max" if record["top_k"] == 1 else f"top-{record['top_k']} mean"
    return f"{record['normalisation']}, {record['combine']}, sigma {record['sigma']:g}, {score}"


def _figures(record: dict) -> str:
    return " | ".join(
        f"{values['image_auroc']:.3f} ({values['caught_at_1']:.2f} / {values['caught_at_5']:.2f})"
        for values in record["halves"].values()
    )


def report(records: list[dict], default: dict, settings: dict) -> str:
    ranked = sorted(records, key=lambda r: -r["halves"]["A"]["image_auroc"])
    rows = [
        [
            ("**" + _name(r) + "** (the default)") if _is(r, default) else _name(r),
            *[
                f"{v['image_auroc']:.3f} ({v['caught_at_1']:.2f} / {v['caught_at_5']:.2f})"
                for v in r["halves"].values()
            ],
            f"{r['pixel']['pixel_auroc']:.3f} / {r['pixel']['pro']:.3f}" if "pixel" in r else "",
        ]
        for r in ranked
    ]
    defects = sorted({d for r in records if "per_defect" in r for d in r["per_defect"]})
    per_defect = [
        [_name(r), *[f"{r['per_defect'][d]:.3f}" for d in defects]]
        for r in ranked
        if "per_defect" in r
    ]
    counts = settings["test_images"]
    return (
        "\n".join(
            [
                "# Map and score variants of one trained student (no retraining)",
                "",
                f"CPU: {benchkit.cpu_line(settings['cpu'])}. Model `{settings['model']}`; levels "
                f"normalised on its {settings['validation_images']} validation images; test halves "
                f"A ({counts['A']} images, to choose on) and B ({counts['B']}, to check): every "
                "other image sorted by path. Cells: image AUROC (share of defective images caught "
                "at 1% / 5% false alarms). One seed: a Hanley-McNeil standard error is about 2 "
                "points on a half, 1.5 on all 583.",
                "",
                *benchkit.markdown_table(
                    [
                        "variant (normalisation, combine, sigma, score)",
                        "half A",
                        "half B",
                        "all",
                        "pixel AUROC / PRO (all)",
                    ],
                    rows,
                ),  # fmt: skip
                "",
                "Image AUROC per defect type (all test images):",
                "",
                *benchkit.markdown_table(["variant", *defects], per_defect),
                "",
                "Command: `python scripts/map_variants.py --data DIR --model MODEL.pt`",
            ]
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
