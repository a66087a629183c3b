"""How fast each way of running STPM is on this CPU: ours (torch, ONNX Runtime FP32 and INT8)
against anomalib's Stfpm (TorchInferencer, OpenVINO FP32, OpenVINO INT8), in one run.

Usage:
    python scripts/benchmark_speed.py --data /path/to/magnetic_tile --model runs/.../model.pt \
        --anomalib-python /path/to/anomalib-venv/bin/python \
        --anomalib-checkpoint /path/to/Stfpm/.../model.ckpt [--threads 2]

Every path runs in its own process, one after another, with the same thread count (the whole
machine by default: the camera-side box runs one model). Each process scores every test image
one at a time from its file (decode, resize, normalise, model, map at the input size: the
camera case), then all of them again in batches of 16 (the folder case), and reports its peak
RSS. Image and pixel AUROC of every path come from its own raw maps, through
stpm.evaluation.summarize, the code stpm-eval uses.

Our ONNX files are made from --model by stpm.export (INT8 calibrated on 64 train/good images);
anomalib's exports are made from its trained checkpoint by scripts/anomalib_speed.py in its own
virtual environment (its INT8 is NNCF post-training quantisation on train/good images).

FLOPs per image are counted by torch's FlopCounterMode on each torch graph (convolutions and
matrix products; the element-wise work is left out). "Peak" is this CPU's measured rate on a
large FP32 matrix product with the same thread count, so "share of peak" says how much of what
the cores can do a path turns into images.
Results: scripts/results/speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
RESULTS = SCRIPTS / "results"
OURS = {
    "torch": "stpm torch",
    "onnx-fp32": "stpm ONNX Runtime FP32",
    "onnx-int8": "stpm ONNX Runtime INT8",
}
THEIRS = {
    "torch": "anomalib TorchInferencer",
    "openvino-fp32": "anomalib OpenVINO FP32",
    "openvino-int8": "anomalib OpenVINO INT8",
}
BATCH = 16


def peak_rss_mb() -> float:
    """This process's peak RSS since it started (VmHWM). Not ru_maxrss: that is carried over
    from the parent across fork and exec, so every child would report the parent's peak."""
    status = Path("/proc/self/status").read_text()
    return (
        int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
        / 1024
    )


def run_ours(args: argparse.Namespace) -> None:
    """Child process: one of our paths over the test set, single images then batches."""
    import torch

    from stpm import STPM, data

    torch.set_num_threads(args.threads)
    detector = STPM.load(args.model, device="cpu")
    paths = [sample.path for sample in data.test_samples(args.data)]
    list(detector.predict_iter(paths[:2], batch_size=1, full_resolution=False))  # warm-up
    scores, maps, latencies = [], [], []
    started = time.perf_counter()
    for path in paths:
        begin = time.perf_counter()
        (_, prediction), *_ = detector.predict_iter([path], batch_size=1, full_resolution=False)
        latencies.append(1000 * (time.perf_counter() - begin))
        scores.append(prediction.score)
        maps.append(prediction.anomaly_map)
    single_seconds = time.perf_counter() - started
    started = time.perf_counter()
    for _ in detector.predict_iter(paths, batch_size=BATCH, full_resolution=False):
        pass
    batch_seconds = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out / "maps.npz",
        maps=np.stack(maps).astype(np.float32),
        scores=np.asarray(scores),
        paths=np.array([str(path.relative_to(args.data)) for path in paths]),
    )
    result = {
        "inference_images_per_second": len(paths) / single_seconds,
        "batch_images_per_second": len(paths) / batch_seconds,
        "median_latency_ms": statistics.median(latencies),
        "peak_rss_mb": peak_rss_mb(),
        "threads": args.threads,
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")


def flops_per_image(model_path: Path) -> dict:
    """Counted FLOPs of one 256 px image: our graph, and anomalib's (whole backbones, twice)."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from stpm import STPM
    from stpm.export import MapGraph

    detector = STPM.load(model_path, device="cpu")
    image = torch.zeros((1, 3, *detector.input_size_))
    graph = MapGraph(detector).eval()  # built outside the count: it runs the network once
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        graph(image)
    ours = counter.get_total_flops()
    backbone = timm.create_model(
        detector.backbone, features_only=True, out_indices=detector.out_indices_
    ).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        backbone(image)
    return {"stpm": ours, "anomalib": 2 * counter.get_total_flops()}


def matmul_peak(threads: int, side: int = 2048, repeats: int = 10) -> float:
    """FP32 FLOP/s of a large matrix product: what these cores can do at best."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(side, side), torch.randn(side, side)
    a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - started)
    return 2 * side**3 / min(times)


