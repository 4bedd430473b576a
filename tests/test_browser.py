"""What a person sees in TensorBoard, checked in a real headless Chromium at 1400 x 1000.

Runs opened in TensorBoard on 127.0.0.1:

- a TRL recipe run whose learning rate blows it up: the callback stops it at the first probe
  with a critical ``task_collapse`` (the random-initialised model's task trace collapses);
- the healthy demo (``make demo``'s run);
- a 40-step run of the real SmolLM2-135M (only with ``make real-model``'s checkpoint);
- run folders written without training (``board_runs``): 10 late blocks, a stop, and a live
  run that gains a probe while the page is open.

The tests assert what must be on screen: the SPINAL tab's status line in the first screen, its
colours, its heatmap's size and its values; the standard dashboards' charts, runs and texts.
Screenshots go to ``$SPINAL_SCREENSHOTS`` (``make screenshots`` sets it to ``docs/``), else to
pytest's temporary directory, never over the committed ones.

Skipped when Chromium, its driver or selenium are absent (``apt-get install chromium
chromium-driver``; selenium is in the test extras).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
from board_runs import RUN_ID, alert, stop_record, synthetic_trace, write_run

from recipes.smollm2 import available, checkpoint_dir

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
TENSORBOARD = Path(sys.executable).with_name("tensorboard")
WINDOW = (1400, 1000)
RENDER_S = 8.0
"""Seconds a dashboard gets to fetch its data and draw (Polymer renders after load)."""
REFRESH_S = 5.0
"""The SPINAL tab reads its run again every 5 s (``REFRESH_MS`` in ``static/index.js``)."""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        CHROMIUM is None or DRIVER is None, reason="needs chromium and chromium-driver"
    ),
]


def recipe_run(output: Path, *arguments: str) -> Path:
    """Run ``recipes.trl_dpo`` into ``output``; returns its TensorBoard log dir."""
    command = [sys.executable, "-m", "recipes.trl_dpo", f"--output-dir={output}", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return output / "runs"


@contextmanager
def tensorboard(logdir: Path) -> Iterator[str]:
    """A TensorBoard server on 127.0.0.1 over ``logdir``; yields its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(TENSORBOARD), f"--logdir={logdir}", "--host=127.0.0.1", f"--port={port}"],
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
def stopped_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log dir of a recipe run stopped by a critical alert at step 5."""
    return recipe_run(
        tmp_path_factory.mktemp("stopped_run"),
        "--steps=40", "--learning-rate=1.0", "--every-n-steps=5", "--eval-steps=20",
    )  # fmt: skip


@pytest.fixture(scope="module")
def stopped_board(stopped_run: Path) -> Iterator[str]:
    with tensorboard(stopped_run) as url:
        yield url


@pytest.fixture(scope="module")
def written_runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A log dir with one run of 10 late blocks, stopped at step 40 by a critical alert."""
    logdir = tmp_path_factory.mktemp("written_runs")
    warning = alert(30, "warning", "trace_departure")
    cause = alert(40, "critical", "language_drift")
    stop = stop_record(40, cause, "/out/checkpoint-20", 20)
    write_run(logdir / "ten_blocks", alerts=(warning, cause), records=(stop,))
    return logdir


@pytest.fixture(scope="module")
def written_board(written_runs: Path) -> Iterator[str]:
    with tensorboard(written_runs) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
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


