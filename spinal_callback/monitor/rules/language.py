"""``language_drift``: the policy predicts neutral text worse than the reference did."""

from __future__ import annotations

import math

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert
from spinal_callback.monitor.rules.base import AlertRule
from spinal_callback.probe.trace import DepthTrace

LANGUAGE_SHARE = 0.5
"""A reference whose neutral-text NLL is above this share of ln(vocabulary) predicts text little
better than chance (a random-initialised model): it has no language to lose, and the rule
stays silent."""


def has_language(reference: DepthTrace) -> bool:
    """True when the reference predicts its neutral texts clearly better than chance (its NLL is
    below ``LANGUAGE_SHARE`` of ln(vocabulary)); False without a neutral probe."""
    neutral = reference.neutral
    return neutral is not None and predicts_better_than_chance(neutral) is True


def predicts_better_than_chance(trace: DepthTrace) -> bool | None:
    """Whether the model predicts ``trace``'s own texts clearly better than chance: its
    next-token NLL below ``LANGUAGE_SHARE`` of ln(vocabulary) (any finite NLL when the
    vocabulary is unknown). ``None`` when the trace has no finite NLL."""
    nll = trace.next_token_nll
    if nll is None or not math.isfinite(nll):
        return None
    vocabulary = trace.metadata.get("vocab_size")
    chance = math.log(vocabulary) if isinstance(vocabulary, int) and vocabulary > 1 else None
    return chance is None or nll < LANGUAGE_SHARE * chance


def perplexity_ratio(trace: DepthTrace, reference: DepthTrace) -> float | None:
    """Neutral-text perplexity of ``trace`` as a multiple of ``reference``'s; ``None`` without a
    neutral probe on both (NaN when the trace's NLL is not finite)."""
    if trace.neutral is None or reference.neutral is None:
        return None
    nll, reference_nll = trace.neutral.next_token_nll, reference.neutral.next_token_nll
    if nll is None or reference_nll is None:
        return None
    if not math.isfinite(nll):
        return math.nan
    return math.exp(min(nll - reference_nll, 50.0))


class LanguageDrift(AlertRule):
    """Perplexity of the neutral probe texts (the last late block's lens, which is the model's
    own output) as a multiple of the reference's: ``exp(nll - nll_reference)``.

    DPO trains on preference pairs; text it is not trained on should keep its perplexity. A
    multiple is the same unit on every model and vocabulary. Warning at ``perplexity_warning``,
    critical at ``perplexity_critical``, at once: the probe texts are fixed, so the multiple has
    no sampling noise to wait out, and a model that lost its language for one probe is damaged.
    """

    name = "language_drift"

    def __init__(self, config: SpinalConfig) -> None:
        super().__init__(config)
        self.reference: DepthTrace | None = None

    def calibrate(self, reference: DepthTrace) -> None:
        self.reference = reference if has_language(reference) else None

    def score_trace(self, trace: DepthTrace) -> list[Alert]:
        multiple = None if self.reference is None else perplexity_ratio(trace, self.reference)
        if multiple is None or not math.isfinite(multiple):
            return []
        message = (
            f"perplexity on neutral text is {multiple:.2f}x the reference's: the updates are "
            "damaging the model's language beyond the preference data. Lower the learning rate "
            "(or raise beta) and resume from a checkpoint saved before this alert"
        )
        levels = (self.config.perplexity_warning, self.config.perplexity_critical)
        metric = "spinal/neutral/perplexity_ratio"
        return self.leveled_alert(trace.step, metric, multiple, levels, message)
