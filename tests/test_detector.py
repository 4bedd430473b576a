"""RampMonitor rules on synthetic trace streams, and its state round trip."""

from __future__ import annotations

import math
import random

import pytest
import torch

from spinal_callback.config import SpinalConfig
from spinal_callback.detector import RampMonitor
from spinal_callback.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.trace import DepthTrace

BASE = {
    "contraction_slope": 0.8,
    "transport_mean": 0.2,
    "transport_slope": -0.1,
    "jaggedness": 0.05,
    "tortuosity": 1.5,
    "lens_entropy": 4.0,
}


def trace(step: int, **summary: float) -> DepthTrace:
    values = {**BASE, **summary}
    contraction = torch.tensor([1.0, 1.1, 1.2, 1.3])
    if not math.isfinite(values["contraction_slope"]):
        contraction = torch.tensor([1.0, float("nan"), 1.2, 1.3])
    return DepthTrace(
        step=step,
        layers=[4, 5, 6, 7],
        num_blocks=8,
        contraction=contraction,
        transport=torch.tensor([0.2, 0.2, 0.2]),
        contraction_status=torch.zeros(4, dtype=torch.int8),
        summary=values,
        measure="hellinger",
        model_fingerprint="m",
        probe_fingerprint="p",
    )


def noisy_stream(count: int, seed: int = 0, scale: float = 0.01) -> list[DepthTrace]:
    rng = random.Random(seed)
    return [
        trace(10 * i, **{name: value * (1 + rng.gauss(0, scale)) for name, value in BASE.items()})
        for i in range(count)
    ]


def run(monitor: RampMonitor, traces: list[DepthTrace]) -> list:
    return [alert for t in traces for alert in monitor.update(t)]


def test_a_stable_noisy_stream_raises_no_warning_or_critical() -> None:
    alerts = run(RampMonitor(SpinalConfig()), noisy_stream(200))
    assert [a for a in alerts if a.level != "info"] == []


def test_non_finite_trace_is_critical_at_once_even_during_warmup() -> None:
    alerts = RampMonitor(SpinalConfig(warmup_probes=5)).update(
        trace(0, contraction_slope=float("nan"))
    )
    assert [(a.level, a.rule) for a in alerts] == [("critical", "non_finite")]
    assert alerts[0].layers == [5]


def test_nothing_but_non_finite_fires_during_warmup() -> None:
    monitor = RampMonitor(SpinalConfig(warmup_probes=5))
    alerts = run(monitor, [trace(0), trace(10), trace(20, jaggedness=50.0)])
    assert alerts == []


def test_a_jump_becomes_critical_only_after_patience_probes() -> None:
    monitor = RampMonitor(SpinalConfig(patience=2))
    run(monitor, noisy_stream(20))
    first = monitor.update(trace(200, jaggedness=5.0))
    second = monitor.update(trace(210, jaggedness=50.0))
    jump = "spinal/ramp/jaggedness"
    assert {a.level for a in first if a.metric == jump and a.rule == "robust_z"} == {"info"}
    assert "critical" in {a.level for a in second if a.metric == jump and a.rule == "robust_z"}


def test_a_lone_spike_that_returns_is_not_escalated() -> None:
    monitor = RampMonitor(SpinalConfig(patience=2))
    run(monitor, noisy_stream(20))
    alerts = run(monitor, [trace(200, jaggedness=5.0), trace(210), trace(220)])
    assert not any(a.level == "critical" for a in alerts)


def test_slow_persistent_drift_is_caught_by_cusum() -> None:
    monitor = RampMonitor(SpinalConfig())
    run(monitor, noisy_stream(20))
    rng = random.Random(1)
    drifting = [
        trace(200 + 10 * i, contraction_slope=0.8 - 0.004 * i + rng.gauss(0, 0.008))
        for i in range(60)
    ]
    alerts = run(monitor, drifting)
    assert any(a.rule == "cusum" and a.level == "info" for a in alerts)
    assert not any(a.level == "critical" for a in alerts)


def test_alerts_carry_step_metric_threshold_and_an_actionable_message() -> None:
    monitor = RampMonitor(SpinalConfig(patience=1))
    run(monitor, noisy_stream(20))
    alert = next(a for a in monitor.update(trace(999, tortuosity=40.0)) if a.rule == "robust_z")
    assert (alert.step, alert.metric, alert.level) == (999, "spinal/ramp/tortuosity", "critical")
    assert alert.value > alert.threshold == SpinalConfig().z_critical
    assert "learning rate" in alert.message


def test_monitored_restricts_the_watched_summaries() -> None:
    monitor = RampMonitor(SpinalConfig(monitored=["jaggedness"], patience=1))
    run(monitor, noisy_stream(20))
    alerts = monitor.update(trace(999, tortuosity=40.0, jaggedness=0.05))
    assert alerts == []


def test_state_dict_round_trips_exactly_and_continues_identically() -> None:
    stream = noisy_stream(40, seed=3)
    original = RampMonitor(SpinalConfig())
    run(original, stream[:25])
    restored = RampMonitor(SpinalConfig())
    restored.load_state_dict(original.state_dict())
    assert restored.state_dict() == original.state_dict()
    rest = [*stream[25:], trace(999, jaggedness=9.0), trace(1009, jaggedness=90.0)]
    assert [a.to_dict() | {"time": 0} for a in run(original, rest)] == [
        a.to_dict() | {"time": 0} for a in run(restored, rest)
    ]


def test_loading_state_for_other_metrics_is_rejected() -> None:
    state = RampMonitor(SpinalConfig(monitored=["jaggedness"])).state_dict()
    with pytest.raises(ValueError, match="lacks metrics"):
        RampMonitor(SpinalConfig()).load_state_dict(state)


def test_every_summary_has_advice() -> None:
    from spinal_callback.detector import ADVICE

    assert set(ADVICE) == set(RAMP_SUMMARY_NAMES)
