"""Training: the student learns the teacher's features on defect-free images.

Paper defaults (Wang et al., BMVC 2021): SGD lr 0.4, momentum 0.9, weight decay 1e-4,
batch 32, 100 epochs, 256x256 inputs. We keep all but the epochs: 20, because on Magnetic Tile
50 epochs lowered the validation loss by a third but image AUROC by 4 points (the student learns
to imitate the teacher on defects too; scripts/results/ablation.md). A held-out slice of
train/good is never trained on; its losses pick the epoch to keep and its image scores
calibrate the threshold.

Objectives beyond the paper's (stpm.settings.TrainSettings): the student averages only its worst
distances, those at or above the 0.99 quantile of a batch's (hard_quantile, EfficientAD's hard
feature loss: on by default, None for the paper's mean); it may see some images with a synthetic
defect while it must still output the teacher's features of the clean image (denoise;
stpm.corruptions); and the epoch kept may be the one that best separates the validation images
from corrupted copies of them (selection="separation"). What each changed on Magnetic Tile:
scripts/results/students.md and README.md, "Defaults and why".

The steps, each a function or a small class below: `fit` assembles the network (stpm.networks)
and hands it to `train_student`, which runs `prepare` (the split, the images decoded once, the
teacher's features cached), the `StepLoop` epoch by epoch (SGD; under torchrun each process takes
its share of every batch, stpm.distributed), `validate` after each epoch, `Selection` of the epoch
to keep, and `calibrate`: the validation scores, the image model and the threshold
(stpm.calibration).

What fit does to the calling process: it draws the student's random weights from a copy of
torch's global generator seeded with the run's seed (torch.random.fork_rng), so the caller's
generators are as they were; it sets torch's thread count when `threads` is given (torch has one
pool per process: the setting stays, as the user asked for it); under torchrun it joins the
launcher's process group (once per process; stpm.distributed.leave ends it).
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import calibration, corruptions, data, distributed, networks, runs, scoring, settings
from .distributed import World
from .errors import StpmError
from .gaussian import pooled
from .metrics import image_auroc
from .model import AnomalyMapModel, StudentTeacher, feature_loss, per_image_loss
from .modelfile import ModelDescription
from .runtime import TorchRuntime, resolve_device
from .settings import MapSettings, TrainSettings

MAX_GRADIENT_NORM = 1.0  # for the standardized distance only
TRAINING, SELECTION = 0, 1  # first element of a corruption key: the two never share a stream
TEACHER_CACHE_BYTES = 4 * 2**30


@dataclass
class TrainResult:
    """What one training run produced besides the student's weights."""

    history: list[dict] = field(default_factory=list)  # per epoch: loss, validation_loss, ...
    best_epoch: int = 0
    validation_scores: list[float] = field(default_factory=list)
    train_images: int = 0
    validation_images: list[str] = field(default_factory=list)
    seconds: float = 0.0
    image_model: torch.nn.Module | None = None  # stpm.gaussian.PooledGaussian, if asked for


@dataclass
class Fitted:
    """A trained model ready to score (its runtime holds the complete description) and the facts
    of its training that only the run's config.json keeps."""

    runtime: TorchRuntime
    result: TrainResult
    found: list[str]  # warnings about the data (stpm.data.check_category)
    world: World
    backend: str | None


