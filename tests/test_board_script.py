"""The SPINAL tab's script: its number formats, axes and colours, run in Node.js (skipped
without ``node``). What the browser shows is in ``tests/test_browser.py``."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "spinal_callback/board/static/index.js"
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js")


def call(function: str, *arguments: Any) -> Any:
    """``function(*arguments)`` of the script's exports, as JSON."""
    code = (
        f"import({json.dumps(SCRIPT.as_uri())}).then((m) => "
        f"console.log(JSON.stringify(m.{function}(...{json.dumps(arguments)}))))"
    )
    done = subprocess.run([str(NODE), "-e", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("low", "high"),
    [(-1.021, -1.019), (0.95, 1.05), (2.3, 2.65), (1e21, 5.1e21), (0.0, 0.05), (0, 300)],
)
def test_axis_labels_never_repeat(low: float, high: float) -> None:
    labels = [tick["label"] for tick in call("ticks", low, high, 4)]
    assert len(labels) >= 2
    assert len(set(labels)) == len(labels)


def test_huge_and_tiny_numbers_are_written_in_exponent_form() -> None:
    assert call("formatNumber", 5015548177024741000000) == "5.02e+21"
    assert call("formatNumber", 0.00012) == "1.20e-4"
    assert call("formatNumber", 1.23456) == "1.235"
    assert call("formatNumber", None) == "n/a"


def test_a_tiny_move_does_not_fill_the_chart() -> None:
    low, high = call("valueRange", [-1.02, -1.0201])
    assert high - low >= 0.1
    low, high = call("valueRange", [0.0003, 0.0], [0], 0.05)
    assert low <= 0 <= 0.0003 <= high and high - low >= 0.05
    assert low > -0.01  # a share that cannot be negative gets no negative axis


@pytest.mark.parametrize("count", [4, 10, 12, 30])
def test_every_block_gets_its_own_colour(count: int) -> None:
    colours = [call("blockColour", index, count) for index in range(count)]
    assert len(set(colours)) == count
