"""What a person sees in TensorBoard, checked in a real headless Chromium.

A short TRL run whose learning rate blows it up (the callback stops it at the first probe with
a critical ``task_collapse``: the random-initialised model's task trace collapses) is opened in
TensorBoard on 127.0.0.1; the test loads the Custom Scalars, Images and Text dashboards and
asserts what must be on screen: the charts, one run per late block in depth order, the heatmap,
the alert and the stop record. It saves a screenshot of each dashboard to
``$SPINAL_SCREENSHOTS`` (``make test-browser`` writes them to ``docs/``), else to pytest's
temporary directory.

Skipped when Chromium, its driver or selenium are absent (``apt-get install chromium
chromium-driver``; selenium is in the test extras).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
TENSORBOARD = Path(sys.executable).with_name("tensorboard")
RENDER_S = 8.0
"""Seconds a dashboard gets to fetch its data and draw (Polymer renders after load)."""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None, reason="needs chromium and chromium-driver"
    ),
]


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The runs directory of a recipe run stopped by a critical alert at step 5."""
    output = tmp_path_factory.mktemp("stopped_run")
    command = [
        sys.executable,
        "-m",
        "recipes.trl_dpo",
        "--steps=40",
        "--learning-rate=1.0",
        "--every-n-steps=5",
        "--eval-steps=20",
        f"--output-dir={output}",
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=os.environ.copy()
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Training stopped at step 5" in done.stdout
    return output / "runs"


@pytest.fixture(scope="module")
def tensorboard(stopped_run: Path) -> Iterator[str]:
    """A TensorBoard server on 127.0.0.1 over the stopped run; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(TENSORBOARD), f"--logdir={stopped_run}", "--host=127.0.0.1", f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/data/runs", timeout=5).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--window-size=1400,2200"):
        options.add_argument(argument)
    options.binary_location = str(CHROMIUM)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    wanted = os.environ.get("SPINAL_SCREENSHOTS")
    directory = Path(wanted) if wanted else tmp_path_factory.mktemp("screenshots")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def shown(browser: Any, url: str, screenshot: Path) -> str:
    """Load ``url``, let it render, save a screenshot, return the page's visible text."""
    browser.get(url)
    time.sleep(RENDER_S)
    browser.save_screenshot(str(screenshot))
    return str(browser.find_element("tag name", "body").text)


def test_custom_scalars_show_the_alerts_first_and_a_run_per_late_block_in_depth_order(
    browser: Any, tensorboard: str, screenshots: Path
) -> None:
    text = shown(browser, f"{tensorboard}/#custom_scalars", screenshots / "custom_scalars.png")
    for title in (
        "SPINAL alerts",
        "alert level: at each probe, and the highest so far",
        "SPINAL depth trace (a line per late block)",
        "contraction of blocks 0-3",
        "transport from each block to the next, 0->1 to 2->3",
        "SPINAL ramp (run and reference)",
    ):
        assert title in text, title
    assert text.index("SPINAL alerts") < text.index("SPINAL depth trace")
    runs = [line for line in text.splitlines() if line.startswith("spinal/")]
    assert runs[:5] == ["spinal/L00", "spinal/L01", "spinal/L02", "spinal/L03", "spinal/reference"]
    assert "train/spinal" not in text


def test_the_heatmap_is_on_the_images_dashboard(
    browser: Any, tensorboard: str, screenshots: Path
) -> None:
    text = shown(browser, f"{tensorboard}/#images&tagFilter=spinal", screenshots / "images.png")
    assert "spinal/depth_trace" in text


def test_the_alert_and_the_stop_with_its_checkpoint_are_in_the_text_tab(
    browser: Any, tensorboard: str, screenshots: Path
) -> None:
    text = shown(browser, f"{tensorboard}/#text&tagFilter=spinal", screenshots / "text.png")
    assert "spinal/alerts" in text
    assert "critical task_collapse" in text
    assert "training stopped at step 5" in text
    assert "checkpoint" in text
