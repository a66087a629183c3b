"""The README's screenshots of the line's page: a real stpm-serve with a record, real parts.

Usage:
    python scripts/page_screenshots.py --model MODEL.onnx --images /path/to/magnetic_tile/test \
        [--out docs/screenshots] [--parts 40]

Posts --parts test images (spread over the defect types) to a stpm-serve on loopback, marks a few
of them as an engineer would (the anomalous good images as false alarms, some defects as
confirmed), and saves the live, review and threshold views at 1366 x 768 from Debian's headless
Chromium (Selenium and chromium-driver).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchkit
import httpx
from selenium import webdriver
from selenium.webdriver.common.by import By

SERVE = "from stpm.cli import serve_main; raise SystemExit(serve_main())"
TOKEN, ADMIN = "screenshot-scoring-token-0123", "screenshot-admin-token-45678"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    parser.add_argument("--parts", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work, socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        for name, token in (("token", TOKEN), ("admin", ADMIN)):
            (Path(work) / name).write_text(token)
        command = [
            sys.executable, "-c", SERVE, str(args.model), "--port", str(port),
            "--record", f"{work}/record", "--token-file", f"{work}/token",
            "--admin-token-file", f"{work}/admin",
        ]  # fmt: skip
        server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        try:
            shoot(f"http://127.0.0.1:{port}", args)
        finally:
            server.terminate()
            server.wait(30)


def shoot(url: str, args: argparse.Namespace) -> None:
    http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
    until = time.monotonic() + 120
    while time.monotonic() < until:
        try:
            if http.get("/readyz").status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    paths = benchkit.spread_subset(sorted(args.images.rglob("*.jpg")), args.parts)
    for path in paths:
        answer = http.post("/v1/predict", params={"name": path.name}, content=path.read_bytes())
        part, defect = answer.json()["part"], path.parent.name != "good"
        if answer.json()["verdict"] == "anomalous" and (not defect or part % 3 == 0):
            mark = "defect" if defect else "false_alarm"
            http.put(f"/v1/parts/{part}/mark", json={"mark": mark, "who": "review"})
        time.sleep(0.05)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1366,768"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    browser = webdriver.Chrome(options=options, service=service)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        browser.get(url + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        for view in ("live", "review", "threshold"):
            browser.find_element(By.ID, f"tab-{view}").click()
            time.sleep(3)  # the overlays load
            browser.save_screenshot(str(args.out / f"page-{view}.png"))
            print("saved", args.out / f"page-{view}.png")
    finally:
        browser.quit()


if __name__ == "__main__":
    main()
