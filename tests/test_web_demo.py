"""The web demo as a person uses it: `demo.py --gradio` on the tiny preset, driven in headless Chromium.

Needs Debian's `chromium` + `chromium-driver` (scripts/test.sh installs them with apt-get when missing; this
module tries the same when run as root) and selenium + gradio (requirements-dev.txt). It skips only when the
browser cannot be installed. LENS_WEB_DEMO_SHOTS=<folder> keeps the screenshots.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> tuple[str | None, str | None]:
    browser = next((p for p in map(shutil.which, BROWSERS) if p), None)
    return browser, shutil.which("chromedriver")


def install_browser() -> str:
    """apt-get install chromium + chromium-driver (root only); returns why it could not, or ''."""
    if not shutil.which("apt-get"):
        return "no apt-get on this machine"
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install chromium + chromium-driver"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium", "chromium-driver"]):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if proc.returncode:
            return f"`{' '.join(cmd)}` failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    return ""


@pytest.fixture(scope="module")
def driver():
    browser, chromedriver = find_browser()
    if browser is None or chromedriver is None:
        why = install_browser()
        browser, chromedriver = find_browser()
        if browser is None or chromedriver is None:
            pytest.skip(f"headless Chromium unavailable: chromium or chromedriver missing and {why or 'not installed'}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1400", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=chromedriver), options=opts)  # no Selenium Manager
    drv.set_page_load_timeout(120)
    yield drv
    drv.quit()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """demo.py --gradio on the tiny preset at a free localhost port; yields (url, process, log path)."""
    import gradio  # noqa: F401  (a dev requirement: missing is an error, not a skip)

    port = free_port()
    log = tmp_path_factory.mktemp("web_demo") / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1,localhost"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "demo.py"), "--gradio", "--device", "cpu", "--port", str(port)],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo.py --gradio exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"demo.py --gradio did not answer at {url}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
        yield url, proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def shot(driver, tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("LENS_WEB_DEMO_SHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def open_page(driver, url: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, 120)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#lens-prompt textarea")))
    return wait


def upload_and_submit(driver, wait, file: Path, prompt: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    upload = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#lens-image input[type=file]")))
    upload.send_keys(str(file))
    box = driver.find_element(By.CSS_SELECTOR, "#lens-prompt textarea")
    box.clear()
    box.send_keys(prompt)
    submit = wait.until(ec.element_to_be_clickable((By.XPATH, "//button[normalize-space()='Submit']")))
    time.sleep(1.0)  # let the upload finish before the click (the frontend sends the file first)
    submit.click()


def wait_for(driver, wait, condition, what: str, log: Path):
    """`wait.until(condition)`; on a timeout, fail naming what did not appear, with the page's toasts and the log."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By

    try:
        return wait.until(condition)
    except TimeoutException:
        toasts = [el.text for el in driver.find_elements(By.CSS_SELECTOR, ".toast-body")]
        pytest.fail(f"{what} did not appear; toasts in the page: {toasts}; server log:\n{log.read_text()[-3000:]}")


def test_upload_prompt_and_receive_overlay_and_answer(server, driver, tmp_path):
    from selenium.webdriver.common.by import By

    url, proc, log = server
    assert "serving on http://127.0.0.1:" in log.read_text()  # the default binding: this machine only
    picture = tmp_path / "scene.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)).save(picture)

    wait = open_page(driver, url)
    upload_and_submit(driver, wait, picture, "the red circle")
    answer = wait_for(driver, wait, lambda d: d.find_element(By.CSS_SELECTOR, "#lens-answer textarea").get_attribute("value"),
                      "the answer text", log)
    overlay_src = wait_for(driver, wait, lambda d: next(
        (img.get_attribute("src") for img in d.find_elements(By.CSS_SELECTOR, "#lens-overlay img")
         if img.get_attribute("src")), None), "the overlay image", log)
    shot(driver, tmp_path, "web_demo_answer")

    # the same model in this process (the preset is seeded, decoding greedy): the page shows its answer and overlay
    from lens import Segmenter
    from lens.visualize import overlay

    image = Image.open(picture).convert("RGB")
    pred = Segmenter.from_pretrained("tiny", device="cpu", max_new_tokens=32)(image, "the red circle")
    assert answer == (pred.text.strip() or "(empty answer)")
    with urllib.request.urlopen(overlay_src, timeout=30) as resp:
        shown = np.asarray(Image.open(io.BytesIO(resp.read())).convert("RGB")).astype(int)
    expected = np.asarray(overlay(image, pred.mask, pred.box, pred.text)).astype(int)
    assert shown.shape == expected.shape == (150, 200, 3)  # drawn on the uploaded image, at its size
    assert np.abs(shown - expected).mean() < 1.0 < np.abs(shown - np.asarray(image).astype(int)).mean()
    assert proc.poll() is None and "Traceback" not in log.read_text()


def test_a_bad_upload_shows_an_error_in_the_page_not_a_traceback(server, driver, tmp_path):
    from selenium.webdriver.common.by import By

    url, proc, log = server
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is a text file with an image's name\n")

    wait = open_page(driver, url)
    upload_and_submit(driver, wait, not_an_image, "the dog")

    def error_text(d):
        texts = [el.text for el in d.find_elements(By.CSS_SELECTOR, ".toast-body, [data-testid='toast-body']")]
        return next((t for t in texts if "not an image" in t), None)

    message = wait_for(driver, wait, error_text, "an error message naming the bad upload", log)
    shot(driver, tmp_path, "web_demo_bad_upload")
    assert "notes.png" in message
    time.sleep(1.0)
    text = log.read_text()
    assert "Traceback" not in text and "rejected upload notes.png" in text
    assert proc.poll() is None  # the server keeps serving
    assert not (ROOT / "demo.pyi").exists()  # gradio writes stubs next to files that subclass its components
