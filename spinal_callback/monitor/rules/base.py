"""What every early-warning rule shares: a name, its levels, calibration, scoring and state.

A rule is a small stateful object in the manner of Lightning's ``EarlyStopping``. The monitor
(``detector.RampMonitor``) hands it the reference trace once (``calibrate``), then every probe's
trace (``score_trace``) and every set of the trainer's logged scalars (``score_logs``), in the
order training produced them; the rule returns the alerts it raises. Its state round-trips
through ``state_dict``/``load_state_dict`` as plain JSON types, so adding or retuning a rule
touches nothing else. See ARCHITECTURE.md ("Deciding").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.probe.trace import DepthTrace


class Streak:
    """Consecutive observations at or above a level: warning and critical wait for ``patience``
    of them, so a lone outlier and its return are not a trend.

    Args:
        patience: observations in a row a level needs before it is raised.
    """

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.count = 0

    def update(self, crossed: bool) -> bool:
        """Record one observation; True once ``patience`` observations in a row crossed."""
        self.count = self.count + 1 if crossed else 0
        return self.count >= self.patience


class AlertRule:
    """Base of the monitor's rules; a subclass overrides what it scores.

    Attributes:
        name: the ``Alert.rule`` this rule raises, and its key in the monitor's state.
        state_fields: attributes that hold the rule's state (plain JSON types).
    """

    name: ClassVar[str] = ""
    state_fields: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: SpinalConfig) -> None:
        self.config = config

    def calibrate(self, reference: DepthTrace) -> None:
        """Take the run's reference trace (the policy before training, traced on the same probe)."""

    def score_trace(self, trace: DepthTrace) -> list[Alert]:
        """Alerts raised by one probe's trace."""
        return []

    def score_logs(self, step: int, logs: Mapping[str, float]) -> list[Alert]:
        """Alerts raised by one set of the trainer's logged scalars (finite or not)."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in self.state_fields}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name in self.state_fields:
            if name in state:
                setattr(self, name, _restored(getattr(self, name), state[name]))

    def leveled_alert(
        self,
        step: int,
        metric: str,
        value: float,
        levels: tuple[float | None, float | None],
        message: str,
    ) -> list[Alert]:
        """One alert at the highest of the (warning, critical) ``levels`` that ``value`` reaches
        (``None`` turns a level off), or none."""
        warning, critical = levels
        for level, threshold in ((AlertLevel.CRITICAL, critical), (AlertLevel.WARNING, warning)):
            if threshold is not None and value >= threshold:
                return [self.alert(step, level, metric, value, threshold, message)]
        return []

    def alert(
        self,
        step: int,
        level: AlertLevel,
        metric: str,
        value: float,
        threshold: float,
        message: str,
        layers: list[int] | None = None,
    ) -> Alert:
        return Alert(
            step=int(step),
            level=level.name.lower(),
            rule=self.name,
            metric=metric,
            value=float(value),
            threshold=float(threshold),
            message=message,
            layers=list(layers or []),
        )


MAD_TO_SIGMA = 1.4826
"""Median absolute deviation to standard deviation, for normal data."""


def robust_sigma(values: Sequence[float]) -> float:
    """MAD-based standard deviation of ``values`` (0.0 for fewer than two)."""
    if len(values) < 2:
        return 0.0
    median = statistics.median(values)
    return MAD_TO_SIGMA * statistics.median(abs(v - median) for v in values)


def _plain(value: Any) -> Any:
    if isinstance(value, Streak):
        return value.count
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _restored(current: Any, stored: Any) -> Any:
    if isinstance(current, Streak):
        current.count = int(stored)
        return current
    return stored
