"""Everything that writes depth traces and alerts to a TensorBoard ``SummaryWriter``.

Runs and tags (a run is a directory under the board's log dir; TensorBoard colours each run and
lists them in name order, so every late block is its own colour, the same in every chart):
    L{ii}/ spinal/contraction           contraction of late block ii (one run per late block)
    L{ii}/ spinal/transport             transport from late block ii to the next late block
    reference/ spinal/ramp/<summary>    the reference (baseline) trace's summaries, repeated at
                                        every probe step: a flat line in the run's own charts
    spinal/ramp/<summary>               ramp summaries
    spinal/neutral/perplexity_ratio     neutral-text perplexity over the reference's
    spinal/neutral/departure            relative change of the neutral trace from the reference's
    spinal/drift/L{ii}                  drift of block ii's output from the reference's (every
                                        block, every ``drift_every`` probes; see ``drift.py``)
    spinal/alert_level                  highest alert level at a probe or log (0 none, 1 info,
                                        2 warning, 3 critical)
    spinal/alert_level_max              the highest level so far (a step that stays up, so that
                                        TensorBoard's outlier clipping and smoothing cannot hide it)
    spinal/stopped                      the level of the alert that stopped the run, one point at
                                        the stop's step: a single point is drawn at its logged
                                        value whatever the smoothing and outlier settings
    spinal/depth_trace (image)          layer x probe-step heatmaps of both scores
    alerts/spinal, spinal/notes (text)  every alert (and stop and recovery record) and note of a
                                        step, under these plain tags; the alerts' category,
                                        ``alerts``, sorts before the trainers' ``args`` text, so the
                                        Text tab opens on it

``TraceBoard`` never raises from its writes: a failing log directory costs TensorBoard output
(logged once, retried later), never the training run.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from spinal_callback.monitor.alerts import Alert
from spinal_callback.monitor.rules.departure import departure
from spinal_callback.monitor.rules.language import has_language, perplexity_ratio
from spinal_callback.outputs.heatmap import depth_trace_figure, figure_pixels
from spinal_callback.outputs.sink_guard import SinkGuard
from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.probe.trace import DepthTrace, block_name

logger = logging.getLogger("spinal_callback")

PREFIX = "spinal"
REFERENCE_RUN = "reference"
"""The run (subdirectory) that holds the reference trace's summaries."""
RETRY_AFTER_S = 60.0
"""Seconds a failed ``TraceBoard`` drops writes before it tries its writer again."""


ALERTS_TAG = "alerts/spinal"
"""The text tag of the alerts: TensorBoard's Text tab lists categories (a tag's first part) in
name order, and ``alerts`` comes before the ``args`` and ``model_config`` texts that trainers
write, so the tab opens on the alerts."""
TAB_FRAGMENT = "#spinal"
"""The URL fragment of the SPINAL tab (the package's TensorBoard plugin)."""
ALERTS_FRAGMENT = "#text&tagFilter=alerts%2Fspinal"
"""The URL fragment of TensorBoard's Text dashboard filtered to the alerts and stop records."""


def views_hint(log_dir: str, stopped: bool = False) -> str:
    """The console line that says where to look: the ``tensorboard`` command on the folder
    above the board's run, and the URL fragments of the SPINAL tab and of the alerts text."""
    folder = os.path.dirname(os.path.normpath(log_dir)) or "."
    what = "the stop, its cause and the checkpoint to resume from" if stopped else "the run"
    return (
        f"TensorBoard shows {what}: `tensorboard --logdir {folder}`, then open "
        f"http://localhost:6006/{TAB_FRAGMENT} (the SPINAL tab); the alerts as text: "
        f"http://localhost:6006/{ALERTS_FRAGMENT}"
    )


def layer_scalars(trace: DepthTrace) -> dict[str, dict[str, float]]:
    """Per late block's run: ``spinal/contraction`` and (all but the deepest block)
    ``spinal/transport`` to the next late block, as Python floats."""
    runs: dict[str, dict[str, float]] = {
        block_name(layer, trace.num_blocks): {f"{PREFIX}/contraction": value}
        for layer, value in zip(trace.layers, trace.contraction.tolist())
    }
    for layer, value in zip(trace.layers, trace.transport.tolist()):
        runs[block_name(layer, trace.num_blocks)][f"{PREFIX}/transport"] = value
    return runs


def trace_scalars(trace: DepthTrace) -> dict[str, float]:
    """The run-level scalars of a trace (its ramp summaries), as Python floats."""
    return {f"{PREFIX}/ramp/{name}": trace.summary[name] for name in RAMP_SUMMARY_NAMES}


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


