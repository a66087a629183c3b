"""stpm-serve: the scoring service for a line, on the one scoring path (stpm.scoring).

A camera PC, a PLC gateway or a MES posts one image and gets the verdict back, as stpm-predict
would give it for the same file. Built on FastAPI over uvicorn: the stack KServe's Python model
server, Ray Serve's HTTP ingress and BentoML use, so an operator who knows one knows this; it
publishes the OpenAPI schema by itself, and the next step (several models, Ray Serve) plugs in.

What keeps it steady (each part in one place):
- the model runs on a bounded pool of worker threads behind a bounded queue (stpm.batching):
  a full queue is answered 503 with Retry-After at once; a request still queued past its deadline
  is answered 503, not scored late; a caller that hangs up is dropped unscored;
- a body larger than the limit is refused from its Content-Length (413), one that does not
  arrive in time is dropped (408), the pixel count is read from the header (413), the type from
  the file's first bytes (415), and an image that does not decode is a 422;
- `Guard`, a plain ASGI middleware, checks the bearer token in constant time, counts every
  request in Prometheus metrics and logs one JSON line per request (no image data, no token);
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
import urllib.parse
import warnings
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import batching, scoring
from .errors import ImageTooLarge, StpmError
from .service import Job, Limits, Service
from .version import __version__

log = logging.getLogger("stpm.serve")

# what the first bytes of a file say it is: the types stpm.scoring decodes
SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
OPEN_PATHS = ("/healthz", "/readyz")  # answered without a token: a supervisor's probes
MAX_NAME = 255
# bodies taken as the image itself; the last is what curl --data-binary sends unless told
RAW_TYPES = ("", "application/octet-stream", "application/x-www-form-urlencoded")


class Problem(Exception):
    """An HTTP error answered as an RFC 9457 problem; headers such as Retry-After beside it."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


# ----------------------------------------------------------------------------- the request


def image_type(encoded: bytes) -> str:
    """The image type from the file's first bytes; Problem 415 for anything else."""
    for signature, kind in SIGNATURES.items():
        if encoded.startswith(signature):
            return kind
    if encoded[:4] == b"RIFF" and encoded[8:12] == b"WEBP":
        return "WebP"
    raise Problem(415, "the body is not a PNG, JPEG, BMP, TIFF or WebP image")


async def read_body(request, limits: Limits) -> bytes:
    """The whole body, or Problem 413 (over max_body: from Content-Length, unread, or counted)
    or 408 (not arrived within body_timeout; the connection is closed)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > limits.max_body):
        raise Problem(413, f"the body is over the limit of {limits.max_body:,} bytes")
    chunks, size = [], 0

    async def gather() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body:
                raise Problem(413, f"the body is over the limit of {limits.max_body:,} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(gather(), limits.body_timeout)
    except ClientDisconnect:  # gone mid-body: nobody reads the answer, the log shows 499
        raise Problem(499, "the client hung up while sending") from None
    except asyncio.TimeoutError:
        raise Problem(
            408,
            f"the body did not arrive within {limits.body_timeout:g} s",
            {"Connection": "close"},
        ) from None
    return b"".join(chunks)


async def image_from(request, body: bytes) -> tuple[bytes, str | None]:
    """The image and its filename: the body itself, or a multipart form's first file."""
    kind = request.headers.get("content-type", "application/octet-stream")
    kind = kind.split(";")[0].strip().lower()
    if kind != "multipart/form-data":
        if kind not in RAW_TYPES and not kind.startswith("image/"):
            raise Problem(415, f"send the image as the body (image/*) or multipart, not {kind}")
        return body, None
    from starlette.formparsers import MultiPartException, MultiPartParser

    async def once():
        yield body

    try:
        form = await MultiPartParser(request.headers, once(), max_files=1, max_fields=8).parse()
    except (MultiPartException, ValueError, KeyError) as error:
        raise Problem(422, f"cannot read the multipart form: {error}") from None
    uploads = [value for _, value in form.multi_items() if hasattr(value, "read")]
    if not uploads:
        raise Problem(422, "the multipart form has no file field")
    try:
        return await uploads[0].read(), uploads[0].filename
    finally:
        await uploads[0].close()


