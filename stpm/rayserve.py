"""stpm-serve's application as a Ray Serve deployment: N replicas, past one box.

Each replica runs the same FastAPI application as `stpm-serve` (stpm.serve.create_app over its
own stpm.catalog.Catalog), with Ray Serve's request batching (`serve.batch`) in place of
stpm.batching's queue, and Ray's autoscaling and proxy in place of a balancer of our own.

A change (a swap, a threshold) reaches one replica over HTTP. That replica applies, keeps and
audits it as stpm-serve does, then deploys the application again with the new state as the
deployment's `user_config`; Ray calls `reconfigure` on every replica, which applies it
(Catalog.apply), and the request is answered once all have it. The deployment's code version
is pinned, so the replicas are reconfigured, not restarted.

    serve run stpm.rayserve:build models=/opt/stpm/models model_file=model.onnx replicas=2

Ray Serve 2.60's one gap: a deployment's `user_config` can be changed only by deploying the
application again, and without a pinned version that restarts every replica; pinning the
version takes `options(version=..., _internal=True)`, a private argument (see `redeploy`).
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

from pydantic import BaseModel

from . import changes
from .catalog import Catalog
from .errors import StpmError
from .service import Limits
from .version import __version__

try:
    from ray import serve
except ImportError as error:  # pragma: no cover - the extra is missing
    raise StpmError("stpm.rayserve needs Ray Serve: pip install 'stpm[ray]'") from error


class Settings(BaseModel):
    """What `serve run stpm.rayserve:build key=value ...` takes (every replica gets it)."""

    models: str  # a folder of model folders, as stpm-serve --models
    model_file: str = "model.pt"
    runtime: str = "auto"
    precision: str = "f32"
    threads: int = 1  # runtime threads per replica
    replicas: int = 2  # ignored with max_replicas: autoscaling between min and max
    min_replicas: int = 1
    max_replicas: int | None = None
    max_batch: int = 4
    max_wait_ms: float = 2.0
    token_file: str | None = None
    admin_token_file: str | None = None
    audit_log: str | None = None
    route_prefix: str = "/"  # where the application was deployed (serve run's default)


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress()
class Scorer:
    """One replica: a Catalog of the models, warm before it takes a request."""

    def __init__(self, settings: dict) -> None:
        from .serve import read_token

        self.settings = Settings(**settings)
        s = self.settings
        limits = Limits(max_batch=s.max_batch, max_wait=s.max_wait_ms / 1000)
        audit = changes.AuditLog(s.audit_log or Path(s.models) / changes.AUDIT)
        self.catalog = Catalog.of_folder(
            self.load, Path(s.models), limits, audit, s.model_file, batcher=ray_batcher
        )
        self.catalog.warm()
        self.catalog.on_change = self.publish
        self.tokens = [
            read_token(Path(f)) if f else None for f in (s.token_file, s.admin_token_file)
        ]
        context = serve.get_replica_context()
        self.replica, self.app_name = context.replica_id.unique_id, context.app_name

    def load(self, path: Path):
        from .detector import STPM

        s = self.settings
        return STPM.load(path, s.runtime, threads=s.threads, precision=s.precision)

    def __serve_build_asgi_app__(self):
        from .serve import create_app

        return named(create_app(self.catalog, *self.tokens), self.replica)

    async def reconfigure(self, state: dict) -> None:
        """Ray's call on every replica when the deployment's user_config changes; what this
        replica cannot apply is raised, so that Ray (and the change's answer) reports it."""
        failed = await self.catalog.apply(state.get("models", {}))
        if failed:
            raise StpmError(f"replica {self.replica} could not apply: {'; '.join(failed)}")

    async def publish(self) -> None:
        """After a change here: deploy again with the catalog's state as user_config, so that
        every replica applies it; returns once they have."""
        state = {"models": self.catalog.wanted()}
        try:
            await asyncio.to_thread(redeploy, self.settings, state, self.app_name)
        except Exception as error:
            raise StpmError(f"made here, but not on every replica: {error}") from None


def named(app, replica: str):
    """The ASGI app, each answer naming the replica that gave it (X-Stpm-Replica)."""
    header = (b"x-stpm-replica", replica.encode())

    async def answering(scope, receive, send) -> None:
        if scope["type"] != "http":
            return await app(scope, receive, send)

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        await app(scope, receive, sending)

    return answering


class RayBatcher:
    """Ray Serve's request batching in the place of stpm.batching.Batcher: the same submit,
    the batch scored in a thread off the replica's event loop. Ray bounds what waits (its
    max_ongoing_requests and max_queued_requests); a request's deadline is Ray's timeout."""

    full, depth, closed = False, 0, False

    def __init__(self, score, limits: Limits) -> None:
        self.score = score
        batch = serve.batch(max_batch_size=limits.max_batch, batch_wait_timeout_s=limits.max_wait)
        self.submit_one = batch(self._run)

    async def _run(self, jobs: list) -> list:
        return await asyncio.to_thread(self.score, jobs, [0.0] * len(jobs))

    async def submit(self, job, deadline: float):
        return await self.submit_one(job)

    def retry_after(self) -> float:
        return 1.0

    def close(self, timeout: float = 5.0) -> None:
        self.closed = True


def ray_batcher(score, limits: Limits) -> RayBatcher:
    return RayBatcher(score, limits)


def build(args: Settings):
    """`serve run stpm.rayserve:build models=DIR ...`: the application, as the folder is."""
    return application(args)


def application(settings: Settings | dict, state: dict | None = None):
    """The application: Scorer with the settings' replicas or autoscaling, its version pinned
    to the settings and stpm's version, state as user_config (None: the folder as it is)."""
    s = settings if isinstance(settings, Settings) else Settings(**settings)
    options = {"max_ongoing_requests": max(8, 4 * s.max_batch)}
    if s.max_replicas is not None:
        options["autoscaling_config"] = {
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "target_ongoing_requests": 2 * s.max_batch,
        }
    else:
        options["num_replicas"] = s.replicas
    digest = hashlib.sha256(s.model_dump_json().encode()).hexdigest()[:12]
    options.update(version=f"stpm-{__version__}-{digest}", _internal=True)  # see the docstring
    return Scorer.options(**options, user_config=state or {"models": {}}).bind(s.model_dump())


def redeploy(settings: Settings, state: dict, name: str) -> None:
    """Deploy the application again with a new user_config: Ray reconfigures each replica
    (same version: no restart) and returns once all have it. In a thread: on a replica's own
    event loop this would wait for itself."""
    serve.run(application(settings, state), name=name, route_prefix=settings.route_prefix)