def custom_scalar_layout(
    layers: Sequence[int], drift: bool = False, neutral: bool = True
) -> dict[str, Any]:
    """The Custom Scalars dashboard: the alerts first, then one chart per score with a line per
    late block (each block is its own run), then each summary beside its reference run; with
    ``drift``, one more chart for the drift of every block. Without ``neutral`` (the reference
    has no language: ``language_drift`` and ``trace_departure`` are off) the neutral-text charts
    are left out of the alerts group, since no rule reads them."""
    layout: dict[str, Any] = {
        "SPINAL alerts": {
            "stopped: the level of the alert that stopped the run (3 critical, 2 warning), "
            "one point at the stop's step; no point while the run goes on": [
                "Multiline",
                [rf"^{PREFIX}/stopped$"],
            ],
            "alert level: at each probe, and the highest so far (0 quiet, 1 info, 2 warning, "
            "3 critical); recoveries so far, with on_critical='recover'": [
                "Multiline",
                [rf"^{PREFIX}/(alert_level(_max)?|recoveries)$"],
            ],
        },
        "SPINAL depth trace (a line per late block)": {
            f"contraction of blocks {layers[0]}-{layers[-1]}": [
                "Multiline",
                [rf"^{PREFIX}/contraction$"],
            ],
            f"transport from each block to the next, {layers[0]}->{layers[1]} to "
            f"{layers[-2]}->{layers[-1]}": ["Multiline", [rf"^{PREFIX}/transport$"]],
        },
        "SPINAL ramp (run and reference)": {
            name: ["Multiline", [rf"^{PREFIX}/ramp/{name}$"]] for name in RAMP_SUMMARY_NAMES
        },
    }
    if neutral:
        layout["SPINAL alerts"].update(
            {
                "neutral-text perplexity, multiple of the reference": [
                    "Multiline",
                    [rf"^{PREFIX}/neutral/perplexity_ratio$"],
                ],
                "neutral-text late-layer trace, relative change from the reference": [
                    "Multiline",
                    [rf"^{PREFIX}/neutral/departure$"],
                ],
            }
        )
    if drift:
        layout["SPINAL depth trace (a line per late block)"][
            "drift from the reference, all blocks"
        ] = [
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
        self._guard = SinkGuard(
            f"TensorBoard output to {log_dir}",
            f"training goes on without it, retrying every {retry_after_s:g} s",
            retry_after_s,
            clock,
        )
        self._writer = writer
        self._log_dir = log_dir
        self._owned = owned
        self._purge_step: int | None = None
        self._purged: set[str] = set()
        self._runs: dict[str, Any] = {}
        self._worst_level = 0
        self._level_at = (-1, 0)
        """(step, level) of the last alert level written."""
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
        return not self._guard.failing

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
        self._purged = set()

        def purge(writer: Any) -> None:
            self._write_pending_purge(writer)
            for run in self._runs_on_disk():
                self._run_writer(run)

        self._write(f"hiding events after step {step}", purge)

    def restore_worst_level(self, level: int) -> None:
        """On resume: the highest alert level written before the checkpoint, so that
        ``spinal/alert_level_max`` goes on from it instead of from 0."""
        self._worst_level = max(self._worst_level, int(level))

    def _runs_on_disk(self) -> list[str]:
        """The runs of this board already in its log dir (a late block's, the reference's),
        also those this run no longer writes (``late_layers`` changed on resume): a purge must
        reach them all."""
        if not os.path.isdir(self._log_dir):
            return []
        return sorted(
            name
            for name in os.listdir(self._log_dir)
            if (name == REFERENCE_RUN or re.fullmatch(r"L\d+", name))
            and os.path.isdir(os.path.join(self._log_dir, name))
        )

    def write_trace(self, trace: DepthTrace, reference: DepthTrace | None = None) -> None:
        """Scalars of ``trace``: the summaries in this run, each late block's scores in its own
        run; with ``reference``, the health scalars and the reference's summaries (in the
        ``reference`` run, at the same step); plus any notes."""
        scalars = trace_scalars(trace)
        runs = layer_scalars(trace)
        if reference is not None:
            scalars.update(health_scalars(trace, reference))
            runs[REFERENCE_RUN] = trace_scalars(reference)
        notes = self._text_at(f"{PREFIX}/notes", trace.step, trace.notes)

        def write(writer: Any) -> None:
            if not self._layout_written:
                neutral = reference is None or has_language(reference)
                layout = custom_scalar_layout(trace.layers, self._drift_chart, neutral)
                writer.add_custom_scalars(layout)
                self._layout_written = True
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, trace.step)
            for run, tags in runs.items():
                self._add_run_scalars(writer, run, tags, trace.step)
            if trace.notes:
                _add_text(writer, f"{PREFIX}/notes", notes, trace.step)

        self._write(f"writing the trace of step {trace.step}", write)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Plain scalars under their own tags (e.g. ``drift.drift_scalars``) at ``step``."""

        def write(writer: Any) -> None:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)

        self._write(f"writing scalars of step {step}", write)

    def write_alerts(self, step: int, alerts: Sequence[Alert]) -> None:
        """``spinal/alert_level``: the highest level among ``alerts`` (0 when quiet), and
        ``spinal/alert_level_max``: the highest written so far by this board."""
        level = int(max((alert.severity for alert in alerts), default=0))
        if step == self._level_at[0] and level <= self._level_at[1]:
            return  # a step's level is written again only when it rises
        self._level_at = (step, level)
        self._worst_level = max(self._worst_level, level)
        worst = self._worst_level

        def write(writer: Any) -> None:
            writer.add_scalar(f"{PREFIX}/alert_level", level, step)
            writer.add_scalar(f"{PREFIX}/alert_level_max", worst, step)

        self._write(f"writing the alert level of step {step}", write)

    def write_stop(self, step: int, level: int) -> None:
        """``spinal/stopped``: one point, the level of the alert that stopped the run, at the
        stop's step (true at any smoothing: a chart of one point shows it as logged)."""
        self._write(
            f"writing the stop of step {step}",
            lambda writer: writer.add_scalar(f"{PREFIX}/stopped", float(level), step),
        )

    def write_note(self, step: int, text: str) -> None:
        """One note in the ``spinal/notes`` text tab at ``step`` (with the step's other notes)."""
        joined = self._text_at(f"{PREFIX}/notes", step, [text])
        self._write(
            f"writing a note at step {step}",
            lambda writer: _add_text(writer, f"{PREFIX}/notes", joined, step),
        )

    def write_alert_text(self, alert: Alert) -> None:
        """One ``alerts/spinal`` text entry, shown with the step's other alerts."""
        text = f"**{alert.level}** `{alert.rule}` on `{alert.metric}`: {alert.message}"
        joined = self._text_at(ALERTS_TAG, alert.step, [text])
        self._write(
            f"writing an alert of step {alert.step}",
            lambda writer: _add_text(writer, ALERTS_TAG, joined, alert.step),
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
        if not history or self._guard.waiting():
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

        def flush(writer: Any) -> None:
            writer.flush()
            for run_writer in self._runs.values():
                run_writer.flush()

        self._write("flushing", flush)

    def close(self) -> None:
        """Flush, and close the per-block runs' writers and an owned writer (a later write
        opens new event files). A borrowed writer stays open: its owner closes it."""
        if not self._owned:
            self.flush()
        runs, self._runs = self._runs, {}
        writers = list(runs.values())
        if self._owned:
            writer, self._writer = self._writer, None
            writers += [] if writer is None else [writer]
        for writer in writers:
            try:
                writer.close()
            except Exception as error:  # an I/O sink: see _write
                self._guard.fail(error, "closing")

    def _write(self, doing: str, write: Callable[[Any], object]) -> None:
        """Run ``write`` on the writer unless failing and not yet due for a retry (``SinkGuard``).
        Any failure of an I/O sink (OSError, a writer thread's stored exception, a writer closed
        under us) costs TensorBoard output, never the training run."""
        self._guard.run(lambda: write(self._ready_writer()), Exception, doing)

    def _ready_writer(self) -> Any:
        """The writer to use now: for an owned one, a new ``SummaryWriter`` after a failure or
        before the first write. A pending purge goes first."""
        if self._guard.failing:
            self._discard_runs()
        if self._owned:
            if self._guard.failing and self._writer is not None:
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

    def _discard_runs(self) -> None:
        """Drop the per-block runs' writers after a failure; they are created again on use."""
        runs, self._runs = self._runs, {}
        for writer in runs.values():
            try:
                writer.close()
            except Exception as error:  # an I/O sink that already failed: see _write
                logger.debug("spinal-callback: closing a failed TensorBoard writer: %s", error)

    def _add_run_scalars(
        self, writer: Any, run: str, scalars: Mapping[str, float], step: int
    ) -> None:
        """``scalars`` into the run ``run`` under this board's log dir; into this run, as
        ``<tag>/<run>``, when the borrowed writer has no log dir to put runs under."""
        run_writer = self._run_writer(run)
        for tag, value in scalars.items():
            if run_writer is None:
                writer.add_scalar(f"{tag}/{run}", value, step)
            else:
                run_writer.add_scalar(tag, value, step)

    def _run_writer(self, run: str) -> Any:
        """The writer of run ``run`` (created on first use, purged on resume); ``None`` without
        a log dir."""
        if self._writer is not None and getattr(self._writer, "log_dir", None) is None:
            return None
        if run not in self._runs:
            from torch.utils.tensorboard import SummaryWriter

            self._runs[run] = SummaryWriter(os.path.join(self._log_dir, run))
        writer = self._runs[run]
        self._write_pending_purge(writer, run)
        return writer

    def _write_pending_purge(self, writer: Any, run: str = "") -> None:
        """The resume's purge, once per run (``""``: this board's own)."""
        if self._purge_step is None or run in self._purged:
            return
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        start = Event(step=self._purge_step + 1, session_log=SessionLog(status=SessionLog.START))
        # _get_file_writer, as add_scalar does: it reopens the file of a closed SummaryWriter.
        file_writer = writer._get_file_writer()
        file_writer.add_event(start)
        file_writer.add_event(start)
        self._purged.add(run)


def _add_text(writer: Any, tag: str, text: str, step: int) -> None:
    """A text summary under exactly ``tag`` (``SummaryWriter.add_text`` appends
    ``/text_summary`` to the tag the Text dashboard shows)."""
    from torch.utils.tensorboard.summary import text as text_summary

    summary = text_summary(tag, text)
    summary.value[0].tag = tag
    writer._get_file_writer().add_summary(summary, step)
