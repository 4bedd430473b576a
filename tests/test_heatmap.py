"""The depth-trace heatmap reads at TensorBoard's Images-card width: contraction above transport,
rows named like the scalar tags, step labels on probe steps evenly spaced in columns, the
reference as its own ``ref`` column, and the warning and critical alert steps marked."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.collections import PathCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.text import Text

from spinal_callback.monitor.alerts import Alert, AlertLevel
from spinal_callback.outputs.heatmap import (
    ALERT_COLOURS,
    HEATMAP_COLUMNS,
    LAYER_AXIS_LABEL,
    MAX_STEP_LABELS,
    REFERENCE_LABEL,
    STEP_AXIS_LABEL,
    depth_trace_figure,
    figure_pixels,
)
from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.probe.trace import DepthTrace, block_name

LAYERS = (20, 21, 22, 23)


def trace_at(step: int, layers: tuple[int, ...] = LAYERS, shift: float = 0.0) -> DepthTrace:
    """A trace whose contraction is ``step + shift`` at every layer, so a column's values name
    the probe it shows."""
    count = len(layers)
    return DepthTrace(
        step=step,
        layers=list(layers),
        num_blocks=layers[-1] + 1,
        contraction=torch.full((count,), float(step) + shift),
        transport=torch.full((count - 1,), 0.5),
        contraction_status=torch.zeros(count, dtype=torch.int8),
        summary={name: 0.0 for name in RAMP_SUMMARY_NAMES},
        measure="hellinger",
        model_fingerprint="m" * 16,
        probe_fingerprint="p" * 16,
    )


def probes(count: int, every: int = 25, layers: tuple[int, ...] = LAYERS) -> list[DepthTrace]:
    return [trace_at(every * i, layers) for i in range(count)]


def alert(step: int, level: str) -> Alert:
    return Alert(step, level, "rule", "spinal/x", 1.0, 0.5, "message")


def heatmaps(figure: Figure) -> list[Axes]:
    """The run's heatmap axes (contraction, transport), top to bottom."""
    run = [
        axis
        for axis in figure.axes
        if axis.images and texts(axis.get_xticklabels()) != [REFERENCE_LABEL]
    ]
    return sorted(run, key=lambda axis: -axis.get_position().y0)


def reference_columns(figure: Figure) -> list[Axes]:
    return [axis for axis in figure.axes if texts(axis.get_xticklabels()) == [REFERENCE_LABEL]]


def texts(labels: list[Text]) -> list[str]:
    return [label.get_text() for label in labels]


def values(axis: Axes) -> np.ndarray:
    """The ``[rows, columns]`` values an axis's heatmap shows."""
    array = axis.images[0].get_array()
    assert array is not None
    return np.asarray(array)


def shown_steps(figure: Figure) -> list[int]:
    """The probe step of each contraction column (its values are the step)."""
    return [int(step) for step in values(heatmaps(figure)[0])[0]]


def step_ticks(figure: Figure) -> tuple[list[float], list[str]]:
    axis = heatmaps(figure)[-1]
    return list(axis.get_xticks()), texts(axis.get_xticklabels())


def alert_marks(figure: Figure) -> dict[int, str]:
    """Column -> colour (hex) of every alert mark in the figure."""
    marks: dict[int, str] = {}
    for axis in figure.axes:
        for collection in axis.collections:
            if isinstance(collection, PathCollection):
                rgba = np.atleast_2d(np.asarray(collection.get_facecolor(), dtype=float))
                colours = [to_hex(tuple(colour)) for colour in rgba]
                columns = np.asarray(collection.get_offsets())[:, 0]
                for column, colour in zip(columns, itertools.cycle(colours)):
                    marks[round(float(column))] = colour
    return marks


# Size, panels, names


def test_the_image_is_480_by_480_rgb_pixels() -> None:
    image = figure_pixels(depth_trace_figure(probes(12), trace_at(0), [alert(50, "warning")]))
    assert (image.shape, image.dtype) == ((480, 480, 3), np.uint8)


def test_contraction_is_stacked_above_transport_sharing_the_step_axis() -> None:
    contraction, transport = heatmaps(depth_trace_figure(probes(12)))
    assert values(contraction).shape == (len(LAYERS), 12)
    assert values(transport).shape == (len(LAYERS) - 1, 12)
    assert contraction.get_position().y0 > transport.get_position().y1
    assert contraction.get_position().x0 == pytest.approx(transport.get_position().x0)
    assert contraction.get_shared_x_axes().joined(contraction, transport)


def test_every_text_is_at_least_10_points_so_it_reads_at_the_cards_width() -> None:
    figure = depth_trace_figure(probes(12), trace_at(0), [alert(50, "critical")])
    figure_pixels(figure)
    sizes = [float(text.get_fontsize()) for text in figure.findobj(Text) if text.get_text()]
    assert sizes
    assert min(sizes) >= 10


