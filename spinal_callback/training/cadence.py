"""Cadence: when the runner probes. Every ``every_n_steps`` optimizer steps, or, with
``every_n_steps="auto"``, as often as ``overhead_budget`` allows.

The automatic cadence measures what the run itself costs: the wall time of the training steps
(everything between two of the runner's step events, less the runner's own work) and of each
probe. After each probe the interval becomes ``probe seconds / (budget x step seconds)``,
rounded up and kept within ``[auto_min_steps, auto_max_steps]`` (when that is more than 20%
away from the current one): the floor protects the
training from probing too often on a cheap probe, the ceiling bounds how late a failure can be
seen. Every rank takes the largest rank's interval, agreed through the runner's boolean stop
collective one bit at a time, so that every rank probes at the same steps.

The first probe after the reference always comes ``auto_min_steps`` steps in, before anything is
measured, so the rules' early pace (``trace_departure``) is calibrated at the same step whatever
the hardware and the interval chosen later.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from spinal_callback.config import SpinalConfig

STEP_SAMPLES = 50
"""How many recent training steps the step time is the median of."""
HYSTERESIS = 0.2
"""The interval changes only when the budget asks for one more than 20% away: timing noise
does not move the schedule, nor write a note at every probe."""


def agree_on_max(value: int, bits: int, reduce_any: Callable[[bool], bool]) -> int:
    """The largest ``value`` over the ranks (``0 <= value < 2**bits``), built from ``bits``
    calls of the boolean collective ``reduce_any``, highest bit first: every rank makes the same
    calls, so every rank gets the same result."""
    agreed = 0
    for bit in reversed(range(bits)):
        candidate = agreed | (1 << bit)
        if reduce_any(value >= candidate):
            agreed = candidate
    return agreed


class Cadence:
    """The probe schedule of one run.

    Args:
        config: ``every_n_steps`` (an int, or ``"auto"`` with ``overhead_budget``,
            ``auto_min_steps`` and ``auto_max_steps``).
        clock: monotonic seconds; ``time.perf_counter`` unless a test injects one.
    """

    def __init__(self, config: SpinalConfig, clock: Callable[[], float] = time.perf_counter):
        self.auto = config.every_n_steps == "auto"
        self.budget = config.overhead_budget
        self.floor, self.ceiling = config.auto_min_steps, config.auto_max_steps
        self.interval = self.floor if self.auto else int(config.every_n_steps)
        self.step_seconds: deque[float] = deque(maxlen=STEP_SAMPLES)
        self.probe_seconds: float | None = None
        self._clock = clock
        self._since: float | None = None
        self._own = 0.0

    def due(self, step: int, last_probe_step: int) -> bool:
        """Whether ``step`` is a probe step: a multiple of the interval, or (automatic) the
        interval after the last probe."""
        if step == last_probe_step:
            return False
        if not self.auto:
            return step % self.interval == 0
        return step >= last_probe_step + self.interval

    def step_event(self) -> None:
        """At the runner's step event: one training step ended (its time is measured from the
        previous event, less the runner's own work in between)."""
        now = self._clock()
        if self._since is not None:
            self.step_seconds.append(max(now - self._since - self._own, 0.0))
        self._since, self._own = now, 0.0

    def own_work(self, seconds: float) -> None:
        """Seconds the runner spent in its own events since the last step event (not training)."""
        self._own += seconds

    def probed(self, seconds: float, reduce_any: Callable[[bool], bool]) -> str | None:
        """After a probe that took ``seconds`` on this rank: with the automatic cadence, the
        next interval (agreed by every rank). Returns a note when the interval changed."""
        self.probe_seconds = seconds
        if not self.auto or len(self.step_seconds) < 3:
            return None
        step = statistics.median(self.step_seconds)
        wanted = self.floor if step <= 0 else math.ceil(seconds / (self.budget * step))
        local = min(max(wanted, self.floor), self.ceiling)
        agreed = agree_on_max(local, self.ceiling.bit_length(), reduce_any)
        if abs(agreed - self.interval) <= HYSTERESIS * self.interval:
            return None
        self.interval = agreed
        share = seconds / (seconds + agreed * step) if step > 0 else 0.0
        limit = ""
        if wanted > self.ceiling:
            limit = (
                f"; the budget needs a probe every {wanted} steps, above the ceiling "
                f"auto_max_steps={self.ceiling}: raise auto_max_steps to {wanted} to hold the "
                f"budget (a failure is then seen up to {wanted} steps late), or make the probe "
                "cheaper (longer probe texts, fewer late_layers)"
            )
        elif wanted < self.floor:
            limit = f"; the floor auto_min_steps={self.floor} keeps it under the budget"
        return (
            f"probe interval now {agreed} steps (every_n_steps='auto'): a probe took "
            f"{seconds:.3g} s and a training step {step:.3g} s, so probing takes {share:.2%} of "
            f"the run against overhead_budget={self.budget:g}{limit}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"interval": self.interval, "auto": self.auto}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """A resumed automatic cadence goes on at its saved interval (a fixed one keeps the
        configured interval)."""
        if self.auto and state.get("auto") and isinstance(state.get("interval"), int):
            self.interval = min(max(int(state["interval"]), self.floor), self.ceiling)
