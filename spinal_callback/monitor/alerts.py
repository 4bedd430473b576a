"""Alert: one early-warning event, and its level."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from typing import Any

logger = logging.getLogger(__name__)


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
        rule: the rule that fired (a ``name`` from ``spinal_callback.monitor.rules``, e.g.
            ``"language_drift"``, or ``"probe_failed"``).
        metric: the scalar concerned (e.g. ``"spinal/neutral/perplexity_ratio"``).
        value: the observed value (NaN when not applicable).
        threshold: the threshold it crossed (NaN when not applicable).
        message: one line a person can act on.
        layers: block indices involved (empty for band-level summaries).
        time: Unix time the alert was raised.
        details: machine-readable facts of a record (a recovery's step rewound to, steps
            lost, ...); empty for the rules' alerts, and then left out of ``to_dict``.
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
    details: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        AlertLevel.parse(self.level)

    @property
    def severity(self) -> AlertLevel:
        return AlertLevel.parse(self.level)

    def to_dict(self) -> dict[str, Any]:
        """The event-log record: step, level, rule, metric, value, threshold, layers, message,
        time, and ``details`` when there are any."""
        record = asdict(self)
        if not self.details:
            del record["details"]
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Alert:
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
