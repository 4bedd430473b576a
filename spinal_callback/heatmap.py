"""The depth-trace heatmap: late layers x probe steps, for TensorBoard's Images dashboard."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

from spinal_callback.events import Alert
from spinal_callback.trace import DepthTrace

if TYPE_CHECKING:
    from matplotlib.figure import Figure

HEATMAP_COLUMNS = 200
"""Most probes (columns) one depth-trace heatmap shows; longer histories are thinned evenly."""


def depth_trace_figure(
    history: Sequence[DepthTrace],
    reference: DepthTrace | None = None,
    alerts: Sequence[Alert] = (),
    columns: int = HEATMAP_COLUMNS,
) -> Figure:
    """A matplotlib ``Figure`` (with an Agg canvas; pyplot untouched) of contraction and
    transport heatmaps: rows are late layers, columns probes in step order.

    Only the traces with the same layers as the last one are shown, thinned evenly to at most
    ``columns`` of them (the first and the last kept), so the cost of a heatmap stays bounded
    however long the run.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = history[-1].layers
    traces = [trace for trace in history if trace.layers == layers]
    if len(traces) > columns:
        picks = np.linspace(0, len(traces) - 1, columns).round().astype(int)
        traces = [traces[i] for i in picks]
    steps = [trace.step for trace in traces]
    contraction = np.stack([trace.contraction.numpy() for trace in traces], axis=1)
    transport = np.stack([trace.transport.numpy() for trace in traces], axis=1)
    figure = Figure(figsize=(10, 3.6))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
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


def figure_pixels(figure: Figure) -> np.ndarray:
    """The figure drawn by Agg, as a uint8 ``[height, width, 3]`` RGB array (pixels at the
    figure's dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
