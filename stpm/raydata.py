"""Score images with Ray Data: `dataset.map_batches(RayScorer, ...)` runs a pool of scorers.

Each actor of the pool loads the model once and scores batches of rows; a bad image becomes a
row with verdict "error", not a failed job (as in stpm.scoring). Ray is optional: this module
imports without it, and only score_paths, which starts Ray, asks for it (pip install "stpm[ray]").
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from .detector import STPM
from .errors import StpmError
from .runtime import default_threads
from .scoring import Prediction

# what RayScorer adds to each row, and its numpy type
RESULT_COLUMNS = {
    "score": np.float64,
    "normalized_score": np.float64,
    "is_anomalous": bool,
    "verdict": str,
    "error": str,
}
NO_MAP = np.zeros((0, 0), np.float32)  # an error row's map: Ray cannot store None among arrays
_ORDER = "_stpm_order"  # score_paths' row number, to put Ray's output back in input order


class RayScorer:
    """A callable class for `Dataset.map_batches`: numpy batches in, the same rows scored out.

    Rows are read from `image_column` ((H, W[, C]) arrays, as ray.data.read_images makes) or,
    without it, from the files named in `path_column`. Out come the other input columns (the
    images are dropped: they are already in Ray's object store, and the path or an id column
    says which row is which) plus RESULT_COLUMNS: score and normalized_score (float64, NaN for
    an error), is_anomalous, verdict ("anomalous", "good" or "error") and error ("" or the
    message); with maps=True also anomaly_map, float32 at each image's own (H, W), (0, 0) for
    an error. threshold: None for the model's own.

    threads: CPU threads of this actor. None takes the CPUs Ray reserved for it (map_batches'
    num_cpus, 1 by default; Ray passes them as OMP_NUM_THREADS), so that several actors on one
    machine share its cores instead of each taking them all.
    """

    def __init__(
        self,
        model: str | Path,
        threshold: float | None = None,
        maps: bool = False,
        runtime: str = "auto",
        threads: int | None = None,
        image_column: str = "image",
        path_column: str = "path",
    ) -> None:
        self.detector = _load_model(model, runtime, threads or _reserved_threads())
        self.threshold = self.detector.threshold_ if threshold is None else float(threshold)
        if self.threshold is None:
            raise StpmError(f"{model} has no validation threshold; pass threshold=...")
        self.maps = maps
        self.image_column = image_column
        self.path_column = path_column

    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Score one batch: the model runs on the whole batch at once."""
        inputs = self._inputs(batch)
        outcomes = [
            outcome
            for _, outcome in self.detector.predict_iter(
                inputs,
                self.threshold,
                batch_size=max(1, len(inputs)),
                full_resolution=self.maps,  # the score does not need the map resized
            )
        ]
        columns = {name: values for name, values in batch.items() if name != self.image_column}
        columns.update(_result_columns(outcomes, self.maps))
        return columns

    def _inputs(self, batch: Mapping[str, np.ndarray]) -> list:
        """The batch's images, or else its file paths: what predict_iter takes."""
        if self.image_column in batch:
            return list(batch[self.image_column])
        if self.path_column in batch:
            return [str(path) for path in batch[self.path_column]]
        raise StpmError(
            f"a batch to score needs a {self.image_column!r} or a {self.path_column!r} column; "
            f"this one has {', '.join(map(repr, batch)) or 'no columns'}"
        )


def score_paths(
    paths: Iterable[str | Path],
    model: str | Path,
    workers: int = 1,
    batch_size: int = 16,
    threads: int | None = None,
    maps: bool = False,
    threshold: float | None = None,
    runtime: str = "auto",
) -> list[dict]:
    """Score image files on `workers` Ray actors: one dict per path, in input order.

    Starts a local Ray unless one is running. A row holds path (as given) and RayScorer's
    columns as plain Python values; a bad file is a row with verdict "error". threads: per
    worker; None shares this machine's cores among the workers (at least 1 each). Each worker
    reserves that many Ray CPUs; on a cluster of other machines, pass threads for theirs.
    """
    ray = _import_ray()
    if not Path(model).is_file():  # before starting Ray: the common typo, said plainly
        raise StpmError(f"model file not found: {model}")
    if workers < 1 or batch_size < 1:
        raise StpmError(f"workers and batch size must be at least 1, not {workers}, {batch_size}")
    threads = threads or max(1, default_threads() // workers)
    paths = [paths] if isinstance(paths, str | Path) else paths
    items = [{_ORDER: order, "path": str(path)} for order, path in enumerate(paths)]
    if not items:
        return []
    scored = ray.data.from_items(items).map_batches(
        RayScorer,
        fn_constructor_kwargs=dict(
            model=str(Path(model).resolve()),
            threshold=threshold,
            maps=maps,
            runtime=runtime,
            threads=threads,
        ),
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=threads,
        batch_size=batch_size,
    )
    rows = sorted(scored.take_all(), key=lambda row: row[_ORDER])  # actors finish in any order
    return [_plain_row(row) for row in rows]


# ---------------------------------------------------------------------- helpers


def _import_ray():
    try:
        import ray
        import ray.data
    except ImportError as error:
        raise StpmError(f'Ray is not installed: pip install "stpm[ray]" ({error})') from None
    return ray


def _load_model(model: str | Path, runtime: str, threads: int | None) -> STPM:
    """STPM.load, its errors naming this host: a model missing on one node of a cluster is the
    expected mistake, and Ray's report of it would not say which node."""
    host = socket.gethostname()
    if not Path(model).is_file():
        raise StpmError(
            f"model file not found on host {host}: {model} (every machine that runs a scorer "
            "needs it at that path: copy it there or put it on shared storage)"
        )
    try:
        return STPM.load(model, runtime=runtime, threads=threads)
    except StpmError as error:
        raise StpmError(f"on host {host}: {error}") from None


def _reserved_threads() -> int | None:
    """The CPUs Ray reserved for this actor (it sets OMP_NUM_THREADS to them), else None."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def _result_columns(outcomes: list[Prediction | StpmError], maps: bool) -> dict[str, np.ndarray]:
    """RESULT_COLUMNS (and anomaly_map) for predict_iter's outcomes, one row each."""
    rows = [_result_row(outcome) for outcome in outcomes]
    values = list(zip(*rows, strict=True)) or [()] * len(RESULT_COLUMNS)
    columns = {
        name: np.array(column, dtype=dtype)
        for (name, dtype), column in zip(RESULT_COLUMNS.items(), values, strict=True)
    }
    if maps:
        columns["anomaly_map"] = _map_column(
            [
                NO_MAP if isinstance(outcome, StpmError) else outcome.anomaly_map
                for outcome in outcomes
            ]
        )
    return columns


def _result_row(outcome: Prediction | StpmError) -> tuple:
    """One row's RESULT_COLUMNS; an error scores NaN and carries its message (as stpm.scoring)."""
    if isinstance(outcome, StpmError):
        return np.nan, np.nan, False, "error", str(outcome)
    return outcome.score, outcome.normalized_score, outcome.is_anomalous, outcome.verdict, ""


def _map_column(anomaly_maps: list[np.ndarray]) -> np.ndarray:
    """(B, H, W) when the maps share a size, else an object array of them (Ray takes both)."""
    if anomaly_maps and all(m.shape == anomaly_maps[0].shape for m in anomaly_maps):
        return np.stack(anomaly_maps)
    column = np.empty(len(anomaly_maps), dtype=object)
    for row, anomaly_map in enumerate(anomaly_maps):
        column[row] = anomaly_map
    return column


def _plain_row(row: dict) -> dict:
    """Ray's row without the ordering column, numpy scalars as Python values (JSON-ready)."""
    return {
        name: value.item() if isinstance(value, np.generic) else value
        for name, value in row.items()
        if name != _ORDER
    }
