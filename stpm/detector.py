"""The estimator users import: `STPM(...).fit(folder)`, `.predict(images)`, `.save`, `STPM.load`.

scikit-learn's conventions: every constructor argument is an attribute of the same name, stored
as given; `get_params`, `set_params` and `sklearn.base.clone` work; learned state lives in
attributes ending in `_`, set by `fit`, `load` and `set_map`. How the maps are computed is the
runtime's business (stpm.runtime): the estimator holds one in `runtime_` and never asks which.
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
from itertools import chain
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator

from . import data, distributed, networks, visualize, weights
from .errors import StpmError
from .files import atomic_write, atomic_write_text
from .gaussian import IMAGE_MODELS
from .model import AnomalyMapModel, MapSettings, StudentTeacher
from .modelfile import ModelDescription, load_untrusted, write_model_file
from .runtime import TorchRuntime, open_runtime, resolve_device
from .train import SELECTIONS, TrainSettings, seed_everything, train_student

CHECKPOINT = "checkpoint.pt"
# what a checkpoint written before these parameters existed was trained with
PARAMETERS_BEFORE_0_2 = {
    "student": "same",
    "resize_mode": "squash",
    "distance": "cosine",
    "image_model": None,
    "max_false_alarms": None,
    "denoise": 0.0,
    "hard_quantile": None,
    "selection": "loss",
}
THRESHOLD_SIGMAS = 3.0  # default threshold = mean + 3 std of defect-free validation scores


@dataclass
class Prediction:
    """The verdict on one image. anomaly_map and mask have the image's own (H, W)."""

    path: str | None
    score: float  # raw: max of the anomaly map at the model's input size (+ the image term)
    normalized_score: float  # in [0, 1]; 0 = typical good image, 0.5 = the threshold
    anomaly_map: np.ndarray  # (H, W) float32, per-pixel anomaly
    mask: np.ndarray  # (H, W) bool, pixels above the threshold
    is_anomalous: bool
    image: np.ndarray | None = field(default=None, repr=False)  # the decoded RGB, if asked for


