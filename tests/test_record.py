"""The record of every part: rows committed before answers, overlays after them, readers beside
writers, a kill at any moment, retention, shifts, and who writes it (service, stpm-predict)."""

from __future__ import annotations

import io
import multiprocessing
import os
import signal
import sqlite3
import threading
import time
import zipfile
from datetime import datetime

import httpx
import pytest

from stpm import STPM, record
from stpm.catalog import Catalog
from stpm.cli import predict_main
from stpm.errors import StpmError
from stpm.record import Keeper, Record, Shifts
from stpm.service import Limits

TOKEN = "a-scoring-token-for-the-record"
PART = {"source": "service", "name": "a.png", "score": 1.0, "verdict": "good", "threshold": 2.0}


def test_rows_overlays_marks_and_reading(tmp_path):
    kept = Record(tmp_path / "record")
    first = kept.add(PART, overlay=True)
    assert kept.part(first)["overlay_state"] == "pending"
    kept.write_overlay(first, b"\x89PNG-ish")
    row = kept.part(first)
    assert row["overlay_state"] == "written"
    assert (tmp_path / "record" / row["overlay"]).read_bytes() == b"\x89PNG-ish"
    second = kept.add({**PART, "name": "b.png", "score": 3.0, "verdict": "anomalous"})
    assert [p["id"] for p in kept.parts()] == [second, first]
    assert [p["id"] for p in kept.parts(order="score")] == [second, first]
    assert [p["id"] for p in kept.parts(verdict="good")] == [first]
    kept.mark(second, "false_alarm", "score", "anna")
    assert [p["id"] for p in kept.parts(mark="false_alarm")] == [second]
    kept.mark(second, None, "score", "anna")  # undone, and the undo kept
    assert kept.parts(mark="false_alarm") == [] and len(kept.parts(mark="none")) == 2
    history = kept._reader().execute("SELECT mark FROM marks ORDER BY id").fetchall()
    assert [row[0] for row in history] == ["false_alarm", None]
    with pytest.raises(StpmError):
        kept.mark(second, "maybe", None, None)
    assert kept.counts(0) == {"good": 1, "anomalous": 1}


def test_shifts():
    shifts = Shifts.parse("06:00,14:00,22:00")
    at = datetime(2026, 12, 6, 3, 30).timestamp()  # before 06:00: the night shift of the 5th
    assert shifts.start_of(at) == datetime(2026, 12, 5, 22, 0).timestamp()
    at = datetime(2026, 12, 6, 14, 0).timestamp()
    assert shifts.start_of(at) == datetime(2026, 12, 6, 14, 0).timestamp()
    assert Shifts.parse(None).start_of(at) == datetime(2026, 12, 6).timestamp()
    with pytest.raises(StpmError, match="06:00"):
        Shifts.parse("six")


def test_a_network_share_is_refused(tmp_path, monkeypatch):
    mounts = f"server:/export {tmp_path} nfs4 rw 0 0\n"
    real = record.Path.read_text

    def read_text(self, *args, **kwargs):
        return mounts if str(self) == "/proc/mounts" else real(self, *args, **kwargs)

    monkeypatch.setattr(record.Path, "read_text", read_text)
    with pytest.raises(StpmError, match="network share"):
        Record(tmp_path / "record")