def launch(command: list[str], threads: int, log: Path) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=environment)
    if code.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])} ... failed; see {log}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", type=Path, required=True, help="our trained model.pt")
    parser.add_argument("--anomalib-python", type=Path)
    parser.add_argument("--anomalib-checkpoint", type=Path, help="anomalib Stfpm model.ckpt")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=Path("speed_work"))
    parser.add_argument("--paths", nargs="+", help="only these (e.g. stpm:onnx-fp32)")
    parser.add_argument("--child", choices=sorted(OURS), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_ours(args)
    sys.path.insert(0, str(SCRIPTS))
    from benchmark import summarize

    from stpm import STPM, data, export, weights

    args.work.mkdir(parents=True, exist_ok=True)
    detector = STPM.load(args.model, device="cpu")
    models = {"torch": args.model, "onnx-fp32": args.work / "model.onnx"}
    models["onnx-int8"] = args.work / "model-int8.onnx"
    if not models["onnx-int8"].exists():  # exported once per --work folder
        export.export_onnx(detector, models["onnx-fp32"])
        train = data.train_images(args.data)
        chosen = train[:: max(1, len(train) // 64)][:64]
        calibration = data.load_resized(chosen, detector.input_size_)
        export.quantize_int8(
            models["onnx-fp32"], models["onnx-int8"], calibration, detector.mean_, detector.std_
        )
    jobs = []
    for key, name in OURS.items():
        folder = args.work / f"stpm-{key}"
        command = [sys.executable, __file__, "--child", key, "--model", str(models[key])]
        command += ["--data", str(args.data), "--out", str(folder), "--threads", str(args.threads)]
        jobs.append((f"stpm:{key}", name, command, folder))
    if args.anomalib_python:
        exports = args.work / "anomalib-exports"
        runner = [str(args.anomalib_python), str(SCRIPTS / "anomalib_speed.py")]
        teacher = weights.resolve_weights_file(weights.DEFAULT_BACKBONE)
        if not (exports / "done").exists():
            command = [*runner, "--export", "--checkpoint", str(args.anomalib_checkpoint)]
            command += ["--export-dir", str(exports), "--data", str(args.data)]
            launch(
                [*command, "--teacher-weights", str(teacher)],
                args.threads,
                args.work / "export.log",
            )
            (exports / "done").touch()
        for key, name in THEIRS.items():
            folder = args.work / f"anomalib-{key}"
            command = [
                *runner,
                "--path",
                key,
                "--export-dir",
                str(exports),
                "--data",
                str(args.data),
            ]
            command += ["--out", str(folder), "--threads", str(args.threads)]
            command += ["--teacher-weights", str(teacher)]
            jobs.append((f"anomalib:{key}", name, command, folder))
    for key, name, command, _folder in jobs:
        if args.paths and key not in args.paths:
            continue
        print(f"{name} ...", flush=True)
        launch(command, args.threads, args.work / f"{key.replace(':', '-')}.log")
    flops = flops_per_image(args.model)
    peak = matmul_peak(args.threads)
    results = []
    for key, name, _, folder in jobs:
        if not (folder / "result.json").exists():
            continue
        result = summarize(name, folder, args.data)
        result.pop("per_defect", None)
        if "images_per_second" in result:  # anomalib_speed.py's name for the same number
            result["inference_images_per_second"] = result.pop("images_per_second")
        count = flops["stpm" if key.startswith("stpm") else "anomalib"]
        result["gflops_per_image"] = count / 1e9
        result["share_of_peak"] = count * result["inference_images_per_second"] / peak
        results.append(result)
    settings = {"threads": args.threads, "peak_gflops": peak / 1e9, "model": str(args.model)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "speed.json").write_text(
        json.dumps({"settings": settings, "results": results}, indent=2) + "\n"
    )
    write_markdown(results, settings, RESULTS / "speed.md")
    print((RESULTS / "speed.md").read_text())


def write_markdown(results: list[dict], settings: dict, path: Path) -> None:
    lines = [
        "# Inference speed on this CPU: stpm vs anomalib Stfpm",
        "",
        f"Magnetic Tile test set (583 images), 256 px, {settings['threads']} threads, one path at",
        "a time. Single: one image per call from its file (decode to map). Batch: 16 per call.",
        f"Peak: {settings['peak_gflops']:.0f} GFLOP/s (FP32 matrix product, same threads).",
        "",
        "| path | single img/s | median ms | batch img/s | peak RSS MB | image AUROC "
        "| pixel AUROC | GFLOP/img | share of peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['method']} | {r['inference_images_per_second']:.1f} "
            f"| {r['median_latency_ms']:.1f} | {r.get('batch_images_per_second', float('nan')):.1f} "
            f"| {r['peak_rss_mb']:.0f} | {r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} "
            f"| {r['gflops_per_image']:.2f} | {100 * r['share_of_peak']:.0f}% |"
        )
    lines += [
        "",
        "Command: `python scripts/benchmark_speed.py --data DIR --model MODEL.pt "
        "--anomalib-python PY --anomalib-checkpoint CKPT`",
    ]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
