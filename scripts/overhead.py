"""What the library adds to one `predict(path)` call, beyond decoding and the runtime's own run.

Usage:
    python scripts/overhead.py --data /path/to/magnetic_tile --model MODEL.pt [--threads N]

For each runtime (torch on the .pt; ONNX Runtime and OpenVINO on the FP32 export; OpenVINO in
BF16 where the CPU has it; ONNX Runtime and OpenVINO on the INT8 export), in a process of its
own, with the same model, threads and images:
  - run:     the runtime alone on ready normalised tensors, call after call;
  - decode:  `stpm.scoring.read_image` alone on the files;
  - predict: `model.predict(path)`, one image per call, call after call (the camera case).
Each is timed on every one of --calls images (--rounds times over) after --warm-up calls, the
three right after each other on the same image, so that a drift of the machine touches all
three alike. The overhead is the median over images of predict - decode - run; the bound is
the larger of 1.5 ms and 15% of median(run). First-call latency is the first predict after loading (a line's first part).
Results, with the CPU they were measured on: scripts/results/overhead.md and .json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import benchkit
import numpy as np
from benchmark_speed import export_ours

RESULTS = Path(__file__).resolve().parent / "results"
PATHS = {  # name -> (model file key, runtime, precision)
    "torch": ("pt", "torch", "f32"),
    "onnxruntime FP32": ("fp32", "onnxruntime", "f32"),
    "openvino FP32": ("fp32", "openvino", "f32"),
    "openvino BF16": ("fp32", "openvino", "bf16"),
    "onnxruntime INT8": ("int8", "onnxruntime", "f32"),
    "openvino INT8": ("int8", "openvino", "f32"),
}


def measure(args: argparse.Namespace) -> dict:
    """Child process: one runtime, timed as the module docstring says."""
    from stpm import STPM, scoring

    key, runtime, precision = PATHS[args.child]
    started = time.perf_counter()
    model = STPM.load(args.model, runtime=runtime, threads=args.threads, precision=precision)
    load_ms = 1000 * (time.perf_counter() - started)
    paths = benchkit.spread_subset(benchkit.test_images(args.data), args.calls)
    tensors = [
        scoring.normalize(
            scoring.resize(scoring.read_image(path), model.input_size_)[None],
            model.mean_,
            model.std_,
        )
        for path in paths
    ]
    started = time.perf_counter()
    model.predict(paths[0])
    first_ms = 1000 * (time.perf_counter() - started)
    for path in paths[: args.warm_up]:
        model.predict(path)
    times: dict[str, list[float]] = {"run": [], "decode": [], "predict": []}
    for _ in range(args.rounds):
        for index in range(len(paths)):
            times["predict"].append(_timed(model.predict, paths[index]))
            times["decode"].append(_timed(scoring.read_image, paths[index]))
            times["run"].append(_timed(model.runtime_, tensors[index]))
    runtime, instant = model.runtime_, _Instant(model.runtime_, tensors[0])

    def predict_instantly(path: Path) -> list:  # predict's own path, with an instant runtime
        return list(scoring.predict(instant, [path], model.threshold_, model.validation_mean_))

    times["predict_instant_runtime"] = [_timed(predict_instantly, path) for path in paths]
    times["decode_alone"] = [_timed(scoring.read_image, path) for path in paths]
    medians = {name: _summary(values)["median_ms"] for name, values in times.items()}
    each = np.subtract(np.subtract(times["predict"], times["decode"]), times["run"])
    overhead = float(np.median(each))
    bound = max(1.5, 0.15 * medians["run"])
    return {
        "path": args.child,
        "runtime": runtime.name,
        "precision": getattr(runtime, "precision", "f32"),
        "threads": runtime.threads,
        "calls": len(paths),
        "load_ms": load_ms,
        "first_predict_ms": first_ms,
        **{name: _summary(values) for name, values in times.items()},
        "overhead_ms": overhead,
        "overhead_of_medians_ms": medians["predict"] - medians["decode"] - medians["run"],
        "library_work_ms": medians["predict_instant_runtime"] - medians["decode_alone"],
        "bound_ms": bound,
        "within_bound": overhead <= bound,
    }


class _Instant:
    """A runtime that answers at once with the outputs of one image: what predict costs without
    the model, i.e. the library's own work (resizing, normalising, scores, masks)."""

    def __init__(self, runtime, tensor: np.ndarray) -> None:
        self.name, self.threads, self.description = (
            runtime.name,
            runtime.threads,
            runtime.description,
        )
        self.path = runtime.path
        self.outputs = runtime(tensor)

    def __call__(self, images: np.ndarray, pooled: bool = False):
        return dataclasses.replace(
            self.outputs, maps=self.outputs.maps.copy(), terms=self.outputs.terms.copy()
        )


