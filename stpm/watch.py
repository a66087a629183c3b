"""stpm-watch: score the images a camera drops into a folder, each exactly once, in-process.

Many camera systems do not post images: they write files into a folder. The watcher notices
them (the watchdog library's events; polling where events do not reach, as on network
shares), waits until each file is complete (renamed in, or its size unchanged for --settle
seconds), scores it through the one scoring path, commits its row to the record, then moves it
to good/, anomalous/ or error/ (with the reason beside it), never over another file.

Exactly once, across kill -9: a file is keyed by name, size and SHA-256. A file whose row is
already in the record (the watcher died between the commit and the move) is only moved; one
without a row is scored (it died before the commit). So every file that arrived has one row.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import record
from .errors import StpmError
from .service import overlay_png

VERDICTS = ("good", "anomalous", "error")
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".filepart")


@dataclass
class Arrival:
    """A file seen in the inbox: its size and mtime when last looked at, and since when."""

    size: int
    mtime: float
    since: float
    renamed_in: bool = False


@dataclass
class Watcher:
    """Watch inbox; score with detector (an STPM), keep with keeper (stpm.record.Keeper).
    settle: seconds a file's size must stay the same; batch: files scored per call."""

    inbox: Path
    detector: object
    keeper: record.Keeper
    model: dict
    settle: float = 1.0
    batch: int = 8
    poll: bool = False
    stopping: threading.Event = field(default_factory=threading.Event)
    seen: dict[str, Arrival] = field(default_factory=dict)
    wake: threading.Event = field(default_factory=threading.Event)

    def run(self, until: Callable[[], bool] | None = None) -> None:
        """Score what arrives until stop() (or until() is true, checked between rounds)."""
        for verdict in VERDICTS:
            (self.inbox / verdict).mkdir(parents=True, exist_ok=True)
        observer = self._observe()
        try:
            while not self.stopping.is_set() and not (until and until()):
                ready = self._complete()
                for start in range(0, len(ready), self.batch):
                    if self.stopping.is_set():
                        break
                    self._handle(ready[start : start + self.batch])
                if not ready:
                    self.wake.wait(min(0.25, self.settle / 2))
                    self.wake.clear()
        finally:
            if observer is not None:
                observer.stop()
                observer.join(5)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()

    def _observe(self):
        """watchdog's observer (inotify; polling with --poll or on a network share), which
        only wakes the loop: the loop's own scan decides."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        watcher = self

        class Woken(FileSystemEventHandler):
            def on_moved(self, event) -> None:  # renamed in: complete at once
                target = Path(event.dest_path)
                if target.parent == watcher.inbox:
                    watcher.seen.pop(target.name, None)
                    watcher.seen[target.name] = Arrival(-1, -1, 0.0, renamed_in=True)
                watcher.wake.set()

            def on_any_event(self, event) -> None:
                watcher.wake.set()

        network = record.network_filesystem(self.inbox)
        observer = PollingObserver(timeout=1) if self.poll or network else Observer()
        observer.schedule(Woken(), str(self.inbox), recursive=False)
        observer.start()
        return observer

    def _complete(self) -> list[Path]:
        """The inbox's files that are complete now: renamed in, or unchanged for settle s."""
        now, ready, present = time.monotonic(), [], set()
        try:
            entries = list(os.scandir(self.inbox))
        except OSError as error:
            raise StpmError(f"cannot read the inbox {self.inbox}: {error.strerror}") from None
        for entry in sorted(entries, key=lambda e: e.name):
            name = entry.name
            if name.startswith(".") or name.lower().endswith(IGNORED_SUFFIXES):
                continue
            with contextlib.suppress(OSError):
                if not entry.is_file(follow_symlinks=False):
                    continue
                stat = entry.stat(follow_symlinks=False)
                present.add(name)
                known = self.seen.get(name)
                if known is not None and known.renamed_in:
                    ready.append(Path(entry.path))
                elif known is None or (known.size, known.mtime) != (stat.st_size, stat.st_mtime):
                    self.seen[name] = Arrival(stat.st_size, stat.st_mtime, now)
                elif now - known.since >= self.settle:
                    ready.append(Path(entry.path))
        for name in set(self.seen) - present:
            del self.seen[name]
        return ready

    def _handle(self, paths: list[Path]) -> None:
        """Score the files not in the record yet (in one call), record each, move each."""
        files, fresh = [], []
        for path in paths:
            try:
                with open(path, "rb") as handle:
                    data, identity = handle.read(), same_file(os.fstat(handle.fileno()))
            except OSError as error:  # gone, or not ours to read: it goes on
                if path.exists():
                    self._place(path, "error", f"cannot read it: {error.strerror}")
                continue
            digest = hashlib.sha256(data).hexdigest()
            earlier = self.keeper.record.seen(path.name, len(data), digest)
            if earlier is not None:  # scored before a crash, not moved yet: only move it
                self._place(path, earlier["verdict"], earlier.get("error"), identity)
                continue
            files.append((path, data, identity))
            fresh.append(data)
        if not files:
            return
        outcomes = self.detector.predict_iter(fresh, batch_size=len(fresh), keep_images=True)
        for (path, data, identity), (_, outcome) in zip(files, outcomes, strict=True):
            error = outcome if isinstance(outcome, Exception) else None
            prediction = None if error else outcome
            part = record.part_from("watcher", path.name, data, self.model, prediction, error)
            draw = None if prediction is None else (lambda p=prediction: overlay_png(p))
            self.keeper.keep(part, draw, data)
            self._place(path, part["verdict"], part.get("error"), identity)
            self.seen.pop(path.name, None)

    def _place(self, path: Path, verdict: str, reason: str | None, identity=None) -> Path | None:
        """Move the file into its verdict's folder under a name no other file has there; an
        error's reason is written beside it. identity: the file as it was read; a file
        replaced or rewritten since stays in the inbox, to be scored as the new file it is."""
        if identity is not None:
            try:
                if same_file(os.stat(path)) != identity:
                    return None
            except OSError:
                return None
        target = unique_move(path, self.inbox / verdict)
        if target is not None and verdict == "error" and reason:
            with contextlib.suppress(OSError):
                target.with_name(target.name + ".reason.txt").write_text(reason + "\n")
        return target


def same_file(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one file from another at a path: device, inode, size, modification time."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def unique_move(path: Path, folder: Path) -> Path | None:
    """Move path into folder, adding -1, -2, ... before the suffix if the name is taken: never
    over another file (a hard link claims the name atomically). None if path is gone."""
    for number in range(10_000):
        name = path.name if number == 0 else f"{path.stem}-{number}{path.suffix}"
        target = folder / name
        try:
            os.link(path, target)
        except FileExistsError:
            try:
                moved = os.path.samefile(path, target)  # before a crash, not yet unlinked
            except FileNotFoundError:
                return None
            if moved:
                path.unlink(missing_ok=True)
                return target
            continue
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
                raise
            if target.exists():  # no hard links here (another disk): check, then move
                continue
            shutil.move(path, target)
            return target
        path.unlink(missing_ok=True)
        return target
    raise StpmError(f"no free name for {path.name} in {folder}")
