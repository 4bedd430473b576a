"""``preference_reversal``: the DPO loss settles far above ln 2, its value when training starts."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.monitor.rules.base import AlertRule
from spinal_callback.monitor.rules.logged import CHANCE_LOSS, training_loss

RECENT = 2
"""Logged losses in a row that must all be above the limit: one bad batch is not a reversal."""


class PreferenceReversal(AlertRule):
    """DPO's loss is ln 2 at step 0 (policy = reference), for every model, data set and beta.
    A run whose last two logged losses are both above ``ln 2 * (1 + reversal_margin)``
    prefers the rejected replies more than the reference did: the labels turned against the
    model, or the updates broke it. Critical at once (two logs are the patience).

    The anchor needs no calibration, so the rule works from the first logs, where a run that is
    broken from step 0 gives ``loss_spike`` no calm window to compare against.
    """

    name = "preference_reversal"
    state_fields = ("recent",)

    def __init__(self, config: SpinalConfig) -> None:
        super().__init__(config)
        self.recent: list[float] = []

    def score_logs(self, step: int, logs: Mapping[str, float]) -> list[Alert]:
        loss = training_loss(logs)
        margin = self.config.reversal_margin
        if loss is None or margin is None:
            return []
        if not math.isfinite(loss):
            self.recent = []
            return []
        self.recent = [*self.recent, loss][-RECENT:]
        mean = statistics.fmean(self.recent)
        limit = CHANCE_LOSS * (1.0 + margin)
        if len(self.recent) < RECENT or min(self.recent) <= limit:
            return []
        message = (
            f"the last {RECENT} logged DPO losses (mean {mean:.4g}) are far above ln 2 = 0.693 "
            "(its value at step 0): the policy now prefers the rejected replies more than the "
            "reference does. Check the pairs (flipped or mislabelled chosen/rejected), then the "
            "learning rate; resume from a checkpoint saved before this alert"
        )
        return [self.alert(step, AlertLevel.CRITICAL, "train/loss", mean, limit, message)]
