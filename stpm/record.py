"""The record of every scored part: one SQLite database (WAL) in a record folder on a local disk.

Whoever scores (the service, the watcher, stpm-predict) adds a row per part and commits it
before the part's answer goes out; the part's overlay may be written after it, so the row says
"pending" until the file is in place and, after a crash, "missing", never a broken link. WAL
lets the page read while parts are written, and a kill at any moment loses at most the part in
flight (synchronous=NORMAL: a committed row survives the process; the database never breaks).
WAL needs a local disk, so a record folder on a network share is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from datetime import time as clock
from pathlib import Path

from . import scoring
from .errors import StpmError
from .files import atomic_write

log = logging.getLogger("stpm.record")
DATABASE = "record.sqlite"
OVERLAYS = "overlays"  # <record>/overlays/<YYYY-MM-DD>/<id>.png
IMAGES = "images"  # <record>/images/<YYYY-MM-DD>/<id>.<suffix>, with Keeper(keep_originals=True)
NETWORK_FILESYSTEMS = {"nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph"}
NETWORK_FILESYSTEMS |= {"glusterfs", "lustre", "fuse.sshfs", "fuse.rclone", "davfs", "fuse.s3fs"}
SCHEMA = """
CREATE TABLE IF NOT EXISTS parts (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,             -- Unix seconds
    shift REAL NOT NULL,            -- the start of the part's shift, Unix seconds
    source TEXT NOT NULL,           -- service, watcher or predict
    name TEXT,
    size INTEGER,                   -- bytes of the file as received
    sha256 TEXT,
    score REAL,
    normalized_score REAL,
    image_term REAL,
    verdict TEXT NOT NULL,          -- good, anomalous or error
    threshold REAL,
    model_name TEXT,
    model_sha256 TEXT,
    model TEXT,                     -- the model's identity, JSON
    error TEXT,
    overlay TEXT,                   -- its file, relative to the record folder
    overlay_state TEXT NOT NULL,    -- none, pending, written, missing or removed
    image TEXT                      -- the image as received, if kept (relative)
);
CREATE INDEX IF NOT EXISTS parts_by_time ON parts (time);
CREATE INDEX IF NOT EXISTS parts_by_verdict ON parts (verdict, time);
CREATE INDEX IF NOT EXISTS parts_by_score ON parts (score);
CREATE INDEX IF NOT EXISTS parts_by_file ON parts (name, size, sha256);
CREATE TABLE IF NOT EXISTS marks (
    id INTEGER PRIMARY KEY,
    part INTEGER NOT NULL REFERENCES parts (id) ON DELETE CASCADE,
    mark TEXT,                      -- false_alarm, defect, or NULL: the mark undone
    role TEXT,
    who TEXT,
    time REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS marks_by_part ON marks (part, id);
"""
COLUMNS = (
    "time", "shift", "source", "name", "size", "sha256", "score", "normalized_score",
    "image_term", "verdict", "threshold", "model_name", "model_sha256", "model", "error",
    "overlay", "overlay_state",
)  # fmt: skip


@dataclass(frozen=True)
class Shifts:
    """Shifts by their start times of day, local time (default: calendar days)."""

    starts: tuple[clock, ...] = (clock(0, 0),)

    @classmethod
    def parse(cls, text: str | None) -> Shifts:
        """'06:00,14:00,22:00' -> three shifts a day; None or '' -> calendar days."""
        if not text:
            return cls()
        try:
            starts = sorted({clock.fromisoformat(part.strip()) for part in text.split(",")})
        except ValueError:
            raise StpmError(
                f"shifts are start times like 06:00,14:00,22:00, not {text!r}"
            ) from None
        return cls(tuple(starts))

    def start_of(self, moment: float) -> float:
        """The start of the shift holding this moment (Unix seconds)."""
        when = datetime.fromtimestamp(moment)
        for day in (when.date(), when.date() - timedelta(days=1)):
            for start in reversed(self.starts):
                begun = datetime.combine(day, start)
                if begun <= when:
                    return begun.timestamp()
        raise AssertionError("a shift always starts within a day")


def network_filesystem(folder: Path) -> str | None:
    """The kind of network share the folder is on ("nfs4", "cifs", ...), or None."""
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:  # not Linux: nothing to go by
        return None
    where, kind = Path("/"), ""
    resolved = folder.resolve()
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = Path(fields[1].replace("\\040", " "))
        inside = resolved == point or point in resolved.parents
        if inside and len(point.parts) >= len(where.parts):
            where, kind = point, fields[2]
    return kind if kind in NETWORK_FILESYSTEMS else None


def check_local(folder: Path) -> None:
    """StpmError if the folder is on a network share (SQLite's WAL needs a local disk)."""
    kind = network_filesystem(folder)
    if kind is not None:
        raise StpmError(
            f"the record folder {folder} is on a network share ({kind}): SQLite's WAL needs a "
            "local disk; put the record on one (the images may come from a share)"
        )


class Record:
    """The record folder: the database, the overlays. Thread-safe: writes go through one
    connection under a lock; each reading thread gets its own connection."""

    def __init__(
        self, folder: str | Path, shifts: Shifts | None = None, read_only: bool = False
    ) -> None:
        """read_only: only read an existing record (stpm-review; a copy, a share or another
        user's files are fine), never change it."""
        self.folder, self.shifts, self.read_only = Path(folder), shifts or Shifts(), read_only
        self._lock, self._local = threading.Lock(), threading.local()
        if read_only:
            if not (self.folder / DATABASE).is_file():
                raise StpmError(f"no record in {folder} (stpm-serve --record makes one)")
            self._writer = self._connect()
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StpmError(f"cannot make the record folder {folder}: {error.strerror}") from None
        check_local(self.folder)
        self._writer = self._connect()
        mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":
            raise StpmError(f"the record in {folder} cannot use WAL (journal mode {mode})")
        with self._lock:
            self._writer.executescript(SCHEMA)
            columns = {row[1] for row in self._writer.execute("PRAGMA table_info(parts)")}
            if "image" not in columns:  # a record from before images could be kept
                self._writer.execute("ALTER TABLE parts ADD COLUMN image TEXT")
        self.recover()

    def _connect(self) -> sqlite3.Connection:
        where = (self.folder / DATABASE).resolve()
        target = f"file:{where}?mode=ro" if self.read_only else str(where)
        try:
            connection = sqlite3.connect(
                target, timeout=30, check_same_thread=False, isolation_level=None, uri=True
            )
            if not self.read_only:
                connection.execute("PRAGMA synchronous=NORMAL")
                connection.execute("PRAGMA foreign_keys=ON")
        except sqlite3.Error as error:
            raise StpmError(f"cannot open the record in {self.folder}: {error}") from None
        connection.row_factory = sqlite3.Row
        return connection

    def _reader(self) -> sqlite3.Connection:
        if getattr(self._local, "connection", None) is None:
            self._local.connection = self._connect()
        return self._local.connection

    def recover(self, grace: float = 120.0) -> None:
        """Overlays a crash left pending: written if the file is there (written atomically),
        else missing. Only those older than grace seconds: another process (a service, a
        torchrun rank) may be writing the newer ones now."""
        pending = (
            self._reader()
            .execute(
                "SELECT id, overlay FROM parts WHERE overlay_state = 'pending' AND time < ?",
                (time.time() - grace,),
            )
            .fetchall()
        )
        for row in pending:
            there = row["overlay"] and (self.folder / row["overlay"]).is_file()
            self.set_overlay_state(row["id"], "written" if there else "missing")

    # ------------------------------------------------------------------ writing

    def add(self, part: dict, overlay: bool = False) -> int:
        """Commit one part (keys of COLUMNS; time, shift and the overlay's file filled in) and
        return its id. overlay: an overlay will follow (write_overlay), pending until then."""
        row = {key: part.get(key) for key in COLUMNS}
        row["time"] = row["time"] or time.time()
        row["shift"] = self.shifts.start_of(row["time"])
        if isinstance(row["model"], dict):
            row["model"] = json.dumps(row["model"], sort_keys=True)
        row["overlay_state"] = "pending" if overlay else "none"
        placeholders = ", ".join("?" for _ in COLUMNS)
        with self._lock, self._transaction():
            cursor = self._writer.execute(
                f"INSERT INTO parts ({', '.join(COLUMNS)}) VALUES ({placeholders})",
                [row[key] for key in COLUMNS],
            )
            part_id = cursor.lastrowid
            if overlay:
                day = datetime.fromtimestamp(row["time"]).strftime("%Y-%m-%d")
                self._writer.execute(
                    "UPDATE parts SET overlay = ? WHERE id = ?",
                    (f"{OVERLAYS}/{day}/{part_id}.png", part_id),
                )
        return part_id

    @contextlib.contextmanager
    def _transaction(self):
        """One transaction on the writing connection (under self._lock): all or nothing."""
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._writer.execute("ROLLBACK")
            raise
        self._writer.execute("COMMIT")

    def write_overlay(self, part_id: int, png: bytes) -> None:
        """The part's overlay file, written atomically; the row then says written (or missing
        if the file could not be written)."""
        found = self._reader().execute("SELECT overlay FROM parts WHERE id = ?", (part_id,))
        (relative,) = found.fetchone()
        try:
            atomic_write(self.folder / relative, lambda path: Path(path).write_bytes(png))
        except OSError:
            self.set_overlay_state(part_id, "missing")
            return
        self.set_overlay_state(part_id, "written")

    def write_image(self, part_id: int, data: bytes) -> None:
        """The image as received, kept beside its overlay (written atomically)."""
        kind = scoring.image_kind(data)
        found = self._reader().execute("SELECT time FROM parts WHERE id = ?", (part_id,))
        row = found.fetchone()
        if row is None:  # removed meanwhile
            return
        day = datetime.fromtimestamp(row[0]).strftime("%Y-%m-%d")
        relative = f"{IMAGES}/{day}/{part_id}{scoring.SUFFIXES.get(kind, '.bin')}"
        with contextlib.suppress(OSError):
            atomic_write(self.folder / relative, lambda path: Path(path).write_bytes(data))
            with self._lock:
                self._writer.execute("UPDATE parts SET image = ? WHERE id = ?", (relative, part_id))

    def set_overlay_state(self, part_id: int, state: str) -> None:
        with self._lock:
            self._writer.execute(
                "UPDATE parts SET overlay_state = ? WHERE id = ?", (state, part_id)
            )

    def mark(self, part_id: int, mark: str | None, role: str | None, who: str | None) -> dict:
        """Mark a part as a false alarm or a confirmed defect, or undo its mark (None); each
        is a new row of marks, so the history stays."""
        if mark not in ("false_alarm", "defect", None):
            raise StpmError("a mark is false_alarm or defect (or none, to undo)")
        with self._lock:
            if not self._writer.execute("SELECT 1 FROM parts WHERE id = ?", (part_id,)).fetchone():
                raise StpmError(f"no part {part_id} in the record")
            self._writer.execute(
                "INSERT INTO marks (part, mark, role, who, time) VALUES (?, ?, ?, ?, ?)",
                (part_id, mark, role, who, time.time()),
            )
        return {"part": part_id, "mark": mark, "role": role, "who": who}

    def clean(self, keep_days: float | None, keep_images: int | None, now: float | None = None):
        """Retention: parts older than keep_days go; overlays beyond the newest keep_images go
        (their rows stay, as 'removed'). Never anything of the current shift. Returns the
        numbers of parts and overlays removed."""
        now = time.time() if now is None else now
        current = self.shifts.start_of(now)
        doomed: list[sqlite3.Row] = []
        reader = self._reader()
        if keep_images is not None:  # files kept: an overlay written, or the image itself
            kept = "(overlay_state = 'written' OR image IS NOT NULL)"
            doomed += reader.execute(
                f"SELECT id, overlay, overlay_state, image FROM parts WHERE {kept} AND shift < ? "
                f"AND id NOT IN (SELECT id FROM parts WHERE {kept} ORDER BY id DESC LIMIT ?)",
                (current, keep_images),
            ).fetchall()
        old: list[sqlite3.Row] = []
        if keep_days is not None:
            cutoff = min(now - keep_days * 86400, current)
            old = reader.execute(
                "SELECT id, overlay, overlay_state, image FROM parts WHERE time < ?", (cutoff,)
            ).fetchall()
        for row in {r["id"]: r for r in doomed + old}.values():
            for relative in (
                row["overlay"] if row["overlay_state"] == "written" else None,
                row["image"],
            ):
                if relative:
                    with contextlib.suppress(OSError):
                        os.remove(self.folder / relative)
        for start in range(0, max(len(doomed), len(old)), 500):  # the writers wait a moment only
            with self._lock, self._transaction():
                self._writer.executemany(
                    "UPDATE parts SET image = NULL, overlay_state = CASE overlay_state "
                    "WHEN 'written' THEN 'removed' ELSE overlay_state END WHERE id = ?",
                    [(r["id"],) for r in doomed[start : start + 500]],
                )
                self._writer.executemany(
                    "DELETE FROM parts WHERE id = ?", [(r["id"],) for r in old[start : start + 500]]
                )
        return len(old), len(doomed)

    # ------------------------------------------------------------------ reading

    def part(self, part_id: int) -> dict | None:
        row = (
            self._reader()
            .execute(f"SELECT {PART_FIELDS} FROM parts WHERE id = ?", (part_id,))
            .fetchone()
        )
        return None if row is None else dict(row)

    def parts(
        self,
        since: float | None = None,
        until: float | None = None,
        verdict: str | None = None,
        mark: str | None = None,
        order: str = "newest",
        limit: int = 50,
        offset: int = 0,
    ) -> list[dict]:
        """A page of parts, newest first (or by score: order='score'), filtered by time range,
        verdict and current mark ('none': unmarked)."""
        where, values = ["1"], []
        for clause, value in (("time >= ?", since), ("time < ?", until), ("verdict = ?", verdict)):
            if value is not None:
                where.append(clause)
                values.append(value)
        if mark == "none":
            where.append("current_mark IS NULL")
        elif mark is not None:
            where.append("current_mark = ?")
            values.append(mark)
        sort = "score DESC, id DESC" if order == "score" else "id DESC"
        query = (
            f"SELECT * FROM (SELECT {PART_FIELDS} FROM parts) WHERE {' AND '.join(where)} "
            f"ORDER BY {sort} LIMIT ? OFFSET ?"
        )
        rows = self._reader().execute(query, [*values, limit, offset]).fetchall()
        return [dict(row) for row in rows]

    def counts(self, since: float) -> dict[str, int]:
        """Parts by verdict since a moment (a shift's start)."""
        rows = self._reader().execute(
            "SELECT verdict, COUNT(*) AS n FROM parts WHERE time >= ? GROUP BY verdict", (since,)
        )
        return {row["verdict"]: row["n"] for row in rows}

    def seen(self, name: str, size: int, sha256: str) -> dict | None:
        """The part the watcher recorded for this file (name, size and hash), if any: what
        makes the watcher's results exactly once."""
        row = (
            self._reader()
            .execute(
                f"SELECT {PART_FIELDS} FROM parts WHERE name = ? AND size = ? AND sha256 = ?",
                (name, size, sha256),
            )
            .fetchone()
        )
        return None if row is None else dict(row)

    def close(self) -> None:
        with self._lock:
            self._writer.close()


# each part with its current mark: the newest row of marks for it (NULL when undone or none)
PART_FIELDS = (
    "parts.*, (SELECT mark FROM marks WHERE marks.part = parts.id ORDER BY marks.id DESC "
    "LIMIT 1) AS current_mark"
)


def part_from(source: str, name, data: bytes | None, model: dict, prediction=None, error=None):
    """A part's row from what scored it: source (service, watcher, predict), the file's name and
    bytes (for its size and hash), the model's identity, and the Prediction or the error."""
    part = {
        "source": source,
        "name": name,
        "size": None if data is None else len(data),
        "sha256": None if data is None else hashlib.sha256(data).hexdigest(),
        "model_name": model.get("name"),
        "model_sha256": model.get("sha256"),
        "model": model,
    }
    if prediction is None:
        return {**part, "verdict": "error", "error": str(error)}
    return {
        **part,
        "score": prediction.score,
        "normalized_score": prediction.normalized_score,
        "image_term": prediction.image_term,
        "verdict": prediction.verdict,
        "threshold": prediction.threshold,
    }


class Keeper:
    """What a scorer hands its parts to: each part's row committed at once (before its answer
    goes out), its overlay drawn and written afterwards on a thread of its own, at most
    `backlog` waiting (beyond that the part's overlay is 'missing': the line is not slowed).
    The same thread applies the retention every `clean_every` seconds."""

    def __init__(
        self,
        record: Record,
        keep_days: float | None = None,
        keep_images: int | None = None,
        backlog: int = 64,
        clean_every: float = 600.0,
        keep_originals: bool = False,
    ) -> None:
        self.record, self.keep_days, self.keep_images = record, keep_days, keep_images
        self.keep_originals = keep_originals  # the images as received, beside the overlays
        self.clean_every, self._cleaned = clean_every, 0.0
        self._waiting: queue.Queue = queue.Queue(backlog)
        self._thread = threading.Thread(target=self._draw, name="stpm-overlays", daemon=True)
        self._thread.start()

    def keep(self, part: dict, draw: Callable[[], bytes] | None = None, image=None) -> int:
        """Commit the part; draw() makes its overlay PNG later (None: no overlay); image: the
        bytes as received, kept too with keep_originals."""
        part_id = self.record.add(part, overlay=draw is not None)
        image = image if self.keep_originals else None
        if draw is not None or image is not None:
            try:
                self._waiting.put_nowait((part_id, draw, image))
            except queue.Full:
                if draw is not None:
                    self.record.set_overlay_state(part_id, "missing")
        return part_id

    def _draw(self) -> None:
        while True:
            try:
                item = self._waiting.get(timeout=1.0)
            except queue.Empty:
                item = ()
            if item is None:
                return
            try:  # one failure (a drawing, a full disk, a locked database) loses one item
                if item:
                    self._write(*item)
                if time.monotonic() - self._cleaned > self.clean_every:
                    self._cleaned = time.monotonic()
                    if self.keep_days is not None or self.keep_images is not None:
                        self.record.clean(self.keep_days, self.keep_images)
            except Exception:
                log.exception("the record could not keep a part's files")

    def _write(self, part_id: int, draw, image) -> None:
        if image is not None:
            self.record.write_image(part_id, image)
        if draw is None:
            return
        try:
            png = draw()
        except Exception:
            self.record.set_overlay_state(part_id, "missing")
            raise
        self.record.write_overlay(part_id, png)

    def close(self, timeout: float = 30.0) -> None:
        """Write what waits (for at most timeout s), then stop."""
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):
                self._waiting.put(None, timeout=timeout)
            self._thread.join(timeout)
        if not self._thread.is_alive():
            self.record.close()
