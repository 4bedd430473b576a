"""Alerts, and the append-only JSONL event log that survives a killed process."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any


class AlertLevel(IntEnum):
    """Severity; the integer is what TensorBoard's ``spinal/alert_level`` scalar shows."""

    INFO = 1
    WARNING = 2
    CRITICAL = 3

    @classmethod
    def parse(cls, name: str) -> AlertLevel:
        try:
            return cls[name.upper()]
        except KeyError:
            raise ValueError(
                f"unknown alert level {name!r}; use 'info', 'warning' or 'critical'"
            ) from None


@dataclass(frozen=True)
class Alert:
    """One early-warning event.

    Attributes:
        step: training step of the probe that raised it.
        level: ``"info"``, ``"warning"`` or ``"critical"``.
        rule: the rule that fired (a ``name`` from ``spinal_callback.rules``, e.g.
            ``"language_drift"``, or ``"probe_failed"``).
        metric: the scalar concerned (e.g. ``"spinal/neutral/perplexity_ratio"``).
        value: the observed value (NaN when not applicable).
        threshold: the threshold it crossed (NaN when not applicable).
        message: one line a person can act on.
        layers: block indices involved (empty for band-level summaries).
        time: Unix time the alert was raised.
    """

    step: int
    level: str
    rule: str
    metric: str
    value: float
    threshold: float
    message: str
    layers: list[int] = field(default_factory=list)
    time: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        AlertLevel.parse(self.level)

    @property
    def severity(self) -> AlertLevel:
        return AlertLevel.parse(self.level)

    def to_dict(self) -> dict[str, Any]:
        """The event-log record: step, level, rule, metric, value, threshold, layers, message,
        time."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


class EventLog:
    """Append-only JSONL file, one alert per line, flushed and fsynced per line.

    Each write opens, appends, fsyncs and closes, so a line that ``append`` returned from is on
    disk even if the process is killed with SIGKILL right after. Non-finite numbers are written
    as ``null`` so every line is strict JSON.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def append(self, alert: Alert) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps(_finite_or_none(alert.to_dict()), allow_nan=False)
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(line + "\n")
            file.flush()
            os.fsync(file.fileno())

    def read(self) -> list[dict[str, Any]]:
        """All complete lines (a torn last line from a crash mid-write is skipped)."""
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records


def _finite_or_none(record: dict[str, Any]) -> dict[str, Any]:
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in record.items()
    }
