"""Baseline: the run's reference trace and the rules calibrated on it.

The reference is traced once, at the first probe: TRL's ``ref_model``, the adapters-off PEFT
policy, or the first trace itself. It is traced again, and the rules restart, when the probe
changes (a halved batch after running out of memory; other texts or layers, or another logit
scale of the lens, on resume). A resumed probe takes as many lens tokens as the restored
reference did, so that the baseline stays token for token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert
from spinal_callback.monitor.ramp_monitor import RampMonitor
from spinal_callback.monitor.rules.language import has_language
from spinal_callback.probe.lens_check import same_logit_scale
from spinal_callback.probe.spinal_probe import SpinalProbe
from spinal_callback.probe.trace import DepthTrace

STATE_VERSION = 1
Note = Callable[[int, str], None]


class Baseline:
    """The reference trace of the current probe, and the ``RampMonitor`` calibrated on it.

    Args:
        config: the rules' settings.
    """

    def __init__(self, config: SpinalConfig) -> None:
        self.config = config
        self._reference: DepthTrace | None = None
        self._monitor = RampMonitor(config)

    @property
    def reference(self) -> DepthTrace | None:
        return self._reference

    @property
    def monitor(self) -> RampMonitor:
        return self._monitor

    def use_monitor(self, monitor: RampMonitor) -> None:
        """Score with ``monitor`` (not yet calibrated) instead of a default ``RampMonitor``."""
        self._monitor = monitor
        if self._reference is not None:
            monitor.set_reference(self._reference)

    def adopt(
        self,
        trace: DepthTrace,
        trace_reference: Callable[[], DepthTrace | None],
        note: Note,
    ) -> bool:
        """Make sure the baseline compares with ``trace``: trace the reference at the first
        probe, or again when the probe changed. Returns ``True`` when the baseline restarted
        (earlier traces no longer compare)."""
        change = None if self._reference is None else probe_change(self._reference, trace)
        if change is not None:
            note(
                trace.step,
                f"the probe changed at step {trace.step} ({change}); the reference is traced "
                "again, the rules restart and earlier traces leave the heatmap",
            )
            self._reference, self._monitor = None, RampMonitor(self.config)
        if self._reference is not None:
            return False
        self._reference = trace_reference() or trace
        self._monitor.set_reference(self._reference)
        muted = muted_neutral_rules_note(self._reference)
        if muted is not None:
            note(trace.step, muted)
        return change is not None

    def score(self, trace: DepthTrace) -> list[Alert]:
        return self._monitor.update(trace)

    def score_logs(self, step: int, logs: Mapping[str, Any]) -> list[Alert]:
        return self._monitor.update_logs(step, logs)

    def rules_state(self) -> dict[str, Any]:
        """The rules' state without the reference (``restore_rules`` takes it back)."""
        state = self._monitor.state_dict()
        state.pop("reference", None)
        return state

    def restore_rules(self, state: Mapping[str, Any]) -> None:
        """Put the rules back in ``rules_state``'s state; the reference stays as it is."""
        reference = None if self._reference is None else self._reference.to_dict()
        self._monitor.load_state_dict({**state, "reference": reference})

    def share_lens_tokens(self, probe: SpinalProbe) -> None:
        """A resumed probe takes as many lens tokens as the restored reference's traces record,
        instead of settling anew on the trained model; only for the same probe (fingerprint)."""
        reference = self._reference
        if reference is None or probe.lens_tokens:
            return
        if reference.probe_fingerprint != probe.probe_fingerprint:
            return
        traces = [reference] if reference.neutral is None else [reference, reference.neutral]
        counts = [trace.metadata.get("transport_tokens") for trace in traces]
        known = [count for count in counts if isinstance(count, int) and count > 0]
        if len(known) == len(probe.groups):
            probe.lens_tokens.update(enumerate(known))

    def state_dict(self) -> dict[str, Any]:
        """The reference (its one copy in a checkpoint) and the rules' state."""
        monitor = self.rules_state()
        return {
            "version": STATE_VERSION,
            "reference": None if self._reference is None else self._reference.to_dict(),
            "monitor": monitor,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict``'s output (the monitor is calibrated on the restored reference,
        then its rules' state is restored)."""
        reference = state.get("reference")
        self._reference = DepthTrace.from_dict(reference) if reference else None
        self._monitor = RampMonitor(self.config)
        if self._reference is not None:
            self._monitor.set_reference(self._reference)
        monitor = state.get("monitor")
        if monitor is not None:
            self._monitor.load_state_dict({**monitor, "reference": reference})


def probe_change(reference: DepthTrace, trace: DepthTrace) -> str | None:
    """How ``trace`` was probed otherwise than ``reference`` (its texts, layers or batch size:
    the fingerprint; or the lens's logit scale, e.g. against a reference saved before the
    lens was checked), or ``None`` when the two compare."""
    if trace.probe_fingerprint != reference.probe_fingerprint:
        return (
            f"fingerprint {reference.probe_fingerprint[:8]} -> {trace.probe_fingerprint[:8]}: "
            "other texts, layers or batch size"
        )
    before, now = reference.metadata.get("logit_scale"), trace.metadata.get("logit_scale")
    if not same_logit_scale(before, now):
        shown = ["none" if scale is None else f"{scale:.4g}" for scale in (before, now)]
        return f"the lens's logit scale {shown[0]} -> {shown[1]}"
    return None


def muted_neutral_rules_note(reference: DepthTrace) -> str | None:
    """Why ``language_drift`` and ``trace_departure`` stay silent for this run, or ``None``.

    They need a reference that predicts the neutral texts clearly better than chance; a
    random-initialised model, or neutral texts in a language the model does not know, has no
    language for them to watch.
    """
    neutral = reference.neutral
    nll = None if neutral is None else neutral.next_token_nll
    if nll is None or not math.isfinite(nll) or has_language(reference):
        return None
    assert neutral is not None
    vocabulary = neutral.metadata.get("vocab_size")
    chance = "unknown"
    if isinstance(vocabulary, int) and vocabulary > 1:
        chance = f"{math.log(vocabulary):.2f}"
    return (
        f"the reference predicts the neutral texts little better than chance (next-token NLL "
        f"{nll:.2f} nats against ln V = {chance}); language_drift and "
        "trace_departure are off for this run. Pass neutral_texts= in the model's language, or "
        "expect only the log rules, non_finite and task_collapse (the task prompts' own trace; "
        "probe every 10-20 steps for it) on a random-initialised model"
    )
