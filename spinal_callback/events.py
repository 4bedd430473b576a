"""Alerts: what the monitor (or the probe machinery) tells a person, with a level and a reason."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from enum import IntEnum
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
        rule: the rule that fired (e.g. ``"robust_z"``, ``"probe_failed"``).
        metric: the score or summary concerned (e.g. ``"spinal/ramp/jaggedness"``).
        value: the observed value (NaN when not applicable).
        threshold: the threshold it crossed (NaN when not applicable).
        layers: block indices involved (empty for band-level summaries).
        message: one line a person can act on.
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
        """The event-log line: step, level, rule, metric, value, threshold, layers, message, time."""
        return asdict(self)
