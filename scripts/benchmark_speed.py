"""How fast each way of running STPM is on this CPU: ours (torch, ONNX Runtime and OpenVINO, FP32,
BF16 and INT8) against anomalib's Stfpm (TorchInferencer, OpenVINO FP32, BF16 and INT8), in one run.

Usage:
    python scripts/benchmark_speed.py --data /path/to/magnetic_tile --model runs/.../model.pt \
        --anomalib-python /path/to/anomalib-venv/bin/python \
        --anomalib-checkpoint /path/to/Stfpm/.../model.ckpt [--threads 2] [--limit 8]

Every path runs in its own process, one after another, with the same thread count
(stpm.runtime.default_threads() unless --threads), the same warm-up and the same images. Each
process scores every test image one at a time from its file (decode, resize, normalise, model,
map at the input size: the camera case), then all of them again in batches of 16 (the folder
case), and reports its latencies (first call after loading, median, p99), images/s and peak
RSS; OpenVINO paths also report the precision OpenVINO compiled to. Image and pixel AUROC of
every path come from its own raw maps, through stpm.evaluation.summarize, the code stpm-eval
uses. The BF16 paths run only where OpenVINO's CPU plugin lists BF16 among its capabilities.

Our ONNX files are made from --model by stpm.export, once per --work folder (INT8 calibrated on
64 train/good images); OpenVINO runs the same two files. anomalib's exports are made from its
trained checkpoint by scripts/anomalib/anomalib_speed.py in its own virtual environment (its
INT8 is NNCF post-training quantisation on train/good images), also once per --work folder.

FLOPs per image are counted by torch's FlopCounterMode on each torch graph (convolutions and
matrix products; the element-wise work is left out). "Peak" is this CPU's measured rate on a
large FP32 matrix product with the same thread count, so "share of peak" says how much of what
the cores can do a path turns into images. The results record the CPU (model and the flags
that decide the kernels: AVX-512 VNNI, BF16, AMX) and the command.
Results: speed.json and speed.md in --results (scripts/results by default).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import benchkit
from benchmark import predict_one, save_predictions, summarize


@dataclass(frozen=True)
class OurPath:
    """One way of running our model: its name in the results, file, runtime and precision."""

    name: str
    model: str  # "pt", "fp32" or "int8": which of export_ours' files
    runtime: str
    precision: str = "f32"


OURS = {
    "torch": OurPath("stpm torch", "pt", "torch"),
    "onnxruntime-fp32": OurPath("stpm ONNX Runtime FP32", "fp32", "onnxruntime"),
    "onnxruntime-int8": OurPath("stpm ONNX Runtime INT8", "int8", "onnxruntime"),
    "openvino-fp32": OurPath("stpm OpenVINO FP32", "fp32", "openvino"),
    "openvino-bf16": OurPath("stpm OpenVINO BF16", "fp32", "openvino", "bf16"),
    "openvino-int8": OurPath("stpm OpenVINO INT8", "int8", "openvino"),
}
THEIRS = {
    "torch": "anomalib TorchInferencer",
    "openvino-fp32": "anomalib OpenVINO FP32",
    "openvino-bf16": "anomalib OpenVINO BF16",
    "openvino-int8": "anomalib OpenVINO INT8",
}
NO_BF16 = "no BF16 on this CPU"
CALIBRATION_IMAGES = 64


def run_ours(args: argparse.Namespace) -> None:
    """Child process: one of our paths over the test images, single images then batches."""
    from stpm import STPM

    path = OURS[args.child]
    detector = STPM.load(
        args.model,
        runtime=path.runtime,
        threads=args.threads,
        device="cpu",
        precision=path.precision,
    )
    paths = benchkit.spread_subset(benchkit.test_images(args.data), args.limit)
    predictions, latencies, single_seconds = benchkit.time_one_at_a_time(
        functools.partial(predict_one, detector), paths
    )
    batch = benchkit.BATCH_SIZE
    list(detector.predict_iter(paths[:batch], batch_size=batch, full_resolution=False))  # warm-up
    started = time.perf_counter()
    for _ in detector.predict_iter(paths, batch_size=batch, full_resolution=False):
        pass
    batch_seconds = time.perf_counter() - started
    peak_rss = benchkit.peak_rss_mb()  # before the maps are stacked for the file
    args.out.mkdir(parents=True, exist_ok=True)
    save_predictions(args.out / "maps.npz", args.data, paths, predictions, latencies)
    result = {
        "path": args.child,
        "runtime": detector.runtime_.name,
        "test_images": len(paths),
        **benchkit.latency_summary(latencies),
        "inference_images_per_second": len(paths) / single_seconds,
        "batch_size": batch,
        "batch_images_per_second": len(paths) / batch_seconds,
        "peak_rss_mb": peak_rss,
        "threads": detector.runtime_.threads,
        "compiled_precision": getattr(detector.runtime_, "precision", None),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def export_ours(model: Path, category: Path, work: Path) -> dict[str, Path]:
    """Our model file and its FP32 and INT8 ONNX exports, as `stpm-export` writes them
    (stpm.export.export_model: INT8 with its image term and threshold refitted); exported once
    per work folder (when both ONNX files are there, they are reused)."""
    files = {"pt": model, "fp32": work / "model.onnx", "int8": work / "model-int8.onnx"}
    if files["fp32"].exists() and files["int8"].exists():
        return files
    from stpm import export

    export.export_model(model, files["fp32"], category)
    export.export_model(model, files["int8"], category, int8=True, images=CALIBRATION_IMAGES)
    return files


def flops_per_image(model_path: Path) -> dict:
    """Counted FLOPs of one image: our map model, and anomalib's (whole backbones, twice)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stpm import STPM
    from stpm.networks import pyramid_indices

    detector = STPM.load(model_path, runtime="torch", device="cpu")
    image = torch.zeros((1, 3, *detector.input_size_))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        detector.runtime_.model(image)  # the torch graph (inference mode hides it from the counter)
    ours = counter.get_total_flops()
    # anomalib's Stfpm compares strides 4/8/16, but timm's EfficientNet feature extractor runs
    # every block whatever the levels asked for: its teacher and student are whole backbones
    backbone = timm.create_model(
        detector.backbone,
        features_only=True,
        out_indices=pyramid_indices(detector.backbone, (4, 8, 16)),
        pretrained=False,
    ).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(image)
    return {"stpm": ours, "anomalib": 2 * counter.get_total_flops()}


