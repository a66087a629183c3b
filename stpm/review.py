"""The record over HTTP (stpm-serve --record): the parts, their overlays, marks, the shift.

What the line's page reads, through the service and never through a path the browser sends:
an overlay is found by its part's id, and only inside the record folder. Reading needs the
scoring token (if the service has one), as does marking a part: the people at the line mark,
only an admin changes the threshold. SQLite is read on worker threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import os
import tempfile
import time
import zipfile
from pathlib import Path

from fastapi import APIRouter, Depends, Query, Request
from fastapi import Path as FastPath
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.background import BackgroundTask

from . import alarms, scoring
from .errors import StpmError
from .intake import Problem, json_body
from .record import Record

parts_routes = APIRouter()
PAGE = Path(__file__).with_name("page")  # the page's static files, shipped in the package
PAGE_FILES = {"page.js": "text/javascript", "page.css": "text/css"}
# the page's own files only: no inline script or style, no other origin, no framing
POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
MARKS = ("false_alarm", "defect")
SHOWN = (
    "id", "time", "source", "name", "size", "score", "normalized_score", "image_term",
    "verdict", "threshold", "model_name", "model_sha256", "error", "overlay_state",
    "current_mark",
)  # fmt: skip


def the_record(request: Request) -> Record:
    kept = request.app.state.record
    if kept is None:
        raise Problem(404, "this service keeps no record (start stpm-serve with --record DIR)")
    return kept


def shown(part: dict) -> dict:
    """A part as the page gets it: no server path, the overlay by the part's id."""
    found = {key: part.get(key) for key in SHOWN}
    if part.get("overlay_state") == "written":
        found["overlay_url"] = f"/v1/parts/{part['id']}/overlay"
    if part.get("image"):
        found["image_url"] = f"/v1/parts/{part['id']}/image"
    return found


def selection(
    since: float | None = Query(None, description="from this moment (Unix seconds)"),
    until: float | None = Query(None, description="before this moment (Unix seconds)"),
    verdict: str | None = Query(None, pattern="^(good|anomalous|error)$"),
    mark: str | None = Query(None, pattern="^(false_alarm|defect|none)$"),
    order: str = Query("newest", pattern="^(newest|score)$"),
) -> dict:
    """The review's filters, as Record.parts takes them."""
    return {"since": since, "until": until, "verdict": verdict, "mark": mark, "order": order}


SELECTION = Depends(selection)
PART_ID = FastPath(ge=1, le=2**63 - 1, description="the part's id in the record")


@parts_routes.get("/v1/parts", summary="Recorded parts, newest first or by score, paged")
async def parts(
    request: Request,
    chosen: dict = SELECTION,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=10_000_000),
):
    kept = the_record(request)
    found = await asyncio.to_thread(lambda: kept.parts(**chosen, limit=limit, offset=offset))
    return {"parts": [shown(part) for part in found], "limit": limit, "offset": offset}


EXPORT_COLUMNS = ("id", "time", "name", "score", "normalized_score", "verdict", "threshold",
                  "current_mark", "model_name", "model_sha256", "error", "size", "source")  # fmt: skip
MAX_EXPORT = 100_000  # rows of a CSV
MAX_ZIP = 2_000  # overlays in a ZIP


@parts_routes.get("/v1/parts.csv", summary="The selection as CSV (same filters)")
async def parts_csv(request: Request, chosen: dict = SELECTION):
    kept = the_record(request)
    found = await asyncio.to_thread(lambda: kept.parts(**chosen, limit=MAX_EXPORT))
    return Response(
        await asyncio.to_thread(as_csv, found),
        media_type="text/csv",
        headers={"Content-Disposition": 'attachment; filename="parts.csv"'},
    )


def as_csv(found: list[dict]) -> str:
    """The parts as CSV; a text cell a spreadsheet would take for a formula is quoted with '."""
    handle = io.StringIO()
    writer = csv.writer(handle)
    writer.writerow(EXPORT_COLUMNS)
    for part in found:
        cells = ["" if part.get(key) is None else part[key] for key in EXPORT_COLUMNS]
        writer.writerow(
            "'" + cell if isinstance(cell, str) and cell.startswith(FORMULA) else cell
            for cell in cells
        )
    return handle.getvalue()


FORMULA = ("=", "+", "-", "@", "\t", "\r")


@parts_routes.get("/v1/parts.zip", summary="The selection's overlays as a ZIP (same filters)")
async def parts_zip(request: Request, chosen: dict = SELECTION):
    kept = the_record(request)
    found = await asyncio.to_thread(lambda: kept.parts(**chosen, limit=MAX_ZIP))
    archive = await asyncio.to_thread(as_zip, kept, found)
    return FileResponse(
        archive,
        media_type="application/zip",
        filename="overlays.zip",
        background=BackgroundTask(os.remove, archive),
    )


def as_zip(kept: Record, found: list[dict]) -> str:
    """A temporary ZIP file (the caller removes it) of the parts' written overlays (at most
    MAX_ZIP), named <id>-<part's name>.png, and their CSV; PNGs stored as they are."""
    handle, path = tempfile.mkstemp(prefix="stpm-overlays-", suffix=".zip")
    with os.fdopen(handle, "wb") as file, zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("parts.csv", as_csv(found))
        for part in found:
            if part["overlay_state"] != "written":
                continue
            stem = Path(part["name"] or "part").stem
            safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:80]
            with contextlib.suppress(OSError):
                archive.write(kept.folder / part["overlay"], f"{part['id']}-{safe}.png")
    return path


