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
import dataclasses
import hmac
import json
import logging
import os
import signal
import time
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from . import batching, scoring
from .catalog import Catalog, UnknownModel
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
                and scope["path"] not in OPEN_PATHS
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
        "/metrics",
    )

    def __init__(self, catalog: Catalog) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        from prometheus_client.core import InfoMetricFamily

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


def problem(status: int, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(
        problem_body(status, detail), status, headers, media_type="application/problem+json"
    )


async def on_problem(request: Request, error: Problem) -> JSONResponse:
    return problem(error.status, error.detail, error.headers)


async def on_unknown(request: Request, error: UnknownModel) -> JSONResponse:
    return problem(404, str(error))


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
    StpmError: on_stpm_error,
    HTTPException: on_http,
    RequestValidationError: on_invalid,
    Exception: on_bug,
}


def create_app(catalog: Catalog, token: str | None = None, admin_token: str | None = None):
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
    app.state.catalog = catalog
    app.state.metrics = Metrics(catalog)
    app.state.admin = admin_token is not None
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.include_router(routes)
    tokens = {"score": token, "admin": admin_token}
    return Guard(app, {role: value for role, value in tokens.items() if value}, app.state.metrics)


def report_failures(catalog: Catalog) -> None:
    for service in catalog.services.values():
        if service.failure:
            log.error(
                json.dumps({"event": "failed", "model": service.name, "detail": service.failure})
            )


async def answer_for(request: Request, model: str | None, overlay: bool, query: dict):
    """Read, check, queue and score one request's image: its answer, None if the client left.
    model: the model's name (None: the only one); query: name, threshold, max_false_alarms,
    details."""
    catalog: Catalog = request.app.state.catalog
    service = catalog.only() if model is None else catalog.get(model)
    check_available(service)
    # refused before the body is read: overload costs little, and the bodies held in memory
    # are bounded (twice what the queue and the workers take, each at most max_body)
    if service.batcher.full or service.holding >= 2 * service.capacity:
        retry = str(round(service.batcher.retry_after()))
        raise Problem(503, "the queue is full", {"Retry-After": retry, "Connection": "close"})
    threshold = service.threshold_for(query["threshold"], query["max_false_alarms"])
    service.holding += 1  # on the event loop's thread alone: no lock. From here the request
    try:  # holds this model: a swap closes it only once holding is back to 0
        job = await job_from(request, service, query["name"], threshold, query["details"], overlay)
        answer = await run_job(service, job, request)
    finally:
        service.holding -= 1
    if answer is None:
        return None
    found = request.scope["stpm"]
    found.update(name=job.name, model=service.name, verdict=answer["verdict"])
    found["score"] = answer["score"]
    timings = {key: round(value, 3) for key, value in job.timings.items()}
    timings["total"] = round((time.monotonic() - found["arrived"]) * 1000, 3)
    answer["timings_ms"] = timings
    found.update(timings)
    return answer


def check_available(service: Service) -> None:
    """Problem 503 while the model takes no request: come back in a second while it warms,
    elsewhere (Connection: close) while the service stops; a failed warm-up says why."""
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


def admin(request: Request, action: str, model: str | None) -> dict:
    """Who asks for a change ({role, client}), if they may; otherwise the attempt is audited
    and answered 403."""
    scope = request.scope
    who = {"role": scope["stpm"]["role"], "client": (scope.get("client") or ("",))[0]}
    if who["role"] == "admin":
        return who
    if not request.app.state.admin:
        detail = "this service has no admin token: nothing can be changed (--admin-token-file)"
    else:
        detail = "this change needs the admin token"
    request.app.state.catalog.refused(action, who, model, detail)
    log.info(json.dumps({"event": "refused", "action": action, "model": model, **who}))
    raise Problem(403, detail)


