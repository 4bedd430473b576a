"""Outputs: where the runner's records go, none of which may break the training run.

Three sinks: TensorBoard (a ``TraceBoard``, main process only), the JSONL event log (every rank,
its own file) and the user's ``on_alert`` hook. A failing sink (a read-only or full disk,
``/dev/full``, a webhook that is down) is logged once at ERROR with its path and cause and then
retried at each later record; the run, its probes and its stop decision go on in memory.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.outputs.event_log import EventLog
from spinal_callback.outputs.sink_guard import SinkGuard
from spinal_callback.outputs.tensorboard import views_hint
from spinal_callback.probe.trace import DepthTrace

logger = logging.getLogger("spinal_callback")
AlertHook = Callable[[Alert], None]
_LOG_LEVELS = {
    AlertLevel.INFO: logging.INFO,
    AlertLevel.WARNING: logging.WARNING,
    AlertLevel.CRITICAL: logging.ERROR,
}


def check_alert_hook(hook: object) -> AlertHook | None:
    """``hook`` if it is ``None`` or a callable.

    Raises:
        TypeError: anything else (a URL string, say), at construction rather than at the first
            alert.
    """
    if hook is not None and not callable(hook):
        raise TypeError(
            f"on_alert must be a callable taking an Alert, got {hook!r} "
            f"({type(hook).__name__}); to post alerts to a URL, pass a function that "
            "posts alert.to_dict()"
        )
    return hook


class Outputs:
    """The runner's sinks.

    Args:
        board: TensorBoard writer (``None`` on other ranks or without TensorBoard). Its methods
            never raise (``TraceBoard``).
        event_log: the JSONL event log (``None``: none).
        on_alert: the user's hook, called with every alert.
        owns_board: ``close`` closes the board's writer (one we opened, not a logger's).
    """

    def __init__(
        self,
        board: Any = None,
        event_log: EventLog | None = None,
        on_alert: AlertHook | None = None,
        owns_board: bool = False,
    ) -> None:
        self.board = board
        self.owns_board = owns_board
        self.event_log = event_log
        self.on_alert = on_alert
        self.run_id: str | None = None
        """Written into every event-log record (``Runner.begin`` sets it)."""
        where = event_log.path if event_log is not None else Path("-")
        self._log_guard = SinkGuard(f"writing the event log {where}")
        self._hook_guard = SinkGuard("the on_alert hook")

    def alert(self, alert: Alert) -> None:
        """Event log first (it must survive a crash), then the console, TensorBoard, the hook."""
        if self.event_log is not None:
            event_log = self.event_log
            self._log_guard.run(lambda: event_log.append(alert, self.run_id), OSError)
        logger.log(
            _LOG_LEVELS[alert.severity],
            "spinal-callback step %d [%s] %s: %s",
            alert.step,
            alert.level,
            alert.rule,
            alert.message,
        )
        if self.board is not None:
            self.board.write_alert_text(alert)
        if self.on_alert is not None:
            hook = self.on_alert
            self._hook_guard.run(lambda: hook(alert), Exception)

    def record(self, alert: Alert) -> None:
        """A record for the event log and TensorBoard only (e.g. the stop), never the hook."""
        if self.event_log is not None:
            event_log = self.event_log
            self._log_guard.run(lambda: event_log.append(alert, self.run_id), OSError)
        if self.board is not None:
            self.board.write_alert_text(alert)

    def stopped(self, step: int, level: int) -> None:
        """The stop's ``spinal/stopped`` point, and the console's pointer to the views that show
        it."""
        if self.board is not None:
            self.board.write_stop(step, level)
            logger.error("spinal-callback: %s", views_hint(self.board.log_dir, stopped=True))

    def point_to_views(self) -> None:
        """At train begin: the console line that says where TensorBoard shows the run."""
        if self.board is not None:
            logger.warning("spinal-callback: %s", views_hint(self.board.log_dir))

    def trace(
        self, trace: DepthTrace, reference: DepthTrace | None, alerts: Sequence[Alert]
    ) -> None:
        if self.board is not None:
            self.board.write_trace(trace, reference)
            self.board.write_alerts(trace.step, alerts)

    def level(self, step: int, alerts: Sequence[Alert]) -> None:
        if self.board is not None and alerts:
            self.board.write_alerts(step, alerts)

    def scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self.board is not None:
            self.board.write_scalars(step, scalars)

    def note(self, step: int, text: str) -> None:
        """A console warning and a ``spinal/notes`` entry."""
        logger.warning("spinal-callback: %s", text)
        if self.board is not None:
            self.board.write_note(step, text)

    def heatmap(
        self,
        history: Sequence[DepthTrace],
        reference: DepthTrace | None = None,
        alerts: Sequence[Alert] = (),
    ) -> None:
        if self.board is not None:
            self.board.write_heatmap(history, reference, alerts)

    def flush(self) -> None:
        if self.board is not None:
            self.board.flush()

    def records_after(self, step: int) -> list[dict[str, Any]]:
        """This run's current event-log records of steps after ``step`` (what a resume from
        ``step`` supersedes); none when the log cannot be read."""
        if self.event_log is None:
            return []
        try:
            records = self.event_log.read_current()
        except OSError as error:
            logger.error("spinal-callback: cannot read the event log (%s)", error)
            return []
        return [
            record
            for record in records
            if record.get("run", self.run_id) == self.run_id
            and isinstance(record.get("step"), int)
            and record["step"] > step
        ]

    def hide_after(self, step: int) -> None:
        """Resume: hide the TensorBoard events newer than ``step`` that an interrupted run left
        (a display matter: the event log keeps every record)."""
        if self.board is not None:
            self.board.purge_after(step)

    def close(self) -> None:
        """Flush; close the board's writer when it is ours."""
        self.flush()
        if self.board is not None and self.owns_board:
            self.board.close()
