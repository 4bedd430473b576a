"""Alerts and the append-only JSONL event log."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.outputs.event_log import RESUMED, EventLog, current_records
from spinal_callback.training.run_files import resumed_record

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


@pytest.mark.fault
def test_event_log_survives_sigkill_right_after_append(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    script = f"""
import sys, time
from spinal_callback.monitor.alerts import Alert
from spinal_callback.outputs.event_log import EventLog
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


def write_torn_line(path: Path) -> None:
    """What a process killed in the middle of ``append`` leaves: a fragment, no newline."""
    with open(path, "a") as file:
        file.write('{"step": 2, "lev')


def test_a_torn_last_line_is_skipped_when_reading(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=1))
    write_torn_line(path)
    assert [r["step"] for r in EventLog(path).read()] == [1]


@pytest.mark.fault
def test_an_append_after_a_torn_line_starts_a_fresh_line_and_is_read(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=1))
    write_torn_line(path)
    EventLog(path).append(make_alert(step=3))
    assert [r["step"] for r in EventLog(path).read()] == [1, 3]
    assert path.read_text().endswith("\n")


def test_reading_reports_torn_lines_by_path_and_line_number(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=1))
    write_torn_line(path)
    EventLog(path).append(make_alert(step=3))
    with caplog.at_level(logging.WARNING, logger="spinal_callback.events"):
        records, skipped = EventLog(path).read_with_skipped()
    assert ([r["step"] for r in records], skipped) == ([1, 3], 1)
    assert str(path) in caplog.text and "line(s) 2" in caplog.text


def test_lines_that_are_json_but_not_records_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('[1, 2]\n"text"\n')
    EventLog(path).append(make_alert(step=4))
    assert EventLog(path).read_with_skipped() == (EventLog(path).read(), 2)
    assert [r["step"] for r in EventLog(path).read()] == [4]


def test_a_clean_log_reads_without_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=1))
    with caplog.at_level(logging.WARNING, logger="spinal_callback.events"):
        assert EventLog(path).read_with_skipped()[1] == 0
    assert caplog.text == ""


def test_a_missing_log_reads_as_no_records(tmp_path: Path) -> None:
    assert EventLog(tmp_path / "absent.jsonl").read_with_skipped() == ([], 0)


def resumed(step: int, run: str = "r1") -> tuple[Alert, str]:
    """The record a resume from ``step`` appends, and its run."""
    return resumed_record(step, []), run


def test_a_record_carries_the_run_it_was_written_for(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=1), "r1")
    assert EventLog(path).read()[0]["run"] == "r1"


def test_a_resume_supersedes_its_runs_later_records_and_deletes_none(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    for step in (10, 20, 22, 24):
        EventLog(path).append(make_alert(step=step), "r1")
    EventLog(path).append(*resumed(20))
    EventLog(path).append(make_alert(step=22), "r1")
    assert [r["step"] for r in EventLog(path).read()] == [10, 20, 22, 24, 20, 22]
    current = EventLog(path).read_current()
    assert [(r["step"], r["rule"]) for r in current] == [
        (10, "loss_spike"),
        (20, "loss_spike"),
        (20, RESUMED),
        (22, "loss_spike"),
    ]


def test_a_resume_never_supersedes_another_runs_records(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=30), "other")
    EventLog(path).append(make_alert(step=30), "r1")
    EventLog(path).append(*resumed(20))
    assert [r["run"] for r in EventLog(path).read_current()] == ["other", "r1"]


def test_records_of_older_versions_without_a_run_are_superseded_by_a_resume(
    tmp_path: Path,
) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=30))
    EventLog(path).append(*resumed(20))
    assert [r["rule"] for r in current_records(EventLog(path).read())] == [RESUMED]


def test_appending_never_rewrites_earlier_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    EventLog(path).append(make_alert(step=1, value=float("nan")), "r1")
    first = path.read_bytes()
    inode = path.stat().st_ino
    EventLog(path).append(*resumed(0))
    assert path.read_bytes().startswith(first) and path.stat().st_ino == inode


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.fault
def test_a_full_disk_surfaces_as_an_os_error_from_append() -> None:
    with pytest.raises(OSError):
        EventLog("/dev/full").append(make_alert())


def test_alert_rejects_unknown_levels() -> None:
    with pytest.raises(ValueError, match="unknown alert level 'severe'"):
        make_alert(level="severe")


def test_alert_round_trips_through_its_dict() -> None:
    alert = make_alert()
    assert Alert.from_dict(alert.to_dict()) == alert
    assert alert.severity == AlertLevel.WARNING
