"""The depth-trace heatmap: late layers x probe steps, for TensorBoard's Images dashboard.

The image is drawn to be read at the Images card's width (about 400 px): two panels stacked
(contraction above transport) in a 480 x 480 px figure with 11-12 pt text, the reference trace as
its own column at the left, and a triangle above each probe step that had a warning or critical
alert.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import numpy as np

from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.probe.trace import DepthTrace, block_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

HEATMAP_COLUMNS = 200
"""Most probes (columns) one depth-trace heatmap shows; longer histories are thinned evenly."""
FIGURE_INCHES = (4.8, 4.8)
FIGURE_DPI = 100
"""The image is ``FIGURE_INCHES`` x ``FIGURE_DPI``: 480 x 480 px, shown about 350 px wide on
TensorBoard's Images cards at their default size."""
MAX_STEP_LABELS = 8
"""Most step labels under the heatmap; fewer when long step numbers would overlap."""
MAX_LAYER_LABELS = 10
"""Most layer labels beside one panel; a longer band labels every k-th row."""
REFERENCE_LABEL = "ref"
STEP_AXIS_LABEL = "training step"
LAYER_AXIS_LABEL = "late block"
ALERT_COLOURS = {AlertLevel.WARNING: "#f28e0b", AlertLevel.CRITICAL: "#d62728"}
"""Colour of the mark above a probe step, by the highest alert level there (info: no mark)."""
_TICK_PT, _LABEL_PT, _TITLE_PT = 11, 12, 12
_STEP_AXIS_PX, _DIGIT_PX, _LABEL_GAP_PX = 280, 10, 10
"""Width of the heatmap's step axis (at least), of one 11 pt digit (at most), and the least gap
between two step labels, in pixels."""
_NICE_STEPS = (1, 2, 2.5, 5, 10)
"""Label strides times a power of ten (2.5 only from 25 up: strides are whole columns)."""


@dataclass(frozen=True)
class _Panel:
    title: str
    values: np.ndarray  # float [rows, columns]
    reference: np.ndarray | None  # float [rows, 1]
    row_labels: list[str]


def depth_trace_figure(
    history: Sequence[DepthTrace],
    reference: DepthTrace | None = None,
    alerts: Sequence[Alert] = (),
    columns: int = HEATMAP_COLUMNS,
) -> Figure:
    """A 480 x 480 px matplotlib ``Figure`` (with an Agg canvas; pyplot untouched) of the
    contraction heatmap above the transport heatmap: rows are late blocks (deepest on top),
    columns probes in step order.

    Rows are named as the scalar charts name each block's run: ``L20`` for contraction,
    ``L20→L21`` for the transport from block 20 to the next traced block. Only the traces with
    the same layers as the last one are shown, thinned evenly to at most ``columns`` of them (the
    first and the last kept), so the cost of a heatmap stays bounded however long the run. Step
    labels sit on every k-th column from the first (at most ``MAX_STEP_LABELS``, fewer for long
    step numbers), k one of 1, 2, 5, 10, 20, 25, 50, 100, ...

    ``reference`` (the baseline trace) is drawn as a column of its own at the left, labelled
    ``ref``, on the same colour scale as the run; it is left out when its layers differ from the
    last trace's. Each shown probe step with a warning or critical alert gets a triangle above
    the contraction panel in ``ALERT_COLOURS`` (an alert at a step thinned out marks the next
    shown probe; alerts outside the shown steps, and info alerts, are not marked), with a legend.

    Raises:
        ValueError: ``history`` is empty or ``columns`` is below 2.
    """
    if not history:
        raise ValueError("depth_trace_figure needs at least one trace; history is empty")
    if columns < 2:
        raise ValueError(f"columns={columns}: a heatmap needs at least 2 columns (first, last)")
    banded = _same_layers(history)
    traces = _thinned(banded, columns)
    layers, num_blocks = traces[-1].layers, traces[-1].num_blocks
    names = [block_name(layer, num_blocks) for layer in layers]
    if reference is not None and reference.layers != layers:
        reference = None
    steps = np.array([trace.step for trace in traces])
    panels = [
        _Panel(
            "contraction (tail exponent)",
            np.stack([trace.contraction.float().numpy() for trace in traces], axis=1),
            None if reference is None else reference.contraction.float().numpy()[:, None],
            names,
        ),
        _Panel(
            "transport (to the next block)",
            np.stack([trace.transport.float().numpy() for trace in traces], axis=1),
            None if reference is None else reference.transport.float().numpy()[:, None],
            [f"{a}→{b}" for a, b in pairwise(names)],
        ),
    ]
    return _draw(panels, steps, _alert_levels(steps, alerts), len(banded))


