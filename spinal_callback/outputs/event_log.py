"""EventLog: the append-only JSONL file of a run's alerts and records, which survives a killed
process."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spinal_callback.monitor.alerts import Alert

logger = logging.getLogger(__name__)
RESUMED = "resumed"
DEFAULT_NAME = "spinal_events.jsonl"
"""The event log's file name in the run's log dir when ``event_log`` is not set."""
"""The rule of the record a resume appends (``current_records``)."""


class EventLog:
    """Append-only JSONL file, one alert per line, flushed and fsynced per line.

    Nothing in it is ever rewritten or removed: it is the run's audit trail. A resume appends a
    ``resumed`` record, which supersedes the same run's records of later steps written before it
    (an interrupted segment's); ``current_records`` drops those for a reader.

    Each write opens, appends, fsyncs and closes, so a line that ``append`` returned from is on
    disk even if the process is killed with SIGKILL right after. Non-finite numbers are written
    as ``null`` so every line is strict JSON. A line torn by a kill mid-write is never glued to
    the next record: ``append`` starts a fresh line, and ``read`` skips and reports the fragment.
    I/O errors (a full disk, a read-only directory) propagate as ``OSError``; the caller decides.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, alert: Alert, run: str | None = None) -> None:
        """Write ``alert`` as one line, with ``"run": run`` when given, and fsync it before
        returning.

        Raises:
            OSError: the directory cannot be created or the line cannot be written or synced.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = alert.to_dict() if run is None else {**alert.to_dict(), "run": run}
        line = json.dumps(_finite_or_none(record), allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as file:
            # A killed writer can leave a fragment without its newline; gluing onto it would
            # make this record unreadable too.
            prefix = "" if ends_with_newline_or_is_empty(self.path) else "\n"
            file.write(prefix + line + "\n")
            file.flush()
            os.fsync(file.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All complete records, in file order; a missing file reads as no records.

        Torn or invalid lines (a crash mid-write) are skipped, and a ``logging`` warning names
        the path and their 1-based line numbers. ``read_with_skipped`` also returns the count.
        """
        records, _ = self.read_with_skipped()
        return records

    def read_with_skipped(self) -> tuple[list[dict[str, Any]], int]:
        """``(records, skipped)``: the complete records and how many lines were not records."""
        lines, skipped_lines = self._parse()
        if skipped_lines:
            logger.warning(
                "event log %s: skipped %d torn or invalid line(s) at line(s) %s",
                self.path,
                len(skipped_lines),
                ", ".join(str(number) for number in skipped_lines),
            )
        return [record for record, _ in lines], len(skipped_lines)

    def read_current(self) -> list[dict[str, Any]]:
        """``read``, less the records a resume superseded (``current_records``)."""
        return current_records(self.read())

    def _parse(self) -> tuple[list[tuple[dict[str, Any], str]], list[int]]:
        """``([(record, line text), ...], [1-based numbers of lines that are not records])``."""
        if not self.path.is_file():
            return [], []
        records: list[tuple[dict[str, Any], str]] = []
        skipped_lines: list[int] = []
        with open(self.path, encoding="utf-8", errors="replace") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    record = None
                if isinstance(record, dict):
                    records.append((record, line.strip()))
                else:
                    skipped_lines.append(number)
        return records, skipped_lines


def current_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` in file order, less those a later ``resumed`` record supersedes: the same
    run's records of steps after the resume's step, written before it. Records without a run
    (written by releases before run ids) count as the resuming run's; records of another run
    are never dropped.
    """
    kept: list[dict[str, Any]] = []
    for record in records:
        if record.get("rule") == RESUMED:
            run, step = record.get("run"), _step_of(record)
            kept = [r for r in kept if r.get("run", run) != run or _step_of(r) <= step]
        kept.append(record)
    return kept


def ends_with_newline_or_is_empty(path: Path) -> bool:
    """Whether an append to ``path`` starts a fresh line (a torn last line does not end in one)."""
    with open(path, "rb") as file:
        file.seek(0, os.SEEK_END)
        if file.tell() == 0:
            return True
        file.seek(-1, os.SEEK_END)
        return file.read(1) == b"\n"


def _step_of(record: dict[str, Any]) -> float:
    """The record's step; a record without an integer step counts as later than any step."""
    step = record.get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        return step
    return math.inf


def _finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every non-finite float (nested ``details`` too) as ``None``: strict
    JSON."""
    return {key: _finite_value(value) for key, value in record.items()}


def _finite_value(value: Any) -> Any:
    if isinstance(value, dict):
        return _finite_or_none(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
