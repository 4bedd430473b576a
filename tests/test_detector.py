"""RampMonitor rules on synthetic trace streams, and its state round trip."""

from __future__ import annotations

import json
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
    monitor = RampMonitor(SpinalConfig(patience=2, z_critical=10.0))
    run(monitor, noisy_stream(20))
    first = monitor.update(trace(200, jaggedness=5.0))
    second = monitor.update(trace(210, jaggedness=50.0))
    jump = "spinal/ramp/jaggedness"
    assert {a.level for a in first if a.metric == jump and a.rule == "robust_z"} == {"info"}
    assert "critical" in {a.level for a in second if a.metric == jump and a.rule == "robust_z"}


def test_by_default_a_change_alone_is_at_most_a_warning() -> None:
    monitor = RampMonitor(SpinalConfig(patience=1))
    run(monitor, noisy_stream(20))
    alerts = run(monitor, [trace(200, jaggedness=50.0), trace(210, jaggedness=500.0)])
    assert {a.level for a in alerts if a.rule == "robust_z"} == {"warning"}


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
    monitor = RampMonitor(SpinalConfig(patience=1, z_critical=10.0))
    run(monitor, noisy_stream(20))
    alert = next(a for a in monitor.update(trace(999, tortuosity=40.0)) if a.rule == "robust_z")
    assert (alert.step, alert.metric, alert.level) == (999, "spinal/ramp/tortuosity", "critical")
    assert alert.value > alert.threshold == 10.0
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


def ramp(slopes: list[float]) -> list[DepthTrace]:
    return [trace(10 * i, contraction_slope=slope) for i, slope in enumerate(slopes)]


def test_a_rising_ramp_with_small_dips_raises_nothing() -> None:
    slopes = [-0.8, -0.5, -0.6, -0.3, -0.35, 0.0, 0.2, 0.1, 0.3, 0.25, 0.4]
    assert run(RampMonitor(SpinalConfig()), ramp(slopes)) == []


def test_a_reversed_ramp_warns_then_goes_critical_after_patience() -> None:
    config = SpinalConfig(ramp_drop_warning=0.4, ramp_drop_critical=0.8, patience=2)
    alerts = run(RampMonitor(config), ramp([-0.7, -0.2, -0.65, -0.7, -1.1, -1.2]))
    reversal = [(a.step, a.level) for a in alerts if a.rule == "ramp_reversal"]
    assert reversal == [(20, "info"), (30, "warning"), (40, "critical"), (50, "critical")]
    last = alerts[-1]
    assert last.value == pytest.approx(1.0) and last.threshold == 0.8
    assert "learning rate" in last.message


def test_ramp_reversal_needs_no_warmup() -> None:
    monitor = RampMonitor(SpinalConfig(warmup_probes=50, patience=1))
    alerts = run(monitor, ramp([0.0, -1.0]))
    assert [(a.level, a.rule) for a in alerts] == [("critical", "ramp_reversal")]


def test_ramp_reversal_levels_can_be_switched_off() -> None:
    only_critical = SpinalConfig(ramp_drop_warning=None, ramp_drop_critical=0.8, patience=1)
    assert run(RampMonitor(only_critical), ramp([0.0, -0.5])) == []
    assert [a.level for a in run(RampMonitor(only_critical), ramp([0.0, -0.9]))] == ["critical"]


def test_lens_entropy_is_charted_but_not_scored_unless_asked() -> None:
    collapse = [
        *noisy_stream(20),
        *(trace(300 + 10 * i, lens_entropy=4.0 * 0.5**i) for i in range(1, 6)),
    ]
    assert run(RampMonitor(SpinalConfig(patience=1)), collapse) == []
    asked = SpinalConfig(patience=1, monitored=["lens_entropy"])
    assert any(a.metric == "spinal/ramp/lens_entropy" for a in run(RampMonitor(asked), collapse))


def feed_losses(monitor: RampMonitor, losses: list[float], start: int = 1) -> list:
    return [
        alert
        for step, loss in enumerate(losses, start=start)
        for alert in monitor.update_logs(step, {"loss": loss, "learning_rate": 1e-3})
    ]


def noisy_losses(count: int, seed: int = 0) -> list[float]:
    rng = random.Random(seed)
    return [0.3 + rng.gauss(0, 0.02) for _ in range(count)]


def test_a_noisy_training_loss_raises_nothing() -> None:
    assert feed_losses(RampMonitor(SpinalConfig()), noisy_losses(500)) == []


def test_a_lone_loss_spike_is_info_and_a_sustained_one_critical() -> None:
    monitor = RampMonitor(SpinalConfig(patience=2))
    feed_losses(monitor, noisy_losses(30))
    lone = feed_losses(monitor, [2.0, 0.3, 0.31], start=31)
    assert [(a.step, a.level, a.rule) for a in lone] == [(31, "info", "loss_spike")]
    sustained = feed_losses(monitor, [2.0, 2.2], start=34)
    assert [(a.step, a.level) for a in sustained] == [(34, "info"), (35, "critical")]
    assert sustained[-1].metric == "train/loss" and sustained[-1].value > 6.0


def test_a_non_finite_loss_or_reward_log_is_critical_at_once() -> None:
    monitor = RampMonitor(SpinalConfig())
    [nan_loss] = monitor.update_logs(3, {"loss": float("nan")})
    assert (nan_loss.step, nan_loss.level, nan_loss.rule) == (3, "critical", "non_finite")
    [nan_margin] = monitor.update_logs(4, {"loss": 0.69, "rewards/margins": float("inf")})
    assert nan_margin.metric == "rewards/margins" and "loss scale" in nan_margin.message
    assert monitor.update_logs(5, {"grad_norm": float("inf"), "loss": 0.69}) == []


def test_logs_without_a_loss_are_ignored_and_the_spike_rule_can_be_off() -> None:
    monitor = RampMonitor(SpinalConfig(loss_spike_z=None, patience=1))
    feed_losses(monitor, noisy_losses(30))
    assert monitor.update_logs(31, {"eval_accuracy": 0.5}) == []
    assert monitor.update_logs(31, {"train_loss": 9.0, "train_runtime": 12.0}) == []
    assert 9.0 not in monitor.losses
    assert feed_losses(monitor, [5.0, 5.0], start=32) == []


def test_log_state_round_trips_with_the_trace_state() -> None:
    original = RampMonitor(SpinalConfig(patience=2))
    run(original, ramp([0.2, 0.5, 0.1]))
    feed_losses(original, [*noisy_losses(25), 2.0])
    restored = RampMonitor(SpinalConfig(patience=2))
    restored.load_state_dict(json.loads(json.dumps(original.state_dict())))
    assert restored.state_dict() == original.state_dict()
    assert [a.level for a in feed_losses(restored, [2.0], start=27)] == ["critical"]
    assert [a.level for a in run(restored, ramp([0.05]))] == ["warning"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"ramp_drop_warning": 0.9, "ramp_drop_critical": 0.5},
        {"ramp_drop_warning": -0.1},
        {"loss_spike_z": 0.0},
        {"loss_window": 2},
    ],
)
def test_bad_rule_settings_are_rejected_at_construction(overrides: dict) -> None:
    with pytest.raises(ValueError, match="SpinalConfig"):
        SpinalConfig(**overrides)
