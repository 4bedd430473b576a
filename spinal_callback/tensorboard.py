"""Everything that writes depth traces and alerts to a TensorBoard ``SummaryWriter``.

Tags:
    spinal/contraction/L{ii}            contraction of late block ii
    spinal/transport/L{ii}              transport from late block ii to the next late block
    spinal/ramp/<summary>               ramp summaries
    spinal/neutral/perplexity_ratio     neutral-text perplexity over the reference's
    spinal/neutral/departure            relative change of the neutral trace from the reference's
    spinal/reference/...                the same for the reference (baseline) trace, repeated at
                                        every probe step so it draws as a flat line beside the run
    spinal/drift/L{ii}                  drift of block ii's output from the reference's (every
                                        block, every ``drift_every`` probes; see ``drift.py``)
    spinal/alert_level                  highest alert level at a probe (0 none, 1 info, 2 warning,
                                        3 critical)
    spinal/depth_trace (image)          layer x probe-step heatmaps of both scores
    spinal/alerts, spinal/notes (text)

``TraceBoard`` never raises from its writes: a failing log directory costs TensorBoard output
(logged once, retried later), never the training run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from spinal_callback.events import Alert
from spinal_callback.heatmap import depth_trace_figure, figure_pixels
from spinal_callback.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.rules.departure import departure
from spinal_callback.rules.language import perplexity_ratio
from spinal_callback.trace import DepthTrace

logger = logging.getLogger("spinal_callback")

PREFIX = "spinal"
REFERENCE_PREFIX = "spinal/reference"
RETRY_AFTER_S = 60.0
"""Seconds a failed ``TraceBoard`` drops writes before it tries its writer again."""


def trace_scalars(trace: DepthTrace, prefix: str = PREFIX) -> dict[str, float]:
    """All scalars of a trace under the tag names above, as Python floats."""
    scalars = {
        f"{prefix}/contraction/L{layer:02d}": value
        for layer, value in zip(trace.layers, trace.contraction.tolist())
    }
    scalars.update(
        {
            f"{prefix}/transport/L{layer:02d}": value
            for layer, value in zip(trace.layers, trace.transport.tolist())
        }
    )
    scalars.update({f"{prefix}/ramp/{name}": trace.summary[name] for name in RAMP_SUMMARY_NAMES})
    return scalars


def summary_scalars(trace: DepthTrace, reference: DepthTrace | None = None) -> dict[str, float]:
    """The ramp summaries and, with a reference, the neutral-text health scalars: what goes to
    ``on_log`` (W&B, MLflow, the console)."""
    scalars = {f"{PREFIX}/ramp/{name}": trace.summary[name] for name in RAMP_SUMMARY_NAMES}
    if reference is not None:
        scalars.update(health_scalars(trace, reference))
    return scalars


def health_scalars(trace: DepthTrace, reference: DepthTrace) -> dict[str, float]:
    """What the ``language_drift`` and ``trace_departure`` rules read, unscaled:

    - ``spinal/neutral/perplexity_ratio``: neutral-text perplexity as a multiple of the
      reference's (1.0 = unchanged);
    - ``spinal/neutral/departure``: relative change of the neutral texts' late-layer trace
      from the reference's (0.0 = unchanged; 0.1 = 10%).

    Empty without a neutral probe.
    """
    if trace.neutral is None or reference.neutral is None:
        return {}
    scalars = {f"{PREFIX}/neutral/departure": departure(trace.neutral, reference.neutral)}
    ratio = perplexity_ratio(trace, reference)
    if ratio is not None:
        scalars[f"{PREFIX}/neutral/perplexity_ratio"] = ratio
    return scalars


def custom_scalar_layout(layers: Sequence[int], drift: bool = False) -> dict[str, Any]:
    """One multi-line chart per score for the late band, and one per summary with its reference;
    with ``drift``, one more for the drift of every block."""
    band = f"L{layers[0]:02d}-L{layers[-1]:02d}"
    layout: dict[str, Any] = {
        "SPINAL depth trace": {
            f"contraction, late band {band}": ["Multiline", [rf"^{PREFIX}/contraction/L\d+$"]],
            f"transport, late band {band}": ["Multiline", [rf"^{PREFIX}/transport/L\d+$"]],
            f"reference contraction {band}": [
                "Multiline",
                [rf"^{REFERENCE_PREFIX}/contraction/L\d+$"],
            ],
            f"reference transport {band}": ["Multiline", [rf"^{REFERENCE_PREFIX}/transport/L\d+$"]],
        },
        "SPINAL neutral text (what the alerts read)": {
            "perplexity, multiple of the reference": [
                "Multiline",
                [rf"^{PREFIX}/neutral/perplexity_ratio$"],
            ],
            "late-layer trace, relative change from the reference": [
                "Multiline",
                [rf"^{PREFIX}/neutral/departure$"],
            ],
            "alert level (0 quiet, 1 info, 2 warning, 3 critical)": [
                "Multiline",
                [rf"^{PREFIX}/alert_level$"],
            ],
        },
        "SPINAL ramp (run vs reference)": {
            name: ["Multiline", [rf"^{PREFIX}/ramp/{name}$", rf"^{REFERENCE_PREFIX}/ramp/{name}$"]]
            for name in RAMP_SUMMARY_NAMES
        },
    }
    if drift:
        layout["SPINAL depth trace"]["drift from the reference, all blocks"] = [
            "Multiline",
            [rf"^{PREFIX}/drift/L\d+$"],
        ]
    return layout


class TraceBoard:
    """Writes traces, reference traces, heatmaps and alerts to one ``SummaryWriter``, and never
    lets a failure of that writer out of a write, a flush or a close: TensorBoard output must not
    stop training. (Computing the scalars and drawing the heatmap are not guarded: a bug there
    should fail loudly in tests, not look like a broken disk.)

    When the writer fails (a read-only or full log directory, a writer thread that died), the
    board logs one ERROR naming the directory and the cause, drops writes for ``retry_after_s``
    seconds, then tries again at the next write; a board that owns its writer (``open``) closes
    the failed one and creates a new one, in a new event file. Recovery is logged as a WARNING.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` borrowed from its owner (Lightning's
            ``TensorBoardLogger.experiment``); the board flushes it but never closes it, and
            retries the same object after a failure.
        retry_after_s: seconds (>= 0) between a failure and the next attempt to write.
        clock: monotonic time in seconds; ``time.monotonic`` unless a test injects one.
    """

    def __init__(
        self,
        writer: Any,
        *,
        retry_after_s: float = RETRY_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        log_dir = getattr(writer, "log_dir", None) or "<a writer without log_dir>"
        self._setup(writer, str(log_dir), False, retry_after_s, clock)

    @classmethod
    def open(
        cls,
        log_dir: str,
        *,
        retry_after_s: float = RETRY_AFTER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> TraceBoard:
        """A board that owns a ``SummaryWriter`` on ``log_dir``, created at the first write (a
        failure to create it counts as a failed write) and closed by ``close``."""
        board = cls.__new__(cls)
        board._setup(None, log_dir, True, retry_after_s, clock)
        return board

    def _setup(
        self,
        writer: Any,
        log_dir: str,
        owned: bool,
        retry_after_s: float,
        clock: Callable[[], float],
    ) -> None:
        if retry_after_s < 0:
            raise ValueError(f"retry_after_s={retry_after_s} is negative; pass seconds >= 0")
        self._writer = writer
        self._log_dir = log_dir
        self._owned = owned
        self._retry_after_s = retry_after_s
        self._clock = clock
        self._broken = False
        self._retry_at = 0.0
        self._lost_writes = 0
        self._purge_step: int | None = None
        self._layout_written = False
        self._drift_chart = False
        self._texts: dict[str, tuple[int, list[str]]] = {}

    @property
    def log_dir(self) -> str:
        """The directory the event files go to (a placeholder for a borrowed writer without a
        ``log_dir`` attribute)."""
        return self._log_dir

    @property
    def healthy(self) -> bool:
        """False from a failed write until a retry succeeds."""
        return not self._broken

    @property
    def writer(self) -> Any:
        """The current ``SummaryWriter``; ``None`` while an owned one is not (re)created."""
        return self._writer

    def chart_drift(self) -> None:
        """Add the per-block drift chart to the custom-scalars layout (call before the first
        ``write_trace``, which writes the layout)."""
        self._drift_chart = True

    def purge_after(self, step: int) -> None:
        """Hide events newer than ``step`` left by an interrupted run (call once on resume,
        before writing anything newer than ``step``).

        Writes two ``SessionLog.START`` events at ``step + 1`` to the current event file. Both
        readers drop the events they have read at or after a START's step, but the one the UI
        uses (``plugin_event_accumulator``) ignores the first START of a run as the run's
        beginning; the second is the one it honours. Purging twice is harmless for the legacy
        ``event_accumulator``, and for a run resumed more than once. While the board is broken,
        the purge waits for the first successful write.
        """
        self._purge_step = step
        self._write(f"hiding events after step {step}", self._write_pending_purge)

    def write_trace(self, trace: DepthTrace, reference: DepthTrace | None = None) -> None:
        """Scalars of ``trace`` (and of ``reference``, at the same step) plus any notes."""
        scalars = trace_scalars(trace)
        if reference is not None:
            scalars.update(health_scalars(trace, reference))
            scalars.update(trace_scalars(reference, REFERENCE_PREFIX))
        notes = self._text_at(f"{PREFIX}/notes", trace.step, trace.notes)

        def write(writer: Any) -> None:
            if not self._layout_written:
                writer.add_custom_scalars(custom_scalar_layout(trace.layers, self._drift_chart))
                self._layout_written = True
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, trace.step)
            if trace.notes:
                writer.add_text(f"{PREFIX}/notes", notes, trace.step)

        self._write(f"writing the trace of step {trace.step}", write)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Plain scalars under their own tags (e.g. ``drift.drift_scalars``) at ``step``."""

        def write(writer: Any) -> None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)

        self._write(f"writing scalars of step {step}", write)

    def write_alerts(self, step: int, alerts: Sequence[Alert]) -> None:
        """``spinal/alert_level``: the highest level among ``alerts`` (0 when quiet)."""
        level = int(max((alert.severity for alert in alerts), default=0))
        self._write(
            f"writing the alert level of step {step}",
            lambda writer: writer.add_scalar(f"{PREFIX}/alert_level", level, step),
        )

    def write_note(self, step: int, text: str) -> None:
        """One note in the ``spinal/notes`` text tab at ``step`` (with the step's other notes)."""
        joined = self._text_at(f"{PREFIX}/notes", step, [text])
        self._write(
            f"writing a note at step {step}",
            lambda writer: writer.add_text(f"{PREFIX}/notes", joined, step),
        )

    def write_alert_text(self, alert: Alert) -> None:
        """One ``spinal/alerts`` text entry, shown with the step's other alerts."""
        text = f"**{alert.level}** `{alert.rule}` on `{alert.metric}`: {alert.message}"
        joined = self._text_at(f"{PREFIX}/alerts", alert.step, [text])
        self._write(
            f"writing an alert of step {alert.step}",
            lambda writer: writer.add_text(f"{PREFIX}/alerts", joined, alert.step),
        )

    def _text_at(self, tag: str, step: int, texts: Sequence[str]) -> str:
        """Everything written to ``tag`` at ``step`` so far, ``texts`` included: TensorBoard's
        text tab shows one entry per tag and step, the last one written, so each write repeats
        the step's earlier entries (only the latest step of each tag is kept)."""
        held_step, held = self._texts.get(tag, (step, []))
        held = [*(held if held_step == step else []), *texts]
        self._texts[tag] = (step, held)
        return "\n\n".join(held)

    def write_heatmap(
        self,
        history: Sequence[DepthTrace],
        reference: DepthTrace | None = None,
        alerts: Sequence[Alert] = (),
    ) -> None:
        """Image ``spinal/depth_trace`` at the last trace's step: both scores as layer x
        probe-step heatmaps (see ``heatmap.depth_trace_figure``), with the reference column and
        the alert steps marked. Not rendered while broken."""
        if not history or self._waiting():
            return
        image = figure_pixels(depth_trace_figure(history, reference, alerts))
        step = history[-1].step
        self._write(
            f"writing the heatmap of step {step}",
            lambda writer: writer.add_image(
                f"{PREFIX}/depth_trace", image, step, dataformats="HWC"
            ),
        )

    def flush(self) -> None:
        """Write pending events to disk (nothing to do before an owned writer exists)."""
        if self._owned and self._writer is None:
            return
        self._write("flushing", lambda writer: writer.flush())

    def close(self) -> None:
        """Flush, and close an owned writer (a later write opens a new event file). A borrowed
        writer stays open: its owner closes it."""
        if not self._owned:
            self.flush()
            return
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            writer.close()
        except Exception as error:  # an I/O sink: see _write
            self._fail("closing", error)

    def _write(self, doing: str, write: Callable[[Any], object]) -> None:
        """Run ``write`` on the writer unless broken and not yet due for a retry; a failure
        marks the board broken instead of raising."""
        if self._waiting():
            return
        try:
            write(self._ready_writer())
        # Any failure of an I/O sink (OSError, a writer thread's stored exception, a writer
        # closed under us) may cost TensorBoard output, never the training run.
        except Exception as error:
            self._fail(doing, error)
            return
        if self._broken:
            self._broken = False
            logger.warning(
                "spinal-callback: TensorBoard output to %s works again; %d writes were lost "
                "while it failed",
                self._log_dir,
                self._lost_writes,
            )

    def _waiting(self) -> bool:
        """True (and one more write lost) while broken and the retry is not yet due."""
        if self._broken and self._clock() < self._retry_at:
            self._lost_writes += 1
            return True
        return False

    def _ready_writer(self) -> Any:
        """The writer to use now: for an owned one, a new ``SummaryWriter`` after a failure or
        before the first write. A pending purge goes first."""
        if self._owned:
            if self._broken and self._writer is not None:
                self._discard_writer()
            if self._writer is None:
                from torch.utils.tensorboard import SummaryWriter

                self._writer = SummaryWriter(self._log_dir)
                self._layout_written = False
        self._write_pending_purge(self._writer)
        return self._writer

    def _discard_writer(self) -> None:
        """Drop an owned writer that failed; once its thread has failed it raises on every call
        (closing included), so only a new one can write again."""
        writer, self._writer = self._writer, None
        try:
            writer.close()
        except Exception as error:  # an I/O sink that already failed: see _write
            logger.debug("spinal-callback: closing the failed TensorBoard writer: %s", error)

    def _write_pending_purge(self, writer: Any) -> None:
        if self._purge_step is None:
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        start = Event(step=self._purge_step + 1, session_log=SessionLog(status=SessionLog.START))
        # _get_file_writer, as add_scalar does: it reopens the file of a closed SummaryWriter.
        file_writer = writer._get_file_writer()
        file_writer.add_event(start)
        file_writer.add_event(start)
        self._purge_step = None

    def _fail(self, doing: str, error: Exception) -> None:
        """Mark the board broken until ``retry_after_s`` from now; ERROR on the first failure
        only, so a broken disk is reported once, not at every step."""
        self._retry_at = self._clock() + self._retry_after_s
        if self._broken:
            self._lost_writes += 1
            logger.debug("spinal-callback: TensorBoard still failing (%s): %s", doing, error)
            return
        self._broken = True
        self._lost_writes = 1
        logger.error(
            "spinal-callback: TensorBoard output to %s failed while %s (%s: %s); training goes "
            "on without it, retrying every %g s",
            self._log_dir,
            doing,
            type(error).__name__,
            error,
            self._retry_after_s,
            exc_info=not isinstance(error, OSError),
        )