def test_writers_and_readers_at_once(tmp_path):
    kept, stop, seen, errors = Record(tmp_path / "record"), threading.Event(), [], []

    def write(index: int) -> None:
        for number in range(200):
            kept.add({**PART, "name": f"{index}-{number}.png"})

    def read() -> None:
        reader = Record(tmp_path / "record")  # as the page's process would
        while not stop.is_set():
            try:
                seen.append(len(reader.parts(limit=20)))
            except Exception as error:
                errors.append(error)

    readers = [threading.Thread(target=read) for _ in range(2)]
    writers = [threading.Thread(target=write, args=(i,)) for i in range(3)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join(60)
    stop.set()
    for thread in readers:
        thread.join(60)
    assert not errors and seen
    assert kept.counts(0) == {"good": 600}


def _write_forever(folder: str) -> None:
    kept = Keeper(Record(folder))
    number = 0
    while True:
        part_id = kept.keep({**PART, "name": f"{number}.png"}, lambda: b"png" * 1000)
        print(part_id, flush=True)
        number += 1


def test_a_kill_during_writes_loses_no_committed_part(tmp_path):
    folder = tmp_path / "record"
    Record(folder).close()
    context = multiprocessing.get_context("spawn")
    for _ in range(3):
        process = context.Process(target=_write_forever, args=(str(folder),))
        process.start()
        time.sleep(1.5)
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
    database = sqlite3.connect(folder / record.DATABASE)
    assert database.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    kept = Record(folder)  # opens cleanly
    kept.recover(grace=0)  # the overlays left pending settled (no writer is alive now)
    parts = kept.parts(limit=100_000)
    assert len(parts) > 100
    states = {part["overlay_state"] for part in parts}
    assert states <= {"written", "missing"}
    for part in parts:
        if part["overlay_state"] == "written":
            assert (folder / part["overlay"]).stat().st_size == 3000


def test_retention_keeps_the_current_shift(tmp_path):
    kept = Record(tmp_path / "record")
    now = time.time()
    old = [kept.add({**PART, "time": now - 10 * 86400}, overlay=True) for _ in range(3)]
    recent = [kept.add({**PART, "time": now - 2 * 86400}, overlay=True) for _ in range(3)]
    today = [kept.add({**PART, "time": now - 1}, overlay=True) for _ in range(3)]
    for part_id in old + recent + today:
        kept.write_overlay(part_id, b"png")
    removed_parts, removed_overlays = kept.clean(keep_days=5, keep_images=1, now=now)
    assert removed_parts == 3 and removed_overlays == 3 + 3  # old ones, and beyond the newest
    assert kept.part(old[0]) is None
    assert {kept.part(i)["overlay_state"] for i in recent} == {"removed"}
    assert {kept.part(i)["overlay_state"] for i in today} == {"written"}  # the current shift
    assert not list((tmp_path / "record").rglob(f"{old[0]}.png"))
    assert kept.clean(keep_days=0, keep_images=0, now=now) == (3, 0)  # all but today's
    assert len(kept.parts()) == 3 and {kept.part(i)["overlay_state"] for i in today} == {"written"}


def test_the_service_commits_the_row_before_it_answers(onnx_file, category, tmp_path):
    from .servers import served

    keeper = Keeper(Record(tmp_path / "record"), keep_originals=True)
    model = STPM.load(onnx_file)
    catalog = Catalog.of_file(lambda path: model, onnx_file, Limits(), keeper=keeper)
    image = sorted((category / "test").rglob("*.png"))[0]
    scorer = {"Authorization": f"Bearer {TOKEN}"}
    name = "<img src=x onerror=alert(1)>.png"
    with served(catalog, TOKEN) as (url, _), httpx.Client(base_url=url, headers=scorer) as http:
        answer = http.post("/v1/predict", params={"name": name}, content=image.read_bytes())
        answer = answer.json()
        row = keeper.record.part(answer["part"])  # there as soon as the answer is
        assert row["score"] == answer["score"] and row["verdict"] == answer["verdict"]
        assert row["name"] == name and row["size"] == image.stat().st_size
        assert row["model_sha256"] == answer["model"]["sha256"]
        bad = http.post("/v1/predict", params={"name": "broken"}, content=b"\x89PNG\r\n\x1a\nb")
        assert bad.status_code == 422  # refused at the door: not a scored part
        until = time.monotonic() + 10
        while keeper.record.part(answer["part"])["overlay_state"] != "written":
            assert time.monotonic() < until
            time.sleep(0.05)
        (listed,) = http.get("/v1/parts").json()["parts"]
        assert listed["name"] == name and "overlay" not in listed  # no server path
        png = http.get(listed["overlay_url"])
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        original = http.get(listed["image_url"])  # kept as received
        assert original.content == image.read_bytes()
        assert original.headers["content-type"] == "image/png"
        marked = http.put(f"/v1/parts/{answer['part']}/mark", json={"mark": "false_alarm"})
        assert marked.status_code == 200 and marked.json()["role"] == "score"
        assert http.get("/v1/parts", params={"mark": "false_alarm"}).json()["parts"]
        assert http.put(f"/v1/parts/{answer['part']}/mark", json={"mark": None}).status_code == 200
        assert http.get(f"/v1/parts/{answer['part']}").json()["current_mark"] is None
        assert http.put("/v1/parts/999/mark", json={"mark": "defect"}).status_code == 404
        assert http.put(f"/v1/parts/{answer['part']}/mark", json={"mark": "x"}).status_code == 422
        assert http.get(f"/v1/parts/{2**70}").status_code == 422
        assert http.get("/v1/shift").json()["counts"][answer["verdict"]] == 1
        table = http.get("/v1/parts.csv").text.splitlines()
        assert table[0].startswith("id,time,name") and len(table) == 2
        archive = zipfile.ZipFile(io.BytesIO(http.get("/v1/parts.zip").content))
        assert sorted(archive.namelist())[1] == "parts.csv"
        assert archive.namelist()[1].startswith(f"{answer['part']}-_img_src_x")
        anonymous = httpx.put(f"{url}/v1/parts/{answer['part']}/mark", json={"mark": "defect"})
        assert anonymous.status_code == 401
        assert httpx.get(url + "/v1/parts").status_code == 401
    kept = Record(tmp_path / "record")
    assert [p["verdict"] for p in kept.parts()] == [answer["verdict"]]


def test_predict_records_every_file(trained, category, tmp_path):
    model_dir = trained[1]
    inputs = str(category / "test")
    code = predict_main(
        [inputs, "--model", str(model_dir / "model.pt"), "--out", str(tmp_path / "out"),
         "--record", str(tmp_path / "record")]
    )  # fmt: skip
    assert code == 0
    parts = Record(tmp_path / "record").parts(limit=1000)
    assert len(parts) == len(list((category / "test").rglob("*.png")))
    assert {p["source"] for p in parts} == {"predict"}
    assert {p["overlay_state"] for p in parts} == {"written"}


def test_alarms_quiet_run_and_drift(tmp_path):
    from stpm.alarms import Rules, alarms

    kept, now = Record(tmp_path / "record"), time.time()
    rules = Rules(quiet_minutes=5, anomalous_run=3, drift_window=3)
    validation = {"tile": [0.1, 0.2, 0.3]}
    assert not any(a["active"] for a in alarms(kept, rules, validation, now).values())
    for minutes, score, verdict in (
        (20, 0.2, "good"),
        (19, 0.9, "anomalous"),
        (18, 0.8, "anomalous"),
    ):
        kept.add({**PART, "time": now - 60 * minutes, "score": score, "verdict": verdict,
                  "model_name": "tile"})  # fmt: skip
    found = alarms(kept, rules, validation, now)
    assert found["quiet"]["active"] and "18.0 min" in found["quiet"]["detail"]
    assert not found["run"]["active"] and found["drift"]["active"]  # mean 0.63 > 0.3
    kept.add({**PART, "time": now, "score": 0.9, "verdict": "anomalous", "model_name": "tile"})
    found = alarms(kept, rules, validation, now)
    assert found["run"]["active"] and not found["quiet"]["active"]


def test_the_keeper_survives_failures_and_closes(tmp_path):
    keeper = Keeper(Record(tmp_path / "record"), keep_originals=True)

    def broken() -> bytes:
        raise RuntimeError("no memory for this overlay")

    first = keeper.keep(PART, broken, b"\x89PNG\r\n\x1a\n")
    keeper.record.add(PART)
    gone = keeper.keep(PART, lambda: b"png")
    with keeper.record._lock:  # its row removed before its files are written
        keeper.record._writer.execute("DELETE FROM parts WHERE id = ?", (gone,))
    last = keeper.keep(PART, lambda: b"png")
    started = time.monotonic()
    keeper.close()
    assert time.monotonic() - started < 10
    kept = Record(tmp_path / "record")
    assert kept.part(first)["overlay_state"] == "missing"
    assert kept.part(first)["image"].startswith("images/")
    assert kept.part(last)["overlay_state"] == "written"  # the thread went on


def test_exports_quote_formulas_and_ids_are_bounded(tmp_path):
    from stpm.review import as_csv

    table = as_csv([{**PART, "id": 1, "name": "=HYPERLINK(1)"}])
    assert "'=HYPERLINK(1)" in table