def check_image(encoded: bytes, limits: Limits) -> None:
    """Before queueing: a known type (415), not too many pixels from its header (413)."""
    if not encoded:
        raise Problem(422, "the body is empty: send an image")
    image_type(encoded)
    try:
        scoring.check_pixel_count(encoded, "the image", limits.max_pixels, strict=True)
    except ImageTooLarge as error:
        raise Problem(413, str(error)) from None


async def until_disconnected(receive: Callable) -> None:
    """Returns when the client hangs up (the body has been read: nothing else can arrive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def run_job(service: Service, job: Job, request) -> dict | None:
    """The job's answer from the queue, None if the client hung up first (the job is dropped
    unscored if it was still queued); Problem 503 when full, expired or shutting down."""
    deadline = time.monotonic() + service.limits.deadline  # from the body's arrival: a slow
    # upload (bounded by body_timeout) does not eat the time its scoring may wait
    scoring_task = asyncio.ensure_future(service.batcher.submit(job, deadline))
    watch = asyncio.ensure_future(until_disconnected(request.receive))
    try:
        await asyncio.wait({scoring_task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not scoring_task.done():
        scoring_task.cancel()
        return None
    try:
        result = scoring_task.result()
    except batching.Overloaded as error:
        raise Problem(503, str(error), {"Retry-After": str(round(error.retry_after))}) from None
    except batching.Expired as error:
        retry = str(round(service.batcher.retry_after()))
        raise Problem(503, f"not scored in time: {error}", {"Retry-After": retry}) from None
    except batching.Closed as error:
        raise Problem(503, str(error), {"Retry-After": "5"}) from None
    if isinstance(result, ImageTooLarge):
        raise Problem(413, str(result))
    if isinstance(result, StpmError):
        raise Problem(422, str(result))
    if isinstance(result, Exception):
        raise result
    return result


def header_name(name: str | None) -> str:
    """A name fit for a response header (latin-1 only): percent-encoded UTF-8."""
    return urllib.parse.quote(name or "", safe="./_-()[]")


# ----------------------------------------------------------------------------- middleware


class Guard:
    """Plain ASGI middleware around the app: the bearer token (all but OPEN_PATHS), one JSON log
    line and the metrics for every request. Pure ASGI, so it neither buffers nor delays a body."""

    def __init__(self, app, token: str | None, metrics) -> None:
        self.app, self.token, self.metrics = app, token, metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        arrived, status = time.monotonic(), [0]
        scope["stpm"] = {"arrived": arrived}

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if (
                self.token is not None
                and scope["path"] not in OPEN_PATHS
                and not self._allowed(scope)
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

    def _allowed(self, scope) -> bool:
        for key, value in scope["headers"]:
            if key == b"authorization":
                scheme, _, given = value.partition(b" ")
                expected = self.token.encode()
                return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), expected)
        return False

    def _record(self, scope, status: int, seconds: float) -> None:
        found = scope["stpm"]
        endpoint = scope["path"] if scope["path"] in self.metrics.endpoints else "other"
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


def problem_body(status: int, detail: str) -> dict[str, Any]:
    """RFC 9457's fields: no type beyond the status, a title from it, the detail in words."""
    from http import HTTPStatus

    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return {"type": "about:blank", "title": title, "status": status, "detail": detail}


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

    endpoints = ("/v1/predict", "/v1/overlay", "/v1/model", "/v1/threshold", "/metrics")

    def __init__(self, service: Service) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

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
        depth.set_function(lambda: service.batcher.depth)
        info = Info("stpm_model", "The model served", registry=self.registry)
        info.info({key: str(value) for key, value in service.identity.items()})


def problem(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        problem_body(status, detail), status, headers, media_type="application/problem+json"
    )


async def on_problem(request: Request, error: Problem) -> JSONResponse:
    return problem(error.status, error.detail, error.headers)


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
    StpmError: on_stpm_error,
    HTTPException: on_http,
    RequestValidationError: on_invalid,
    Exception: on_bug,
}


