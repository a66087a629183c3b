"""Time anomalib 2.7.0's deployable Stfpm inference paths on an MVTec-layout folder, for `stpm`.

Why: `scripts/anomalib/anomalib_runner.py` times anomalib's Stfpm as a Lightning module in
eager torch. A user who deploys anomalib would rather export the trained model and run it with
anomalib's own inferencers, possibly through OpenVINO, BF16 and INT8. This script measures those
paths on the same trained checkpoint, one path per process, so that `scripts/benchmark_speed.py`
can put them next to `stpm`'s. Only anomalib's public API is used (`Stfpm.load_from_checkpoint`,
`to_torch`, `to_openvino`, `TorchInferencer`, `OpenVINOInferencer`, `Folder`, `read_image`).

Environment: anomalib's own venv (see `scripts/anomalib/anomalib_runner.py`) plus the export
stack:
    /work/anomalib-venv/bin/pip install openvino nncf onnx onnxruntime onnxscript
(`onnxscript` is required: anomalib 2.7.0 exports to ONNX with torch's dynamo exporter only, and
`to_openvino` goes through ONNX). Tested with openvino 2026.4.1, nncf 3.4.0, torch 2.14.1.

It imports scripts/benchkit.py and scripts/anomalib/anomalib_runner.py, found through
PYTHONPATH: scripts/benchmark_speed.py sets it when it launches this script; by hand, from the
repository root, first
    export PYTHONPATH=$PWD/scripts:$PWD/scripts/anomalib

Step 1, export once (offline; the teacher is rebuilt from a local timm state dict, the trained
weights then come from the checkpoint):
    /work/anomalib-venv/bin/python scripts/anomalib/anomalib_speed.py --export \
        --checkpoint /work/bench20/anomalib/anomalib_work/Stfpm/train_only/v0/weights/lightning/model.ckpt \
        --teacher-weights /root/.cache/stpm/tf_efficientnet_lite0-579344248a93.pth \
        --data /work/mtd --export-dir /tmp/anomalib_exports --threads 1
writes, under --export-dir:
    weights/torch/model.pt            `to_torch`: the whole pickled Stfpm module (for TorchInferencer)
    weights/openvino/model_fp32.xml   `to_openvino(input_size=(S, S))`, FP32 weights
    weights/openvino/model_int8.xml   the same with `CompressionType.INT8_PTQ`: NNCF post-training
                                      quantisation (`nncf.quantize` defaults: performance preset =
                                      symmetric, min/max ranges, fast bias correction), calibrated
                                      on --calibration-images (<= 300) train/good images (a random
                                      sample, --seed; all of them if there are no more)
    export.json                       what was exported, from what, calibration images, times
`--threads` only matters for the export's own computation there.

Step 2, one path per process (`nice`/`taskset` as wanted):
    /work/anomalib-venv/bin/python scripts/anomalib/anomalib_speed.py --path openvino-int8 \
        --export-dir /tmp/anomalib_exports --data /work/mtd --out /tmp/speed-ov-int8 --threads 1
with --path torch | openvino-fp32 | openvino-bf16 | openvino-int8 (openvino-bf16: the FP32
export compiled with INFERENCE_PRECISION_HINT bf16; only on CPUs where OpenVINO lists BF16).
--limit N scores N test images spread over the set (a smoke test).

What the exports compute: the checkpoint was saved with anomalib's post-processor, evaluator and
visualiser disabled, and they are disabled again when it is loaded (asserted), so the exported
graph is pre-processor + Stfpm only. The pre-processor is anomalib's *exportable* copy of the
training transform: Resize((S, S), bilinear, antialias=False) + ImageNet Normalize. Outputs, for
a batch of B images (dynamic batch, static S x S input; S = 256 from the checkpoint):
    anomaly_map  (B, 1, S, S)  RAW: product over the 3 layers of 0.5*||t/|t| - s/|s|||^2, each
                               layer map bilinearly upsampled to S x S. No normalisation.
    pred_score   (B,)          RAW: the maximum of that map (Stfpm's own image score).
No thresholds, no min-max or other normalisation, no labels or masks are in the exports (checked
on the OpenVINO model's output names and on pred_score == max(anomaly_map) at run time), so
image AUROC from `scores` and pixel AUROC / PRO from `maps` are both valid.

Checked on a 16-image subset of Magnetic Tile (24 calibration images): the torch path gives
exactly anomalib_runner.py's scores and maps (bit for bit); OpenVINO FP32 is within 2.5e-6
relative of it (maps within 6e-7); INT8 scores are 3-27% lower and rank the images with Spearman
0.94 (pixel maps correlate 0.97-0.99 per image), so INT8 needs its own AUROC, not FP32's.

Input: every image is read with anomalib's `read_image` (grayscale -> RGB float [0, 1]) and
resized to S x S with torchvision Resize(antialias=True), exactly as in training and as
`anomalib_runner.py` scores, before it goes to `inferencer.predict`; the Resize baked into the
export is then a no-op. (The inferencers' own `predict(path)` would skip the antialiased resize:
TorchInferencer would then resize in-graph without antialias, unlike training, and the OpenVINO
exports take only S x S input.) The torch path's `predict` runs under `torch.inference_mode()`
(TorchInferencer itself does not disable autograd).

Measured (`result.json`; per-image latencies, raw scores and maps in `maps.npz`):
  (a) one image at a time, in test order, exactly as scripts/benchmark_speed.py times stpm
      (benchkit.time_one_at_a_time): a timed first call after loading (first_call_ms), an
      untimed warm-up, then every image; each latency covers read_image + resize + `predict` +
      taking the score and map out as numpy: median_latency_ms, p99_latency_ms,
      inference_images_per_second = images / total time of the loop.
  (b) batches of --batch-size (16) images: read + resize + stack + `predict` on the (B, 3, S, S)
      batch (both inferencers take a batch), one untimed warm-up batch first:
      batch_images_per_second (end to end) and batch_model_images_per_second (`predict` alone).
      The batch scores are checked against (a)'s (max relative difference in result.json).
  (c) peak_rss_mb: VmHWM of the process after (a) and (b) (imports of torch/anomalib included
      on every path, as are pass (a)'s N S x S float32 maps, ~0.26 MB per image, read before
      they are copied into one array for maps.npz, as scripts/benchmark_speed.py does).
  (e) compiled_precision: what OpenVINO compiled to (its INFERENCE_PRECISION_HINT property);
      cpu: benchkit.cpu_info(), the CPU and its AVX-512 / AMX flags.
  (d) maps.npz: `scores` (N,), `maps` (N, S, S) float32 from pass (a), `paths` relative to --data,
      `defects`, `latency_ms`; test order = test/<defect>/ folders sorted, files sorted inside
      (as `stpm.data.test_samples`).

Threads: torch.set_num_threads(N) on every path (read/resize run in torch; the torch path's
model too). OpenVINO: the CPU plugin gets {"INFERENCE_NUM_THREADS": N, "PERFORMANCE_HINT":
"LATENCY", "INFERENCE_PRECISION_HINT": P} through OpenVINOInferencer's `config`, P = "bf16" for
openvino-bf16 and "f32" for openvino-fp32 and openvino-int8 (its layers left in floating point
stay FP32, as in the FP32 path); the values the compiled model reports back are saved. f32 is
explicit because on CPUs with bf16 support OpenVINO would otherwise run the "FP32" model in
bf16. OpenVINOInferencer also turns on OpenVINO's model cache in ./openvino_cache of the current
directory; the inferencer is created with --out as the current directory, so the cache lands
there (it only speeds loading up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import benchkit
import numpy as np
import torch
from torchvision.transforms.v2 import Resize

# offline switches, set before timm, anomalib or huggingface_hub are imported (below, lazily)
os.environ.update(
    dict.fromkeys(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"), "1")
)

BACKBONE = "tf_efficientnet_lite0"
LAYERS = ["blocks.1", "blocks.2", "blocks.4"]
# anomalib asks for opset 14, torch's dynamo exporter writes 18 and fails to convert it down
# (a logged traceback, then it keeps 18): ask for 18 directly, same graph, no noise
ONNX_KWARGS = {"opset_version": 18}
NNCF_SUBSET_SIZE = 300  # nncf.quantize's default subset_size; anomalib does not let us change it
TORCH_FILE = Path("weights/torch/model.pt")
OPENVINO_FILES = {
    "openvino-fp32": Path("weights/openvino/model_fp32.xml"),
    "openvino-int8": Path("weights/openvino/model_int8.xml"),
}
# path -> (export file, the precision OpenVINO is asked to compute in); BF16 is the FP32 export
# compiled for BF16, INT8 keeps f32 for the layers NNCF left in floating point
OPENVINO_PATHS = {
    "openvino-fp32": ("openvino-fp32", "f32"),
    "openvino-bf16": ("openvino-fp32", "bf16"),
    "openvino-int8": ("openvino-int8", "f32"),
}
PATHS = ("torch", *OPENVINO_PATHS)


def versions() -> dict[str, str]:
    names = ("anomalib", "openvino", "nncf", "torch", "torchvision", "timm", "onnx", "onnxscript")
    found = {}
    for name in names:
        with contextlib.suppress(Exception):
            found[name] = version(name)
    return found


# --------------------------------------------------------------------------------------- export


def calibration_datamodule(data: Path, count: int, size: int, seed: int) -> Any:
    """A Folder datamodule whose *validation* set is `count` train/good images.

    anomalib's INT8_PTQ calibrates on `datamodule.val_dataloader()` (after `setup("fit")`), one
    nncf sample per batch and at most nncf's default 300 samples, so the batch size is 1 and
    count <= 300. Fewer than all: a seeded random `from_train` split (its ratio is chosen so
    that the split has exactly `count` images). All: train/good is also given as the normal
    test folder and validation is "same_as_test". test/ is never read.
    """
    from anomalib.data import Folder

    n_train = len(benchkit.images_in(data / "train" / "good"))
    common = {
        "name": "calibration",
        "root": data,
        "normal_dir": "train/good",
        "train_batch_size": 1,
        "eval_batch_size": 1,
        "num_workers": 0,
        "augmentations": Resize((size, size), antialias=True),  # as in training
        "seed": seed,
    }
    if count < n_train:
        # anomalib's random_split: floor(n * r) images, the remainder goes to the first subset
        return Folder(
            **common,
            test_split_mode="none",
            val_split_mode="from_train",
            val_split_ratio=(count + 0.5) / n_train,
        )
    return Folder(
        **common,
        normal_test_dir="train/good",
        test_split_mode="from_dir",
        val_split_mode="same_as_test",
    )


def export(args: argparse.Namespace) -> None:
    from anomalib.deploy import CompressionType
    from anomalib.models import Stfpm
    from anomalib_runner import use_local_teacher

    # anomalib rebuilds the teacher with pretrained=True when it loads a checkpoint (the
    # checkpoint's weights are loaded over it afterwards): from the local file, offline
    use_local_teacher(args.teacher_weights)
    model = Stfpm.load_from_checkpoint(
        args.checkpoint,
        map_location="cpu",
        post_processor=False,  # the checkpoint says so too; raw outputs in every export
        evaluator=False,
        visualizer=False,
    )
    model.eval()
    assert model.post_processor is None and model.pre_processor is not None
    assert model.hparams["backbone"] == BACKBONE and list(model.hparams["layers"]) == LAYERS
    size = tuple(int(s) for s in model.input_size)
    assert size[0] == size[1], size
    if args.image_size and size != (args.image_size, args.image_size):
        raise SystemExit(f"checkpoint resizes to {size}, not --image-size {args.image_size}")

    n_train = len(benchkit.images_in(args.data / "train" / "good"))
    count = min(args.calibration_images, n_train)
    datamodule = calibration_datamodule(args.data, count, size[0], args.seed)
    datamodule.setup("fit")  # to record the images; to_openvino's setup makes the same split
    calibration = sorted(Path(p).name for p in datamodule.val_data.samples["image_path"])
    assert len(calibration) == count, (len(calibration), count)

    seconds = {}
    start = time.perf_counter()
    torch_path = model.to_torch(args.export_dir)
    seconds["torch"] = time.perf_counter() - start
    start = time.perf_counter()
    fp32_path = model.to_openvino(
        args.export_dir, "model_fp32", input_size=size, onnx_kwargs=ONNX_KWARGS
    )
    seconds["openvino-fp32"] = time.perf_counter() - start
    start = time.perf_counter()
    int8_path = model.to_openvino(
        args.export_dir,
        "model_int8",
        input_size=size,
        compression_type=CompressionType.INT8_PTQ,
        datamodule=datamodule,
        onnx_kwargs=ONNX_KWARGS,
    )
    seconds["openvino-int8"] = time.perf_counter() - start
    assert torch_path == args.export_dir / TORCH_FILE, torch_path
    assert fp32_path == args.export_dir / OPENVINO_FILES["openvino-fp32"], fp32_path
    assert int8_path == args.export_dir / OPENVINO_FILES["openvino-int8"], int8_path

    import openvino as ov

    outputs = {
        name: [sorted(o.get_names()) for o in ov.Core().read_model(path).outputs]
        for name, path in (("openvino-fp32", fp32_path), ("openvino-int8", int8_path))
    }
    info = {
        "checkpoint": str(args.checkpoint),
        "image_size": size[0],
        "files": {
            "torch": str(TORCH_FILE),
            **{k: str(v) for k, v in OPENVINO_FILES.items()},
        },
        "openvino_outputs": outputs,
        "calibration": {
            "compression_type": "int8_ptq (nncf.quantize defaults)",
            "images": count,
            "train_images": n_train,
            "seed": args.seed,
            "names": calibration,
        },
        "export_seconds": seconds,
        "versions": versions(),
    }
    (args.export_dir / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "calibration"}, indent=2))
    print(f"calibrated on {count} of {n_train} train/good images")


# ------------------------------------------------------------------------------------- measure


def load_inferencer(path: str, export_dir: Path, threads: int, workdir: Path) -> tuple[Any, dict]:
    """anomalib's inferencer for path, and for OpenVINO what was asked and what it compiled to."""
    if path == "torch":
        from anomalib.deploy import TorchInferencer

        os.environ["TRUST_REMOTE_CODE"] = "1"  # our own pickled export
        return TorchInferencer(export_dir / TORCH_FILE, device="cpu"), {}
    from anomalib.deploy import OpenVINOInferencer

    export, precision = OPENVINO_PATHS[path]
    config = {
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": precision,
    }
    with contextlib.chdir(workdir):  # the inferencer writes ./openvino_cache
        inferencer = OpenVINOInferencer(
            export_dir / OPENVINO_FILES[export], device="CPU", config=config
        )
    compiled = inferencer.model
    reported = {}
    for key in (*config, "NUM_STREAMS", "ENABLE_CPU_PINNING", "ENABLE_HYPER_THREADING"):
        with contextlib.suppress(Exception):
            value = compiled.get_property(key)
            reported[key] = value.to_string() if hasattr(value, "to_string") else str(value)
    outputs = sorted(name for o in compiled.outputs for name in o.get_names())
    return inferencer, {"requested": config, "reported": reported, "outputs": outputs}


