"""ONNX export and INT8 quantisation: the fast CPU path (stpm.runtime runs the files).

`export_model(model, out, data, int8=...)` is the whole recipe `stpm-export` runs, and every
script and test that wants the file `stpm-export` writes: the graph, INT8 quantisation, the INT8
refit, and the check against the torch model.

One graph takes normalised images (B, 3, H, W) and returns the anomaly map (B, 1, H, W), the
image score (B,), the image-level term in it (B,) and, with an image model, that model's input,
the teacher's pooled features (B, D): teacher, student, map arithmetic and the image-level model
all inside, batch size dynamic. Everything else prediction needs (threshold, normalisation,
input size) travels in the file's metadata, so `STPM.load("model.onnx")` needs neither the .pt
file nor the teacher's weights.

INT8 is static post-training quantisation (ONNX Runtime's quantize_static), calibrated on
defect-free training images, CALIBRATION_CHUNK at a time (the activations of all of them at once
took 9 GB). Only convolutions and the ReLU6 clips after them are quantised (a clip fused into its
convolution's output range); the map arithmetic (normalise, subtract, square, upsample, multiply)
and the image term stay FP32: the map is a small difference of two large feature vectors, and 8
bits of it would be noise. Activation ranges are the 99.999th percentile of the calibration
images, not their extremes. The image term and threshold are then fitted again on the quantised
file's own features (refit_int8).

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

import contextlib
import dataclasses
import io
import json
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import calibration, data, runs, runtime, scoring
from .errors import StpmError
from .files import atomic_write
from .model import AnomalyMapModel
from .modelfile import ONNX_METADATA_KEY, ModelDescription, onnx_metadata
from .networks import fixed_same_padding

OPSET = 17
CALIBRATIONS = ("percentile", "minmax", "entropy")
CALIBRATION_IMAGES = 64  # train/good images to calibrate INT8 on and check the export with
CALIBRATION_CHUNK = 8  # images whose activations are held at once while calibrating
IMAGE_MODEL_TENSORS = "image_model."  # the graph's initialisers of the image model


@dataclass
class Exported:
    """What export_model wrote and found."""

    path: Path
    check: dict | None  # compare()'s figures against the torch model, if checked
    int8: dict | None = None  # quantize_int8's settings, refitted: True
    threshold_before: float | None = None  # the FP32 model's threshold, before the INT8 refit
    threshold: float | None = None  # the file's own threshold


def export_model(
    model: str | Path | runtime.TorchRuntime,
    out: str | Path,
    category: str | Path | None = None,
    int8: bool = False,
    images: int = CALIBRATION_IMAGES,
    reduce_range: bool | None = None,
    calibration: str = "percentile",
    symmetric: bool = False,
    keep_fp32: Sequence[str] = (),
    check: bool = True,
) -> Exported:
    """A trained model (a .pt file, or the TorchRuntime of a loaded one: STPM.runtime_) as one
    ONNX file at out: FP32, or with int8 quantised (quantize_int8's options), its image term and
    threshold fitted again on its own features (refit_int8); with check, compared with the torch
    model (compare).

    category: the folder whose train/good images calibrate and check it (default: the data
    folder the run's config.json records, stpm.runs.recorded_data); images: how many of them.
    """
    source = model if isinstance(model, runtime.TorchRuntime) else runtime.load_torch(model, "cpu")
    if category is None and (int8 or check):
        if isinstance(model, runtime.TorchRuntime):
            raise StpmError("name the category to calibrate and check the export on")
        category = runs.recorded_data(Path(model))
    out = Path(out)
    description = source.description
    samples = None
    if int8 or check:
        samples = calibration_images(
            Path(category), tuple(description.image_size), images, description.resize_mode
        )
    if not int8:
        export_onnx(source.model, description, out)
        return Exported(out, compare(source, runtime.OnnxRuntime(out), samples) if check else None)
    with tempfile.TemporaryDirectory() as folder:
        fp32 = export_onnx(source.model, description, Path(folder) / "fp32.onnx")
        quantize_int8(
            fp32, out, samples, description.mean, description.std, reduce_range,
            calibration, symmetric, keep_fp32,
        )  # fmt: skip
    refit = refit_int8(out, Path(category))
    exported = runtime.OnnxRuntime(out)
    checked = compare(source, exported, samples) if check else None
    return Exported(out, checked, exported.description.int8, description.threshold, refit)


def export_onnx(model: AnomalyMapModel, description: ModelDescription, path: str | Path) -> Path:
    """Write model as one ONNX graph, description in its metadata (atomically).

    The graph: normalised images (B, 3, H, W) -> anomaly maps (B, 1, H, W), scores (B,) and
    image terms (B,); with an image model also its input, pooled features (B, D).
    """
    import onnx

    size = model.settings.size
    network = fixed_same_padding(model.network, size)
    features = model.image_model is not None
    graph = AnomalyMapModel(network, model.settings, model.image_model, features).eval()
    outputs = [runtime.MAP, "score", runtime.TERM] + ([runtime.POOLED] if features else [])
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
                output_names=outputs,
                dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
                opset_version=OPSET,
                dynamo=False,
            )
        exported = onnx.load(str(raw))
    entry = exported.metadata_props.add()
    entry.key, entry.value = onnx_metadata(description)
    return atomic_write(path, lambda temporary: onnx.save(exported, str(temporary)))


def calibration_images(
    category: Path, size: tuple[int, int], count: int = CALIBRATION_IMAGES, mode: str = "squash"
) -> np.ndarray:
    """count train/good images of category spread evenly over the folder, decoded and resized
    as the model resizes them: uint8 (N, H, W, 3). What INT8 is calibrated on and the export is
    checked against."""
    paths = data.train_images(category)
    step = max(1, len(paths) // max(1, count))
    return data.load_resized(paths[::step][:count], size, "calibrating", mode)


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
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

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
    reader = _CalibrationReader(calibration_images, mean, std)
    with tempfile.TemporaryDirectory() as folder:
        prepared, quantized = Path(folder) / "prepared.onnx", Path(folder) / "int8.onnx"
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        with contextlib.redirect_stdout(io.StringIO()):  # its progress notes, once per chunk
            quantize_static(
                str(prepared),
                str(quantized),
                reader,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv", "Clip"],
                nodes_to_exclude=excluded,
                calibrate_method=methods[calibration],
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                extra_options={
                    "ActivationSymmetric": symmetric,
                    "CalibStridedMinMax": reader.chunk,
                },
            )
        model = onnx.load(str(quantized))
    settings = {
        "reduce_range": reduce_range,
        "calibration": calibration,
        "symmetric": symmetric,
        "keep_fp32": list(keep_fp32),
    }
    return _save_with_metadata(model, _metadata(original), target, int8=settings)


class _CalibrationReader:
    """ONNX Runtime's CalibrationDataReader over uint8 images, one image per batch (percentile
    statistics need equal shapes), read in chunks of CALIBRATION_CHUNK: quantize_static's
    calibrator then keeps one chunk's activations at a time (its "strided" collection), where
    all images' at once took 9 GB for the default model."""

    def __init__(self, images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> None:
        self.images, self.mean, self.std = images, mean, std
        # the calibrator asks for chunks that divide the images evenly
        self.chunk = max(c for c in range(1, CALIBRATION_CHUNK + 1) if len(images) % c == 0)
        self.set_range(0, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.next, self.end = start_index, end_index

    def get_next(self) -> dict | None:
        if self.next >= self.end:
            return None
        self.next += 1
        image = self.images[self.next - 1 : self.next]
        return {"images": scoring.normalize(image, self.mean, self.std)}


def refit_int8(path: str | Path, category: Path) -> float | None:
    """Fit a quantised file's image term and threshold anew on its own outputs, in place;
    returns its new threshold.

    The image term is a Mahalanobis distance of the teacher's pooled features; INT8 shifts those
    features by a bias it repeats on every image, which the distance reads as an anomaly (term
    correlation with FP32 0.96 on Magnetic Tile, image AUROC -2.5 points, while the map lost
    nothing: scripts/results/int8_variants.md). So the Gaussian is fitted again, as training
    fits it (the same training and validation images, stpm.calibration), on the features the
    quantised teacher computes, and the threshold on the file's own validation scores.
    """
    import onnx
    from onnx import numpy_helper

    quantised = runtime.OnnxRuntime(path)
    description = quantised.description
    train, validation = calibration.split_validation(
        data.train_images(category),
        description.settings["validation_fraction"],
        description.settings["seed"],
    )
    features = description.image_model is not None
    maxima, validation_pooled = _maxima_and_pooled(quantised, validation, features)
    model = onnx.load(str(path))
    if features:
        _, train_pooled = _maxima_and_pooled(quantised, train, features)
        gaussian, scores = calibration.fit_image_model(train_pooled, validation_pooled, maxima)
        replaced = {IMAGE_MODEL_TENSORS + k: v for k, v in gaussian.state_dict().items()}
        for index, tensor in enumerate(model.graph.initializer):
            if tensor.name in replaced:
                value = replaced[tensor.name].float().numpy()
                model.graph.initializer[index].CopyFrom(numpy_helper.from_array(value, tensor.name))
    else:
        scores = scoring.image_scores(maxima, np.zeros(len(maxima)))
    calibrated = calibration.calibrate(scores, description.max_false_alarms)
    refitted = dataclasses.replace(
        description,
        validation=calibrated.validation(),
        threshold=calibrated.threshold,
        int8={**(description.int8 or {}), "refitted": True},
    )
    metadata = [(key, value) for key, value in _metadata(model) if key != ONNX_METADATA_KEY]
    _save_with_metadata(model, [*metadata, onnx_metadata(refitted)], path)
    return calibrated.threshold


def _maxima_and_pooled(
    quantised: runtime.Runtime, paths: list[Path], pooled: bool, batch_size: int = 16
) -> tuple[np.ndarray, np.ndarray | None]:
    """The student's scores (each map's maximum, scored as prediction scores it) and, with
    pooled, the teacher's pooled features of the images at paths: (N,), (N, D)."""
    description = quantised.description
    size, mode = tuple(description.image_size), description.resize_mode
    images = data.load_resized(paths, size, "refitting INT8", mode)
    shapes = [scoring.image_shape(path) for path in paths]
    maxima, features = [], []
    for start in range(0, len(paths), batch_size):
        part = slice(start, start + batch_size)
        outputs = scoring.run_resized(quantised, images[part], shapes[part], pooled=pooled)
        maxima.append(scoring.map_maxima(outputs.maps))
        features.append(outputs.pooled)
    return np.concatenate(maxima), np.concatenate(features) if pooled else None


def _metadata(model) -> list[tuple[str, str]]:
    return [(entry.key, entry.value) for entry in model.metadata_props]


def _save_with_metadata(model, metadata: list[tuple[str, str]], target, **changes) -> Path:
    """Save model atomically with metadata; changes update fields of the stpm description."""
    import onnx

    del model.metadata_props[:]
    for key, value in metadata:
        if key == ONNX_METADATA_KEY and changes:
            value = json.dumps({**json.loads(value), **changes})
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return atomic_write(target, lambda temporary: onnx.save(model, str(temporary)))


def compare(reference, exported, images: np.ndarray, batch_size: int = 8) -> dict:
    """How far an exported runtime's maps and scores are from a reference runtime's (both
    stpm.runtime), scored by stpm.scoring on uint8 images (N, H, W, 3) at the input size."""
    if len(images) == 0:
        raise StpmError("no images to compare the export on")
    found = {}
    for name, run in (("ours", reference), ("theirs", exported)):
        outputs = [
            scoring.run_resized(run, images[start : start + batch_size])
            for start in range(0, len(images), batch_size)
        ]
        maps = np.concatenate([output.maps for output in outputs])
        terms = np.concatenate([output.terms for output in outputs])
        found[name] = maps, scoring.image_scores(maps, terms)
    (ours, our_scores), (theirs, their_scores) = found["ours"], found["theirs"]
    return {
        "images": len(images),
        "max_abs_map_difference": float(np.abs(ours - theirs).max()),
        "max_abs_score_difference": float(np.abs(our_scores - their_scores).max()),
        "map_correlation": float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]),
        "largest_score": float(our_scores.max()),
    }
