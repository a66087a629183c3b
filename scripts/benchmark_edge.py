"""Distil, prune, quantise: every compact variant of our model against our FP32 deployment and
anomalib's OpenVINO INT8 Stfpm, measured one after another in one run on this CPU.

Usage:
    python scripts/benchmark_edge.py --data /path/to/magnetic_tile \
        --model default=runs/.../model.pt --model pruned-50=runs/...-prune50/model.pt ... \
        [--anomalib-python /path/to/anomalib-venv/bin/python \
         --anomalib-checkpoint /path/to/Stfpm/.../model.ckpt] [--threads 2] [--work edge_work]

Each --model NAME=FILE is a model.pt (the first is the reference: "our FP32 deployment" is its
FP32 ONNX file on whichever of ONNX Runtime and OpenVINO is faster). Each is exported once per
--work folder to FP32 ONNX and to INT8 as `stpm-export --int8` makes it (stpm.export.export_model:
percentile calibration on 64 train/good images, reduce_range for this CPU, image term and
threshold fitted again on the INT8 file), then run through ONNX Runtime and OpenVINO, each path in its own
process with the same threads, warm-up and images (scripts/benchmark_speed.py's child: every
test image one at a time from its file, then in batches). The reference also runs on torch.
anomalib's OpenVINO INT8 export (NNCF) of its trained Stfpm runs the same way, in its own venv.

For each: parameters (teacher + student + image model), file size, GFLOP per image (torch's
FlopCounterMode on the .pt model), peak RSS while predicting, median latency and images/s one
at a time, image AUROC, pixel AUROC, PRO, defects caught at 1% false alarms. Results:
edge.json, edge.md and edge.png (image AUROC against median latency, the Pareto front marked)
in --results, with the CPU's model and flags.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import benchkit
import benchmark_speed
from benchmark import summarize

CALIBRATION_IMAGES = 64
# our paths per model: (benchmark_speed child, which file)
PATHS = {
    "ONNX Runtime FP32": ("onnxruntime-fp32", "fp32"),
    "OpenVINO FP32": ("openvino-fp32", "fp32"),
    "ONNX Runtime INT8": ("onnxruntime-int8", "int8"),
    "OpenVINO INT8": ("openvino-int8", "int8"),
}


@dataclass
class Variant:
    """One model: its name, model.pt, and the FP32 and INT8 ONNX files made from it."""

    name: str
    model: Path
    fp32: Path
    int8: Path


def export(name: str, model: Path, data: Path, work: Path) -> Variant:
    """The model's FP32 and INT8 files, as stpm-export makes them; once per --work folder."""
    folder = work / name
    variant = Variant(name, model, folder / "model.onnx", folder / "model-int8.onnx")
    if variant.fp32.exists() and variant.int8.exists():
        return variant
    from stpm import export as exporting

    folder.mkdir(parents=True, exist_ok=True)
    exporting.export_model(model, variant.fp32, data)
    exporting.export_model(model, variant.int8, data, int8=True, images=CALIBRATION_IMAGES)
    return variant


def sizes(model: Path) -> dict:
    """Parameters (teacher, student, image model) and GFLOP per image of a model.pt."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stpm import STPM

    detector = STPM.load(model, runtime="torch", device="cpu")
    graph = detector.runtime_.model  # teacher, student and image model: the torch graph
    image = torch.zeros((1, 3, *detector.input_size_))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph(image)
    unique = {id(p): p for p in graph.parameters()}  # a shared stem counts once
    student = {id(p): p for p in detector.runtime_.student.parameters()}
    teacher = {id(p) for p in graph.network.teacher.parameters()}
    return {
        "parameters": sum(p.numel() for p in unique.values()),
        "student_parameters": sum(p.numel() for k, p in student.items() if k not in teacher),
        "gflops_per_image": counter.get_total_flops() / 1e9,
        "pt_megabytes": model.stat().st_size / 1e6,
    }


def our_jobs(
    variants: list[Variant], args: argparse.Namespace
) -> list[tuple[benchmark_speed.Job, Variant, Path]]:
    """(job, its model, the file it runs) for every path of every model."""
    jobs = []
    script = str(benchkit.SCRIPTS / "benchmark_speed.py")
    common = ["--data", str(args.data), "--threads", str(args.threads)]
    common += ["--limit", str(args.limit)] if args.limit else []
    for index, variant in enumerate(variants):
        paths = dict(PATHS)
        if index == 0:  # the reference, also on torch: "our FP32 torch path"
            paths = {"torch": ("torch", "pt"), **paths}
        for label, (child, which) in paths.items():
            file = {"pt": variant.model, "fp32": variant.fp32, "int8": variant.int8}[which]
            folder = args.work / "runs" / f"{variant.name}-{child}"
            command = [sys.executable, script, "--child", child, "--model", str(file)]
            command += [*common, "--out", str(folder)]
            job = benchmark_speed.Job(f"{variant.name}:{child}", label, command, folder)
            jobs.append((job, variant, file))
    return jobs


def anomalib_job(args: argparse.Namespace) -> benchmark_speed.Job:
    """anomalib's OpenVINO INT8 path (its export made once, in --work/anomalib-exports)."""
    skipped: dict[str, str] = {}
    jobs = benchmark_speed.their_jobs(args, skipped)
    (job,) = [job for job in jobs if job.key == "anomalib:openvino-int8"]
    return job