def outputs_of(prediction: Any, batch: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (B,), maps (B, H, W)) as float32 numpy from an ImageBatch or NumpyImageBatch."""
    score, amap = prediction.pred_score, prediction.anomaly_map
    if isinstance(score, torch.Tensor):
        score, amap = score.numpy(), amap.numpy()
    amap = np.asarray(amap, np.float32)
    return np.asarray(score, np.float32).reshape(batch), amap.reshape(batch, *amap.shape[-2:])


def measure(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    info = json.loads((args.export_dir / "export.json").read_text())
    size = info["image_size"]
    resize = Resize((size, size), antialias=True)  # as in training and anomalib_runner.py
    from anomalib.data.utils import read_image

    def load(path: Path) -> torch.Tensor:
        return resize(read_image(path, as_tensor=True))

    inferencer, openvino_config = load_inferencer(
        args.path, args.export_dir, args.threads, args.out
    )
    grad = torch.inference_mode() if args.path == "torch" else contextlib.nullcontext()
    paths = benchkit.spread_subset(benchkit.test_images(args.data), args.limit)
    n = len(paths)
    with grad:
        outputs, latencies, single_seconds = benchkit.time_one_at_a_time(
            lambda path: outputs_of(inferencer.predict(load(path)), 1), paths
        )
        batch_scores = np.empty(n, np.float32)
        size_b = args.batch_size
        inferencer.predict(torch.stack([load(p) for p in paths[:size_b]]))  # warm-up
        model_seconds = 0.0
        loop_start = time.perf_counter()
        for start in range(0, n, size_b):
            chunk = paths[start : start + size_b]
            batch = torch.stack([load(p) for p in chunk])
            t0 = time.perf_counter()
            batch_scores[start : start + len(chunk)] = outputs_of(
                inferencer.predict(batch), len(chunk)
            )[0]
            model_seconds += time.perf_counter() - t0
        batch_seconds = time.perf_counter() - loop_start
    peak_rss = benchkit.peak_rss_mb()  # before the maps are copied into one array, as for stpm
    scores = np.concatenate([score for score, _ in outputs])
    maps = np.concatenate([anomaly_map for _, anomaly_map in outputs])

    map_max = maps.reshape(n, -1).max(axis=1)
    score_vs_map = float(np.max(np.abs(scores - map_max) / np.maximum(np.abs(map_max), 1e-12)))
    batch_vs_single = float(np.max(np.abs(batch_scores - scores) / np.maximum(scores, 1e-12)))
    benchkit.save_maps(args.out / "maps.npz", args.data, paths, maps, scores, latencies[1:])
    result = {
        "path": args.path,
        "test_images": n,
        **benchkit.latency_summary(latencies),
        "inference_images_per_second": n / single_seconds,
        "batch_size": size_b,
        "batches": math.ceil(n / size_b),
        "batch_images_per_second": n / batch_seconds,
        "batch_model_images_per_second": n / model_seconds,
        "peak_rss_mb": peak_rss,
        "threads": args.threads,
        "torch_threads": torch.get_num_threads(),
        "compiled_precision": openvino_config.get("reported", {}).get("INFERENCE_PRECISION_HINT"),
        "openvino_config": openvino_config,
        "image_size": size,
        "map_shape": list(maps.shape[1:]),
        "check_score_vs_map_max_rel": score_vs_map,
        "check_batch_vs_single_score_max_rel": batch_vs_single,
        "export": {k: info[k] for k in ("checkpoint", "files", "export_seconds")}
        | {"calibration_images": info["calibration"]["images"]},
        "versions": versions(),
        "cpu": benchkit.cpu_info(),
        "notes": {
            "outputs": "raw: anomaly_map (B,1,S,S) = Stfpm's product of per-layer maps, upsampled; "
            "pred_score = its max; no post-processor, no normalisation, no thresholds",
            "input": "read_image (RGB float [0,1]) + torchvision Resize((S,S), antialias=True) "
            "outside the model; the export's own Resize (no antialias) + ImageNet Normalize are "
            "in the graph (the Resize is a no-op at S x S)",
            "single": "batch 1: a timed first call after loading (first_call_ms), one untimed "
            "warm-up, then every image; latency = read + resize + predict + outputs to numpy; "
            "median and p99 over the loop; inference_images_per_second = images / loop time",
            "batch": "batches of batch_size (last one partial), one untimed warm-up batch; "
            "batch_images_per_second includes read + resize + stack, "
            "batch_model_images_per_second counts predict (+ outputs to numpy) only",
            "torch": "TorchInferencer.predict under torch.inference_mode()",
            "peak_rss_mb": "VmHWM of this process, including torch/anomalib imports and the "
            "N x S x S float32 maps kept for maps.npz",
        },
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("notes", "cpu")}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", action="store_true", help="export the checkpoint first")
    parser.add_argument("--path", choices=PATHS, help="the inference path to measure")
    parser.add_argument("--export-dir", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="MVTec-layout folder")
    parser.add_argument("--checkpoint", type=Path, help="--export: anomalib Stfpm .ckpt")
    parser.add_argument("--teacher-weights", type=Path, help="--export: timm state dict")
    parser.add_argument("--calibration-images", type=int, default=NNCF_SUBSET_SIZE)
    parser.add_argument("--image-size", type=int, help="--export: check the checkpoint's size")
    parser.add_argument("--seed", type=int, default=0, help="--export: calibration sample")
    parser.add_argument("--out", type=Path, help="--path: output folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=benchkit.BATCH_SIZE)
    parser.add_argument("--limit", type=int, help="--path: N test images spread over the set")
    args = parser.parse_args()
    if not (args.export or args.path):
        parser.error("nothing to do: give --export and/or --path")
    if args.export and not (args.checkpoint and args.teacher_weights):
        parser.error("--export needs --checkpoint and --teacher-weights")
    if not 1 <= args.calibration_images <= NNCF_SUBSET_SIZE:
        parser.error(f"--calibration-images must be 1..{NNCF_SUBSET_SIZE} (nncf's subset_size)")
    if args.path and not args.out:
        parser.error("--path needs --out")
    for name in ("export_dir", "data", "checkpoint", "teacher_weights", "out"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).resolve())
    torch.set_num_threads(args.threads)
    if args.export:
        args.export_dir.mkdir(parents=True, exist_ok=True)
        export(args)
    if args.path:
        args.out.mkdir(parents=True, exist_ok=True)
        measure(args)


if __name__ == "__main__":
    main()
