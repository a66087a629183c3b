"""What a command pays besides the model: start-up, peak memory and per-image time of
`stpm-predict` on an exported file, against the library's own per-image time, for this checkout
and (optionally) an older one side by side.

Usage:
    python scripts/command_costs.py --data /path/to/magnetic_tile --model MODEL-int8.onnx \
        [--images 150] [--before /path/to/older/checkout] [--repeats 3]

For each checkout (this one; with --before also the older one, run from its own source tree on
PYTHONPATH) and each runtime (ONNX Runtime, OpenVINO), every measurement in a fresh process:
  - import:     `import stpm` (seconds; and whether torch was loaded);
  - start-up:   `stpm-predict ONE_IMAGE --no-images` from launch to exit, and its peak RSS;
  - loop:       `stpm-predict` on --images test images (spread over the set) with `--no-images`
                and with its pictures: the scoring loop's own time (summary.json "seconds"),
                per image; the whole command's peak RSS;
  - library:    `STPM.load(model).predict(path)` for the same images one at a time, after 5
                warm-up calls: per image (the median over the images, and the mean).
Every figure is the median over --repeats runs; the checkouts alternate run by run, so that a
slow spell of the machine touches both. Results, with the CPU they were measured on:
command_costs.md and .json in --results (scripts/results by default).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchkit

HERE = Path(__file__).resolve().parents[1]
RUNTIMES = ("onnxruntime", "openvino")
PREDICT = "import sys; from stpm.cli import predict_main; sys.exit(predict_main(sys.argv[1:]))"
IMPORT = (
    "import sys, time; started = time.perf_counter(); import stpm; "
    "print(time.perf_counter() - started, 'torch' in sys.modules)"
)
LIBRARY = """
import json, statistics, sys, time
from stpm import STPM
model, runtime, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
detector = STPM.load(model, runtime=runtime)
for path in paths[:5]:
    detector.predict(path)
times = []
for path in paths:
    started = time.perf_counter()
    detector.predict(path)
    times.append(1000 * (time.perf_counter() - started))