def main() -> None:
    from stpm.runtime import default_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument(
        "--model", action="append", required=True, metavar="NAME=FILE", help="model.pt; repeat"
    )
    parser.add_argument("--anomalib-python", type=Path)
    parser.add_argument("--anomalib-checkpoint", type=Path)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--work", type=Path, default=Path("edge_work"))
    parser.add_argument("--results", type=Path, default=benchkit.SCRIPTS / "results")
    parser.add_argument(
        "--rounds", type=int, default=3, help="times every path is timed, round-robin"
    )
    parser.add_argument("--limit", type=int, help="N test images spread over the set (smoke test)")
    args = parser.parse_args()
    args.data, args.work = args.data.resolve(), args.work.resolve()
    args.bf16 = False
    models = dict(item.split("=", 1) for item in args.model)
    variants = [
        export(name, Path(file).resolve(), args.data, args.work) for name, file in models.items()
    ]
    jobs = our_jobs(variants, args)
    if args.anomalib_python:
        jobs.append((anomalib_job(args), None, None))
    for round_number in range(1, args.rounds + 1):  # round-robin: a slow spell hits all paths
        for job, _, _ in jobs:
            folder = round_folder(job.folder, round_number)
            if (folder / "result.json").exists():
                continue
            print(f"{job.key}, round {round_number} ...", flush=True)
            command = [*job.command[: job.command.index("--out") + 1], str(folder)]
            command += job.command[job.command.index("--out") + 2 :]
            log = args.work / f"{job.key.replace(':', '-')}-{round_number}.log"
            benchkit.launch(command, args.threads, log, job.extra_env)
    measured = {variant.name: sizes(variant.model) for variant in variants}
    with concurrent.futures.ProcessPoolExecutor(2) as pool:  # accuracy: no timing any more
        summaries = list(
            pool.map(
                summarize,
                [j.name for j, _, _ in jobs],
                [j.folder for j, _, _ in jobs],
                [args.data] * len(jobs),
            )
        )
    results = []
    for (job, variant, file), result in zip(jobs, summaries, strict=True):
        result.pop("cpu", None)
        result["key"] = job.key
        result.update(over_rounds(job.folder, args.rounds))
        if variant is not None:
            result.update(model=variant.name, **measured[variant.name])
            result["file_megabytes"] = file.stat().st_size / 1e6
        else:
            export_dir = args.work / "anomalib-exports" / "weights" / "openvino"
            result["model"] = "anomalib Stfpm"
            result["file_megabytes"] = (
                sum(f.stat().st_size for f in export_dir.glob("model_int8.*")) / 1e6
            )
        results.append(result)
    settings = {
        "threads": args.threads,
        "rounds": args.rounds,
        "data": str(args.data),
        "models": {name: str(file) for name, file in models.items()},
        "test_images": results[0]["test_images"],
        "cpu": benchkit.cpu_info(),
        "command": shlex.join(["python", *sys.argv]),
    }
    benchkit.write_results(args.results, "edge", settings, results, write_markdown)
    plot(results, settings, args.results / "edge.png")


def round_folder(folder: Path, round_number: int) -> Path:
    return folder if round_number == 1 else folder.with_name(f"{folder.name}-round{round_number}")


def over_rounds(folder: Path, rounds: int) -> dict:
    """Images/s one at a time and median latency: the median over the rounds, with each
    round's images/s."""
    import statistics

    found = [
        json.loads((round_folder(folder, number) / "result.json").read_text())
        for number in range(1, rounds + 1)
    ]
    speeds = [result["inference_images_per_second"] for result in found]
    return {
        "inference_images_per_second": statistics.median(speeds),
        "median_latency_ms": statistics.median(r["median_latency_ms"] for r in found),
        "images_per_second_per_round": speeds,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in found),
    }


def reference_rows(results: list[dict]) -> dict:
    """Our FP32 deployment (the first model's faster FP32 ONNX path) and our torch path."""
    first = results[0]["model"]
    fp32 = [r for r in results if r["model"] == first and r["method"].endswith("FP32")]
    torch_row = next(r for r in results if r["model"] == first and r["method"] == "torch")
    return {
        "fp32": max(fp32, key=lambda r: r["inference_images_per_second"]),
        "torch": torch_row,
    }


def pareto(results: list[dict]) -> set[str]:
    """Keys of the results no other result beats on both latency and image AUROC."""
    front = set()
    for result in results:
        beaten = any(
            other["median_latency_ms"] <= result["median_latency_ms"]
            and other["image_auroc"] >= result["image_auroc"]
            and other is not result
            and (
                other["median_latency_ms"] < result["median_latency_ms"]
                or other["image_auroc"] > result["image_auroc"]
            )
            for other in results
        )
        if not beaten:
            front.add(result["key"])
    return front


