"""Which INT8 keeps the map: each way of quantising one model, scored on the test set.

Usage:
    python scripts/int8_variants.py --data /path/to/magnetic_tile --model runs/.../model.pt \
        [--work int8_work] [--variants NAME ...]

The model is exported to FP32 ONNX once; each variant is that file quantised by
stpm.export.quantize_int8 with other settings (calibrated on the same 64 train/good images),
run by ONNX Runtime on every test image, and compared with the FP32 file: image AUROC (the
score stpm reports, and the map's maximum alone), pixel AUROC, PRO, defects caught at 1% false
alarms, and how close its maps and image terms stay to FP32's (correlation over the test set).
"refitted": the image term and threshold fitted again on the quantised file's own features
(stpm.export.refit_int8: the file stpm.export.export_model and stpm-export --int8 write).
No timing here (scripts/benchmark_edge.py times the chosen ones). Results: int8_variants.json
and .md in --results, with the CPU (INT8 arithmetic differs with and without VNNI).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import benchkit
import numpy as np

TEACHER, STUDENT = "/network/teacher/", "/network/student/"
# name: quantize_int8's keyword arguments (None: the FP32 file itself)
VARIANTS = {
    "fp32": None,
    "percentile (0.2)": {"reduce_range": False},
    "percentile, term and threshold refitted": {"reduce_range": False, "refit": True},
    "percentile, reduce_range": {"reduce_range": True},
    "minmax": {"reduce_range": False, "calibration": "minmax"},
    "entropy": {"reduce_range": False, "calibration": "entropy"},
    "symmetric activations": {"reduce_range": False, "symmetric": True},
    "student INT8, teacher FP32": {"reduce_range": False, "keep_fp32": [TEACHER]},
    "teacher INT8, student FP32": {"reduce_range": False, "keep_fp32": [STUDENT]},
    "stride-32 blocks FP32": {
        "reduce_range": False,
        "keep_fp32": [f"{TEACHER}blocks.5/", f"{TEACHER}blocks.6/", f"{STUDENT}features/blocks.5/"]
        + [f"{STUDENT}features/blocks.6/", f"{STUDENT}projections.2/"],
    },
}


def score(model: Path, category: Path) -> dict:
    """Scores, maps and terms of an ONNX file over category's test images (ONNX Runtime)."""
    from stpm import STPM, data

    detector = STPM.load(model, runtime="onnxruntime")
    paths = [sample.path for sample in data.test_samples(category)]
    predictions = [p for _, p in detector.predict_iter(paths, full_resolution=False)]
    return {
        "scores": np.asarray([prediction.score for prediction in predictions]),
        "maps": np.stack([prediction.anomaly_map for prediction in predictions]),
        "terms": np.asarray([prediction.image_term for prediction in predictions]),
    }


def figures(result: dict, reference: dict, category: Path) -> dict:
    from stpm import data
    from stpm.evaluation import defect_labels, summarize

    samples = data.test_samples(category)
    labels = defect_labels(samples)
    paths = [sample.path for sample in samples]
    halves = benchkit.test_halves(paths)
    metrics, _ = summarize(samples, result["scores"], result["maps"])
    alone = result["scores"] - result["terms"]
    return {
        "image": benchkit.image_figures(labels, result["scores"], halves),
        "map_maximum_alone": benchkit.image_figures(labels, alone, halves)["all"]["image_auroc"],
        "pixel_auroc": metrics["pixel_auroc"],
        "pro": metrics["pro"],
        "per_defect": {d: v["image_auroc"] for d, v in metrics["per_defect"].items()},
        "map_correlation": float(
            np.corrcoef(result["maps"].ravel(), reference["maps"].ravel())[0, 1]
        ),
        "term_correlation": float(np.corrcoef(result["terms"], reference["terms"])[0, 1]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("int8_work"))
    parser.add_argument("--results", type=Path, default=benchkit.SCRIPTS / "results")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    from stpm import STPM, export, runtime

    args.work.mkdir(parents=True, exist_ok=True)
    fp32 = args.work / "model.onnx"
    detector = STPM.load(args.model, runtime="torch", device="cpu")
    if not fp32.exists():
        export.export_model(detector.runtime_, fp32, check=False)
    calibration = export.calibration_images(
        args.data, detector.input_size_, 64, detector.resize_mode
    )
    reference = score(fp32, args.data)
    results = {}
    for index, name in enumerate(args.variants):
        options = VARIANTS[name]
        path = fp32
        if options is not None:
            path = args.work / f"variant{index}.onnx"
            settings = {key: value for key, value in options.items() if key != "refit"}
            export.quantize_int8(fp32, path, calibration, detector.mean_, detector.std_, **settings)
            if options.get("refit"):
                export.refit_int8(path, args.data)
        results[name] = {
            "options": options,
            "megabytes": path.stat().st_size / 1e6,
            **figures(score(path, args.data), reference, args.data),
        }
        print(name, json.dumps(results[name]["image"]["all"]), flush=True)
    settings = {
        "model": str(args.model),
        "data": str(args.data),
        "cpu": benchkit.cpu_info(),
        "has_vnni": runtime.has_vnni(),
        "command": shlex.join(["python", *sys.argv]),
    }
    benchkit.write_results(args.results, "int8_variants", settings, results, write_markdown)


def write_markdown(results: dict, settings: dict, path: Path) -> None:
    header = ["variant", "image AUROC A / B / all", "caught at 1%", "map max alone"]
    header += ["pixel AUROC", "PRO", "map corr.", "term corr.", "MB"]
    rows = []
    for name, result in results.items():
        image = result["image"]
        rows.append(
            [
                name,
                " / ".join(f"{image[half]['image_auroc']:.3f}" for half in ("A", "B", "all")),
                f"{image['all']['caught_at_1']:.2f}",
                f"{result['map_maximum_alone']:.3f}",
                f"{result['pixel_auroc']:.3f}",
                f"{result['pro']:.3f}",
                f"{result['map_correlation']:.3f}",
                f"{result['term_correlation']:.3f}",
                f"{result['megabytes']:.1f}",
            ]
        )
    notes = [
        f"CPU: {benchkit.cpu_line(settings['cpu'])}; VNNI: {settings['has_vnni']}.",
        f"Model: `{settings['model']}`, scored by ONNX Runtime on every test image of "
        f"{Path(settings['data']).name}; correlations are with the FP32 file's maps and terms.",
    ]
    title = "INT8 variants: what quantisation keeps of the map and the score"
    benchkit.write_markdown_report(path, title, notes, header, rows, settings["command"])


if __name__ == "__main__":
    main()
