"""stpm-serve's endpoints: scoring, the models, the changes an operator makes, the probes.

Each endpoint reads its request with stpm.intake's checks, asks the catalog (stpm.catalog) for
the model it names, and answers JSON, a PNG or an RFC 9457 problem. A change (a swap, a
threshold) needs the admin token's role, which stpm.serve.Guard found; every change that fails
or is refused is in the audit trail as well as the ones made.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from .catalog import Catalog, UnknownModel
from .errors import StpmError
from .intake import (
    MAX_NAME,
    Problem,
    check_image,
    header_name,
    image_from,
    json_body,
    read_body,
    run_job,
)
from .service import Job, Service

log = logging.getLogger("stpm.serve")  # the service's one log: a JSON line per event


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


async def admin(request: Request, action: str, model: str | None) -> dict:
    """Who asks for a change ({role, client}), if they may; otherwise the attempt is audited
    and answered 403."""
    scope = request.scope
    who = {"role": scope["stpm"]["role"], "client": (scope.get("client") or ("",))[0]}
    if who["role"] == "admin":
        return who
    if "admin" not in request.app.state.roles:
        detail = "this service has no admin token: nothing can be changed (--admin-token-file)"
    else:
        detail = "this change needs the admin token"
    await asyncio.to_thread(request.app.state.catalog.refused, action, who, model, detail)
    log.info(json.dumps({"event": "refused", "action": action, "model": model, **who}))
    raise Problem(403, detail)


@contextlib.asynccontextmanager
async def audited(catalog: Catalog, action: str, who: dict, model: str | None):
    """A change refused before the catalog takes it up (a bad body, no such model or file):
    in the audit trail as well."""
    try:
        yield
    except (Problem, UnknownModel) as error:
        detail = error.detail if isinstance(error, Problem) else str(error)
        await asyncio.to_thread(catalog.refused, action, who, model, detail)
        raise


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
    who = await admin(request, "swap", model)
    async with audited(catalog, "swap", who, model):
        path = await model_file_from(request, catalog, model)
    try:
        new = await catalog.swap(model, path, who)
    except StpmError as error:
        raise Problem(422, f"not swapped, the old model still serves: {error}") from None
    log.info(json.dumps({"event": "swap", "model": model, "sha256": new.identity["sha256"]}))
    await catalog.changed()
    return JSONResponse(new.describe())


async def model_file_from(request: Request, catalog: Catalog, model: str) -> Path:
    """The model file a swap names ({"path": ...}, relative to the model's folder) or sends
    (kept in the model's folder); Problem 422 when there is none."""
    service = catalog.get(model)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        limits = dataclasses.replace(service.limits, max_body=MAX_UPLOAD, body_timeout=600)
        encoded, _ = await image_from(request, await read_body(request, limits))
        try:
            return await asyncio.to_thread(catalog.keep_upload, model, encoded)
        except StpmError as error:
            raise Problem(422, str(error)) from None
    given = (await json_body(request, service.limits)).get("path")
    if not isinstance(given, str) or not given:
        raise Problem(422, 'give {"path": "a model file on the server"} or send the file')
    try:
        path = catalog.homes[model] / Path(given).expanduser()
        if path.is_file():
            return path
    except (OSError, RuntimeError, ValueError):
        pass
    raise Problem(
        422,
        f"no model file {Path(given).name!r} there (a relative path starts at the model's folder)",
    )


@routes.put(
    "/v1/models/{model}/threshold", openapi_extra=THRESHOLD_BODY, summary="Set the threshold"
)
async def set_model_threshold(request: Request, model: str):
    catalog: Catalog = request.app.state.catalog
    who = await admin(request, "threshold", model)
    async with audited(catalog, "threshold", who, model):
        wanted = await json_body(request, catalog.get(model).limits)
        return await change_threshold(catalog, model, wanted, who)


@routes.put("/v1/threshold", summary="Set the threshold of the one model (admin)")
async def set_threshold(
    request: Request,
    threshold: float | None = Query(None, description="a raw-score threshold"),
    max_false_alarms: float | None = FALSE_ALARMS,
):
    catalog: Catalog = request.app.state.catalog
    who = await admin(request, "threshold", None)
    async with audited(catalog, "threshold", who, None):
        service = catalog.only()
        wanted = {"threshold": threshold, "max_false_alarms": max_false_alarms}
        if threshold is None and max_false_alarms is None:
            wanted = await json_body(request, service.limits)
        return await change_threshold(catalog, service.name, wanted, who)


async def change_threshold(catalog: Catalog, model: str, wanted: dict, who: dict) -> JSONResponse:
    """Check the JSON asked for (Problem 422), then Catalog.set_threshold (which audits)."""
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
    record = await catalog.set_threshold(model, threshold, share, who, note)
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
