"""What a service remembers across restarts: thresholds set by hand, and the audit trail.

A threshold is kept beside the model, keyed by the model file's SHA-256: a restart, or a swap
back to the same file, finds it, and a different model never inherits it. The audit trail is
a JSON-lines file, one line per change or refused attempt, each line appended in one write (a
crash leaves whole lines). Neither holds a token: only the role that presented it.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path

from .errors import StpmError
from .files import atomic_write_text

THRESHOLDS = "thresholds.json"
AUDIT = "audit.jsonl"


def now() -> str:
    """The time as ISO 8601 in UTC, to the millisecond."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Thresholds:
    """Thresholds set by hand in one JSON file, {sha256: record}; each record says the value,
    the rule it came from, who set it and when. Written atomically (stpm.files)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._read()  # a damaged file is refused at start, not at the first change

    def get(self, sha256: str) -> dict | None:
        return self._read().get(sha256)

    def set(self, sha256: str, record: dict) -> None:
        """Store the record for this model; StpmError if the file cannot be written (the
        caller then leaves the threshold as it was)."""
        with self._lock:
            kept = self._read()
            kept[sha256] = record
            try:
                atomic_write_text(self.path, json.dumps(kept, indent=2, allow_nan=False) + "\n")
            except OSError as error:
                raise StpmError(f"cannot write {self.path.name}: {error.strerror}") from None

    def _read(self) -> dict:
        try:
            kept = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise StpmError(f"cannot read the thresholds in {self.path}: {error}") from None
        if not isinstance(kept, dict):
            raise StpmError(f"{self.path} does not hold thresholds by model SHA-256")
        return kept


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
        """Append one line (one write of an O_APPEND file, then fsync) and return it."""
        line = {"time": now(), "action": action, **entry}
        data = (json.dumps(line, allow_nan=False, default=str) + "\n").encode()
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(handle, data)
            os.fsync(handle)
        finally:
            os.close(handle)
        return line

    def read(self, last: int | None = None) -> list[dict]:
        """The entries, oldest first (the last `last` of them); a torn line is skipped."""
        entries = []
        with open(self.path, encoding="utf-8", errors="replace") as handle:
            for text in handle:
                try:
                    entries.append(json.loads(text))
                except ValueError:
                    continue
        return entries if last is None else entries[-last:]