def test_the_axes_are_labelled_training_step_and_late_block() -> None:
    contraction, transport = heatmaps(depth_trace_figure(probes(12)))
    assert transport.get_xlabel() == STEP_AXIS_LABEL == "training step"
    assert contraction.get_ylabel() == transport.get_ylabel() == LAYER_AXIS_LABEL == "late block"


def test_a_thinned_history_says_how_many_probes_it_shows() -> None:
    figure = depth_trace_figure(probes(HEATMAP_COLUMNS + 50))
    assert heatmaps(figure)[-1].get_xlabel() == (
        f"training step ({HEATMAP_COLUMNS} of {HEATMAP_COLUMNS + 50} probes)"
    )


def test_rows_are_named_by_block_and_transport_from_block_to_next_deepest_on_top() -> None:
    contraction, transport = heatmaps(depth_trace_figure(probes(3)))
    assert texts(contraction.get_yticklabels()) == ["L20", "L21", "L22", "L23"]
    assert texts(transport.get_yticklabels()) == ["L20→L21", "L21→L22", "L22→L23"]
    assert contraction.images[0].origin == "lower"


def test_block_names_are_padded_to_the_widest_block_of_the_model() -> None:
    history = [trace_at(0, layers=(98, 99, 100)), trace_at(1, layers=(98, 99, 100))]
    for trace in history:
        trace.num_blocks = 128
    contraction, transport = heatmaps(depth_trace_figure(history))
    assert texts(contraction.get_yticklabels()) == ["L098", "L099", "L100"]
    assert texts(transport.get_yticklabels()) == ["L098→L099", "L099→L100"]


def test_rows_read_like_the_scalar_charts_per_block_runs() -> None:
    trace = trace_at(0, layers=(6, 7, 8, 9))
    contraction, transport = heatmaps(depth_trace_figure([trace]))
    runs = [block_name(layer, trace.num_blocks) for layer in trace.layers]
    assert texts(contraction.get_yticklabels()) == runs
    assert [label.split("→")[0] for label in texts(transport.get_yticklabels())] == runs[:-1]


def test_a_long_band_labels_at_most_ten_rows_evenly_from_the_shallowest() -> None:
    contraction, _ = heatmaps(depth_trace_figure(probes(3, layers=tuple(range(54, 81)))))
    rows = list(contraction.get_yticks())
    assert rows == [0, 5, 10, 15, 20, 25]
    assert texts(contraction.get_yticklabels()) == ["L54", "L59", "L64", "L69", "L74", "L79"]


# Columns: which probes are shown


def test_a_short_history_shows_every_probe() -> None:
    assert shown_steps(depth_trace_figure(probes(10, every=1))) == list(range(10))


def test_a_long_history_is_thinned_evenly_to_the_column_limit_keeping_both_ends() -> None:
    history = probes(3 * HEATMAP_COLUMNS + 7, every=1)
    steps = shown_steps(depth_trace_figure(history))
    assert len(steps) == HEATMAP_COLUMNS
    assert (steps[0], steps[-1]) == (0, history[-1].step)
    stride = (len(history) - 1) / (HEATMAP_COLUMNS - 1)
    assert set(np.diff(steps)) <= {int(np.floor(stride)), int(np.ceil(stride))}


def test_the_column_limit_is_an_argument() -> None:
    steps = shown_steps(depth_trace_figure(probes(30, every=1), columns=4))
    assert steps == [0, 10, 19, 29]


def test_a_heatmap_shows_only_traces_with_the_last_traces_layers() -> None:
    history = [trace_at(1, layers=(3, 4, 5, 6)), trace_at(2), trace_at(3)]
    assert shown_steps(depth_trace_figure(history)) == [2, 3]


@pytest.mark.parametrize("columns", [0, 1])
def test_fewer_than_two_columns_is_refused(columns: int) -> None:
    with pytest.raises(ValueError, match=f"columns={columns}"):
        depth_trace_figure(probes(3), columns=columns)


def test_an_empty_history_is_refused() -> None:
    with pytest.raises(ValueError, match="history is empty"):
        depth_trace_figure([])


# Step labels


def test_twelve_probes_every_25_steps_are_labelled_every_50() -> None:
    columns, labels = step_ticks(depth_trace_figure(probes(12)))
    assert columns == [0, 2, 4, 6, 8, 10]
    assert labels == ["0", "50", "100", "150", "200", "250"]


@pytest.mark.parametrize("count", [1, 2, 5, 9, 12, 13, 40, 100, 200, 607])
def test_step_labels_are_probe_steps_evenly_spaced_in_columns_from_the_first(count: int) -> None:
    figure = depth_trace_figure(probes(count, every=10))
    columns, labels = step_ticks(figure)
    steps = shown_steps(figure)
    assert columns[0] == 0
    assert all(column == int(column) for column in columns)
    assert len(set(np.diff(columns))) <= 1
    assert labels == [str(steps[int(column)]) for column in columns]
    assert min(count, 2) <= len(labels) <= MAX_STEP_LABELS
    assert columns[-1] + (columns[1] - columns[0] if len(columns) > 1 else 1) >= len(steps)


