"""stpm-serve in operation, over real HTTP: several models, swaps under load, thresholds that
persist, roles and the audit trail (issue 29). Servers stop by themselves (tests.servers)."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402

from stpm import STPM  # noqa: E402
from stpm.catalog import Catalog  # noqa: E402
from stpm.changes import AuditLog  # noqa: E402
from stpm.client import Client, ServiceError  # noqa: E402
from stpm.errors import StpmError  # noqa: E402
from stpm.service import Limits, file_sha256  # noqa: E402

from .servers import SERVE, free_port, served, stopped, until  # noqa: E402

TOKEN, ADMIN = "the-scoring-token-0123", "the-admin-token-456789"
SCORER, ADMINISTRATOR = (
    {"Authorization": f"Bearer {TOKEN}"},
    {"Authorization": f"Bearer {ADMIN}"},
)


@pytest.fixture(scope="module")
def images(category) -> list[Path]:
    return sorted((category / "test").rglob("*.png"))[:6]


@pytest.fixture(scope="module")
def expected(onnx_file, second_onnx, images) -> dict:
    """{sha256: {image path: score}} from each model scoring each image alone."""
    found = {}
    for path in (onnx_file, second_onnx):
        model = STPM.load(path)
        found[file_sha256(path)] = {p: model.predict(p)[0].score for p in images}
    return found


@pytest.fixture
def folder(onnx_file, second_onnx, tmp_path) -> Path:
    """Models a (the tiny model) and b (the other), one folder each."""
    for name, source in (("a", onnx_file), ("b", second_onnx)):
        (tmp_path / "models" / name).mkdir(parents=True)
        shutil.copy(source, tmp_path / "models" / name / "model.onnx")
    return tmp_path / "models"


def catalog_of(folder: Path, **limits) -> Catalog:
    audit = AuditLog(folder / "audit.jsonl")
    return Catalog.of_folder(STPM.load, folder, Limits(**limits), audit, "model.onnx")


def put(url: str, path: str, headers=ADMINISTRATOR, **kwargs) -> httpx.Response:
    return httpx.put(url + path, headers=headers, timeout=60, **kwargs)


def test_two_models_side_by_side_score_as_each_alone(folder, expected, images):
    (folder / "broken").mkdir()
    (folder / "broken" / "model.onnx").write_bytes(b"not a model")  # the others still serve
    with served(catalog_of(folder, max_batch=1)) as (url, _):
        ready = httpx.get(url + "/readyz").json()
        assert ready == {"status": "ready", "models": ["a", "b"]}
        listed = httpx.get(url + "/v1/models").json()
        for name in ("a", "b"):
            sha = listed[name]["sha256"]
            for image in images:
                answer = httpx.post(
                    f"{url}/v1/models/{name}/predict", content=image.read_bytes()
                ).json()
                assert answer["model"]["name"] == name and answer["model"]["sha256"] == sha
                assert answer["score"] == expected[sha][image]
        assert listed["a"]["sha256"] != listed["b"]["sha256"]
        unnamed = httpx.post(url + "/v1/predict", content=images[0].read_bytes())
        assert unnamed.status_code == 404 and "name one" in unnamed.json()["detail"]
        assert httpx.get(url + "/v1/models/c").status_code == 404
    (failed,) = AuditLog(folder / "audit.jsonl").read()
    assert failed["action"] == "load" and failed["model"] == "broken"
    assert failed["outcome"].startswith("failed") and str(folder) not in failed["outcome"]


def test_swaps_under_load_drop_nothing(folder, second_onnx, expected, images):
    first = str(folder / "a" / "model.onnx")
    answers, stop = [], threading.Event()

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=30, headers=SCORER) as http:
            while not stop.is_set():
                image = images[index % len(images)]
                index += 1
                response = http.post("/v1/models/a/predict", content=image.read_bytes())
                answers.append((response.status_code, image, response.json()))

    with served(catalog_of(folder), TOKEN, ADMIN) as (url, _):
        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        try:
            swapped = []
            for path in (str(second_onnx), first, str(second_onnx)):
                time.sleep(0.5)
                response = put(url, "/v1/models/a", json={"path": path})
                assert response.status_code == 200, response.text
                swapped.append(response.json()["sha256"])
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        trail = httpx.get(url + "/v1/audit", headers=SCORER).json()
    assert [status for status, _, _ in answers].count(200) == len(answers)  # no 503 either
    seen = set()
    for _, image, answer in answers:  # the model named is the model that scored it
        sha = answer["model"]["sha256"]
        assert answer["score"] == pytest.approx(expected[sha][image], rel=1e-5, abs=1e-5)
        seen.add(sha)
    assert seen == set(expected) and swapped[0] == swapped[2] != swapped[1]
    swaps = [entry for entry in trail if entry["action"] == "swap"]
    assert [entry["to"] for entry in swaps] == swapped
    assert all(entry["outcome"] == "done" and entry["role"] == "admin" for entry in swaps)


def test_a_failed_swap_keeps_the_old_model(folder, second_onnx, images):
    junk = folder / "junk.onnx"
    junk.write_bytes(b"not a model at all")
    with served(catalog_of(folder), admin=ADMIN) as (url, _):
        before = httpx.get(url + "/v1/models/a").json()["sha256"]
        bodies = [
            {"path": str(junk)},
            {"path": "missing.onnx"},
            {"file": "x"},
            {"path": "~nobody-here/x"},
            {"path": "a" * 300},
            {"path": str(folder)},
        ]
        for body in bodies:
            refused = put(url, "/v1/models/a", json=body)
            assert refused.status_code == 422, refused.text
            assert "Traceback" not in refused.text
        assert (
            "the old model still serves" in put(url, "/v1/models/a", json={"path": str(junk)}).text
        )
        answer = httpx.post(url + "/v1/models/a/predict", content=images[0].read_bytes()).json()
        assert answer["model"]["sha256"] == before
        with Client(url, ADMIN) as client:
            uploaded = client.swap("a", file=second_onnx)  # the file itself
            assert uploaded["sha256"] == file_sha256(second_onnx)
            trail = client.audit()
    failed = [entry for entry in trail if entry["outcome"].startswith("failed")]
    assert len(failed) == len(bodies) + 1  # each refused swap, wherever it stopped
    assert failed[0]["from"] == before and "junk.onnx" in failed[0]["outcome"]
    assert all(str(folder) not in entry["outcome"] for entry in failed)
    assert list((folder / "a" / "uploads").glob("*.onnx"))


def test_a_threshold_survives_a_restart_and_stays_with_its_model(folder, second_onnx, images):
    with served(catalog_of(folder), TOKEN, ADMIN) as (url, _):
        sha = httpx.get(url + "/v1/models/a", headers=SCORER).json()["sha256"]
        body = {"threshold": 1.5, "note": "night shift, new lamp"}
        record = put(url, "/v1/models/a/threshold", json=body).json()
        assert record["threshold"] == 1.5 and record["role"] == "admin" and record["time"]
        answer = httpx.post(
            url + "/v1/models/a/predict", content=images[0].read_bytes(), headers=SCORER
        )
        assert answer.json()["threshold"] == 1.5
    kept = json.loads((folder / "a" / "thresholds.json").read_text())
    assert kept[sha]["threshold"] == 1.5 and ADMIN not in json.dumps(kept)
    with served(catalog_of(folder), TOKEN, ADMIN) as (url, _):  # a restart
        shown = httpx.get(url + "/v1/models/a", headers=SCORER).json()
        assert shown["threshold"] == 1.5 and shown["threshold_set"]["note"] == body["note"]
        assert httpx.get(url + "/v1/models/b", headers=SCORER).json()["threshold_set"] is None
        own = STPM.load(second_onnx).threshold_
        swapped = put(url, "/v1/models/a", json={"path": str(second_onnx)}).json()
        assert swapped["threshold"] == own  # a new model starts with its own
        back = put(url, "/v1/models/a", json={"path": str(folder / "a" / "model.onnx")}).json()
        assert back["threshold"] == 1.5  # the one set for that model, again
        share = put(url, "/v1/models/b/threshold", json={"max_false_alarms": 0.5}).json()
        assert share["threshold"] == STPM.load(second_onnx).threshold_at(0.5)
        huge = '{"threshold": 1' + "0" * 400 + "}"
        for bad in (
            '{"threshold": "high"}',
            '{"threshold": NaN}',
            '{"max_false_alarms": 2}',
            "[",
            huge,
        ):
            refused = put(url, "/v1/models/b/threshold", content=bad)
            assert refused.status_code == 422, (bad, refused.text)


def test_a_swap_is_kept_until_the_folder_changes(folder, second_onnx):
    with served(catalog_of(folder), admin=ADMIN) as (url, _):
        assert put(url, "/v1/models/a", json={"path": str(second_onnx)}).status_code == 200
    catalog = catalog_of(folder)  # a restart: the swapped-in model, not the folder's file
    assert catalog.get("a").identity["sha256"] == file_sha256(second_onnx)
    catalog.get("a").close()
    catalog.get("b").close()
    chosen = json.loads((folder / "a" / "serving.json").read_text())
    chosen["replaced"] = "0" * 64  # as if a new model.onnx had been put in the folder since
    (folder / "a" / "serving.json").write_text(json.dumps(chosen))
    assert catalog_of(folder).found()["a"] == folder / "a" / "model.onnx"


def test_a_reload_never_empties_the_service_nor_swaps_while_stopping(folder, second_onnx):
    catalog = catalog_of(folder)
    who = {"role": "signal", "client": "SIGHUP"}

    async def changes() -> None:
        for name in ("a", "b"):
            (folder / name / "model.onnx").rename(folder / name / "gone.onnx")
        (outcome,) = await catalog.reload(who)
        assert outcome["outcome"] == "failed: the folder holds no model"
        assert sorted(catalog.services) == ["a", "b"]
        catalog.set_draining()
        with pytest.raises(StpmError, match="stopping"):
            await catalog.swap("a", second_onnx, who)
        await catalog.close()

    asyncio.run(changes())
    assert catalog.get("a").batcher.closed


def test_changes_need_the_admin_token_and_are_audited(folder, second_onnx, images):
    change = {"json": {"threshold": 0.5}}
    with served(catalog_of(folder), TOKEN, ADMIN) as (url, log):
        for headers in (SCORER, {}, {"Authorization": "Bearer wrong"}):
            assert put(url, "/v1/models/a/threshold", headers=headers, **change).status_code == 403
            swap = put(url, "/v1/models/a", headers=headers, json={"path": str(second_onnx)})
            assert swap.status_code == 403
        assert httpx.get(url + "/v1/models/a").status_code == 401  # reading needs a token
        assert httpx.get(url + "/v1/models/a", headers=ADMINISTRATOR).status_code == 200
        with Client(url, ADMIN, model="a") as client:
            assert client.set_threshold(0.5)["threshold"] == 0.5
            assert client.model()["threshold"] == 0.5
        with Client(url, TOKEN, model="a") as client, pytest.raises(ServiceError) as refused:
            client.set_threshold(0.7)
        assert refused.value.status == 403
        trail = httpx.get(url + "/v1/audit", headers=SCORER).json()
    refused = [entry for entry in trail if entry["outcome"].startswith("failed")]
    assert [entry["role"] for entry in refused] == [
        "score",
        "score",
        None,
        None,
        None,
        None,
        "score",
    ]
    assert {entry["action"] for entry in refused} == {"threshold", "swap"}
    done = trail[-2]
    assert done["action"] == "threshold" and done["to"] == 0.5 and done["role"] == "admin"
    assert done["from"] is not None and done["client"] == "127.0.0.1" and done["time"]
    written = (folder / "audit.jsonl").read_text()
    assert len(written.splitlines()) == len(trail)
    for secret in (TOKEN, ADMIN, "wrong"):
        assert secret not in written and secret not in log.getvalue()
    with served(catalog_of(folder)) as (url, _):  # no admin token: nothing can be changed
        refused = put(url, "/v1/models/a/threshold", **change)
        assert refused.status_code == 403 and "--admin-token-file" in refused.json()["detail"]


def test_sighup_reads_the_folder_again(folder, second_onnx, tmp_path):
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "serve.log"
    command = [sys.executable, "-c", SERVE, "--models", str(folder), "--model-file", "model.onnx"]
    server = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=log.open("w")
    )
    try:
        assert until(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200)
        shutil.copytree(folder / "b", folder / "c")
        shutil.copy(second_onnx, folder / "a" / "model.onnx")
        shutil.rmtree(folder / "b")
        server.send_signal(signal.SIGHUP)
        new = file_sha256(second_onnx)
        assert until(lambda: httpx.get(url + "/v1/models/a").json().get("sha256") == new)
        assert until(lambda: sorted(httpx.get(url + "/v1/models").json()) == ["a", "c"])
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        stopped(server)
    trail = (folder / "audit.jsonl").read_text().splitlines()
    actions = [(e["action"], e["model"], e["role"]) for e in map(json.loads, trail)]
    assert sorted(actions) == [
        ("add", "c", "signal"),
        ("remove", "b", "signal"),
        ("swap", "a", "signal"),
    ]