def wait_for(condition: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # the page is still loading: elements come and go
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not shown within {timeout:.0f} s")
        time.sleep(0.25)


def spinal_tab(browser: Any, url: str, screenshot: Path | None = None) -> float:
    """Open the SPINAL tab, wait for it to draw, save a screenshot and switch into its frame.
    Returns the frame's top in the window, in CSS pixels."""
    browser.switch_to.default_content()
    browser.get(f"{url}/#spinal")
    frame = wait_for(lambda: browser.find_element("css selector", "iframe"))
    top = float(frame.rect["y"])
    browser.switch_to.frame(frame)
    wait_for(lambda: browser.execute_script("return document.body.dataset.rendered"))
    if screenshot is not None:
        browser.switch_to.default_content()
        browser.save_screenshot(str(screenshot))
        browser.switch_to.frame(browser.find_element("css selector", "iframe"))
    return top


def rect(browser: Any, selector: str) -> dict[str, float]:
    return dict(
        browser.execute_script(
            "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
            "return {top: r.top, bottom: r.bottom, width: r.width, height: r.height};",
            selector,
        )
    )


def rgb(browser: Any, colours: list[str]) -> list[tuple[int, ...]]:
    """CSS colours as the browser resolves them, ``(r, g, b)``."""
    resolved = browser.execute_script(
        "return arguments[0].map((c) => { const s = document.createElement('span');"
        "s.style.color = c; document.body.appendChild(s);"
        "const v = getComputedStyle(s).color; s.remove(); return v; });",
        colours,
    )
    return [tuple(int(part) for part in value[4:-1].split(",")[:3]) for value in resolved]


# ---- the SPINAL tab --------------------------------------------------------------------------


def test_a_stopped_run_shows_the_stop_its_cause_and_its_checkpoint_in_the_first_screen(
    browser: Any, stopped_board: str, screenshots: Path
) -> None:
    top = spinal_tab(browser, stopped_board, screenshots / "spinal_stopped.png")
    status = browser.find_element("id", "status").text
    assert "Stopped at step 5 by critical task_collapse" in status
    assert "checkpoint-5 (step 5)" in status
    assert top + rect(browser, "#status")["bottom"] <= WINDOW[1] - 100
    assert len(browser.find_elements("css selector", "#timeline .alert-critical")) == 1
    assert len(browser.find_elements("css selector", "#timeline .stop-mark")) == 1
    reason = browser.find_element("id", "neutral-reason").text
    assert "no better than chance" in reason


def test_ten_late_blocks_get_ten_distinct_colours_the_same_in_every_chart(
    browser: Any, written_board: str, screenshots: Path
) -> None:
    spinal_tab(browser, written_board, screenshots / "spinal_ten_blocks.png")
    legend = browser.execute_script(
        "return [...document.querySelectorAll('#legend .legend-item[data-block]')]"
        ".map((e) => [e.dataset.block, e.style.color]);"
    )
    assert [name for name, _ in legend] == [f"L{i}" for i in range(20, 30)]
    colours = rgb(browser, [colour for _, colour in legend])
    distances = [
        sum((a - b) ** 2 for a, b in zip(x, y)) ** 0.5 for x, y in combinations(colours, 2)
    ]
    assert min(distances) > 40  # of 441 between black and white
    for chart, blocks in (("#contraction", 10), ("#transport", 9)):
        strokes = browser.execute_script(
            f"return [...document.querySelectorAll('{chart} .series-line')]"
            ".map((e) => [e.dataset.series, e.getAttribute('stroke')]);"
        )
        assert [name for name, _ in strokes] == [name for name, _ in legend[:blocks]]
        assert rgb(browser, [stroke for _, stroke in strokes]) == colours[:blocks]
        dashed = browser.find_elements("css selector", f"{chart} .reference-line")
        assert len(dashed) == blocks  # the reference beside every block's line
    labels = browser.execute_script(
        "return [...document.querySelectorAll('#heatmap-contraction text[fill]')]"
        ".map((e) => [e.textContent, e.getAttribute('fill')]);"
    )
    assert [name for name, _ in labels] == [name for name, _ in legend]
    assert rgb(browser, [fill for _, fill in labels]) == colours  # the heatmap's row labels


def test_the_heatmap_is_full_size_and_the_whole_view_fits_the_first_screen(
    browser: Any, written_board: str
) -> None:
    top = spinal_tab(browser, written_board)
    for heatmap in ("#heatmap-contraction svg", "#heatmap-transport svg"):
        size = rect(browser, heatmap)
        assert size["width"] >= 600 and size["height"] >= 140
    assert top + rect(browser, "#departure")["bottom"] <= WINDOW[1]


def test_every_value_drawn_is_the_logged_value(browser: Any, written_board: str) -> None:
    spinal_tab(browser, written_board)
    drawn = browser.execute_script(
        "return [...document.querySelectorAll('#contraction .point')]"
        ".map((e) => Number(e.dataset.value));"
    )
    steps = (0, 10, 20, 30, 40)
    traces = [synthetic_trace(step, list(range(20, 30)), shift=step / 100) for step in steps]
    logged = [t.contraction[block].item() for block in range(10) for t in traces]
    assert drawn == logged
    cells = browser.execute_script(
        "return [...document.querySelectorAll('#heatmap-transport .cell')]"
        ".map((e) => Number(e.dataset.value));"
    )
    reference = synthetic_trace(0, list(range(20, 30)))
    expected = [reference.transport[block].item() for block in range(9)]
    expected += [t.transport[block].item() for block in range(9) for t in traces]
    assert sorted(cells) == sorted(expected)


def test_a_live_run_is_redrawn_when_it_probes_again(
    browser: Any, tmp_path: Path, screenshots: Path
) -> None:
    folder = write_run(tmp_path / "live", steps=(0, 10))
    with tensorboard(tmp_path) as url:
        spinal_tab(browser, url)
        assert "2 probes up to step 10" in browser.find_element("id", "status").text
        trace = synthetic_trace(20, list(range(20, 30)), shift=0.2)
        with open(folder / "spinal_traces.jsonl", "a", encoding="utf-8") as file:
            line = {"run": RUN_ID, "segment": 0, "trace": trace.to_dict()}
            file.write(json.dumps(line) + "\n")
        wait_for(
            lambda: "3 probes up to step 20" in browser.find_element("id", "status").text,
            timeout=REFRESH_S * 4,
        )


@pytest.fixture(scope="module")
def healthy_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The log dir of ``make demo``'s healthy run."""
    return recipe_run(tmp_path_factory.mktemp("healthy_run"))


def test_the_healthy_demo_says_so_and_why_its_neutral_health_is_hidden(
    browser: Any, healthy_run: Path, screenshots: Path
) -> None:
    with tensorboard(healthy_run) as url:
        spinal_tab(browser, url, screenshots / "spinal_healthy.png")
        status = browser.find_element("id", "status").text
        assert "Healthy: no warning" in status and "up to step 300" in status
        reason = browser.find_element("id", "neutral-reason").text
        assert reason.startswith("Neutral-text health not shown:")


@pytest.mark.real_model
@pytest.mark.skipif(not available(), reason="run `make real-model` to build the checkpoint")
def test_the_real_model_shows_ten_blocks_and_its_neutral_health(
    browser: Any, tmp_path: Path, screenshots: Path
) -> None:
    logdir = recipe_run(
        tmp_path, f"--model={checkpoint_dir()}", "--steps=40", "--every-n-steps=10",
        "--eval-steps=20", "--batch-size=2",
    )  # fmt: skip
    with tensorboard(logdir) as url:
        top = spinal_tab(browser, url, screenshots / "spinal_real_model.png")
        blocks = browser.find_elements("css selector", "#legend .legend-item[data-block]")
        assert len(blocks) == 10
        assert browser.find_elements("id", "perplexity")
        assert top + rect(browser, "#status")["bottom"] <= WINDOW[1] - 100


# ---- the standard dashboards -----------------------------------------------------------------


def test_custom_scalars_show_the_alerts_first_and_a_run_per_late_block_in_depth_order(
    browser: Any, stopped_board: str, screenshots: Path
) -> None:
    browser.switch_to.default_content()
    text = shown(browser, f"{stopped_board}/#custom_scalars", screenshots / "custom_scalars.png")
    for title in (
        "SPINAL alerts",
        "stopped: the level of the alert that stopped the run",
        "alert level: at each probe, and the highest so far",
        "SPINAL depth trace (a line per late block)",
        "contraction of blocks 0-3",
        "transport from each block to the next, 0->1 to 2->3",
        "SPINAL ramp (run and reference)",
    ):
        assert title in text, title
    assert text.index("SPINAL alerts") < text.index("SPINAL depth trace")
    assert "neutral-text perplexity" not in text  # the random-initialised model has no language
    runs = [line for line in text.splitlines() if line.startswith("spinal/")]
    assert runs[:5] == ["spinal/L00", "spinal/L01", "spinal/L02", "spinal/L03", "spinal/reference"]
    assert "train/spinal" not in text


def test_the_heatmap_is_on_the_images_dashboard(
    browser: Any, stopped_board: str, screenshots: Path
) -> None:
    browser.switch_to.default_content()
    text = shown(browser, f"{stopped_board}/#images&tagFilter=spinal", screenshots / "images.png")
    assert "spinal/depth_trace" in text


def test_the_text_tab_opens_on_the_alerts_and_the_stop_with_its_checkpoint(
    browser: Any, stopped_board: str, screenshots: Path
) -> None:
    browser.switch_to.default_content()
    text = shown(browser, f"{stopped_board}/#text", screenshots / "text.png")
    assert "alerts/spinal" in text
    assert text.index("alerts/spinal") < text.index("args")
    assert "critical task_collapse" in text
    assert "training stopped at step 5" in text
    assert "checkpoint" in text