@pytest.mark.parametrize("every", [1, 100, 10_000, 1_000_000])
def test_step_labels_never_overlap_however_long_the_step_numbers(every: int) -> None:
    figure = depth_trace_figure(probes(HEATMAP_COLUMNS, every=every))
    figure_pixels(figure)
    boxes = [label.get_window_extent() for label in heatmaps(figure)[-1].get_xticklabels()]
    assert len(boxes) >= 2
    assert all(left.x1 + 4 < right.x0 for left, right in itertools.pairwise(boxes))


# The reference column


def test_the_reference_is_a_column_of_its_own_labelled_ref_in_both_panels() -> None:
    figure = depth_trace_figure(probes(12), trace_at(0, shift=7.0))
    contraction_ref, transport_ref = sorted(
        reference_columns(figure), key=lambda axis: -axis.get_position().y0
    )
    assert values(contraction_ref).tolist() == [[7.0]] * len(LAYERS)
    assert values(transport_ref).tolist() == [[0.5]] * (len(LAYERS) - 1)


def test_the_reference_column_stands_apart_at_the_left_of_the_run() -> None:
    figure = depth_trace_figure(probes(12), trace_at(0))
    for reference, run in zip(
        sorted(reference_columns(figure), key=lambda axis: -axis.get_position().y0),
        heatmaps(figure),
    ):
        assert reference.get_position().x1 < run.get_position().x0
        assert reference.get_position().y0 == pytest.approx(run.get_position().y0)


def test_the_reference_shares_the_runs_colour_scale() -> None:
    figure = depth_trace_figure(probes(12), trace_at(0, shift=400.0))
    for reference, run in zip(reference_columns(figure), heatmaps(figure)):
        scale = run.images[0].norm
        assert reference.images[0].norm is scale
    assert heatmaps(figure)[0].images[0].norm.vmax == 400.0


def test_with_the_reference_the_rows_are_named_beside_it() -> None:
    figure = depth_trace_figure(probes(3), trace_at(0))
    labels = [texts(axis.get_yticklabels()) for axis in reference_columns(figure)]
    assert ["L20", "L21", "L22", "L23"] in labels
    assert ["L20→L21", "L21→L22", "L22→L23"] in labels
    assert all(not label.get_visible() for label in heatmaps(figure)[0].get_yticklabels())


def test_without_a_reference_there_is_no_ref_column() -> None:
    assert reference_columns(depth_trace_figure(probes(12))) == []


def test_a_reference_of_other_layers_is_left_out() -> None:
    figure = depth_trace_figure(probes(12), trace_at(0, layers=(10, 11, 12, 13)))
    assert reference_columns(figure) == []


# Alert marks


def test_warning_and_critical_alert_steps_are_marked_above_their_columns_in_their_colours() -> None:
    figure = depth_trace_figure(
        probes(12), trace_at(0), [alert(150, "warning"), alert(250, "critical")]
    )
    assert alert_marks(figure) == {
        6: ALERT_COLOURS[AlertLevel.WARNING],
        10: ALERT_COLOURS[AlertLevel.CRITICAL],
    }
    contraction = heatmaps(figure)[0]
    (strip,) = [
        axis
        for axis in figure.axes
        if any(isinstance(collection, PathCollection) for collection in axis.collections)
    ]
    assert strip.get_position().y0 >= contraction.get_position().y1
    assert strip.get_shared_x_axes().joined(strip, contraction)


def test_info_alerts_are_not_marked() -> None:
    figure = depth_trace_figure(probes(12), alerts=[alert(150, "info")])
    assert alert_marks(figure) == {}
    assert figure.legends == []


def test_a_history_without_alerts_has_no_marks_and_no_legend() -> None:
    figure = depth_trace_figure(probes(12), trace_at(0))
    assert alert_marks(figure) == {}
    assert figure.legends == []


def test_the_marks_have_a_legend_naming_their_levels() -> None:
    figure = depth_trace_figure(probes(12), alerts=[alert(150, "warning"), alert(250, "critical")])
    (legend,) = figure.legends
    assert texts(legend.get_texts()) == ["warning alert", "critical alert"]


def test_a_step_with_a_warning_and_a_critical_is_marked_once_as_critical() -> None:
    figure = depth_trace_figure(
        probes(12), alerts=[alert(100, "critical"), alert(100, "warning"), alert(100, "info")]
    )
    assert alert_marks(figure) == {4: ALERT_COLOURS[AlertLevel.CRITICAL]}


def test_an_alert_at_a_thinned_out_step_marks_the_next_shown_probe() -> None:
    figure = depth_trace_figure(probes(30, every=1), alerts=[alert(12, "warning")], columns=4)
    assert shown_steps(figure) == [0, 10, 19, 29]
    assert alert_marks(figure) == {2: ALERT_COLOURS[AlertLevel.WARNING]}


def test_alerts_outside_the_shown_steps_are_not_marked() -> None:
    figure = depth_trace_figure(
        probes(12, every=10)[2:], alerts=[alert(5, "critical"), alert(200, "critical")]
    )
    assert alert_marks(figure) == {}