async def json_body(request: Request, limits: Limits) -> dict:
    """The body as a JSON object, or Problem 422."""
    body = await read_body(request, limits)
    try:
        found = json.loads(body or b"{}")
    except ValueError as error:
        raise Problem(422, f"the body is not JSON: {error}") from None
    if not isinstance(found, dict):
        raise Problem(422, "the body must be a JSON object")
    return found


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
THRESHOLD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "threshold": {"type": "number", "description": "a raw-score threshold"},
                        "max_false_alarms": {
                            "type": "number",
                            "description": "the share of defect-free validation images to reject",
                        },
                        "note": {"type": "string", "description": "why, for the audit trail"},
                    },
                }
            }
        },
    }
}
SWAP_BODY = {
    "requestBody": {
        "required": True,
        "description": 'JSON {"path": a model file on the server (relative: to the model\'s '
        "folder)}, or the model file itself (model.pt or .onnx) as the body or a multipart file.",
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": {"path": {"type": "string"}}}
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
NAME = Query(None, description="the part's name, returned with its result")
THRESHOLD = Query(None, description="a raw-score threshold instead of the model's")
FALSE_ALARMS = Query(
    None,
    gt=0,
    lt=1,
    description="instead of threshold: the share of the defect-free validation images to reject",
)
DETAILS = Query(False, description="add the peak and the mask's bounding boxes")
MAX_UPLOAD = 2**30  # bytes: a model file sent over HTTP


def scoring_query(
    name: str | None = NAME,
    threshold: float | None = THRESHOLD,
    max_false_alarms: float | None = FALSE_ALARMS,
    details: bool = DETAILS,
) -> dict:
    return {
        "name": name,
        "threshold": threshold,
        "max_false_alarms": max_false_alarms,
        "details": details,
    }


SCORING = Depends(scoring_query)


async def predict_answer(request: Request, model: str | None, query: dict) -> Response:
    answer = await answer_for(request, model, False, query)
    return Response(status_code=499) if answer is None else JSONResponse(answer)


async def overlay_answer(request: Request, model: str | None, query: dict) -> Response:
    answer = await answer_for(request, model, True, {**query, "details": False})
    if answer is None:
        return Response(status_code=499)
    headers = {
        "X-Stpm-Name": header_name(answer["name"]),
        "X-Stpm-Score": repr(answer["score"]),
        "X-Stpm-Normalized-Score": repr(answer["normalized_score"]),
        "X-Stpm-Verdict": answer["verdict"],
        "X-Stpm-Threshold": repr(answer["threshold"]),
        "X-Stpm-Model": answer["model"]["name"],
        "X-Stpm-Model-Sha256": answer["model"]["sha256"],
    }
    return Response(answer["png"], media_type="image/png", headers=headers)


OVERLAY = {
    "openapi_extra": IMAGE_BODY,
    "response_class": Response,
    "responses": {200: {"content": {"image/png": {}}}},
}


@routes.post("/v1/predict", openapi_extra=IMAGE_BODY, summary="Score one image (one model)")
async def predict(request: Request, query: dict = SCORING):
    return await predict_answer(request, None, query)


@routes.post("/v1/models/{model}/predict", openapi_extra=IMAGE_BODY, summary="Score one image")
async def predict_with(request: Request, model: str, query: dict = SCORING):
    return await predict_answer(request, model, query)


@routes.post("/v1/overlay", summary="The overlay PNG, the verdict in X-Stpm-* headers", **OVERLAY)
async def overlay(request: Request, query: dict = SCORING):
    return await overlay_answer(request, None, query)


@routes.post("/v1/models/{model}/overlay", summary="The overlay PNG of one model", **OVERLAY)
async def overlay_with(request: Request, model: str, query: dict = SCORING):
    return await overlay_answer(request, model, query)


@routes.get("/v1/model", summary="The model, its threshold and validation statistics")
async def the_model(request: Request):
    return JSONResponse(request.app.state.catalog.only().describe())


@routes.get("/v1/models", summary="The models served, by name")
async def models(request: Request):
    catalog: Catalog = request.app.state.catalog
    return {
        name: {
            **service.identity,
            "threshold": service.threshold,
            "ready": not service.unavailable(),
        }
        for name, service in sorted(catalog.services.items())
    }


@routes.get("/v1/models/{model}", summary="One model, its threshold and validation statistics")
async def one_model(request: Request, model: str):
    return JSONResponse(request.app.state.catalog.get(model).describe())


@routes.get("/v1/models/{model}/ready", summary="This model is loaded and warm")
async def model_ready(request: Request, model: str):
    check_available(request.app.state.catalog.get(model))
    return {"status": "ready"}


@routes.put("/v1/models/{model}", openapi_extra=SWAP_BODY, summary="Swap in a new model (admin)")
async def swap(request: Request, model: str):
    catalog: Catalog = request.app.state.catalog
    who = admin(request, "swap", model)
    service = catalog.get(model)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limits = dataclasses.replace(service.limits, max_body=MAX_UPLOAD, body_timeout=600)
    if kind == "application/json":
        given = (await json_body(request, service.limits)).get("path")
        if not isinstance(given, str) or not given:
            raise Problem(422, 'give {"path": "a model file on the server"} or send the file')
        path = catalog.homes[model] / Path(given).expanduser()
        if not path.is_file():
            raise Problem(422, f"no model file at {given}")
    else:
        encoded, filename = await image_from(request, await read_body(request, limits))
        path = await asyncio.to_thread(catalog.keep_upload, model, encoded)
    try:
        new = await catalog.swap(model, path, who)
    except StpmError as error:
        raise Problem(422, f"not swapped, the old model still serves: {error}") from None
    log.info(json.dumps({"event": "swap", "model": model, "sha256": new.identity["sha256"]}))
    await catalog.changed()
    return JSONResponse(new.describe())


@routes.put(
    "/v1/models/{model}/threshold", openapi_extra=THRESHOLD_BODY, summary="Set the threshold"
)
async def set_model_threshold(request: Request, model: str):
    who = admin(request, "threshold", model)
    catalog: Catalog = request.app.state.catalog
    wanted = await json_body(request, catalog.get(model).limits)
    return await change_threshold(catalog, model, wanted, who)


@routes.put("/v1/threshold", summary="Set the threshold of the one model (admin)")
async def set_threshold(
    request: Request,
    threshold: float | None = Query(None, description="a raw-score threshold"),
    max_false_alarms: float | None = FALSE_ALARMS,
):
    who = admin(request, "threshold", None)
    catalog: Catalog = request.app.state.catalog
    service = catalog.only()
    wanted = {"threshold": threshold, "max_false_alarms": max_false_alarms}
    if threshold is None and max_false_alarms is None:
        wanted = await json_body(request, service.limits)
    return await change_threshold(catalog, service.name, wanted, who)


async def change_threshold(catalog: Catalog, model: str, wanted: dict, who: dict) -> JSONResponse:
    unknown = set(wanted) - {"threshold", "max_false_alarms", "note"}
    if unknown:
        raise Problem(422, f"unknown fields: {', '.join(sorted(unknown))}")
    threshold, share, note = (wanted.get(key) for key in ("threshold", "max_false_alarms", "note"))
    number = (int, float)
    if not isinstance(threshold, (*number, type(None))) or isinstance(threshold, bool):
        raise Problem(422, "threshold must be a number")
    if share is not None and (not isinstance(share, number) or not 0 < share < 1):
        raise Problem(422, "max_false_alarms must be a number between 0 and 1")
    if note is not None and (not isinstance(note, str) or len(note) > 500):
        raise Problem(422, "note must be text of at most 500 characters")
    record = catalog.set_threshold(model, threshold, share, who, note)
    log.info(json.dumps({"event": "threshold", "model": model, "threshold": record["threshold"]}))
    await catalog.changed()
    return JSONResponse(record)


@routes.get("/v1/audit", summary="The audit trail: every change and refused attempt")
async def audit(request: Request, last: int = Query(100, ge=1, le=10_000)):
    trail = request.app.state.catalog.audit
    return [] if trail is None else await asyncio.to_thread(trail.read, last)


@routes.get("/healthz", summary="Alive")
async def healthz(request: Request):
    services = request.app.state.catalog.services.values()
    failed = [f"{s.name}: {s.failure}" for s in services if s.failure]
    if failed and len(failed) == len(services):  # alive, but of no use: restart it
        raise Problem(503, "; ".join(failed))
    return {"status": "alive"}


@routes.get("/readyz", summary="Every model is loaded and warm")
async def readyz(request: Request):
    catalog: Catalog = request.app.state.catalog
    waiting = catalog.unavailable()
    if waiting:
        said = "; ".join(f"{name}: {why}" for name, why in sorted(waiting.items()))
        draining = any(service.draining for service in catalog.services.values())
        raise Problem(503, said, {"Connection": "close"} if draining else {"Retry-After": "1"})
    return {"status": "ready", "models": sorted(catalog.services)}


@routes.get("/metrics", summary="Prometheus metrics")
async def metrics(request: Request):
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


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
):
    """uvicorn's configuration for the service. tls: (certificate file, key file) for HTTPS.
    uvicorn's own access log is off: Guard writes one line per request instead."""
    import uvicorn

    limits = catalog.limits
    return uvicorn.Config(
        create_app(catalog, token, admin_token),
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
    Server(config(catalog, host, port, token, tls, admin_token), catalog).run()


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
        loop = getattr(self.catalog, "loop", None)
        if loop is None:
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
