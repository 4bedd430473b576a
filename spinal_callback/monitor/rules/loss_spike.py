"""``loss_spike``: the logged loss jumps far above its own recent level, in units of its noise."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.monitor.rules.base import AlertRule, Streak, robust_sigma
from spinal_callback.monitor.rules.logged import training_loss

MIN_WINDOW = 5
"""Logged losses the window needs before a new one is scored."""
LEVEL_LOGS = 3
"""The recent level is the median of this many latest logs (it follows a falling loss)."""
NOISE_FLOOR = 1e-3
"""Relative floor of the noise, so that a loss logged with few digits does not divide by 0."""


def loss_noise(window: list[float]) -> float:
    """Log-to-log noise of the loss: the robust spread of its first differences over sqrt 2.

    Differences remove the trend of a falling loss, which a spread of the levels would count
    as noise. Needs at least two values.
    """
    changes = [after - before for before, after in itertools.pairwise(window)]
    # Half the standard deviation guards against a MAD that a short window underestimates.
    spread = max(robust_sigma(changes), 0.5 * statistics.pstdev(changes))
    return spread / math.sqrt(2.0)


class LossSpike(AlertRule):
    """A loss ``loss_spike_z`` noise units above the median of the last 3 of the previous
    ``loss_window`` finite logs: info at once, critical after ``patience`` such logs in a row.

    The unit is the run's own log-to-log noise over the window (``loss_noise``): the same
    threshold holds for a per-step Lightning log and a 10-step TRL mean, on any model. A spiking
    loss does not enter the window, so a loss that stays up is scored against the level it
    left, not against itself.
    """

    name = "loss_spike"
    state_fields = ("window", "streak")

    def __init__(self, config: SpinalConfig) -> None:
        super().__init__(config)
        self.window: list[float] = []
        self.streak = Streak(config.patience)

    def score_logs(self, step: int, logs: Mapping[str, float]) -> list[Alert]:
        loss = training_loss(logs)
        limit = self.config.loss_spike_z
        if loss is None or limit is None or not math.isfinite(loss):
            return []
        window = self.window
        if len(window) < MIN_WINDOW:
            self.window = [*window, loss]
            return []
        level = statistics.median(window[-LEVEL_LOGS:])
        noise = max(loss_noise(window), NOISE_FLOOR * abs(level), 1e-9)
        z = (loss - level) / noise
        crossed = z >= limit
        sustained = self.streak.update(crossed)
        if not crossed:
            self.window = [*window, loss][-self.config.loss_window :]
            return []
        severity = AlertLevel.CRITICAL if sustained else AlertLevel.INFO
        message = self._message(loss, z, level, sustained)
        return [self.alert(step, severity, "train/loss", z, limit, message)]

    def _message(self, loss: float, z: float, level: float, sustained: bool) -> str:
        """What was seen; for the critical level, what to do; for info, when it would matter."""
        count = self.streak.count
        seen = (
            f"training loss {loss:.4g} is {z:.1f} noise units above its recent level {level:.4g} "
            f"({'one log' if count == 1 else f'{count} logs in a row'})"
        )
        if sustained:
            return (
                f"{seen}: the preference signal turned against the model (flipped or noisy "
                "pairs) or the step size is too large. Check the data, then lower the learning "
                "rate and resume from a checkpoint saved before this alert"
            )
        remaining = self.config.patience - count
        following = "the next log spikes" if remaining == 1 else f"the next {remaining} logs spike"
        return (
            f"{seen}. For information, no action needed: one unusual batch does this. It "
            f"matters only if the loss stays up: this becomes critical if {following} too"
        )
