"""Where OpenVINO spends an image's time, per operation type, for several models side by side.

Usage:
    python scripts/openvino_profile.py NAME=MODEL.onnx|.xml ... [--threads N] [--precision f32]

Each model is compiled as stpm.runtime compiles ours (batch 1, shapes fixed, latency hint, the
given precision and threads) with OpenVINO's per-node counters on, run on random input
(speed does not depend on it) --repeats times after a warm-up, and its nodes' times summed per
(operation, kernel). The table says what the time goes into and how many nodes of each kind
the compiled graph holds: two graphs can differ in the work they do, not only in how fast they
do it. Results: scripts/results/openvino_profile.md.
"""

from __future__ import annotations

import argparse
import collections
import time
from pathlib import Path

import benchkit
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def profile(path: Path, threads: int, precision: str, repeats: int) -> dict:
    """Median latency and per-(operation, kernel) milliseconds and node counts of one model."""
    import openvino as ov

    core = ov.Core()
    graph = core.read_model(str(path))
    shape = [1, 3, *graph.inputs[0].get_partial_shape()[2:].to_shape()]
    graph.reshape(shape)
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "PERF_COUNT": True,
    }
    request = core.compile_model(graph, "CPU", config).create_infer_request()
    images = np.random.default_rng(0).random(shape, dtype=np.float32)
    for _ in range(5):
        request.infer({0: images})
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        request.infer({0: images})
        times.append(1000 * (time.perf_counter() - started))
    milliseconds, nodes = collections.Counter(), collections.Counter()
    for node in request.get_profiling_info():
        if node.real_time.total_seconds() > 0:
            key = f"{node.node_type} ({node.exec_type})"
            milliseconds[key] += node.real_time.total_seconds() * 1000
            nodes[key] += 1
    return {"median_ms": float(np.median(times)), "operations": milliseconds, "nodes": nodes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="NAME=PATH of an .onnx or OpenVINO .xml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--top", type=int, default=8, help="operations shown per model")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    lines = [
        "# OpenVINO's time per operation type, one 256 px image",
        "",
        f"CPU: {benchkit.cpu_line(benchkit.cpu_info())}. Threads: {args.threads}; precision "
        f"asked: {args.precision}; batch 1, shapes fixed; {args.repeats} runs after a warm-up; "
        "per-node times from OpenVINO's counters (PERF_COUNT), summed per operation and kernel.",
        "",
    ]
    for item in args.models:
        name, path = item.split("=", 1)
        result = profile(Path(path), args.threads, args.precision, args.repeats)
        total = sum(result["operations"].values())
        rows = [
            [operation, f"{result['nodes'][operation]}", f"{ms:.2f}", f"{100 * ms / total:.0f}%"]
            for operation, ms in result["operations"].most_common(args.top)
        ]
        rows.append(["all", f"{sum(result['nodes'].values())}", f"{total:.2f}", "100%"])
        lines += [
            f"## {name}: median {result['median_ms']:.2f} ms per image (`{path}`)",
            "",
            *benchkit.markdown_table(["operation (kernel)", "nodes", "ms", "share"], rows),
            "",
        ]
        print(f"{name}: {result['median_ms']:.2f} ms", flush=True)
    command = "python scripts/openvino_profile.py " + " ".join(args.models)
    lines.append(f"Command: `{command} --threads {args.threads} --precision {args.precision}`")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "openvino_profile.md").write_text("\n".join(lines) + "\n")
    print((args.results / "openvino_profile.md").read_text())


if __name__ == "__main__":
    main()
