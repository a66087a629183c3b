"""The models a service serves, by name, and the changes an operator makes to them.

A swap loads the new file beside the old model, warms it and scores a probe image (it must give
a finite score) before it takes the old one's place in one step; requests already holding the
old model (reading their body, queued, in a worker's hands) finish on it, and only then is it
closed. A file that fails any of this leaves the old model serving. A threshold set by hand is
written beside the model (stpm.changes) before it takes effect, and a swap in a folder of
models is kept there too (serving.json), so a restart serves what was swapped in. Every change
and every refused attempt goes to the audit trail, with the role of the token that asked.

Free of HTTP (stpm.serve), so that Ray Serve's replicas (stpm.rayserve) apply the same changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .changes import SERVING, THRESHOLDS, AuditLog, Thresholds, now, read_json, write_json
from .errors import StpmError
from .files import atomic_write
from .service import Limits, Service, file_sha256, model_name

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a model's name, as it appears in URLs
UPLOADS = "uploads"  # where a model file sent over HTTP is kept, in its model's folder
log = logging.getLogger("stpm.serve")


class UnknownModel(StpmError):
    """No model of that name is served."""


class Catalog:
    """Services by name. load(path) -> a loaded STPM (the runtime options applied); homes:
    each name's folder, where its thresholds, uploads and chosen file are kept; folder: the
    folder of model folders a reload reads again (None: one model file, served as it is);
    batcher: the queue each Service gets (stpm.service.default_batcher if None)."""

    def __init__(
        self,
        load: Callable[[Path], Any],
        limits: Limits | None = None,
        audit: AuditLog | None = None,
        folder: Path | None = None,
        model_file: str = "model.pt",
        batcher=None,
        keeper=None,
    ) -> None:
        self.load, self.limits, self.audit = load, limits or Limits(), audit
        self.folder, self.model_file, self.batcher = folder, model_file, batcher
        self.keeper = keeper  # a stpm.record.Keeper every scored part goes to, or None
        self.services: dict[str, Service] = {}
        self.homes: dict[str, Path] = {}
        self.retiring: set[asyncio.Task] = set()
        self.draining = False  # shutting down: nothing new is installed or taken
        self.loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
        # called after each change made here (Ray Serve passes it on to every replica)
        self.on_change: Callable[[], Awaitable[None]] | None = None
        self._lock: asyncio.Lock | None = None  # one change at a time

    @classmethod
    def of_file(cls, load, path: Path, limits=None, audit=None, name=None, keeper=None):
        """One model file, named after its folder (or name)."""
        catalog = cls(load, limits, audit, keeper=keeper)
        name = name or model_name(path.resolve().parent.name)
        catalog.homes[name] = path.parent
        catalog.services[name] = catalog.open(name, path)
        return catalog

    @classmethod
    def of_folder(
        cls,
        load,
        folder: Path,
        limits=None,
        audit=None,
        model_file="model.pt",
        batcher=None,
        keeper=None,
    ):
        """Every folder in folder holding model_file, under the folder's name. One that fails
        to load is logged and audited and the others serve; StpmError if none loads."""
        catalog = cls(load, limits, audit, folder, model_file, batcher, keeper)
        found = catalog.found()
        for name, path in found.items():
            try:
                catalog.services[name] = catalog.open(name, path)
            except Exception as error:
                catalog.record("load", {"role": "start"}, name, None, path.name, said(error, path))
        if not catalog.services:
            raise StpmError(f"no model in {folder} could be loaded (see --model-file)")
        return catalog

    def found(self) -> dict[str, Path]:
        """The model file each folder serves now, by name: the file a swap chose and kept
        (serving.json) while the folder's own file is the one it replaced, else that file."""
        try:
            folders = sorted(path for path in self.folder.iterdir() if path.is_dir())
        except OSError as error:
            raise StpmError(f"cannot read the models folder {self.folder}: {error}") from None
        found = {}
        for folder in folders:
            own = folder / self.model_file
            if not NAME.fullmatch(folder.name) or not own.is_file():
                continue
            self.homes[folder.name] = folder
            try:
                chosen = read_json(folder / SERVING, "the file a swap chose")
            except StpmError:
                chosen = {}
            kept = Path(chosen.get("path", ""))
            if chosen and kept.is_file() and chosen.get("replaced") == file_sha256(own):
                found[folder.name] = kept
            else:
                found[folder.name] = own
        return found

    def open(self, name: str, path: Path) -> Service:
        """A Service for the file (not warm yet), with the threshold set by hand for it."""
        service = Service(self.load(path), path, self.limits, name, self.batcher, self.keeper)
        service.draining = self.draining
        try:  # by the SHA-256 the Service's identity took: the file is read once for it
            record = Thresholds(self.homes[name] / THRESHOLDS).get(service.identity["sha256"])
        except StpmError:  # a damaged thresholds file: its worker threads must not linger
            service.close()
            raise
        if record is not None:
            service.take_threshold(record)
        return service

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
        """Why each model that takes no request now does not (empty: all ready)."""
        if not self.services:
            return {"-": "no model is served"}
        found = {name: service.unavailable() for name, service in self.services.items()}
        return {name: why for name, why in found.items() if why}

    def set_draining(self) -> None:
        self.draining = True
        for service in self.services.values():
            service.draining = True

    # -------------------------------------------------------------------- changes

    def prepare(self, name: str, path: Path) -> Service:
        """Load, warm and probe a model beside the one serving (in a thread); StpmError says
        why it cannot serve (naming the file, not its folder)."""
        try:
            service = self.open(name, path)
        except Exception as error:  # ours, or a runtime's own on a damaged file
            raise StpmError(said(error, path)) from None
        try:
            service.warm()
        except Exception as error:
            service.close()
            raise StpmError(f"{path.name} failed its probe: {said(error, path)}") from None
        return service

    def install(self, name: str, new: Service) -> Service | None:
        """Put new in name's place (one step on the event loop: the next request gets it) and
        retire the one it replaces, which it returns; refused while the service stops."""
        if self.draining:
            new.close()
            raise StpmError("the service is stopping: nothing is swapped in")
        old = self.services.get(name)
        self.services[name] = new
        if old is not None:
            self.retire(old)
        return old

    async def swap(self, name: str, path: Path, who: dict) -> Service:
        """Put the model in path in name's place once it serves; the old one finishes what it
        holds. StpmError (the old model still serving) if it cannot serve."""
        self.get(name)  # UnknownModel before waiting for the lock
        async with self.lock:
            before = self.get(name).identity["sha256"]  # as it is now, after any swap before
            try:
                new = await asyncio.to_thread(self.prepare, name, path)
                if self.folder is not None:  # kept first: a reload or a restart serves it too
                    try:
                        await asyncio.to_thread(self.keep_choice, name, path)
                    except StpmError:
                        new.close()
                        raise
                self.install(name, new)
            except StpmError as error:
                self.record("swap", who, name, before, path.name, str(error))
                raise
            self.record("swap", who, name, before, new.identity["sha256"])
        return new

    def keep_choice(self, name: str, path: Path) -> None:
        own = self.homes[name] / self.model_file
        replaced = file_sha256(own) if own.is_file() else None
        chosen = {"path": str(path.resolve()), "replaced": replaced, "time": now()}
        write_json(self.homes[name] / SERVING, chosen)

    async def reload(self, who: dict) -> list[dict]:
        """Read the folder again: swap each model whose file changed, add new ones, retire the
        ones gone. Each outcome is audited; one failure leaves that model as it was."""
        if self.folder is None or self.draining:
            return []
        async with self.lock:
            found = await asyncio.to_thread(self.found)
            if not found:
                return [self.record("reload", who, None, None, None, "the folder holds no model")]
            outcomes = []
            for name in set(self.services) - set(found):
                old = self.services.pop(name)
                self.retire(old)
                outcomes.append(self.record("remove", who, name, old.identity["sha256"], None))
            for name, path in found.items():
                outcomes.append(await self._reload_one(name, path, who))
        return [outcome for outcome in outcomes if outcome]

    async def _reload_one(self, name: str, path: Path, who: dict) -> dict | None:
        old = self.services.get(name)
        if old is not None and old.identity["sha256"] == await asyncio.to_thread(file_sha256, path):
            return None
        action, before = ("swap", old.identity["sha256"]) if old else ("add", None)
        try:
            new = await asyncio.to_thread(self.prepare, name, path)
            self.install(name, new)
        except StpmError as error:
            return self.record(action, who, name, before, path.name, str(error))
        return self.record(action, who, name, before, new.identity["sha256"])

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

    async def set_threshold(
        self, name: str, threshold, max_false_alarms, who: dict, note: str | None = None
    ) -> dict:
        """Judge name's model by a new threshold from now on, kept beside it first (a write
        that fails changes nothing: changes.NotKept). Returns the record: value, rule, who,
        when. Audited, whether made or refused."""
        async with self.lock:  # not while a swap replaces the model
            service = self.get(name)
            before, sha = service.threshold, service.identity["sha256"]
            try:
                if threshold is None and max_false_alarms is None:
                    raise StpmError("give threshold or max_false_alarms")
                value = service.threshold_for(threshold, max_false_alarms)
                record = {
                    "threshold": value,
                    "max_false_alarms": max_false_alarms,
                    "model_sha256": sha,
                    "role": who.get("role"),
                    "client": who.get("client"),
                    "note": note,
                    "time": now(),
                }
                thresholds = Thresholds(self.homes[name] / THRESHOLDS)
                await asyncio.to_thread(thresholds.set, sha, record)
            except StpmError as error:
                self.record("threshold", who, name, before, threshold, str(error))
                raise
            service.take_threshold(record)
            self.record("threshold", who, name, before, value, model_sha256=sha, note=note)
        return record

    async def changed(self) -> None:
        """After a change made here: tell whoever listens (on_change)."""
        if self.on_change is not None:
            await self.on_change()

    def wanted(self) -> dict:
        """What is served, as data: each model's file, its SHA-256 and the threshold set for
        it by hand (the state Ray Serve's replicas share through user_config)."""
        return {
            name: {
                "path": str(service.path),
                "sha256": service.identity["sha256"],
                "threshold_set": service.threshold_set,
            }
            for name, service in sorted(self.services.items())
        }

    async def apply(self, wanted: dict) -> list[str]:
        """Serve what `wanted` describes (changes made elsewhere, audited there): a model of
        another SHA-256 is swapped in, a threshold set for the model served is taken. Returns
        what could not be applied (those models stay as they were)."""
        failed = []
        async with self.lock:
            for name, entry in wanted.items():
                service = self.services.get(name)
                if service is None or service.identity["sha256"] != entry["sha256"]:
                    path = Path(entry["path"])
                    self.homes.setdefault(name, path.parent)
                    try:
                        service = await asyncio.to_thread(self.prepare, name, path)
                        if service.identity["sha256"] != entry["sha256"]:
                            service.close()
                            raise StpmError(f"{path.name} has changed since it was swapped in")
                        self.install(name, service)
                    except StpmError as error:
                        failed.append(f"{name}: {error}")
                        continue
                record = entry.get("threshold_set")
                if record is not None and record.get("model_sha256") == entry["sha256"]:
                    service.take_threshold(record)
        return failed

    def record(self, action, who, model, before, after, error: str | None = None, **more):
        """An audit line (when there is a trail): what, on which model, from, to, by whom. A
        trail that cannot be written is logged, not raised: the change has been made."""
        entry = {"model": model, "from": before, "to": after, **who, **more}
        entry["outcome"] = "failed: " + error if error else "done"
        if self.audit is None:
            return entry
        try:
            return self.audit.record(action, **entry)
        except OSError as error:
            log.error("cannot write the audit trail (%s): %s", error, entry)
            return entry

    def refused(self, action: str, who: dict, model: str | None, detail: str) -> None:
        known = model if model is None or NAME.fullmatch(model) else "(not a model name)"
        self.record(action, who, known, None, None, error=detail)

    def retire(self, service: Service) -> None:
        """Close a replaced model once no request holds it (bounded: by then each has been
        answered or has given up)."""

        async def when_done() -> None:
            limits, clock = service.limits, asyncio.get_running_loop().time
            until = clock() + limits.deadline + limits.body_timeout + 1
            while service.holding and clock() < until:
                await asyncio.sleep(0.01)
            await asyncio.to_thread(service.close)

        task = asyncio.ensure_future(when_done())
        self.retiring.add(task)
        task.add_done_callback(self.retiring.discard)

    async def close(self) -> None:
        """Close every model, after the replaced ones have finished."""
        self.draining = True
        async with self.lock:  # a change under way finishes (and is refused by install)
            if self.retiring:
                await asyncio.wait(set(self.retiring), timeout=30)
            for service in self.services.values():
                await asyncio.to_thread(service.close)
            if self.keeper is not None:  # the overlays still waiting are written
                await asyncio.to_thread(self.keeper.close)

    @property
    def lock(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock


def said(error: Exception, path: Path) -> str:
    """An error's words with the file's folders left out (answers and the trail name files,
    not where they live on the server)."""
    text = str(error)
    for where in (str(path.resolve()), str(path)):
        text = text.replace(where, path.name)
    for where in (str(path.resolve().parent), str(path.parent)):
        text = text.replace(where + "/", "").replace(where, "its folder")
    return text
