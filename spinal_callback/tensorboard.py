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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import numpy as np

from spinal_callback.events import Alert
from spinal_callback.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.rules.departure import departure
from spinal_callback.rules.language import perplexity_ratio
from spinal_callback.trace import DepthTrace

PREFIX = "spinal"
REFERENCE_PREFIX = "spinal/reference"


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
    """Writes traces, reference traces, heatmaps and alerts to one ``SummaryWriter``.

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (Lightning's ``logger.experiment``
            or one of our own).
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer
        self._layout_written = False
        self._drift_chart = False

    def chart_drift(self) -> None:
        """Add the per-block drift chart to the custom-scalars layout (call before the first
        ``write_trace``, which writes the layout)."""
        self._drift_chart = True

    def purge_after(self, step: int) -> None:
        """Hide events newer than ``step`` left by an interrupted run (call once on resume)."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        self.writer.file_writer.add_event(
            Event(step=step + 1, session_log=SessionLog(status=SessionLog.START))
        )

    def write_trace(self, trace: DepthTrace, reference: DepthTrace | None = None) -> None:
        """Scalars of ``trace`` (and of ``reference``, at the same step) plus any notes."""
        if not self._layout_written:
            self.writer.add_custom_scalars(custom_scalar_layout(trace.layers, self._drift_chart))
            self._layout_written = True
        for tag, value in trace_scalars(trace).items():
            self.writer.add_scalar(tag, value, trace.step)
        if reference is not None:
            for tag, value in health_scalars(trace, reference).items():
                self.writer.add_scalar(tag, value, trace.step)
            for tag, value in trace_scalars(reference, REFERENCE_PREFIX).items():
                self.writer.add_scalar(tag, value, trace.step)
        if trace.notes:
            self.writer.add_text(f"{PREFIX}/notes", "\n\n".join(trace.notes), trace.step)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        """Plain scalars under their own tags (e.g. ``drift.drift_scalars``) at ``step``."""
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def write_alerts(self, step: int, alerts: Sequence[Alert]) -> None:
        """``spinal/alert_level``: the highest level among ``alerts`` (0 when quiet)."""
        level = max((alert.severity for alert in alerts), default=0)
        self.writer.add_scalar(f"{PREFIX}/alert_level", int(level), step)

    def write_note(self, step: int, text: str) -> None:
        """One note in the ``spinal/notes`` text tab at ``step``."""
        self.writer.add_text(f"{PREFIX}/notes", text, step)

    def write_alert_text(self, alert: Alert) -> None:
        """One ``spinal/alerts`` text entry."""
        text = f"**{alert.level}** `{alert.rule}` on `{alert.metric}`: {alert.message}"
        self.writer.add_text(f"{PREFIX}/alerts", text, alert.step)

    def write_heatmap(self, history: Sequence[DepthTrace]) -> None:
        """Image ``spinal/depth_trace``: both scores as layer x probe-step heatmaps."""
        if not history:
            return
        self.writer.add_figure(
            f"{PREFIX}/depth_trace", depth_trace_figure(history), history[-1].step
        )

    def flush(self) -> None:
        self.writer.flush()


def depth_trace_figure(history: Sequence[DepthTrace]) -> Any:
    """A matplotlib figure with contraction and transport heatmaps (rows: layers; cols: steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = history[-1].layers
    traces = [trace for trace in history if trace.layers == layers]
    steps = [trace.step for trace in traces]
    contraction = np.stack([trace.contraction.numpy() for trace in traces], axis=1)
    transport = np.stack([trace.transport.numpy() for trace in traces], axis=1)
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    panels = [
        (axes[0], contraction, [f"L{layer:02d}" for layer in layers], "contraction"),
        (axes[1], transport, [f"L{a:02d}>{b:02d}" for a, b in pairwise(layers)], "transport"),
    ]
    for axis, values, labels, title in panels:
        image = axis.imshow(values, aspect="auto", origin="lower", cmap="viridis")
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        ticks = np.linspace(0, len(steps) - 1, min(len(steps), 6)).round().astype(int)
        axis.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=7)
        axis.set(title=title, xlabel="step")
        figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure
