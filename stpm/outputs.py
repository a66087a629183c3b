"""Score many image files into a folder: overlays, masks, a CSV and a summary (stpm-predict's job).

`score_files(detector, inputs, out)` is what the command runs; an inspection pipeline can call it
the same way. The images are scored by stpm.scoring; their pictures are drawn and written, and
their CSV lines appended, by one background thread beside the scoring, in input order. Nothing
is lost on a crash: an image's CSV line is flushed as soon as its pictures are written, and
every picture is written atomically.

Under torchrun (stpm.distributed) each process scores a contiguous share of the files, writes
its pictures and its rows to predictions.rank<N>.csv as it goes; at the end rank 0 merges the
rows into predictions.csv, in the order one process would have written them, and removes the
per-rank files.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

from . import data, distributed, record, scoring, visualize
from .distributed import World
from .errors import StpmError
from .files import atomic_write, atomic_write_text
from .scoring import Prediction

if TYPE_CHECKING:
    from .detector import STPM

CSV_COLUMNS = ("path", "score", "normalized_score", "verdict", "error")


@dataclass
class ScoringResult:
    """What score_files wrote: one row per input (CSV_COLUMNS; scores as numbers, None for an
    image that failed) and the summary.json content."""

    rows: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def failures(self) -> list[dict]:
        return [row for row in self.rows if row["verdict"] == "error"]


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Files, folders (recursive) and globs -> (image paths in order, inputs that matched nothing)."""
    paths, missing = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = data.list_images(path, recursive=True)
            if not found:
                raise StpmError(
                    f"no images in folder {path} (extensions: {', '.join(data.IMAGE_EXTENSIONS)})"
                )
            paths += found
        elif path.is_file():
            paths.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(match) for match in glob.glob(item, recursive=True))
            paths += [match for match in matches if match.is_file()]
            if not matches:
                missing.append(item)
        else:
            missing.append(item)
    return list(dict.fromkeys(paths)), missing


def score_files(
    detector: STPM,
    inputs: list[str],
    out: str | Path,
    threshold: float | None = None,
    batch_size: int = 16,
    save_maps: bool = False,
    images: bool = True,
    progress: bool = True,
    world: World = distributed.ALONE,
    keeper=None,
) -> ScoringResult:
    """Score every image of inputs (files, folders, globs) into out.

    Writes predictions.csv (CSV_COLUMNS, one line per input, errors included), summary.json (the
    counts, the threshold, the model file, the runtime) and, unless images=False,
    <stem>_overlay.png and <stem>_mask.png (plus <stem>_map.npy with save_maps) in sub-folders
    that mirror the inputs' folders. keeper: a stpm.record.Keeper each image also goes to
    (with a copy of its overlay). A bad image is a CSV row with verdict "error", not an
    exception; inputs of which none exists are a mistake (StpmError). world: this process's place under torchrun; every
    process passes the same inputs, rank 0's result holds every row (the others' only theirs).
    """
    out = Path(out)
    threshold = detector.threshold_ if threshold is None else float(threshold)
    paths, missing = distributed.check_everywhere(lambda: expand_inputs(inputs), world)
    if not paths:  # nothing at all to score: a mistake, not a row of errors
        raise StpmError(f"no such file or folder: {', '.join(missing)}")
    distributed.agree_on_files([*paths, *missing], "the input files", world)
    base = _common_parent(paths)
    mine = paths[distributed.shard(len(paths), world)]
    missing = missing if world.main else []  # one process writes their rows: rank 0, first
    out.mkdir(parents=True, exist_ok=True)
    rows_file = out / (
        "predictions.csv" if not world.distributed else f"predictions.rank{world.rank}.csv"
    )
    batch_size = max(1, min(batch_size, len(mine)))
    detector.runtime_.warm([batch_size])  # OpenVINO compiles it: before the first image
    result, started = ScoringResult(), time.perf_counter()  # the scoring's own time
    outcomes = detector.predict_iter(
        mine, threshold=threshold, batch_size=batch_size, keep_images=images
    )
    shown = progress and len(mine) > 3 and world.main
    with open(rows_file, "w", newline="", encoding="utf-8") as handle:
        rows = _Rows(handle, backlog=2 * batch_size, keeper=keeper, model=_identity(detector))
        for path in missing:
            rows.put(path, None, f"no such file: {path}")
        for source, outcome in tqdm(outcomes, total=len(mine), unit="img", disable=not shown):
            if isinstance(outcome, StpmError):
                rows.put(source, None, str(outcome))
                continue
            pictures = (Path(source), base, out, outcome, save_maps) if images else None
            rows.put(source, outcome, "", pictures)
        result.rows = rows.close()
    images_per_rank = distributed.gather([len(mine)], world)
    if world.distributed:
        result.rows = _merge_rows(result.rows, rows_file, out, world)
    verdicts = [row["verdict"] for row in result.rows]
    model = getattr(detector.runtime_, "path", None)
    result.summary = {
        "model": None if model is None else str(model),
        "threshold": threshold,
        "images": len(result.rows),
        "anomalous": verdicts.count("anomalous"),
        "good": verdicts.count("good"),
        "failed": verdicts.count("error"),
        "seconds": round(time.perf_counter() - started, 3),
        "runtime": detector.runtime_.name,
        "threads": detector.runtime_.threads,
        "outputs": str(out),
        "images_per_rank": images_per_rank,
    }
    if world.main:
        atomic_write_text(out / "summary.json", json.dumps(result.summary, indent=2) + "\n")
    return result


