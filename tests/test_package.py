"""The wheel, not the working tree: built, installed without -e into a fresh virtual environment,
and stpm-review run from there serves the page (its files are package data an editable install
would hide the lack of) over a record, read-only. The environment borrows the test run's
third-party packages through PYTHONPATH (a site folder on PYTHONPATH runs no .pth file, so the
editable stpm stays out); only stpm is installed into it."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

pytest.importorskip("fastapi")

from stpm.record import Record  # noqa: E402

from .servers import free_port, until  # noqa: E402

REVIEW = "from stpm.cli import review_main; raise SystemExit(review_main())"


def test_the_wheel_serves_the_page(tmp_path, request):
    root = request.config.rootpath
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         str(root), "-w", str(tmp_path / "dist")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "dist").glob("stpm-*.whl")
    fresh = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    python = str(fresh / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    kept = Record(tmp_path / "record")
    part = kept.add({"source": "predict", "name": "a.png", "score": 0.5, "verdict": "good"})
    kept.close()
    port = free_port()
    borrowed = [p for p in sys.path if p.endswith("site-packages")]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(borrowed)}
    command = [python, "-c", REVIEW, str(tmp_path / "record"), "--port", str(port)]
    server = subprocess.Popen(
        command, cwd=tmp_path, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        until(lambda: httpx.get(url + "/page/page.js", timeout=1).status_code == 200)
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "page.js" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert httpx.get(url + "/page/page.css").status_code == 200
        assert httpx.get(url + "/v1/parts").json()["parts"][0]["id"] == part
        marked = httpx.put(f"{url}/v1/parts/{part}/mark", json={"mark": "defect"})
        assert marked.status_code == 403  # read-only
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()
    assert site in subprocess.run(
        [python, "-c", "import stpm; print(stpm.__file__)"],
        env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    ).stdout, output  # fmt: skip
