"""RampMonitor: turns a stream of DepthTraces into early-warning Alerts (DESIGN section 4).

Rules, per ramp summary:
    non_finite   any NaN/inf in a trace: critical at once (no warm-up, no patience).
    robust_z     robust z-score of the step-to-step change against the median/MAD of all earlier
                 changes; ``z_info`` raises info at once, ``z_warning`` / ``z_critical`` raise
                 warning / critical after ``patience`` consecutive probes over the threshold
                 (``z_critical`` is off by default: in the benchmark this rule fired only on
                 stable runs).
    cusum        two-sided CUSUM of the level against the early run's median, in units of the
                 level noise, with slack ``cusum_drift`` per probe: slow persistent drift. It
                 raises info over ``cusum_threshold`` and restarts. Drift alone is never more than
                 info: in the benchmark (bench/early_warning.py) healthy DPO runs drift their
                 lens entropy and transport as steadily as failing ones.
    ramp_reversal
                 the contraction slope (the late-layer ramp) has fallen more than
                 ``ramp_drop_warning`` / ``ramp_drop_critical`` below the highest value it reached
                 in this run, for ``patience`` probes. Healthy DPO raises the slope; runs that
                 diverge flatten or reverse it (bench/early_warning.py). Active from the second
                 trace: it compares levels, so it needs no noise estimate.
Nothing but non_finite and ramp_reversal fires during the first ``warmup_probes`` probes.

From the trainer's logs (``update_logs``):
    non_finite   a NaN/inf loss: critical at once.
    loss_spike   the loss ``loss_spike_z`` robust sigmas above the median of the previous
                 ``loss_window`` logged values: info at once, critical after ``patience``
                 consecutive logs (a lone bad batch is not a trend; a preference signal that
                 turned against the model keeps the loss up).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from enum import Enum
from itertools import pairwise
from typing import Any

from spinal_callback.config import SpinalConfig
from spinal_callback.events import Alert, AlertLevel
from spinal_callback.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.trace import DepthTrace

MAD_TO_SIGMA = 1.4826
MIN_CHANGES = 8
"""Fewer earlier changes than this give too noisy a MAD to score a new change against."""
LOSS_KEYS = ("loss", "train/loss", "train_loss", "train_loss_step", "loss_step")
"""Names the training loss is logged under (HF/TRL first, then common Lightning names)."""
SUMMARY_KEY = "train_runtime"
"""Present in HF's end-of-training summary, whose ``train_loss`` is the run's mean loss."""
NON_FINITE_WATCHED = ("loss", "rewards/", "logps/")
"""Logged keys containing one of these must stay finite."""
LOSS_NOISE_FLOOR = 0.01
"""Robust sigma floor of the logged loss, in nats: a converged DPO loss sits near 0 with a MAD
near 0, and moves of a hundredth of a nat are not spikes."""


class Rule(str, Enum):
    NON_FINITE = "non_finite"
    ROBUST_Z = "robust_z"
    CUSUM = "cusum"
    RAMP_REVERSAL = "ramp_reversal"
    LOSS_SPIKE = "loss_spike"


ADVICE = {
    "contraction_slope": "the late-layer ramp is flattening or reversing",
    "transport_mean": "late layers are rewriting the prediction more than before",
    "transport_slope": "transport is no longer falling towards the output",
    "jaggedness": "contraction across late layers has turned jagged",
    "tortuosity": "the lens path through the late layers is winding",
    "lens_entropy": "the output distribution's entropy is moving fast",
}
RAMP_SLOPE = "contraction_slope"
DEFAULT_MONITORED = tuple(name for name in RAMP_SUMMARY_NAMES if name != "lens_entropy")
"""Lens entropy is charted but not scored by default: it collapses as a healthy run learns."""


class RampMonitor:
    """Scores each new trace against the run's own history and returns the alerts it raises.

    Args:
        config: thresholds, warm-up and patience (``SpinalConfig`` fields ``warmup_probes``,
            ``patience``, ``z_info``, ``z_warning``, ``z_critical``, ``cusum_drift``,
            ``cusum_threshold``, ``monitored``).
    """

    state_key = "RampMonitor"

    def __init__(self, config: SpinalConfig | None = None) -> None:
        self.config = config or SpinalConfig()
        self.metrics: tuple[str, ...] = tuple(self.config.monitored or DEFAULT_MONITORED)
        self.history: dict[str, list[float]] = {name: [] for name in self.metrics}
        self.cusum: dict[str, list[float]] = {name: [0.0, 0.0] for name in self.metrics}
        self.streak: dict[str, int] = {}
        self.ramp_peak: float | None = None
        self.losses: list[float] = []

    @property
    def probes_seen(self) -> int:
        return len(self.history[self.metrics[0]])

    def update(self, trace: DepthTrace) -> list[Alert]:
        """Record ``trace`` and return the alerts it raises (possibly none)."""
        if not trace.is_finite:
            self._record(trace)
            return [self._non_finite_alert(trace)]
        alerts = self._score_ramp(trace.step, trace.summary[RAMP_SLOPE])
        for name in self.metrics:
            value = trace.summary[name]
            history = self.history[name]
            if len(history) > max(self.config.warmup_probes, MIN_CHANGES):
                alerts.extend(self._score(trace.step, name, value, history))
            history.append(value)
        return alerts

    def update_logs(self, step: int, logs: Mapping[str, Any]) -> list[Alert]:
        """Score one set of the trainer's logged scalars.

        A non-finite value under a loss, ``rewards/`` or ``logps/`` key is critical (HF filters
        NaN losses out of its logged loss by default, but TRL's reward logs keep them). The
        ``loss_spike`` rule scores the loss found under the first of ``LOSS_KEYS``; logs without
        one (evaluation, end-of-training summaries) add nothing to its window.
        """
        broken = {
            key: float(value)
            for key, value in logs.items()
            if any(part in key for part in NON_FINITE_WATCHED) and not math.isfinite(float(value))
        }
        if broken:
            return [self._non_finite_loss_alert(step, broken)]
        loss = next((float(logs[key]) for key in LOSS_KEYS if key in logs), None)
        if loss is None or SUMMARY_KEY in logs:
            return []
        window, self.losses = self.losses, [*self.losses, loss][-self.config.loss_window :]
        z_limit = self.config.loss_spike_z
        if z_limit is None or len(window) < self.config.loss_window:
            return []
        median = statistics.median(window)
        sigma = MAD_TO_SIGMA * statistics.median(abs(x - median) for x in window)
        z = (loss - median) / max(sigma, LOSS_NOISE_FLOOR)
        candidate = AlertLevel.CRITICAL if z >= z_limit else None
        level = self._with_patience(f"loss/{Rule.LOSS_SPIKE.value}", candidate, 1.0)
        if level is None:
            return []
        return [
            Alert(
                step=step,
                level=level.name.lower(),
                rule=Rule.LOSS_SPIKE.value,
                metric="train/loss",
                value=z,
                threshold=z_limit,
                message=(
                    f"training loss {loss:.4g} is {z:.1f} robust sigmas above the median "
                    f"{median:.4g} of the last {len(window)} logs: the preference signal turned "
                    "against the model (label noise or flipped pairs) or the step size is too "
                    "large; check the data and lower the learning rate"
                ),
            )
        ]

    def state_dict(self) -> dict[str, Any]:
        return {
            "history": {name: list(values) for name, values in self.history.items()},
            "cusum": {name: list(values) for name, values in self.cusum.items()},
            "streak": dict(self.streak),
            "ramp_peak": self.ramp_peak,
            "losses": list(self.losses),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self.metrics) - set(state["history"]))
        if missing:
            raise ValueError(
                f"RampMonitor state lacks metrics {missing}; it was saved with other settings"
            )
        self.history = {name: [float(v) for v in state["history"][name]] for name in self.metrics}
        self.cusum = {name: [float(v) for v in state["cusum"][name]] for name in self.metrics}
        self.streak = {key: int(value) for key, value in state["streak"].items()}
        peak = state.get("ramp_peak")
        self.ramp_peak = None if peak is None else float(peak)
        self.losses = [float(v) for v in state.get("losses", [])]

    def _record(self, trace: DepthTrace) -> None:
        for name in self.metrics:
            value = trace.summary[name]
            if math.isfinite(value):
                self.history[name].append(value)

    def _score_ramp(self, step: int, slope: float) -> list[Alert]:
        """``ramp_reversal``: the contraction slope's fall below its running peak."""
        peak = self.ramp_peak
        self.ramp_peak = slope if peak is None else max(peak, slope)
        if peak is None:
            return []
        drop = self.ramp_peak - slope
        crossed = [
            (level, threshold)
            for level, threshold in (
                (AlertLevel.CRITICAL, self.config.ramp_drop_critical),
                (AlertLevel.WARNING, self.config.ramp_drop_warning),
            )
            if threshold is not None and drop >= threshold
        ]
        if not crossed:
            self._with_patience(f"{RAMP_SLOPE}/{Rule.RAMP_REVERSAL.value}", None, -1.0)
            return []
        candidate, threshold = crossed[0]
        level = self._with_patience(f"{RAMP_SLOPE}/{Rule.RAMP_REVERSAL.value}", candidate, -1.0)
        assert level is not None
        return [
            Alert(
                step=step,
                level=level.name.lower(),
                rule=Rule.RAMP_REVERSAL.value,
                metric=f"spinal/ramp/{RAMP_SLOPE}",
                value=drop,
                threshold=float(threshold),
                message=(
                    f"the late-layer ramp reversed: contraction slope {slope:+.2f} is {drop:.2f} "
                    f"below this run's peak {self.ramp_peak:+.2f}; the updates are tearing the "
                    "late layers apart (learning rate too high is the usual cause): lower the "
                    "learning rate or resume from an earlier checkpoint"
                ),
            )
        ]

    def _score(self, step: int, name: str, value: float, history: list[float]) -> list[Alert]:
        config = self.config
        changes = [b - a for a, b in pairwise(history)]
        scale = _robust_scale(changes, history)
        z = (value - history[-1] - statistics.median(changes)) / scale
        alerts = []
        z_level = _level(abs(z), config.z_info, config.z_warning, config.z_critical)
        level = self._with_patience(f"{name}/{Rule.ROBUST_Z.value}", z_level, z)
        if level is not None:
            threshold = {1: config.z_info, 2: config.z_warning, 3: config.z_critical}[int(level)]
            assert threshold is not None
            alerts.append(self._alert(step, level, Rule.ROBUST_Z, name, z, threshold))
        # Level drift against the early run, in units of the level noise (change scale / sqrt 2):
        # slow, persistent moves that no single change gives away accumulate here.
        baseline = statistics.median(history[: MIN_CHANGES + 1])
        deviation = (value - baseline) / (scale / math.sqrt(2.0))
        high, low = self.cusum[name]
        high = max(0.0, high + deviation - config.cusum_drift)
        low = max(0.0, low - deviation - config.cusum_drift)
        statistic = max(high, low)
        if statistic >= config.cusum_threshold:
            alerts.append(
                self._alert(
                    step, AlertLevel.INFO, Rule.CUSUM, name, statistic, config.cusum_threshold
                )
            )
            high = low = 0.0
        self.cusum[name] = [high, low]
        return alerts

    def _with_patience(
        self, key: str, level: AlertLevel | None, direction: float
    ) -> AlertLevel | None:
        """Info fires at once; warning/critical only after ``patience`` consecutive probes over
        the threshold in the same direction (a lone spike and its return are two opposite
        crossings, not a trend)."""
        if level is None or level == AlertLevel.INFO:
            self.streak[key] = 0
            return level
        sign = 1 if direction >= 0 else -1
        previous = self.streak.get(key, 0)
        self.streak[key] = previous + sign if previous * sign > 0 else sign
        if abs(self.streak[key]) >= self.config.patience:
            return level
        return AlertLevel.INFO

    def _alert(
        self, step: int, level: AlertLevel, rule: Rule, name: str, value: float, threshold: float
    ) -> Alert:
        what = "change" if rule == Rule.ROBUST_Z else "drift"
        message = (
            f"{name} {what} score {value:+.1f} beyond {threshold:g}: "
            f"{ADVICE.get(name, 'the ramp moved')}; check the learning rate and beta, "
            "and compare with the reference trace"
        )
        return Alert(
            step=step,
            level=level.name.lower(),
            rule=rule.value,
            metric=f"spinal/ramp/{name}",
            value=float(value),
            threshold=float(threshold),
            message=message,
        )

    def _non_finite_loss_alert(self, step: int, broken: dict[str, float]) -> Alert:
        name, value = next(iter(broken.items()))
        return Alert(
            step=step,
            level="critical",
            rule=Rule.NON_FINITE.value,
            metric=name,
            value=value,
            threshold=float("nan"),
            message=(
                f"non-finite training logs {broken}: the weights or the loss scale overflowed; "
                "stop, lower the learning rate or loss scale, and resume from the last finite "
                "checkpoint"
            ),
        )

    def _non_finite_alert(self, trace: DepthTrace) -> Alert:
        bad = [n for n, v in trace.summary.items() if not math.isfinite(v)]
        layers = [
            layer
            for layer, v in zip(trace.layers, trace.contraction.tolist())
            if not math.isfinite(v)
        ]
        return Alert(
            step=trace.step,
            level="critical",
            rule=Rule.NON_FINITE.value,
            metric="spinal/ramp/" + (bad[0] if bad else "contraction"),
            value=float("nan"),
            threshold=float("nan"),
            layers=layers,
            message=(
                f"non-finite depth trace (summaries {bad or 'finite'}, "
                f"layers {layers or 'finite'}): the weights or activations overflowed; stop, "
                "lower the learning rate or loss scale, and resume from the last finite checkpoint"
            ),
        )


def _robust_scale(changes: Sequence[float], levels: Sequence[float]) -> float:
    """MAD-based sigma of the changes, floored so a flat history does not divide by ~0."""
    median = statistics.median(changes)
    mad = statistics.median(abs(c - median) for c in changes)
    floor = 1e-3 * max(abs(statistics.median(levels)), 1e-3)
    # Half the standard deviation guards against a MAD that a short history underestimates.
    return max(MAD_TO_SIGMA * mad, 0.5 * statistics.pstdev(changes), floor)


def _level(score: float, info: float, warning: float, critical: float | None) -> AlertLevel | None:
    if critical is not None and score >= critical:
        return AlertLevel.CRITICAL
    if score >= warning:
        return AlertLevel.WARNING
    if score >= info:
        return AlertLevel.INFO
    return None