class STPM(BaseEstimator):
    """Student-Teacher Feature Pyramid Matching anomaly detector.

    backbone: any timm CNN; the default has offline ImageNet weights (see stpm.weights).
    strides: the pyramid levels compared (the paper: 4, 8, 16 = ResNet's layer1..layer3).
    image_size: input (height, width) or one side. resize_mode: how an image of another shape
    becomes that size, 'squash' (stretched) or 'letterbox' (aspect kept, padded).
    combine: 'product' (the paper) or 'sum'. smoothing_sigma: Gaussian sigma in pixels of the
    input size, 0 for none. distance: how a level's features are compared, 'cosine' (the
    paper) or 'standardized' (squared error of per-channel standardized features, keeping their
    magnitude; stpm.model). image_model: None, or 'gaussian' to add an image-level term to each
    score (a Gaussian of the teacher's pooled features, stpm.gaussian; the map stays the
    student's). student: 'same' as the teacher, 'slim' (an EfficientNet-Lite teacher at half
    its width) or a timm CNN name (stpm.networks). share_stem: the student reuses the teacher's
    frozen stem where their stems are alike (stpm.networks.share_stem): run once, not twice.
    max_false_alarms: the share of defect-free images the threshold may reject (0.01: the 99th
    percentile of the validation scores); None for mean + 3 std of those scores.

    Training objectives (stpm.train): denoise, the share of training images the student sees
    corrupted (stpm.corruptions) while matching the teacher's features of the clean image;
    hard_quantile, average only the distances at or above that quantile (EfficientAD), None for
    the paper's mean; selection, keep the epoch of lowest validation 'loss' or the one that best
    separates validation images from corrupted copies ('separation'). threads: CPU threads for
    prediction (and torch's training), None for stpm.runtime.default_threads().

    The map's defaults (strides 8, 16, 32, product, sigma 4) come from
    scripts/results/ablation.md; the student's (slim, hard_quantile 0.99) and the image model's
    from scripts/results/students.md: on Magnetic Tile the student alone scores image AUROC 0.92
    (the paper's settings: 0.76), 0.95 with the image term, for 1.35 GFLOP per 256 px image.
    Why each: README.md, "Defaults and why".
    """

    def __init__(
        self,
        backbone: str = weights.DEFAULT_BACKBONE,
        strides: Sequence[int] = (8, 16, 32),
        image_size: int | Sequence[int] = 256,
        resize_mode: str = "squash",
        combine: str = "product",
        smoothing_sigma: float = 4.0,
        distance: str = "cosine",
        image_model: str | None = "gaussian",
        student: str = "slim",
        share_stem: bool = False,
        max_false_alarms: float | None = None,
        epochs: int = 20,
        batch_size: int = 32,
        learning_rate: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        validation_fraction: float = 0.1,
        seed: int = 0,
        denoise: float = 0.0,
        hard_quantile: float | None = 0.99,
        selection: str = "loss",
        teacher_weights: str | None = None,
        device: str = "auto",
        threads: int | None = None,
    ) -> None:
        self.backbone = backbone
        self.strides = strides
        self.image_size = image_size
        self.resize_mode = resize_mode
        self.combine = combine
        self.smoothing_sigma = smoothing_sigma
        self.distance = distance
        self.image_model = image_model
        self.student = student
        self.share_stem = share_stem
        self.max_false_alarms = max_false_alarms
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.validation_fraction = validation_fraction
        self.seed = seed
        self.denoise = denoise
        self.hard_quantile = hard_quantile
        self.selection = selection
        self.teacher_weights = teacher_weights
        self.device = device
        self.threads = threads

    # ------------------------------------------------------------------ training

    def fit(
        self,
        folder: str | Path,
        run_dir: str | Path | None = None,
        resume: dict | None = None,
        init: dict[str, torch.Tensor] | None = None,
    ) -> STPM:
        """Train on folder/train/good (an MVTec-style category).

        With run_dir, a checkpoint is written there after every epoch (atomically), and the
        model file, config.json and loss curve at the end. resume: a checkpoint to continue.
        init: the student's starting weights instead of random ones, e.g. a trained student
        pruned to other shapes (stpm.compress): a fine-tune.

        Under torchrun every process calls fit the same way and trains one student with
        DistributedDataParallel (stpm.train.train_student); rank 0 alone writes run_dir.
        """
        folder = Path(folder)
        settings, map_settings = self._check_settings()
        world = distributed.join()
        paths = distributed.check_everywhere(lambda: data.train_images(folder), world)
        self.data_warnings_ = data.check_category(folder).warnings
        for message in self.data_warnings_ if world.main else ():
            warnings.warn(f"{folder}: {message}", stacklevel=2)
        seed_everything(self.seed)  # the student's random initial weights included
        device = distributed.local_device(resolve_device(self.device), world)
        self.world_size_, self.backend_ = world.size, distributed.backend(device, world)
        if self.threads:
            torch.set_num_threads(self.threads)
        network = self._build_network(map_settings.size)
        for start in (init, resume and resume["student"]):
            if start:  # a pruned student's shapes first, its weights (init) now or in training
                networks.resize_like(network.student, start)
        if init is not None:
            network.student.load_state_dict(init)
        self.shared_layers_ = []
        if self.share_stem:
            self.shared_layers_ = networks.share_stem(network.student, network.teacher)
            if not self.shared_layers_:
                raise StpmError(
                    f"the {self.student} student's stem differs from the {self.backbone} "
                    "teacher's: nothing to share; train without share_stem (--share-stem)"
                )
        result = train_student(
            network.to(device),
            paths,
            map_settings.size,
            self.mean_,
            self.std_,
            settings,
            map_settings,
            device,
            resize_mode=self.resize_mode,
            image_model=self.image_model,
            checkpoint=(
                self._checkpoint_writer(Path(run_dir), folder)
                if run_dir is not None and world.main
                else None
            ),
            resume=resume,
            world=world,
        )
        self.history_ = result.history
        self.best_epoch_ = result.best_epoch
        self.training_seconds_ = result.seconds
        self.train_images_ = result.train_images
        self.validation_images_ = result.validation_images
        self._set_validation(result.validation_scores)
        model = AnomalyMapModel(network, map_settings, result.image_model)
        self.runtime_ = TorchRuntime(model, self.describe(), device, self.threads)
        if run_dir is not None and world.main:
            self._write_run(Path(run_dir), folder)
        return self

    def _checkpoint_writer(self, run_dir: Path, folder: Path):
        def write(state: dict) -> None:
            state = {**state, "estimator": self.get_params(), "data": str(folder.resolve())}
            state["pruning"] = getattr(self, "pruning_", None)
            atomic_write(run_dir / CHECKPOINT, lambda temporary: torch.save(state, temporary))

        return write

    @classmethod
    def resume(cls, run_dir: str | Path, epochs: int | None = None) -> STPM:
        """Continue an interrupted run from run_dir/checkpoint.pt, with the settings it had.

        epochs: train a run longer than it was set to. With no learning-rate schedule, 20 epochs
        then 30 more give the same weights as 50 from the start.
        """
        state = distributed.from_main(lambda: _read_checkpoint(run_dir), distributed.join())
        params = {**PARAMETERS_BEFORE_0_2, **state["estimator"]}
        if epochs is not None:
            if epochs < state["epoch"]:
                raise StpmError(f"{run_dir} has already trained {state['epoch']} epochs")
            params["epochs"] = epochs
        model = cls(**params)
        model.pruning_ = state.get("pruning")
        return model.fit(state["data"], run_dir=run_dir, resume=state)

    def set_map(
        self, combine: str, smoothing_sigma: float, validation_images: Sequence[str | Path]
    ) -> STPM:
        """Combine and smooth the level maps another way, without retraining.

        The student does not depend on these settings, only the scores do, so the threshold is
        recomputed on validation_images: defect-free images the student never trained on (a run's
        config.json lists its own).
        """
        runtime = self._torch_runtime("the map of an ONNX export is fixed; set it on the .pt")
        settings = MapSettings(self.input_size_, combine, float(smoothing_sigma), self.distance)
        self.combine, self.smoothing_sigma = combine, float(smoothing_sigma)
        model = AnomalyMapModel(runtime.model.network, settings, runtime.model.image_model)
        self.runtime_ = TorchRuntime(model, runtime.description, runtime.device, runtime.threads)
        scores = []
        for _, outcome in self.predict_iter(
            validation_images, threshold=0.0, full_resolution=False
        ):
            if isinstance(outcome, StpmError):
                raise outcome
            scores.append(outcome.score)
        self._set_validation(scores)
        self.runtime_.description = self.describe()
        return self

    def _check_settings(self) -> tuple[TrainSettings, MapSettings]:
        """The constructor's arguments, checked and converted; raises StpmError on a bad one."""
        if not weights.backbone_exists(self.backbone):
            raise StpmError(f"unknown backbone {self.backbone!r}; any name from timm.list_models()")
        if not networks.student_exists(self.student):
            raise StpmError(
                f"unknown student {self.student!r}; use {', '.join(networks.STUDENT_KINDS)} "
                "or a timm CNN name"
            )
        if self.epochs < 1 or self.batch_size < 1:
            raise StpmError("epochs and batch size must be at least 1")
        if self.image_model not in (None, *IMAGE_MODELS):
            raise StpmError(f"image model must be None or 'gaussian', not {self.image_model!r}")
        if self.resize_mode not in data.RESIZE_MODES:
            raise StpmError(
                f"resize mode must be one of {', '.join(data.RESIZE_MODES)}, not {self.resize_mode!r}"
            )
        if not 0.0 <= self.denoise <= 1.0:
            raise StpmError(f"denoise is a share of training images in [0, 1], not {self.denoise}")
        if self.hard_quantile is not None and not 0.0 <= self.hard_quantile < 1.0:
            raise StpmError(f"the hard-loss quantile must be in [0, 1), not {self.hard_quantile}")
        if self.selection not in SELECTIONS:
            raise StpmError(
                f"selection must be one of {', '.join(SELECTIONS)}, not {self.selection!r}"
            )
        if not 0.0 <= self.validation_fraction < 1.0:
            raise StpmError("the validation fraction must be in [0, 1)")
        _check_false_alarms(self.max_false_alarms)
        size = self.image_size
        sides = (size, size) if isinstance(size, int) else tuple(size)
        if len(sides) != 2 or min(sides) < 32:
            raise StpmError(f"image size must be one or two sides of at least 32 px, not {size}")
        sides = (int(sides[0]), int(sides[1]))
        map_settings = MapSettings(sides, self.combine, float(self.smoothing_sigma), self.distance)
        return self._train_settings(), map_settings

    def _train_settings(self) -> TrainSettings:
        """The training loop's settings: the constructor arguments of the same names."""
        fields = dataclasses.fields(TrainSettings)
        return TrainSettings(**{item.name: getattr(self, item.name) for item in fields})

    def _build_network(self, input_size: tuple[int, int]) -> StudentTeacher:
        """Teacher with ImageNet weights, student of the chosen kind with random weights."""
        self.input_size_ = input_size
        self.out_indices_ = networks.pyramid_indices(self.backbone, tuple(self.strides))
        weights_file = weights.resolve_weights_file(self.backbone, self.teacher_weights)
        teacher, fingerprint = networks.build_teacher(
            self.backbone, self.out_indices_, weights_file
        )
        self.mean_ = tuple(teacher.pretrained_cfg.get("mean") or data.IMAGENET_MEAN)
        self.std_ = tuple(teacher.pretrained_cfg.get("std") or data.IMAGENET_STD)
        source = weights.describe_source(self.backbone, weights_file, self.teacher_weights)
        self.teacher_ = {"source": source, "sha256": fingerprint}
        student = networks.build_student(self.student, teacher, self.distance)
        return StudentTeacher(teacher, student)

    def _set_validation(self, scores: Sequence[float]) -> None:
        """Threshold from defect-free validation images only, by the max_false_alarms rule."""
        self.validation_scores_ = [float(score) for score in scores]
        if len(scores) >= 2:
            values = np.asarray(scores, dtype=np.float64)
            self.validation_mean_ = float(values.mean())
            self.validation_std_ = float(values.std(ddof=1))
            if self.max_false_alarms is None:
                self.threshold_ = self.validation_mean_ + THRESHOLD_SIGMAS * self.validation_std_
            else:
                self.threshold_ = self.threshold_at(self.max_false_alarms)
        else:
            self.validation_mean_ = self.validation_std_ = self.threshold_ = None

    def set_threshold(self, max_false_alarms: float | None) -> STPM:
        """Re-set threshold_ from the stored validation scores, without scoring anything:
        at their (1 - max_false_alarms) quantile, or mean + 3 std for None."""
        self._check_fitted()
        _check_false_alarms(max_false_alarms)
        self.max_false_alarms = max_false_alarms
        self._set_validation(self.validation_scores_)
        return self

    def threshold_at(self, max_false_alarms: float) -> float:
        """The raw score above which at most this share of the defect-free validation images
        lie: their (1 - max_false_alarms) quantile, linearly interpolated."""
        if max_false_alarms is None:
            raise StpmError("name the share of false alarms, e.g. threshold_at(0.01)")
        _check_false_alarms(max_false_alarms)
        if len(getattr(self, "validation_scores_", [])) < 2:
            raise StpmError("this model has fewer than 2 validation scores to take a quantile of")
        return float(np.quantile(self.validation_scores_, 1.0 - max_false_alarms))

    def _threshold_rule(self) -> str:
        if self.max_false_alarms is None:
            return f"mean + {THRESHOLD_SIGMAS:g} * std"
        return f"quantile {1.0 - self.max_false_alarms:g}"

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
        batch_size = batch_size or self.batch_size
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
        with data.opencv_single_threaded():
            maps, terms = self._maps_and_terms([image for _, image in batch], resize=True)
            maps = maps[:, 0]
            scores = (maps.reshape(len(maps), -1).max(axis=1) + terms).tolist()
            if full_resolution:
                maps = [
                    data.resize_map(m, image.shape[:2])
                    for m, (_, image) in zip(maps, batch, strict=True)
                ]
        for (source, image), anomaly_map, score in zip(batch, maps, scores, strict=True):
            yield (
                source,
                Prediction(
                    path=source,
                    score=score,
                    normalized_score=self.normalize_score(score, threshold),
                    anomaly_map=anomaly_map,
                    mask=anomaly_map > threshold,
                    is_anomalous=score > threshold,
                    image=image if keep_images else None,
                ),
            )

    def anomaly_maps(self, images, resize: bool = False) -> np.ndarray:
        """RGB uint8 images (B, H, W, 3), at the model's input size unless resize=True (then a
        list of any sizes) -> anomaly maps float32 (B, 1, H, W) at the input size.

        A letterboxed image's map comes back as a squashed image's would: padding cut, part
        stretched to the input size (data.unletterbox_map), so callers read every map one way.
        """
        return self._maps_and_terms(images, resize)[0]

    def _maps_and_terms(self, images, resize: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """anomaly_maps, and each image's image-level term (B,): score = map maximum + term."""
        self._check_fitted()
        shapes = None
        if resize:
            shapes = [image.shape[:2] for image in images]
            images = [data.resize(image, self.input_size_, self.resize_mode) for image in images]
            images = images[0][None] if len(images) == 1 else np.stack(images)
        elif isinstance(images, torch.Tensor):
            images = images.numpy()
        maps, terms = self.runtime_(data.normalize(images, self.mean_, self.std_))
        if shapes is not None and self.resize_mode == "letterbox":
            maps = np.stack(
                [
                    data.unletterbox_map(m[0], shape)[None]
                    for m, shape in zip(maps, shapes, strict=True)
                ]
            )
        return maps, terms

    def normalize_score(self, score: float, threshold: float | None = None) -> float:
        """Map a raw score to [0, 1] linearly: the validation mean -> 0, the threshold -> 0.5."""
        threshold = self.threshold_ if threshold is None else threshold
        reference = self.validation_mean_ if self.validation_mean_ is not None else 0.0
        if reference >= threshold:
            reference = 0.0
        spread = max(threshold - reference, 1e-12)  # a zero threshold makes every score 1
        return float(np.clip(0.5 * (score - reference) / spread, 0.0, 1.0))

    def _check_fitted(self) -> None:
        if not hasattr(self, "runtime_"):
            raise StpmError("this STPM is not trained yet: call fit(folder) or STPM.load(path)")

    def _torch_runtime(self, why: str) -> TorchRuntime:
        self._check_fitted()
        if not isinstance(self.runtime_, TorchRuntime):
            raise StpmError(f"{why} (this model runs on {self.runtime_.name}; load the .pt file)")
        return self.runtime_

    # ------------------------------------------------------------------ files

    def describe(self) -> ModelDescription:
        """The fitted model's description: what its model file and ONNX metadata record."""
        if not hasattr(self, "input_size_"):
            raise StpmError("this STPM is not trained yet: call fit(folder) or STPM.load(path)")
        return ModelDescription(
            backbone=self.backbone,
            strides=list(self.strides),
            out_indices=list(self.out_indices_),
            image_size=list(self.input_size_),
            resize_mode=self.resize_mode,
            mean=list(self.mean_),
            std=list(self.std_),
            combine=self.combine,
            smoothing_sigma=float(self.smoothing_sigma),
            distance=self.distance,
            image_model=self.image_model,
            teacher=dict(self.teacher_),
            validation={
                "scores": list(self.validation_scores_),
                "mean": self.validation_mean_,
                "std": self.validation_std_,
                "threshold_rule": self._threshold_rule(),
            },
            threshold=self.threshold_,
            settings=dataclasses.asdict(self._train_settings()),
            history=list(getattr(self, "history_", [])),
            best_epoch=getattr(self, "best_epoch_", None),
            student_kind=self.student,
            max_false_alarms=self.max_false_alarms,
            pruning=getattr(self, "pruning_", None),
            shared_layers=list(getattr(self, "shared_layers_", [])),
        )

    def save(self, path: str | Path) -> Path:
        """Write the model file atomically (a crash leaves the old file or the new one)."""
        runtime = self._torch_runtime("an ONNX export cannot be saved as a model file")
        image_model = runtime.model.image_model
        return write_model_file(
            path,
            self.describe(),
            runtime.model.network.student.state_dict(),
            None if image_model is None else image_model.state_dict(),
        )

    @classmethod
    def load(
        cls,
        path: str | Path,
        runtime: str = "auto",
        threads: int | None = None,
        device: str = "auto",
        precision: str = "f32",
        teacher_weights: str | None = None,
        force: bool = False,
    ) -> STPM:
        """Load a model file; refuse files that are not ours or whose teacher differs.

        runtime: "auto" (torch for .pt, ONNX Runtime for .onnx), "torch", "onnxruntime" or
        "openvino" (.onnx only; precision "f32" or "bf16"). threads: None for the default.
        """
        loaded = open_runtime(path, runtime, threads, device, precision, teacher_weights, force)
        description = loaded.description
        model = cls(
            backbone=description.backbone,
            strides=tuple(description.strides),
            image_size=tuple(description.image_size),
            resize_mode=description.resize_mode,
            combine=description.combine,
            smoothing_sigma=description.smoothing_sigma,
            distance=description.distance,
            image_model=description.image_model,
            student=description.student_kind,
            share_stem=bool(description.shared_layers),
            max_false_alarms=description.max_false_alarms,
            device=device,
            threads=threads,
            **description.settings,
        )
        model.runtime_ = loaded
        model.input_size_ = tuple(description.image_size)
        model.out_indices_ = tuple(description.out_indices)
        model.mean_, model.std_ = tuple(description.mean), tuple(description.std)
        model.teacher_ = dict(description.teacher)
        model.history_ = description.history
        model.best_epoch_ = description.best_epoch
        model.pruning_, model.shared_layers_ = description.pruning, description.shared_layers
        model._set_validation(description.validation["scores"])
        model.threshold_ = description.threshold
        return model

    def _write_run(self, run_dir: Path, folder: Path) -> None:
        """model.pt, config.json (every setting used) and loss_curve.png in one folder."""
        run_dir.mkdir(parents=True, exist_ok=True)
        self.save(run_dir / "model.pt")
        state = self.describe().to_dict()
        state.pop("history")
        settings = state.pop("settings")
        config = {
            "data": str(folder.resolve()),
            **state,
            **settings,
            "device": str(self.runtime_.device),
            "threads": self.runtime_.threads,
            "train_images": self.train_images_,
            "validation_images": self.validation_images_,
            "training_seconds": round(self.training_seconds_, 2),
            "world_size": self.world_size_,
            "backend": self.backend_,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        atomic_write_text(run_dir / "config.json", json.dumps(config, indent=2) + "\n")
        visualize.plot_loss_curve(self.history_, run_dir / "loss_curve.png", self.best_epoch_)


# ---------------------------------------------------------------------- helpers


def _read_checkpoint(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CHECKPOINT
    if not path.is_file():
        raise StpmError(f"no checkpoint to resume in {run_dir} (expected {path})")
    return load_untrusted(path, "checkpoint")


def _check_false_alarms(max_false_alarms: float | None) -> None:
    if max_false_alarms is not None and not 0.0 < max_false_alarms < 1.0:
        raise StpmError(
            f"the share of false alarms must be in (0, 1), e.g. 0.01, not {max_false_alarms}"
        )


def _decode(item) -> np.ndarray | StpmError:
    try:
        return data.read_image(item) if isinstance(item, str | Path) else data.to_rgb(item)
    except StpmError as error:
        return error


def _source(item) -> str | None:
    return str(item) if isinstance(item, str | Path) else None


def _decode_ahead(
    inputs: Iterable[str | Path | np.ndarray], lookahead: int
) -> Iterator[tuple[str | None, np.ndarray | StpmError]]:
    """(source, RGB image or the error reading it), in order.

    One input is decoded right here (the camera case: a thread would only add latency). More
    are decoded in a background thread while the model runs on the current batch: OpenCV
    releases the GIL while it decodes. lookahead bounds how many wait in memory.
    """
    items = iter(inputs)
    first = list(next(items, _END) for _ in range(2))
    first = [item for item in first if item is not _END]
    if len(first) < 2:
        for item in first:
            yield _source(item), _decode(item)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        queue: deque = deque()
        for item in chain(first, items):
            queue.append((_source(item), pool.submit(_decode, item)))
            if len(queue) > lookahead:
                source, future = queue.popleft()
                yield source, future.result()
        while queue:
            source, future = queue.popleft()
            yield source, future.result()


_END = object()


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