@dataclass
class Job:
    """One path to measure: key (`stpm:torch`), name, command and the folder of its results."""

    key: str
    name: str
    command: list[str]
    folder: Path
    extra_env: dict[str, str] | None = None


def our_jobs(args: argparse.Namespace, files: dict[str, Path], skipped: dict) -> list[Job]:
    """Our paths that can run here; the others go into skipped with the reason."""
    has_openvino = importlib.util.find_spec("openvino") is not None
    jobs = []
    for path, spec in OURS.items():
        key = f"stpm:{path}"
        if spec.runtime == "openvino" and not has_openvino:
            skipped[key] = 'OpenVINO is not installed (pip install "stpm[openvino]")'
            continue
        if spec.precision == "bf16" and not args.bf16:
            skipped[key] = NO_BF16
            continue
        folder = args.work / f"stpm-{path}"
        command = [sys.executable, __file__, "--child", path, "--model", str(files[spec.model])]
        command += ["--data", str(args.data), "--out", str(folder), "--threads", str(args.threads)]
        command += ["--limit", str(args.limit)] if args.limit else []
        jobs.append(Job(key, spec.name, command, folder))
    return jobs


def their_jobs(args: argparse.Namespace, skipped: dict) -> list[Job]:
    """anomalib's paths, its checkpoint exported first (once per --work folder)."""
    from stpm import settings, weights

    exports = args.work / "anomalib-exports"
    runner = [str(args.anomalib_python), str(benchkit.ANOMALIB_SCRIPTS / "anomalib_speed.py")]
    environment = benchkit.anomalib_environment()
    teacher = weights.resolve_weights_file(settings.DEFAULT_BACKBONE)
    common = ["--export-dir", str(exports), "--data", str(args.data)]
    common += ["--teacher-weights", str(teacher)]
    if not (exports / "done").exists():
        command = [*runner, "--export", "--checkpoint", str(args.anomalib_checkpoint), *common]
        print("anomalib export ...", flush=True)
        benchkit.launch(command, args.threads, args.work / "export.log", environment)
        (exports / "done").touch()
    jobs = []
    for path, name in THEIRS.items():
        key = f"anomalib:{path}"
        if path == "openvino-bf16" and not args.bf16:
            skipped[key] = NO_BF16
            continue
        folder = args.work / f"anomalib-{path}"
        command = [*runner, "--path", path, *common, "--out", str(folder)]
        command += ["--threads", str(args.threads)]
        command += ["--limit", str(args.limit)] if args.limit else []
        jobs.append(Job(key, name, command, folder, environment))
    return jobs