@parts_routes.get("/v1/parts/{part_id}", summary="One recorded part")
async def part(request: Request, part_id: int = PART_ID):
    found = await asyncio.to_thread(the_record(request).part, part_id)
    if found is None:
        raise Problem(404, f"no part {part_id} in the record")
    return shown(found)


@parts_routes.get(
    "/v1/parts/{part_id}/overlay",
    summary="A recorded part's overlay (PNG)",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}},
)
async def overlay(request: Request, part_id: int = PART_ID):
    found, path = await part_file(request, part_id, "overlay")
    if found["overlay_state"] != "written":
        raise Problem(404, f"no overlay for part {part_id}: it is {found['overlay_state']}")
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "max-age=86400"})


@parts_routes.get(
    "/v1/parts/{part_id}/image",
    summary="A recorded part's image as received (with --keep-originals)",
    response_class=FileResponse,
)
async def image(request: Request, part_id: int = PART_ID):
    _, path = await part_file(request, part_id, "image")
    kind = scoring.image_kind(await asyncio.to_thread(first_bytes, path))
    media = {"JPEG": "image/jpeg", "WebP": "image/webp"}.get(kind, f"image/{(kind or '').lower()}")
    headers = {"Cache-Control": "max-age=86400", "X-Content-Type-Options": "nosniff"}
    return FileResponse(
        path, media_type=media if kind else "application/octet-stream", headers=headers
    )


def first_bytes(path: Path) -> bytes:
    with open(path, "rb") as handle:
        return handle.read(16)


async def part_file(request: Request, part_id: int, column: str):
    """The part and one of its files (overlay or image), found by the part's id and only
    inside the record folder; Problem 404 otherwise."""
    kept = the_record(request)
    found = await asyncio.to_thread(kept.part, part_id)
    if found is None or not found[column]:
        raise Problem(404, f"no {column} for part {part_id}")
    path = (kept.folder / found[column]).resolve()
    if not path.is_relative_to(kept.folder.resolve()) or not path.is_file():
        raise Problem(404, f"no {column} for part {part_id}")
    return found, path


@parts_routes.put("/v1/parts/{part_id}/mark", summary="Mark a part, or undo its mark")
async def mark(request: Request, part_id: int = PART_ID):
    """JSON {"mark": "false_alarm" | "defect" | null, "who": "a name"}: null undoes."""
    kept = the_record(request)
    if request.app.state.read_only:
        raise Problem(403, "stpm-review is read-only: mark parts through stpm-serve")
    role = request.scope["stpm"]["role"]
    if role is None and "score" in request.app.state.roles:
        raise Problem(401, "a valid bearer token is required", {"WWW-Authenticate": "Bearer"})
    wanted = await json_body(request, request.app.state.catalog.limits)
    value, who = wanted.get("mark"), wanted.get("who")
    if value is not None and value not in MARKS:
        raise Problem(422, "mark is false_alarm, defect or null (to undo)")
    if who is not None and (not isinstance(who, str) or len(who) > 100):
        raise Problem(422, "who is a name of at most 100 characters")
    try:
        return await asyncio.to_thread(kept.mark, part_id, value, role, who)
    except StpmError as error:
        raise Problem(404, str(error)) from None


@parts_routes.get(
    "/v1/models/{model}/validation", summary="The validation scores and the threshold rule"
)
async def validation(
    request: Request,
    model: str,
    max_false_alarms: float | None = Query(
        None, gt=0, lt=1, description="also: the threshold this share of them gives"
    ),
):
    """What the threshold view draws: the defect-free validation scores, the threshold in use,
    and for a candidate share of false alarms the threshold stpm.calibration.threshold_at
    gives (the library's own number, not the page's)."""
    service = request.app.state.catalog.get(model)
    scores = service.detector.describe().validation.get("scores") or []
    found = {"scores": [float(score) for score in scores], "threshold": service.threshold}
    if max_false_alarms is not None:
        try:
            found["candidate"] = service.detector.threshold_at(max_false_alarms)
        except StpmError as error:
            raise Problem(422, str(error)) from None
    return found


@parts_routes.get("/v1/alarms", summary="The line's alarms: quiet, anomalous run, drift")
async def line_alarms(request: Request):
    return await asyncio.to_thread(current_alarms, request.app)


def current_alarms(app) -> dict:
    """The alarms now (stpm.alarms), against each served model's validation scores."""
    if app.state.record is None:
        return {}
    catalog = app.state.catalog
    validation = {
        name: service.detector.describe().validation.get("scores") or []
        for name, service in catalog.services.items()
    }
    return alarms.alarms(app.state.record, app.state.rules, validation)


@parts_routes.get("/v1/shift", summary="The current shift: counts and parts per minute")
async def shift(request: Request):
    kept = the_record(request)
    now = time.time()
    start = kept.shifts.start_of(now)
    counts = await asyncio.to_thread(kept.counts, start)
    recent = await asyncio.to_thread(kept.counts, now - 300)
    return JSONResponse(
        {
            "start": start,
            "counts": {key: counts.get(key, 0) for key in ("good", "anomalous", "error")},
            "per_minute": sum(recent.values()) / 5,
        }
    )


@parts_routes.get("/", include_in_schema=False)
async def page(request: Request):
    """The line's page (it asks for the token; the files hold no data)."""
    return FileResponse(PAGE / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@parts_routes.get("/page/{name}", include_in_schema=False)
async def page_file(request: Request, name: str):
    if name not in PAGE_FILES:
        raise Problem(404, "no such file")
    return FileResponse(PAGE / name, media_type=PAGE_FILES[name], headers=PAGE_HEADERS)