print(json.dumps({"median_ms": statistics.median(times), "mean_ms": statistics.mean(times)}))
"""


def run(code: str, argv: list[str], source: Path) -> tuple[str, float, float]:
    """python -c code argv from source's package (run in source: python -c puts the working
    folder first on its path): (stdout, wall seconds, peak RSS MB)."""
    environment = {**os.environ, "PYTHONPATH": str(source)}
    command = ["/usr/bin/time", "-f", "%M", sys.executable, "-c", code, *argv]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=source)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{shlex.join(command)} failed:\n{done.stderr[-2000:]}")
    peak_kb = float(done.stderr.strip().splitlines()[-1])
    return done.stdout, seconds, peak_kb / 1024


def measure(source: Path, runtime: str, model: Path, paths: list[Path]) -> dict:
    """One round of every measurement for one checkout and runtime."""
    imported, _, import_rss = run(IMPORT, [], source)  # and check which stpm it is
    where, _, _ = run("import stpm; print(stpm.__file__)", [], source)
    assert Path(where.strip()).is_relative_to(source), (where, source)
    import_seconds, torch_loaded = imported.split()
    result = {
        "import_s": float(import_seconds),
        "import_rss_mb": import_rss,
        "torch_imported": torch_loaded == "True",
    }
    common = ["--model", str(model), "--runtime", runtime]
    with tempfile.TemporaryDirectory() as folder:
        _, seconds, rss = run(
            PREDICT, [str(paths[0]), *common, "--no-images", "--out", folder], source
        )
        result.update(startup_s=seconds, startup_rss_mb=rss)
        for name, extra in (("no_images", ["--no-images"]), ("images", [])):
            out = Path(folder) / name
            argv = [*map(str, paths), *common, *extra, "--out", str(out)]
            _, seconds, rss = run(PREDICT, argv, source)
            summary = json.loads((out / "summary.json").read_text())
            result[f"loop_{name}_ms"] = 1000 * summary["seconds"] / summary["images"]
            result[f"command_{name}_s"] = seconds
            result[f"command_{name}_rss_mb"] = rss
    library, _, _ = run(LIBRARY, [str(model), runtime, *map(str, paths)], source)
    figures = json.loads(library.strip().splitlines()[-1])
    result.update(library_median_ms=figures["median_ms"], library_mean_ms=figures["mean_ms"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared category folder")
    parser.add_argument("--model", type=Path, required=True, help="an exported .onnx file")
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--before", type=Path, help="an older checkout to measure beside this")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", type=Path, default=benchkit.SCRIPTS / "results")
    args = parser.parse_args()
    paths = benchkit.spread_subset(benchkit.test_images(args.data), args.images)
    sources = {"this checkout": HERE}
    if args.before:
        sources = {"before": args.before.resolve(), **sources}
    rounds: dict[tuple[str, str], list[dict]] = {}
    for number in range(1, args.repeats + 1):
        for runtime in RUNTIMES:
            for name, source in sources.items():  # alternating: a slow spell touches both
                print(f"round {number}: {name}, {runtime} ...", flush=True)
                found = measure(source, runtime, args.model.resolve(), paths)
                rounds.setdefault((name, runtime), []).append(found)
    results = [
        {"checkout": name, "runtime": runtime, **_medians(found)}
        for (name, runtime), found in rounds.items()
    ]
    settings = {
        "model": str(args.model),
        "data": str(args.data),
        "images": len(paths),
        "repeats": args.repeats,
        "sources": {name: str(source) for name, source in sources.items()},
        "cpu": benchkit.cpu_info(),
        "command": shlex.join(["python", *sys.argv]),
    }
    benchkit.write_results(args.results, "command_costs", settings, results, write_markdown)


def _medians(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds (flags: the first round's)."""
    first = rounds[0]
    return {
        key: value if isinstance(value, bool) else statistics.median(r[key] for r in rounds)
        for key, value in first.items()
    }


def write_markdown(results: list[dict], settings: dict, path: Path) -> None:
    header = [
        "checkout",
        "runtime",
        "import s",
        "torch loaded",
        "start-up s",
        "start-up RSS MB",
        "loop ms/img, no images",
        "loop ms/img, pictures",
        "pictures cost ms/img",
        "library ms/img (median / mean)",
        "loop / library",
        "peak RSS MB, 150 images",
    ]
    rows = [
        [
            r["checkout"],
            r["runtime"],
            f"{r['import_s']:.2f}",
            "yes" if r["torch_imported"] else "no",
            f"{r['startup_s']:.2f}",
            f"{r['startup_rss_mb']:.0f}",
            f"{r['loop_no_images_ms']:.1f}",
            f"{r['loop_images_ms']:.1f}",
            f"{r['loop_images_ms'] - r['loop_no_images_ms']:.1f}",
            f"{r['library_median_ms']:.1f} / {r['library_mean_ms']:.1f}",
            f"{r['loop_no_images_ms'] / r['library_mean_ms']:.2f}",
            f"{r['command_images_rss_mb']:.0f}",
        ]
        for r in results
    ]
    notes = [
        f"CPU: {benchkit.cpu_line(settings['cpu'])}.",
        f"Model: `{settings['model']}`; {settings['images']} test images of "
        f"{Path(settings['data']).name}; every figure the median of {settings['repeats']} runs, "
        "each in a fresh process, the checkouts alternating run by run.",
        "Start-up: `stpm-predict ONE_IMAGE --no-images`, launch to exit. Loop: the scoring loop "
        "of `stpm-predict` (summary.json's seconds) per image, without and with the overlay and "
        "mask pictures. Library: `STPM.load(model).predict(path)` one image at a time.",
    ]
    title = "What stpm-predict pays besides the model"
    benchkit.write_markdown_report(path, title, notes, header, rows, settings["command"])


if __name__ == "__main__":
    main()
