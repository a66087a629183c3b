"""ONNX export and INT8 quantisation: the fast CPU path (stpm.runtime runs the files).

One graph takes normalised images (B, 3, H, W) and returns the anomaly map (B, 1, H, W), the
image score (B,) and the image-level term in it (B,): teacher, student, map arithmetic and the
image-level model (if any) all inside, batch size dynamic.
Everything else prediction needs (threshold, normalisation, input size) travels in the file's
metadata, so `STPM.load("model.onnx")` needs neither the .pt file nor the teacher's weights.

INT8 is static post-training quantisation (ONNX Runtime's quantize_static), calibrated on
defect-free training images. Only convolutions and the ReLU6 clips after them are quantised
(a clip fused into its convolution's output range); the map arithmetic (normalise, subtract,
square, upsample, multiply) and the image term stay FP32: the map is a small difference of two
large feature vectors, and 8 bits of it would be noise. Activation ranges are the 99.999th
percentile of the calibration images, not their extremes. The image term and threshold are then
fitted again on the quantised file's own features (stpm.compress.refit_on_int8).

Chosen by measurement (scripts/results/int8_variants.md; the default model, all 583 Magnetic
Tile test images, a CPU with VNNI): percentile ranges beat min-max, entropy and symmetric
activations; the map survives INT8 (map maximum alone 0.924 against 0.920 in FP32, map
correlation 0.990), the image term did not until refitted (image AUROC 0.930, refitted 0.956,
FP32 0.955). The teacher, not the student, carries the error: keeping the teacher in FP32 keeps
the term, keeping the student or the stride-32 blocks in FP32 changes nothing. reduce_range
(7-bit weights) is for CPUs without VNNI, where 8-bit multiply-adds saturate; on a CPU with VNNI
it only costs precision (image AUROC 0.850), so the default is what the exporting CPU needs.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from . import data, runtime
from .errors import StpmError
from .files import atomic_write
from .model import AnomalyMapModel
from .modelfile import ONNX_METADATA_KEY, ModelDescription, onnx_metadata
from .networks import fixed_same_padding

OPSET = 17


def export_onnx(model: AnomalyMapModel, description: ModelDescription, path: str | Path) -> Path:
    """Write model as one ONNX graph, description in its metadata (atomically).

    The graph: normalised images (B, 3, H, W) -> anomaly maps (B, 1, H, W), scores (B,) and
    image terms (B,).
    """
    import onnx

    size = model.settings.size
    network = fixed_same_padding(model.network, size)
    graph = AnomalyMapModel(network, model.settings, model.image_model).eval()
    example = torch.zeros((1, 3, *size))
    with tempfile.TemporaryDirectory() as folder:
        raw = Path(folder) / "model.onnx"
        with warnings.catch_warnings():  # the TorchScript exporter announces its deprecation
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                (example,),
                str(raw),
                input_names=["images"],
                output_names=["anomaly_map", "score", "image_term"],
                dynamic_axes={
                    "images": {0: "batch"},
                    "anomaly_map": {0: "batch"},
                    "score": {0: "batch"},
                    "image_term": {0: "batch"},
                },
                opset_version=OPSET,
                dynamo=False,
            )
        exported = onnx.load(str(raw))
    entry = exported.metadata_props.add()
    entry.key, entry.value = onnx_metadata(description)
    return atomic_write(path, lambda temporary: onnx.save(exported, str(temporary)))


def calibration_images(
    category: Path, size: tuple[int, int], count: int = 64, resize_mode: str = "squash"
) -> np.ndarray:
    """count train/good images of category spread evenly over the folder, decoded and resized
    as the model resizes them: uint8 (N, H, W, 3). What INT8 is calibrated on and the export is
    checked against."""
    paths = data.train_images(category)
    step = max(1, len(paths) // max(1, count))
    return data.load_resized(paths[::step][:count], size, "calibrating", resize_mode).numpy()


CALIBRATIONS = ("percentile", "minmax", "entropy")


def quantize_int8(
    source: str | Path,
    target: str | Path,
    calibration_images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    reduce_range: bool | None = None,
    calibration: str = "percentile",
    symmetric: bool = False,
    keep_fp32: Sequence[str] = (),
) -> Path:
    """Static INT8 (QDQ, per-channel weights) of source's convolutions, calibrated on
    uint8 images (N, H, W, 3) of defect-free parts; metadata carried over, with the settings
    below recorded under "int8" in the description.

    reduce_range: 7-bit weights, for CPUs without VNNI, whose 8-bit multiply-adds saturate
    (None: what this CPU needs). calibration: how activation ranges are found ("percentile":
    the 99.999th percentile; "minmax"; "entropy"). symmetric: signed activations with zero point
    0. keep_fp32: node-name prefixes left in FP32 (e.g. "/network/teacher/").
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            # one image per batch: percentile statistics need equal shapes
            self.batches = iter(np.split(calibration_images, len(calibration_images)))

        def get_next(self):
            batch = next(self.batches, None)
            if batch is None:
                return None
            return {"images": data.normalize(batch, mean, std)}

    if calibration not in CALIBRATIONS:
        raise StpmError(f"unknown calibration {calibration!r}; use {', '.join(CALIBRATIONS)}")
    if reduce_range is None:
        reduce_range = not runtime.has_vnni()
    methods = {
        "percentile": CalibrationMethod.Percentile,
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
    }
    original = onnx.load(str(source), load_external_data=False)
    excluded = [
        node.name
        for node in original.graph.node
        if any(node.name.startswith(prefix) for prefix in keep_fp32)
    ]
    with tempfile.TemporaryDirectory() as folder:
        prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv", "Clip"],
            nodes_to_exclude=excluded,
            calibrate_method=methods[calibration],
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": symmetric},
        )
        model = onnx.load(str(quantized))
    description = json.loads(dict(_metadata(original))[ONNX_METADATA_KEY])
    description["int8"] = {
        "reduce_range": reduce_range,
        "calibration": calibration,
        "symmetric": symmetric,
        "keep_fp32": list(keep_fp32),
    }
    del model.metadata_props[:]
    for key, value in _metadata(original):
        entry = model.metadata_props.add()
        entry.key = key
        entry.value = json.dumps(description) if key == ONNX_METADATA_KEY else value
    return atomic_write(target, lambda temporary: onnx.save(model, str(temporary)))


def _metadata(model) -> list[tuple[str, str]]:
    return [(entry.key, entry.value) for entry in model.metadata_props]


def compare(reference, exported, images: np.ndarray, mean, std, batch_size: int = 8) -> dict:
    """How far an exported runtime's maps are from a reference runtime's (both stpm.runtime),
    on uint8 images (N, H, W, 3) at the input size."""
    if len(images) == 0:
        raise StpmError("no images to compare the export on")
    ours, theirs, our_terms, their_terms = [], [], [], []
    for start in range(0, len(images), batch_size):
        batch = data.normalize(images[start : start + batch_size], mean, std)
        for maps, terms, run in ((ours, our_terms, reference), (theirs, their_terms, exported)):
            batch_maps, batch_terms = run(batch)
            maps.append(batch_maps)
            terms.append(batch_terms)
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    our_scores = ours.reshape(len(ours), -1).max(axis=1) + np.concatenate(our_terms)
    their_scores = theirs.reshape(len(theirs), -1).max(axis=1) + np.concatenate(their_terms)
    return {
        "images": len(images),
        "max_abs_map_difference": float(np.abs(ours - theirs).max()),
        "max_abs_score_difference": float(np.abs(our_scores - their_scores).max()),
        "map_correlation": float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]),
        "largest_score": float(our_scores.max()),
    }
