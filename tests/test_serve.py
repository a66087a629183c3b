"""stpm-serve, over real HTTP: a uvicorn server on an ephemeral loopback port, in a thread.

Each server stops itself at the end of its `with`; every wait below is bounded.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import httpx  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from stpm import STPM, scoring, visualize  # noqa: E402
from stpm.catalog import Catalog  # noqa: E402
from stpm.client import Client, ServiceError  # noqa: E402
from stpm.service import Limits, Service  # noqa: E402

from .servers import SERVE, free_port, served, stopped, until  # noqa: E402

TOKEN = "a-test-token-of-some-length"
ADMIN = "the-admin-token-of-some-length"
PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def model(onnx_file) -> STPM:
    return STPM.load(onnx_file)


@pytest.fixture(scope="module")
def images(category) -> list[Path]:
    return sorted((category / "test").rglob("*.png"))


@contextlib.contextmanager
def running(
    model, onnx_file, token=None, tls=None, hold_warm=None, warm=None, admin=None, **limits
):
    """A server on 127.0.0.1:<free port> (tests.servers.served); yields (url, service, log).
    hold_warm: an Event the warm-up waits for (the service stays unready until it is set);
    warm: instead of warming; admin: the admin token. The model file is copied to a folder of
    its own: thresholds set by one test are kept there, not seen by the next."""
    home = Path(tempfile.mkdtemp(prefix="served-")) / "tiny"
    home.mkdir()
    onnx_file = Path(shutil.copy(onnx_file, home))
    catalog = Catalog.of_file(lambda path: model, onnx_file, Limits(**limits))
    service = catalog.only()
    if hold_warm is not None:
        warming = service.warm
        service.warm = lambda: (hold_warm.wait(10), warming())
    if warm is not None:
        service.warm, hold_warm = warm, threading.Event()
    try:
        with served(catalog, token, admin, tls, wait=hold_warm is None) as (url, log):
            yield url, service, log
            if hold_warm is not None:
                hold_warm.set()
    finally:
        if hold_warm is not None:
            hold_warm.set()
        shutil.rmtree(home.parent, ignore_errors=True)


def slowed(service: Service, seconds: float) -> list:
    """Make each batch take `seconds` longer; returns the list of batches handled."""
    handled, handle = [], service.batcher.handle

    def slow(jobs, waited):
        handled.append(len(jobs))
        time.sleep(seconds)
        return handle(jobs, waited)

    service.batcher.handle = slow
    return handled


def post(url: str, content: bytes, path="/v1/predict", **kwargs) -> httpx.Response:
    return httpx.post(url + path, content=content, timeout=10, **kwargs)


def assert_problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    problem = response.json()
    assert problem["status"] == status and problem["title"] and problem["detail"]
    assert "Traceback" not in response.text and "/tmp" not in response.text
    return problem


# ---------------------------------------------------------------------------- scores


def test_scores_equal_predict_bit_for_bit(model, onnx_file, images):
    # what stpm-predict gives each file scored alone (a batch of one, as the service runs it)
    expected = {path: model.predict(path)[0] for path in images}
    with running(model, onnx_file, max_batch=1) as (url, _, log), Client(url) as client:
        for path in images:
            want = expected[path]
            by_path = client.predict(path)
            raw = post(url, path.read_bytes(), headers={"Content-Type": "image/png"}).json()
            form = httpx.post(url + "/v1/predict", files={"file": (path.name, path.read_bytes())})
            by_array = client.predict(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), name="array")
            for answer in (by_path.raw, raw, form.json(), by_array.raw):
                assert answer["score"] == want.score
                assert answer["normalized_score"] == want.normalized_score
                assert answer["threshold"] == want.threshold == model.threshold_
                assert answer["verdict"] == ("anomalous" if want.is_anomalous else "good")
            assert by_path.path == form.json()["name"] == path.name and by_array.path == "array"
            assert raw["name"] is None
            assert by_path.is_anomalous == want.is_anomalous
            assert set(by_path.timings_ms) == {"queue", "decode", "model", "total"}
            assert by_path.model["sha256"] and by_path.model["runtime"] == "onnxruntime"
            assert by_path.model["file"] == Path(onnx_file).name
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    assert sum(line.get("status") == 200 for line in lines) == 4 * len(images)


def test_batched_scores_within_1e5(model, onnx_file, images):
    expected = {path: model.predict(path)[0].score for path in images}
    with running(model, onnx_file, max_batch=4, max_wait=0.2, workers=1) as (url, service, _):
        handled = slowed(service, 0.0)
        with Client(url) as client, ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(client.predict, images[:4] * 2))
    for path, answer in zip(images[:4] * 2, answers, strict=True):
        assert abs(answer.score - expected[path]) <= 1e-5
    assert max(handled) > 1, "no batch formed"


def test_threshold_details_and_overlay(model, onnx_file, images):
    path = images[-1]
    want = model.predict(path, threshold=0.0)[0]
    with running(model, onnx_file) as (url, _, _), Client(url) as client:
        answer = client.predict(path, threshold=0.0, details=True)
        assert answer.threshold == 0.0 and answer.score == want.score and answer.is_anomalous
        x, y = answer.peak["x"], answer.peak["y"]
        assert answer.peak["value"] == pytest.approx(float(want.anomaly_map.max()))
        assert want.anomaly_map[y, x] == want.anomaly_map.max()
        assert answer.boxes == [dict(zip("xywh", b, strict=True)) for b in scoring.boxes(want.mask)]
        at_rule = client.predict(path, max_false_alarms=0.5)
        assert at_rule.threshold == pytest.approx(model.threshold_at(0.5))
        response = httpx.post(
            url + "/v1/overlay", content=path.read_bytes(), params={"name": "part ü 1.png"}
        )
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-stpm-verdict"] in ("good", "anomalous")
        assert float(response.headers["x-stpm-score"]) == model.predict(path)[0].score
        assert response.headers["x-stpm-name"] == "part%20%C3%BC%201.png"
        drawn = cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_COLOR)
        image = scoring.read_image(path)
        expected = visualize.overlay(image, model.predict(path)[0])
        assert np.array_equal(cv2.cvtColor(drawn, cv2.COLOR_BGR2RGB), expected)
        assert client.overlay(path) == response.content
        described = client.model()
        assert described["threshold"] == model.threshold_
        assert described["validation"]["count"] == len(model.validation_scores_)


# ---------------------------------------------------------------------------- refusals


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and whose data is one empty block."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        )

    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 0, 0, 0, 0])
    idat = chunk(b"IDAT", zlib.compress(b""))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


def test_every_error_status(model, onnx_file, images):
    good = images[0].read_bytes()
    limits = dict(max_body=200_000, max_pixels=500_000)
    with running(model, onnx_file, **limits) as (url, _, _):
        assert_problem(post(url, b"\0" * 300_000), 413)  # Content-Length over the limit
        assert_problem(post(url, png_header(30_000, 30_000)), 413)  # a decompression bomb
        assert_problem(post(url, b"GIF89a" + b"\0" * 100), 415)
        assert_problem(post(url, good, headers={"Content-Type": "application/json"}), 415)
        assert post(url, good, headers={"Content-Type": "Image/PNG"}).status_code == 200
        assert_problem(post(url, b"\x00\x01 random bytes"), 415)
        assert_problem(post(url, good[: len(good) // 3]), 422)  # truncated
        assert_problem(post(url, b""), 422)
        assert_problem(post(url, good, params={"threshold": "high"}), 422)
        assert_problem(post(url, good, params={"max_false_alarms": "2"}), 422)
        assert_problem(post(url, good, params={"threshold": 1, "max_false_alarms": 0.1}), 422)
        assert_problem(post(url, good, params={"name": "x" * 300}), 422)
        garbage_form = {"Content-Type": "multipart/form-data; boundary=zz"}
        assert_problem(post(url, b"--zz\r\nnonsense", headers=garbage_form), 422)
        assert_problem(httpx.get(url + "/nowhere"), 404)
        assert_problem(httpx.get(url + "/v1/predict"), 405)
        assert_problem(httpx.put(url + "/v1/threshold", params={"threshold": 1}), 403)
        assert post(url, good).status_code == 200  # and it goes on


def test_auth_on(model, onnx_file, images):
    good = images[0].read_bytes()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with running(model, onnx_file, token=TOKEN, admin=ADMIN) as (url, _, log):
        assert httpx.get(url + "/healthz").status_code == 200
        assert httpx.get(url + "/readyz").status_code == 200
        for path in ("/v1/model", "/metrics", "/openapi.json", "/docs"):
            problem = assert_problem(httpx.get(url + path), 401)
            assert problem["detail"] == "a valid bearer token is required"
            assert httpx.get(url + path, headers=bearer).status_code == 200
        response = post(url, good)
        assert_problem(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
        assert_problem(post(url, good, headers={"Authorization": "Bearer wrong"}), 401)
        assert_problem(post(url, good, headers={"Authorization": TOKEN}), 401)
        assert post(url, good, headers=bearer).status_code == 200
        with Client(url, token=TOKEN) as client:
            assert client.predict(images[0]).threshold == model.threshold_
            change = {"url": url + "/v1/threshold", "params": {"threshold": 0.0}}
            assert_problem(httpx.put(**change, headers=bearer), 403)  # the scoring token
            changed = httpx.put(**change, headers={"Authorization": f"Bearer {ADMIN}"})
            assert changed.status_code == 200 and changed.json()["threshold"] == 0.0
            assert client.predict(images[0]).threshold == 0.0
        with Client(url, token="wrong") as client, pytest.raises(ServiceError) as refused:
            client.predict(images[0])
        assert refused.value.status == 401 and "bearer token" in str(refused.value)
    for secret in (TOKEN, ADMIN, "wrong"):
        assert secret not in log.getvalue()


def test_auth_off_refuses_changes(model, onnx_file, images):
    with running(model, onnx_file) as (url, _, _):
        assert httpx.get(url + "/openapi.json").json()["paths"]["/v1/predict"]
        assert httpx.get(url + "/v1/model").status_code == 200
        for params in ({"threshold": 0.0}, {}):
            assert_problem(httpx.put(url + "/v1/threshold", params=params), 403)


def test_a_trickling_body_is_dropped(model, onnx_file):
    with running(model, onnx_file, body_timeout=0.5) as (url, _, _):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
            client.sendall(head.encode() + b"\x89PNG")
            started, answer = time.monotonic(), b""
            with contextlib.suppress(OSError):
                while time.monotonic() - started < 4:
                    client.sendall(b"\0")  # one byte every 0.1 s: never done in time
                    time.sleep(0.1)
            while chunk := client.recv(4096):  # read the answer, then the server closes
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert time.monotonic() - started < 3
        assert post(url, b"nothing").status_code == 415  # and it goes on


def test_a_client_gone_mid_body_is_logged_not_failed(model, onnx_file):
    with running(model, onnx_file) as (url, _, log):
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            head = "POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
            client.sendall(head.encode() + b"\x89PNG")
        until = time.monotonic() + 5
        while '"status": 499' not in log.getvalue() and time.monotonic() < until:
            time.sleep(0.05)
        assert '"status": 499' in log.getvalue() and "Traceback" not in log.getvalue()
        assert post(url, b"nothing").status_code == 415


def test_deadline_and_overload(model, onnx_file, images):
    good = images[0].read_bytes()
    with running(model, onnx_file, deadline=0.3, queue_size=2, max_batch=1) as (url, service, _):
        slowed(service, 0.6)

        def timed(_):
            started = time.monotonic()
            response = post(url, good)
            return response, time.monotonic() - started

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(timed, range(8)))
    statuses = sorted(response.status_code for response, _ in results)
    assert set(statuses) == {200, 503} and statuses.count(200) == 1, statuses
    refusals = [(r, s) for r, s in results if r.status_code == 503]
    for response, _ in refusals:
        assert_problem(response, 503)
        assert int(response.headers["retry-after"]) >= 1
    full = [s for r, s in refusals if "queue is full" in r.json()["detail"]]
    late = [s for r, s in refusals if "not scored in time" in r.json()["detail"]]
    assert full and late, [r.json()["detail"] for r, _ in refusals]
    assert max(full) < 0.3  # overload is answered at once
    assert all(seconds < 0.9 for seconds in late)  # answered at its deadline, not scored late


def test_a_client_that_hangs_up_costs_nothing(model, onnx_file, images):
    good = images[0].read_bytes()
    with running(model, onnx_file, max_batch=1) as (url, service, _):
        handled = slowed(service, 0.8)
        port = int(url.rsplit(":", 1)[1])
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(post, url, good)  # keeps the worker busy
            time.sleep(0.2)
            with socket.create_connection(("127.0.0.1", port)) as gone:
                head = (
                    f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(good)}\r\n\r\n"
                )
                gone.sendall(head.encode() + good)
                time.sleep(0.2)  # queued behind the first
            assert first.result().status_code == 200
        time.sleep(1.0)
        assert handled == [1], "the abandoned request was scored"
        assert post(url, good).status_code == 200


def test_not_ready_until_warm_and_client_retries(model, onnx_file, images):
    hold = threading.Event()
    with running(model, onnx_file, hold_warm=hold) as (url, _, _):
        response = httpx.get(url + "/readyz")
        assert_problem(response, 503)
        assert response.headers["retry-after"] == "1"
        assert httpx.get(url + "/healthz").status_code == 200
        with Client(url, retries=2, backoff=0.01, max_backoff=0.05) as client:
            started = time.monotonic()
            with pytest.raises(ServiceError) as refused:
                client.predict(images[0])
            assert refused.value.status == 503 and "loading" in str(refused.value)
            assert time.monotonic() - started < 1
            threading.Timer(0.3, hold.set).start()
            patient = Client(url, retries=40, backoff=0.1, max_backoff=0.1)
            assert patient.predict(images[0]).score == model.predict(images[0])[0].score
            patient.close()
            assert client.ready()


def test_a_model_that_fails_to_warm_is_reported(model, onnx_file, images):
    def broken() -> None:
        raise RuntimeError("no memory for batch 4")

    with running(model, onnx_file, warm=broken) as (url, _, log):
        time.sleep(0.3)
        for path in ("/healthz", "/readyz"):
            problem = assert_problem(httpx.get(url + path), 503)
            assert "warming the model failed: no memory for batch 4" in problem["detail"]
        assert '"event": "failed"' in log.getvalue()


def test_metrics_and_log(model, onnx_file, images):
    with running(model, onnx_file) as (url, _, log), Client(url) as client:
        client.predict(images[0])
        post(url, b"junk")
        text = httpx.get(url + "/metrics").text
    verdict = "anomalous" if model.predict(images[0])[0].is_anomalous else "good"
    assert (
        f'stpm_requests_total{{endpoint="/v1/predict",status="200",verdict="{verdict}"}} 1.0'
        in text
    )
    assert 'stpm_requests_total{endpoint="/v1/predict",status="415",verdict=""} 1.0' in text
    assert 'stpm_request_seconds_bucket{endpoint="/v1/predict",le="+Inf"} 2.0' in text
    assert "stpm_queue_depth 0.0" in text
    assert 'stpm_model_info{file="model.onnx"' in text and "sha256=" in text
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    scored = [line for line in lines if line.get("status") == 200 and line["path"] == "/v1/predict"]
    assert scored[0]["name"] == images[0].name and scored[0]["verdict"] == verdict
    assert all("png" not in line for line in lines)


def test_https(model, onnx_file, images, tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with running(model, onnx_file, tls=(str(cert), str(key))) as (url, _, _):
        assert url.startswith("https://")
        with Client(url, verify=False) as client:
            assert client.predict(images[0]).score == model.predict(images[0])[0].score


def test_cli_refuses_bad_settings(onnx_file, tmp_path):
    short = tmp_path / "token"
    short.write_text("short\n")
    for args, said in (
        (["--token-file", str(short)], "at least 16 characters"),
        (["--token-file", str(tmp_path / "none")], "cannot read the token file"),
        (["--workers", "64", "--threads", "1"], "more than the"),
        (["--tls-cert", str(short)], "together"),
        (["--tls-cert", str(short), "--tls-key", str(short)], "cannot use --tls-cert"),
        (["--max-wait-ms", "-1"], "--max-wait-ms must be 0 or more"),
        (["--deadline-ms", "0"], "--deadline-ms must be above 0"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", "from stpm.cli import serve_main; raise SystemExit(serve_main())",
             str(onnx_file), *args],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert said in result.stderr and "Traceback" not in result.stderr


def test_sigterm_under_load_answers_every_accepted_request(onnx_file, tmp_path):
    port = free_port()
    url, log = f"http://127.0.0.1:{port}", tmp_path / "serve.log"
    command = [sys.executable, "-c", SERVE, str(onnx_file), "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        until(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200)
        body, stop, answers, refused = make_png(), threading.Event(), [], []

        def client() -> None:
            with httpx.Client(base_url=url, timeout=10) as http:
                while not stop.is_set():
                    try:
                        answers.append(http.post("/v1/predict", content=body).status_code)
                    except httpx.TransportError:  # not taken: the server had stopped accepting
                        refused.append(1)
                        time.sleep(0.05)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        time.sleep(1.5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
        stop.set()
        for thread in threads:
            thread.join(15)
    finally:
        stopped(server)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    handled = [line["status"] for line in lines if line.get("path") == "/v1/predict"]
    assert answers and set(answers) <= {200, 503}, set(answers)
    assert sorted(handled) == sorted(answers)  # every request the server took was answered
    assert answers.count(200) > 20
    assert any(line.get("event") == "stopping" for line in lines)


def make_png() -> bytes:
    return visualize.encode_png(np.full((80, 80, 3), 128, np.uint8))


# ---------------------------------------------------------------------------- fuzz

CRAFTED = [
    png_header(50_000, 50_000),
    png_header(0, 10),
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff\xe0" + b"\0" * 64,
    b"BM" + b"\xff" * 60,
    b"II*\x00" + b"\xff" * 60,
    b"RIFF\x10\x00\x00\x00WEBPVP8 ",
    b"--b\r\nContent-Disposition: form-data; name=file; filename=a.png\r\n\r\n\x89PNG\r\n--b--",
]
CONTENT_TYPES = [
    None, "image/png", "application/octet-stream", "multipart/form-data; boundary=b",
    "multipart/form-data", "text/plain", "image/png; charset=\x7f", "",
]  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_server(model, onnx_file):
    with running(model, onnx_file, max_pixels=1_000_000) as (url, _, _):
        yield url


@settings(
    max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.one_of(st.binary(max_size=2000), st.sampled_from(CRAFTED)),
    content_type=st.sampled_from(CONTENT_TYPES),
    query=st.dictionaries(
        st.sampled_from(["name", "threshold", "max_false_alarms", "details", "other"]),
        st.text(max_size=20),
        max_size=3,
    ),
    header=st.tuples(
        st.sampled_from(["X-Anything", "Authorization", "Accept"]),
        st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=40).map(str.strip),
    ),
)
def test_fuzz_bodies_and_headers(fuzz_server, images, body, content_type, query, header):
    headers = dict([header])
    if content_type is not None:
        headers["Content-Type"] = content_type
    response = httpx.post(fuzz_server + "/v1/predict", content=body, params=query, headers=headers)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert "Traceback" not in response.text
    if response.text != "Invalid HTTP request received.":  # refused by uvicorn's HTTP parser
        assert response.headers["content-type"] == PROBLEM
    assert post(fuzz_server, images[0].read_bytes()).status_code == 200
