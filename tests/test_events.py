"""Alerts and the append-only JSONL event log."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spinal_callback.events import Alert, AlertLevel, EventLog

FIELDS = {"step", "level", "rule", "metric", "value", "threshold", "layers", "message", "time"}


def make_alert(step: int = 3, level: str = "warning", value: float = 7.5) -> Alert:
    return Alert(
        step=step,
        level=level,
        rule="loss_spike",
        metric="spinal/ramp/jaggedness",
        value=value,
        threshold=6.0,
        message="jaggedness jumped",
        layers=[5],
    )


def test_event_log_lines_have_the_documented_fields(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.append(make_alert())
    record = json.loads((tmp_path / "events.jsonl").read_text().splitlines()[0])
    assert set(record) == FIELDS
    assert (record["step"], record["level"], record["layers"]) == (3, "warning", [5])


def test_event_log_appends_and_never_rewrites(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=1))
    EventLog(path).append(make_alert(step=2))
    assert [r["step"] for r in EventLog(path).read()] == [1, 2]


def test_non_finite_values_are_written_as_null_so_lines_stay_strict_json(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events.jsonl")
    log.append(make_alert(value=float("nan")))
    line = (tmp_path / "events.jsonl").read_text().splitlines()[0]
    assert (
        json.loads(line, parse_constant=lambda name: pytest.fail(f"non-standard {name}"))["value"]
        is None
    )


def test_event_log_survives_sigkill_right_after_append(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    script = f"""
import sys, time
from spinal_callback.events import Alert, EventLog
log = EventLog({str(path)!r})
for step in range(5):
    log.append(Alert(step=step, level="critical", rule="non_finite", metric="m", value=0.0,
                     threshold=0.0, message="boom"))
print("appended", flush=True)
time.sleep(60)
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "appended"
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)
    assert process.returncode == -signal.SIGKILL
    assert [record["step"] for record in EventLog(path).read()] == [0, 1, 2, 3, 4]


def test_a_torn_last_line_is_skipped_when_reading(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=1))
    with open(path, "a") as file:
        file.write('{"step": 2, "lev')
    assert [r["step"] for r in EventLog(path).read()] == [1]


def test_alert_rejects_unknown_levels() -> None:
    with pytest.raises(ValueError, match="unknown alert level 'severe'"):
        make_alert(level="severe")


def test_alert_round_trips_through_its_dict() -> None:
    alert = make_alert()
    assert Alert.from_dict(alert.to_dict()) == alert
    assert alert.severity == AlertLevel.WARNING
