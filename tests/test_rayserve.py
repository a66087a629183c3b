"""stpm's application on Ray Serve, 2 replicas on this machine's CPUs: a change made through one
replica reaches both (issue 29). Ray and the application are shut down at the end."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("ray.serve")
pytest.importorskip("fastapi")

import httpx  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from stpm import rayserve  # noqa: E402
from stpm.service import file_sha256  # noqa: E402

ADMIN = "the-admin-token-for-ray-0123"


@pytest.fixture(scope="module")
def serve_url():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def answers_by_replica(url: str, body: bytes, count: int = 48) -> dict:
    """{replica: set of (threshold, model sha256)} from count requests by 4 clients."""
    found, lock = {}, threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            for _ in range(count // 4):
                response = http.post("/v1/models/tile/predict", content=body)
                assert response.status_code == 200, response.text
                answer = response.json()
                with lock:
                    found.setdefault(response.headers["x-stpm-replica"], set()).add(
                        (answer["threshold"], answer["model"]["sha256"])
                    )

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return found


def test_a_change_reaches_every_replica(serve_url, onnx_file, second_onnx, category, tmp_path):
    folder = tmp_path / "models"
    (folder / "tile").mkdir(parents=True)
    shutil.copy(onnx_file, folder / "tile" / "model.onnx")
    (tmp_path / "admin").write_text(ADMIN)
    settings = rayserve.Settings(
        models=str(folder),
        model_file="model.onnx",
        replicas=2,
        admin_token_file=str(tmp_path / "admin"),
    )
    serve.run(rayserve.build(settings), name="line", route_prefix="/")
    admin = {"Authorization": f"Bearer {ADMIN}"}
    try:
        assert httpx.get(serve_url + "/readyz", timeout=10).json()["models"] == ["tile"]
        body = sorted((category / "test").rglob("*.png"))[0].read_bytes()
        first = file_sha256(onnx_file)
        before = answers_by_replica(serve_url, body)
        assert len(before) == 2  # both replicas answered
        (own,) = {threshold for seen in before.values() for threshold, _ in seen}

        started = time.monotonic()
        changed = httpx.put(
            serve_url + "/v1/models/tile/threshold", json={"threshold": own + 1}, headers=admin,
            timeout=120,
        )  # fmt: skip
        assert changed.status_code == 200, changed.text
        took = time.monotonic() - started
        after = answers_by_replica(serve_url, body)  # at once: the PUT waited for both
        assert len(after) == 2 and all(seen == {(own + 1, first)} for seen in after.values())

        swapped = httpx.put(
            serve_url + "/v1/models/tile", json={"path": str(second_onnx)}, headers=admin,
            timeout=120,
        )  # fmt: skip
        assert swapped.status_code == 200, swapped.text
        second = file_sha256(second_onnx)
        after = answers_by_replica(serve_url, body)
        assert len(after) == 2 and all(
            {sha for _, sha in seen} == {second} for seen in after.values()
        )
        refused = httpx.put(serve_url + "/v1/models/tile/threshold", json={"threshold": 1.0})
        assert refused.status_code == 403
        trail = httpx.get(serve_url + "/v1/audit", timeout=10).json()
    finally:
        serve.delete("line")
    # each change audited once, by the replica that made it
    assert [(e["action"], e["outcome"]) for e in trail] == [
        ("threshold", "done"),
        ("swap", "done"),
        ("threshold", "failed: this change needs the admin token"),
    ]
    print(f"threshold on both replicas {took:.2f} s after the PUT was sent")
