"""The changes made to a running service, kept across restarts: thresholds set by hand, the
file a swap chose, and the audit trail. (stpm.record is the other record: the scored parts.)

A threshold is kept beside the model, keyed by the model file's SHA-256: a restart, or a swap
back to the same file, finds it, and a different model never inherits it. The audit trail is
a JSON-lines file, one line per change or refused attempt, each line appended in one write (a
crash leaves whole lines). Neither holds a token: only the role that presented it.
"""

from __future__ import annotations

import collections
import json
import math
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from .errors import StpmError
from .files import atomic_write_text

THRESHOLDS = "thresholds.json"
AUDIT = "audit.jsonl"
SERVING = "serving.json"  # the file a swap chose for a model folder, kept across restarts
_WRITING = threading.Lock()  # one read-change-write of a thresholds file at a time


def now() -> str:
    """The time as ISO 8601 in UTC, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Thresholds:
    """Thresholds set by hand in one JSON file, {sha256: record}; each record says the value,
    the rule it came from, who set it and when. Written atomically (stpm.files)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def get(self, sha256: str) -> dict | None:
        return self._read().get(sha256)

    def set(self, sha256: str, record: dict) -> None:
        """Store the record for this model; StpmError if the file cannot be written (the
        caller then leaves the threshold as it was)."""
        with _WRITING:
            kept = self._read()
            kept[sha256] = record
            write_json(self.path, kept)

    def _read(self) -> dict:
        return read_json(self.path, "thresholds by model SHA-256")


class NotKept(StpmError):
    """A change could not be written down, so it was not made."""


def read_json(path: Path, holds: str) -> dict:
    """A JSON object from a file of ours ({} when there is none); StpmError if damaged."""
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise StpmError(f"cannot read {path.name} in {path.parent.name}: {error}") from None
    if not isinstance(kept, dict):
        raise StpmError(f"{path.name} in {path.parent.name} does not hold {holds}")
    return kept


def write_json(path: Path, kept: dict) -> None:
    """Atomically; NotKept if the file cannot be written."""
    try:
        atomic_write_text(path, json.dumps(kept, indent=2, allow_nan=False) + "\n")
    except OSError as error:
        raise NotKept(f"cannot write {path.name}: {error.strerror}") from None


class AuditLog:
    """An append-only JSON-lines log: time, action, model, from, to, role, client, outcome."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640))
        except OSError as error:
            raise StpmError(f"cannot write the audit log {self.path}: {error.strerror}") from None

    def record(self, action: str, **entry) -> dict:
        """Append one line (one write of an O_APPEND file, then fsync) and return it. OSError
        if it cannot be written (the caller logs it: the change itself has been made)."""
        line = {"time": now(), "action": action, **entry}
        for key, value in line.items():  # a NaN asked for: in words (the file stays JSON)
            if isinstance(value, float) and not math.isfinite(value):
                line[key] = repr(value)
        data = (json.dumps(line, allow_nan=False, default=str) + "\n").encode()
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(handle, data)
            os.fsync(handle)
        finally:
            os.close(handle)
        return line

    def read(self, last: int = 100) -> list[dict]:
        """The last `last` entries, oldest first; a torn line is skipped."""
        entries: collections.deque = collections.deque(maxlen=last)
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for text in handle:
                try:
                    entries.append(json.loads(text))
                except ValueError:
                    continue
        return list(entries)