def _merge_rows(rows: list[dict], rows_file: Path, out: Path, world: World) -> list[dict]:
    """Every rank's rows in rank order, written by rank 0 to predictions.csv in one step;
    the per-rank files go once the merged file exists."""
    everything = distributed.gather_to_main(rows, world)
    if world.main:
        buffer = io.StringIO()
        writer = csv.writer(buffer)  # the line endings of the file one process writes
        writer.writerow(CSV_COLUMNS)
        writer.writerows(_csv_line(row) for row in everything)
        atomic_write_text(out / "predictions.csv", buffer.getvalue())
    distributed.barrier(world)
    rows_file.unlink()
    return everything if world.main else rows


def _common_parent(paths: list[Path]) -> Path:
    """Outputs mirror the inputs' folders below this one, so equal names never collide."""
    parents = [path.resolve().parent for path in paths]
    if not parents:
        return Path(".")
    common = parents[0]
    while not all(parent.is_relative_to(common) for parent in parents):
        common = common.parent
    return common


class _Rows:
    """One background thread that draws and writes each image's pictures, then appends its CSV
    line (flushed: a crash loses at most the images in flight), in the order they are put; at
    most backlog wait, so memory stays bounded while the scoring runs ahead."""

    def __init__(self, handle, backlog: int, keeper=None, model: dict | None = None) -> None:
        self.handle, self.writer, self.rows = handle, csv.writer(handle), []
        self.keeper, self.model = keeper, model or {}
        self.writer.writerow(CSV_COLUMNS)
        self.pool, self.pending, self.backlog = ThreadPoolExecutor(1), deque(), backlog

    def put(self, source, prediction: Prediction | None, error: str, pictures=None) -> None:
        self.pending.append(self.pool.submit(self._write, source, prediction, error, pictures))
        while len(self.pending) > self.backlog:
            self.pending.popleft().result()  # a failure to write stops the scoring here

    def _write(self, source, prediction: Prediction | None, error: str, pictures) -> None:
        overlay = _write_images(*pictures) if pictures is not None else None
        self.rows.append(_write_row(self.writer, self.handle, source, prediction, error))
        if self.keeper is not None:
            self._keep(source, prediction, error, overlay)

    def _keep(self, source, prediction: Prediction | None, error: str, overlay) -> None:
        try:
            data = Path(source).read_bytes()
        except (OSError, TypeError):
            data = None
        part = record.part_from("predict", str(source), data, self.model, prediction, error)
        self.keeper.keep(part, None if overlay is None else overlay.read_bytes, data)

    def close(self) -> list[dict]:
        """Wait for every row; the rows written, in order."""
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(cancel_futures=True)
        return self.rows


def _write_images(
    path: Path, base: Path, out: Path, prediction: Prediction, save_map: bool
) -> Path:
    """The image's pictures; the overlay's path."""
    folder = out / path.resolve().parent.relative_to(base)
    image = prediction.image if prediction.image is not None else scoring.read_image(path)
    overlay = folder / f"{path.stem}_overlay.png"
    visualize.write_png(overlay, visualize.overlay(image, prediction))
    visualize.write_mask(folder / f"{path.stem}_mask.png", prediction.mask)
    if save_map:
        atomic_write(
            folder / f"{path.stem}_map.npy",
            lambda temporary: _write_npy(temporary, prediction.anomaly_map),
        )
    return overlay


def _identity(detector) -> dict:
    """The model's identity for the record (as the service names it), if its file is known."""
    path = getattr(detector.runtime_, "path", None)
    if path is None or not Path(path).is_file():
        return {}
    from .service import named_identity

    return named_identity(detector, Path(path))


def _write_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as handle:  # a handle: np.save would append .npy to a bare name
        np.save(handle, array)


def _write_row(writer, handle, source, prediction: Prediction | None, error: str) -> dict:
    """One row: its CSV line written and flushed at once."""
    if prediction is None:
        row = dict(path=str(source), score=None, normalized_score=None, verdict="error")
    else:
        row = dict(
            path=str(source),
            score=prediction.score,
            normalized_score=prediction.normalized_score,
            verdict=prediction.verdict,
        )
    row["error"] = error
    writer.writerow(_csv_line(row))
    handle.flush()
    return row


def _csv_line(row: dict) -> list[str]:
    """A row as predictions.csv writes it: scores to 6 and 4 significant places, "" for none."""
    score, normalized = row["score"], row["normalized_score"]
    return [
        row["path"],
        "" if score is None else f"{score:.6g}",
        "" if normalized is None else f"{normalized:.4f}",
        row["verdict"],
        row["error"],
    ]