def figure_pixels(figure: Figure) -> np.ndarray:
    """The figure drawn by Agg, as a uint8 ``[height, width, 3]`` RGB array (pixels at the
    figure's dpi)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def _label_positions(count: int, most: int, least_stride: float = 1.0) -> list[int]:
    """Every k-th of ``count`` indices from 0, for the smallest k of 1, 2, 5, 10, 20, 25, 50,
    100, ... (chosen by matplotlib's ``MaxNLocator``) that is at least ``least_stride`` and
    leaves at most ``most`` of them: labels evenly spaced."""
    from matplotlib.ticker import MaxNLocator

    # The locator's step is at least span / most, which leaves at most `most` labels in
    # [0, count); stretching the span to most * least_stride also keeps the step at least
    # least_stride (a stride of `count` or more labels index 0 alone).
    span = max(count, most * min(least_stride, count))
    locator = MaxNLocator(nbins=most, steps=_NICE_STEPS, integer=True, min_n_ticks=1)
    return [int(tick) for tick in locator.tick_values(0, span) if 0 <= tick < count]


def _same_layers(history: Sequence[DepthTrace]) -> list[DepthTrace]:
    layers = history[-1].layers
    return [trace for trace in history if trace.layers == layers]


def _thinned(traces: list[DepthTrace], columns: int) -> list[DepthTrace]:
    if len(traces) <= columns:
        return traces
    picks = np.linspace(0, len(traces) - 1, columns).round().astype(int)
    return [traces[i] for i in picks]


def _alert_levels(steps: np.ndarray, alerts: Sequence[Alert]) -> dict[int, AlertLevel]:
    """Highest warning-or-worse level per column: an alert marks the first shown probe at or
    after its step, so one at a thinned-out step still shows."""
    marks: dict[int, AlertLevel] = {}
    for alert in alerts:
        level = alert.severity
        if level < AlertLevel.WARNING or not steps[0] <= alert.step <= steps[-1]:
            continue
        column = int(np.searchsorted(steps, alert.step, side="left"))
        marks[column] = max(marks.get(column, level), level)
    return marks


def _draw(
    panels: list[_Panel], steps: np.ndarray, marks: dict[int, AlertLevel], probes: int
) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    with_reference = panels[0].reference is not None
    grid = figure.add_gridspec(
        3,
        3 if with_reference else 2,
        height_ratios=[0.06, 1, 1],
        width_ratios=[0.7, 10, 0.35] if with_reference else [10.7, 0.35],
    )
    main = 1 if with_reference else 0
    strip = figure.add_subplot(grid[0, main])
    for row, panel in enumerate(panels, start=1):
        axis = figure.add_subplot(grid[row, main], sharex=strip)
        reference_axis = figure.add_subplot(grid[row, 0], sharey=axis) if with_reference else None
        colourbar_axis = figure.add_subplot(grid[row, main + 1])
        _draw_panel(figure, panel, axis, reference_axis, colourbar_axis)
        axis.tick_params(labelbottom=row == len(panels))
        # the top panel's title goes above the alert marks, which sit right on its columns
        (strip if row == 1 else axis).set_title(panel.title, fontsize=_TITLE_PT)
    figure.align_ylabels()
    _draw_step_axis(axis, steps, probes)
    _draw_alert_marks(figure, strip, marks)
    return figure


def _draw_panel(
    figure: Figure,
    panel: _Panel,
    axis: Axes,
    reference_axis: Axes | None,
    colourbar_axis: Axes,
) -> None:
    import matplotlib
    from matplotlib.colors import Normalize

    colours = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
    both = panel.values if panel.reference is None else np.hstack([panel.values, panel.reference])
    finite = both[np.isfinite(both)]
    # one scale for the run and its reference, so the ref column compares by colour
    scale = Normalize(float(finite.min()), float(finite.max())) if finite.size else Normalize()
    image = _show(axis, panel.values, colours, scale)
    label_axis = axis
    if reference_axis is not None and panel.reference is not None:
        _show(reference_axis, panel.reference, colours, scale)
        reference_axis.set_xticks([0], [REFERENCE_LABEL], fontsize=_LABEL_PT)
        axis.tick_params(labelleft=False)
        label_axis = reference_axis
    rows = _label_positions(len(panel.row_labels), MAX_LAYER_LABELS)
    label_axis.set_yticks(rows, [panel.row_labels[row] for row in rows], fontsize=_TICK_PT)
    label_axis.set_ylabel(LAYER_AXIS_LABEL, fontsize=_LABEL_PT)
    colourbar = figure.colorbar(image, cax=colourbar_axis)
    colourbar.ax.tick_params(labelsize=_TICK_PT)


def _show(axis: Axes, values: np.ndarray, colours: Colormap, scale: Normalize) -> AxesImage:
    return axis.imshow(
        values, cmap=colours, norm=scale, origin="lower", aspect="auto", interpolation="nearest"
    )


def _draw_step_axis(axis: Axes, steps: np.ndarray, probes: int) -> None:
    digits = max(len(str(step)) for step in steps)
    column_px = _STEP_AXIS_PX / len(steps)
    least_stride = (digits * _DIGIT_PX + _LABEL_GAP_PX) / column_px
    columns = _label_positions(len(steps), MAX_STEP_LABELS, least_stride)
    axis.set_xticks(columns, [str(steps[column]) for column in columns], fontsize=_TICK_PT)
    thinned = f" ({len(steps)} of {probes} probes)" if len(steps) < probes else ""
    axis.set_xlabel(STEP_AXIS_LABEL + thinned, fontsize=_LABEL_PT)


def _draw_alert_marks(figure: Figure, strip: Axes, marks: dict[int, AlertLevel]) -> None:
    strip.set_axis_off()
    strip.set_ylim(0, 1)
    for level, colour in ALERT_COLOURS.items():
        columns = [column for column, marked in marks.items() if marked == level]
        if columns:
            strip.scatter(
                columns,
                [0.5] * len(columns),
                marker="v",
                s=70,
                color=colour,
                clip_on=False,
                label=f"{level.name.lower()} alert",
            )
    if marks:
        figure.legend(
            loc="outside upper right", ncols=2, fontsize=_TICK_PT, frameon=False, handletextpad=0.2
        )
