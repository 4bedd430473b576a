"""StopLedger: the stop decision and what it tells the user.

It notes the first warning and the first alert at the ``stop_on`` level, takes the stop decision
through the runner's collective (every rank stops at the same step), remembers the checkpoints
the run wrote, and says which one to resume from: the last one saved before the first warning,
since the one written at the alert already holds the damage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from spinal_callback.config import SpinalConfig
from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.outputs.sinks import Outputs
from spinal_callback.training.guarded_probe import PROBE_FAILED

logger = logging.getLogger("spinal_callback")
STATE_VERSION = 1
TRAINING_STOPPED = "training_stopped"
TOOL_RULES = frozenset({PROBE_FAILED})
"""Rules that report a failure of this tool, not of the run: they never stop training."""
CHECKPOINTS_KEPT = 8
"""Checkpoints remembered (step, path) to name the last one saved before the first warning."""


@dataclass(frozen=True)
class Decision:
    """What the adapter does after an event.

    Attributes:
        stop: save a checkpoint, then stop training.
        message: why (names the checkpoint to resume from).
        save_good: overwrite the one good checkpoint (``keep_good_checkpoint``): every rank has
            probed and none has warned so far.
        recovered: the runner has just rewound the training state (``on_critical="recover"``);
            training goes on from the next batch.
    """

    stop: bool = False
    message: str = ""
    save_good: bool = False
    recovered: bool = False


CONTINUE = Decision()


class StopLedger:
    """The first warning, the stop request, the stop, and the checkpoints around them.

    Args:
        config: ``stop_on`` is read here (``None``: never stop).
    """

    def __init__(self, config: SpinalConfig) -> None:
        self.config = config
        self._first_warning_step: int | None = None
        self._stop_requested: Alert | None = None
        self._stopped = False
        self._stop_checkpoint: tuple[int, str] | None = None
        self._checkpoints: list[tuple[int, str]] = []

    @property
    def first_warning_step(self) -> int | None:
        return self._first_warning_step

    @property
    def stop_requested(self) -> Alert | None:
        """The first alert at the ``stop_on`` level on this rank, if any."""
        return self._stop_requested

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_checkpoint(self) -> tuple[int, str] | None:
        """(step, path) of the checkpoint saved for the stop, once the adapter reports it."""
        return self._stop_checkpoint

    @property
    def checkpoints(self) -> list[tuple[int, str]]:
        return list(self._checkpoints)

    def note(self, alert: Alert) -> None:
        """Note the first warning and the first alert that asks for a stop (tool failures
        never do)."""
        if alert.rule in TOOL_RULES:
            return
        if alert.severity >= AlertLevel.WARNING and self._first_warning_step is None:
            self._first_warning_step = alert.step
        stop_on = self.config.stop_on
        if (
            stop_on is not None
            and self._stop_requested is None
            and alert.severity >= AlertLevel.parse(stop_on)
        ):
            self._stop_requested = alert

    def decide(
        self,
        step: int,
        reduce_any: Callable[[bool], bool],
        outputs: Outputs,
        recover: Callable[[Alert | None], Decision | str] | None = None,
    ) -> Decision:
        """The stop collective (every rank, same events), only when ``stop_on`` is set.

        With ``recover``, a requested stop first asks it (on every rank, with this rank's
        cause or ``None``): a ``Decision`` means the run was rewound and goes on (the request is
        cleared); a string is why it could not be, and the run stops saying so."""
        if self.config.stop_on is None or self._stopped:
            return CONTINUE
        if not reduce_any(self._stop_requested is not None):
            return CONTINUE
        refused = None
        if recover is not None:
            outcome = recover(self._stop_requested)
            if isinstance(outcome, Decision):
                self._stop_requested = None
                return outcome
            refused = outcome
        self._stopped = True
        message = self._stop_message(step)
        if refused is not None:
            message = f"{message} It was not recovered: {refused}."
        self._announce(step, "spinal/stop", message, outputs, self._stop_details())
        return Decision(stop=True, message=message)

    def saved(self, step: int, path: str, outputs: Outputs) -> None:
        """A checkpoint of the run was written at ``step`` to ``path``."""
        if self._stopped and self._stop_checkpoint is None:
            self._stop_checkpoint = (step, path)
            message = (
                f"the stop's checkpoint is {path} (step {step}); it holds the weights the alert "
                f"saw. {self.resume_advice()}"
            )
            details = {**self._stop_details(), "checkpoint": path, "checkpoint_step": step}
            self._announce(step, "spinal/stop_checkpoint", message, outputs, details)
        kept = [c for c in self._checkpoints if c[1] != path]
        self._checkpoints = [*kept, (step, path)][-CHECKPOINTS_KEPT:]

    def recovered(self, rewound_to: int) -> None:
        """The run was rewound to ``rewound_to``: the checkpoints saved after it hold weights the
        rewind dropped, and the trouble before it is behind the run (the next stop's advice
        starts from here)."""
        self._checkpoints = [c for c in self._checkpoints if c[0] <= rewound_to]
        self._first_warning_step = None

    def last_good_checkpoint(self) -> tuple[int, str] | None:
        """The last checkpoint saved before the first warning (any checkpoint if none)."""
        limit = self._first_warning_step
        good = [c for c in self._checkpoints if limit is None or c[0] < limit]
        return good[-1] if good else None

    def resume_advice(self) -> str:
        """Which checkpoint to resume from: the last one saved before the first warning."""
        good = self.last_good_checkpoint()
        first = self._first_warning_step
        if good is not None:
            where = f"Resume from {good[1]} (step {good[0]}), the last checkpoint saved before "
            return where + (
                f"the first warning (step {first})." if first is not None else "the stop."
            )
        if first is not None:
            return (
                f"No checkpoint was saved before the first warning (step {first}); save more "
                "often (or set stop_on='warning')."
            )
        return "No checkpoint was saved before the stop."

    def summary(self, step: int, probes: int, alerts: Sequence[Alert]) -> tuple[int, str]:
        """The console line at train end, and its logging level: the alerts by level and,
        after a stop, what stopped it, its checkpoint and where to go on."""
        counts = {level: 0 for level in ("critical", "warning", "info")}
        for alert in alerts:
            counts[alert.level] = counts.get(alert.level, 0) + 1
        text = (
            f"{probes} probes up to step {step}, {len(alerts)} alerts ("
            + ", ".join(f"{count} {level}" for level, count in counts.items())
            + ")"
        )
        if not self._stopped:
            return (logging.WARNING if alerts else logging.INFO), text
        cause = self._stop_requested
        text += f"; training stopped by {cause.level} {cause.rule}" if cause is not None else ""
        if self._stop_checkpoint is not None:
            text += f"; the stop's checkpoint: {self._stop_checkpoint[1]}"
        return logging.ERROR, f"{text}. {self.resume_advice()}"

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "first_warning_step": self._first_warning_step,
            "checkpoints": [list(c) for c in self._checkpoints],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        first = state.get("first_warning_step")
        self._first_warning_step = None if first is None else int(first)
        self._checkpoints = [(int(s), str(p)) for s, p in state.get("checkpoints", [])]

    def _stop_message(self, step: int) -> str:
        """The stop in one line; the cause's own message is its alert's (written just before),
        so it is named, not repeated."""
        cause = self._stop_requested
        why = (
            f"the {cause.level} {cause.rule} alert of step {cause.step}"
            if cause is not None
            else "another rank's alert"
        )
        return (
            f"training stopped at step {step} by {why}. A checkpoint is saved now; it holds the "
            f"weights the alert saw. {self.resume_advice()}"
        )

    def _stop_details(self) -> dict[str, Any]:
        """The stop's facts for a reader of the event log (the SPINAL tab): the cause and the
        checkpoint to resume from (``None`` when there is none)."""
        cause = self._stop_requested
        good = self.last_good_checkpoint()
        return {
            "cause_rule": None if cause is None else cause.rule,
            "cause_level": None if cause is None else cause.level,
            "cause_step": None if cause is None else cause.step,
            "first_warning_step": self._first_warning_step,
            "resume_from": None if good is None else good[1],
            "resume_step": None if good is None else good[0],
            "advice": self.resume_advice(),
        }

    def _announce(
        self, step: int, metric: str, message: str, outputs: Outputs, details: dict[str, Any]
    ) -> None:
        """A ``training_stopped`` record (event log, text tab) at the cause's level, with
        ``details``, and the console at ERROR."""
        cause = self._stop_requested
        outputs.record(
            Alert(
                step=step,
                level=cause.level if cause is not None else "critical",
                rule=TRAINING_STOPPED,
                metric=metric,
                value=float("nan"),
                threshold=float("nan"),
                message=message,
                details=details,
            )
        )
        logger.error("spinal-callback: %s", message)
        if metric == "spinal/stop":
            outputs.stopped(step, int(cause.severity) if cause is not None else 3)
        outputs.flush()
