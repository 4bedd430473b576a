"""``non_finite``: a NaN or inf in a trace or in the training logs is critical at once."""

from __future__ import annotations

import math
from collections.abc import Mapping

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.monitor.rules.base import AlertRule
from spinal_callback.probe.trace import DepthTrace

WATCHED_LOGS = ("loss", "rewards/", "logps/")
"""Logged keys containing one of these must stay finite (HF replaces a NaN loss by the running
mean in its logs by default; TRL's rewards and log-probs keep it)."""
ADVICE = (
    "the weights, activations or the loss scale overflowed and training is lost from here: stop, "
    "and resume from the last finite checkpoint with a lower learning rate or loss scale"
)


class NonFinite(AlertRule):
    """Critical at the first non-finite trace and at the first non-finite log, without warm-up
    or patience; it fires again only after the values were finite in between."""

    name = "non_finite"
    state_fields = ("broken_trace", "broken_logs")

    def __init__(self, config: SpinalConfig) -> None:
        super().__init__(config)
        self.broken_trace = False
        self.broken_logs = False

    def score_trace(self, trace: DepthTrace) -> list[Alert]:
        was_broken, self.broken_trace = self.broken_trace, not trace.is_finite
        if not self.broken_trace or was_broken:
            return []
        bad = [name for name, value in trace.summary.items() if not math.isfinite(value)]
        layers = [
            layer
            for layer, value in zip(trace.layers, trace.contraction.tolist())
            if not math.isfinite(value)
        ]
        where = f"summaries {bad}" if bad else "the neutral probe or the lens"
        message = f"non-finite depth trace ({where}, layers {layers or 'finite'}): {ADVICE}"
        metric = "spinal/ramp/" + bad[0] if bad else "spinal/trace"
        return [
            self.alert(trace.step, AlertLevel.CRITICAL, metric, math.nan, math.nan, message, layers)
        ]

    def score_logs(self, step: int, logs: Mapping[str, float]) -> list[Alert]:
        broken = {
            key: value
            for key, value in logs.items()
            if any(part in key for part in WATCHED_LOGS) and not math.isfinite(value)
        }
        was_broken, self.broken_logs = self.broken_logs, bool(broken)
        if not broken or was_broken:
            return []
        key, value = next(iter(broken.items()))
        message = f"non-finite training logs {broken}: {ADVICE}"
        return [self.alert(step, AlertLevel.CRITICAL, key, value, math.nan, message)]
