"""stpm-serve: the scoring service for a line, on the one scoring path (stpm.scoring).

A camera PC, a PLC gateway or a MES posts one image and gets the verdict back, as stpm-predict
would give it for the same file. Built on FastAPI over uvicorn: the stack KServe's Python model
server, Ray Serve's HTTP ingress and BentoML use, so an operator who knows one knows this; it
publishes the OpenAPI schema by itself. This module reads requests, guards the door and runs the
server; the endpoints are in stpm.routes, the models by name and their changes in stpm.catalog,
and the same application runs on Ray Serve (stpm.rayserve).

What keeps it steady (each part in one place):
- the model runs on a bounded pool of worker threads behind a bounded queue (stpm.batching):
  a full queue is answered 503 with Retry-After at once; a request still queued past its deadline
  is answered 503, not scored late; a caller that hangs up is dropped unscored;
- a body larger than the limit is refused from its Content-Length (413), one that does not
  arrive in time is dropped (408), the pixel count is read from the header (413), the type from
  the file's first bytes (415), and an image that does not decode is a 422;
- `Guard`, a plain ASGI middleware, finds the bearer token's role (score or admin) in constant
  time, counts every request in Prometheus metrics and logs one JSON line per request (no
  image data, no token);
- every error is an RFC 9457 problem (application/problem+json), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import signal
import time
import warnings
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from . import alarms
from .catalog import Catalog, UnknownModel
from .changes import NotKept
from .errors import StpmError
from .intake import Problem, problem_body
from .review import current_alarms, parts_routes
from .routes import routes
from .version import __version__

log = logging.getLogger("stpm.serve")

OPEN_PATHS = ("/healthz", "/readyz", "/")  # without a token: the probes, and the page
OPEN_PREFIXES = ("/page/",)  # the page's static files, which hold no data


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


# ----------------------------------------------------------------------------- middleware


class Guard:
    """Plain ASGI middleware around the app: who is asking (the bearer token's role), one JSON
    log line and the metrics for every request. Pure ASGI, so it neither buffers nor delays a
    body. tokens: {role: token}, roles "score" (score and read) and "admin" (also change).
    Without a score token anyone may score and read; changes always need the admin token, and
    the endpoints that make them (PUT) answer 403 and audit the attempt themselves."""

    def __init__(self, app, tokens: dict[str, str], metrics) -> None:
        self.app, self.tokens, self.metrics = app, tokens, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrived, status = time.monotonic(), [0]
        role = self._role(scope)
        scope["stpm"] = {"arrived": arrived, "role": role}

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if (
                role is None
                and "score" in self.tokens
                and not is_open(scope["path"])
                and scope["method"] != "PUT"
            ):
                await send_problem(
                    send,
                    Problem(
                        401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"}
                    ),
                )
                status[0] = 401
            else:
                await self.app(scope, receive, counted)
        except Exception:  # the app's 500 is sent and logged (on_bug): no second traceback
            if not status[0]:
                await send_problem(send, Problem(500, "the service failed on this request"))
                status[0] = 500
        finally:
            self._record(scope, status[0] or 499, time.monotonic() - arrived)

    def _role(self, scope) -> str | None:
        """The role whose token the request carries (compared in constant time), or None."""
        given = b""
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, given = value.partition(b" ")
                given = given.strip() if scheme.lower() == b"bearer" else b""
                break
        found = None
        for role in ("admin", "score"):  # both compared, whatever matches
            if role in self.tokens and hmac.compare_digest(given, self.tokens[role].encode()):
                found = found or role
        return found

    def _record(self, scope, status: int, seconds: float) -> None:
        found = scope["stpm"]
        endpoint = endpoint_of(scope["path"])
        endpoint = endpoint if endpoint in self.metrics.endpoints else "other"
        self.metrics.requests.labels(endpoint, str(status), found.get("verdict", "")).inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        line = {
            "time": round(time.time(), 3),
            "client": (scope.get("client") or ("", 0))[0],
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "ms": round(seconds * 1000, 2),
            **{key: value for key, value in found.items() if key != "arrived"},
        }
        try:
            log.info(json.dumps(line, allow_nan=False, default=str))
        except ValueError:  # a NaN: the line without the numbers
            log.info(json.dumps({k: v for k, v in line.items() if not isinstance(v, float)}))


def endpoint_of(path: str) -> str:
    """The endpoint a path is a call of: a model's name replaced by {name} (for the metrics)."""
    parts = path.split("/")
    if len(parts) > 3 and parts[1:3] == ["v1", "models"]:
        parts[3] = "{name}"
    if len(parts) > 3 and parts[1:3] == ["v1", "parts"]:
        parts[3] = "{id}"
    return "/".join(parts)


async def send_problem(send, problem: Problem) -> None:
    """A problem answered straight through ASGI (before the app has run)."""
    body = json.dumps(problem_body(problem.status, problem.detail)).encode()
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    headers += [(key.lower().encode(), value.encode()) for key, value in problem.headers.items()]
    await send({"type": "http.response.start", "status": problem.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def configure_logging(stream=None) -> None:
    """One JSON line per request on stderr (or stream), nothing else from this logger."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def cores() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- the app


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    endpoints = (
        "/v1/predict",
        "/v1/overlay",
        "/v1/model",
        "/v1/threshold",
        "/v1/models",
        "/v1/models/{name}",
        "/v1/models/{name}/predict",
        "/v1/models/{name}/overlay",
        "/v1/models/{name}/threshold",
        "/v1/audit",
        "/v1/parts",
        "/v1/parts/{id}",
        "/v1/parts/{id}/overlay",
        "/v1/parts/{id}/image",
        "/v1/parts.csv",
        "/v1/parts.zip",
        "/v1/parts/{id}/mark",
        "/v1/shift",
        "/v1/alarms",
        "/metrics",
    )

    def __init__(self, catalog: Catalog, app=None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stpm_requests",
            "Requests answered",
            ["endpoint", "status", "verdict"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "stpm_request_seconds",
            "Time from arrival to answer",
            ["endpoint"],
            buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5),
            registry=self.registry,
        )
        depth = Gauge("stpm_queue_depth", "Requests waiting for a worker", registry=self.registry)
        depth.set_function(lambda: sum(s.batcher.depth for s in catalog.services.values()))

        class Models:  # read at each scrape: a swap shows at once
            def collect(self):
                info = InfoMetricFamily("stpm_model", "The models served", labels=["model"])
                for name, service in sorted(catalog.services.items()):
                    info.add_metric([name], {k: str(v) for k, v in service.identity.items()})
                yield info

        self.registry.register(Models())

        class Alarms:  # from the record, at each scrape: 1 while an alarm is on
            def collect(self):
                try:
                    found = current_alarms(app) if app is not None else {}
                except Exception:  # a busy record must not break the scrape
                    log.exception("cannot read the alarms")
                    found = {}
                gauge = GaugeMetricFamily("stpm_alarm", "Line alarms (1: on)", labels=["alarm"])
                for name, alarm in sorted(found.items()):
                    gauge.add_metric([name], float(alarm["active"]))
                yield gauge

        self.registry.register(Alarms())


def problem(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        problem_body(status, detail), status, headers, media_type="application/problem+json"
    )


async def on_problem(request: Request, error: Problem) -> JSONResponse:
    return problem(error.status, error.detail, error.headers)


async def on_unknown(request: Request, error: UnknownModel) -> JSONResponse:
    return problem(404, str(error))


async def on_not_kept(request: Request, error: NotKept) -> JSONResponse:
    return problem(503, f"not changed: {error}")  # the server's disk, not the request


async def on_stpm_error(request: Request, error: StpmError) -> JSONResponse:
    return problem(422, str(error))  # a request the model cannot honour (a bad threshold rule)


async def on_http(request: Request, error: HTTPException) -> JSONResponse:
    return problem(error.status_code, str(error.detail), error.headers)


async def on_invalid(request: Request, error: RequestValidationError) -> JSONResponse:
    said = "; ".join(f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in error.errors())
    return problem(422, said)


async def on_bug(request: Request, error: Exception) -> JSONResponse:
    log.exception("unexpected error on %s", request.url.path)  # the traceback stays in the log
    return problem(500, "the service failed on this request; its log says why")


HANDLERS = {
    Problem: on_problem,
    UnknownModel: on_unknown,
    NotKept: on_not_kept,
    StpmError: on_stpm_error,
    HTTPException: on_http,
    RequestValidationError: on_invalid,
    Exception: on_bug,
}


def create_app(
    catalog: Catalog,
    token: str | None = None,
    admin_token: str | None = None,
    rules: alarms.Rules | None = None,
):
    """The service over HTTP: the FastAPI app inside Guard. token: the bearer token scoring and
    reading require (None: open); admin_token: the one changes require (None: no changes)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        catalog.loop = asyncio.get_running_loop()
        warming = asyncio.ensure_future(asyncio.to_thread(catalog.warm))
        warming.add_done_callback(lambda _: report_failures(catalog))
        yield
        warming.cancel()
        await catalog.close()

    app = FastAPI(
        title="stpm",
        version=__version__,
        lifespan=lifespan,
        description="Anomaly scores, verdicts and overlays from stpm models.",
    )
    record = catalog.keeper.record if catalog.keeper is not None else None
    tokens = {"score": token, "admin": admin_token}
    return assembled(app, catalog, record, tokens, rules, read_only=False)


def create_review_app(record, token: str | None = None):
    """stpm-review: the page over a record folder, read-only: no model to score with, no marks,
    no changes. record: a stpm.record.Record."""
    app = FastAPI(title="stpm-review", version=__version__, description="A record, read-only.")
    return assembled(app, Catalog(load=None), record, {"score": token}, None, read_only=True)


def assembled(app, catalog: Catalog, record, tokens: dict, rules, read_only: bool) -> Guard:
    """What stpm-serve's and stpm-review's apps share: their state, the error handlers, the
    routes, and Guard around it all. tokens: {role: token or None}."""
    tokens = {role: value for role, value in tokens.items() if value}
    app.state.catalog, app.state.record = catalog, record
    app.state.rules, app.state.read_only = rules or alarms.Rules(), read_only
    app.state.roles = set(tokens)  # the roles this app knows a token for
    app.state.metrics = Metrics(catalog, app)
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.include_router(routes)
    app.include_router(parts_routes)
    return Guard(app, tokens, app.state.metrics)


def report_failures(catalog: Catalog) -> None:
    for service in catalog.services.values():
        if service.failure:
            log.error(
                json.dumps({"event": "failed", "model": service.name, "detail": service.failure})
            )


def read_token(path: Path | None) -> str | None:
    """The bearer token from its file (first line, stripped), or None."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise StpmError(f"cannot read the token file {path}: {error}") from None
    if len(token) < 16 or any(character.isspace() for character in token):
        raise StpmError(
            f"the token in {path} must be one word of at least 16 characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def check_split(workers: int, threads: int) -> None:
    """Workers times runtime threads must fit the CPUs this process may use: more only makes
    them take turns (and a worker waiting for a core holds a whole batch)."""
    if workers * threads > cores():
        raise StpmError(
            f"{workers} workers x {threads} threads is more than the {cores()} CPUs this process "
            "may use; lower --workers or --threads"
        )


def config(
    catalog: Catalog,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    tls: tuple[str, str] | None = None,
    admin_token: str | None = None,
    rules: alarms.Rules | None = None,
):
    """uvicorn's configuration for the service. tls: (certificate file, key file) for HTTPS.
    uvicorn's own access log is off: Guard writes one line per request instead."""
    import uvicorn

    limits = catalog.limits
    return uvicorn.Config(
        create_app(catalog, token, admin_token, rules),
        host=host,
        port=port,
        access_log=False,
        log_level="warning",
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
        timeout_keep_alive=5,
        # what is queued is answered by its deadline: the wait on a stop covers it
        timeout_graceful_shutdown=limits.deadline + limits.body_timeout,
    )


def serve(
    catalog: Catalog,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    tls: tuple[str, str] | None = None,
    admin_token: str | None = None,
    rules: alarms.Rules | None = None,
) -> None:
    """Run the service until interrupted (Ctrl-C or SIGTERM); SIGHUP reads the models again."""
    if token is None:
        warnings.warn(
            "no --token-file: the service is open (anyone who reaches it may score images)",
            stacklevel=2,
        )
        if host not in ("127.0.0.1", "::1", "localhost"):
            warnings.warn(
                f"serving on {host} without a token: anyone on the network may use it",
                stacklevel=2,
            )
    configure_logging()
    Server(config(catalog, host, port, token, tls, admin_token, rules), catalog).run()


class Server:
    """uvicorn's server, stopping as systemd and Kubernetes expect: on SIGTERM (or Ctrl-C) the
    service takes nothing new (/readyz answers 503), uvicorn stops accepting and waits for the
    requests in hand, whose queued ones are answered by their deadline, and the process exits 0
    on SIGTERM (uvicorn re-raises the signal it caught; the handler it restores ignores it).
    SIGHUP reads the models' folder again (Catalog.reload), as `systemctl reload` sends it."""

    def __init__(self, config, catalog: Catalog) -> None:
        import uvicorn

        self.server, self.catalog = uvicorn.Server(config), catalog
        handle_exit = self.server.handle_exit

        def draining(sig, frame) -> None:
            catalog.set_draining()
            log.info(json.dumps({"event": "stopping", "signal": signal.Signals(sig).name}))
            handle_exit(sig, frame)

        self.server.handle_exit = draining

    def reload(self, *_) -> None:
        """On SIGHUP: the catalog reads its folder again, on the event loop; each outcome is
        logged (and audited)."""
        loop = self.catalog.loop
        if loop is None or loop.is_closed() or self.catalog.draining:
            return
        who = {"role": "signal", "client": "SIGHUP"}

        def logged(future) -> None:
            try:
                outcomes = future.result()
            except Exception as error:
                outcomes = [{"outcome": f"failed: {error}"}]
            log.info(json.dumps({"event": "reload", "changes": outcomes}, default=str))

        asyncio.run_coroutine_threadsafe(self.catalog.reload(who), loop).add_done_callback(logged)

    def run(self) -> None:
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        hangup = signal.signal(signal.SIGHUP, self.reload)
        try:
            self.server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
            signal.signal(signal.SIGHUP, hangup)