def fit(
    params: dict,
    folder: Path,
    run_dir: Path | None = None,
    resume: dict | None = None,
    init: dict | None = None,
) -> Fitted:
    """Train a model with an estimator's parameters (STPM.get_params()) on folder/train/good.

    run_dir: a checkpoint there after every epoch, the run folder at the end (stpm.runs).
    resume: a checkpoint to continue. init: {"student": weights, "pruning": what made them} to
    start from instead of random weights (stpm.compress). Under torchrun every process calls it;
    rank 0 alone writes.
    """
    train_settings, map_settings = settings.check(params)
    networks.check_names(params["backbone"], params["student"])
    world = distributed.join()
    paths = distributed.check_everywhere(lambda: data.train_images(folder), world)
    found = data.check_category(folder).warnings
    for message in found if world.main else ():
        warnings.warn(f"{folder}: {message}", stacklevel=3)
    device = distributed.local_device(resolve_device(params["device"]), world)
    if params["threads"]:
        torch.set_num_threads(params["threads"])
    start = resume or init or {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(train_settings.seed)  # the student's random initial weights
        built = networks.new_network(
            params["backbone"],
            params["strides"],
            params["student"],
            params["distance"],
            params["teacher_weights"],
        )
    shared = networks.start_student(built.network, start.get("student"), params["share_stem"])
    if params["share_stem"] and not shared:
        raise StpmError(
            f"the {params['student']} student's stem differs from the {params['backbone']} "
            "teacher's: nothing to share; train without share_stem (--share-stem)"
        )
    pruning = start.get("pruning")
    writer = None
    if run_dir is not None and world.main:
        writer = _checkpoint_writer(run_dir, params, folder, pruning)
    network = built.network.to(device)
    prepared = prepare(
        network, paths, built.mean, built.std, train_settings, map_settings, device,
        params["resize_mode"], world,
    )  # fmt: skip
    result = train_student(
        network, prepared, train_settings, map_settings, params["image_model"], writer, resume
    )
    description = _describe(params, built, result, train_settings, pruning, shared)
    model = AnomalyMapModel(built.network, map_settings, result.image_model)
    fitted = Fitted(
        TorchRuntime(model, description, device, params["threads"]),
        result,
        found,
        world,
        distributed.backend(device, world),
    )
    if run_dir is not None and world.main:
        weights = fitted.runtime.weights()
        runs.write_run(run_dir, description, weights, params, _config(fitted, folder))
        fitted.runtime.path = run_dir / runs.MODEL
    return fitted


def _checkpoint_writer(run_dir: Path, params: dict, folder: Path, pruning: dict | None):
    def write(state: dict) -> None:
        extra = {"estimator": params, "data": str(folder.resolve()), "pruning": pruning}
        runs.write_checkpoint(run_dir, {**state, **extra})

    return write


def _describe(
    params: dict,
    built: networks.Built,
    result: TrainResult,
    train_settings: TrainSettings,
    pruning: dict | None,
    shared: list[str],
) -> ModelDescription:
    """The trained model's description: what its model file and ONNX metadata record."""
    calibrated = calibration.calibrate(result.validation_scores, params["max_false_alarms"])
    return ModelDescription(
        backbone=params["backbone"],
        strides=list(params["strides"]),
        out_indices=list(built.out_indices),
        image_size=list(settings.input_size(params["image_size"])),
        resize_mode=params["resize_mode"],
        mean=list(built.mean),
        std=list(built.std),
        combine=params["combine"],
        smoothing_sigma=float(params["smoothing_sigma"]),
        distance=params["distance"],
        image_model=params["image_model"],
        teacher=dict(built.teacher),
        validation=calibrated.validation(),
        threshold=calibrated.threshold,
        settings=dataclasses.asdict(train_settings),
        history=list(result.history),
        best_epoch=result.best_epoch,
        student_kind=params["student"],
        max_false_alarms=params["max_false_alarms"],
        pruning=pruning,
        shared_layers=list(shared),
    )


def _config(fitted: Fitted, folder: Path) -> dict:
    """What config.json adds to the description: the data, where and how long it trained."""
    return {
        "data": str(folder.resolve()),
        "device": str(fitted.runtime.device),
        "threads": fitted.runtime.threads,
        "train_images": fitted.result.train_images,
        "validation_images": fitted.result.validation_images,
        "training_seconds": round(fitted.result.seconds, 2),
        "world_size": fitted.world.size,
        "backend": fitted.backend,
    }


def train_student(
    network: StudentTeacher,
    prepared: Prepared,
    settings: TrainSettings,
    map_settings: MapSettings,
    image_model: str | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
) -> TrainResult:
    """Train network.student in place on the prepared images; keeps the epoch with the lowest
    validation loss, then calibrates on the held-out images.

    checkpoint(state) is called after every epoch with everything needed to continue; passing
    that state back as resume continues the run exactly where it stopped (same final weights).

    world (several processes under torchrun, stpm.distributed): every process draws the same
    global batches in the same order and takes its contiguous share of each; the student is
    wrapped in DistributedDataParallel, which averages the gradients, and the loss is written
    so that the average is the whole batch's gradient. So the processes train what one process
    would, except that BatchNorm normalises each share by its own statistics. Validation is
    split between the processes and gathered.
    """
    world, device = prepared.world, next(network.student.parameters()).device
    loop = StepLoop(network, prepared, settings, map_settings, device, world)
    selection = Selection()
    result = TrainResult(
        train_images=len(prepared.train_paths),
        validation_images=[str(path) for path in prepared.validation_paths],
    )
    first_epoch, elapsed = 1, 0.0
    if resume is not None:
        loop.restore(resume)
        selection.restore(resume)
        result.history = list(resume["history"])
        first_epoch, elapsed = resume["epoch"] + 1, resume["seconds"]
    started = time.perf_counter() - elapsed
    images = len(prepared.train_paths)
    progress = tqdm(
        total=settings.epochs * images,
        initial=(first_epoch - 1) * images,
        unit="img",
        desc="training",
        disable=not world.main,
    )
    for epoch in range(first_epoch, settings.epochs + 1):
        record = loop.epoch(epoch, progress)
        record.update(validate(network, prepared, settings, map_settings, world))
        result.history.append(record)
        selection.consider(epoch, record, network.student)
        if checkpoint is not None:
            seconds = time.perf_counter() - started
            state = {**loop.state(), **selection.state(), "history": result.history}
            checkpoint({"epoch": epoch, **state, "seconds": seconds})
    progress.close()
    network.student.load_state_dict(selection.best_state)
    result.best_epoch = selection.best_epoch
    result.validation_scores, result.image_model = calibrate(
        network, prepared, settings, map_settings, image_model, world
    )
    result.seconds = time.perf_counter() - started
    network.to(memory_format=torch.contiguous_format)  # single images run faster that way
    return result


# ---------------------------------------------------------------------- data preparation


@dataclass
class Prepared:
    """The images decoded once (uint8 (N, H, W, 3)), and what training reuses of them."""

    train_paths: list[Path]
    validation_paths: list[Path]
    train: torch.Tensor
    validation: torch.Tensor
    mean: Sequence[float]  # the teacher's input normalisation
    std: Sequence[float]
    resize_mode: str
    teacher_cache: list[torch.Tensor] | None  # the teacher's features of every training image
    corrupted_validation: torch.Tensor | None  # for selection="separation"
    world: World  # the processes that share the work (stpm.distributed)


def prepare(
    network: StudentTeacher,
    paths: Sequence[Path],
    mean: Sequence[float],
    std: Sequence[float],
    settings: TrainSettings,
    map_settings: MapSettings,
    device: torch.device,
    resize_mode: str,
    world: World,
) -> Prepared:
    """The validation split, the images decoded and resized once (no augmentation: exact), the
    teacher's statistics (standardized distance) and features, the corrupted validation copies."""
    if settings.batch_size % world.size:
        raise distributed.EveryRankError(
            f"the batch of {settings.batch_size} images does not split evenly between "
            f"{world.size} processes; pick a batch size that is a multiple of {world.size} "
            "(each process takes batch size / processes images a step)"
        )
    distributed.agree_on_files(paths, "the training images", world)
    train_paths, validation_paths = calibration.split_validation(
        paths, settings.validation_fraction, settings.seed
    )
    size = map_settings.size
    train = data.load_resized(train_paths, size, "decoding train/good", resize_mode)
    validation = data.load_resized(validation_paths, size, "decoding validation", resize_mode)
    train, validation = torch.from_numpy(train), torch.from_numpy(validation)
    # channels-last runs the student's backward pass about 1.4x faster on CPU (oneDNN)
    network.to(device, memory_format=torch.channels_last)
    scale = getattr(network.student, "target_scale", None)
    if scale is not None:  # the standardized distance: the teacher's statistics first
        scale.set(*teacher_statistics(network, train, mean, std, settings, device))
    corrupted = None
    if settings.selection == "separation" and validation_paths:
        keys = [(SELECTION, settings.seed, index) for index in range(len(validation_paths))]
        corrupted = torch.from_numpy(corruptions.corrupt_batch(validation.numpy(), keys))
    cache = cache_teacher_features(network, train, mean, std, settings, device, world=world)
    return Prepared(
        train_paths, validation_paths, train, validation, mean, std, resize_mode, cache, corrupted,
        world,
    )  # fmt: skip


def _batch(images: torch.Tensor, mean, std, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised channels-last (B, 3, H, W) on device."""
    normalized = torch.from_numpy(scoring.normalize(images.numpy(), mean, std)).to(device)
    return normalized.contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def cache_teacher_features(
    network,
    images,
    mean,
    std,
    settings,
    device,
    budget: int = TEACHER_CACHE_BYTES,
    world: World = distributed.ALONE,
) -> list[torch.Tensor] | None:
    """The frozen teacher's features of every training image, computed once on the CPU side.

    Exact (no augmentation, teacher in eval mode) and a quarter of each step's work saved;
    skipped when they would take more than `budget` bytes of memory. Under torchrun each
    process computes a share and every process gets all of them: its shares of the batches
    change every epoch.
    """
    sample = network.teacher_targets(_batch(images[:1], mean, std, device))
    per_image = sum(level.numel() * level.element_size() for level in sample)
    if per_image * len(images) > budget:
        return None
    levels = [[level.cpu()[:0]] for level in sample]
    for batch in images[distributed.shard(len(images), world)].split(settings.batch_size):
        for store, level in zip(
            levels, network.teacher_targets(_batch(batch, mean, std, device)), strict=True
        ):
            store.append(level.cpu())
    return [distributed.gather_rows(torch.cat(store), world) for store in levels]


@torch.inference_mode()
def teacher_statistics(
    network, images, mean, std, settings, device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per level, the mean and standard deviation of each channel of the teacher's features
    over the training images (every position), accumulated batch by batch in float64."""
    totals = None  # per level: (count, sum, sum of squares) over images and positions
    for batch in images.split(settings.batch_size):
        levels = [level.double() for level in network.teacher(_batch(batch, mean, std, device))]
        moments = [
            (level[:, 0].numel(), level.sum(dim=(0, 2, 3)), level.pow(2).sum(dim=(0, 2, 3)))
            for level in levels
        ]
        totals = (
            moments
            if totals is None
            else [
                tuple(a + b for a, b in zip(old, new, strict=True))
                for old, new in zip(totals, moments, strict=True)
            ]
        )
    means = [total / count for count, total, _ in totals]
    stds = [
        (squares / count - m.pow(2)).clamp_min(0).sqrt()
        for (count, _, squares), m in zip(totals, means, strict=True)
    ]
    return [m.float().cpu() for m in means], [s.float().cpu() for s in stds]


# ---------------------------------------------------------------------- the step loop


class StepLoop:
    """SGD on the student, one epoch at a time, with the distributed strategy behind it: under
    torchrun each rank takes its contiguous share of every global batch (the same global order
    on every rank, from one seeded generator), DistributedDataParallel averages the gradients,
    and the loss is each rank's share of the whole batch's, so the average is the batch's."""

    def __init__(
        self,
        network: StudentTeacher,
        prepared: Prepared,
        settings: TrainSettings,
        map_settings: MapSettings,
        device: torch.device,
        world: World,
    ) -> None:
        self.network, self.prepared, self.settings = network, prepared, settings
        self.map_settings, self.device, self.world = map_settings, device, world
        self.student = network.student
        self.gather = None
        if world.distributed:  # the teacher stays outside: it has nothing to synchronise
            ids = None if device.type == "cpu" else [device]
            self.student = DistributedDataParallel(network.student, device_ids=ids)
            self.gather = lambda rows: distributed.gather_rows(rows, world)
        self.optimizer = torch.optim.SGD(
            network.student.parameters(),
            lr=settings.learning_rate,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
        )
        self.generator = torch.Generator().manual_seed(settings.seed)

    def state(self) -> dict:
        """What a checkpoint needs of the loop to continue it exactly."""
        return {
            "student": self.network.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }

    def restore(self, state: dict) -> None:
        self.network.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    def epoch(self, epoch: int, progress: tqdm) -> dict:
        """One pass over the training images in a new order: the epoch's record."""
        self.network.train()
        started, losses = time.perf_counter(), []
        count = len(self.prepared.train_paths)
        order = torch.randperm(count, generator=self.generator)
        for batch_indices in order.split(self.settings.batch_size):
            loss = self._step(batch_indices, epoch)
            losses.append(loss * len(batch_indices))
            progress.update(len(batch_indices))
            progress.set_postfix_str(f"epoch {epoch}/{self.settings.epochs} loss {loss:.4f}")
        # BatchNorm's running statistics moved on each rank's own share in the last step
        distributed.broadcast_buffers(self.network.student, self.world)
        return {
            "epoch": epoch,
            "loss": sum(losses) / count,
            "images_per_second": count / (time.perf_counter() - started),
        }

    def _step(self, batch_indices: torch.Tensor, epoch: int) -> float:
        """One optimiser step on this rank's share of a global batch: the batch's loss."""
        network, settings, prepared = self.network, self.settings, self.prepared
        share = batch_indices[distributed.shard(len(batch_indices), self.world)]
        # a last batch smaller than the world leaves a rank nothing: it still takes part in
        # the step (DDP needs every rank) with one image whose loss it does not count
        idle = len(share) == 0
        share = batch_indices[:1] if idle else share
        clean = seen = prepared.train[share]
        if settings.denoise > 0:  # the student sees it corrupted, the teacher clean
            keys = [(TRAINING, settings.seed, epoch, int(i)) for i in share]
            seen = torch.from_numpy(
                corruptions.corrupt_batch(clean.numpy(), keys, settings.denoise)
            )
        if prepared.teacher_cache is None:
            with torch.no_grad():
                targets = network.teacher_targets(
                    _batch(clean, prepared.mean, prepared.std, self.device)
                )
        else:
            targets = [level[share].to(self.device) for level in prepared.teacher_cache]
        student_features = self.student(_batch(seen, prepared.mean, prepared.std, self.device))
        if idle:
            targets, student_features = [t[:0] for t in targets], [s[:0] for s in student_features]
        distance = self.map_settings.distance
        loss = feature_loss(
            targets, student_features, settings.hard_quantile, distance, self.gather
        )
        batch_loss = distributed.total(loss.detach(), self.world)  # this rank's share: the sum
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(batch_loss):
            raise StpmError(
                f"training diverged in epoch {epoch} (the loss is {batch_loss.item()}); "
                "lower --lr, or use the cosine distance"
            )
        # DDP averages the ranks' gradients; the sum of the shares is the batch's gradient
        (loss * self.world.size).backward()
        if distance == "standardized":
            # a squared error is unbounded, unlike the cosine distance: at the paper's
            # learning rate one batch of hard positions can throw the student off
            torch.nn.utils.clip_grad_norm_(network.student.parameters(), MAX_GRADIENT_NORM)
        self.optimizer.step()
        return batch_loss.item()


# ---------------------------------------------------------------------- validation, selection


def validate(
    network: StudentTeacher,
    prepared: Prepared,
    settings: TrainSettings,
    map_settings: MapSettings,
    world: World,
) -> dict:
    """After an epoch: the held-out images' mean loss and, for selection="separation", how well
    the epoch's student tells them from corrupted copies (image AUROC)."""
    record = {}
    if not prepared.validation_paths:
        return record
    device = next(network.student.parameters()).device
    losses = _across(
        world,
        prepared.validation,
        lambda part: _per_image(network, part, prepared, settings, map_settings, device).tolist(),
    )
    record["validation_loss"] = float(torch.tensor(losses).mean())
    if prepared.corrupted_validation is not None:
        model = AnomalyMapModel(network, map_settings).eval()
        scores = [
            _across(world, images, lambda part: maxima(model, part, prepared, settings))
            for images in (prepared.validation, prepared.corrupted_validation)
        ]
        labels = np.r_[np.zeros(len(scores[0])), np.ones(len(scores[1]))]
        record["separation"] = image_auroc(labels, np.concatenate(scores))
    return record


@dataclass
class Selection:
    """The epoch to keep: the lowest held-out loss, or the best separation (the loss breaks
    ties), with a copy of its student's weights."""

    best: tuple = (float("inf"),) * 2
    best_epoch: int = 0
    best_state: dict | None = None

    def consider(self, epoch: int, record: dict, student: torch.nn.Module) -> None:
        held_out = record.get("validation_loss", record["loss"])
        current = (-record["separation"], held_out) if "separation" in record else (held_out,)
        if current < self.best:
            self.best, self.best_epoch = current, epoch
            self.best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}

    def state(self) -> dict:
        return {
            "best_epoch": self.best_epoch,
            "best_loss": self.best,
            "best_student": self.best_state,
        }

    def restore(self, state: dict) -> None:
        best = state["best_loss"]  # a tuple since 0.2; one number before
        self.best = tuple(best) if isinstance(best, list | tuple) else (best,)
        self.best_epoch, self.best_state = state["best_epoch"], state["best_student"]


def calibrate(
    network: StudentTeacher,
    prepared: Prepared,
    settings: TrainSettings,
    map_settings: MapSettings,
    image_model: str | None,
    world: World,
) -> tuple[list[float], torch.nn.Module | None]:
    """The kept student's validation scores, scored as prediction scores them (the maps'
    maxima, a letterboxed map unpadded, stpm.scoring), and with image_model="gaussian" the
    image model fitted on the teacher's pooled features, its term in the scores
    (stpm.calibration)."""
    if not prepared.validation_paths:
        return [], None
    model = AnomalyMapModel(network, map_settings).eval()
    # the images' own shapes: a letterboxed image is scored on the part only, as in prediction
    shapes = [scoring.image_shape(path) for path in prepared.validation_paths]

    def part_maxima(part: slice) -> list[float]:
        return maxima(model, prepared.validation[part], prepared, settings, shapes[part])

    student_scores = distributed.across(len(shapes), part_maxima, world)
    if image_model != "gaussian":
        return student_scores, None
    device = next(network.student.parameters()).device
    train_pooled = (
        pooled(prepared.teacher_cache)
        if prepared.teacher_cache is not None
        else _pooled_teacher(network, prepared.train, prepared, settings, device)
    )
    validation_pooled = _pooled_teacher(network, prepared.validation, prepared, settings, device)
    gaussian, scores = calibration.fit_image_model(
        train_pooled.double().numpy(),
        validation_pooled.double().numpy(),
        np.asarray(student_scores),
    )
    return scores.tolist(), gaussian.to(device)


def _across(world: World, images: torch.Tensor, compute: Callable[[torch.Tensor], list]) -> list:
    """compute(images) -> one value per image, each rank on its share, joined in order."""
    return distributed.across(len(images), lambda part: compute(images[part]), world)


@torch.inference_mode()
def _per_image(network, images, prepared, settings, map_settings, device) -> torch.Tensor:
    network.eval()
    losses = [
        per_image_loss(
            *network(_batch(batch, prepared.mean, prepared.std, device)), map_settings.distance
        ).cpu()
        for batch in images.split(settings.batch_size)
    ]
    return torch.cat(losses)


@torch.inference_mode()
def maxima(
    model: AnomalyMapModel,
    images: torch.Tensor,
    prepared: Prepared,
    settings: TrainSettings,
    shapes: Sequence[tuple[int, int]] | None = None,
) -> list[float]:
    """The student's score of each image, its map's maximum, computed in batches of tensors
    (on the training device) and read as stpm.scoring reads a runtime's maps: a letterboxed
    map unpadded first (shapes: the images' own; None takes the maps as they come)."""
    device = next(model.parameters()).device
    found = []
    for start in range(0, len(images), settings.batch_size):
        batch = _batch(
            images[start : start + settings.batch_size], prepared.mean, prepared.std, device
        )
        maps = model(batch)[0].float().cpu().numpy()
        part = None if shapes is None else shapes[start : start + len(maps)]
        found += scoring.map_maxima(scoring.to_squashed(maps, part, prepared.resize_mode)).tolist()
    return found


@torch.inference_mode()
def _pooled_teacher(network, images, prepared, settings, device) -> torch.Tensor:
    """The teacher's features of images, each level averaged over positions: (N, D)."""
    return torch.cat(
        [
            pooled(
                network.teacher_targets(_batch(batch, prepared.mean, prepared.std, device))
            ).cpu()
            for batch in images.split(settings.batch_size)
        ]
    )
