"""Where one image's time goes, from its file to a written overlay: the camera case.

Usage:
    python scripts/profile_inference.py --data /path/to/magnetic_tile --model MODEL.pt \
        [--onnx MODEL.onnx ...] [--threads 2] [--images 50]

Each stage is timed on its own over the first --images test images (median milliseconds):
decode, resize, normalise, teacher, student, map (distances, upsampling, product), map to the
image's own size, overlay drawn and written as PNG. Each ONNX file given is timed as one
graph call on stpm.runtime.OnnxRuntime (teacher + student + map). The torch stages run the
loaded model's own networks and map function (detector.runtime_.model). Results:
scripts/results/profile.md (`--results` for another folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import benchkit
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(stages: dict, name: str, function, *args):
    """function(*args), its milliseconds appended to stages[name]."""
    started = time.perf_counter()
    value = function(*args)
    stages.setdefault(name, []).append(1000 * (time.perf_counter() - started))
    return value


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--onnx", type=Path, nargs="*", default=[])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of profile.md")
    args = parser.parse_args()
    from stpm import STPM, data, scoring, visualize
    from stpm.model import anomaly_map
    from stpm.runtime import OnnxRuntime
    from stpm.settings import MapSettings

    detector = STPM.load(args.model, runtime="torch", device="cpu", threads=args.threads)
    model, size = detector.runtime_.model, detector.input_size_
    network, settings = model.network, model.settings
    plain = MapSettings(size)  # the paper's map: product, no smoothing
    runners = {path.name: OnnxRuntime(path, threads=args.threads) for path in args.onnx}
    paths = [sample.path for sample in data.test_samples(args.data)][: args.images + 2]
    stages: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, path in enumerate(paths):
            if index == 2:
                stages.clear()  # two warm-up images
            image = timed(stages, "decode", scoring.read_image, path)
            resized = timed(stages, "resize", scoring.resize, image, size)
            batch = timed(
                stages, "normalise", scoring.normalize, resized[None], detector.mean_, detector.std_
            )
            images = torch.from_numpy(batch)
            teacher = timed(stages, "teacher (torch)", network.teacher, images)
            student = timed(stages, "student (torch)", network.student, images)
            maps = timed(
                stages,
                f"map: {settings.combine}, sigma {settings.sigma:g} (torch)",
                anomaly_map,
                *(teacher, student, settings),
            )
            timed(
                stages, "map: product, no smoothing (torch)", anomaly_map, teacher, student, plain
            )
            for name, runner in runners.items():
                timed(stages, f"teacher + student + map ({name})", runner, batch)
            full = timed(
                stages, "map to image size", scoring.resize_map, maps[0, 0].numpy(), image.shape[:2]
            )
            overlay = timed(
                stages, "heat drawn", visualize.heat_overlay, image, full, detector.threshold_
            )
            timed(stages, "PNG written", visualize.write_png, Path(folder) / "o.png", overlay)
    lines = [
        "# Where one image's time goes (median ms per stage)",
        "",
        f"{args.images} Magnetic Tile test images, one at a time, {args.threads} threads; model",
        f"input {size[0]}x{size[1]}. Command: `python scripts/profile_inference.py --data DIR "
        "--model MODEL.pt --onnx MODEL.onnx MODEL-int8.onnx`",
        "",
        *benchkit.markdown_table(
            ["stage", "median ms"],
            [[name, f"{statistics.median(times):.2f}"] for name, times in stages.items()],
        ),
    ]
    if args.onnx:
        lines += _onnx_operators(args.onnx, batch, args.threads)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _onnx_operators(paths: list[Path], batch, threads: int, runs: int = 20) -> list[str]:
    """ONNX Runtime's own profile: milliseconds per image spent in each operator type."""
    import onnxruntime as ort

    totals: dict[str, dict[str, float]] = {}
    for path in paths:
        options = ort.SessionOptions()
        options.enable_profiling, options.intra_op_num_threads = True, threads
        with tempfile.TemporaryDirectory() as folder:
            options.profile_file_prefix = str(Path(folder) / "profile")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for _ in range(runs):
                session.run(None, {"images": batch})
            events = json.loads(Path(session.end_profiling()).read_text())
        per_operator = totals.setdefault(path.name, {})
        for event in events:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                operator = event["args"]["op_name"]
                per_operator[operator] = (
                    per_operator.get(operator, 0.0) + event["dur"] / 1000 / runs
                )
    operators = sorted(
        {op for ops in totals.values() for op in ops},
        key=lambda op: -max(ops.get(op, 0.0) for ops in totals.values()),
    )
    rows = [
        [operator, *(f"{ops.get(operator, 0.0):.2f}" for ops in totals.values())]
        for operator in operators
    ]
    rows.append(["all", *(f"{sum(ops.values()):.2f}" for ops in totals.values())])
    lines = ["", "## ONNX Runtime, ms per image by operator type (its own profiler)", ""]
    return lines + benchkit.markdown_table(["operator", *totals], rows)


if __name__ == "__main__":
    main()
