"""``trace_departure``: the depth trace of neutral text moves away from the reference's."""

from __future__ import annotations

import math

import torch

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.monitor.rules.base import AlertRule
from spinal_callback.monitor.rules.language import has_language, perplexity_ratio
from spinal_callback.probe.trace import DepthTrace

RESOLUTION = 0.02
"""Floor of the early pace, as a relative change: a run whose first probe barely moved (most
healthy runs: under 1% in the benchmark's dev split) is scored against 2%, not against a pace
near zero that any later move would dwarf."""


def departure(trace: DepthTrace, reference: DepthTrace) -> float:
    """How far ``trace`` is from ``reference``, relative to the reference's own scale.

    The mean over late layers of the relative change of contraction and of lens entropy, the
    larger of the two: ``mean_l |C_l - C0_l| / mean_l |C0_l|``. Sign-free (a reorganisation in
    either direction counts) and unit-free (the same on every model). NaN where it cannot be
    measured (different layers, non-finite scores).
    """
    if trace.layers != reference.layers:
        return math.nan
    parts = [_relative_change(trace.contraction, reference.contraction)]
    if trace.lens_entropy is not None and reference.lens_entropy is not None:
        parts.append(_relative_change(trace.lens_entropy, reference.lens_entropy))
    return max(parts)


def _relative_change(values: torch.Tensor, reference: torch.Tensor) -> float:
    scale = float(reference.double().abs().mean())
    change = float((values.double() - reference.double()).abs().mean())
    if not (math.isfinite(scale) and math.isfinite(change)) or scale == 0.0:
        return math.nan
    return change / scale


class TraceDeparture(AlertRule):
    """The neutral probe's depth trace departing from the reference's, in units of the run's
    early pace.

    The first probe after the reference sets the pace: ``max(RESOLUTION, its departure)``. Later
    departures are scored as multiples of that pace: warning at ``departure_warning``, critical
    at ``departure_critical`` (off by default, see ``SpinalConfig``), at once: the probe texts
    are fixed, so the trace has no sampling noise from probe to probe to wait out. On text the
    run does not train on, a healthy run's trace barely moves after its first steps; damage
    moves it further and faster.

    With ``departure_corroborated`` (off by default), critical when at the same probe the
    neutral perplexity corroborates it: the departure at ``departure_warning`` or more and the
    perplexity at ``perplexity_warning`` or more. Two views of the same text, its geometry in
    the late layers and the model's own predictions, then agree that the language is being
    damaged.

    Silent without a neutral probe, and where the reference has no language (``has_language``):
    a random-initialised model learns the statistics of every text from its preference data, so
    no text is neutral to it (in the benchmark, healthy runs of the demo's random-initialised
    model moved their neutral trace by 100% or more).
    """

    name = "trace_departure"
    state_fields = ("pace",)

    def __init__(self, config: SpinalConfig) -> None:
        super().__init__(config)
        self.reference: DepthTrace | None = None
        self.full_reference: DepthTrace | None = None
        self.pace: float | None = None

    def calibrate(self, reference: DepthTrace) -> None:
        self.reference = reference.neutral if has_language(reference) else None
        self.full_reference = reference
        self.pace = None

    def score_trace(self, trace: DepthTrace) -> list[Alert]:
        if self.reference is None:
            return []
        if trace.neutral is None:
            return []
        distance = departure(trace.neutral, self.reference)
        if not math.isfinite(distance) or trace.step <= self.reference.step:
            return []
        if self.pace is None:
            self.pace = max(RESOLUTION, distance)
            return []
        multiple = distance / self.pace
        message = (
            f"the late layers' trace on neutral text is {distance:.1%} away from the reference, "
            f"{multiple:.1f}x its early pace: the updates are reorganising the late layers beyond "
            "what the preference data asks. Lower the learning rate (or raise beta) and resume "
            "from a checkpoint saved before this alert"
        )
        levels = (self.config.departure_warning, self.config.departure_critical)
        metric = "spinal/neutral/departure"
        alerts = self.leveled_alert(trace.step, metric, multiple, levels, message)
        if alerts and alerts[0].level == "warning" and self._corroborated(trace):
            assert self.config.departure_warning is not None
            message += (
                f"; the neutral perplexity is past {self.config.perplexity_warning}x too, so "
                "both views of the text agree"
            )
            critical = AlertLevel.CRITICAL
            threshold = self.config.departure_warning
            return [self.alert(trace.step, critical, metric, multiple, threshold, message)]
        return alerts

    def _corroborated(self, trace: DepthTrace) -> bool:
        """The neutral perplexity at ``perplexity_warning`` or more at this probe too."""
        warning = self.config.perplexity_warning
        if not self.config.departure_corroborated or warning is None:
            return False
        assert self.full_reference is not None
        ratio = perplexity_ratio(trace, self.full_reference)
        return ratio is not None and math.isfinite(ratio) and ratio >= warning