def write_markdown(results: list[dict], settings: dict, path: Path) -> None:
    reference = reference_rows(results)
    fp32, torch_row = reference["fp32"], reference["torch"]
    front = pareto(results)
    header = ["model", "path", "params (M)", "file MB", "GFLOP", "peak RSS MB", "median ms"]
    header += [
        "img/s",
        "rounds",
        "x FP32 deploy",
        "x torch",
        "smaller",
        "image AUROC",
        "pixel AUROC",
    ]
    header += ["PRO", "caught at 1%", "front"]
    rows = []
    for r in results:
        rows.append(
            [
                r["model"],
                r["method"],
                f"{r['parameters'] / 1e6:.2f}" if "parameters" in r else "-",
                f"{r['file_megabytes']:.1f}",
                f"{r['gflops_per_image']:.2f}" if "gflops_per_image" in r else "-",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['median_latency_ms']:.1f}",
                f"{r['inference_images_per_second']:.1f}",
                "-".join(f"{speed:.0f}" for speed in sorted(r["images_per_second_per_round"])),
                f"{r['inference_images_per_second'] / fp32['inference_images_per_second']:.2f}",
                f"{r['inference_images_per_second'] / torch_row['inference_images_per_second']:.2f}",
                f"{fp32['file_megabytes'] / r['file_megabytes']:.1f}",
                f"{r['image_auroc']:.3f}",
                f"{r['pixel_auroc']:.3f}",
                f"{r['pro']:.3f}",
                f"{r['caught_at_1']:.2f}",
                "yes" if r["key"] in front else "",
            ]
        )
    lines = [
        "# Distil, prune, quantise: compact variants on this CPU",
        "",
        f"CPU: {benchkit.cpu_line(settings['cpu'])}.",
        f"{settings['test_images']} test images of {Path(settings['data']).name}; threads: "
        f"{settings['threads']}; one path at a time, each in its own process; one image per "
        "call from its file (decode to map), median after an untimed warm-up.",
        f"Our FP32 deployment: {fp32['model']}, {fp32['method']} "
        f"({fp32['inference_images_per_second']:.1f} img/s, {fp32['file_megabytes']:.1f} MB); "
        "'x' columns and 'smaller' are against it (x torch: against the reference on torch).",
        "Parameters count teacher, student and image model (a shared stem once); GFLOP: torch's "
        "FlopCounterMode on the .pt model (convolutions and matrix products).",
        f"Every path was timed {settings['rounds']} times, round-robin (all paths, then all "
        "again): img/s and median ms are the median over the rounds, 'rounds' each round's "
        "img/s (these shared vCPUs vary by tens of percent from minute to minute).",
        "Front: no other row is both faster and more accurate (image AUROC).",
        "",
        *benchkit.markdown_table(header, rows),
        "",
        f"Command: `{settings['command']}`",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(results: list[dict], settings: dict, path: Path) -> None:
    """Image AUROC against median latency: every path (left) and ours up close (right); colour
    = model, marker = path; the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto(results)
    models = list(dict.fromkeys(r["model"] for r in results))
    colours = dict(zip(models, plt.get_cmap("tab10").colors, strict=False))
    markers = {
        "torch": "^",
        "ONNX Runtime FP32": "o",
        "OpenVINO FP32": "D",
        "ONNX Runtime INT8": "s",
        "OpenVINO INT8": "P",
    }
    figure, panels = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.4]})
    ours = [r for r in results if r["model"] != "anomalib Stfpm"]
    for axes, shown in ((panels[0], results), (panels[1], ours)):
        for r in shown:
            marker = markers.get(r["method"], "X")
            axes.scatter(
                r["median_latency_ms"],
                r["image_auroc"],
                marker=marker,
                s=40,
                color=colours[r["model"]],
                edgecolors="black" if r["key"] in front else "none",
            )
        points = sorted(
            (r["median_latency_ms"], r["image_auroc"]) for r in shown if r["key"] in front
        )
        axes.plot(*zip(*points, strict=True), color="gray", linewidth=1, linestyle="--")
        axes.set_xscale("log")
        axes.set_xlabel("median ms per image, one at a time from its file (log)")
        axes.grid(alpha=0.3)
    panels[0].set_ylabel("image AUROC")
    panels[0].set_title("every path (anomalib Stfpm: its OpenVINO INT8)", fontsize=9)
    panels[1].set_title("ours up close; black edge, dashed line: the Pareto front", fontsize=9)
    handles = [
        plt.Line2D([], [], color=colours[m], marker="o", linestyle="", label=m) for m in models
    ] + [
        plt.Line2D([], [], color="gray", marker=k, linestyle="", label=name)
        for name, k in markers.items()
    ]
    panels[1].legend(handles=handles, fontsize=7, loc="lower right", ncol=2)
    cpu = benchkit.cpu_line(settings["cpu"]).split(";")[0]
    figure.suptitle(f"Magnetic Tile, 583 test images; {cpu}, {settings['threads']} threads")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


if __name__ == "__main__":
    main()
