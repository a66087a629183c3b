"""The training loop: the student learns the teacher's features on defect-free images.

Paper defaults (Wang et al., BMVC 2021): SGD lr 0.4, momentum 0.9, weight decay 1e-4,
batch 32, 100 epochs, 256x256 inputs. We keep all but the epochs: 20, because on Magnetic Tile
50 epochs lowered the validation loss by a third but image AUROC by 4 points (the student learns
to imitate the teacher on defects too; scripts/results/ablation.md). A held-out slice of
train/good is never trained on; its losses pick the epoch to keep and its image scores
calibrate the threshold.

Objectives beyond the paper's (TrainSettings): the student averages only its worst distances,
those at or above the 0.99 quantile of a batch's (hard_quantile, EfficientAD's hard feature loss:
on by default, None for the paper's mean); it may see some images with a synthetic defect while
it must still output the teacher's features of the clean image (denoise; stpm.corruptions); and
the epoch kept may be the one that best separates the validation images from corrupted copies
of them (selection="separation"). What each changed on Magnetic Tile:
scripts/results/students.md and README.md, "Defaults and why".
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from . import corruptions, data, distributed
from .distributed import World
from .errors import StpmError
from .gaussian import fit_pooled_gaussian, pooled
from .metrics import image_auroc
from .model import AnomalyMapModel, MapSettings, StudentTeacher, feature_loss, per_image_loss


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


SELECTIONS = ("loss", "separation")
MAX_GRADIENT_NORM = 1.0  # for the standardized distance only
TRAINING, SELECTION = 0, 1  # first element of a corruption key: the two never share a stream


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split_validation(paths: Sequence[Path], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded, fixed split of train/good into (train, validation)."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), not {fraction}")
    count = int(round(fraction * len(paths))) if len(paths) > 1 else 0
    count = max(count, 1) if fraction > 0 and len(paths) > 1 else count
    order = np.random.default_rng(seed).permutation(len(paths))
    validation = sorted(paths[index] for index in order[:count])
    train = sorted(paths[index] for index in order[count:])
    return train, validation


def train_student(
    network: StudentTeacher,
    paths: Sequence[Path],
    image_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    settings: TrainSettings,
    map_settings: MapSettings,
    device: torch.device,
    resize_mode: str = "squash",
    image_model: str | None = None,
    checkpoint: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    world: World = distributed.ALONE,
) -> TrainResult:
    """Train network.student in place on paths; keeps the epoch with the lowest validation loss.

    checkpoint(state) is called after every epoch with everything needed to continue; passing
    that state back as resume continues the run exactly where it stopped (same final weights).

    world (several processes under torchrun, stpm.distributed): every process draws the same
    global batches in the same order and takes its contiguous share of each; the student is
    wrapped in DistributedDataParallel, which averages the gradients, and the loss is written
    so that the average is the whole batch's gradient. So the processes train what one process
    would, except that BatchNorm normalises each share by its own statistics. Validation is
    split between the processes and gathered.
    """
    if settings.batch_size % world.size:
        raise distributed.EveryRankError(
            f"the batch of {settings.batch_size} images does not split evenly between "
            f"{world.size} processes; pick a batch size that is a multiple of {world.size} "
            "(each process takes batch size / processes images a step)"
        )
    distributed.agree_on_files(paths, "the training images", world)
    train_paths, validation_paths = split_validation(
        paths, settings.validation_fraction, settings.seed
    )
    train_images = data.load_resized(train_paths, image_size, "decoding train/good", resize_mode)
    validation_images = data.load_resized(
        validation_paths, image_size, "decoding validation", resize_mode
    )
    # channels-last runs the student's backward pass about 1.4x faster on CPU (oneDNN)
    network.to(device, memory_format=torch.channels_last)
    scale = getattr(network.student, "target_scale", None)
    if scale is not None:  # the standardized distance: the teacher's statistics first
        scale.set(*teacher_statistics(network, train_images, mean, std, settings, device))
    teacher_cache = cache_teacher_features(
        network, train_images, mean, std, settings, device, world=world
    )
    corrupted_validation = None
    if settings.selection == "separation" and validation_paths:
        keys = [(SELECTION, settings.seed, index) for index in range(len(validation_paths))]
        corrupted_validation = torch.from_numpy(
            corruptions.corrupt_batch(validation_images.numpy(), keys)
        )
    student = network.student
    if world.distributed:  # the teacher stays outside: it has nothing to synchronise
        ids = None if device.type == "cpu" else [device]
        student = DistributedDataParallel(network.student, device_ids=ids)
    gather = None if not world.distributed else lambda rows: distributed.gather_rows(rows, world)
    optimizer = torch.optim.SGD(
        network.student.parameters(),
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    generator = torch.Generator().manual_seed(settings.seed)
    result = TrainResult(
        train_images=len(train_paths), validation_images=[str(path) for path in validation_paths]
    )
    best_loss, best_state, first_epoch, elapsed = (float("inf"),) * 2, None, 1, 0.0
    if resume is not None:
        network.student.load_state_dict(resume["student"])
        optimizer.load_state_dict(resume["optimizer"])
        generator.set_state(resume["generator"])
        result.history, result.best_epoch = list(resume["history"]), resume["best_epoch"]
        best = resume["best_loss"]  # a tuple since 0.2; one number before
        best_loss = tuple(best) if isinstance(best, list | tuple) else (best,)
        best_state = resume["best_student"]
        first_epoch, elapsed = resume["epoch"] + 1, resume["seconds"]
    started = time.perf_counter() - elapsed
    progress = tqdm(
        total=settings.epochs * len(train_paths),
        initial=(first_epoch - 1) * len(train_paths),
        unit="img",
        desc="training",
        disable=not world.main,
    )
    for epoch in range(first_epoch, settings.epochs + 1):
        network.train()
        epoch_started, losses = time.perf_counter(), []
        order = torch.randperm(len(train_paths), generator=generator)
        for batch_indices in order.split(settings.batch_size):
            share = batch_indices[distributed.shard(len(batch_indices), world)]
            # a last batch smaller than the world leaves a rank nothing: it still takes part
            # in the step (DDP needs every rank) with one image whose loss it does not count
            idle = len(share) == 0
            share = batch_indices[:1] if idle else share
            clean = train_images[share]
            seen = clean
            if settings.denoise > 0:  # the student sees it corrupted, the teacher clean
                keys = [(TRAINING, settings.seed, epoch, int(i)) for i in share]
                corrupted = corruptions.corrupt_batch(clean.numpy(), keys, settings.denoise)
                seen = torch.from_numpy(corrupted)
            if teacher_cache is None:
                with torch.no_grad():
                    targets = network.teacher_targets(_batch(clean, mean, std, device))
            else:
                targets = [level[share].to(device) for level in teacher_cache]
            student_features = student(_batch(seen, mean, std, device))
            if idle:
                targets, student_features = (
                    [t[:0] for t in targets],
                    [s[:0] for s in student_features],
                )
            loss = feature_loss(
                targets, student_features, settings.hard_quantile, map_settings.distance, gather
            )
            batch_loss = distributed.total(loss.detach(), world)  # this rank's share: the sum
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(batch_loss):
                raise StpmError(
                    f"training diverged in epoch {epoch} (the loss is {batch_loss.item()}); "
                    "lower --lr, or use the cosine distance"
                )
            # DDP averages the ranks' gradients; the sum of the shares is the batch's gradient
            (loss * world.size).backward()
            if map_settings.distance == "standardized":
                # a squared error is unbounded, unlike the cosine distance: at the paper's
                # learning rate one batch of hard positions can throw the student off
                torch.nn.utils.clip_grad_norm_(network.student.parameters(), MAX_GRADIENT_NORM)
            optimizer.step()
            losses.append(batch_loss.item() * len(batch_indices))
            progress.update(len(batch_indices))
            progress.set_postfix_str(
                f"epoch {epoch}/{settings.epochs} loss {batch_loss.item():.4f}"
            )
        record = {
            "epoch": epoch,
            "loss": sum(losses) / len(train_paths),
            "images_per_second": len(train_paths) / (time.perf_counter() - epoch_started),
        }
        # BatchNorm's running statistics moved on each rank's own share in the last step
        distributed.broadcast_buffers(network.student, world)
        if validation_paths:
            record["validation_loss"] = float(
                torch.tensor(
                    _across(
                        world,
                        validation_images,
                        lambda part: _per_image(
                            network, part, mean, std, settings, map_settings, device
                        ).tolist(),
                    )
                ).mean()
            )
        if corrupted_validation is not None:
            record["separation"] = _separation(
                network,
                validation_images,
                corrupted_validation,
                mean,
                std,
                settings,
                map_settings,
                world,
            )
        result.history.append(record)
        held_out = record.get("validation_loss", record["loss"])
        # higher separation is better; the loss breaks ties
        current = (-record["separation"], held_out) if "separation" in record else (held_out,)
        if current < best_loss:
            best_loss, result.best_epoch = current, epoch
            best_state = {k: v.detach().clone() for k, v in network.student.state_dict().items()}
        if checkpoint is not None:
            checkpoint(
                {
                    "epoch": epoch,
                    "student": network.student.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "generator": generator.get_state(),
                    "history": result.history,
                    "best_epoch": result.best_epoch,
                    "best_loss": best_loss,
                    "best_student": best_state,
                    "seconds": time.perf_counter() - started,
                }
            )
    progress.close()
    network.student.load_state_dict(best_state)

    if validation_paths:  # the student's own scores: the map's maximum
        model = AnomalyMapModel(network, map_settings).eval()
        if resize_mode == "letterbox":  # scored as prediction scores them: the part only
            result.validation_scores = distributed.across(
                len(validation_paths),
                lambda part: _letterboxed_scores(
                    model, validation_images[part], validation_paths[part], mean, std
                ),
                world,
            )
        else:
            result.validation_scores = _across(
                world,
                validation_images,
                lambda part: _validation_scores(model, part, mean, std, settings),
            )
    if image_model == "gaussian":
        train_pooled = (
            pooled(teacher_cache)
            if teacher_cache is not None
            else _pooled_teacher(network, train_images, mean, std, settings, device)
        )
        validation_pooled = _pooled_teacher(network, validation_images, mean, std, settings, device)
        result.image_model = fit_pooled_gaussian(
            train_pooled.double().numpy(),
            validation_pooled.double().numpy(),
            result.validation_scores,  # scaled to their spread
        )
        with torch.no_grad():  # scores with the term: no second pass over the images
            terms = result.image_model.term(validation_pooled).tolist()
        result.validation_scores = [
            score + term for score, term in zip(result.validation_scores, terms, strict=True)
        ]
        result.image_model.to(device)
    result.seconds = time.perf_counter() - started
    network.to(memory_format=torch.contiguous_format)  # single images run faster that way
    return result


def _across(world: World, images: torch.Tensor, compute: Callable[[torch.Tensor], list]) -> list:
    """compute(images) -> one value per image, each rank on its share, joined in order."""
    return distributed.across(len(images), lambda part: compute(images[part]), world)


def _batch(images: torch.Tensor, mean, std, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> normalised channels-last (B, 3, H, W) on device."""
    normalized = torch.from_numpy(data.normalize(images.numpy(), mean, std)).to(device)
    return normalized.contiguous(memory_format=torch.channels_last)


