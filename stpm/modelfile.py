"""The model description and the model file: one schema for `model.pt` and the ONNX metadata.

A model file is one torch file of plain tensors, numbers and strings (the description's fields,
plus "student": the student's state dict), so it loads with `torch.load(weights_only=True)`:
a crafted pickle cannot run code. An ONNX export carries the same description, without the
student, as JSON in its metadata.

Format versions (a reader accepts every version up to its own and fills in what is missing):
  1  stpm 0.1: the fields below except student_kind
  2  stpm 0.2: student_kind (the student's architecture; "same" = the teacher's) and
     max_false_alarms (the threshold as a quantile of the validation scores), resize_mode
     ("squash" or "letterbox": how an image of another shape meets image_size), distance
     ("cosine" or "standardized"; a standardized student carries its FeatureScale) and
     image_model ("gaussian": the file's "image_model_weights" entry holds its tensors)
  3  stpm 0.3: pruning (None, or what stpm-compress did: the student's tensors carry the
     pruned shapes), shared_layers (the student's modules that are the teacher's own, e.g. its
     stem; the file keeps a copy, loading uses the teacher's) and, in ONNX metadata only, int8
     (how the file was quantised: reduce_range, calibration, ...)
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import StpmError
from .files import atomic_write
from .settings import ALWAYS, SETTINGS, MapSettings
from .version import __version__

if TYPE_CHECKING:
    import torch

FORMAT = "stpm-model"
FORMAT_VERSION = 3
ONNX_METADATA_KEY = "stpm"
IMAGE_MODEL_KEY = "image_model_weights"  # beside "student": the image-level model's tensors
# what a file written before a setting existed was trained with (stpm.settings.Setting.before),
# by where the description keeps it: at the top, or in its "settings"
BEFORE = {s.described: s.before for s in SETTINGS if s.before is not ALWAYS}


@dataclass
class ModelDescription:
    """Everything needed to rebuild and run a trained model, except the weights themselves."""

    backbone: str
    strides: list[int]
    out_indices: list[int]
    image_size: list[int]  # (height, width) of the network's input
    mean: list[float]  # the teacher's input normalisation, per RGB channel, in [0, 1] units
    std: list[float]
    combine: str
    smoothing_sigma: float
    teacher: dict  # source (where the weights came from) and sha256 (of their tensors)
    validation: dict  # scores, mean, std of defect-free validation images; threshold_rule
    threshold: float | None
    settings: dict  # the training settings
    student_kind: str  # the setting "student": same, slim or a timm CNN name
    max_false_alarms: float | None  # the threshold rule: None for mean + 3 std
    resize_mode: str  # how images become image_size: "squash" or "letterbox"
    distance: str  # how a level's features are compared (stpm.model.layer_distances)
    image_model: str | None  # "gaussian": an image-level term in the score (stpm.gaussian)
    history: list[dict] = field(default_factory=list)  # per epoch: loss, validation_loss, ...
    best_epoch: int | None = None
    pruning: dict | None = None  # stpm.compress: ratio, parameters before and after, epochs
    shared_layers: list[str] = field(default_factory=list)  # the student's modules = teacher's
    int8: dict | None = None  # ONNX files only: stpm.export.quantize_int8's settings

    def map_settings(self) -> MapSettings:
        size = tuple(self.image_size)
        return MapSettings(size, self.combine, float(self.smoothing_sigma), self.distance)

    def to_dict(self) -> dict:
        """Plain numbers, strings, lists and dicts, with the format's name and version first."""
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "stpm_version": __version__,
            **dataclasses.asdict(self),
        }

    @classmethod
    def from_dict(cls, state: dict, path: str | Path) -> ModelDescription:
        """Validate a file's description (ours, complete, not from a newer stpm) and upgrade it."""
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise StpmError(f"{path} is not an stpm model file")
        version = state.get("format_version", 0)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise StpmError(
                f"{path} was written by a newer stpm ({state.get('stpm_version')}); upgrade stpm"
            )
        state = {**{key: value for key, value in BEFORE.items() if "." not in key}, **state}
        if isinstance(state.get("settings"), dict):  # trained before the objectives existed
            older = {key[9:]: value for key, value in BEFORE.items() if key.startswith("settings.")}
            state["settings"] = {**older, **state["settings"]}
        names = {item.name for item in dataclasses.fields(cls)}
        required = {item.name for item in dataclasses.fields(cls) if _required(item)}
        missing = sorted(required - set(state))
        if missing:
            raise StpmError(f"{path} is an incomplete stpm model file (no {', '.join(missing)})")
        return cls(**{name: value for name, value in state.items() if name in names})


def _required(item: dataclasses.Field) -> bool:
    return item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING


def load_untrusted(path: Path, what: str):
    """torch.load with weights_only=True: plain tensors and containers, never arbitrary code.

    Garbage makes torch's restricted unpickler fail in many ways (IndexError, KeyError, ...),
    so any exception here means the same thing to the user: not a readable file of ours.
    """
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unusual pickle protocol" noise on garbage input
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise StpmError(f"{path} is not a readable {what}: {_why_unreadable(error)}") from None


def _why_unreadable(error: Exception) -> str:
    """torch's reason, in a few words of ours (its own runs to a page of advice)."""
    if "Unsupported global" in str(error):
        return "it holds Python objects besides tensors, which could run code, so it is not loaded"
    if isinstance(error, EOFError) or "central directory" in str(error):
        return "the file is empty or cut short"
    return "not a file torch.save wrote (a text file, an image, another format)"


def read_model_file(
    path: str | Path,
) -> tuple[ModelDescription, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """A `.pt` model file's description, the student's state dict and the image-level model's
    (None without one)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise StpmError(f"model file not found: {path}")
    state = load_untrusted(path, "stpm model file")
    description = ModelDescription.from_dict(state, path)
    student = state.get("student")
    if not isinstance(student, dict) or not all(
        isinstance(value, torch.Tensor) for value in student.values()
    ):
        raise StpmError(f"{path} is an incomplete stpm model file (no student weights)")
    image_model = state.get(IMAGE_MODEL_KEY)
    if (description.image_model is None) != (image_model is None) or not all(
        isinstance(value, torch.Tensor) for value in (image_model or {}).values()
    ):
        raise StpmError(f"{path} is an incomplete stpm model file (its image model)")
    return description, student, image_model


def write_model_file(
    path: str | Path,
    description: ModelDescription,
    student: dict[str, torch.Tensor],
    image_model: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model file atomically (a crash leaves the old file or the new one)."""
    import torch

    state = {
        **description.to_dict(),
        "student": {name: tensor.detach().cpu() for name, tensor in student.items()},
    }
    if image_model is not None:
        state[IMAGE_MODEL_KEY] = {
            name: tensor.detach().cpu() for name, tensor in image_model.items()
        }
    return atomic_write(path, lambda temporary: torch.save(state, temporary))


def onnx_metadata(description: ModelDescription) -> tuple[str, str]:
    """(key, value) of the ONNX metadata entry that carries the description."""
    return ONNX_METADATA_KEY, json.dumps(description.to_dict())


def description_from_onnx_metadata(metadata: dict[str, str], path: str | Path) -> ModelDescription:
    """The description an `stpm-export` file carries in its metadata."""
    if ONNX_METADATA_KEY not in metadata:
        raise StpmError(f"{path} is an ONNX file but not one written by stpm-export")
    try:
        state = json.loads(metadata[ONNX_METADATA_KEY])
    except json.JSONDecodeError:
        raise StpmError(f"{path}: its stpm metadata is not valid JSON") from None
    return ModelDescription.from_dict(state, path)
