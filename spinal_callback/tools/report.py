"""Human-readable views of depth traces: terminal tables and a PNG of the depth paths."""

from __future__ import annotations

import math
from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

from spinal_callback.probe.metrics import RAMP_SUMMARY_NAMES
from spinal_callback.probe.trace import DepthTrace
from spinal_callback.tools.localize import Localization

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def format_comparison_table(traces: Mapping[str, DepthTrace]) -> str:
    """Side-by-side table: per-layer contraction and transport, then the ramp summaries.

    ``traces`` maps a column name (checkpoint) to its trace; all must share one late band.
    Transport rows are labelled ``a->b`` for the edge between blocks ``a`` and ``b``.
    """
    names = list(traces)
    if not names:
        raise ValueError("format_comparison_table needs at least one trace")
    layers = traces[names[0]].layers
    mismatched = [name for name in names if traces[name].layers != layers]
    if mismatched:
        raise ValueError(
            f"traces {mismatched} cover other layers than {names[0]} ({layers}); compare "
            "traces of one late band (pass the same --late-layers)"
        )
    rows: list[tuple[str, list[float]]] = []
    for index, layer in enumerate(layers):
        rows.append(
            (f"contraction L{layer:02d}", [traces[n].contraction[index].item() for n in names])
        )
    for index, (a, b) in enumerate(pairwise(layers)):
        rows.append(
            (f"transport {a:02d}->{b:02d}", [traces[n].transport[index].item() for n in names])
        )
    for summary in RAMP_SUMMARY_NAMES:
        rows.append((summary, [traces[n].summary[summary] for n in names]))
    label_width = max(len(label) for label, _ in rows)
    widths = [max(10, len(name)) for name in names]
    header = " " * label_width + "  " + "  ".join(n.rjust(w) for n, w in zip(names, widths))
    lines = [header, "-" * len(header)]
    for label, values in rows:
        cells = "  ".join(f"{value:>{w}.4f}" for value, w in zip(values, widths))
        lines.append(f"{label.ljust(label_width)}  {cells}")
    notes = [f"{name}: {note}" for name in names for note in traces[name].notes]
    return "\n".join(lines + notes)


def plot_depth_paths(traces: Mapping[str, DepthTrace], path: str | Path) -> Path:
    """Write a PNG with contraction per late layer and transport per edge, one line per trace."""
    figure, (left, right) = _two_panels()
    for name, trace in traces.items():
        left.plot(trace.layers, trace.contraction.tolist(), marker="o", label=name)
        edges = [(a + b) / 2 for a, b in pairwise(trace.layers)]
        right.plot(edges, trace.transport.tolist(), marker="o", label=name)
    left.set(title="contraction (tail exponent, higher = squeezed)", xlabel="block", ylabel="alpha")
    measure = next(iter(traces.values())).measure
    right.set(
        title=f"transport ({measure}, lower = smoother)", xlabel="between blocks", ylabel="distance"
    )
    return _save_figure(figure, (left, right), path)


def plot_localization(result: Localization, path: str | Path) -> Path:
    """Write a PNG: patch effect and per-block gain with CIs; recovered share vs rank."""
    figure, (left, right) = _two_panels()
    layers = result.layers
    for values, bounds, label, style in (
        (result.effect, result.effect_ci, "effect (residual patched at block)", "o-"),
        (result.gain, result.gain_ci, "gain (block's own share)", "s--"),
    ):
        # A percentile interval of a ratio may exclude its own point estimate by a hair.
        errors = [
            [_bar(v - low) for v, (low, _) in zip(values, bounds)],
            [_bar(high - v) for v, (_, high) in zip(values, bounds)],
        ]
        left.errorbar(layers, values, yerr=errors, fmt=style, capsize=3, label=label)
    left.set_xticks(layers[:: max(1, len(layers) // 16)])
    left.axhline(0.0, color="grey", linewidth=0.8)
    left.set(
        title=f"share of the margin gain ({result.pairs} pairs)",
        xlabel="block",
        ylabel="(m_patched - m_base) / (m_tuned - m_base)",
    )
    for recovery in result.low_rank:
        right.plot(recovery.ranks, recovery.recovered, marker="o", label=f"block {recovery.layer}")
    right.axhline(0.9, color="grey", linestyle=":", linewidth=0.8)
    right.set_xscale("log", base=2)
    ranks = sorted({k for recovery in result.low_rank for k in recovery.ranks})
    right.set_xticks(ranks, [str(k) for k in ranks])
    right.set(title="low-rank patch", xlabel="rank k", ylabel="share of the block's effect")
    return _save_figure(figure, (left, right), path)


def _bar(length: float) -> float:
    """An error-bar length matplotlib accepts: non-negative and finite."""
    return length if math.isfinite(length) and length > 0 else 0.0


def _two_panels() -> tuple[Figure, tuple[Axes, Axes]]:
    """A figure with two side-by-side axes on its own Agg canvas: neither pyplot nor the
    user's matplotlib backend is touched, so a notebook's plotting keeps working."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.2))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    return figure, (left, right)


def _save_figure(figure: Figure, axes: tuple[Axes, ...], path: str | Path) -> Path:
    """Grid and legend on every axis, then write ``figure`` as a PNG at ``path``."""
    for axis in axes:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    output = Path(path)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)
    return output
