"""What a request to stpm-serve brings, read with care: its body, bounded in size and time; its
image, its type and size checked before it is queued; its answer from the queue; and the
problem (RFC 9457) it gets when something is wrong. Used by the endpoints (stpm.routes).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

from starlette.requests import ClientDisconnect

from . import batching, scoring
from .errors import ImageTooLarge, StpmError
from .service import Job, Limits, Service

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
    kind = scoring.image_kind(encoded)
    if kind is None:
        raise Problem(415, "the body is not a PNG, JPEG, BMP, TIFF or WebP image")
    return kind


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


def problem_body(status: int, detail: str) -> dict[str, Any]:
    """RFC 9457's fields: no type beyond the status, a title from it, the detail in words."""
    from http import HTTPStatus

    try:
        title = HTTPStatus(status).phrase
    except ValueError:
        title = "Error"
    return {"type": "about:blank", "title": title, "status": status, "detail": detail}


async def json_body(request, limits: Limits) -> dict:
    """The body as a JSON object, or Problem 422."""
    body = await read_body(request, limits)
    try:
        found = json.loads(body or b"{}")
    except ValueError as error:
        raise Problem(422, f"the body is not JSON: {error}") from None
    if not isinstance(found, dict):
        raise Problem(422, "the body must be a JSON object")
    return found