def collect(jobs: list[Job], args: argparse.Namespace, test_images: int) -> list[dict]:
    """Metrics and speed of every job with results for these images, with FLOPs and share of
    peak; results left in --work by an earlier run on other images are passed over."""
    flops = flops_per_image(args.model)
    peak = benchkit.matmul_peak(args.threads)
    args.peak_gflops = peak / 1e9
    results = []
    for job in jobs:
        if not (job.folder / "result.json").exists():
            continue
        result = summarize(job.name, job.folder, args.data)
        if result["test_images"] != test_images:
            print(f"{job.key}: results on other images in {job.folder}, left out", flush=True)
            continue
        result.pop("per_defect", None)
        result.pop("cpu", None)  # once, in the settings
        count = flops["stpm" if job.key.startswith("stpm") else "anomalib"]
        result["gflops_per_image"] = count / 1e9
        result["share_of_peak"] = count * result["inference_images_per_second"] / peak
        results.append(result)
    return results


def main() -> None:
    from stpm.runtime import default_threads

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="our trained model.pt")
    parser.add_argument("--anomalib-python", type=Path)
    parser.add_argument("--anomalib-checkpoint", type=Path, help="anomalib Stfpm model.ckpt")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--work", type=Path, default=Path("speed_work"))
    parser.add_argument("--results", type=Path, default=benchkit.SCRIPTS / "results")
    parser.add_argument("--paths", nargs="+", help="only these (e.g. stpm:onnxruntime-fp32)")
    parser.add_argument("--limit", type=int, help="N test images spread over the set (smoke test)")
    parser.add_argument("--child", choices=sorted(OURS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_ours(args)
    if args.anomalib_python and not args.anomalib_checkpoint:
        parser.error("--anomalib-python needs --anomalib-checkpoint")
    args.data, args.model = args.data.resolve(), args.model.resolve()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    args.bf16 = benchkit.openvino_has_bf16()
    skipped: dict[str, str] = {}
    jobs = our_jobs(args, export_ours(args.model, args.data, args.work), skipped)
    if args.anomalib_python:
        jobs += their_jobs(args, skipped)
    for job in jobs:
        if args.paths and job.key not in args.paths:
            continue
        print(f"{job.name} ...", flush=True)
        log = args.work / f"{job.key.replace(':', '-')}.log"
        benchkit.launch(job.command, args.threads, log, job.extra_env)
    test_images = len(benchkit.spread_subset(benchkit.test_images(args.data), args.limit))
    results = collect(jobs, args, test_images)
    settings = {
        "threads": args.threads,
        "peak_gflops": args.peak_gflops,
        "model": str(args.model),
        "data": str(args.data),
        "test_images": test_images,
        "skipped": skipped,
        "cpu": benchkit.cpu_info(),
        "command": shlex.join(["python", *sys.argv]),
    }
    benchkit.write_results(args.results, "speed", settings, results, write_markdown)


def write_markdown(results: list[dict], settings: dict, path: Path) -> None:
    header = [
        "path",
        "single img/s",
        "median ms",
        "p99 ms",
        "first-call ms",
        "batch img/s",
        "compiled precision",
        "peak RSS MB",
        "image AUROC",
        "pixel AUROC",
        "GFLOP/img",
        "share of peak",
    ]
    rows = [
        [
            result["method"],
            f"{result['inference_images_per_second']:.1f}",
            f"{result['median_latency_ms']:.1f}",
            f"{result['p99_latency_ms']:.1f}",
            f"{result['first_call_ms']:.0f}",
            f"{result['batch_images_per_second']:.1f}",
            result.get("compiled_precision") or "-",
            f"{result['peak_rss_mb']:.0f}",
            f"{result['image_auroc']:.3f}",
            f"{result['pixel_auroc']:.3f}",
            f"{result['gflops_per_image']:.2f}",
            f"{100 * result['share_of_peak']:.0f}%",
        ]
        for result in results
    ]
    lines = [
        "# Inference speed on this CPU: stpm vs anomalib Stfpm",
        "",
        f"CPU: {benchkit.cpu_line(settings['cpu'])}.",
        f"{settings['test_images']} test images of {Path(settings['data']).name}; threads: "
        f"{settings['threads']}; one path at a time, each in its own process.",
        "Single: one image per call from its file (decode to map); median and p99 after an",
        "untimed warm-up, first call = the first image scored after loading. Batch: "
        f"{benchkit.BATCH_SIZE} per call.",
        f"Peak: {settings['peak_gflops']:.0f} GFLOP/s (FP32 matrix product, same threads); INT8",
        "and BF16 paths can pass 100% of it.",
        "Compiled precision: what OpenVINO reports it computes in (INFERENCE_PRECISION_HINT).",
        "",
        *benchkit.markdown_table(header, rows),
    ]
    if settings["skipped"]:
        lines += ["", "Not run: " + "; ".join(f"{k}: {v}" for k, v in settings["skipped"].items())]
    lines += ["", f"Command: `{settings['command']}`"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
