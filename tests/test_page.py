"""The line's page in a real headless Chromium (Debian's, driven by Selenium through Debian's
chromium-driver) against a real stpm-serve on loopback. Skipped, with the reason, only where
no browser can be had. STPM_SCREENSHOTS=DIR also saves the three views' screenshots there."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

selenium = pytest.importorskip("selenium", reason="the page's tests need selenium")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from stpm import STPM, visualize  # noqa: E402
from stpm.alarms import Rules  # noqa: E402
from stpm.catalog import Catalog  # noqa: E402
from stpm.record import Keeper, Record  # noqa: E402
from stpm.service import Limits  # noqa: E402

from .servers import served  # noqa: E402

TOKEN, ADMIN = "the-scoring-token-of-the-page", "the-admin-token-of-the-page-0"
XSS = "<img src=x onerror=alert(1)>.png"


@pytest.fixture(scope="module")
def browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium here: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1366,768"):
        options.add_argument(argument)
    service = webdriver.ChromeService(executable_path=driver)
    chrome = webdriver.Chrome(options=options, service=service)
    chrome.set_page_load_timeout(30)
    try:
        yield chrome
    finally:
        chrome.quit()


def screenshot(browser, name: str, tmp_path: Path) -> None:
    browser.save_screenshot(str(tmp_path / f"{name}.png"))
    folder = os.environ.get("STPM_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(Path(folder) / f"page-{name}.png"))


def wait(browser, check, seconds: float = 10):
    return WebDriverWait(browser, seconds, poll_frequency=0.05).until(lambda _: check())


def test_the_page_live_review_and_threshold(browser, onnx_file, category, tmp_path):
    keeper = Keeper(Record(tmp_path / "record"), keep_originals=True)
    model = STPM.load(onnx_file)
    catalog = Catalog.of_file(lambda path: model, onnx_file, Limits(), keeper=keeper)
    images = sorted((category / "test").rglob("*.png"))
    scorer = {"Authorization": f"Bearer {TOKEN}"}
    with (
        served(catalog, TOKEN, ADMIN) as (url, _),
        httpx.Client(base_url=url, headers=scorer) as http,
    ):
        page = httpx.get(url + "/")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        browser.get(url + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#login button").click()
        for index, image in enumerate(images[:5]):
            name = XSS if index == 2 else image.name
            http.post("/v1/predict", params={"name": name}, content=image.read_bytes())
        posted = time.monotonic()
        cards = wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, ".card")) == 5)
        assert cards and time.monotonic() - posted < 2.0  # live within 2 s
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".card .name")]
        assert XSS in names  # as text
        assert not browser.find_elements(By.CSS_SELECTOR, ".card .name img")
        with pytest.raises(NoAlertPresentException):
            browser.switch_to.alert.text  # noqa: B018
        wait(browser, lambda: all(
            browser.execute_script("return arguments[0].naturalWidth", img) > 0
            for img in browser.find_elements(By.CSS_SELECTOR, ".card img")
        ))  # fmt: skip
        screenshot(browser, "live", tmp_path)
        browser.find_elements(By.CSS_SELECTOR, ".card")[0].click()
        detail = browser.find_element(By.ID, "detail-image")
        wait(browser, lambda: browser.execute_script("return arguments[0].naturalWidth", detail))
        overlay_src = detail.get_attribute("src")
        assert overlay_src.startswith("blob:")
        browser.find_element(By.ID, "heatmap").click()  # the image as received
        wait(browser, lambda: detail.get_attribute("src") not in (overlay_src, None))
        wait(browser, lambda: browser.execute_script("return arguments[0].naturalWidth", detail))
        assert browser.find_element(By.ID, "heatmap").text.startswith("heatmap off")
        browser.find_element(By.ID, "close").click()

        browser.find_element(By.ID, "tab-review").click()
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")) == 5)
        first = browser.find_element(By.CSS_SELECTOR, "#table tbody tr")
        part_id = int(first.get_attribute("data-part"))
        first.find_element(By.CSS_SELECTOR, "button[data-mark=false_alarm]").click()
        wait(browser, lambda: keeper.record.part(part_id)["current_mark"] == "false_alarm")
        browser.find_element(By.TAG_NAME, "body").send_keys("u")  # the undo, by keyboard
        wait(browser, lambda: keeper.record.part(part_id)["current_mark"] is None)
        browser.find_element(By.TAG_NAME, "body").send_keys("d")
        wait(browser, lambda: keeper.record.part(part_id)["current_mark"] == "defect")
        screenshot(browser, "review", tmp_path)

        browser.find_element(By.ID, "tab-threshold").click()
        browser.execute_script(
            "const s = document.getElementById('share'); s.value = '0.05';"
            "s.dispatchEvent(new Event('input'));"
        )
        expected = f"{model.threshold_at(0.05):.4f}"
        wait(browser, lambda: browser.find_element(By.ID, "candidate").text == expected)
        screenshot(browser, "threshold", tmp_path)
        for width, height in ((1366, 768), (800, 1280)):  # the line's monitor, a tablet
            browser.set_window_size(width, height)
            for view in ("live", "review", "threshold"):
                browser.find_element(By.ID, f"tab-{view}").click()
                wide = browser.execute_script(
                    "return document.documentElement.scrollWidth - window.innerWidth"
                )
                assert wide <= 0, (view, width, wide)  # nothing off the side
        browser.set_window_size(1366, 768)
        browser.find_element(By.ID, "tab-threshold").click()
        for token, said in ((TOKEN, "not applied: 403"), (ADMIN, f"threshold {expected} applied")):
            browser.find_element(By.ID, "admin-token").send_keys(token)
            browser.find_element(By.CSS_SELECTOR, "#apply button").click()
            wait(browser, lambda s=said: browser.find_element(By.ID, "applied").text.startswith(s))
        after = http.post("/v1/predict", content=images[0].read_bytes()).json()
        assert after["threshold"] == model.threshold_at(0.05)  # the next verdicts
    trail = [line["role"] for line in catalog.audit.read()] if catalog.audit else []
    assert trail == []  # this server keeps no trail; the refusal was answered 403


def test_a_drift_alarm_shows_when_the_images_darken(browser, onnx_file, category, tmp_path):
    keeper = Keeper(Record(tmp_path / "record"))
    model = STPM.load(onnx_file)
    catalog = Catalog.of_file(lambda path: model, onnx_file, Limits(), keeper=keeper)
    images = sorted((category / "test" / "good").glob("*.png"))
    rules = Rules(quiet_minutes=60, anomalous_run=1000, drift_window=4)
    with served(catalog, rules=rules) as (url, _), httpx.Client(base_url=url) as http:
        browser.get(url + "/")
        for index in range(4):
            http.post("/v1/predict", content=images[index % len(images)].read_bytes())
        wait(browser, lambda: len(browser.find_elements(By.CSS_SELECTOR, ".card")) == 4)
        assert not browser.find_elements(By.CSS_SELECTOR, "#alarms .drift")
        for index in range(4):  # the lamp goes dim
            dark = (cv2.imread(str(images[index % len(images)])) * 0.35).astype(np.uint8)
            http.post("/v1/predict", content=visualize.encode_png(dark[..., ::-1]))
        alarm = wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, "#alarms .drift"))
        assert "Drift" in alarm[0].text
        metrics = http.get("/metrics").text
        assert 'stpm_alarm{alarm="drift"} 1.0' in metrics
