"""Reading the trainer's logged DPO scalars: which key holds the loss, and which logs to skip."""

from __future__ import annotations

import math
from collections.abc import Mapping

LOSS_KEYS = ("loss", "train/loss", "train_loss", "train_loss_step", "loss_step")
"""Names the training loss is logged under (HF/TRL first, then common Lightning names)."""
SUMMARY_KEY = "train_runtime"
"""Present in HF's end-of-training summary, whose ``train_loss`` is the run's mean loss."""
CHANCE_LOSS = math.log(2.0)
"""The DPO loss when policy and reference agree (every run's step 0), in nats."""


def training_loss(logs: Mapping[str, float]) -> float | None:
    """The training loss in one set of logs, or ``None`` (evaluation logs, the end summary)."""
    if SUMMARY_KEY in logs:
        return None
    return next((logs[key] for key in LOSS_KEYS if key in logs), None)
