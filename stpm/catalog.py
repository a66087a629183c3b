"""The models a service serves, by name, and the changes an operator makes to them.

A swap loads the new file beside the old model, warms it and scores a probe image (it must give
a finite score) before it takes the old one's place in one step; requests already holding the
old model (reading their body, queued, in a worker's hands) finish on it, and only then is it
closed. A file that fails any of this leaves the old model serving. A threshold set by hand is
written beside the model (stpm.records) before it takes effect. Every change and every refused
attempt goes to the audit trail, with the role of the token that asked.

Free of HTTP (stpm.serve), so that Ray Serve's replicas (stpm.rayserve) apply the same changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .errors import StpmError
from .files import atomic_write
from .records import THRESHOLDS, AuditLog, Thresholds, now
from .service import Limits, Service, file_sha256

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a model's name, as it appears in URLs
UPLOADS = "uploads"  # where a model file sent over HTTP is kept, in its model's folder


class UnknownModel(StpmError):
    """No model of that name is served."""


class Catalog:
    """Services by name. load(path) -> a loaded STPM (the runtime options applied); home: each
    name's folder, where its thresholds and uploads are kept; folder: the folder of model
    folders that a reload reads again (None: one model file, served as it is)."""

    def __init__(
        self,
        load: Callable[[Path], Any],
        limits: Limits | None = None,
        audit: AuditLog | None = None,
        folder: Path | None = None,
        model_file: str = "model.pt",
        batcher=None,
    ) -> None:
        self.load, self.limits, self.audit = load, limits or Limits(), audit
        self.folder, self.model_file, self.batcher = folder, model_file, batcher
        self.services: dict[str, Service] = {}
        self.homes: dict[str, Path] = {}
        self.retiring: set[asyncio.Task] = set()
        self._lock: asyncio.Lock | None = None  # one swap or reload at a time
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
        # called after each change made here (Ray Serve passes it on to every replica)
        self.on_change: Callable[[], Awaitable[None]] | None = None

    @classmethod
    def of_file(cls, load, path: Path, limits=None, audit=None, name: str | None = None):
        """One model file, named after its folder (or name)."""
        catalog = cls(load, limits, audit)
        catalog.add(name or model_name(path.resolve().parent.name), path, path.parent)
        return catalog

    @classmethod
    def of_folder(
        cls, load, folder: Path, limits=None, audit=None, model_file="model.pt", batcher=None
    ):
        """Every folder in folder holding model_file, under the folder's name."""
        catalog = cls(load, limits, audit, folder, model_file, batcher)
        found = catalog.found()
        if not found:
            raise StpmError(f"no folder in {folder} holds a {model_file} (see --model-file)")
        for name, path in found.items():
            catalog.add(name, path, path.parent)
        return catalog

    def found(self) -> dict[str, Path]:
        """The model files the folder holds now, by name."""
        try:
            folders = sorted(path for path in self.folder.iterdir() if path.is_dir())
        except OSError as error:
            raise StpmError(f"cannot read the models folder {self.folder}: {error}") from None
        return {
            folder.name: folder / self.model_file
            for folder in folders
            if NAME.fullmatch(folder.name) and (folder / self.model_file).is_file()
        }

    def add(self, name: str, path: Path, home: Path) -> Service:
        """Load a model (not warmed yet) under name."""
        self.homes[name] = home
        self.services[name] = self.open(name, path)
        return self.services[name]

    def open(self, name: str, path: Path) -> Service:
        """A Service for the file, with the threshold set by hand for it, if any."""
        service = Service(self.load(path), path, self.limits, name, self.batcher)
        record = self.thresholds(name).get(service.identity["sha256"])
        if record is not None:
            service.threshold, service.threshold_set = record["threshold"], record
        return service

    def thresholds(self, name: str) -> Thresholds:
        return Thresholds(self.homes[name] / THRESHOLDS)

    def get(self, name: str) -> Service:
        if name not in self.services:
            known = ", ".join(sorted(self.services)) or "none"
            raise UnknownModel(f"no model named {name!r} is served (served: {known})")
        return self.services[name]

    def only(self) -> Service:
        """The one model, for the endpoints that name none."""
        if len(self.services) != 1:
            raise UnknownModel(
                f"{len(self.services)} models are served: name one, "
                f"/v1/models/{{name}}/... ({', '.join(sorted(self.services))})"
            )
        return next(iter(self.services.values()))

    def warm(self) -> None:
        """Warm every model; one that fails says why (Service.failure), the others serve."""
        for service in list(self.services.values()):
            if service.ready.is_set():
                continue
            try:
                service.warm()
            except Exception as error:
                service.failure = f"warming the model failed: {error}"

    def unavailable(self) -> dict[str, str]:
        """Why each model that takes no request now does not (an empty dict: all ready)."""
        found = {name: service.unavailable() for name, service in self.services.items()}
        return {name: why for name, why in found.items() if why}

    def set_draining(self) -> None:
        for service in self.services.values():
            service.draining = True

    # -------------------------------------------------------------------- changes

    def prepare(self, name: str, path: Path) -> Service:
        """Load, warm and probe a model beside the one serving (in a thread); StpmError says
        why it cannot serve."""
        try:
            service = self.open(name, path)
        except StpmError:
            raise
        except Exception as error:  # a runtime's own error on a damaged file
            raise StpmError(f"cannot load {path.name}: {error}") from None
        try:
            service.warm()
        except Exception as error:
            service.close()
            raise StpmError(f"{path.name} failed its probe: {error}") from None
        return service

    async def swap(self, name: str, path: Path, who: dict) -> Service:
        """Put the model in path in name's place once it serves; the old one finishes what it
        holds. StpmError (the old model still serving) if it cannot serve."""
        old = self.get(name)
        async with self.lock:
            try:
                new = await asyncio.to_thread(self.prepare, name, path)
            except StpmError as error:
                self.record("swap", who, name, old.identity["sha256"], path.name, error=str(error))
                raise
            self.services[name] = new  # one step on the event loop: the next request gets it
            self.record("swap", who, name, old.identity["sha256"], new.identity["sha256"])
            self.retire(old)
        return new

    async def reload(self, who: dict) -> list[dict]:
        """Read the folder again: swap each model whose file changed, add new ones, retire the
        ones gone. Each outcome is audited; one failure leaves that model as it was."""
        if self.folder is None:
            return []
        async with self.lock:
            found, outcomes = await asyncio.to_thread(self.found), []
            for name in set(self.services) - set(found):
                old = self.services.pop(name)
                outcomes.append(self.record("remove", who, name, old.identity["sha256"], None))
                self.retire(old)
            for name, path in found.items():
                outcomes.append(await self._reload_one(name, path, who))
        return [outcome for outcome in outcomes if outcome]

    async def _reload_one(self, name: str, path: Path, who: dict) -> dict | None:
        old = self.services.get(name)
        self.homes[name] = path.parent
        if old is not None and old.identity["sha256"] == await asyncio.to_thread(file_sha256, path):
            return None
        before = old.identity["sha256"] if old else None
        try:
            new = await asyncio.to_thread(self.prepare, name, path)
        except StpmError as error:
            return self.record("swap" if old else "add", who, name, before, path.name, str(error))
        self.services[name] = new
        if old is not None:
            self.retire(old)
        return self.record("swap" if old else "add", who, name, before, new.identity["sha256"])

    def keep_upload(self, name: str, data: bytes) -> Path:
        """A model file sent over HTTP, kept in name's folder under its SHA-256 (a zip is a
        model.pt, anything else is taken for ONNX), written atomically; its path."""
        if not data:
            raise StpmError("the body is empty: send a model file")
        suffix = ".pt" if data.startswith(b"PK\x03\x04") else ".onnx"
        target = self.homes[name] / UPLOADS / f"{hashlib.sha256(data).hexdigest()}{suffix}"
        try:
            return atomic_write(target, lambda path: Path(path).write_bytes(data))
        except OSError as error:
            raise StpmError(f"cannot keep the uploaded model: {error.strerror}") from None

    def set_threshold(
        self,
        name: str,
        threshold: float | None,
        max_false_alarms: float | None,
        who: dict,
        note: str | None = None,
    ) -> dict:
        """Judge name's model by a new threshold from now on, kept beside it first (a write
        that fails changes nothing). Returns the record: value, rule, who and when."""
        service = self.get(name)
        if threshold is None and max_false_alarms is None:
            raise StpmError("give threshold or max_false_alarms")
        value = service.threshold_for(threshold, max_false_alarms)
        record = {
            "threshold": value,
            "max_false_alarms": max_false_alarms,
            "role": who.get("role"),
            "client": who.get("client"),
            "note": note,
            "time": now(),
        }
        before, sha = service.threshold, service.identity["sha256"]
        self.thresholds(name).set(sha, record)
        service.threshold, service.threshold_set = value, record
        self.record("threshold", who, name, before, value, model_sha256=sha, note=note)
        return record

    async def changed(self) -> None:
        """After a change made here: tell whoever listens (on_change)."""
        if self.on_change is not None:
            await self.on_change()

    def wanted(self) -> dict:
        """What is served, as data: each model's file and the threshold set for it by hand (the
        state Ray Serve's replicas share through user_config)."""
        return {
            name: {"path": str(service.path), "threshold_set": service.threshold_set}
            for name, service in sorted(self.services.items())
        }

    async def apply(self, wanted: dict) -> None:
        """Serve what `wanted` describes (a change made elsewhere, already audited there): a
        model whose file differs is swapped (one that fails keeps the old model), a threshold
        set by hand is taken."""
        async with self.lock:
            for name, entry in wanted.items():
                path, service = Path(entry["path"]), self.services.get(name)
                if service is None or service.path != path:
                    self.homes.setdefault(name, path.parent)
                    try:
                        new = await asyncio.to_thread(self.prepare, name, path)
                    except StpmError:
                        continue
                    self.services[name] = new
                    if service is not None:
                        self.retire(service)
                    service = new
                record = entry.get("threshold_set")
                if record is not None:
                    service.threshold, service.threshold_set = record["threshold"], record

    def record(self, action, who, model, before, after, error: str | None = None, **more):
        """An audit line (when there is a trail): what, on which model, from, to, by whom."""
        entry = {"model": model, "from": before, "to": after, **who, **more}
        entry["outcome"] = "failed: " + error if error else "done"
        return self.audit.record(action, **entry) if self.audit else entry

    def refused(self, action: str, who: dict, model: str | None, detail: str) -> None:
        self.record(action, who, model, None, None, error=detail)

    def retire(self, service: Service) -> None:
        """Close a replaced model once no request holds it (bounded: by then each has been
        answered or has given up)."""

        async def when_done() -> None:
            limits = service.limits
            until = asyncio.get_running_loop().time() + limits.deadline + limits.body_timeout + 1
            while service.holding and asyncio.get_running_loop().time() < until:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(service.close)

        task = asyncio.ensure_future(when_done())
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def close(self) -> None:
        """Close every model, after the replaced ones have finished."""
        if self.retiring:
            await asyncio.wait(set(self.retiring), timeout=30)
        for service in self.services.values():
            await asyncio.to_thread(service.close)

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock


def model_name(text: str) -> str:
    """A name fit for URLs made from a folder's name."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:64]
    return name or "model"
