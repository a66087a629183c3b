"""The settings a model is built, trained and scored with, the values each may take, and the check
of an estimator's arguments. Plain Python: every module, light or torch, reads them from here."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
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
    """Optimisation settings; every field is recorded in the run's config.json."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 0.4
    momentum: float = 0.9
    weight_decay: float = 1e-4
    validation_fraction: float = 0.1
    seed: int = 0
    denoise: float = 0.0  # share of training images the student sees corrupted (stpm.corruptions)
    hard_quantile: float | None = 0.99  # average only the distances at or above this quantile
    selection: str = "loss"  # keep the epoch of lowest validation "loss" or best "separation"


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
