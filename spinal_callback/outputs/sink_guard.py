"""SinkGuard: the one way a sink (the event log, the trace file, TensorBoard, the user's hook)
fails without failing the training run.

The first failure of a streak is logged at ERROR with its cause, later ones are only counted,
recovery is logged at WARNING with the count of lost writes, and nothing is raised. With
``retry_after_s``, writes are dropped for that long after a failure (TensorBoard: a broken disk
must not cost a failed write at every step); without, every write tries again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger("spinal_callback")


class SinkGuard:
    """Runs one sink's writes so that none of its failures escapes.

    Args:
        what: the sink, for the log lines (e.g. ``"writing the event log out/events.jsonl"``).
        consequence: what a failure costs, said once per streak.
        retry_after_s: seconds (>= 0) to drop writes after a failure before trying again.
        clock: monotonic seconds; ``time.monotonic`` unless a test injects one.
    """

    def __init__(
        self,
        what: str,
        consequence: str = "training goes on, records stay in memory and the console, and it "
        "is retried at the next record",
        retry_after_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s={retry_after_s} is negative; pass seconds >= 0")
        self.what = what
        self.consequence = consequence
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.failing = False
        self.lost = 0
        """Writes lost in the current streak of failures."""
        self._retry_at = 0.0

    def waiting(self) -> bool:
        """True (and one more write lost) while failing and the retry is not yet due."""
        if self.failing and self.clock() < self._retry_at:
            self.lost += 1
            return True
        return False

    def run(
        self,
        write: Callable[[], object],
        catch: type[BaseException] | tuple[type[BaseException], ...] = OSError,
        doing: str = "",
    ) -> bool:
        """``write()`` unless waiting; returns whether it ran and succeeded."""
        if self.waiting():
            return False
        try:
            write()
        except catch as error:
            self.fail(error, doing)
            return False
        self.recovered()
        return True

    def fail(self, error: BaseException, doing: str = "") -> None:
        """Count a failure; log the first of a streak (with the traceback unless an I/O error)."""
        self._retry_at = self.clock() + self.retry_after_s
        self.lost += 1
        while_doing = f" while {doing}" if doing else ""
        if self.failing:
            logger.debug("spinal-callback: %s still failing%s: %r", self.what, while_doing, error)
            return
        self.failing = True
        logger.error(
            "spinal-callback: %s failed%s (%s: %s); %s",
            self.what,
            while_doing,
            type(error).__name__,
            error,
            self.consequence,
            exc_info=not isinstance(error, OSError),
        )

    def recovered(self) -> None:
        if self.failing:
            logger.warning(
                "spinal-callback: %s works again; %d writes were lost while it failed",
                self.what,
                self.lost,
            )
        self.failing, self.lost = False, 0


__all__ = ["SinkGuard"]
