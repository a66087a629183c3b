"""The model behind stpm-serve: a loaded STPM, its identity, and the worker side of a request.

Kept apart from the HTTP layer (stpm.serve) so that another front end (Ray Serve, a gRPC
gateway) reuses it as it is. A worker thread (stpm.batching) hands `Service.score` a batch of
jobs; each image is decoded, the batch scored in one call of stpm.scoring.predict, each judged
against its own threshold and its answer (and overlay PNG) built there, off the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import batching, record, scoring, visualize
from .errors import StpmError
from .modelfile import FORMAT_VERSION
from .version import __version__


@dataclass
class Limits:
    """How much load the service takes, and how long it waits (stpm-serve's flags)."""

    workers: int = 1  # threads running the model
    max_batch: int = 4  # images scored in one call at most; 1 = no micro-batching
    max_wait: float = 0.002  # seconds a batch may wait to fill, while batches have company
    queue_size: int = 16  # requests waiting for a worker; beyond it, 503 at once
    deadline: float = 2.0  # seconds from the body's arrival; a request still queued then gets 503
    body_timeout: float = 10.0  # seconds for the whole request body to arrive; then 408
    max_body: int = 32 * 2**20  # bytes; a larger body is refused unread (413)
    max_pixels: int | None = None  # per image; None: stpm.scoring.MAX_IMAGE_PIXELS


@dataclass
class Job:
    """One request's image and what it asked for, as a worker receives it."""

    encoded: bytes
    name: str | None
    threshold: float  # the raw threshold to judge it against
    details: bool = False  # add the peak and the mask's boxes
    overlay: bool = False  # draw the overlay PNG
    timings: dict = field(default_factory=dict)
    image: np.ndarray | None = None  # decoded (Service.decode)
    error: StpmError | None = None  # what stopped the decoding
    recorded: bool = True  # into the record, if the service keeps one (not the warm-up's probe)


class Service:
    """A loaded model behind the queue: what the endpoints call. detector: a loaded STPM."""

    def __init__(
        self,
        detector,
        model_path: str | Path,
        limits: Limits | None = None,
        name: str = "model",
        batcher=None,
        keeper=None,
    ) -> None:
        """batcher: makes the queue in front of the model from (score, limits); by default
        stpm.batching's (Ray Serve's replicas use serve.batch instead, stpm.rayserve).
        keeper: a stpm.record.Keeper every part (and its overlay) goes to, or None."""
        self.detector, self.limits, self.name = detector, limits or Limits(), name
        self.keeper = keeper
        self.path = Path(model_path)
        self.threshold: float | None = detector.threshold_
        self.threshold_set: dict | None = None  # who set the threshold by hand, when (or None)
        self.identity = {"name": name, **model_identity(detector, Path(model_path))}
        self.ready = threading.Event()  # loaded and warm
        self.draining = False  # shutting down: what is queued is scored, nothing new taken
        self.failure: str | None = None  # why the model cannot serve (warming failed)
        self.holding = 0  # requests between their body's first byte and their answer
        self.batcher = (batcher or default_batcher)(self.score, self.limits)

    @property
    def capacity(self) -> int:
        """Requests the service holds at most when full: queued, and in the workers' hands."""
        return self.limits.queue_size + self.limits.workers * self.limits.max_batch

    def warm(self) -> None:
        """Run every batch size the workers will use once (OpenVINO compiles each) and a probe
        image the whole way, overlay included (what a first request would pay); it must score a
        finite number. Then be ready."""
        self.detector.runtime_.warm(range(1, self.limits.max_batch + 1))
        blank = visualize.encode_png(np.full((64, 64, 3), 128, np.uint8))
        job = Job(blank, "probe", self.threshold or 0.0, details=True, overlay=True)
        job.recorded = False
        (probe,) = self.score([job], [0.0])
        if isinstance(probe, Exception):
            raise probe
        if not np.isfinite(probe["score"]):
            raise StpmError(f"the probe image scored {probe['score']}, not a finite number")
        self.ready.set()

    def unavailable(self) -> str | None:
        """Why the service takes no request now (warming failed, shutting down, still loading),
        or None."""
        if self.failure:
            return self.failure
        if self.draining:
            return "the service is shutting down"
        if not self.ready.is_set():
            return "the model is still loading"
        return None

    def close(self) -> None:
        self.batcher.close()

    def decode(self, job: Job) -> None:
        """Decode the job's image into job.image (or the StpmError that stops it into job.error),
        timed. On the worker, not before queueing: a thread decoding beside the model's took its
        cores and cost throughput (151-154 against 158-172 requests/s, INT8, 4 clients)."""
        started = time.perf_counter()
        try:
            job.image = scoring.decode_image(job.encoded, "the image", self.limits.max_pixels)
        except StpmError as error:
            job.error = error
        job.timings["decode"] = (time.perf_counter() - started) * 1000

    def score(self, jobs: list[Job], waited: list[float]) -> list[dict | StpmError]:
        """A worker's batch: decode each image not decoded yet, score those that decode in one
        call, judge each against its own threshold and build its answer (and overlay) here, off
        the event loop."""
        for job, queued in zip(jobs, waited, strict=True):
            job.timings["queue"] = queued * 1000
            if job.image is None and job.error is None:
                self.decode(job)
        ready = [job for job in jobs if job.error is None]
        started = time.perf_counter()
        drawn = self.keeper is not None or any(job.overlay for job in jobs)
        scored = self._predict(ready, drawn)
        model_ms = (time.perf_counter() - started) * 1000
        results = []
        for job in jobs:
            if job.error is not None:
                with contextlib.suppress(Exception):  # the record's trouble is not the part's
                    self._keep(job)
                results.append(job.error)
                continue
            job.timings["model"] = model_ms
            prediction = next(scored)
            try:  # one job's details or overlay failing fails that job alone
                results.append(self._answer(job, prediction))
            except Exception as error:
                results.append(error)
        return results

    def _predict(self, jobs: list[Job], keep_images: bool):
        """The jobs' images scored in one call, judged against the first job's threshold (a
        job asking for another is judged again in _answer)."""
        if not jobs:
            return iter(())
        d = self.detector
        found = scoring.predict(
            d.runtime_,
            [job.image for job in jobs],
            jobs[0].threshold,
            d.validation_mean_,
            len(jobs),
            keep_images=keep_images,
        )
        return iter([prediction for _, prediction in found])

    def _answer(self, job: Job, prediction: scoring.Prediction) -> dict:
        if prediction.threshold != job.threshold:
            mean = self.detector.validation_mean_
            prediction = scoring.with_threshold(prediction, job.threshold, mean)
        answer = {
            "name": job.name,
            "score": prediction.score,
            "normalized_score": prediction.normalized_score,
            "verdict": prediction.verdict,
            "threshold": prediction.threshold,
            "image_term": prediction.image_term,
            "model": self.identity,
        }
        if job.details:
            x, y = scoring.peak(prediction.anomaly_map)
            answer["peak"] = {"x": x, "y": y, "value": float(prediction.anomaly_map[y, x])}
            answer["boxes"] = [
                dict(zip("xywh", box, strict=True)) for box in scoring.boxes(prediction.mask)
            ]
        if job.overlay:
            answer["png"] = overlay_png(prediction)
        started = time.perf_counter()
        part = self._keep(job, prediction, answer.get("png"))
        if part is not None:
            answer["part"] = part  # its id in the record
            job.timings["record"] = (time.perf_counter() - started) * 1000
        return answer

    def _keep(self, job: Job, prediction=None, png: bytes | None = None) -> int | None:
        """The part into the record (its row committed now, its overlay drawn later): its id,
        or None without a record."""
        if self.keeper is None or not job.recorded:
            return None
        part = record.part_from(
            "service", job.name, job.encoded, self.identity, prediction, job.error
        )
        if prediction is None:
            return self.keeper.keep(part, image=job.encoded)
        return self.keeper.keep(part, lambda: png or overlay_png(prediction), job.encoded)

    def threshold_for(self, threshold: float | None, max_false_alarms: float | None) -> float:
        """The raw threshold a request asks for, or the service's."""
        if threshold is not None and max_false_alarms is not None:
            raise StpmError("give threshold or max_false_alarms, not both")
        if max_false_alarms is not None:
            return self.detector.threshold_at(max_false_alarms)
        if threshold is not None:
            try:
                value = float(threshold)
            except (OverflowError, TypeError, ValueError):
                raise StpmError("threshold must be a finite number") from None
            if not math.isfinite(value):
                raise StpmError("threshold must be a finite number")
            return value
        if self.threshold is None:
            raise StpmError("this model has no threshold; pass threshold or max_false_alarms")
        return self.threshold

    def take_threshold(self, record: dict) -> None:
        """Judge by a threshold set by hand (a stpm.changes record: value, rule, who, when)."""
        self.threshold, self.threshold_set = float(record["threshold"]), record

    def describe(self) -> dict:
        """What GET /v1/model answers: identity, settings, rule, threshold, validation statistics."""
        d = self.detector.describe()
        validation = {key: value for key, value in d.validation.items() if key != "scores"}
        scores = np.asarray(d.validation.get("scores") or [], np.float64)
        if scores.size:
            validation.update(
                count=int(scores.size),
                min=float(scores.min()),
                max=float(scores.max()),
                quantiles={
                    q: float(np.quantile(scores, float(q))) for q in ("0.5", "0.95", "0.99")
                },
            )
        return {
            **self.identity,
            "threshold": self.threshold,
            "threshold_set": self.threshold_set,
            "model_threshold": d.threshold,
            "max_false_alarms": d.max_false_alarms,
            "validation": validation,
            "backbone": d.backbone,
            "student": d.student_kind,
            "image_size": d.image_size,
            "resize_mode": d.resize_mode,
            "settings": d.settings,
            "limits": dict(vars(self.limits)),
        }


def overlay_png(prediction: scoring.Prediction) -> bytes:
    """The overlay stpm-predict draws, as PNG bytes."""
    return visualize.encode_png(visualize.overlay(prediction.image, prediction))


def default_batcher(score, limits: Limits) -> batching.Batcher:
    """stpm.batching's queue and worker threads, as the limits say."""
    return batching.Batcher(
        score, limits.workers, limits.max_batch, limits.max_wait, limits.queue_size
    )


def model_identity(detector, path: Path) -> dict:
    """What every answer names its model by: the file's SHA-256 (what was deployed, byte for
    byte), its format version, the runtime and precision; the file's name, not its path."""
    runtime = detector.runtime_
    return {
        "file": path.name,
        "sha256": file_sha256(path),
        "format_version": FORMAT_VERSION,
        "runtime": runtime.name,
        "precision": "int8" if runtime.description.int8 else getattr(runtime, "precision", "f32"),
        "stpm_version": __version__,
    }


def model_name(text: str) -> str:
    """A name fit for URLs made from a folder's name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:64]
    return name or "model"


def named_identity(detector, path: Path) -> dict:
    """The identity of a model served or run from its file: named after its folder, as the
    service names it (what the record and the drift alarm go by)."""
    return {"name": model_name(path.resolve().parent.name), **model_identity(detector, path)}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()
