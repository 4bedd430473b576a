"""Alert messages read at their level: info says what was seen and when it would matter; warning
and critical say what to do."""

from __future__ import annotations

import random

import pytest

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert
from spinal_callback.monitor.ramp_monitor import RampMonitor
from spinal_callback.monitor.rules.loss_spike import LossSpike

ADVICE = ("lower the learning rate", "check the data", "resume from", "check the pairs")
"""Phrases that tell the reader to act; an info message carries none of them."""


def spikes(patience: int, spiking_logs: int, seed: int = 0) -> list[Alert]:
    """Alerts of ``loss_spike`` on 20 calm logs around 0.3 followed by ``spiking_logs`` at 0.9."""
    rule = LossSpike(SpinalConfig(patience=patience))
    rng = random.Random(seed)
    calm = [0.3 + rng.gauss(0, 0.01) for _ in range(20)]
    losses = [*calm, *[0.9] * spiking_logs]
    return [
        alert for step, loss in enumerate(losses) for alert in rule.score_logs(step, {"loss": loss})
    ]


def test_a_lone_loss_spike_reads_as_information_not_as_an_instruction() -> None:
    [alert] = spikes(patience=2, spiking_logs=1)
    assert alert.level == "info"
    assert "For information, no action needed" in alert.message
    assert "this becomes critical if the next log spikes too" in alert.message
    assert not [phrase for phrase in ADVICE if phrase in alert.message.lower()]


def test_an_info_spike_counts_the_logs_left_before_it_is_critical() -> None:
    first, second = spikes(patience=3, spiking_logs=2)
    assert "(one log)" in first.message and "if the next 2 logs spike too" in first.message
    assert "(2 logs in a row)" in second.message and "if the next log spikes too" in second.message


def test_a_sustained_loss_spike_says_what_to_do() -> None:
    info, critical = spikes(patience=2, spiking_logs=2)
    assert (info.level, critical.level) == ("info", "critical")
    assert "(2 logs in a row)" in critical.message
    message = critical.message.lower()
    assert "check the data" in message and "lower the learning rate" in message
    assert "no action needed" not in message


@pytest.mark.parametrize("seed", range(5))
def test_no_default_rule_gives_advice_at_the_info_level(seed: int) -> None:
    """Every rule the monitor runs by default, fed a noisy healthy loss with lone spikes."""
    monitor = RampMonitor(SpinalConfig())
    rng = random.Random(seed)
    alerts = []
    for step in range(1, 301):
        loss = 0.6 * 0.995**step + rng.gauss(0, 0.02) + (0.5 if step % 50 == 0 else 0.0)
        alerts += monitor.update_logs(step, {"loss": loss, "rewards/margins": 0.1})
    info = [alert for alert in alerts if alert.level == "info"]
    assert info, "the stream should raise at least one info alert"
    for alert in info:
        assert "no action needed" in alert.message, alert
        assert not [phrase for phrase in ADVICE if phrase in alert.message.lower()], alert
