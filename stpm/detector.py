"""The estimator users import: `STPM(...).fit(folder)`, `.predict(images)`, `.save`, `STPM.load`.

A thin front. scikit-learn's conventions: every constructor argument is an attribute of the same
name, stored as given; `get_params`, `set_params` (stpm.settings.Parameters: scikit-learn's
own base class is too slow to import for a process that only scores) and `sklearn.base.clone`
work; learned state
lives in attributes ending in `_`, set only by `fit`, `load`, `set_map` and `set_threshold`. The
work is done elsewhere: training in stpm.train, scoring in stpm.scoring, the threshold in
stpm.calibration, files in stpm.modelfile and stpm.runs; how maps are computed is the runtime's
business (stpm.runtime), held in `runtime_`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from . import calibration, distributed, scoring, settings
from .errors import StpmError
from .modelfile import ModelDescription, write_model_file
from .runtime import TorchRuntime, open_runtime
from .scoring import Prediction
from .settings import DEFAULT_BACKBONE, Parameters


class STPM(Parameters):
    """Student-Teacher Feature Pyramid Matching anomaly detector.

    A frozen ImageNet teacher and a student trained to reproduce its feature pyramid on
    defect-free images; where the student fails, the image is anomalous (stpm.model). Every
    parameter is a setting declared once in stpm.settings.SETTINGS, which writes the list below.
    Why each default: README.md, "Defaults and why" (the map's: scripts/results/ablation.md; the
    student's and the image model's: scripts/results/students.md).

    """

    def __init__(
        self,
        backbone: str = DEFAULT_BACKBONE,
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
        self.backbone, self.strides, self.image_size = backbone, strides, image_size
        self.resize_mode, self.combine, self.smoothing_sigma = resize_mode, combine, smoothing_sigma
        self.distance, self.image_model, self.student = distance, image_model, student
        self.share_stem, self.max_false_alarms = share_stem, max_false_alarms
        self.epochs, self.batch_size, self.learning_rate = epochs, batch_size, learning_rate
        self.momentum, self.weight_decay = momentum, weight_decay
        self.validation_fraction, self.seed, self.denoise = validation_fraction, seed, denoise
        self.hard_quantile, self.selection = hard_quantile, selection
        self.teacher_weights, self.device, self.threads = teacher_weights, device, threads

    def fit(
        self,
        folder: str | Path,
        run_dir: str | Path | None = None,
        resume: dict | None = None,
        init: dict | None = None,
    ) -> STPM:
        """Train on folder/train/good (an MVTec-style category).

        With run_dir, a checkpoint is written there after every epoch (atomically), and the
        model file, config.json and loss curve at the end (stpm.runs). resume: a checkpoint to
        continue. init: {"student": weights, "pruning": how they were made} to start from
        instead of random weights, e.g. a pruned student (stpm.compress): a fine-tune.

        Under torchrun every process calls fit the same way and trains one student with
        DistributedDataParallel; rank 0 alone writes run_dir. What fit changes in the calling
        process (threads, the process group; not the random generators): stpm.train.
        """
        from . import train

        run_dir = None if run_dir is None else Path(run_dir)
        fitted = train.fit(self.get_params(), Path(folder), run_dir, resume, init)
        self._adopt(fitted.runtime)
        self.training_seconds_, self.train_images_ = (
            fitted.result.seconds,
            fitted.result.train_images,
        )
        self.validation_images_, self.data_warnings_ = fitted.result.validation_images, fitted.found
        self.world_size_, self.backend_ = fitted.world.size, fitted.backend
        return self

    @classmethod
    def resume(cls, run_dir: str | Path, epochs: int | None = None) -> STPM:
        """Continue an interrupted run from run_dir/checkpoint.pt, with the settings it had.

        epochs: train a run longer than it was set to. With no learning-rate schedule, 20 epochs
        then 30 more give the same weights as 50 from the start.
        """
        from . import runs

        world = distributed.join()
        state = distributed.from_main(lambda: runs.read_checkpoint(run_dir), world)
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
        runtime = self._torch_runtime("the map of an ONNX export is fixed; set it on the .pt")
        runtime = runtime.with_map(combine, float(smoothing_sigma))
        outcomes = scoring.predict(
            runtime, validation_images, 0.0, batch_size=self.batch_size, full_resolution=False
        )
        scores = [prediction.score for prediction in _raising(outcomes)]
        self.combine, self.smoothing_sigma, self.runtime_ = combine, float(smoothing_sigma), runtime
        self._calibrate(calibration.calibrate(scores, self.max_false_alarms))
        return self

    def set_threshold(self, max_false_alarms: float | None) -> STPM:
        """Re-set threshold_ from the stored validation scores, without scoring anything:
        at their (1 - max_false_alarms) quantile, or mean + 3 std for None."""
        self._check_fitted()
        self._calibrate(calibration.calibrate(self.validation_scores_, max_false_alarms))
        self.max_false_alarms = max_false_alarms
        return self

    def threshold_at(self, max_false_alarms: float) -> float:
        """The raw score above which at most this share of the defect-free validation images
        lie: their (1 - max_false_alarms) quantile, linearly interpolated."""
        return calibration.threshold_at(getattr(self, "validation_scores_", []), max_false_alarms)

    def predict(
        self, images, threshold: float | None = None, batch_size: int | None = None
    ) -> list[Prediction]:
        """One Prediction per image. images: a path (file or folder), a list of paths,
        an (H, W[, C]) numpy image, a list of them, or a (B, C, H, W) tensor in [0, 1]."""
        return list(_raising(self.predict_iter(_as_inputs(images), threshold, batch_size)))

    def predict_iter(
        self,
        inputs: Iterable[str | Path | bytes | np.ndarray],
        threshold: float | None = None,
        batch_size: int | None = None,
        full_resolution: bool = True,
        keep_images: bool = False,
    ) -> Iterator[tuple[str | None, Prediction | StpmError]]:
        """Yield (source, Prediction or the error that stopped that image), in input order
        (stpm.scoring.predict). full_resolution=False keeps maps at the model's input size;
        keep_images=True hands each decoded image back in Prediction.image (to draw on)."""
        self._check_fitted()
        threshold = self.threshold_ if threshold is None else float(threshold)
        if threshold is None:
            raise StpmError("this model has no validation threshold; pass threshold=...")
        settings = (batch_size or self.batch_size, full_resolution, keep_images)
        return scoring.predict(self.runtime_, inputs, threshold, self.validation_mean_, *settings)

    def anomaly_maps(self, images, resize: bool = False) -> np.ndarray:
        """RGB uint8 images (B, H, W, 3) at the model's input size, or with resize=True a list of
        any sizes -> anomaly maps float32 (B, 1, H, W) at the input size, in the squashed
        geometry (a letterboxed image's map unpadded, stpm.scoring.run)."""
        self._check_fitted()
        if resize:
            return scoring.run(self.runtime_, list(images)).maps
        images = images.numpy() if hasattr(images, "numpy") else np.asarray(images)
        return scoring.run_resized(self.runtime_, images).maps

    def normalize_score(self, score: float, threshold: float | None = None) -> float:
        """A raw score mapped to [0, 1] linearly: the validation mean -> 0, the threshold -> 0.5."""
        threshold = self.threshold_ if threshold is None else threshold
        return scoring.normalized_score(score, threshold, self.validation_mean_)

    def describe(self) -> ModelDescription:
        """The fitted model's description: what its model file and ONNX metadata record (with
        threshold_ as it is now: a threshold set by hand is saved)."""
        self._check_fitted()
        return dataclasses.replace(self.runtime_.description, threshold=self.threshold_)

    def save(self, path: str | Path) -> Path:
        """Write the model file atomically (a crash leaves the old file or the new one)."""
        runtime = self._torch_runtime("an ONNX export cannot be saved as a model file")
        return write_model_file(path, self.describe(), *runtime.weights())

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
        model = cls(**_parameters(loaded.description), device=device, threads=threads)
        model._adopt(loaded)
        return model

    def _adopt(self, runtime) -> None:
        """The fitted attributes of a model: its runtime and what its description records."""
        self.runtime_, d = runtime, runtime.description
        self.input_size_, self.out_indices_ = tuple(d.image_size), tuple(d.out_indices)
        self.mean_, self.std_, self.teacher_ = tuple(d.mean), tuple(d.std), dict(d.teacher)
        self.history_, self.best_epoch_ = d.history, d.best_epoch
        self.pruning_, self.shared_layers_ = d.pruning, d.shared_layers
        recorded = calibration.calibrate(d.validation["scores"], d.max_false_alarms)
        self._calibrate(dataclasses.replace(recorded, threshold=d.threshold))  # as the file says

    def _calibrate(self, calibrated: calibration.Calibration) -> None:
        """The validation scores and the threshold, here and in the description."""
        self.validation_scores_, self.threshold_ = calibrated.scores, calibrated.threshold
        self.validation_mean_, self.validation_std_ = calibrated.mean, calibrated.std
        recorded = {"validation": calibrated.validation(), "threshold": calibrated.threshold}
        recorded["max_false_alarms"] = calibrated.max_false_alarms
        self.runtime_.description = dataclasses.replace(self.runtime_.description, **recorded)

    def _check_fitted(self) -> None:
        if not hasattr(self, "runtime_"):
            raise StpmError("this STPM is not trained yet: call fit(folder) or STPM.load(path)")

    def _torch_runtime(self, why: str) -> TorchRuntime:
        self._check_fitted()
        if not isinstance(self.runtime_, TorchRuntime):
            raise StpmError(f"{why} (this model runs on {self.runtime_.name}; load the .pt file)")
        return self.runtime_


STPM.__doc__ += settings.parameters_doc()


def _parameters(d: ModelDescription) -> dict:
    """The estimator's parameters a model was trained with, from its description."""
    return {
        "backbone": d.backbone,
        "strides": tuple(d.strides),
        "image_size": tuple(d.image_size),
        "resize_mode": d.resize_mode,
        "combine": d.combine,
        "smoothing_sigma": d.smoothing_sigma,
        "distance": d.distance,
        "image_model": d.image_model,
        "student": d.student_kind,
        "share_stem": bool(d.shared_layers),
        "max_false_alarms": d.max_false_alarms,
        **d.settings,
    }


def _raising(outcomes: Iterator[tuple[str | None, Prediction | StpmError]]) -> Iterator[Prediction]:
    """The predictions of predict_iter's outcomes; the first error is raised, after the scoring
    has been stopped here (its decoding thread joined on this thread)."""
    try:
        for _, outcome in outcomes:
            if isinstance(outcome, StpmError):
                raise outcome
            yield outcome
    finally:
        outcomes.close()


def _as_inputs(images) -> list:
    """Normalise predict()'s argument to a list of paths, bytes and (H, W[, C]) arrays."""
    from . import data

    if isinstance(images, str | Path):
        path = Path(images)
        return data.list_images(path) if path.is_dir() else [path]
    if hasattr(images, "detach"):  # a torch tensor, without importing torch to ask
        if images.ndim != 4:
            raise StpmError(f"a tensor batch must be (B, C, H, W), got {tuple(images.shape)}")
        return list(images.detach().cpu().permute(0, 2, 3, 1).numpy())
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, bytes):
        return [images]
    return list(images)
