"""Where one image's time goes, from its file to a written overlay: the camera case.

Usage:
    python scripts/profile_inference.py --data /path/to/magnetic_tile --model MODEL.pt \
        [--onnx MODEL.onnx ...] [--threads 2] [--images 50]

Each stage is timed on its own over the first --images test images (median milliseconds):
decode, resize, normalise, teacher, student, map (distances, upsampling, product), map to the
image's own size, overlay drawn and written as PNG. Each ONNX file given is timed as one
graph call (teacher + student + map). Results: scripts/results/profile.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def timed(stages: dict, name: str, function, *args):
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from stpm import STPM, data, visualize
    from stpm.export import OnnxMaps
    from stpm.model import anomaly_map

    detector = STPM.load(args.model, device="cpu")
    network, size = detector.network_.eval(), detector.input_size_
    runners = {path.name: OnnxMaps(path, threads=args.threads) for path in args.onnx}
    paths = [sample.path for sample in data.test_samples(args.data)][: args.images + 2]
    stages: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, path in enumerate(paths):
            if index == 2:
                stages.clear()  # two warm-up images
            image = timed(stages, "decode", data.read_image, path)
            resized = timed(stages, "resize", data.resize, image, size)
            batch = timed(
                stages,
                "normalise",
                data.normalize,
                torch.from_numpy(resized)[None],
                detector.mean_,
                detector.std_,
            )
            teacher = timed(stages, "teacher (torch)", network.teacher, batch)
            student = timed(stages, "student (torch)", network.student, batch)
            maps = timed(
                stages,
                f"map: {detector.combine}, sigma {detector.smoothing_sigma:g} (torch)",
                anomaly_map,
                *(teacher, student, size, detector.combine, detector.smoothing_sigma),
            )
            timed(stages, "map: product, no smoothing (torch)", anomaly_map, teacher, student, size)
            for name, runner in runners.items():
                timed(stages, f"teacher + student + map ({name})", runner, batch)
            full = timed(
                stages, "map to image size", data.resize_map, maps[0, 0].numpy(), image.shape[:2]
            )
            overlay = timed(
                stages,
                "overlay drawn",
                visualize.heatmap_overlay,
                image,
                full,
                detector.threshold_,
                "",
            )
            timed(stages, "PNG written", visualize.write_png, Path(folder) / "o.png", overlay)
    lines = [
        "# Where one image's time goes (median ms per stage)",
        "",
        f"{args.images} Magnetic Tile test images, one at a time, {args.threads} threads; model",
        f"input {size[0]}x{size[1]}. Command: `python scripts/profile_inference.py --data DIR "
        "--model MODEL.pt --onnx MODEL.onnx MODEL-int8.onnx`",
        "",
        "| stage | median ms |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {statistics.median(times):.2f} |" for name, times in stages.items()]
    if args.onnx:
        batch = data.normalize(torch.from_numpy(resized)[None], detector.mean_, detector.std_)
        lines += _onnx_operators(args.onnx, batch.numpy(), args.threads)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile.md").write_text("\n".join(lines) + "\n")
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
    lines = ["", "## ONNX Runtime, ms per image by operator type (its own profiler)", ""]
    lines += ["| operator | " + " | ".join(totals) + " |", "| --- |" + " --- |" * len(totals)]
    for operator in operators:
        cells = [f"{ops.get(operator, 0.0):.2f}" for ops in totals.values()]
        lines.append(f"| {operator} | " + " | ".join(cells) + " |")
    cells = [f"{sum(ops.values()):.2f}" for ops in totals.values()]
    return lines + ["| all | " + " | ".join(cells) + " |"]


if __name__ == "__main__":
    main()
