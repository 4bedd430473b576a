"""RampMonitor: runs the early-warning rules over the probe's traces and the trainer's logs.

The monitor owns nothing but the order of events: it hands the run's reference trace to every
rule once (``set_reference``), then each probe's ``DepthTrace`` (``update``) and each set of logged
scalars (``update_logs``), and collects the alerts the rules raise. Each rule is a small object
in ``spinal_callback.monitor.rules`` with its own name, levels, calibration and state; the list of
rules is ``DEFAULT_RULES`` unless the caller passes its own.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert
from spinal_callback.monitor.rules import DEFAULT_RULES, AlertRule
from spinal_callback.probe.trace import DepthTrace


def scalar_logs(logs: Mapping[str, Any]) -> dict[str, float]:
    """The numbers among a trainer's logged values, as floats: ints, floats and one-element
    tensors (Lightning's ``callback_metrics``); bools, strings and larger tensors are left out."""
    scalars = {}
    for key, value in logs.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars[key] = float(value.detach().float().cpu())
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            scalars[key] = float(value)
    return scalars


class RampMonitor:
    """Scores each new trace and each set of logs against the run's own reference.

    Args:
        config: the rules' thresholds, warm-up and patience (see ``SpinalConfig``).
        rules: rule classes to run, in order (default ``rules.DEFAULT_RULES``).

    The reference is the policy before training, traced on the same probe (TRL's ``ref_model``,
    the adapters-off PEFT model, or the run's first probe). Without a ``set_reference`` call,
    the first trace given to ``update`` is the reference.
    """

    state_key = "RampMonitor"

    def __init__(
        self,
        config: SpinalConfig | None = None,
        rules: Sequence[type[AlertRule]] = DEFAULT_RULES,
    ) -> None:
        self.config = config or SpinalConfig()
        self.rules: list[AlertRule] = [rule(self.config) for rule in rules]
        names = [rule.name for rule in self.rules]
        if len(set(names)) != len(names):
            raise ValueError(f"RampMonitor rules must have distinct names, got {names}")
        self.reference: DepthTrace | None = None
        self.probes_seen = 0

    def set_reference(self, reference: DepthTrace) -> None:
        """Calibrate every rule on the run's reference trace (call once, before ``update``)."""
        self.reference = reference
        for rule in self.rules:
            rule.calibrate(reference)

    def update(self, trace: DepthTrace) -> list[Alert]:
        """Score one probe's trace; returns the alerts it raises (possibly none)."""
        if self.reference is None:
            self.set_reference(trace)
        self.probes_seen += 1
        return [alert for rule in self.rules for alert in rule.score_trace(trace)]

    def update_logs(self, step: int, logs: Mapping[str, Any]) -> list[Alert]:
        """Score one set of the trainer's logged scalars (non-numeric values are ignored)."""
        scalars = scalar_logs(logs)
        return [alert for rule in self.rules for alert in rule.score_logs(step, scalars)]

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state: the reference, the probe count and every rule's own state."""
        return {
            "reference": None if self.reference is None else self.reference.to_dict(),
            "probes_seen": self.probes_seen,
            "rules": {rule.name: rule.state_dict() for rule in self.rules},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s output; rules absent from it keep their fresh state."""
        if "rules" not in state:
            warnings.warn(
                "spinal-callback: the saved RampMonitor state predates per-rule state; the rules "
                "start afresh and recalibrate on the reference trace",
                stacklevel=2,
            )
            return
        reference = state.get("reference")
        self.reference = None
        if reference is not None:
            self.set_reference(DepthTrace.from_dict(reference))
        self.probes_seen = int(state.get("probes_seen", 0))
        for rule in self.rules:
            if rule.name in state["rules"]:
                rule.load_state_dict(state["rules"][rule.name])