def _summary(milliseconds: list[float]) -> dict[str, float]:
    return {
        "median_ms": float(np.median(milliseconds)),
        "p99_ms": float(np.percentile(milliseconds, 99)),
    }


def _timed(function, argument) -> float:
    started = time.perf_counter()
    function(argument)
    return 1000 * (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="a prepared category folder")
    parser.add_argument("--model", type=Path, required=True, help="a trained model.pt")
    parser.add_argument("--work", type=Path, default=Path("overhead_work"))
    parser.add_argument("--threads", type=int, help="default: stpm's own default")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--warm-up", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paths", nargs="+", choices=sorted(PATHS), default=list(PATHS))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=sorted(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    files = export_ours(args.model, args.data, args.work)
    results = []
    for name in args.paths:
        if name == "openvino BF16" and not benchkit.openvino_has_bf16():
            print("openvino BF16: this CPU has no BF16 arithmetic, skipped", flush=True)
            continue
        command = [sys.executable, __file__, "--child", name, "--data", str(args.data)]
        command += ["--model", str(files[PATHS[name][0]]), "--calls", str(args.calls)]
        command += ["--warm-up", str(args.warm_up), "--rounds", str(args.rounds)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(output.strip().splitlines()[-1]))
        print(_row(results[-1]), flush=True)
    settings = {
        "model": str(args.model),
        "data": str(args.data),
        "calls": args.calls,
        "warm_up": args.warm_up,
        "rounds": args.rounds,
        "threads": args.threads,
        "cpu": benchkit.cpu_info(),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "overhead.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=2) + "\n"
    )
    (args.results / "overhead.md").write_text(report(results, settings))
    print((args.results / "overhead.md").read_text())


HEADER = (
    "path", "threads", "precision", "run median ms", "run p99 ms", "decode ms",
    "predict median ms", "predict p99 ms", "first predict ms", "overhead ms", "bound ms", "",
    "overhead of the medians ms", "library work ms",
)  # fmt: skip


def _row(result: dict) -> list[str]:
    return [
        result["path"],
        str(result["threads"]),
        result["precision"],
        f"{result['run']['median_ms']:.2f}",
        f"{result['run']['p99_ms']:.2f}",
        f"{result['decode']['median_ms']:.2f}",
        f"{result['predict']['median_ms']:.2f}",
        f"{result['predict']['p99_ms']:.2f}",
        f"{result['first_predict_ms']:.1f}",
        f"{result['overhead_ms']:.2f}",
        f"{result['bound_ms']:.2f}",
        "within" if result["within_bound"] else "**over**",
        f"{result['overhead_of_medians_ms']:.2f}",
        f"{result['library_work_ms']:.2f}",
    ]


def report(results: list[dict], settings: dict) -> str:
    lines = [
        "# Per-call overhead of `predict(path)`, one image at a time",
        "",
        f"CPU: {benchkit.cpu_line(settings['cpu'])}.",
        f"Model: `{settings['model']}`; {settings['calls']} Magnetic Tile test images, "
        f"{settings['warm_up']} warm-up calls, {settings['rounds']} rounds; threads: "
        f"{settings['threads'] or 'stpm default'}. Each path in its own process.",
        "",
        "For every image, one after another: predict (`model.predict(path)`), decode "
        "(`read_image` alone) and run (the runtime alone on the ready tensor). Overhead = the "
        "median over images of predict - decode - run, measured on the same image within a few "
        "milliseconds (a median of differences: a drift of the machine cancels); bound = max(1.5 "
        "ms, 15% of median(run)). For comparison: the difference of the three medians, and the "
        "library's own work: median(predict) with a runtime that answers at once, minus "
        "median(decode) in a loop of its own (with no runtime threads busy beside it).",
        "",
        *benchkit.markdown_table(HEADER, [_row(result) for result in results]),
        "",
        "Command: `python scripts/overhead.py --data DIR --model MODEL.pt`",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
