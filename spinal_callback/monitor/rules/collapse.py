"""``task_collapse``: on a model with no language, the task probe's late layers move too fast."""

from __future__ import annotations

import math

import torch

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert
from spinal_callback.monitor.rules.base import AlertRule
from spinal_callback.monitor.rules.language import predicts_better_than_chance
from spinal_callback.probe.trace import DepthTrace


def collapse_rate(trace: DepthTrace, previous: DepthTrace, reference: DepthTrace) -> float:
    """How fast the task trace moved from ``previous`` to ``trace``: per optimizer step, the
    larger of the lens entropy lost and the contraction changed (either sign), each the mean
    over late layers as a share of ``reference``'s mean. A unit-free fraction per step; NaN
    where it cannot be measured (no lens entropy, other layers, non-finite scores, no step
    between the two)."""
    steps = trace.step - previous.step
    if steps <= 0 or not (trace.layers == previous.layers == reference.layers):
        return math.nan
    if trace.lens_entropy is None or previous.lens_entropy is None:
        return math.nan
    if reference.lens_entropy is None:
        return math.nan
    entropy = _share(
        float((previous.lens_entropy.double() - trace.lens_entropy.double()).mean()),
        reference.lens_entropy,
    )
    contraction = _share(
        float((trace.contraction.double() - previous.contraction.double()).abs().mean()),
        reference.contraction,
    )
    finite = [share for share in (entropy, contraction) if math.isfinite(share)]
    return max(finite) / steps if finite else math.nan


def _share(change: float, reference: torch.Tensor) -> float:
    scale = float(reference.double().abs().mean())
    if not (math.isfinite(change) and math.isfinite(scale)) or scale == 0.0:
        return math.nan
    return change / scale


class TaskCollapse(AlertRule):
    """The task probe's depth trace collapsing, on a model that has no language to lose.

    A random-initialised model predicts text no better than chance, so ``language_drift`` and
    ``trace_departure`` stay silent on it and only the log rules would watch. Its task trace
    still moves as it learns: a healthy run lowers the lens entropy of the task prompts and
    raises their contraction gradually; a learning rate that breaks it does the same within a
    few steps. The rule scores, between two probes, the share of the reference's lens entropy
    lost per optimizer step, or of its contraction changed (``collapse_rate``): warning at
    ``collapse_warning``, critical at ``collapse_critical``, at once (the probe texts are fixed).

    It applies only to a reference with no language: one that predicts the neutral texts no
    better than chance (the task prompts, without a neutral probe). Task prompts alone do not
    say: a real model predicts a prompt of random words no better than chance either. On a
    model with a language the neutral rules watch. Probe often enough to see a collapse
    (``every_n_steps`` of 10-20): a rate averaged over a long interval dilutes one that
    happened within a few steps.
    """

    name = "task_collapse"
    state_fields = ("previous",)

    def __init__(self, config: SpinalConfig) -> None:
        super().__init__(config)
        self.reference: DepthTrace | None = None
        self.previous: dict | None = None

    def calibrate(self, reference: DepthTrace) -> None:
        self.reference = reference if _no_language(reference) else None
        self.previous = None

    def score_trace(self, trace: DepthTrace) -> list[Alert]:
        if self.reference is None or trace.step <= self.reference.step:
            return []
        previous = self.reference if self.previous is None else _restore(self.previous, trace)
        self.previous = _plain(trace)
        rate = collapse_rate(trace, previous, self.reference)
        if not math.isfinite(rate):
            return []
        message = (
            f"the task prompts' late-layer trace moved {rate:.1%} of the reference's scale per "
            f"step since step {previous.step}: faster than a healthy run learns. On a model with "
            "no language this is how a collapse onto a few tokens starts. Lower the learning "
            "rate and resume from a checkpoint saved before this alert"
        )
        levels = (self.config.collapse_warning, self.config.collapse_critical)
        return self.leveled_alert(trace.step, "spinal/task/collapse_rate", rate, levels, message)


def _no_language(reference: DepthTrace) -> bool:
    """The reference predicts its neutral texts (else its task prompts) no better than chance,
    and has a lens entropy to watch."""
    if reference.lens_entropy is None:
        return False
    language = None if reference.neutral is None else predicts_better_than_chance(reference.neutral)
    if language is None:
        language = predicts_better_than_chance(reference)
    return language is False


def _plain(trace: DepthTrace) -> dict:
    """What the rule keeps of the last trace, as JSON types (its state)."""
    assert trace.lens_entropy is not None
    return {
        "step": int(trace.step),
        "layers": list(trace.layers),
        "contraction": [_finite_or_none(float(v)) for v in trace.contraction],
        "lens_entropy": [_finite_or_none(float(v)) for v in trace.lens_entropy],
    }


def _restore(state: dict, like: DepthTrace) -> DepthTrace:
    """The kept trace back as a ``DepthTrace`` with the fields ``collapse_rate`` reads."""
    previous = DepthTrace(**{**like.__dict__})
    previous.step = int(state["step"])
    previous.layers = list(state["layers"])
    previous.contraction = _tensor(state["contraction"])
    previous.lens_entropy = _tensor(state["lens_entropy"])
    return previous


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _tensor(values: list[float | None]) -> torch.Tensor:
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