TEACHER_CACHE_BYTES = 4 * 2**30


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


@torch.inference_mode()
def _per_image(network, images, mean, std, settings, map_settings, device) -> torch.Tensor:
    network.eval()
    losses = [
        per_image_loss(*network(_batch(batch, mean, std, device)), map_settings.distance).cpu()
        for batch in images.split(settings.batch_size)
    ]
    return torch.cat(losses)


@torch.inference_mode()
def _validation_scores(model: AnomalyMapModel, images, mean, std, settings) -> list[float]:
    """Image scores of the validation images, through the same map model prediction runs."""
    device = next(model.parameters()).device
    return torch.cat(
        [
            model(_batch(batch, mean, std, device))[1].cpu()
            for batch in images.split(settings.batch_size)
        ]
    ).tolist()


@torch.inference_mode()
def _letterboxed_scores(model: AnomalyMapModel, images, paths, mean, std) -> list[float]:
    """Image scores of letterboxed images: each map's maximum over the part, padding excluded."""
    device = next(model.parameters()).device
    scores = []
    for image, path in zip(images, paths, strict=True):
        maps, _, _ = model(_batch(image[None], mean, std, device))
        part = data.unletterbox_map(maps[0, 0].cpu().numpy(), data.image_shape(path))
        scores.append(float(part.max()))
    return scores


@torch.inference_mode()
def _pooled_teacher(network, images, mean, std, settings, device) -> torch.Tensor:
    """The teacher's features of images, each level averaged over positions: (N, D)."""
    return torch.cat(
        [
            pooled(network.teacher_targets(_batch(batch, mean, std, device))).cpu()
            for batch in images.split(settings.batch_size)
        ]
    )


def _separation(
    network, clean, corrupted, mean, std, settings, map_settings, world: World = distributed.ALONE
) -> float:
    """Image AUROC of the validation images against corrupted copies of them: how well this
    epoch's student tells a synthetic defect from a held-out good image."""
    model = AnomalyMapModel(network, map_settings).eval()
    scores = [
        _across(world, images, lambda part: _validation_scores(model, part, mean, std, settings))
        for images in (clean, corrupted)
    ]
    labels = np.r_[np.zeros(len(clean)), np.ones(len(corrupted))]
    return image_auroc(labels, np.concatenate(scores))