def create_app(service: Service, token: str | None = None):
    """The service over HTTP: the FastAPI app inside Guard. token: the bearer token every
    endpoint but the probes requires (None: open, and the state-changing endpoints answer 403)."""

    @contextlib.asynccontextmanager
    async def lifespan(app):
        warming = asyncio.ensure_future(asyncio.to_thread(service.warm))
        warming.add_done_callback(warm_failed)
        yield
        warming.cancel()
        await asyncio.to_thread(service.close)

    def warm_failed(task: asyncio.Future) -> None:
        if not task.cancelled() and task.exception() is not None:
            service.failure = f"warming the model failed: {task.exception()}"
            log.error(json.dumps({"event": "failed", "detail": service.failure}))

    app = FastAPI(
        title="stpm",
        version=__version__,
        lifespan=lifespan,
        description="Anomaly scores, verdicts and overlays from an stpm model.",
    )
    app.state.service, app.state.token = service, token
    app.state.metrics = Metrics(service)
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.include_router(routes)
    return Guard(app, token, app.state.metrics)


async def answer_for(request: Request, overlay: bool, threshold, max_false_alarms, name, details):
    """Read, check, queue and score one request's image: its answer, None if the client left."""
    service: Service = request.app.state.service
    check_available(service)
    # refused before the body is read: overload costs little, and the bodies held in memory
    # are bounded (twice what the queue and the workers take, each at most max_body)
    if service.batcher.full or service.holding >= 2 * service.capacity:
        retry = str(round(service.batcher.retry_after()))
        raise Problem(503, "the queue is full", {"Retry-After": retry, "Connection": "close"})
    threshold = service.threshold_for(threshold, max_false_alarms)
    service.holding += 1  # on the event loop's thread alone: no lock
    try:
        job = await job_from(request, service, name, threshold, details, overlay)
        answer = await run_job(service, job, request)
    finally:
        service.holding -= 1
    if answer is None:
        return None
    found = request.scope["stpm"]
    found.update(name=job.name, verdict=answer["verdict"], score=answer["score"])
    timings = {key: round(value, 3) for key, value in job.timings.items()}
    timings["total"] = round((time.monotonic() - found["arrived"]) * 1000, 3)
    answer["timings_ms"] = timings
    found.update(timings)
    return answer


def check_available(service: Service) -> None:
    """Problem 503 while the service takes no request: come back in a second while it warms,
    elsewhere (Connection: close) while it stops; a failed warm-up says why."""
    why = service.unavailable()
    if why is None:
        return
    if service.draining:
        raise Problem(503, why, {"Connection": "close"})
    raise Problem(503, why, {} if service.failure else {"Retry-After": "1"})


async def job_from(request: Request, service: Service, name, threshold, details, overlay) -> Job:
    """The request's image read and checked (size, time, type, pixels) and its name."""
    body = await read_body(request, service.limits)
    encoded, filename = await image_from(request, body)
    name = name if name is not None else filename
    if name is not None and len(name) > MAX_NAME:
        raise Problem(422, f"the name is longer than {MAX_NAME} characters")
    check_image(encoded, service.limits)
    return Job(encoded, name, threshold, details, overlay)


routes = APIRouter()
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "One PNG, JPEG, BMP, TIFF or WebP image (8 or 16 bit): the body itself, "
        "or the file field of a multipart form (its filename is the part's name).",
        "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
        },
    }
}
NAME = Query(None, description="the part's name, returned with its result")
THRESHOLD = Query(None, description="a raw-score threshold instead of the service's")
FALSE_ALARMS = Query(
    None,
    gt=0,
    lt=1,
    description="instead of threshold: the share of the defect-free validation images to reject",
)


@routes.post("/v1/predict", openapi_extra=IMAGE_BODY, summary="Score one image")
async def predict(
    request: Request,
    name: str | None = NAME,
    threshold: float | None = THRESHOLD,
    max_false_alarms: float | None = FALSE_ALARMS,
    details: bool = Query(False, description="add the peak and the mask's bounding boxes"),
):
    answer = await answer_for(request, False, threshold, max_false_alarms, name, details)
    return Response(status_code=499) if answer is None else JSONResponse(answer)


@routes.post(
    "/v1/overlay",
    openapi_extra=IMAGE_BODY,
    summary="The overlay PNG stpm-predict draws, the verdict in X-Stpm-* headers",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
async def overlay(
    request: Request,
    name: str | None = NAME,
    threshold: float | None = THRESHOLD,
    max_false_alarms: float | None = FALSE_ALARMS,
):
    answer = await answer_for(request, True, threshold, max_false_alarms, name, False)
    if answer is None:
        return Response(status_code=499)
    headers = {
        "X-Stpm-Name": header_name(answer["name"]),
        "X-Stpm-Score": repr(answer["score"]),
        "X-Stpm-Normalized-Score": repr(answer["normalized_score"]),
        "X-Stpm-Verdict": answer["verdict"],
        "X-Stpm-Threshold": repr(answer["threshold"]),
    }
    return Response(answer["png"], media_type="image/png", headers=headers)


@routes.get("/v1/model", summary="The model, its threshold rule and validation statistics")
async def model(request: Request):
    return JSONResponse(request.app.state.service.describe())


@routes.put("/v1/threshold", summary="Change the threshold the service judges by (needs a token)")
async def set_threshold(
    request: Request,
    threshold: float | None = Query(None, description="a raw-score threshold"),
    max_false_alarms: float | None = FALSE_ALARMS,
):
    service: Service = request.app.state.service
    if request.app.state.token is None:
        raise Problem(
            403,
            "this service runs without a token: nothing can be changed "
            "(start stpm-serve with --token-file)",
        )
    if threshold is None and max_false_alarms is None:
        raise Problem(422, "give threshold or max_false_alarms")
    service.threshold = service.threshold_for(threshold, max_false_alarms)
    log.info(json.dumps({"event": "threshold", "threshold": service.threshold}))
    return JSONResponse({"threshold": service.threshold})


@routes.get("/healthz", summary="Alive")
async def healthz(request: Request):
    if request.app.state.service.failure:  # alive, but of no use: a supervisor restarts it
        raise Problem(503, request.app.state.service.failure)
    return {"status": "alive"}


@routes.get("/readyz", summary="The model is loaded and warm")
async def readyz(request: Request):
    check_available(request.app.state.service)
    return {"status": "ready"}


@routes.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def check_split(workers: int, threads: int) -> None:
    """Workers times runtime threads must fit the CPUs this process may use: more only makes
    them take turns (and a worker waiting for a core holds a whole batch)."""
    if workers * threads > cores():
        raise StpmError(
            f"{workers} workers x {threads} threads is more than the {cores()} CPUs this process "
            "may use; lower --workers or --threads"
        )


def config(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    tls: tuple[str, str] | None = None,
):
    """uvicorn's configuration for the service. tls: (certificate file, key file) for HTTPS.
    uvicorn's own access log is off: Guard writes one line per request instead."""
    import uvicorn

    return uvicorn.Config(
        create_app(service, token),
        host=host,
        port=port,
        access_log=False,
        log_level="warning",
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
        timeout_keep_alive=5,
        # what is queued is answered by its deadline: the wait on a stop covers it
        timeout_graceful_shutdown=service.limits.deadline + service.limits.body_timeout,
    )


def serve(
    service: Service,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    tls: tuple[str, str] | None = None,
) -> None:
    """Run the service until interrupted (Ctrl-C or SIGTERM)."""
    if token is None:
        warnings.warn(
            "no --token-file: the service is open (anyone who reaches it may score images; "
            "changing the threshold is refused)",
            stacklevel=2,
        )
        if host not in ("127.0.0.1", "::1", "localhost"):
            warnings.warn(
                f"serving on {host} without a token: anyone on the network may use it",
                stacklevel=2,
            )
    configure_logging()
    Server(config(service, host, port, token, tls), service).run()


class Server:
    """uvicorn's server, stopping as systemd and Kubernetes expect: on SIGTERM (or Ctrl-C) the
    service takes nothing new (/readyz answers 503), uvicorn stops accepting and waits for the
    requests in hand, whose queued ones are answered by their deadline, and the process exits 0
    on SIGTERM (uvicorn re-raises the signal it caught; the handler it restores ignores it)."""

    def __init__(self, config, service: Service) -> None:
        import uvicorn

        self.server, self.service = uvicorn.Server(config), service
        handle_exit = self.server.handle_exit

        def draining(sig, frame) -> None:
            service.draining = True
            log.info(json.dumps({"event": "stopping", "signal": signal.Signals(sig).name}))
            handle_exit(sig, frame)

        self.server.handle_exit = draining

    def run(self) -> None:
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            self.server.run()
        finally:
            signal.signal(signal.SIGTERM, previous)
